"""Device profiles: what a device can do (compute, bandwidth, RAM) and the budgets to stay under.

Profiles are TOML files in `profiles/` (shipped with the package as `edge_prune.profiles`) or any
path a user passes. Every field is validated with a message naming the file, the field and the fix.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edge_prune.errors import ProfileError

KINDS = ("cpu", "gpu", "npu")
COMPUTE_DTYPES = ("fp32", "fp16", "int8")
BUDGET_FIELDS = ("ttft_ms", "decode_tok_s", "peak_rss_mb", "artifact_mb")


@dataclass(frozen=True)
class Compute:
    """Peak dense throughput in TFLOP/s (TOPS for int8) and the share of it prefill reaches."""

    fp32: float
    fp16: float
    int8: float
    efficiency: float
    # fixed time each transformer layer costs beyond its FLOPs (kernel launches, framework dispatch,
    # small ops): dominates small models and small token counts; optional in profiles (default 0)
    layer_overhead_ms: float = 0.0

    def achieved_flops(self, dtype: str) -> float:
        """FLOP/s the device sustains in prefill for `dtype` (falls back to fp16, then fp32)."""
        for name in (dtype, "fp16", "fp32"):
            peak = getattr(self, name)
            if peak > 0:
                return peak * 1e12 * self.efficiency
        raise ProfileError("profile has no usable compute figure")


@dataclass(frozen=True)
class Memory:
    bandwidth_gbs: float
    bandwidth_efficiency: float
    ram_mb: float

    @property
    def achieved_bytes_per_s(self) -> float:
        return self.bandwidth_gbs * 1e9 * self.bandwidth_efficiency


@dataclass(frozen=True)
class Budget:
    ttft_ms: float
    decode_tok_s: float
    peak_rss_mb: float
    artifact_mb: float


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: str
    runtime: str
    backend: str
    compute: Compute
    memory: Memory
    budget: Budget
    calibrate: bool = False
    source: str = ""

    def with_budget(self, **overrides: float) -> DeviceProfile:
        """The same device with some budgets replaced (e.g. --ttft-ms on the command line)."""
        values = {f: overrides.get(f) if overrides.get(f) is not None else getattr(self.budget, f)
                  for f in BUDGET_FIELDS}
        _check_budget(values, "command line")
        return DeviceProfile(self.name, self.description, self.kind, self.runtime, self.backend, self.compute,
                             self.memory, Budget(**values), self.calibrate, self.source)


def _builtin_dir():
    return resources.files("edge_prune.profiles")


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str) -> DeviceProfile:
    """A shipped profile by name (see `edge-prune profiles`) or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ProfileError(f"profile file not found: {path}")
        return parse_profile(path.read_text(), str(path))
    candidate = _builtin_dir() / f"{name_or_path}.toml"
    if not candidate.is_file():
        raise ProfileError(f"unknown profile {name_or_path!r}; known profiles: {', '.join(builtin_names())}")
    return parse_profile(candidate.read_text(), f"profiles/{name_or_path}.toml")


def all_profiles() -> list[DeviceProfile]:
    return [load_profile(n) for n in builtin_names()]


def parse_profile(text: str, source: str) -> DeviceProfile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{source}: malformed TOML: {exc}") from exc

    def section(name: str) -> dict[str, Any]:
        value = data.get(name)
        if not isinstance(value, dict):
            raise ProfileError(f"{source}: missing table [{name}]")
        return value

    def number(table: dict[str, Any], key: str, where: str, positive: bool = True, allow_zero: bool = False) -> float:
        if key not in table:
            raise ProfileError(f"{source}: field '{where}.{key}' is missing")
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProfileError(f"{source}: field '{where}.{key}' is {value!r}, expected a number")
        if positive and (value < 0 or (value == 0 and not allow_zero)):
            raise ProfileError(f"{source}: field '{where}.{key}' is {value}, expected a number > 0")
        return float(value)

    for key in ("name", "kind", "runtime", "backend"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ProfileError(f"{source}: field '{key}' is missing or not a string")
    if data["kind"] not in KINDS:
        raise ProfileError(f"{source}: field 'kind' is {data['kind']!r}, expected one of {', '.join(KINDS)}")
    c = section("compute")
    compute = Compute(*(number(c, d, "compute", allow_zero=True) for d in COMPUTE_DTYPES),
                      efficiency=number(c, "efficiency", "compute"),
                      layer_overhead_ms=(number(c, "layer_overhead_ms", "compute", allow_zero=True)
                                         if "layer_overhead_ms" in c else 0.0))
    if max(compute.fp32, compute.fp16, compute.int8) <= 0:
        raise ProfileError(f"{source}: table [compute] needs at least one dtype with a peak > 0")
    if compute.efficiency > 1:
        raise ProfileError(f"{source}: field 'compute.efficiency' is {compute.efficiency}, expected a share in (0, 1]")
    m = section("memory")
    memory = Memory(number(m, "bandwidth_gbs", "memory"), number(m, "bandwidth_efficiency", "memory"),
                    number(m, "ram_mb", "memory"))
    if memory.bandwidth_efficiency > 1:
        raise ProfileError(f"{source}: field 'memory.bandwidth_efficiency' is {memory.bandwidth_efficiency}, "
                           "expected a share in (0, 1]")
    b = section("budget")
    values = {f: (b[f] if f in b else None) for f in BUDGET_FIELDS}
    _check_budget(values, source)
    return DeviceProfile(name=data["name"], description=str(data.get("description", "")), kind=data["kind"],
                         runtime=data["runtime"], backend=data["backend"], compute=compute, memory=memory,
                         budget=Budget(**values), calibrate=bool(data.get("calibrate", False)), source=source)


def _check_budget(values: dict[str, Any], source: str) -> None:
    for key, value in values.items():
        if value is None:
            raise ProfileError(f"{source}: field 'budget.{key}' is missing")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ProfileError(f"{source}: budget '{key}' is {value!r}; budgets must be numbers > 0")
