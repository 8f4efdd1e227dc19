"""Measure a model or artifact on this machine and check it against a device profile's budgets.

Measurement: warm-up runs, then repeated single requests; medians and spread of vision, prefill,
TTFT and decode speed; peak RSS sampled by a side thread (psutil); artifact size on disk.
Verdict: each budget against the measured value (or the predicted one when nothing runs here).
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
from tqdm import tqdm

from edge_prune.devices import DeviceProfile

MB = 1024 * 1024
STAGES = ("vision_ms", "prefill_ms", "ttft_ms", "decode_tok_s")


class RssSampler:
    """Samples this process's resident memory every `interval` seconds in a daemon thread."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._proc = psutil.Process()
        self._start = 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self._start, self._proc.memory_info().rss / MB))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter() - self._start, self._proc.memory_info().rss / MB))

    @property
    def peak_mb(self) -> float:
        return max(mb for _, mb in self.samples) if self.samples else 0.0


@dataclass
class StageStats:
    median: float
    q1: float
    q3: float
    values: list[float]


@dataclass
class Measurement:
    runs: int
    stages: dict[str, StageStats]
    peak_rss_mb: float
    rss_timeline: list[tuple[float, float]]
    artifact_mb: float
    kept_per_layer: list[int]
    exit_layer: int | None = None

    def median(self, stage: str) -> float:
        return self.stages[stage].median

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(generate: Callable[[], Any], runs: int = 10, warmup: int = 2, artifact_mb: float = 0.0,
            progress: bool = True) -> Measurement:
    """Time `generate()` (one request returning an object with .timings and .kept) `runs` times."""
    if runs < 1:
        raise ValueError(f"--runs is {runs}; expected at least 1")
    for _ in range(warmup):
        generate()
    values: dict[str, list[float]] = {s: [] for s in STAGES}
    last = None
    with RssSampler() as rss:
        for _ in tqdm(range(runs), desc="profile: runs", disable=not progress, unit="run"):
            last = generate()
            for s in STAGES:
                values[s].append(float(getattr(last.timings, s)))
    stages = {}
    for s, vals in values.items():
        q = statistics.quantiles(vals, n=4) if len(vals) > 1 else [vals[0]] * 3
        stages[s] = StageStats(statistics.median(vals), q[0], q[2], vals)
    kept = last.kept[0] if isinstance(last.kept, list) else last.kept
    return Measurement(runs=runs, stages=stages, peak_rss_mb=rss.peak_mb, rss_timeline=rss.samples,
                       artifact_mb=artifact_mb, kept_per_layer=list(getattr(kept, "per_layer", [])),
                       exit_layer=getattr(kept, "exit_layer", None))


def directory_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / MB


@dataclass
class BudgetCheck:
    budget: str
    limit: float
    value: float
    source: str  # "measured" or "predicted"
    passed: bool
    direction: str  # "<=" or ">="


@dataclass
class Verdict:
    profile: str
    checks: list[BudgetCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def table(self) -> str:
        lines = [f"budgets of {self.profile}:",
                 f"  {'budget':<14} {'limit':>10} {'value':>12} {'source':>10}  result"]
        for c in self.checks:
            lines.append(f"  {c.budget:<14} {c.direction}{c.limit:>9.1f} {c.value:>12.1f} {c.source:>10}  "
                         f"{'pass' if c.passed else 'FAIL'}")
        lines.append(f"  => {'all budgets hold' if self.passed else 'budget exceeded'}")
        return "\n".join(lines)


def check_budgets(profile: DeviceProfile, values: dict[str, tuple[float, str]]) -> Verdict:
    """values: budget name -> (value, 'measured' | 'predicted'). Latency/memory must stay under,
    decode speed over, the profile's budget."""
    verdict = Verdict(profile.name)
    for name, (value, source) in values.items():
        limit = getattr(profile.budget, name)
        higher_is_better = name == "decode_tok_s"
        ok = value >= limit if higher_is_better else value <= limit
        verdict.checks.append(BudgetCheck(name, limit, value, source, ok, ">=" if higher_is_better else "<="))
    return verdict
