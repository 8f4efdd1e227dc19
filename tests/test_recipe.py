"""The recipe contract: JSON round trip, validation messages that name the field, model checks."""

from __future__ import annotations

import json

import pytest

from edge_prune.errors import RecipeError
from edge_prune.recipe import ModelSignature, PruneSpec, Recipe

SIG = ModelSignature("LlavaForConditionalGeneration", 4, 64, 128, 4, 2, 64)


def _write(tmp_path, data) -> str:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_round_trip_keeps_every_field(tmp_path):
    recipe = Recipe(model=SIG, prune=PruneSpec(scorer="fitprune", keep_after=[1.0, 0.6, 0.6, 0.3]),
                    skip_attention=[3], provenance={"method": "fitprune", "alpha": 0.12})
    recipe.budget.flops_reduction = 0.5
    path = recipe.save(tmp_path / "sub" / "r.json")
    loaded = Recipe.load(path)
    assert loaded.to_dict() == recipe.to_dict()
    assert json.loads(path.read_text())["format"] == "edge-prune-recipe"
    assert loaded.keep_counts(64) == [64, 38, 38, 19]


def test_identity_recipe_keeps_everything():
    recipe = Recipe.identity(SIG)
    assert recipe.is_identity and recipe.keep_counts(576) == [576] * 4


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="something-else"), "field 'format'"),
        (lambda d: d.update(version=7), "field 'version' is 7"),
        (lambda d: d["prune"].update(scorer="magic"), "field 'prune.scorer' is 'magic'"),
        (lambda d: d["prune"].update(keep_after=[1.0, 0.5]), "has 2 entries, expected one per decoder layer \\(4\\)"),
        (lambda d: d["prune"].update(keep_after=[1.0, 0.5, 0.7, 0.2]), "prune.keep_after\\[2\\]' is 0.7, larger"),
        (lambda d: d["prune"].update(keep_after=[1.0, 1.5, 1.5, 1.5]), "prune.keep_after\\[1\\]' is 1.5"),
        (lambda d: d["prune"].update(keep_after=[1.0, -0.1, -0.1, -0.1]), "expected a fraction in \\[0, 1\\]"),
        (lambda d: d["model"].update(num_layers=0), "model.num_layers"),
        (lambda d: d.update(skip_attention=[9]), "skip_attention"),
        (lambda d: d["model"].pop("hidden_size"), "missing keys \\['hidden_size'\\]"),
        (lambda d: d["prune"].update(bogus=1), "unknown keys \\['bogus'\\]"),
        (lambda d: d["budget"].update(accounting="vibes"), "budget.accounting"),
        (lambda d: d["prune"].update(fitprune_combine="sum"), "prune.fitprune_combine' is 'sum', expected one of product, either"),
        (lambda d: d["prune"].update(regions=0), "prune.regions' is 0, expected a positive integer"),
        (lambda d: d["prune"].update(merge="yes"), "prune.merge' is 'yes', expected true or false"),
        (lambda d: d["model"].update(architecture="LlavaNextForConditionalGeneration") or d["prune"].update(regions=2),
         "tiles of varying count"),
        (lambda d: d["prune"].update(scorer="pool", keep_input=0.5, keep_after=[0.5] * 4, merge=True),
         "prune.merge' is true, but scorer 'pool'"),
        (lambda d: d["prune"].update(regions=9), "prune.regions' is 9, more than the token grid's side \\(8\\)"),
        (lambda d: d["model"].update(num_visual_tokens=60) or d["prune"].update(regions=2), "are not a square grid"),
        (lambda d: d["prune"].update(scorer="pool", keep_input=0.5, keep_after=[0.5] * 4, regions=2),
         "scorer 'pool' does not rank tokens"),
    ],
)
def test_invalid_recipes_name_the_field(tmp_path, mutate, message):
    data = Recipe(model=SIG, prune=PruneSpec(scorer="fastv", keep_after=[1.0, 0.5, 0.5, 0.2])).to_dict()
    mutate(data)
    with pytest.raises(RecipeError, match=message):
        Recipe.load(_write(tmp_path, data))


def test_malformed_json_names_the_line(tmp_path):
    with pytest.raises(RecipeError, match="not valid JSON \\(line 2"):
        Recipe.load(_write(tmp_path, '{"format": "edge-prune-recipe",\n "version": }'))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        Recipe.load(tmp_path / "nope.json")


def test_recipe_for_another_model_is_rejected():
    other = ModelSignature("LlavaForConditionalGeneration", 32, 4096, 11008, 32, 32, 576)
    with pytest.raises(RecipeError, match="num_layers: recipe has 4, model has 32"):
        Recipe.identity(SIG).check_model(other)


def test_save_is_atomic_and_rejects_invalid(tmp_path):
    recipe = Recipe(model=SIG, prune=PruneSpec(scorer="fastv", keep_after=[1.0, 0.5, 0.9, 0.2]))
    with pytest.raises(RecipeError):
        recipe.save(tmp_path / "bad.json")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_recipes_without_fitprune_combine_keep_the_reference_product(tmp_path):
    """Recipes written before the field existed score as they did; new fits say "either" (see fit)."""
    data = Recipe(model=SIG, prune=PruneSpec(scorer="fitprune", keep_after=[1.0, 0.5, 0.5, 0.2])).to_dict()
    data["prune"].pop("fitprune_combine")
    assert Recipe.load(_write(tmp_path, data)).prune.fitprune_combine == "product"
