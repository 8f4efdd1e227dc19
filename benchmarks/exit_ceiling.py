"""How much prefill an exit router could save at all on the benchmark model (oracle ceiling).

An exit router decides, per request, after which layer every visual token leaves. This answers every
test item once per possible exit layer (and once without exiting), then asks what a router that
knew the answers in advance could reach under the issue's rule (accuracy within 0.5 points of the
unpruned model):

- per item: each request exits at the layer that saves most while its answer stays right; the
  0.5-point allowance is spent on the items whose wrong early exit saves the most. No router can do
  better, since it must decide from the prompt's states without the answer. This bound is loose:
  exits after the first layers answer near chance (a yes/no or a six-way guess is often right), and
  the oracle takes every lucky guess;
- per item, stable: as above, but a request may exit after layer l only if its answer is right
  after l, after every later layer and without exiting (a lucky guess at one layer does not count);
- per item, after the image is read: the stable oracle with exits only after layers whose exit runs
  get at least half as many items right as the unpruned model (earlier exits answer near the
  image-free model's chance level, so a router there cannot tell a lucky guess from a sure one);
- per family: one exit layer per question family (a router that reads only which kind of question
  it is), the best choice over all 7^7 combinations;
- the same per-item oracle restricted to the layers the committed routers may exit at.

    .venv/bin/python benchmarks/exit_ceiling.py [--model DIR] [--n 2100] [--split test] [--allowance 0.5]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge_prune.bench.evaluate import answer, is_correct
from edge_prune.bench.generator import FAMILIES, iter_items
from edge_prune.cost import estimate
from edge_prune.engine import PrunedEngine
from edge_prune.recipe import PruneSpec, Recipe

ROOT = Path(__file__).resolve().parent
MODEL = ROOT / "models" / "toyvqa-llava"
ROUTER_RECIPE = ROOT / "recipes" / "dyvte-agree" / "recipe.json"
BATCH = 16
NO_EXIT = -1  # column of the run without an exit


def exit_recipe(unpruned: Recipe, layer: int) -> Recipe:
    """Every visual token leaves after layer `layer`'s attention, as an exit router's exit does (the same
    schedule as fitprune_curve's image-seen-by-(layer + 1) diagnostics)."""
    layers = unpruned.model.num_layers
    keep = [1.0] * layer + [0.0] * (layers - layer)
    return Recipe(model=unpruned.model, prune=PruneSpec(scorer="random", keep_after=keep),
                  provenance={"method": "exit-oracle", "exit_layer": layer})


def answer_all(engine: PrunedEngine, items: list, label: str) -> tuple[np.ndarray, list[int]]:
    """(correct per item, text tokens per item) of one engine on the items."""
    right, text_tokens = [], []
    for start in tqdm(range(0, len(items), BATCH), desc=label, mininterval=5):
        chunk = items[start:start + BATCH]
        out = answer(engine, chunk)
        right += [is_correct(t, it.answer) for it, t in zip(chunk, out.texts)]
        text_tokens += [p - k.visual_tokens for p, k in zip(out.prompt_lengths, out.kept)]
    return np.array(right, dtype=bool), text_tokens


def per_item_oracle(correct: np.ndarray, saving: np.ndarray, floor: int, allowed: np.ndarray) -> np.ndarray:
    """Column chosen per item among the `allowed` ones: the largest saving among its right answers (the
    largest overall where none is right), then the items with the most to gain exit wrongly while at
    least `floor` answers stay right."""
    usable = np.where(allowed, saving, -np.inf)
    rows = np.arange(len(correct))
    best = int(usable.argmax())
    choice = np.where((correct & allowed).any(1), np.where(correct, usable[None, :], -np.inf).argmax(1), best)
    spare = int(correct[rows, choice].sum()) - floor
    gain = np.where(correct[rows, choice] & ~correct[:, best], saving[best] - saving[choice], 0.0)
    for i in np.argsort(-gain, kind="stable")[:max(spare, 0)]:
        if gain[i] <= 0:
            break
        choice[i] = best
    return choice


def per_family_oracle(correct: np.ndarray, saving: np.ndarray, fam: np.ndarray, floor: int) -> dict:
    """One column per family (`fam`: each item's) maximising the mean saving with at least `floor` right."""
    names = [f for f in FAMILIES if f in fam]
    right = [correct[fam == f].sum(0).tolist() for f in names]  # [families][columns]
    weighted = [((fam == f).sum() * saving).tolist() for f in names]
    best, best_total = None, -1.0
    for combo in itertools.product(range(correct.shape[1]), repeat=len(names)):
        if sum(r[c] for r, c in zip(right, combo)) < floor:
            continue
        total = sum(w[c] for w, c in zip(weighted, combo))
        if total > best_total:
            best, best_total = combo, total
    assert best is not None  # the no-exit column always meets the floor
    return {"columns": dict(zip(names, best))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL,
                        help="a benchmark-model checkpoint (default: the committed one)")
    parser.add_argument("--n", type=int, default=2100, help="items")
    parser.add_argument("--split", default="test", choices=["calib", "test"])
    parser.add_argument("--allowance", type=float, default=0.5, help="accuracy points the exits may cost")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "exit_ceiling")
    args = parser.parse_args()
    if args.n <= 0:
        parser.error(f"--n is {args.n}; expected a positive number of items")
    start = time.time()
    engine = PrunedEngine.load(args.model)
    unpruned = engine.recipe
    layers = unpruned.model.num_layers
    items = list(iter_items(args.split, args.n))
    fam_arr = np.array([it.family for it in items])
    columns = [NO_EXIT, *range(layers)]
    results = {}
    for layer in columns:
        run = engine if layer == NO_EXIT else PrunedEngine(engine.adapter, exit_recipe(unpruned, layer))
        label = "no exit" if layer == NO_EXIT else f"exit after {layer}"
        results[layer], text_tokens = answer_all(run, items, label)
    correct = np.stack([results[c] for c in columns], axis=1)  # [items, columns]
    text = round(statistics.fmean(text_tokens))
    saving = np.array([0.0 if c == NO_EXIT else
                       estimate(engine.adapter.shape, exit_recipe(unpruned, c), text_tokens=text,
                                weight_formats=()).flops_reduction for c in columns])
    base_right = int(correct[:, 0].sum())
    floor = int(np.ceil(base_right - args.allowance / 100 * args.n - 1e-9))

    def summary(choice: np.ndarray) -> dict:
        chosen = correct[np.arange(len(choice)), choice]
        layer_of = [columns[c] for c in choice]
        return {
            "flops_reduction": float(saving[choice].mean()),
            "accuracy": float(chosen.mean()),
            "exit_layers": {("none" if c == NO_EXIT else str(c)): layer_of.count(c) for c in columns},
            "per_family_reduction": {f: float(saving[choice][fam_arr == f].mean())
                                     for f in FAMILIES if f in fam_arr},
        }

    every = np.ones(len(columns), dtype=bool)
    # right at this exit and at every later one, the run without an exit included
    exit_order = [*range(1, len(columns)), 0]  # columns after 0, after 1, ..., then no exit
    right_from_here_on = np.flip(np.logical_and.accumulate(np.flip(correct[:, exit_order], 1), 1), 1)
    stable = np.empty_like(correct)
    stable[:, exit_order] = right_from_here_on
    stable_oracle = summary(per_item_oracle(stable, saving, floor, every))
    item_oracle = summary(per_item_oracle(correct, saving, floor, every))
    zero_loss = summary(per_item_oracle(correct, saving, base_right, every))
    reads_image = np.array([c == NO_EXIT or correct[:, j].sum() >= base_right / 2 for j, c in enumerate(columns)])
    read_oracle = summary(per_item_oracle(stable, saving, floor, reads_image))
    router = Recipe.load(ROUTER_RECIPE).exit
    assert router is not None
    allowed = np.array([c == NO_EXIT or c in router.layers for c in columns])
    router_layers = summary(per_item_oracle(correct, saving, floor, allowed))
    fam = per_family_oracle(correct, saving, fam_arr, floor)
    fam_choice = np.array([fam["columns"][f] for f in fam_arr])
    family_oracle = summary(fam_choice)

    base_acc = base_right / args.n
    model_arg = "" if args.model.resolve() == MODEL.resolve() else f" --model {args.model}"
    lines = [
        "# How much prefill an exit router could save (oracle ceiling)",
        "",
        f"{args.split} split, n={args.n}; every item answered once per exit layer. FLOPs: exact accounting, "
        f"{text} text tokens. An exit after layer l drops every visual token from layer l's MLP on. Command: "
        f"`.venv/bin/python benchmarks/exit_ceiling.py{model_arg} --n {args.n} --split {args.split} "
        f"--allowance {args.allowance}`. "
        f"Wall time {time.time() - start:.0f} s.",
        "",
        "## Accuracy when every request exits after the same layer",
        "",
        "| exit after | FLOPs - | acc | " + " | ".join(FAMILIES) + " |",
        "|---|---|---|" + "---|" * len(FAMILIES),
    ]
    for j, c in enumerate(columns):
        per = " | ".join(f"{correct[fam_arr == f, j].mean():.1%}" for f in FAMILIES)
        name = "no exit" if c == NO_EXIT else c
        lines.append(f"| {name} | {saving[j]:.1%} | {correct[:, j].mean():.2%} | {per} |")
    lines += [
        "",
        f"## What a router that knew the answers could reach (unpruned {base_acc:.2%}; allowance "
        f"{args.allowance} points: at least {floor} of {args.n} right)",
        "",
        "| oracle | FLOPs - (mean) | acc | Δ acc | exits per layer (none, 0..) | " + " | ".join(FAMILIES) + " |",
        "|---|---|---|---|---|" + "---|" * len(FAMILIES),
    ]
    for name, o in [("per item, no loss", zero_loss), ("per item", item_oracle),
                    ("per item, stable", stable_oracle),
                    ("per item, stable, after the image is read", read_oracle),
                    ("per item, the routers' layers", router_layers), ("per family", family_oracle)]:
        dist = ", ".join(str(v) for v in o["exit_layers"].values())
        per = " | ".join(f"{o['per_family_reduction'][f]:.1%}" for f in FAMILIES)
        lines.append(f"| {name} | {o['flops_reduction']:.1%} | {o['accuracy']:.2%} | "
                     f"{(o['accuracy'] - base_acc) * 100:+.2f} | {dist} | {per} |")
    chosen = ", ".join(f"{f}: {'no exit' if c == NO_EXIT else c}" for f, c in
                       ((f, columns[j]) for f, j in fam["columns"].items()))
    lines += ["", f"Per-family oracle's exit layers: {chosen}.", "",
              "The family columns of the oracle table are each family's mean FLOPs reduction."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({
        "split": args.split, "n": args.n, "allowance": args.allowance, "text_tokens": text,
        "columns": ["none" if c == NO_EXIT else c for c in columns], "saving": saving.tolist(),
        "accuracy": correct.mean(0).tolist(), "oracles": {
            "per_item_no_loss": zero_loss, "per_item": item_oracle, "per_item_stable": stable_oracle,
            "per_item_stable_image_read": read_oracle,
            "per_item_router_layers": router_layers,
            "per_family": {**family_oracle, "columns": {f: columns[j] for f, j in fam["columns"].items()}},
        }}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
