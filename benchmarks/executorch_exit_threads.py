"""Why do exit-router artifacts prefill slower than keep-all? Segments, exits and CPU threads.

An exit router's artifact splits the prefill into one method per candidate layer (the runtime must
read p(exit) between layers), and a request that exits runs the rest of the decoder text-only. This
times, request by request and interleaved, the fp32 XNNPACK artifacts of
- keep-all, in one prefill method and split into one method per decoder layer (no router): the bare
  price of segments;
- the committed exit routers dyvte, dyvte-agree (candidates: every layer but the last) and
  dyvte-agree-l13 (candidates 1 and 3 only: three segments instead of six), dyvte-lookahead (candidates
  1-4, a lookahead router: prefill_exit_<l> runs at every candidate before the decision), and dyvte-frozen
  (candidates 1-4, frozen exits: prefill_exit_<l> also computes the frozen visual keys and values);
at each thread count of ExecuTorch's threadpool (`edge_prune.runtimes.load(..., threads=N)`), in
alternating blocks so that a drift of the host hits every count alike. Prefill speed-ups are over
keep-all in the same block; per item: the mean over items of each item's median.
Writes benchmarks/results/executorch_exit_threads.{md,json}.

    .venv/bin/python benchmarks/executorch_exit_threads.py [--threads 1,2] [--rounds 3] [--blocks 2]
        [--items 35] [--work /tmp/ep-exit-threads]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MODEL = ROOT / "models" / "toyvqa-llava"
RECIPES = ROOT / "recipes"
RESULTS = ROOT / "results"
ROUTERS = ["dyvte", "dyvte-agree", "dyvte-agree-l13", "dyvte-lookahead", "dyvte-frozen"]


def convert_all(model: Path, work: Path) -> dict[str, Path]:
    """name -> fp32 XNNPACK artifact; an artifact already in `work` is reused if it has this converter's
    method layout."""
    from edge_prune.converters.executorch import ConvertOptions, convert
    from edge_prune.models.shapes import load_shape
    from edge_prune.recipe import Recipe
    from edge_prune.runtimes.executorch import PROGRAM_LAYOUT, program_layout

    layers = load_shape(model).num_layers
    jobs = {"keep-all": (None, []), "keep-all-segmented": (None, list(range(1, layers)))}
    jobs.update({name: (RECIPES / name / "recipe.json", []) for name in ROUTERS})
    arts = {}
    for name, (recipe, bounds) in jobs.items():
        out = work / name
        # an artifact of an older method layout measures an older converter: convert it again
        if not (out / "manifest.json").is_file() or program_layout(out) != PROGRAM_LAYOUT:
            options = ConvertOptions(segment_boundaries=bounds, max_prompt_tokens=64, max_new_tokens=4, overwrite=True)
            convert(model, Recipe.load(recipe) if recipe else None, out, options)
        arts[name] = out
    return arts


def time_block(arts: dict[str, Path], threads: int, items: list, rounds: int,
               samples: dict, exits: dict) -> None:
    """`rounds` passes over the items, every artifact in turn per item, on `threads` threads."""
    from edge_prune.bench.tokenizer import prompt as chat_prompt
    from edge_prune.runtimes import load

    sessions = {name: load(path, threads=threads) for name, path in arts.items()}
    for it in items[:3]:  # warm-up: every method of every program loaded
        for s in sessions.values():
            s.generate(it.image, chat_prompt(it.question), max_new_tokens=1)
    for _ in range(rounds):
        for k, it in enumerate(items):
            for name, s in sessions.items():
                r = s.generate(it.image, chat_prompt(it.question), max_new_tokens=1)
                samples[threads][name][k].append(r.timings.prefill_ms)
                exits[name][k] = r.kept[0].exit_layer


def summarise(samples: dict, exits: dict, names: list[str]) -> dict:
    out: dict = {"threads": {}, "exits": {}}
    for name in names:
        per = Counter("none" if layer is None else str(layer) for layer in exits[name].values())
        out["exits"][name] = dict(sorted(per.items()))
    for threads, by_name in samples.items():
        rows = {}
        for name in names:
            per_item = by_name[name]
            rows[name] = {"prefill_ms": statistics.median(v for vals in per_item.values() for v in vals),
                          "prefill_ms_item_mean": statistics.mean(statistics.median(v) for v in per_item.values()),
                          "samples": sum(len(v) for v in per_item.values())}
        base = rows["keep-all"]
        for r in rows.values():
            r["speedup"] = base["prefill_ms"] / r["prefill_ms"]
            r["speedup_item_mean"] = base["prefill_ms_item_mean"] / r["prefill_ms_item_mean"]
        out["threads"][str(threads)] = rows
    return out


def report(result: dict, names: list[str]) -> str:
    counts = list(result["threads"])
    lines = [
        "# Exit-router artifacts: segments, exits and CPU threads (ExecuTorch, XNNPACK fp32)", "",
        f"Model {result['model']} (weights sha256 {result['model_sha256'][:16]}); {result['items']} test items "
        f"(families in turn) x {result['rounds']} rounds x {result['blocks']} blocks per thread count, artifacts "
        "interleaved item by item, thread counts in alternating blocks. Prefill = the decoder's prefill methods "
        "(vision encoder excluded). Speed-up over keep-all at the same thread count; *per item*: mean over items "
        f"of each item's median. Command: `.venv/bin/python benchmarks/executorch_exit_threads.py`. "
        f"Wall time {result['seconds']:.0f} s.", "",
        "| artifact | exits after layer (items) | " + " | ".join(
            f"{t} thread{'s' if t != '1' else ''}: prefill ms, speed-up, per item" for t in counts) + " |",
        "|---|---|" + "---|" * len(counts),
    ]
    for name in names:
        cells = []
        for t in counts:
            r = result["threads"][t][name]
            cells.append(f"{r['prefill_ms']:.2f}, {r['speedup']:.2f}x, {r['speedup_item_mean']:.2f}x")
        exits = ", ".join(f"{k}: {v}" for k, v in result["exits"][name].items()) if name in ROUTERS else ""
        lines.append(f"| {name} | {exits} | " + " | ".join(cells) + " |")
    lines += ["", "Recipes' expected prefill FLOPs reduction (exact accounting, held-out exit rates): "
              + ", ".join(f"{n} {v:.1%}" for n, v in result["predicted_flops_reduction"].items()) + "."]
    seg = result["segment_overhead_ms"]
    lines += ["", "Cost of one more prefill segment (keep-all split per layer, minus keep-all, per extra segment): "
              + ", ".join(f"{t} thread{'s' if t != '1' else ''} {v:.2f} ms ({result['segment_overhead_share'][t]:.1%} "
                          "of a one-piece prefill)" for t, v in seg.items()) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--rounds", type=int, default=3, help="passes over the items per block")
    ap.add_argument("--blocks", type=int, default=2, help="blocks per thread count (alternating)")
    ap.add_argument("--items", type=int, default=35)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ep-exit-threads"))
    args = ap.parse_args(argv)
    from tqdm import tqdm

    from edge_prune.bench.generator import iter_items
    from edge_prune.cost import estimate
    from edge_prune.models.shapes import load_shape
    from edge_prune.recipe import Recipe
    from edge_prune.runtimes.manifest import sha256_file

    start = time.perf_counter()
    counts = [int(t) for t in args.threads.split(",")]
    arts = convert_all(args.model, args.work)
    names = list(arts)
    items = list(iter_items("test", args.items))
    samples: dict = {t: defaultdict(lambda: defaultdict(list)) for t in counts}
    exits: dict = defaultdict(dict)
    blocks = [t for _ in range(args.blocks) for t in counts]
    for threads in tqdm(blocks, desc="timing blocks", unit="block"):
        time_block(arts, threads, items, args.rounds, samples, exits)
    result = summarise(samples, exits, names)
    shape = load_shape(args.model)
    result["predicted_flops_reduction"] = {
        n: estimate(shape, Recipe.load(RECIPES / n / "recipe.json"), text_tokens=14).flops_reduction for n in ROUTERS}
    seg = {}
    for t, rows in result["threads"].items():
        seg[t] = (rows["keep-all-segmented"]["prefill_ms"] - rows["keep-all"]["prefill_ms"]) / (shape.num_layers - 1)
    result["segment_overhead_ms"] = seg
    result["segment_overhead_share"] = {t: seg[t] / result["threads"][t]["keep-all"]["prefill_ms"] for t in seg}
    result.update(model=args.model.name, model_sha256=sha256_file(args.model / "model.safetensors"),
                  items=args.items, rounds=args.rounds, blocks=args.blocks, seconds=time.perf_counter() - start)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "executorch_exit_threads.json").write_text(json.dumps(result, indent=2))
    md = report(result, names)
    (RESULTS / "executorch_exit_threads.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
