"""Issue 6 acceptance figures for the ExecuTorch path on the benchmark model; writes
benchmarks/results/executorch.{json,md}.

1. fidelity: fp32 XNNPACK artifact vs the eager engine with the same recipe, greedy answers on
   500 test items (identical token lists), and accuracy of fp32 vs 8da4w artifacts;
2. speed: decoder prefill, TTFT (with the vision encoder's share) and decode tok/s of every recipe
   vs the keep-all artifact of the same quant, variants interleaved request by request, medians;
3. peak RSS (one subprocess per artifact, so artifacts do not share a process) and artifact size.

Recipes: keep-all, fitprune-60 (benchmarks/recipes/fitprune-60, fitted by issue 5's script; when it is
missing, FastV at the same 60% exact-FLOPs budget instead), guides-90, dyvte, dyvte-agree and the
region-balanced, merged fitprune-60-r12-merge and guides-90-r8-merge when their recipes exist. An exit
router's cost differs request by request, so the speed stage also reports the mean over items of each
item's median prefill (`--speed-items` items, one family after another).
Finished stages are kept in the JSON, so an interrupted run continues.

    .venv/bin/python benchmarks/executorch_acceptance.py [--n 500] [--runs 7] [--work /tmp/ep-executorch]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
MODEL = ROOT / "models" / "toyvqa-llava"
RECIPES = ROOT / "recipes"
RESULTS = ROOT / "results"
QUANTS = ("none", "8da4w")
MAX_NEW = 4  # the benchmark's answers are one word (edge_prune.bench.evaluate uses 4 too)
DECODE_TOKENS = 16  # decode speed is measured on this many tokens, ignoring end-of-sequence
SPEED_ITEMS = 5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class State:
    """Results so far, saved after every stage (the machine is shared and slow; runs get interrupted)."""

    def __init__(self, path: Path, model: Path):
        from edge_prune.bench.evaluate import stored_results

        self.path = path
        # results (and artifacts, see convert_all) of other weights are not reused
        self.data, set_aside = stored_results(path, model)
        if set_aside:
            log(f"{model} is not the model of {path}: converting and measuring again")

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)


def recipes(model: Path, work: Path) -> dict[str, Path]:
    """name -> recipe.json: keep-all, the 60% recipes, and issue 5's guide/exit recipes when present."""
    from edge_prune.models.shapes import load_shape
    from edge_prune.recipe import Recipe

    out: dict[str, Path] = {}
    keep_all = work / "recipes" / "keep-all" / "recipe.json"
    if not keep_all.is_file():
        Recipe.identity(load_shape(model).signature(), note="keep-all baseline").save(keep_all)
    out["keep-all"] = keep_all
    # the 60% recipes: FitPrune (issue 4) and FastV (issue 3's baseline); FastV at the same exact-FLOPs
    # budget is made here when the baselines have not been run
    for name in ("fitprune-60", "fastv-60"):
        if (RECIPES / name / "recipe.json").is_file():
            out[name] = RECIPES / name / "recipe.json"
    if "fastv-60" not in out:
        from edge_prune.fit.baselines import baseline_recipe

        fastv = work / "recipes" / "fastv-60" / "recipe.json"
        if not fastv.is_file():
            baseline_recipe(load_shape(model), "fastv", 0.6, text_tokens=24).save(fastv)
        out["fastv-60"] = fastv
    for name in ("guides-90", "dyvte", "fitprune-60+dyvte", "dyvte-agree", "dyvte-lookahead", "dyvte-frozen",
                 "fitprune-60-r12-merge", "guides-90-r8-merge"):
        path = RECIPES / name / "recipe.json"
        if path.is_file():
            out[name] = path
    return out


