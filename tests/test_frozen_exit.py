"""Frozen exits (recipe `exit.frozen`): an exiting request's visual tokens stop being computed but stay as
keys and values. The engine's outputs against an independent reference are in test_routers.py; here, the
cost model, the label pass, the recipe field and the CLI must agree with running such an exit."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from edge_prune.cli import main
from edge_prune.cost import decode_flops, estimate, kv_cache_bytes, prefill_breakdown, token_schedule
from edge_prune.engine import PrunedEngine
from edge_prune.errors import RecipeError
from edge_prune.fit.calibration import load_calibration
from edge_prune.fit.routers import RouterConfig, RouterFitter
from edge_prune.models.adapter import LlavaAdapter
from edge_prune.recipe import ExitSpec, PruneSpec, Recipe
from edge_prune.scoring import ExitRouter, lookahead_statistics
from tests.conftest import PROMPTS
from tests.test_guides import write_calib

FITPRUNE = PruneSpec(scorer="fitprune", keep_after=[1.0, 0.5, 0.5, 0.25])


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return LlavaAdapter.load(tiny_llava_dir)


def always_exit(adapter: LlavaAdapter, prune: PruneSpec, layer: int, frozen: bool) -> PrunedEngine:
    """An engine whose router sends every request out after `layer`."""
    router = ExitRouter(adapter.signature().hidden_size, [layer], 1)
    torch.nn.init.zeros_(router.w1)
    recipe = Recipe(model=adapter.signature(), prune=prune,
                    exit=ExitSpec("unused.safetensors", [layer], 0.0, 1, frozen=frozen))
    return PrunedEngine(adapter, recipe, router=router)


@pytest.mark.parametrize("lookahead", [False, True])
def test_cost_counts_the_frozen_tokens_keys_values_and_scores(llava, lookahead):
    shape, text, rank = llava.shape, 20, 4

    def recipe(frozen: bool) -> Recipe:
        return Recipe(model=llava.signature(), prune=FITPRUNE,
                      exit=ExitSpec("r.safetensors", [0, 1, 2], 0.5, rank, lookahead=lookahead, frozen=frozen))

    removed, frozen = recipe(False), recipe(True)
    present = token_schedule(shape, removed, text).visual_out  # visual tokens present after each attention

    def per_layer(n_frozen: int) -> int:  # FLOPs: their K and V projections, every text query scoring them
        return 2 * (n_frozen * shape.hidden_size * 2 * shape.kv_dim + 2 * shape.q_dim * text * n_frozen)

    def later(after: int, n_frozen: int) -> int:
        return sum(per_layer(n_frozen) for _ in range(after + 1, shape.num_layers))

    for exit_layer in (0, 1, 2):
        extra = (sum(prefill_breakdown(shape, frozen, text, exit_layer=exit_layer).values())
                 - sum(prefill_breakdown(shape, removed, text, exit_layer=exit_layer).values()))
        # a lookahead router's thrown-away runs at the candidates before the exit attend to them too
        wasted = sum(later(c, present[c]) for c in range(exit_layer)) if lookahead else 0
        assert extra == later(exit_layer, present[exit_layer]) + wasted
        caches = token_schedule(shape, frozen, text, exit_layer=exit_layer).cache_lengths()
        plain = token_schedule(shape, removed, text, exit_layer=exit_layer).cache_lengths()
        assert caches == [c + (present[exit_layer] if i > exit_layer else 0) for i, c in enumerate(plain)]
        report = estimate(shape, frozen, text_tokens=text, exits={exit_layer: 1.0})
        assert report.kv_bytes_pruned == kv_cache_bytes(shape, caches)
        assert report.decode_flops_pruned == decode_flops(shape, caches)
    never = estimate(shape, frozen, text_tokens=text, exits={None: 1.0}).pruned_flops
    assert never == estimate(shape, removed, text_tokens=text, exits={None: 1.0}).pruned_flops + (
        sum(later(c, present[c]) for c in (0, 1, 2)) if lookahead else 0)


def test_engine_caches_hold_what_the_cost_model_counts(llava, images):
    batch = llava.prepare(PROMPTS[:1], images[:1])
    for frozen in (False, True):
        pre = always_exit(llava, FITPRUNE, 1, frozen).prefill(batch)
        assert pre.kept[0].exit_layer == 1
        text = int(batch.attention_mask.sum()) - pre.kept[0].visual_tokens
        recipe = replace(Recipe(model=llava.signature(), prune=FITPRUNE),
                         exit=ExitSpec("r.safetensors", [1], 0.5, 1, frozen=frozen))
        expected = token_schedule(llava.shape, recipe, text, exit_layer=1).cache_lengths()
        assert [int(c.valid.sum()) for c in pre.caches] == expected
    # a frozen exit answers differently from removing the tokens: later layers still read the image
    removed = always_exit(llava, FITPRUNE, 1, False).prefill(batch).logits
    kept = always_exit(llava, FITPRUNE, 1, True).prefill(batch).logits
    assert not torch.allclose(removed, kept, atol=1e-3)


def test_label_pass_labels_and_looks_ahead_through_the_frozen_exit(llava, tmp_path):
    # without reference answers a sample's one checked position is its first answer token
    calib = load_calibration(str(write_calib(tmp_path, 4, answers=False)), 4)
    engine = PrunedEngine(llava, Recipe(model=llava.signature(), prune=FITPRUNE))
    fitter = RouterFitter.__new__(RouterFitter)  # the label pass only; too few samples for a held-out split
    fitter.engine, fitter.adapter, fitter.base, fitter.calibration = engine, llava, engine.recipe, calib
    fitter.sig, fitter.layers = llava.signature(), [0, 1, 2]
    fitter.config = RouterConfig(micro_batch=4, labels="agreement", lookahead=True, frozen=True)
    got = fitter._collect_batch([0, 1, 2, 3])
    d2 = 2 * llava.signature().hidden_size
    batch = llava.prepare([s.prompt for s in calib.samples], [s.image for s in calib.samples])
    normal = engine.prefill(batch).logits.argmax(-1)
    for j, layer in enumerate(fitter.layers):
        exited = always_exit(llava, FITPRUNE, layer, True).prefill(batch).logits
        assert torch.allclose(got.features[:, j, d2:], lookahead_statistics(exited), atol=1e-4)
        assert torch.equal(got.agree[:, j], exited.argmax(-1) == normal)


def test_recipe_field_is_written_only_when_set_and_checked(llava, tmp_path):
    sig = llava.signature()
    recipe = Recipe(model=sig, prune=FITPRUNE, exit=ExitSpec("router.safetensors", [1], 0.5, 2, frozen=True))
    ExitRouter(sig.hidden_size, [1], 2).save(tmp_path / "router.safetensors", sig.num_layers)
    path = recipe.save(tmp_path / "recipe.json")
    data = json.loads(path.read_text())
    assert data["exit"]["frozen"] is True and Recipe.load(path).exit.frozen
    plain = replace(recipe, exit=replace(recipe.exit, frozen=False)).save(tmp_path / "plain.json")
    assert "frozen" not in json.loads(plain.read_text())["exit"]  # older readers load it unchanged
    data["exit"]["frozen"] = "yes"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(RecipeError, match="'exit.frozen' is 'yes', expected true or false"):
        Recipe.load(tmp_path / "bad.json")


def test_fit_writes_a_frozen_exit_recipe_the_engine_runs(tiny_llava_dir, tmp_path, images, capsys):
    calib = write_calib(tmp_path, 16)
    out = tmp_path / "fit"
    assert main(["fit", str(tiny_llava_dir), "--method", "dyvte", "--frozen-exit", "--exit-labels", "agreement",
                 "--calib", str(calib), "--n", "16", "--batch-size", "4", "--max-risk", "0.25", "--json",
                 "-o", str(out)]) == 0
    recipe = Recipe.load(out / "recipe.json")
    assert recipe.exit.frozen and not recipe.exit.lookahead
    result = PrunedEngine.load(tiny_llava_dir, recipe=out / "recipe.json").generate(PROMPTS, images, max_new_tokens=2)
    assert all(k.exit_layer in (None, *recipe.exit.layers) for k in result.kept)
    capsys.readouterr()
    code = main(["fit", str(tiny_llava_dir), "--method", "fitprune", "--flops-reduction", "0.3", "--frozen-exit",
                 "--calib", str(calib), "--n", "4", "-o", str(tmp_path / "fp.json")])
    assert code == 2 and "--frozen-exit is an exit-router option" in capsys.readouterr().err
    assert not Path(tmp_path / "fp.json").exists()
