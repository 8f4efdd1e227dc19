"""Prefill time of FitPrune's reference drops against its region-balanced, merged drops (issue 4), with
the unpruned model, on single requests as a device runs them.

Variants run interleaved item by item, so load drift hits each alike; the table gives medians and
speedups over unpruned (FLOPs are not latency: merging and region ranking add small ops that a 6-layer,
128-wide decoder feels and a 7B one does not).

    .venv/bin/python benchmarks/merge_prefill.py [--items 40] [--repeats 2]

Writes benchmarks/results/merge_prefill.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from edge_prune.bench.evaluate import answer
from edge_prune.bench.generator import iter_items
from edge_prune.cost import estimate
from edge_prune.engine import PrunedEngine

ROOT = Path(__file__).resolve().parent
MODEL = ROOT / "models" / "toyvqa-llava"
VARIANTS = ("fitprune-40", "fitprune-40-r12-merge", "fitprune-50", "fitprune-50-r12-merge", "fitprune-60",
            "fitprune-60-r12-merge")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=40, help="test items (one request each)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    engines = {"unpruned": PrunedEngine.load(MODEL)}
    for name in VARIANTS:
        engines[name] = PrunedEngine.load(MODEL, recipe=ROOT / "recipes" / name / "recipe.json")
    items = list(iter_items("test", args.items))
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for item in items:
            for name, engine in engines.items():  # interleaved
                times[name].append(answer(engine, [item]).timings.prefill_ms)
    base = statistics.median(times["unpruned"])
    shape = engines["unpruned"].adapter.shape
    lines = ["# Prefill time: FitPrune's reference drops against region-balanced merged drops", "",
             f"Single requests, {args.items} test items x {args.repeats}, variants interleaved; median decoder "
             "prefill. Command: `.venv/bin/python benchmarks/merge_prefill.py`.", "",
             "| recipe | FLOPs - (exact, 14 text tokens) | prefill ms (median) | speedup vs unpruned |",
             "|---|---:|---:|---:|"]
    for name, engine in engines.items():
        reduction = estimate(shape, engine.recipe, text_tokens=14).flops_reduction
        median = statistics.median(times[name])
        lines.append(f"| {name} | {reduction:.1%} | {median:.1f} | {base / median:.2f}x |")
    text = "\n".join(lines) + "\n"
    (ROOT / "results" / "merge_prefill.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
