"""How far a better ranking could take a drop schedule: rankings that know the scene (an oracle).

The 60% FitPrune recipe loses its last points on the detail family (which digit is drawn on an
object). This asks whether a better ranking would win them back, under the same schedule, regions
and merging (so the same FLOPs): the recipe's own scores, then the same scores with the patches the
scene generator knows to matter put first, tier by tier:

- digit: the digits' ink patches (every object's, not only the asked one) before every other patch;
- objects+digit: ink patches, then the patches of any object, then the background.

A ranking no runtime could have, so the rows are a ceiling for the schedule, not a method.

    .venv/bin/python benchmarks/drop_ceiling.py [--n 2100] [--split test]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from edge_prune.bench.evaluate import answer, evaluate, is_correct
from edge_prune.bench.generator import FAMILIES, iter_items, patch_targets
from edge_prune.engine import PrunedEngine
from edge_prune.recipe import Recipe
from edge_prune.scoring import ScoreContext

ROOT = Path(__file__).resolve().parent
MODEL = ROOT / "models" / "toyvqa-llava"
RECIPES = ROOT / "recipes"
BATCH = 16
# (recipe, tiers), tiers: which scene labels rank first ("" = the recipe's own ranking)
ROWS = [
    ("fitprune-60-r12-merge", ""),
    ("fitprune-60-r12-merge", "digit"),
    ("fitprune-60-r12-merge", "objects+digit"),
    ("fitprune-60-merge", ""),
    ("fitprune-60-merge", "digit"),
    ("fitprune-60-merge", "objects+digit"),
]


def scene_tiers(item, tiers: str, grid: int) -> torch.Tensor:
    """[grid * grid] tier of each patch: 2 digit ink, 1 object (with objects+digit), else 0."""
    labels = patch_targets(item.scene, item.image.size[0] // grid)
    tier = 2.0 * torch.from_numpy(labels.digit.reshape(-1) > 0).float()
    if tiers == "objects+digit":
        tier = torch.maximum(tier, torch.from_numpy(labels.owner.reshape(-1) > 0).float())
    return tier


class OracleRanking:
    """A score hook: tier first, the recipe's own score (as a rank, so tiers always win) second."""

    def __init__(self) -> None:
        self.tiers: torch.Tensor | None = None  # [B, grid * grid] of the batch being answered

    def __call__(self, ctx: ScoreContext, scores: torch.Tensor) -> torch.Tensor:
        assert self.tiers is not None and ctx.grid_index is not None
        rank = scores.float().masked_fill(~ctx.visual, float("-inf")).argsort(1).argsort(1).float()
        tier = torch.gather(self.tiers, 1, ctx.grid_index.clamp(min=0))
        return tier * scores.shape[1] + rank


def measure(recipe_name: str, tiers: str, split: str, n: int) -> dict:
    recipe = Recipe.load(RECIPES / recipe_name / "recipe.json")
    engine = PrunedEngine.load(MODEL, recipe=recipe)
    grid = int(recipe.model.num_visual_tokens ** 0.5)
    oracle = OracleRanking()
    if tiers:
        engine.score_hook = oracle
    items = list(iter_items(split, n))
    right = dict.fromkeys(FAMILIES, 0)
    asked = dict.fromkeys(FAMILIES, 0)
    for start in tqdm(range(0, n, BATCH), desc=f"{recipe_name} {tiers or 'own'}", mininterval=5):
        chunk = items[start:start + BATCH]
        oracle.tiers = torch.stack([scene_tiers(it, tiers, grid) for it in chunk]) if tiers else None
        for item, text in zip(chunk, answer(engine, chunk).texts):
            asked[item.family] += 1
            right[item.family] += is_correct(text, item.answer)
    return {
        "recipe": recipe_name, "ranking": f"{tiers} first" if tiers else "recipe's own", "n": n,
        "accuracy": sum(right.values()) / n,
        "per_family": {f: right[f] / asked[f] for f in FAMILIES if asked[f]},
        "flops_reduction": recipe.provenance.get("predicted_flops_reduction"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2100, help="items per row")
    parser.add_argument("--split", default="test", choices=["calib", "test"])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "drop_ceiling")
    args = parser.parse_args()
    if args.n <= 0:
        parser.error(f"--n is {args.n}; expected a positive number of items")
    start = time.time()
    base = evaluate(MODEL, None, split=args.split, n=args.n, batch_size=BATCH, timing_items=0,
                    progress=False).accuracy
    rows = [measure(name, tiers, args.split, args.n) for name, tiers in ROWS]
    head = "| recipe | ranking | FLOPs - | acc | Δ acc | " + " | ".join(FAMILIES) + " |"
    lines = [
        "# How far a better ranking could take the 60% schedule (oracle ceiling)",
        "",
        f"{args.split} split, n={args.n} per row, unpruned {base:.2%}. Same schedule, regions and merging as the "
        "recipe, so the same FLOPs; only the ranking changes: the scene generator's labels (digit ink, object "
        "patches) first, the recipe's own score within a tier. No runtime could rank this way: a ceiling, not a "
        f"method. Command: `.venv/bin/python benchmarks/drop_ceiling.py --n {args.n} --split {args.split}`. "
        f"Wall time {time.time() - start:.0f} s.",
        "",
        head,
        "|---|---|---|---|---|" + "---|" * len(FAMILIES),
    ]
    for r in rows:
        fams = " | ".join(f"{r['per_family'][f]:.1%}" for f in FAMILIES)
        lines.append(f"| {r['recipe']} | {r['ranking']} | {r['flops_reduction']:.1%} | {r['accuracy']:.2%} | "
                     f"{(r['accuracy'] - base) * 100:+.2f} | {fams} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"unpruned": base, "split": args.split, "rows": rows},
                                                        indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
