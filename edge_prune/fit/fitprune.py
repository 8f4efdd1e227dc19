"""FitPrune: a training-free per-layer keep schedule that meets a prefill-FLOPs budget.

1. Reference pass (unpruned): per layer and sample, the total cross mass (attention from the
   text after the image to the visual tokens, head-max, per text row) and self mass (visual to
   visual, head-max, per visual token).
2. For a tolerance alpha, walk the layers on the already-pruned states: per sample sort the
   present visual tokens by cross and by self mass, find the longest low-mass prefix whose removal
   keeps >= (1 - alpha) of that layer's reference mass, and drop the intersection of the two
   prefixes. Stop dropping once the predicted FLOPs (cost model, chosen accounting) meet the budget.
3. Binary search the smallest alpha (to 0.01) that meets the budget; the recipe keeps, after each
   layer, the mean kept fraction over the calibration samples.

Unlike the reference code this runs batched, for any prompt layout, layer count and GQA, never
builds a full attention map, and reduces its statistics across torch.distributed ranks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from tqdm import tqdm

import edge_prune
from edge_prune.cost import estimate
from edge_prune.engine import PrunedEngine, WorkingSet
from edge_prune.errors import InputError, RecipeError
from edge_prune.fit.calibration import CalibrationSet
from edge_prune.fit.distributed import Dist
from edge_prune.recipe import Budget, PruneSpec, Recipe

ALPHA_TOLERANCE = 0.01
RANKINGS = ("fitprune", "random")  # how the fitted schedule's drops rank tokens at inference


@dataclass
class FitPruneResult:
    recipe: Recipe
    alpha: float
    predicted_reduction: float
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


def prefix_to_drop(mass: torch.Tensor, reference: float, alpha: float) -> torch.Tensor:
    """Indices (into `mass`) of the longest lowest-mass prefix whose removal keeps >= (1 - alpha) * reference."""
    order = torch.argsort(mass, stable=True)
    remaining = mass.sum() - torch.cat([mass.new_zeros(1), mass[order].cumsum(0)])  # after dropping j tokens
    ok = (remaining >= reference * (1.0 - alpha)).nonzero()
    j = int(ok[-1]) if len(ok) else 0
    return order[:j]


def parse_preview_layers(text: str, num_layers: int) -> list[int]:
    """--preview-layers: '' (none), 'last' (the final layer), 'all' (every layer a drop can precede) or indices."""
    text = text.strip()
    if not text:
        return []
    if text == "last":
        return [num_layers - 1]
    if text == "all":
        return list(range(1, num_layers))
    try:
        layers = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise InputError(f"--preview-layers {text!r}: expected 'last', 'all' or layer indices such as 4,5") from None
    bad = [x for x in layers if not 1 <= x < num_layers]
    if bad:
        raise InputError(f"--preview-layers names {bad}; a preview looks at layers after a drop, 1..{num_layers - 1} "
                         f"on this {num_layers}-layer decoder")
    return layers


class FitPruneFitter:
    """Holds the calibration batch's embeddings and reference masses; `fit` searches alpha."""

    def __init__(self, engine: PrunedEngine, calibration: CalibrationSet, flops_reduction: float | None,
                 accounting: str = "exact", batch_size: int = 8, dist: Dist | None = None, progress: bool = True,
                 first_layer: int = 0, regions: int = 1, ranking: str = "fitprune", merge: bool = False,
                 preview_layers: Sequence[int] = ()):
        """`flops_reduction` may be None and set with `retarget` once `text_tokens` is known (device budgets).

        `first_layer` > 0 keeps every visual token through the layers before it (FastV's K). FitPrune
        itself may drop after layer 0, whose attention is mostly positional in small models: on the
        benchmark model its 60% schedule dropped 65% there and lost 39 points (see README).

        `regions`, `ranking` and `merge` shape what the recipe's drops do at inference, not the schedule
        the search finds: regions > 1 ranks region by region (PruneSpec.regions), ranking "random" ranks
        uniformly at random instead of by FitPrune's attention score, and merge folds each dropped token
        into its most similar kept one (edge_prune.merging). Merging costs FLOPs, which the search counts,
        so a merged recipe may keep slightly fewer tokens to meet the same budget. `preview_layers` (ranking
        "fitprune" only) adds those later layers' attention from the last prompt token to the ranking
        (PruneSpec.preview_layers); its FLOPs are counted too.
        """
        if ranking not in RANKINGS:
            raise RecipeError(f"--ranking {ranking!r}; expected one of {', '.join(RANKINGS)}")
        self.regions, self.ranking, self.merge = regions, ranking, merge
        self.preview_layers = list(preview_layers)
        if self.preview_layers and ranking != "fitprune":
            raise RecipeError(f"--preview-layers adds to FitPrune's attention ranking; it does not apply to "
                              f"--ranking {ranking}")
        self.target: float | None = None
        if flops_reduction is not None:
            self.retarget(flops_reduction)
        self.engine = engine
        self.adapter = engine.adapter
        if not 0 <= first_layer < len(self.adapter.layers):
            raise RecipeError(f"--first-layer {first_layer} must name a decoder layer, 0..{len(self.adapter.layers) - 1}")
        self.first_layer = first_layer
        self.calibration = calibration
        self.accounting = accounting
        self.dist = dist or Dist.single()
        self.progress = progress and self.dist.rank == 0
        self.shape = self.adapter.shape
        self.sig = self.adapter.signature()
        self._recipe([0.5] * len(self.adapter.layers)).validate("fitprune")  # a bad --regions fails now
        # Micro-batches are fixed by sample index and dealt round-robin to ranks, so every
        # sample is computed in the same company whatever the world size: same recipe on 1 or N.
        samples = calibration.samples
        chunks = [list(range(i, min(i + batch_size, len(samples)))) for i in range(0, len(samples), batch_size)]
        self.chunks = chunks[self.dist.rank::self.dist.world_size]
        self.n_samples = len(samples)
        self._starts: list[WorkingSet] = []
        self._n_visual: list[torch.Tensor] = []
        text_tokens = 0.0
        for chunk in self.chunks:
            batch = self.adapter.prepare([samples[i].prompt for i in chunk], [samples[i].image for i in chunk])
            with torch.no_grad():
                embeds, visual = self.adapter.embed(batch, self.adapter.image_features(batch))
                ws = engine.initial_working_set(embeds, visual, batch.attention_mask.bool())
            self._starts.append(ws)
            self._n_visual.append(ws.visual.sum(1))
            text_tokens += float((ws.valid & ~ws.visual).sum())
        self.text_tokens = round(self.dist.sum(text_tokens) / self.n_samples)
        if any(bool((n == 0).any()) for n in self._n_visual):
            raise RecipeError("a calibration prompt carries no image; FitPrune needs an image in every sample")
        self.reference = self._reference_mass()

    def retarget(self, flops_reduction: float) -> None:
        if not 0.0 < flops_reduction < 1.0:
            raise RecipeError(f"--flops-reduction is {flops_reduction}; expected a fraction in (0, 1), e.g. 0.6")
        self.target = flops_reduction

    # ---- statistics ---------------------------------------------------------------------------
    def _layer_components(self, layer_idx: int, ws: WorkingSet):
        layer = self.adapter.layers[layer_idx]
        out, _, (_, _, _, (cross, self_)) = self.engine.attend(layer, ws, fitprune_layer=layer_idx)
        ws.hidden = ws.hidden + out
        return cross, self_

    @staticmethod
    def _mlp(layer: torch.nn.Module, ws: WorkingSet) -> None:
        ws.hidden = ws.hidden + layer.mlp(layer.post_attention_layernorm(ws.hidden))

    @torch.no_grad()
    def _reference_mass(self) -> list[torch.Tensor]:
        """Per chunk: [B, L, 2] total (cross, self) mass on the visual tokens of the unpruned model."""
        out = []
        for ws0 in tqdm(self._starts, desc="fitprune: reference pass", disable=not self.progress, unit="batch"):
            ws = _clone(ws0)
            masses = []
            for i, layer in enumerate(self.adapter.layers):
                cross, self_ = self._layer_components(i, ws)
                vis = ws.visual.float()
                masses.append(torch.stack([(cross * vis).sum(1), (self_ * vis).sum(1)], dim=1))
                self._mlp(layer, ws)
            out.append(torch.stack(masses, dim=1))
        return out

    # ---- search -------------------------------------------------------------------------------
    def _recipe(self, fractions: list[float]) -> Recipe:
        keep = [round(f, 6) for f in fractions]
        for i in range(1, len(keep)):  # guard against float noise breaking monotonicity
            keep[i] = min(keep[i], keep[i - 1])
        drops = any(k < 1.0 for k in keep)
        prune = PruneSpec(scorer=self.ranking if drops else "none", keep_after=keep, fitprune_combine="either",
                          regions=self.regions if drops else 1, merge=self.merge and drops,
                          preview_layers=self.preview_layers if drops else [])
        return Recipe(model=self.sig, prune=prune, budget=Budget(flops_reduction=self.target, accounting=self.accounting))

    def predicted_reduction(self, fractions: list[float]) -> float:
        return estimate(self.shape, self._recipe(fractions), accounting=self.accounting,
                        text_tokens=self.text_tokens).flops_reduction

    @torch.no_grad()
    def simulate(self, alpha: float) -> tuple[bool, list[float]]:
        """Run the drop rule at `alpha`; returns (budget reached, mean kept fraction after each layer)."""
        states = [_clone(ws) for ws in self._starts]
        fractions: list[float] = []
        num_layers = len(self.adapter.layers)
        for i, layer in enumerate(self.adapter.layers):
            current = self._mean_fraction(states)
            if self.predicted_reduction(fractions + [current] * (num_layers - i)) >= self.target:
                return True, fractions + [current] * (num_layers - i)
            if i < self.first_layer:
                for ws in states:
                    ws.hidden = ws.hidden + self.engine.attend(layer, ws)[0]
                    self._mlp(layer, ws)
                fractions.append(current)
                continue
            for c, ws in enumerate(states):
                cross, self_ = self._layer_components(i, ws)
                keep = ws.valid.clone()
                for b in range(ws.valid.shape[0]):
                    vis_idx = ws.visual[b].nonzero()[:, 0]
                    ref_cross, ref_self = self.reference[c][b, i].tolist()
                    drop_c = vis_idx[prefix_to_drop(cross[b, vis_idx], ref_cross, alpha)]
                    drop_s = vis_idx[prefix_to_drop(self_[b, vis_idx], ref_self, alpha)]
                    both = drop_c[torch.isin(drop_c, drop_s)]
                    keep[b, both] = False
                if not bool(keep.eq(ws.valid).all()):
                    ws = ws.select(keep)
                    states[c] = ws
                self._mlp(layer, ws)
            fractions.append(self._mean_fraction(states))
        return self.predicted_reduction(fractions) >= self.target, fractions

    def _mean_fraction(self, states: list[WorkingSet]) -> float:
        local = sum(float((ws.visual.sum(1) / n).sum()) for ws, n in zip(states, self._n_visual))
        return self.dist.sum(local) / self.n_samples

    def fit(self) -> FitPruneResult:
        start = time.perf_counter()
        num_layers = len(self.adapter.layers)
        most = self.predicted_reduction([1.0] * self.first_layer + [0.0] * (num_layers - self.first_layer))
        if most < self.target:
            after = f" from layer {self.first_layer} on" if self.first_layer else ""
            raise RecipeError(
                f"a {self.target:.0%} prefill-FLOPs reduction ({self.accounting} accounting, {self.text_tokens} text "
                f"tokens) cannot be met by dropping visual tokens{after}: the largest reachable reduction is {most:.1%}"
            )
        history: list[dict[str, Any]] = []
        lo, hi = 0.0, 1.0
        best: list[float] | None = None
        steps = 0
        bar = tqdm(total=7, desc="fitprune: alpha search", disable=not self.progress, unit="step")
        while hi - lo > ALPHA_TOLERANCE + 1e-9:
            mid = (lo + hi) / 2
            reached, fractions = self.simulate(mid)
            history.append({"alpha": mid, "reached": reached, "reduction": self.predicted_reduction(fractions)})
            if reached:
                hi, best = mid, fractions
            else:
                lo = mid
            steps += 1
            bar.update(1)
        bar.close()
        if best is None:  # every tried alpha fell short: the largest tolerance is the answer
            reached, best = self.simulate(hi)
            history.append({"alpha": hi, "reached": reached, "reduction": self.predicted_reduction(best)})
        best = self._meet_after_rounding(best)
        recipe = self._recipe(best)
        reduction = self.predicted_reduction(best)
        recipe.provenance = {
            "method": "fitprune",
            "alpha": hi,
            "first_layer": self.first_layer,
            "ranking": self.ranking,
            "regions": self.regions,
            "merge": self.merge,
            "preview_layers": self.preview_layers,
            "calibration": self.calibration.source,
            "calibration_samples": self.n_samples,
            "world_size": self.dist.world_size,
            "predicted_flops_reduction": reduction,
            "accounting": self.accounting,
            "text_tokens": self.text_tokens,
            "search": history,
            "versions": _versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        return FitPruneResult(recipe, hi, reduction, time.perf_counter() - start, history)

    def _meet_after_rounding(self, fractions: list[float]) -> list[float]:
        """Means of per-image counts are fractional: lower the last plateau a token at a time until it holds."""
        step = 1.0 / self.sig.num_visual_tokens
        fractions = list(fractions)
        while self.predicted_reduction(fractions) < self.target:
            nonzero = [i for i, f in enumerate(fractions) if f > 0]
            if not nonzero:
                break
            end = nonzero[-1]
            start = fractions.index(fractions[end])
            fractions[start:end + 1] = [max(0.0, f - step) for f in fractions[start:end + 1]]
        return fractions


def _clone(ws: WorkingSet) -> WorkingSet:
    return WorkingSet(ws.hidden.clone(), ws.valid.clone(), ws.positions.clone(), ws.visual.clone(),
                      ws.text_after.clone(), ws.image_start)


def _versions() -> dict[str, str]:
    import transformers

    return {"edge_prune": edge_prune.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
