"""Measured prefill time of the eager engine as visual tokens are dropped (keep 100/50/25/10%).

Variants run interleaved (A B C D, A B C D, ...) in one process so machine noise hits all of
them alike; the table reports medians and the ratio to keep-all. FLOPs come from the cost model.

    .venv/bin/python benchmarks/engine_prefill.py [--model benchmarks/models/toyvqa-llava] [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edge_prune.cost import estimate
from edge_prune.engine import PrunedEngine
from edge_prune.fit.baselines import one_shot_schedule
from edge_prune.models.adapter import LlavaAdapter
from edge_prune.models.tiny import TinySpec, write_tiny_llava
from edge_prune.recipe import PruneSpec, Recipe

BENCH_MODEL = Path(__file__).parent / "models" / "toyvqa-llava"
KEEPS = (1.0, 0.5, 0.25, 0.1)
# Stand-in with LLaVA-1.5's 576 visual tokens when the benchmark model is not there.
STAND_IN = TinySpec(num_layers=8, hidden_size=256, intermediate_size=688, num_attention_heads=8,
                    num_key_value_heads=4, image_size=192, patch_size=8, vision_hidden_size=64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=BENCH_MODEL)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--k", type=int, default=2, help="tokens drop after layer K-1's attention")
    ap.add_argument("--scorer", default="fitprune")
    ap.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model_dir = args.model
    if not (model_dir / "config.json").is_file():
        model_dir = write_tiny_llava(Path(tempfile.mkdtemp()) / "stand-in", STAND_IN)
        print(f"[{args.model} not found: using a random stand-in with 576 visual tokens]", file=sys.stderr)
    adapter = LlavaAdapter.load(model_dir)
    sig = adapter.signature()
    engines = {}
    for keep in KEEPS:
        prune = PruneSpec(scorer=args.scorer if keep < 1 else "none",
                          keep_after=one_shot_schedule(sig.num_layers, args.k, keep))
        engines[keep] = PrunedEngine(adapter, Recipe(model=sig, prune=prune))
    rng = np.random.default_rng(0)
    size = adapter.shape.vision.image_size
    image = Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))
    batch = adapter.prepare(["What colour is the square in the top left?"], [image])
    text_tokens = int(batch.attention_mask.sum()) - sig.num_visual_tokens
    times: dict[float, list[float]] = {k: [] for k in KEEPS}
    for keep in KEEPS:  # warm-up
        engines[keep].prefill(batch)
    for _ in range(args.runs):
        for keep in KEEPS:
            times[keep].append(engines[keep].prefill(batch).prefill_ms)
    base = statistics.median(times[1.0])
    rows = []
    for keep in KEEPS:
        cost = estimate(adapter.shape, engines[keep].recipe, text_tokens=text_tokens)
        med = statistics.median(times[keep])
        q1, _, q3 = statistics.quantiles(times[keep], n=4)
        rows.append({"keep": keep, "kept_tokens": round(keep * sig.num_visual_tokens),
                     "prefill_ms_median": med, "prefill_ms_iqr": [q1, q3], "ratio_to_keep_all": med / base,
                     "flops_reduction": cost.flops_reduction})
    print(f"model {model_dir} ({sig.num_layers} layers, {sig.num_visual_tokens} visual + {text_tokens} text "
          f"tokens), scorer {args.scorer}, drop after layer {args.k - 1}, {args.runs} interleaved runs")
    print(f"{'keep':>6} {'tokens':>7} {'prefill ms (median)':>20} {'IQR':>15} {'vs keep-all':>12} {'FLOPs -':>8}")
    for r in rows:
        iqr = f"{r['prefill_ms_iqr'][0]:.1f}-{r['prefill_ms_iqr'][1]:.1f}"
        print(f"{r['keep']:>6.0%} {r['kept_tokens']:>7} {r['prefill_ms_median']:>20.1f} {iqr:>15} "
              f"{r['ratio_to_keep_all']:>12.2f} {r['flops_reduction']:>8.1%}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(model_dir), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
