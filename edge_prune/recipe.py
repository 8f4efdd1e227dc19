"""The recipe contract (`edge-prune-recipe`, version 1): what passes from fitting to the device.

A recipe is plain JSON (no pickle). Learned modules live beside it in safetensors and are
referenced by relative path. See ARCHITECTURE.md for the semantics every component shares.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_prune.errors import RecipeError

RECIPE_FORMAT = "edge-prune-recipe"
RECIPE_VERSION = 1

# Scorers the engine knows. "none" marks a recipe that never drops mid-network.
SCORERS = ("none", "fitprune", "fastv", "random", "pool")
ACCOUNTINGS = ("exact", "fastv", "fitprune")


@dataclass(frozen=True)
class ModelSignature:
    """The shape facts a recipe was fitted for; a recipe only applies to a model that matches."""

    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_visual_tokens: int

    def mismatches(self, other: ModelSignature) -> list[str]:
        """Names of fields that differ, with both values, for error messages."""
        out = []
        for name, mine in asdict(self).items():
            theirs = getattr(other, name)
            if mine != theirs:
                out.append(f"{name}: recipe has {mine!r}, model has {theirs!r}")
        return out


@dataclass
class PruneSpec:
    """Which scorer ranks visual tokens and how many survive each layer.

    keep_after[i] is the fraction of the image's visual tokens still present after the
    attention of decoder layer i (FitPrune's semantics). keep_input (an edge-prune
    extension, default 1.0) reduces the visual tokens before the first decoder layer, as
    spatial pooling does and as llama.cpp can; input-reduced tokens get consecutive
    positions because they no longer map one-to-one onto image patches.
    """

    scorer: str = "none"
    keep_after: list[float] = field(default_factory=list)
    keep_input: float = 1.0
    seed: int = 0  # used by the random scorer only


@dataclass
class Budget:
    flops_reduction: float | None = None
    accounting: str = "exact"


@dataclass
class Recipe:
    model: ModelSignature
    prune: PruneSpec
    exit: dict[str, Any] | None = None
    skip_attention: list[int] = field(default_factory=list)
    budget: Budget = field(default_factory=Budget)
    provenance: dict[str, Any] = field(default_factory=dict)
    format: str = RECIPE_FORMAT
    version: int = RECIPE_VERSION

    # ---- construction -------------------------------------------------------------
    @classmethod
    def identity(cls, model: ModelSignature, **provenance: Any) -> Recipe:
        """A recipe that keeps every token: running it equals running the model."""
        return cls(
            model=model,
            prune=PruneSpec(scorer="none", keep_after=[1.0] * model.num_layers),
            provenance={"method": "identity", **provenance},
        )

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: expected a JSON object, found {type(data).__name__}")
        fmt = data.get("format")
        if fmt != RECIPE_FORMAT:
            raise RecipeError(f"{source}: field 'format' is {fmt!r}, expected {RECIPE_FORMAT!r}")
        version = data.get("version")
        if version != RECIPE_VERSION:
            raise RecipeError(
                f"{source}: field 'version' is {version!r}, this edge-prune reads version "
                f"{RECIPE_VERSION}; re-fit the recipe or upgrade edge-prune"
            )
        model = _build(ModelSignature, data.get("model"), f"{source}: field 'model'")
        prune = _build(PruneSpec, data.get("prune"), f"{source}: field 'prune'")
        budget = _build(Budget, data.get("budget") or {}, f"{source}: field 'budget'")
        skip = data.get("skip_attention") or []
        provenance = data.get("provenance") or {}
        if not isinstance(provenance, dict):
            raise RecipeError(f"{source}: field 'provenance' must be an object")
        recipe = cls(
            model=model,
            prune=prune,
            exit=data.get("exit"),
            skip_attention=list(skip),
            budget=budget,
            provenance=provenance,
        )
        recipe.validate(source)
        return recipe

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RecipeError(
                f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
            ) from exc
        return cls.from_dict(data, source=str(path))

    # ---- output ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "model": asdict(self.model),
            "prune": asdict(self.prune),
            "exit": self.exit,
            "skip_attention": list(self.skip_attention),
            "budget": asdict(self.budget),
            "provenance": dict(self.provenance),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Validate, then write atomically (temp file + rename) so a crash leaves no half recipe."""
        self.validate("recipe")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.to_dict(), fh, indent=2)
                fh.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    # ---- checks ---------------------------------------------------------------------
    def validate(self, source: str = "recipe") -> None:
        """Check internal consistency; raises RecipeError naming the field and what was expected."""
        m = self.model
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "num_visual_tokens"):
            value = getattr(m, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise RecipeError(f"{source}: field 'model.{name}' is {value!r}, expected a positive integer")
        p = self.prune
        if p.scorer not in SCORERS:
            raise RecipeError(
                f"{source}: field 'prune.scorer' is {p.scorer!r}, expected one of {', '.join(SCORERS)}"
            )
        if not isinstance(p.keep_after, list) or len(p.keep_after) != m.num_layers:
            got = len(p.keep_after) if isinstance(p.keep_after, list) else type(p.keep_after).__name__
            raise RecipeError(
                f"{source}: field 'prune.keep_after' has {got} entries, expected one per decoder "
                f"layer ({m.num_layers})"
            )
        fractions = [p.keep_input, *p.keep_after]
        for i, value in enumerate(fractions):
            where = "prune.keep_input" if i == 0 else f"prune.keep_after[{i - 1}]"
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise RecipeError(f"{source}: field '{where}' is {value!r}, expected a number in [0, 1]")
            if not 0.0 <= value <= 1.0:
                raise RecipeError(f"{source}: field '{where}' is {value}, expected a fraction in [0, 1]")
            if i > 0 and value > fractions[i - 1] + 1e-9:
                raise RecipeError(
                    f"{source}: field '{where}' is {value}, larger than the layer before "
                    f"({fractions[i - 1]}); keep fractions must not increase"
                )
        drops_mid_network = any(k < p.keep_input for k in p.keep_after)
        if drops_mid_network and p.scorer in ("none", "pool"):
            raise RecipeError(
                f"{source}: field 'prune.scorer' is {p.scorer!r} but keep_after drops tokens inside "
                "the decoder; choose a scorer that ranks tokens (fitprune, fastv, random)"
            )
        if p.keep_input < 1.0 and p.scorer != "pool":
            raise RecipeError(
                f"{source}: field 'prune.keep_input' is {p.keep_input} but only the 'pool' scorer "
                "reduces tokens before the decoder"
            )
        for layer in self.skip_attention:
            if not isinstance(layer, int) or not 0 <= layer < m.num_layers:
                raise RecipeError(
                    f"{source}: field 'skip_attention' holds {layer!r}, expected layer indices in "
                    f"[0, {m.num_layers - 1}]"
                )
        if self.exit is not None:
            raise RecipeError(
                f"{source}: field 'exit' is set, but this edge-prune version has no exit-router "
                "support; set it to null or upgrade edge-prune"
            )
        if self.budget.accounting not in ACCOUNTINGS:
            raise RecipeError(
                f"{source}: field 'budget.accounting' is {self.budget.accounting!r}, expected one "
                f"of {', '.join(ACCOUNTINGS)}"
            )
        fr = self.budget.flops_reduction
        if fr is not None and not (isinstance(fr, (int, float)) and 0.0 <= fr < 1.0):
            raise RecipeError(f"{source}: field 'budget.flops_reduction' is {fr!r}, expected a number in [0, 1)")

    def check_model(self, model: ModelSignature, source: str = "recipe") -> None:
        """Raise if this recipe was fitted for a different model."""
        problems = self.model.mismatches(model)
        if problems:
            raise RecipeError(
                f"{source} was fitted for another model ({'; '.join(problems)}); "
                "fit a recipe for this checkpoint with `edge-prune fit`"
            )

    # ---- derived --------------------------------------------------------------------
    def input_count(self, n_visual: int) -> int:
        """Visual tokens entering the first decoder layer for an image with n_visual tokens."""
        return keep_count(self.prune.keep_input, n_visual)

    def keep_counts(self, n_visual: int) -> list[int]:
        """Visual tokens present after each layer's attention, for an image with n_visual tokens."""
        counts = []
        current = self.input_count(n_visual)
        for frac in self.prune.keep_after:
            current = min(current, keep_count(frac, n_visual))
            counts.append(current)
        return counts

    @property
    def is_identity(self) -> bool:
        return self.prune.keep_input >= 1.0 and all(k >= 1.0 for k in self.prune.keep_after) and not (
            self.skip_attention
        )


def keep_count(fraction: float, n_visual: int) -> int:
    """ARCHITECTURE.md: counts are round(fraction * n_visual) per image."""
    return int(round(fraction * n_visual))


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a JSON object, found {type(data).__name__}")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"{where} has unknown keys {unknown}; expected keys from {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as exc:
        missing = sorted(
            name for name, f in cls.__dataclass_fields__.items()
            if name not in data and f.default is f.default_factory  # type: ignore[misc]
        )
        raise RecipeError(f"{where} is missing keys {missing}") from exc
