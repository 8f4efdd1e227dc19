"""What does splitting the exported prefill into segments cost? (issue 6: in-graph vs segments)

Per-request decisions that change shapes (DyVTE exits: drop *all* visual tokens after layer l) cannot
live inside one static ExecuTorch graph without computing the visual tokens anyway, so the converter
splits the prefill after every exit-candidate layer and the runtime picks the next method. This
measures the price: the same keep-all recipe exported as 1 prefill method and as one method per
decoder layer, prefill time interleaved request by request, plus the bare cost of one method call.
Writes benchmarks/results/executorch_segments.{json,md}.

    .venv/bin/python benchmarks/executorch_segments.py [--model benchmarks/models/toyvqa-llava] [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
MODEL = ROOT / "models" / "toyvqa-llava"
RESULTS = ROOT / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ep-executorch-segments"))
    args = ap.parse_args(argv)

    from edge_prune.bench.generator import iter_items
    from edge_prune.bench.tokenizer import prompt as chat_prompt
    from edge_prune.converters.executorch import ConvertOptions, convert
    from edge_prune.models.shapes import load_shape
    from edge_prune.recipe import Recipe
    from edge_prune.runtimes import load

    shape = load_shape(args.model)
    layers = shape.num_layers
    recipe = Recipe.identity(shape.signature())
    variants = {"1 segment": [], f"{layers} segments": list(range(1, layers))}
    sessions = {}
    for name, bounds in variants.items():
        out = args.work / name.replace(" ", "-")
        if not (out / "manifest.json").is_file():
            options = ConvertOptions(segment_boundaries=bounds, max_prompt_tokens=64, max_new_tokens=4,
                                     text_only_prefill=False, overwrite=True)
            convert(args.model, recipe, out, options)
        sessions[name] = load(out)
    items = list(iter_items("test", 4))
    for s in sessions.values():  # warm-up
        s.generate(items[0].image, chat_prompt(items[0].question), max_new_tokens=1)
    prefill: dict[str, list[float]] = {n: [] for n in sessions}
    for _ in range(args.runs):
        for it in items:
            for name, s in sessions.items():
                r = s.generate(it.image, chat_prompt(it.question), max_new_tokens=1)
                prefill[name].append(r.timings.prefill_ms)
    # The bare cost of one method call: token_embedding on two tokens.
    s = sessions["1 segment"]
    ids = np.asarray([[1, 2]], dtype=np.int64)
    calls = []
    for _ in range(200):
        t = time.perf_counter()
        s._run("token_embedding", ids)
        calls.append((time.perf_counter() - t) * 1000)
    med = {n: statistics.median(v) for n, v in prefill.items()}
    one, many = med["1 segment"], med[f"{layers} segments"]
    result = {
        "model": str(args.model), "layers": layers, "visual_tokens": shape.num_visual_tokens,
        "prefill_ms_median": med, "samples": len(prefill["1 segment"]),
        "overhead_per_extra_segment_ms": (many - one) / (layers - 1),
        "overhead_share_per_segment": (many - one) / (layers - 1) / one,
        "bare_method_call_ms_median": statistics.median(calls),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "executorch_segments.json").write_text(json.dumps(result, indent=2))
    md = [
        "# Prefill segments: the cost of splitting the exported decoder (issue 6)", "",
        f"Model {args.model.name}: {layers} decoder layers, {shape.num_visual_tokens} visual tokens, "
        "keep-all recipe, "
        f"XNNPACK fp32; median of {result['samples']} interleaved prefills.", "",
        "| variant | prefill ms |", "|---|---|",
        *[f"| {n} | {v:.2f} |" for n, v in med.items()], "",
        f"Overhead per extra segment: {result['overhead_per_extra_segment_ms']:.3f} ms "
        f"({result['overhead_share_per_segment']:.1%} of a one-piece prefill); a bare method call "
        f"(token_embedding, 2 tokens) takes {result['bare_method_call_ms_median']:.3f} ms in the Python "
        "runtime.",
        "",
    ]
    (RESULTS / "executorch_segments.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
