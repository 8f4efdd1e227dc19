"""The eval harness: accuracy per question family, predicted FLOPs and measured prefill time of a recipe.

Every quality claim in edge-prune comes from here, on the synthetic benchmark's test split.
Answers are greedy and one word; an answer counts when its first word equals the truth.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from edge_prune.bench.generator import FAMILIES, SPLITS, iter_items
from edge_prune.bench.tokenizer import prompt as chat_prompt
from edge_prune.cost import estimate
from edge_prune.engine import GenerationResult, PrunedEngine
from edge_prune.errors import InputError
from edge_prune.recipe import Recipe

ABLATIONS = ("mean",)


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 over a model directory's safetensors files: which weights a stored result was measured on
    (benchmark scripts that resume from saved state start over when it changes)."""
    digest = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(f.read_bytes())
    return digest.hexdigest()


def stored_results(path: str | Path, model_dir: str | Path) -> tuple[dict[str, Any], bool]:
    """A benchmark script's saved state at `path` if it was measured on `model_dir`'s weights, else a
    fresh one; the flag says a saved state was set aside (its rows and fits describe other weights)."""
    path = Path(path)
    saved = json.loads(path.read_text()) if path.is_file() else {}
    weights = weights_sha256(model_dir)
    if saved.get("model_sha256") == weights:
        return saved, False
    return {"model_sha256": weights}, bool(saved)


@dataclass
class EvalResult:
    accuracy: float
    per_family: dict[str, float]
    n: int
    split: str
    flops_reduction: float
    baseline_flops: int
    pruned_flops: int
    prefill_ms: float  # median decoder prefill of single requests
    ttft_ms: float  # median time to first token of single requests
    kept_per_layer: list[float]  # mean visual tokens present after each layer
    text_tokens: float  # mean prompt text tokens (used for the FLOPs figures)
    recipe: str | None = None
    ablate_visual: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    # Exit routers: requests per exit layer ("none" = no exit), overall and per family. With exits the
    # FLOPs figures are per-request means over this measured distribution (cost.estimate(exits=...)).
    exit_layers: dict[str, int] = field(default_factory=dict)
    exit_layers_per_family: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_request(split: str, n: int, families: Sequence[str] | None) -> None:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if n <= 0:
        raise InputError(f"--n is {n}; expected a positive number of items")
    for fam in families or ():
        if fam not in FAMILIES:
            raise InputError(f"unknown family {fam!r}; expected one of {', '.join(FAMILIES)}")


def is_correct(answer_text: str, truth: str) -> bool:
    """The harness's rule: an answer counts when its first word equals the truth."""
    words = answer_text.strip().split()
    return bool(words) and words[0] == truth


def answer(engine: PrunedEngine, items: Sequence[Any]) -> GenerationResult:
    """Greedy answers to a batch of benchmark items, as the harness asks them."""
    return engine.generate([chat_prompt(it.question) for it in items], [it.image for it in items], max_new_tokens=4)


