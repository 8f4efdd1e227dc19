"""`edge-prune profile`: measure (or predict) a target against a device profile and write the report.

A target is an artifact directory (manifest.json: run with its on-device runtime), a checkpoint
directory (run with the eager engine, optionally under --recipe), or a config.json alone
(predicted only, e.g. a 7B config on a phone profile).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_prune.devices import DeviceProfile, load_profile
from edge_prune.errors import ArtifactError, InputError, ProfileError
from edge_prune.models.shapes import ModelShape, load_shape
from edge_prune.predict import Prediction, calibrate_host, predict
from edge_prune.profile import Measurement, Verdict, check_budgets, directory_mb, measure
from edge_prune.recipe import Recipe
from edge_prune.report import ReportData, write_report

DEFAULT_PROMPT = "What colour is the circle?"
PROFILE_NEW_TOKENS = 16  # decode steps per measured request


@dataclass
class ProfileResult:
    profile: DeviceProfile
    target: str
    prediction: Prediction | None
    measurement: Measurement | None
    verdict: Verdict
    outputs: dict[str, Path] = field(default_factory=dict)
    threads: int | None = None  # as asked for; None: the runtime's default

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile.name, "target": self.target,
            "prediction": self.prediction.to_dict() if self.prediction else None,
            "measurement": {k: v for k, v in self.measurement.to_dict().items() if k != "rss_timeline"}
            if self.measurement else None,
            "verdict": {"passed": self.verdict.passed, "checks": [c.__dict__ for c in self.verdict.checks]},
            "outputs": {k: str(v) for k, v in self.outputs.items()},
            "threads": self.threads,
        }


def _demo_request(image: str | None, prompt: str | None):
    """The request to time: the user's, or a benchmark test scene with its question."""
    if image is not None:
        return image, prompt or DEFAULT_PROMPT
    from edge_prune.bench.generator import make_item

    item = make_item("test", 0)
    return item.image, prompt or item.question


def run_profile(target: str | None, profile_name: str, recipe_path: str | None = None, config: str | None = None,
                runs: int = 10, warmup: int = 2, quant: str | None = None, text_tokens: int | None = None,
                report: str | None = None, eval_results: list[str] | None = None, image: str | None = None,
                prompt: str | None = None, budgets: dict[str, float] | None = None,
                progress: bool = True, threads: int | None = None) -> ProfileResult:
    """`threads`: CPU threads for the runtime or the eager engine (None: the runtime's default)."""
    profile = load_profile(profile_name)
    if budgets:
        profile = profile.with_budget(**budgets)
    if runs < 1:
        raise InputError(f"--runs is {runs}; expected at least 1")
    if threads is not None:
        from edge_prune.runtimes import check_threads

        check_threads(threads)
    recipe = Recipe.load(recipe_path) if recipe_path else None
    shape: ModelShape | None = None
    measurement: Measurement | None = None
    engine = None  # the eager engine, when the target is a checkpoint
    artifact_mb = 0.0
    if target is None and config is None:
        raise InputError("give an artifact or checkpoint directory to measure, or --config CONFIG to predict only")
    if target is not None:
        path = Path(target)
        if not path.is_dir():
            raise ArtifactError(f"target not found: {path}; pass an artifact directory (from `edge-prune convert`) "
                                "or a checkpoint directory")
        artifact_mb = directory_mb(path)
        img, text = _demo_request(image, prompt)
        if (path / "manifest.json").is_file():
            from edge_prune.runtimes import load, read_manifest

            session = load(path, threads=threads)
            quant = quant or read_manifest(path, verify=False).quant
            if recipe is None and (path / "recipe.json").is_file():
                recipe = Recipe.load(path / "recipe.json")
            if (path / "config.json").is_file():
                shape = load_shape(path / "config.json")
            # an ExecuTorch artifact's KV cache has room for a fixed number of new tokens
            new_tokens = min(PROFILE_NEW_TOKENS, getattr(getattr(session, "spec", None), "max_new_tokens", PROFILE_NEW_TOKENS))
            generate = lambda: session.generate(img, text, max_new_tokens=new_tokens)  # noqa: E731
        elif (path / "config.json").is_file():
            import torch

            from edge_prune.engine import PrunedEngine

            if threads is not None:
                torch.set_num_threads(threads)
            engine = PrunedEngine.load(path, recipe=recipe)
            shape = engine.adapter.shape
            quant = quant or "fp32"
            generate = lambda: engine.generate(text, img, max_new_tokens=PROFILE_NEW_TOKENS)  # noqa: E731
        else:
            raise ArtifactError(f"{path} has neither manifest.json (an artifact) nor config.json (a checkpoint); "
                                "create an artifact with `edge-prune convert`")
        measurement = measure(generate, runs=runs, warmup=warmup, artifact_mb=artifact_mb, progress=progress)
        if text_tokens is None:
            text_tokens = 20
    if config is not None:
        shape = load_shape(config)
    quant = quant or "fp16"
    text_tokens = 64 if text_tokens is None else text_tokens
    prediction = None
    if shape is not None:
        if recipe is not None:
            recipe.check_model(shape.signature())
        if profile.calibrate:
            # a checkpoint runs in the eager engine, so the probe times the engine's own prefill; an
            # artifact's runtime is another program, so its profile keeps the bare-layer probe
            prefill = engine.text_prefill if engine is not None else None
            profile = calibrate_host(profile, shape, text_tokens, prefill=prefill)
        prediction = predict(shape, recipe, profile, quant=quant, text_tokens=text_tokens)
    values: dict[str, tuple[float, str]] = {}
    if measurement is not None:
        values = {"ttft_ms": (measurement.median("ttft_ms"), "measured"),
                  "decode_tok_s": (measurement.median("decode_tok_s"), "measured"),
                  "peak_rss_mb": (measurement.peak_rss_mb, "measured"),
                  "artifact_mb": (artifact_mb, "measured")}
    elif prediction is not None:
        values = {"ttft_ms": (prediction.ttft_ms, "predicted"),
                  "decode_tok_s": (prediction.decode_tok_s, "predicted"),
                  "peak_rss_mb": (prediction.memory_mb["total"], "predicted"),
                  "artifact_mb": (prediction.artifact_mb, "predicted")}
    verdict = check_budgets(profile, values)
    result = ProfileResult(profile, target or str(config), prediction, measurement, verdict, threads=threads)
    if report:
        result.outputs = write_report(_report_data(result, shape, recipe, eval_results), report)
    return result