def convert_all(model: Path, named: dict[str, Path], work: Path, state: State) -> dict[str, Path]:
    from edge_prune.converters.executorch import ConvertOptions, convert
    from edge_prune.runtimes.executorch import PROGRAM_LAYOUT, program_layout

    arts: dict[str, Path] = {}
    for name, recipe in named.items():
        for quant in QUANTS:
            key = f"{name}/{quant}"
            out = work / "artifacts" / f"{name}-{quant}"
            layout = program_layout(out) if (out / "manifest.json").is_file() else None
            if layout is not None and layout != PROGRAM_LAYOUT:
                log(f"{key}: the artifact in {out} has method layout {layout}, not {PROGRAM_LAYOUT}")
                state.data.get("convert", {}).pop(key, None)
            if not (out / "manifest.json").is_file() or key not in state.data.get("convert", {}):
                log(f"converting {key}")
                # results measured on an earlier conversion say nothing about this one
                state.data.get("fidelity", {}).pop(name, None)
                for by_quant in state.data.get("speed", {}).values():
                    if isinstance(by_quant, dict):
                        by_quant.pop(name, None)
                options = ConvertOptions(quant=quant, max_prompt_tokens=64, max_new_tokens=DECODE_TOKENS,
                                         overwrite=True)
                res = convert(model, recipe, out, options)
                state.data.setdefault("convert", {})[key] = {
                    "seconds": round(res.seconds, 1), "pte_mib": round(res.pte_bytes / 2**20, 3),
                    "delegation_share": round(res.delegation.share, 4),
                    "kept": res.spec.kept, "exit_layers": res.spec.exit_layers,
                }
                state.save()
            arts[key] = out
    return arts


def fidelity(model: Path, named: dict[str, Path], arts: dict[str, Path], n: int, state: State) -> None:
    """Greedy answers of the fp32 artifact vs the engine, and accuracy per artifact, on the same items."""
    from edge_prune.bench.generator import iter_items
    from edge_prune.bench.tokenizer import prompt as chat_prompt
    from edge_prune.engine import PrunedEngine
    from edge_prune.runtimes import load

    items = list(iter_items("test", n))
    done = state.data.setdefault("fidelity", {})
    for name, recipe in named.items():
        if name in done and done[name].get("n") == n:
            continue
        engine = PrunedEngine.load(model, recipe=recipe)
        sessions = {q: load(arts[f"{name}/{q}"]) for q in QUANTS}
        same = 0
        correct = {"engine": 0, **{q: 0 for q in QUANTS}}
        exits: dict[str, int] = {}
        for it in tqdm(items, desc=f"fidelity {name}", unit="item"):
            prompt = chat_prompt(it.question)
            ref = engine.generate(prompt, it.image, max_new_tokens=MAX_NEW)
            correct["engine"] += first_word(ref.text) == it.answer
            for q, session in sessions.items():
                out = session.generate(it.image, prompt, max_new_tokens=MAX_NEW)
                correct[q] += first_word(out.text) == it.answer
                if q == "none":
                    same += out.tokens == ref.tokens
                    where = str(out.kept[0].exit_layer)
                    exits[where] = exits.get(where, 0) + 1
        done[name] = {"n": n, "identical_to_engine": same / n,
                      "accuracy": {k: v / n for k, v in correct.items()}, "exit_layers": exits}
        state.save()
        log(f"{name}: fp32 identical to engine on {same}/{n}; accuracy {done[name]['accuracy']}")


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0] if words else ""