def _mean_visual_hook(features: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Replace each image's visual tokens by their mean: removes the image's content, keeps its scale."""
    parts = torch.split(features, counts)
    return torch.cat([p.mean(0, keepdim=True).expand_as(p) for p in parts])


@torch.no_grad()
def evaluate(
    model_dir: str | Path,
    recipe: Recipe | str | Path | None = None,
    split: str = "test",
    n: int = 2000,
    families: Sequence[str] | None = None,
    batch_size: int = 16,
    timing_items: int = 12,
    ablate_visual: str | None = None,
    progress: bool = True,
    engine: PrunedEngine | None = None,
) -> EvalResult:
    check_request(split, n, families)
    if ablate_visual is not None and ablate_visual not in ABLATIONS:
        raise InputError(f"unknown ablation {ablate_visual!r}; expected one of {', '.join(ABLATIONS)}")
    recipe_path = str(recipe) if isinstance(recipe, (str, Path)) else None
    if engine is None:
        engine = PrunedEngine.load(model_dir, recipe=recipe)
    elif recipe is not None:
        engine = PrunedEngine(engine.adapter, recipe if isinstance(recipe, Recipe) else Recipe.load(recipe))
    if ablate_visual == "mean":
        engine.feature_hook = _mean_visual_hook
    items = list(iter_items(split, n, families))
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    kept_sum: list[float] | None = None
    text_tokens: list[int] = []
    exits: dict[str, int] = {}
    exits_family: dict[str, dict[str, int]] = {}
    bar = tqdm(total=len(items), desc=f"eval {split}", disable=not progress, unit="item")
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        out = answer(engine, chunk)
        for it, text, kept, ids in zip(chunk, out.texts, out.kept, out.prompt_lengths):
            total[it.family] = total.get(it.family, 0) + 1
            correct[it.family] = correct.get(it.family, 0) + int(is_correct(text, it.answer))
            kept_sum = [a + b for a, b in zip(kept_sum, kept.per_layer)] if kept_sum else list(kept.per_layer)
            text_tokens.append(ids - kept.visual_tokens)
            where = "none" if kept.exit_layer is None else str(kept.exit_layer)
            exits[where] = exits.get(where, 0) + 1
            fam = exits_family.setdefault(it.family, {})
            fam[where] = fam.get(where, 0) + 1
        bar.update(len(chunk))
    bar.close()
    prefill, ttft = [], []
    for it in items[:timing_items]:  # single requests, as on a device
        res = engine.generate(chat_prompt(it.question), it.image, max_new_tokens=1)
        prefill.append(res.timings.prefill_ms)
        ttft.append(res.timings.ttft_ms)
    mean_text = statistics.fmean(text_tokens)
    measured = None
    if engine.recipe.exit is not None:
        measured = {None if k == "none" else int(k): v / len(items) for k, v in exits.items()}
    cost = estimate(engine.adapter.shape, engine.recipe, accounting="exact", text_tokens=round(mean_text),
                    exits=measured, weight_formats=())
    return EvalResult(
        accuracy=sum(correct.values()) / len(items),
        per_family={f: correct[f] / total[f] for f in FAMILIES if f in total},
        n=len(items),
        split=split,
        flops_reduction=cost.flops_reduction,
        baseline_flops=cost.baseline_flops,
        pruned_flops=cost.pruned_flops,
        prefill_ms=statistics.median(prefill) if prefill else 0.0,
        ttft_ms=statistics.median(ttft) if ttft else 0.0,
        kept_per_layer=[k / len(items) for k in (kept_sum or [])],
        text_tokens=mean_text,
        recipe=recipe_path,
        ablate_visual=ablate_visual,
        counts=total,
        exit_layers=exits if engine.recipe.exit is not None else {},
        exit_layers_per_family=exits_family if engine.recipe.exit is not None else {},
    )


def format_result(result: EvalResult) -> str:
    lines = [
        f"accuracy {result.accuracy:.2%} on {result.n} {result.split} items"
        + (f" (visual tokens ablated: {result.ablate_visual})" if result.ablate_visual else ""),
        "  " + "  ".join(f"{f} {a:.1%}" for f, a in result.per_family.items()),
        f"prefill FLOPs {result.pruned_flops / 1e9:.2f} G of {result.baseline_flops / 1e9:.2f} G "
        f"(reduction {result.flops_reduction:.1%}, exact accounting, {result.text_tokens:.1f} text tokens)",
        f"prefill {result.prefill_ms:.1f} ms, TTFT {result.ttft_ms:.1f} ms (median of single requests)",
        "visual tokens after each layer: " + " ".join(f"{k:.0f}" for k in result.kept_per_layer),
    ]
    if result.exit_layers:
        shares = sorted(result.exit_layers.items(), key=lambda kv: (kv[0] == "none", int(kv[0]) if kv[0] != "none" else 0))
        lines.append("exit layers (FLOPs are per-request means): "
                     + "  ".join(f"{k}:{v / result.n:.1%}" for k, v in shares))
    return "\n".join(lines)
