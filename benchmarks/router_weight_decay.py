"""How the exit router's weight decay decides the exits its threshold search can find.

For each model and label rule (DyVTE's loss ratio with a loss slack of 0 or 0.01, or argmax agreement
alone), collects the exit labels once on `bench:train` (as `edge-prune fit --method dyvte`
does), then trains the router at each weight decay and seed and runs the fitter's own threshold
search on the held-out share. Reports the expected prefill-FLOPs reduction it finds within the
held-out risk bound, and the share of held-out probabilities that read exactly 1.0 (ties the
threshold cannot split). Writes benchmarks/results/router_weight_decay.{md,json}.

    .venv/bin/python benchmarks/router_weight_decay.py [MODEL_DIR ...] [--n 1280] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from edge_prune.bench.evaluate import weights_sha256
from edge_prune.engine import PrunedEngine
from edge_prune.fit.calibration import load_calibration
from edge_prune.fit.routers import RouterConfig, RouterFitter

ROOT = Path(__file__).resolve().parent
MODEL = ROOT / "models" / "toyvqa-llava"
RESULTS = ROOT / "results"
RULES = (("dyvte", 0.0), ("dyvte", 0.01), ("agreement", 0.0))  # (labels, loss slack)
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 3e-2)


def sweep(model: str, n: int, seeds: int) -> list[dict]:
    engine = PrunedEngine.load(model, device="cpu")
    calibration = load_calibration("bench:train", n)
    rows = []
    for labels, slack in RULES:
        fitter = RouterFitter(engine, calibration, RouterConfig(labels=labels, loss_slack=slack), progress=True)
        start = time.perf_counter()
        data = fitter.collect()
        collect_s = time.perf_counter() - start
        text = fitter._mean_text_tokens()
        eligible = data.eligible
        label_rate = [round(float(data.labels[:, j][eligible[:, j]].mean()), 3) for j in range(len(fitter.layers))]
        for wd in WEIGHT_DECAYS:
            found, saturated = [], []
            for seed in range(seeds):
                fitter.config = replace(fitter.config, weight_decay=wd, seed=seed)
                router = fitter.train(data)
                threshold, risk, rates, curve = fitter.choose_threshold(router, data, text)
                best = max(c["flops_reduction"] for c in curve if c["risk"] <= fitter.config.max_risk + 1e-12)
                found.append(best)
                probs = fitter.probabilities(router, data, fitter.heldout)
                saturated.append(float((probs >= 1.0).float().mean()))
            rows.append({"model": str(model), "labels": labels, "loss_slack": slack, "weight_decay": wd, "label_rate": label_rate,
                         "flops_reduction": found, "median": statistics.median(found),
                         "saturated_share": saturated, "collect_s": round(collect_s, 1),
                         "heldout": len(fitter.heldout)})
            print(f"{Path(model).name} {labels} slack {slack} wd {wd:g}: found {[round(x, 3) for x in found]} "
                  f"saturated {[round(x, 3) for x in saturated]}", flush=True)
    return rows


def write(rows: list[dict], n: int) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "router_weight_decay.json").write_text(json.dumps(rows, indent=2))
    lines = ["# Exit-router weight decay: exits the threshold search finds", "",
             f"`benchmarks/router_weight_decay.py`; `bench:train`, n={n} (every 4th held out for the threshold), "
             "held-out risk <= 1%. Expected prefill-FLOPs reduction per seed (median in bold), and the share "
             "of held-out probabilities that read exactly 1.0. Model weights sha256: "
             + ", ".join(f"{Path(m).name} {weights_sha256(m)[:16]}" for m in sorted({r["model"] for r in rows}))
             + ".", "",
             "| model | label rule | weight decay | reduction per seed | median | at 1.0 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        rule = "agreement" if r["labels"] == "agreement" else f"DyVTE, slack {r['loss_slack']:g}"
        lines.append(f"| {Path(r['model']).name} | {rule} | {r['weight_decay']:g} | "
                     f"{' / '.join(f'{x:.1%}' for x in r['flops_reduction'])} | **{r['median']:.1%}** | "
                     f"{max(r['saturated_share']):.1%} |")
    (RESULTS / "router_weight_decay.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=[str(MODEL)])
    parser.add_argument("--n", type=int, default=1280)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    rows = [row for model in args.models for row in sweep(model, args.n, args.seeds)]
    write(rows, args.n)


if __name__ == "__main__":
    main()
