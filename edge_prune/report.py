"""Profiling reports: one self-contained HTML file (plots embedded as PNG), plus JSON and Markdown.

Plots: visual tokens kept per layer, latency by stage (measured vs predicted), accuracy vs FLOPs
(when eval results are given), and memory over time.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PLOT_IDS = ("kept-per-layer", "latency-by-stage", "accuracy-vs-flops", "memory-over-time")


@dataclass
class ReportData:
    title: str
    profile: str
    target: str
    verdict: dict[str, Any]
    kept_per_layer: list[float] = field(default_factory=list)
    num_visual_tokens: int = 0
    measured: dict[str, float] = field(default_factory=dict)  # stage -> median
    measured_spread: dict[str, tuple[float, float]] = field(default_factory=dict)
    predicted: dict[str, float] = field(default_factory=dict)
    memory_breakdown: dict[str, float] = field(default_factory=dict)
    rss_timeline: list[tuple[float, float]] = field(default_factory=list)
    eval_points: list[dict[str, Any]] = field(default_factory=list)  # {name, flops_reduction, accuracy}
    assumptions: list[str] = field(default_factory=list)
    threads: int | None = None  # CPU threads the measurement ran on, as asked for (None: the runtime's default)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(d: ReportData) -> dict[str, str]:
    plots = {}
    if d.kept_per_layer:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.step(range(len(d.kept_per_layer)), d.kept_per_layer, where="post", color="#2a6f97", linewidth=2)
        ax.fill_between(range(len(d.kept_per_layer)), d.kept_per_layer, step="post", alpha=0.2, color="#2a6f97")
        ax.set(xlabel="decoder layer", ylabel="visual tokens after attention", title="Visual tokens kept per layer",
               ylim=(0, max(d.num_visual_tokens, max(d.kept_per_layer)) * 1.05))
        plots["kept-per-layer"] = _png(fig)
    stages = [s for s in ("vision_ms", "prefill_ms", "ttft_ms") if s in d.measured or s in d.predicted]
    if stages:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        x = range(len(stages))
        if d.measured:
            meds = [d.measured.get(s, 0) for s in stages]
            err = [[meds[i] - d.measured_spread.get(s, (meds[i], meds[i]))[0] for i, s in enumerate(stages)],
                   [d.measured_spread.get(s, (meds[i], meds[i]))[1] - meds[i] for i, s in enumerate(stages)]]
            ax.bar([i - 0.2 for i in x], meds, 0.4, yerr=err, label="measured (median, IQR)", color="#2a6f97")
        if d.predicted:
            ax.bar([i + 0.2 for i in x], [d.predicted.get(s, 0) for s in stages], 0.4, label="predicted",
                   color="#f4a261")
        ax.set_xticks(list(x), [s.replace("_ms", "") for s in stages])
        ax.set(ylabel="ms", title="Latency by stage")
        ax.legend()
        plots["latency-by-stage"] = _png(fig)
    if d.eval_points:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for p in d.eval_points:
            ax.scatter(p["flops_reduction"] * 100, p["accuracy"] * 100, s=40)
            ax.annotate(p.get("name", ""), (p["flops_reduction"] * 100, p["accuracy"] * 100), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        ax.set(xlabel="prefill FLOPs reduction (%)", ylabel="accuracy (%)", title="Accuracy vs FLOPs")
        plots["accuracy-vs-flops"] = _png(fig)
    if d.rss_timeline:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot([t for t, _ in d.rss_timeline], [m for _, m in d.rss_timeline], color="#6a4c93")
        ax.set(xlabel="seconds", ylabel="RSS (MB)", title="Memory over time (resident set, whole process)")
        ax.set_ylim(bottom=0)
        plots["memory-over-time"] = _png(fig)
    return plots


def render_html(d: ReportData) -> str:
    plots = _plots(d)
    esc = html.escape
    rows = "".join(
        f"<tr class='{'pass' if c['passed'] else 'fail'}'><td>{esc(c['budget'])}</td><td>{c['direction']} "
        f"{c['limit']:.1f}</td><td>{c['value']:.1f}</td><td>{esc(c['source'])}</td>"
        f"<td>{'pass' if c['passed'] else 'FAIL'}</td></tr>" for c in d.verdict["checks"])
    figures = "".join(
        f"<figure id='{pid}'><img alt='{pid}' src='data:image/png;base64,{plots[pid]}'></figure>"
        for pid in PLOT_IDS if pid in plots)
    memory = "".join(f"<tr><td>{esc(k)}</td><td>{v:.1f} MB</td></tr>" for k, v in d.memory_breakdown.items())
    assumptions = "".join(f"<li>{esc(a)}</li>" for a in d.assumptions)
    status = "all budgets hold" if d.verdict["passed"] else "budget exceeded"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(d.title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.5rem; }} .status {{ font-weight: bold; padding: .3rem .6rem; border-radius: 4px; }}
.ok {{ background: #d8f3dc; }} .bad {{ background: #ffd6d6; }}
table {{ border-collapse: collapse; margin: 1rem 0; }} td, th {{ border: 1px solid #ccc; padding: .3rem .7rem; }}
tr.fail td {{ background: #fff0f0; }} .grid {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }}
figure {{ margin: 0; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>{esc(d.title)}</h1>
<p>target <code>{esc(d.target)}</code> on profile <code>{esc(d.profile)}</code>:
<span class="status {'ok' if d.verdict['passed'] else 'bad'}">{status}</span></p>
{f'<p>{esc(threads_note(d))}</p>' if d.measured else ''}
<table><tr><th>budget</th><th>limit</th><th>value</th><th>source</th><th>result</th></tr>{rows}</table>
<div class="grid">{figures}</div>
<h2>Predicted memory</h2><table>{memory}</table>
<h2>Assumptions</h2><ul>{assumptions}</ul>
</body></html>
"""


def threads_note(d: ReportData) -> str:
    """Which CPU threads the measured figures ran on: a runtime's speed, and which recipe wins, depend on it."""
    if d.threads is None:
        return "Measured with the runtime's default CPU threads."
    return f"Measured on {d.threads} CPU thread{'s' if d.threads != 1 else ''}."


def render_markdown(d: ReportData) -> str:
    lines = [f"# {d.title}", "", f"Target `{d.target}` on profile `{d.profile}`: "
             f"**{'all budgets hold' if d.verdict['passed'] else 'budget exceeded'}**", "",
             "| budget | limit | value | source | result |", "|---|---|---|---|---|"]
    for c in d.verdict["checks"]:
        lines.append(f"| {c['budget']} | {c['direction']} {c['limit']:.1f} | {c['value']:.1f} | {c['source']} | "
                     f"{'pass' if c['passed'] else 'FAIL'} |")
    if d.measured:
        lines += ["", threads_note(d), "", "| stage | measured median | predicted |", "|---|---|---|"]
        for s, v in d.measured.items():
            pred = d.predicted.get(s)
            lines.append(f"| {s} | {v:.1f} | {'' if pred is None else f'{pred:.1f}'} |")
    return "\n".join(lines) + "\n"


def write_report(d: ReportData, html_path: str | Path) -> dict[str, Path]:
    """Write report.html, report.json and report.md side by side, each atomically."""
    html_path = Path(html_path)
    stem = html_path.with_suffix("")
    outputs = {
        "html": (html_path, render_html(d)),
        "json": (stem.with_suffix(".json"), json.dumps(d.__dict__, indent=2, default=str)),
        "md": (stem.with_suffix(".md"), render_markdown(d)),
    }
    for path, text in outputs.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; a report is for people to read
        os.replace(tmp, path)
    return {k: p for k, (p, _) in outputs.items()}
