"""Does another schedule shape at the same FLOPs lose less than FitPrune's? (issue 4's 60% figure)

The chosen 60% recipe (`fitprune-60-merge`) keeps about 50 / 31 / 20 / 16 / 12% of the visual tokens
after layers 0-4: FitPrune's search front-loads the drops. Run 26 still reads relation and position
in its last layers, so one might expect a schedule that leaves those layers more tokens to lose less.
This holds everything but the shape fixed (FitPrune's score, the recipe's regions and merging) and
scales each shape until it meets the recipe's exact-accounting FLOPs reduction (bisection on the
scale), then evaluates it:

- fitprune: the recipe's own keep fractions (the reference row);
- steeper / flatter: FitPrune's fractions raised to the power 1.5 / 0.5, then scaled;
- front: more kept after layer 0, fewer after the later layers (3 : 1.5 : 1 : 0.8 : 0.6 : 0.6);
- late-keep: about FitPrune's first drop, then one level from layer 2 on, which leaves the last layers more
  (2.5 : 1.3 : 0.9 : 0.9 : 0.9 : 0.9);
- flat: the same fraction after every layer.

    .venv/bin/python benchmarks/schedule_shapes.py [--n 700] [--split calib] [--regions 1]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from edge_prune.bench.evaluate import evaluate, weights_sha256
from edge_prune.bench.generator import FAMILIES
from edge_prune.cost import estimate
from edge_prune.engine import PrunedEngine
from edge_prune.models.shapes import ModelShape
from edge_prune.recipe import Recipe

ROOT = Path(__file__).resolve().parent
MODEL = ROOT / "models" / "toyvqa-llava"
RECIPE = ROOT / "recipes" / "fitprune-60-merge" / "recipe.json"
BATCH = 16


def shapes(reference: list[float]) -> dict[str, Callable[[float], list[float]]]:
    """Each shape as keep fractions for a scale s (bigger s keeps more); fitprune(1) is the reference."""
    first = reference[0]

    def relative(power: float) -> Callable[[float], list[float]]:
        return lambda s: [s * first * (k / first) ** power for k in reference]

    def ratios(*r: float) -> Callable[[float], list[float]]:
        return lambda s: [s * first / r[0] * x for x in r]

    return {"fitprune": relative(1.0), "steeper": relative(1.5), "flatter": relative(0.5),
            "front": ratios(3, 1.5, 1, 0.8, 0.6, 0.6), "late-keep": ratios(2.5, 1.3, 0.9, 0.9, 0.9, 0.9),
            "flat": lambda s: [s * 0.25] * len(reference)}


def at_reduction(model: ModelShape, base: Recipe, shape: Callable[[float], list[float]], target: float,
                 text_tokens: int) -> Recipe:
    """The shape scaled to the largest keep that still meets `target` (exact accounting)."""
    def recipe(scale: float) -> Recipe:
        keep = [round(min(1.0, k), 6) for k in shape(scale)]
        return replace(base, prune=replace(base.prune, keep_after=keep))

    def reduction(scale: float) -> float:
        return estimate(model, recipe(scale), accounting="exact", text_tokens=text_tokens,
                        weight_formats=()).flops_reduction

    lo, hi = 0.0, 8.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if reduction(mid) >= target else (lo, mid)
    return recipe(lo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=700, help="items per row")
    parser.add_argument("--split", default="calib", choices=["calib", "test"])
    parser.add_argument("--regions", type=int, help="override the recipe's prune.regions")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "schedule_shapes")
    args = parser.parse_args()
    if args.n <= 0:
        parser.error(f"--n is {args.n}; expected a positive number of items")
    start = time.time()
    base = Recipe.load(RECIPE)
    if args.regions is not None:
        base = replace(base, prune=replace(base.prune, regions=args.regions))
    engine = PrunedEngine.load(MODEL)
    text_tokens = base.provenance["text_tokens"]
    target = base.provenance["predicted_flops_reduction"]

    def run(recipe: Recipe | None):
        return evaluate(MODEL, recipe, split=args.split, n=args.n, batch_size=BATCH, timing_items=0,
                        progress=False, engine=engine)

    unpruned = run(None).accuracy
    rows = []
    for name, shape in shapes(base.prune.keep_after).items():
        recipe = at_reduction(engine.adapter.shape, base, shape, target, text_tokens)
        result = run(recipe)
        rows.append({"shape": name, "keep_after": recipe.prune.keep_after,
                     "flops_reduction": result.flops_reduction, "accuracy": result.accuracy,
                     "per_family": result.per_family})
        print(f"{name}: {result.accuracy:.2%} at {result.flops_reduction:.1%}", flush=True)
    regions, sha = base.prune.regions, weights_sha256(MODEL)
    flags = f" --n {args.n} --split {args.split}"
    if args.regions is not None:
        flags += f" --regions {args.regions}"
    lines = [
        "# Schedule shapes at FitPrune-60's FLOPs",
        "",
        f"{args.split} split, n={args.n} per row, unpruned {unpruned:.2%}. Every row is `{RECIPE.parent.name}` "
        f"(FitPrune's score, regions {regions}, merge {base.prune.merge}) with its keep fractions replaced by "
        f"another shape, scaled to the recipe's predicted reduction ({target:.1%}, exact accounting, "
        f"{text_tokens} text tokens). Model weights sha256 {sha[:16]}. "
        f"Command: `.venv/bin/python benchmarks/schedule_shapes.py{flags}`. Wall time {time.time() - start:.0f} s.",
        "",
        "| shape | kept after layers 0..5 (%) | FLOPs - | acc | Δ acc | " + " | ".join(FAMILIES) + " |",
        "|---|---|---|---|---|" + "---|" * len(FAMILIES),
    ]
    for r in rows:
        keep = " / ".join(f"{100 * k:.0f}" for k in r["keep_after"])
        fams = " | ".join(f"{r['per_family'][f]:.1%}" for f in FAMILIES)
        lines.append(f"| {r['shape']} | {keep} | {r['flops_reduction']:.1%} | {r['accuracy']:.2%} | "
                     f"{(r['accuracy'] - unpruned) * 100:+.2f} | {fams} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    payload = {"model_sha256": sha, "unpruned": unpruned, "split": args.split, "n": args.n,
               "recipe": RECIPE.parent.name, "regions": regions, "target_flops_reduction": target, "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
