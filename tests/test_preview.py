"""The preview ranking (recipe prune.preview_layers): what it measures, what it costs, where it is refused."""

from __future__ import annotations

import json

import pytest
import torch

from edge_prune.cli import main as cli_main
from edge_prune.converters import executorch as cx
from edge_prune.cost import estimate, prefill_breakdown
from edge_prune.engine import PrunedEngine
from edge_prune.errors import RecipeError
from edge_prune.fit.calibration import load_calibration
from edge_prune.fit.fitprune import FitPruneFitter, parse_preview_layers
from edge_prune.models.adapter import LlavaAdapter
from edge_prune.recipe import PruneSpec, Recipe
from edge_prune.scoring import standardised_log, with_preview
from tests.conftest import PROMPTS
from tests.test_executorch_modules import _check
from tests.test_fitprune import calib_jsonl  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def adapter(tiny_llava_dir):
    return LlavaAdapter.load(tiny_llava_dir)


def _recipe(adapter, preview_layers, keep=(1.0, 0.5, 0.25, 0.1), **prune):
    return Recipe(model=adapter.signature(), prune=PruneSpec(scorer="fitprune", keep_after=list(keep),
                                                             fitprune_combine="either", preview_layers=preview_layers,
                                                             **prune))


def test_preview_is_where_the_next_layer_will_look(tiny_llava_dir, images):
    """With layer 1's MLP silenced, the states at layer 1's drop are the ones layer 2 reads, so a preview of
    layer 2 must equal the attention transformers' layer 2 pays from the last prompt token (head-max)."""
    engine = PrunedEngine.load(tiny_llava_dir, recipe=None)
    engine = PrunedEngine(engine.adapter, _recipe(engine.adapter, [2], keep=(1.0, 0.5, 0.5, 0.5)))
    model = engine.adapter.model
    mlp = engine.adapter.layers[1].mlp
    with torch.no_grad():
        mlp.down_proj.weight.zero_()
    captured = {}
    original = engine._drop

    def drop(ws, layer, attn_ctx, targets):
        captured["preview"], captured["ws"] = engine.preview(ws, layer), ws
        return original(ws, layer, attn_ctx, targets)

    engine._drop = drop
    batch = engine.adapter.prepare(PROMPTS, images)  # three prompt lengths: padding and left packing
    model.set_attn_implementation("eager")
    with torch.no_grad():
        engine.prefill(batch)
        attentions = model(**batch.model_inputs(), output_attentions=True).attentions
    ws = captured["ws"]
    for b in range(len(PROMPTS)):
        real = batch.attention_mask[b].bool()
        expected = attentions[2][b][:, real][:, -1, real].amax(0)  # [keys] of the last real token
        got = captured["preview"][b][ws.valid[b]]
        assert torch.allclose(got, expected, atol=1e-5)


def test_preview_reorders_the_ranking_and_is_the_sum_of_two_standardised_logs(adapter, images):
    plain = PrunedEngine(adapter, _recipe(adapter, []))
    previewed = PrunedEngine(adapter, _recipe(adapter, [2, 3]))
    batch = adapter.prepare(PROMPTS, images)
    with torch.no_grad():
        a, b = plain.prefill(batch), previewed.prefill(batch)
    assert [k.per_layer for k in a.kept] == [k.per_layer for k in b.kept]  # same counts, same FLOPs schedule
    assert not torch.allclose(a.logits, b.logits)  # other tokens kept
    scores, preview = torch.rand(2, 6) + 0.1, torch.rand(2, 6) + 0.1
    present = torch.tensor([[True] * 6, [True, True, True, False, False, True]])
    combined = with_preview(scores, preview, present)
    z = standardised_log(scores, present)
    assert torch.allclose(z[present].view(-1).mean(), torch.tensor(0.0), atol=0.3)
    assert torch.allclose(combined, z + standardised_log(preview, present))
    for row in range(2):
        zr = z[row][present[row]]
        assert zr.mean().abs() < 1e-5 and (zr.pow(2).mean().sqrt() - 1).abs() < 1e-4


def test_no_preview_after_the_last_preview_layer(adapter, images):
    """A drop after layer 2 with preview layer 2 has nothing to preview: the ranking is FitPrune's alone."""
    keep = (1.0, 1.0, 0.5, 0.25)
    batch = adapter.prepare(PROMPTS, images)
    with torch.no_grad():
        a = PrunedEngine(adapter, _recipe(adapter, [], keep=keep)).prefill(batch)
        b = PrunedEngine(adapter, _recipe(adapter, [2], keep=keep)).prefill(batch)
    assert torch.equal(a.logits, b.logits)


