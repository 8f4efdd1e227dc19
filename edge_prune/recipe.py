"""The recipe contract (`edge-prune-recipe`, version 1): what passes from fitting to the device.

A recipe is plain JSON (no pickle). Learned modules live beside it in safetensors and are
referenced by relative path. See ARCHITECTURE.md for the semantics every component shares.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_prune.errors import RecipeError

RECIPE_FORMAT = "edge-prune-recipe"
RECIPE_VERSION = 1

# Scorers the engine knows. "none" marks a recipe that never drops mid-network.
SCORERS = ("none", "fitprune", "fastv", "random", "pool", "guide")
# "product": cross x self, as FitPrune's reference code scores at inference; "either": the larger of the
# two, each over its mean across the visual tokens present, so a token stays when it stands out in
# either, as FitPrune's own fitting rule keeps it (it drops only the intersection of both low sets).
# `edge-prune fit` writes "either" (benchmark model, FitPrune-60: 86.0% against product's 68.0%, n=700)
FITPRUNE_COMBINES = ("product", "either")
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
class GuideSpec:
    """LVPruning-style guides: one small cross-attention scorer per layer where keep_after drops.

    `file` is a safetensors file relative to the recipe's folder; `layers` are the layers that
    drop tokens (a guide ranks the visual tokens after that layer's attention); `rank` is the
    guides' inner width r, which the cost model needs without loading weights.
    """

    file: str
    layers: list[int]
    rank: int


@dataclass
class ExitSpec:
    """DyVTE-style exit router: after candidate layer l, a request may drop all its visual tokens.

    Exiting after layer l means keep_after[i] = 0 for i >= l for that request: layer l's attention
    (and KV cache) saw the visual tokens, its MLP and every later layer do not. `threshold` is the
    router probability at or above which a request exits (the first candidate layer that passes
    wins); 1.0 means never (see `router_exits`). `exit_rates[j]` is the share of held-out
    calibration requests that exited after `layers[j]`; the rest never exit. The cost model uses it
    for expected (mean) FLOPs.

    `lookahead` (an addition to the v1 contract, default false): at each candidate layer the router
    also reads the answer the exited request would give. The rest of the decoder runs text-only on
    the layer's text states (what an exit runs anyway), and the router gets that answer's top
    probability, top-two margin and entropy (`scoring.lookahead_statistics`). When the request
    exits, that run is the rest of its prefill; when it does not, the cost model counts it as the
    router's work.

    `frozen` (an addition to the v1 contract, default false; CALM's state propagation, not DyVTE's
    removal): an exiting request's visual tokens stop being computed but are not removed. Each one
    keeps the state it had at the exit (after layer l's attention), and every later layer computes
    its key and value from that frozen state, so later tokens still attend to the image. Later
    layers run no query, output projection or MLP for them, and their KV caches hold them.
    """

    router: str
    layers: list[int]
    threshold: float
    rank: int
    exit_rates: list[float] = field(default_factory=list)
    lookahead: bool = False
    frozen: bool = False


# the statistics a lookahead router reads beside DyVTE's two states (ExitSpec.lookahead): the exited
# answer's top probability, top-two margin and normalised entropy (scoring.lookahead_statistics)
LOOKAHEAD_STATISTICS = 3


def router_inputs(hidden_size: int, lookahead: bool) -> int:
    """Width of an exit router's input: DyVTE's two states, plus the lookahead statistics."""
    return 2 * hidden_size + (LOOKAHEAD_STATISTICS if lookahead else 0)


def router_exits(prob, threshold: float):
    """Whether a router probability (float or tensor) passes an exit threshold. A threshold of 1.0 never
    passes: a float32 sigmoid reads exactly 1.0 from logits above ~17, so `prob >= 1.0` would exit the
    most confident requests of a router whose fit found no safe threshold."""
    return (prob >= threshold) & (threshold < 1.0)


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
    guides: GuideSpec | None = None  # used by the guide scorer only
    # fitprune scorer only: how a token's cross and self scores combine (see FITPRUNE_COMBINES)
    fitprune_combine: str = "product"
    # Region-balanced selection (an edge-prune extension): with regions = R > 1 the image's square
    # token grid is cut into R x R regions and a drop keeps the best token of every region in turn
    # (round robin), so each region keeps floor or ceil of count / R^2 and no part of the image
    # empties. Counts per layer are unchanged, so FLOPs are too. 1: one global ranking (FitPrune's).
    regions: int = 1
    # Merge instead of discard (an edge-prune extension, see edge_prune.merging): each dropped visual
    # token joins its most similar kept one, whose state becomes the group's mean and whose key then
    # weighs as much as the group in every later attention. Counts, and so the schedule, are unchanged.
    merge: bool = False
    # Preview (an edge-prune extension, fitprune scorer only): at a drop after layer l, every listed layer
    # l' > l applies its own input norm and query/key projections to the current states and gives the
    # attention the prompt's last token would pay each visual token there; the ranking adds that
    # preview's standardised log to FitPrune's (scoring.with_preview). Later layers read what the
    # dropping layer's attention does not show (position, relation). Empty: FitPrune's score alone.
    preview_layers: list[int] = field(default_factory=list)

    def drop_layers(self) -> list[int]:
        """Layers after whose attention the schedule lowers the visual-token fraction."""
        before = [self.keep_input, *self.keep_after[:-1]]
        return [i for i, (b, a) in enumerate(zip(before, self.keep_after)) if a < b]


@dataclass
class Budget:
    flops_reduction: float | None = None
    accounting: str = "exact"


@dataclass
class Recipe:
    model: ModelSignature
    prune: PruneSpec
    exit: ExitSpec | None = None
    skip_attention: list[int] = field(default_factory=list)
    budget: Budget = field(default_factory=Budget)
    provenance: dict[str, Any] = field(default_factory=dict)
    format: str = RECIPE_FORMAT
    version: int = RECIPE_VERSION
    # Folder that module files (guides, router) are resolved against; set by load() and save().
    # Not part of the JSON: learned files always live beside recipe.json.
    base_dir: Path | None = field(default=None, compare=False, repr=False)

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
        prune_data = data.get("prune")
        guides_data = prune_data.get("guides") if isinstance(prune_data, dict) else None
        if guides_data is not None:
            prune_data = {**prune_data, "guides": None}
        prune = _build(PruneSpec, prune_data, f"{source}: field 'prune'")
        if guides_data is not None:
            prune.guides = _build(GuideSpec, guides_data, f"{source}: field 'prune.guides'")
        exit_data = data.get("exit")
        exit_spec = None if exit_data is None else _build(ExitSpec, exit_data, f"{source}: field 'exit'")
        budget = _build(Budget, data.get("budget") or {}, f"{source}: field 'budget'")
        skip = data.get("skip_attention") or []
        provenance = data.get("provenance") or {}
        if not isinstance(provenance, dict):
            raise RecipeError(f"{source}: field 'provenance' must be an object")
        recipe = cls(
            model=model,
            prune=prune,
            exit=exit_spec,
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
        recipe = cls.from_dict(data, source=str(path))
        recipe.base_dir = path.parent
        recipe.check_files(str(path))
        return recipe

    # ---- output ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "model": asdict(self.model),
            "prune": self._prune_dict(),
            "exit": None if self.exit is None else self._exit_dict(),
            "skip_attention": list(self.skip_attention),
            "budget": asdict(self.budget),
            "provenance": dict(self.provenance),
        }

    def _prune_dict(self) -> dict[str, Any]:
        data = asdict(self.prune)
        if not data["preview_layers"]:  # written only when set, so such recipes read in older edge-prune
            del data["preview_layers"]
        return data

    def _exit_dict(self) -> dict[str, Any]:
        assert self.exit is not None
        data = asdict(self.exit)
        for added in ("lookahead", "frozen"):  # written only when set, so such recipes read in older edge-prune
            if not data[added]:
                del data[added]
        return data

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Validate, then write atomically (temp file + rename) so a crash leaves no half recipe.

        Module files the recipe references are copied beside the new recipe.json when they live
        elsewhere (e.g. a base recipe's guides reused under an exit router), so a recipe folder is
        always self-contained. An unsaved recipe's files are expected beside the target already.
        """
        self.validate("recipe")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for rel in self.module_files():
            src, dst = (self.base_dir or path.parent) / rel, path.parent / rel
            if not src.is_file():
                raise RecipeError(f"recipe references {rel!r}, but {src} does not exist; write the module "
                                  "file before saving the recipe")
            if src.resolve() != dst.resolve():
                _atomic_copy(src, dst)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.to_dict(), fh, indent=2)
                fh.write("\n")
            os.chmod(tmp, 0o644)  # mkstemp makes files private; recipes are shared
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.base_dir = path.parent
        return path

    # ---- module files ---------------------------------------------------------------------
    def module_files(self) -> list[str]:
        """Relative paths of the learned module files this recipe references."""
        out = []
        if self.prune.guides is not None:
            out.append(self.prune.guides.file)
        if self.exit is not None:
            out.append(self.exit.router)
        return out

    def copy_module_files(self, folder: str | os.PathLike[str]) -> None:
        """Copy this recipe's module files into `folder` (for a recipe built on top of this one)."""
        for rel in self.module_files():
            src, dst = self.resolve(rel), Path(folder) / rel
            if src.resolve() != dst.resolve():
                _atomic_copy(src, dst)

    def resolve(self, relative: str) -> Path:
        """A module file's path: relative to the recipe's folder (the working directory if unsaved)."""
        return (self.base_dir or Path(".")) / relative

    def check_files(self, source: str = "recipe") -> None:
        """Raise if a referenced module file is missing."""
        for field_name, rel in (("prune.guides.file", self.prune.guides.file if self.prune.guides else None),
                                ("exit.router", self.exit.router if self.exit else None)):
            if rel is not None and not self.resolve(rel).is_file():
                raise RecipeError(
                    f"{source}: field '{field_name}' names {rel!r}, but {self.resolve(rel)} does not exist; "
                    "learned module files must sit beside recipe.json (copy the whole recipe folder)"
                )

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
        if p.fitprune_combine not in FITPRUNE_COMBINES:
            raise RecipeError(
                f"{source}: field 'prune.fitprune_combine' is {p.fitprune_combine!r}, expected one of "
                f"{', '.join(FITPRUNE_COMBINES)}"
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
        self._validate_regions(source)
        if not isinstance(p.merge, bool):
            raise RecipeError(f"{source}: field 'prune.merge' is {p.merge!r}, expected true or false")
        if p.merge:
            self._check_ranking_scorer("prune.merge", "true", source)
        self._validate_preview(source)
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
        self._validate_guides(source)
        if self.exit is not None:
            self._validate_exit(source)
        if self.budget.accounting not in ACCOUNTINGS:
            raise RecipeError(
                f"{source}: field 'budget.accounting' is {self.budget.accounting!r}, expected one "
                f"of {', '.join(ACCOUNTINGS)}"
            )
        fr = self.budget.flops_reduction
        if fr is not None and not (isinstance(fr, (int, float)) and 0.0 <= fr < 1.0):
            raise RecipeError(f"{source}: field 'budget.flops_reduction' is {fr!r}, expected a number in [0, 1)")

    def _validate_regions(self, source: str) -> None:
        regions = self.prune.regions
        if not isinstance(regions, int) or isinstance(regions, bool) or regions < 1:
            raise RecipeError(f"{source}: field 'prune.regions' is {regions!r}, expected a positive integer "
                              "(1 ranks the whole image at once)")
        if regions == 1:
            return
        if self.model.architecture != "LlavaForConditionalGeneration":
            raise RecipeError(
                f"{source}: field 'prune.regions' is {regions}, but {self.model.architecture} lays an image out in "
                "tiles of varying count, not one fixed token grid; use regions 1"
            )
        side = math.isqrt(self.model.num_visual_tokens)
        if side * side != self.model.num_visual_tokens:
            raise RecipeError(
                f"{source}: field 'prune.regions' is {regions}, but the model's {self.model.num_visual_tokens} "
                "visual tokens are not a square grid; use regions 1"
            )
        if regions > side:
            raise RecipeError(f"{source}: field 'prune.regions' is {regions}, more than the token grid's side "
                              f"({side}); expected 1..{side}")
        self._check_ranking_scorer("prune.regions", regions, source)

    def _validate_preview(self, source: str) -> None:
        layers, last = self.prune.preview_layers, self.model.num_layers - 1
        if not isinstance(layers, list) or any(not isinstance(x, int) or isinstance(x, bool) for x in layers):
            raise RecipeError(f"{source}: field 'prune.preview_layers' is {layers!r}, expected a list of layer indices")
        if not layers:
            return
        if self.prune.scorer != "fitprune":
            raise RecipeError(f"{source}: field 'prune.preview_layers' is {layers}, but only the 'fitprune' scorer "
                              f"uses a preview (scorer is {self.prune.scorer!r}); remove the field")
        if layers != sorted(set(layers)) or not all(1 <= x <= last for x in layers):
            raise RecipeError(f"{source}: field 'prune.preview_layers' is {layers}, expected increasing layer "
                              f"indices in [1, {last}] (a preview looks at layers after a drop)")
        skipped = sorted(set(layers) & set(self.skip_attention))
        if skipped:
            raise RecipeError(f"{source}: field 'prune.preview_layers' names layer(s) {skipped}, whose attention "
                              "the recipe skips ('skip_attention'); a preview of them shows nothing the model reads")

    def _check_ranking_scorer(self, field_name: str, value: Any, source: str) -> None:
        """regions and merge shape drops inside the decoder, which only a ranking scorer makes."""
        if self.prune.scorer in ("none", "pool"):
            raise RecipeError(f"{source}: field '{field_name}' is {value}, but scorer {self.prune.scorer!r} does not "
                              "rank tokens inside the decoder; it applies to fitprune, fastv, random and guide")

    def _validate_guides(self, source: str) -> None:
        p, g = self.prune, self.prune.guides
        if p.scorer == "guide" and g is None:
            raise RecipeError(f"{source}: field 'prune.scorer' is 'guide' but 'prune.guides' is null; "
                              "fit guides with `edge-prune fit --method lvpruning`")
        if g is None:
            return
        if p.scorer != "guide":
            raise RecipeError(f"{source}: field 'prune.guides' is set but 'prune.scorer' is {p.scorer!r}; "
                              "set the scorer to 'guide' or drop the guides")
        _check_file_name(g.file, f"{source}: field 'prune.guides.file'")
        _check_positive_int(g.rank, f"{source}: field 'prune.guides.rank'")
        _check_layers(g.layers, self.model.num_layers, f"{source}: field 'prune.guides.layers'")
        drops = p.drop_layers()
        missing = [i for i in drops if i not in g.layers]
        if missing:
            raise RecipeError(f"{source}: keep_after drops tokens at layers {missing} but 'prune.guides.layers' "
                              f"is {g.layers}; every layer that drops needs a guide")

    def _validate_exit(self, source: str) -> None:
        e, where = self.exit, f"{source}: field 'exit"
        assert e is not None
        _check_file_name(e.router, f"{where}.router'")
        _check_positive_int(e.rank, f"{where}.rank'")
        _check_layers(e.layers, self.model.num_layers, f"{where}.layers'")
        if not e.layers:
            raise RecipeError(f"{where}.layers' is empty; list the candidate exit layers")
        for name in ("lookahead", "frozen"):
            if not isinstance(getattr(e, name), bool):
                raise RecipeError(f"{where}.{name}' is {getattr(e, name)!r}, expected true or false")
        t = e.threshold
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0.0 <= t <= 1.0:
            raise RecipeError(f"{where}.threshold' is {t!r}, expected a probability in [0, 1]")
        rates = e.exit_rates
        if rates:
            if len(rates) != len(e.layers):
                raise RecipeError(f"{where}.exit_rates' has {len(rates)} entries, expected one per candidate "
                                  f"layer ({len(e.layers)})")
            if any(not isinstance(r, (int, float)) or isinstance(r, bool) or r < 0 for r in rates) or (
                    sum(rates) > 1.0 + 1e-6):
                raise RecipeError(f"{where}.exit_rates' is {rates}, expected non-negative shares summing to at most 1")

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
        ) and self.exit is None


def keep_count(fraction: float, n_visual: int) -> int:
    """ARCHITECTURE.md: counts are round(fraction * n_visual) per image."""
    return int(round(fraction * n_visual))


def _check_layers(layers: Any, num_layers: int, where: str) -> None:
    if not isinstance(layers, list) or any(not isinstance(x, int) or isinstance(x, bool) for x in layers):
        raise RecipeError(f"{where} is {layers!r}, expected a list of layer indices")
    if any(not 0 <= x < num_layers for x in layers):
        raise RecipeError(f"{where} is {layers}, expected layer indices in [0, {num_layers - 1}]")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise RecipeError(f"{where} is {layers}, expected strictly increasing layer indices")


def _check_positive_int(value: Any, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise RecipeError(f"{where} is {value!r}, expected a positive integer")


def _check_file_name(name: Any, where: str) -> None:
    """Module files are plain names or sub-paths beside recipe.json, never absolute or above it."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise RecipeError(f"{where} is {name!r}, expected a file path relative to the recipe's folder")


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
