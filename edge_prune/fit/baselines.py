"""Baseline recipes at a FLOPs budget: FastV (K, R), random dropping, and spatial pooling.

Every method is compared at equal predicted FLOPs, so each baseline solves for the largest
visual-token count whose predicted prefill-FLOPs reduction still meets the target.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Callable

import edge_prune
from edge_prune.cost import DEFAULT_TEXT_TOKENS, estimate
from edge_prune.errors import RecipeError
from edge_prune.models.shapes import ModelShape
from edge_prune.recipe import Budget, PruneSpec, Recipe

BASELINES = ("fastv", "random", "pool")


def one_shot_schedule(num_layers: int, k: int, keep: float) -> list[float]:
    """FastV in recipe form: full attention in layers < K, drop right after layer K-1's attention."""
    return [1.0] * (k - 1) + [keep] * (num_layers - k + 1)


def _candidates(method: str, n_visual: int) -> list[int]:
    """Token counts the method can express, ascending."""
    if method == "pool":
        side = math.isqrt(n_visual)
        if side * side == n_visual:  # pool the square grid to square or rows x (rows+1) grids
            return sorted({c for s in range(1, side + 1) for c in (s * s, s * (s + 1)) if c <= n_visual})
    return list(range(0, n_visual + 1))


def baseline_recipe(
    shape: ModelShape,
    method: str,
    flops_reduction: float,
    k: int = 2,
    accounting: str = "exact",
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    seed: int = 0,
) -> Recipe:
    """The recipe of `method` that keeps the most visual tokens while meeting `flops_reduction`."""
    if method not in BASELINES:
        raise RecipeError(f"baseline method {method!r}; expected one of {', '.join(BASELINES)}")
    if not 0.0 < flops_reduction < 1.0:
        raise RecipeError(f"--flops-reduction is {flops_reduction}; expected a fraction in (0, 1), e.g. 0.6")
    if method != "pool" and not 1 <= k <= shape.num_layers:
        raise RecipeError(f"--k is {k}; expected a layer number in [1, {shape.num_layers}]")
    n = shape.num_visual_tokens
    sig = shape.signature()

    def build(count: int) -> Recipe:
        frac = count / n
        if method == "pool":
            prune = PruneSpec(scorer="pool", keep_after=[frac] * shape.num_layers, keep_input=frac)
        else:
            prune = PruneSpec(scorer=method, keep_after=one_shot_schedule(shape.num_layers, k, frac), seed=seed)
        return Recipe(model=sig, prune=prune, budget=Budget(flops_reduction=flops_reduction, accounting=accounting))

    reduction: Callable[[int], float] = lambda c: estimate(  # noqa: E731
        shape, build(c), accounting=accounting, text_tokens=text_tokens).flops_reduction
    counts = _candidates(method, n)
    if reduction(counts[0]) < flops_reduction:
        raise RecipeError(
            f"{method} cannot reach a {flops_reduction:.0%} prefill-FLOPs reduction ({accounting} accounting, "
            f"{text_tokens} text tokens); the most it reaches is {reduction(counts[0]):.1%}"
            + _unreachable_hint(method, k)
        )
    lo, hi = 0, len(counts) - 1  # reduction falls as the count grows: find the largest count meeting it
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if reduction(counts[mid]) >= flops_reduction:
            lo = mid
        else:
            hi = mid - 1
    recipe = build(counts[lo])
    recipe.provenance = {
        "method": method,
        "k": k if method != "pool" else None,
        "visual_tokens_kept": counts[lo],
        "predicted_flops_reduction": reduction(counts[lo]),
        "accounting": accounting,
        "text_tokens": text_tokens,
        "edge_prune": edge_prune.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return recipe


def _unreachable_hint(method: str, k: int) -> str:
    """What bounds a method's reduction: the unpruned vision tower, and layers before the drop."""
    if method == "pool":
        return "; the vision tower's FLOPs are never pruned"
    if k > 1:
        return f" (try a smaller --k than {k})"
    return "; the vision tower and layer 0 are never pruned"
