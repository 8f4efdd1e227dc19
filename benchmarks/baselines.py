"""Issue 3's yardstick: the benchmark model unpruned, with its image ablated, and the random / pool /
FastV baselines at 40/60/80/90% prefill-FLOPs reduction (exact accounting), per question family.

    .venv/bin/python benchmarks/baselines.py [--n 2100] [--n-table 700]

Writes benchmarks/results/baselines.md/.json and the recipes under benchmarks/recipes/NAME/.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from edge_prune.bench.generator import iter_items
from edge_prune.bench.sweep import SweepEntry, prior_accuracy, run_sweep, save_recipe, write_results
from edge_prune.bench.tokenizer import prompt
from edge_prune.engine import PrunedEngine
from edge_prune.errors import RecipeError
from edge_prune.fit.baselines import baseline_recipe

ROOT = Path(__file__).resolve().parent
MODEL = ROOT / "models" / "toyvqa-llava"
TARGETS = (0.4, 0.6, 0.8, 0.9)


def mean_text_tokens(engine: PrunedEngine, n: int = 200) -> int:
    tok = engine.adapter.processor.tokenizer
    lengths = [len(tok(prompt(it.question).replace("<image>", ""))["input_ids"]) for it in iter_items("test", n)]
    return round(statistics.fmean(lengths))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--n", type=int, default=2100, help="items for the unpruned accuracy (>= 2000)")
    ap.add_argument("--n-table", type=int, default=700, help="items per baseline row (100 per family)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "baselines.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    start = time.time()
    engine = PrunedEngine.load(args.model)
    shape = engine.adapter.shape
    text = mean_text_tokens(engine)
    rows = run_sweep(args.model, [SweepEntry("unpruned", None, f"n={args.n}")], n=args.n, engine=engine)
    rows += run_sweep(args.model, [SweepEntry("mean-visual", None, "visual tokens replaced by their mean",
                                              ablate_visual="mean")], n=args.n_table, engine=engine)
    entries, unreachable = [], []
    for method in ("random", "pool", "fastv"):
        for target in TARGETS:
            name = f"{method}-{round(target * 100)}"
            recipe, note = None, ""
            for k in (2, 1):  # FastV's K=2 first; K=1 when K=2 cannot reach the budget
                try:
                    recipe = baseline_recipe(shape, method, target, k=k, text_tokens=text)
                    note = f"K={k}, keeps {recipe.provenance['visual_tokens_kept']}" if method != "pool" else \
                        f"keeps {recipe.provenance['visual_tokens_kept']}"
                    break
                except RecipeError as exc:
                    note = str(exc)
                    if method == "pool":
                        break
            if recipe is None:
                print(f"== {name}: {note}", flush=True)
                unreachable.append(f"{name}: {note}")
                continue
            save_recipe(recipe, ROOT / "recipes", name)
            entries.append(SweepEntry(name, recipe, note))
    rows += run_sweep(args.model, entries, n=args.n_table, engine=engine)
    header = (f"# Baselines on the benchmark model\n\nModel `{args.model.relative_to(ROOT.parent)}`, test split; "
              f"unpruned row n={args.n}, other rows n={args.n_table} (100 per family). FLOPs: exact accounting, "
              f"{text} text tokens (test-prompt mean). The `answer prior` row is the accuracy of always giving a family's most frequent answer. "
              f"Command: `.venv/bin/python benchmarks/baselines.py`. Wall time {time.time() - start:.0f} s.")
    if unreachable:
        header += "\n\nTargets a method cannot reach on this model (no row):\n" + "\n".join(f"- {u}" for u in unreachable)
    prior = prior_accuracy(args.n)
    rows.append({"name": "answer prior", "note": "most frequent answer per family (no model)",
                 "accuracy": sum(prior.values()) / len(prior), "per_family": prior, "flops_reduction": 1.0,
                 "prefill_ms": 0.0, "n": args.n})
    write_results(rows, args.out, header, reference="unpruned")
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
