"""Issue 6: the device backends' artifacts of the benchmark model, and what share of each graph their
delegate took; writes benchmarks/results/executorch_backends.{json,md}.

Vulkan (mobile GPU) and Core ML (Apple GPU/NPU) lower on this machine but run only on a device, so
this converts the benchmark model with each recipe for each backend and records the delegation
summary of every method (the one `edge-prune inspect ARTIFACT` prints), conversion time and .pte size;
XNNPACK's is in executorch.md. QNN is converted too: without Qualcomm's SDK the table shows the error.

    .venv/bin/python benchmarks/executorch_backends.py [--backends vulkan,coreml,qnn]
        [--recipes keep-all,fitprune-60,guides-90,dyvte] [--work /tmp/ep-backends]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
MODEL = ROOT / "models" / "toyvqa-llava"
RECIPES = ROOT / "recipes"
RESULTS = ROOT / "results"
COLUMNS = ("vision_encoder", "token_embedding", "image prefill", "prefill_text", "decode")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def recipe_path(name: str, model: Path, work: Path) -> Path:
    """keep-all is made here (an identity recipe); the others are the committed benchmark recipes."""
    if name == "keep-all":
        from edge_prune.models.shapes import load_shape
        from edge_prune.recipe import Recipe

        path = work / "recipes" / "keep-all" / "recipe.json"
        Recipe.identity(load_shape(model).signature(), note="keep-all baseline").save(path)
        return path
    path = RECIPES / name / "recipe.json"
    if not path.is_file():
        raise SystemExit(f"no committed recipe {path}: run the benchmark that fits it first, or drop it from --recipes")
    return path


def convert_one(model: Path, recipe: Path, backend: str, out: Path) -> dict[str, Any]:
    from edge_prune.converters.executorch import ConvertOptions, convert
    from edge_prune.errors import ArtifactError

    options = ConvertOptions(backend=backend, quant="none", max_prompt_tokens=64, max_new_tokens=16, overwrite=True)
    try:
        res = convert(model, recipe, out, options)
    except ArtifactError as err:  # QNN without Qualcomm's SDK
        return {"error": str(err)}
    return {"seconds": round(res.seconds, 1), "pte_mib": round(res.pte_bytes / 2**20, 3),
            "delegation": res.delegation.to_dict(), "summary": res.delegation.lines()}


def pruned_prefill(methods: dict[str, Any]) -> dict[str, Any]:
    """The image prefill's nodes, summed over its segments when exits split it (prefill_<l>, prefill_exit_<l>)."""
    parts = [m for name, m in methods.items() if name == "prefill" or (name.startswith("prefill_") and name != "prefill_text")]
    left: dict[str, int] = {}
    for m in parts:
        for op, n in m["top_non_delegated"].items():
            left[op] = left.get(op, 0) + n
    delegated = sum(m["delegated_nodes"] for m in parts)
    total = delegated + sum(m["non_delegated_nodes"] for m in parts)
    return {"share": delegated / total if total else 0.0, "delegated_subgraphs": sum(m["delegated_subgraphs"] for m in parts),
            "segments": len(parts), "top_non_delegated": dict(sorted(left.items(), key=lambda kv: -kv[1]))}


def report(data: dict[str, Any]) -> str:
    lines = ["# Device backends' ExecuTorch artifacts on the benchmark model (issue 6)", "",
             f"Produced by `benchmarks/executorch_backends.py` on {data['date']}: fp32 artifacts of the "
             "committed benchmark model (weights sha256 " + data["model_sha256"][:16] + "), lowered on this "
             "machine (x86 Linux, no device), with executorch " + data["versions"].get("executorch", "?") +
             " and coremltools " + data["versions"].get("coremltools", "?") + ". Share = delegated graph nodes / "
             "all nodes of the method's lowered edge graph; what stays outside runs as ExecuTorch portable "
             "kernels on the CPU. XNNPACK's shares are in `executorch.md`.", "",
             "| backend | recipe | convert s | .pte MiB | all methods | " + " | ".join(COLUMNS) +
             " | ops left to portable kernels in the image prefill (nodes) |",
             "|---|---|---|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for key, row in data["artifacts"].items():
        backend, recipe = key.split("/")
        if "error" in row:
            lines.append(f"| {backend} | {recipe} | error: {row['error']} |" + " |" * (len(COLUMNS) + 3))
            continue
        d = row["delegation"]
        methods = {**{m: d["methods"][m] for m in COLUMNS if m in d["methods"]}, "image prefill": pruned_prefill(d["methods"])}
        shares = [f"{methods[m]['share']:.0%} ({methods[m]['delegated_subgraphs']})" for m in COLUMNS]
        left = methods["image prefill"]["top_non_delegated"]
        ops = ", ".join(f"{op.removeprefix('aten_')} ×{n}" for op, n in list(left.items())[:4] if op != "getitem") or "none"
        segments = methods["image prefill"]["segments"]
        lines.append(f"| {backend} | {recipe} | {row['seconds']:.0f} | {row['pte_mib']:.2f} | {d['share']:.1%} | "
                     + " | ".join(shares) + f" | {ops}{f' ({segments} segments)' if segments > 1 else ''} |")
    lines += ["", "Per method: share of its nodes delegated (delegated subgraphs). *image prefill* is the decoder "
              "prefill after the image, which implements the recipe (summed over its segments when exit routers "
              "split it); *prefill_text* is the text-only prefill.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--backends", default="vulkan,coreml,qnn")
    ap.add_argument("--recipes", default="keep-all,fitprune-60,guides-90,dyvte")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ep-backends"))
    ap.add_argument("--results", type=Path, default=RESULTS / "executorch_backends.md")
    ap.add_argument("--report-only", action="store_true", help="re-render the .md from the saved .json")
    args = ap.parse_args(argv)
    if args.report_only:
        args.results.write_text(report(json.loads(args.results.with_suffix(".json").read_text())))
        return 0

    from edge_prune.bench.evaluate import weights_sha256
    from edge_prune.converters.executorch import tool_versions

    data: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "model_sha256": weights_sha256(args.model),
                            "versions": tool_versions(), "artifacts": {}}
    for backend in args.backends.split(","):
        for name in args.recipes.split(","):
            log(f"converting {name} for {backend}")
            row = convert_one(args.model, recipe_path(name, args.model, args.work), backend,
                              args.work / "artifacts" / f"{name}-{backend}")
            data["artifacts"][f"{backend}/{name}"] = row
            log("\n".join(row.get("summary", [row.get("error", "")])))
            if "error" in row:
                break  # the same missing SDK for every recipe
    args.results.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.results.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, args.results.with_suffix(".json"))
    text = report(data)
    args.results.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
