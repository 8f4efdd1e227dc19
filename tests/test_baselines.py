"""Baseline recipes meet their FLOPs budget with the most tokens the method can keep."""

from __future__ import annotations

import pytest

from edge_prune.cost import estimate
from edge_prune.errors import RecipeError
from edge_prune.fit.baselines import baseline_recipe
from edge_prune.models.shapes import load_shape

SHAPE = load_shape("tests/fixtures/llava-1.5-7b/config.json")


@pytest.mark.parametrize("method", ["fastv", "random", "pool"])
@pytest.mark.parametrize("target", [0.4, 0.6, 0.8])
def test_budget_met_with_the_largest_count(method, target):
    recipe = baseline_recipe(SHAPE, method, target, k=2, text_tokens=48)
    got = estimate(SHAPE, recipe, text_tokens=48).flops_reduction
    assert got >= target
    kept = recipe.provenance["visual_tokens_kept"]
    assert recipe.provenance["predicted_flops_reduction"] == pytest.approx(got)
    # One more token (the next count the method can express) would miss the budget.
    bigger = baseline_recipe(SHAPE, method, target - 0.02, k=2, text_tokens=48).provenance["visual_tokens_kept"]
    assert bigger > kept
    if method == "fastv":
        assert recipe.prune.keep_after[0] == 1.0 and recipe.prune.keep_after[1] < 1.0  # K=2: drop after layer 1
    if method == "pool":
        assert recipe.prune.keep_input == recipe.prune.keep_after[0] < 1.0


def test_unreachable_budget_names_the_largest_reachable():
    with pytest.raises(RecipeError, match=r"cannot reach a 95% .* the most it reaches is 8\d\.\d%"):
        baseline_recipe(SHAPE, "fastv", 0.95, k=2)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "magic", "flops_reduction": 0.5}, "baseline method 'magic'"),
    ({"method": "fastv", "flops_reduction": 0.0}, "expected a fraction in \\(0, 1\\)"),
    ({"method": "fastv", "flops_reduction": 0.5, "k": 40}, "--k is 40"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(RecipeError, match=message):
        baseline_recipe(SHAPE, **kwargs)