def speed(arts: dict[str, Path], names: list[str], runs: int, state: State, n_items: int = SPEED_ITEMS) -> None:
    """Interleaved requests: every variant of a quant runs the same item back to back, `runs` rounds."""
    from edge_prune.bench.generator import iter_items
    from edge_prune.bench.tokenizer import prompt as chat_prompt
    from edge_prune.runtimes import load

    items = list(iter_items("test", n_items))
    out = state.data.setdefault("speed", {})
    for quant in QUANTS:
        sessions = {name: load(arts[f"{name}/{quant}"]) for name in names}
        for it in items[:1]:  # warm-up: first calls load methods and pack weights
            for s in sessions.values():
                s.generate(it.image, chat_prompt(it.question), max_new_tokens=2)
        samples: dict[str, dict[str, list[float]]] = {n: {} for n in names}
        for _ in tqdm(range(runs), desc=f"speed {quant}", unit="round"):
            for it in items:
                for name, s in sessions.items():
                    r = s.generate(it.image, chat_prompt(it.question), max_new_tokens=DECODE_TOKENS,
                                   ignore_eos=True)
                    t = r.timings
                    for key, value in (("prefill_ms", t.prefill_ms), ("ttft_ms", t.ttft_ms),
                                       ("vision_ms", t.vision_ms), ("decode_tok_s", t.decode_tok_s),
                                       ("preprocess_ms", t.preprocess_ms)):
                        samples[name].setdefault(key, []).append(value)
        med = {name: {k: statistics.median(v) for k, v in m.items()} for name, m in samples.items()}
        for name in names:  # the expected prefill over these items (what an exit router saves on average)
            prefill = samples[name]["prefill_ms"]  # round by round, the items in order
            med[name]["prefill_ms_item_mean"] = statistics.mean(statistics.median(prefill[i::len(items)])
                                                                for i in range(len(items)))
        base = med["keep-all"]
        out[quant] = {
            name: {**{k: round(v, 3) for k, v in m.items()},
                   "prefill_speedup": round(base["prefill_ms"] / m["prefill_ms"], 3),
                   "prefill_speedup_item_mean": round(base["prefill_ms_item_mean"] / m["prefill_ms_item_mean"], 3),
                   "ttft_speedup": round(base["ttft_ms"] / m["ttft_ms"], 3),
                   "vision_share_of_ttft": round(m["vision_ms"] / m["ttft_ms"], 3),
                   "decode_ratio": round(m["decode_tok_s"] / base["decode_tok_s"], 3),
                   "samples": len(samples[name]["prefill_ms"]), "items": len(items)}
            for name, m in med.items()
        }
        state.save()
        rows = out[quant].items()
        summary = (f"{n} prefill {v['prefill_ms']:.2f} ms ({v['prefill_speedup']:.2f}x)" for n, v in rows)
        log(f"speed {quant}: " + ", ".join(summary))


RSS_CHILD = """
import json, sys
from edge_prune.bench.generator import iter_items
from edge_prune.bench.tokenizer import prompt
from edge_prune.runtimes import load
s = load(sys.argv[1])
peak = 0.0
for it in iter_items("test", 3):
    peak = max(peak, s.generate(it.image, prompt(it.question), max_new_tokens=8).peak_rss_mb)
print(json.dumps({"peak_rss_mb": peak}))
"""


def memory(arts: dict[str, Path], state: State) -> None:
    out = state.data.setdefault("memory", {})
    for key, path in arts.items():
        if key in out:
            continue
        res = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path)], capture_output=True, text=True,
                             check=True)
        out[key] = {**json.loads(res.stdout.strip().splitlines()[-1]),
                    "pte_mib": round((path / "model.pte").stat().st_size / 2**20, 3)}
        state.save()