def _report_data(r: ProfileResult, shape: ModelShape | None, recipe: Recipe | None,
                 eval_results: list[str] | None) -> ReportData:
    n_visual = shape.num_visual_tokens if shape else 0
    kept = list(r.measurement.kept_per_layer) if r.measurement and r.measurement.kept_per_layer else []
    if not kept and shape is not None:
        kept = (recipe.keep_counts(n_visual) if recipe else [n_visual] * shape.num_layers)
    points = []
    for path in eval_results or []:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"--eval {path}: not a readable JSON file from `edge-prune eval --json` ({exc})") from exc
        for row in data if isinstance(data, list) else [data]:
            if not {"accuracy", "flops_reduction"} <= set(row):
                raise InputError(f"--eval {path}: rows need 'accuracy' and 'flops_reduction' (from `edge-prune eval --json`)")
            points.append({"name": row.get("name") or Path(str(row.get("recipe") or "unpruned")).stem,
                           "accuracy": row["accuracy"], "flops_reduction": row["flops_reduction"]})
    m, p = r.measurement, r.prediction
    return ReportData(
        title=f"edge-prune profile: {Path(r.target).name} on {r.profile.name}",
        profile=f"{r.profile.name} ({r.profile.description})", target=r.target,
        verdict={"passed": r.verdict.passed, "checks": [c.__dict__ for c in r.verdict.checks]},
        kept_per_layer=kept, num_visual_tokens=n_visual,
        measured={s: m.median(s) for s in ("vision_ms", "prefill_ms", "ttft_ms")} if m else {},
        measured_spread={s: (m.stages[s].q1, m.stages[s].q3) for s in ("vision_ms", "prefill_ms", "ttft_ms")} if m else {},
        predicted={"vision_ms": p.vision_ms, "prefill_ms": p.prefill_ms, "ttft_ms": p.ttft_ms} if p else {},
        memory_breakdown=p.memory_mb if p else {},
        rss_timeline=m.rss_timeline if m else [],
        eval_points=points,
        assumptions=p.assumptions if p else [],
        threads=r.threads,
    )


def format_result(r: ProfileResult) -> str:
    lines = []
    if r.measurement:
        m = r.measurement
        lines.append(f"measured over {m.runs} runs (median [IQR]):")
        for s in ("vision_ms", "prefill_ms", "ttft_ms", "decode_tok_s"):
            st = m.stages[s]
            pred = getattr(r.prediction, s, None) if r.prediction else None
            lines.append(f"  {s:<13} {st.median:9.1f} [{st.q1:.1f}-{st.q3:.1f}]"
                         + (f"   predicted {pred:9.1f}" if pred is not None else ""))
        lines.append(f"  peak RSS {m.peak_rss_mb:.0f} MB, artifact {m.artifact_mb:.1f} MB")
    if r.prediction:
        p = r.prediction
        if not r.measurement:
            lines.append(f"predicted on {r.profile.name}: vision {p.vision_ms:.1f} ms, prefill {p.prefill_ms:.1f} ms, "
                         f"TTFT {p.ttft_ms:.1f} ms, decode {p.decode_tok_s:.1f} tok/s")
        mem = p.memory_mb
        lines.append("predicted memory: " + ", ".join(f"{k} {v:.0f} MB" for k, v in mem.items()))
        lines.append("assumptions:")
        lines += [f"  - {a}" for a in p.assumptions]
    lines.append(r.verdict.table())
    for kind, path in r.outputs.items():
        lines.append(f"wrote {kind}: {path}")
    return "\n".join(lines)


__all__ = ["run_profile", "format_result", "ProfileResult", "ProfileError"]