def test_exported_modules_rank_with_the_preview_as_the_engine(adapter, images):
    _check(PrunedEngine(adapter, _recipe(adapter, [1, 3])), images)
    _check(PrunedEngine(adapter, _recipe(adapter, [3], regions=2, merge=True)), images, boundaries=[2])


def test_preview_flops_are_counted_and_the_fit_pays_for_them(tiny_llava_dir, calib_jsonl):  # noqa: F811
    engine = PrunedEngine.load(tiny_llava_dir)
    shape = engine.adapter.shape
    recipe = _recipe(engine.adapter, [2, 3])
    text = 20
    counts = recipe.keep_counts(shape.num_visual_tokens)
    d, kv, q = shape.hidden_size, shape.kv_dim, shape.q_dim
    entering = [shape.num_visual_tokens, *counts[:-1]]
    # drops after layers 1 (previews 2 and 3) and 2 (previews 3); the drop after 3 has no later preview layer
    macs = sum(n_later * ((text + entering[i]) * d * kv + d * q + q * (text + entering[i]))
               for i, n_later in ((1, 2), (2, 1)))
    assert prefill_breakdown(shape, recipe, text)["preview"] == 2 * macs
    assert prefill_breakdown(shape, _recipe(engine.adapter, []), text)["preview"] == 0
    calib = load_calibration(str(calib_jsonl), 4)
    plain = FitPruneFitter(engine, calib, 0.3, batch_size=4, progress=False).fit()
    fitted = FitPruneFitter(engine, calib, 0.3, batch_size=4, progress=False, preview_layers=[3]).fit()
    assert fitted.recipe.prune.preview_layers == [3] and fitted.recipe.provenance["preview_layers"] == [3]
    cost = estimate(shape, fitted.recipe, text_tokens=fitted.recipe.provenance["text_tokens"])
    assert cost.flops_reduction == fitted.predicted_reduction >= 0.3
    assert cost.pruned_breakdown["preview"] > 0
    assert sum(fitted.recipe.prune.keep_after) <= sum(plain.recipe.prune.keep_after)  # it keeps no more
    with pytest.raises(RecipeError, match="does not apply to --ranking random"):
        FitPruneFitter(engine, calib, 0.3, batch_size=4, progress=False, ranking="random", preview_layers=[3])


def test_recipe_field_round_trips_and_is_written_only_when_set(adapter, tmp_path):
    path = _recipe(adapter, [2, 3]).save(tmp_path / "a" / "recipe.json")
    assert Recipe.load(path).prune.preview_layers == [2, 3]
    plain = _recipe(adapter, []).save(tmp_path / "b" / "recipe.json")
    assert "preview_layers" not in json.loads(plain.read_text())["prune"]


@pytest.mark.parametrize("change, message", [
    ({"preview_layers": [0]}, r"expected increasing layer indices in \[1, 3\]"),
    ({"preview_layers": [4]}, r"expected increasing layer indices in \[1, 3\]"),
    ({"preview_layers": [3, 2]}, "expected increasing layer indices"),
    ({"preview_layers": "3"}, "expected a list of layer indices"),
    ({"preview_layers": [2], "scorer": "random"}, "only the 'fitprune' scorer uses a preview"),
    ({"preview_layers": [2], "skip_attention": [2]}, r"names layer\(s\) \[2\], whose attention the recipe skips"),
])
def test_bad_preview_layers_are_named(adapter, change, message):
    data = _recipe(adapter, []).to_dict()
    for key, value in change.items():
        (data if key == "skip_attention" else data["prune"])[key] = value
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(data)


def test_cli_preview_layers(tiny_llava_dir, calib_jsonl, tmp_path, capsys):  # noqa: F811
    assert parse_preview_layers("last", 4) == [3] and parse_preview_layers("all", 4) == [1, 2, 3]
    assert parse_preview_layers("3,2", 4) == [2, 3] and parse_preview_layers("", 4) == []
    out = tmp_path / "r.json"
    base = ["fit", str(tiny_llava_dir), "--flops-reduction", "0.3", "--calib", str(calib_jsonl), "--n", "4",
            "-o", str(out)]
    assert cli_main([*base, "--preview-layers", "9"]) != 0
    assert "--preview-layers names [9]; a preview looks at layers after a drop, 1..3" in capsys.readouterr().err
    assert not out.exists()
    assert cli_main([*base, "--preview-layers", "x"]) != 0
    assert "expected 'last', 'all' or layer indices" in capsys.readouterr().err
    assert cli_main([*base, "--method", "dyvte", "--preview-layers", "last"]) != 0
    assert "use it with --method fitprune" in capsys.readouterr().err
    assert cli_main([*base, "--preview-layers", "last"]) == 0
    assert Recipe.load(out).prune.preview_layers == [3]