def report(data: dict[str, Any], n: int) -> str:
    lines = ["# ExecuTorch artifacts on the benchmark model (issue 6)", "",
             "Produced by `benchmarks/executorch_acceptance.py` (XNNPACK, CPU, 2 shared cores; medians of "
             "interleaved requests). Prefill = token embedding + pruned decoder prefill; TTFT adds image "
             "preprocessing, the vision encoder and the first token. Model weights sha256 "
             f"{data.get('model_sha256', 'not recorded')[:16]}.", ""]
    fid = data.get("fidelity", {})
    if fid:
        quants = [q for q in ("8da4w", "int8") if any(q in f["accuracy"] for f in fid.values())]
        lines += [f"## Fidelity and accuracy ({n} test items, greedy, {MAX_NEW} new tokens)", "",
                  "| recipe | fp32 artifact = engine | engine acc | fp32 acc | "
                  + "".join(f"{q} acc | {q} - fp32 | " for q in quants),
                  "|---|---|---|---|" + "---|---|" * len(quants)]
        for name, f in fid.items():
            a = f["accuracy"]
            cells = "".join(f"{a[q]:.1%} | {100 * (a[q] - a['none']):+.1f} pt | " if q in a else "| | "
                            for q in quants)
            lines.append(f"| {name} | {f['identical_to_engine']:.1%} | {a['engine']:.1%} | {a['none']:.1%} | {cells}")
        lines.append("")
    sp, mem = data.get("speed", {}), data.get("memory", {})
    if sp:
        lines += ["## Speed, memory and size", "",
                  "| quant | recipe | prefill ms | prefill speedup | mean over items: prefill ms, speedup | "
                  "TTFT ms | TTFT speedup | vision share of TTFT | "
                  "decode tok/s | decode vs keep-all | peak RSS MiB | .pte MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for quant, rows in sp.items():
            for name, r in rows.items():
                m = mem.get(f"{name}/{quant}", {})
                item_mean = (f"{r['prefill_ms_item_mean']:.2f}, {r['prefill_speedup_item_mean']:.2f}x "
                             f"({r['items']} items)" if "prefill_ms_item_mean" in r else "")
                lines.append(
                    f"| {quant} | {name} | {r['prefill_ms']:.2f} | {r['prefill_speedup']:.2f}x | {item_mean} | "
                    f"{r['ttft_ms']:.2f} | "
                    f"{r['ttft_speedup']:.2f}x | {r['vision_share_of_ttft']:.0%} | {r['decode_tok_s']:.1f} | "
                    f"{r['decode_ratio']:.2f}x | {m.get('peak_rss_mb', float('nan')):.0f} | "
                    f"{m.get('pte_mib', float('nan')):.2f} |")
        lines.append("")
    conv = data.get("convert", {})
    if conv:
        lines += ["## Conversions", "",
                  "| artifact | seconds | delegated share of graph nodes | visual tokens kept per layer |",
                  "|---|---|---|---|"]
        for key, c in conv.items():
            lines.append(f"| {key} | {c['seconds']:.0f} | {c['delegation_share']:.1%} | {c['kept']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global QUANTS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--speed-items", type=int, default=SPEED_ITEMS,
                    help="test items in the speed stage (families in turn; 35 = five of each)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ep-executorch"))
    ap.add_argument("--stages", default="convert,fidelity,speed,memory")
    ap.add_argument("--quants", default=",".join(QUANTS), help="comma-separated: none, 8da4w, int8 (none is the fidelity reference)")
    ap.add_argument("--recipes", help="comma-separated subset, e.g. keep-all,fastv-60 (default: all found)")
    ap.add_argument("--results", type=Path, default=RESULTS / "executorch.md",
                    help="report path (its .json sibling keeps the state); a partial run can write its own")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    state = State(args.results.with_suffix(".json"), args.model)
    named = recipes(args.model, args.work)
    if args.recipes:
        wanted = args.recipes.split(",")
        unknown = [name for name in wanted if name not in named]
        if unknown:
            ap.error(f"--recipes: {', '.join(unknown)} not found (have: {', '.join(named)}; recipes come from "
                     f"{RECIPES})")
        named = {k: v for k, v in named.items() if k in wanted}
    QUANTS = tuple(args.quants.split(","))
    arts = convert_all(args.model, named, args.work, state)
    stages = args.stages.split(",")
    if "fidelity" in stages:
        fidelity(args.model, named, arts, args.n, state)
    if "speed" in stages:
        speed(arts, list(named), args.runs, state, args.speed_items)
    if "memory" in stages:
        memory(arts, state)
    args.results.write_text(report(state.data, args.n))
    log(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
