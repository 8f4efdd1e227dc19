"""Lookahead exit routers (recipe `exit.lookahead`): the router also reads the answer an exit would give.
Its decision, its labels, its cost and its files must all agree with running the exit for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edge_prune.cli import main
from edge_prune.cost import decoder_layer_flops, estimate, prefill_breakdown
from edge_prune.engine import PrunedEngine
from edge_prune.errors import RecipeError
from edge_prune.fit.calibration import load_calibration
from edge_prune.fit.routers import RouterConfig, RouterFitter, check_router_budget
from edge_prune.models.adapter import LlavaAdapter
from edge_prune.recipe import ExitSpec, PruneSpec, Recipe
from edge_prune.scoring import LOOKAHEAD_SCALE, ExitRouter, lookahead_statistics
from tests.conftest import PROMPTS
from tests.test_guides import write_calib


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return LlavaAdapter.load(tiny_llava_dir)


def forced_exit_logits(adapter: LlavaAdapter, prune: PruneSpec, layer: int, batch) -> torch.Tensor:
    """Prefill logits with every request exiting after `layer` (a router that always says yes)."""
    forced = ExitRouter(adapter.signature().hidden_size, [layer], 1)
    torch.nn.init.zeros_(forced.w1)
    recipe = Recipe(model=adapter.signature(), prune=prune, exit=ExitSpec("unused.safetensors", [layer], 0.0, 1))
    pre = PrunedEngine(adapter, recipe, router=forced).prefill(batch)
    assert [k.exit_layer for k in pre.kept] == [layer] * len(pre.kept)
    return pre.logits


def top_probability_router(hidden_size: int, layer: int) -> ExitRouter:
    """A lookahead router whose logit is gelu(LOOKAHEAD_SCALE x the exited answer's top probability)."""
    router = ExitRouter(hidden_size, [layer], 1, lookahead=True)
    with torch.no_grad():
        router.w1.zero_()
        router.w1[0, 2 * hidden_size] = 1.0
        router.w2.fill_(1.0)
    return router


@pytest.mark.parametrize("prune", [PruneSpec(scorer="none", keep_after=[1.0] * 4),
                                   PruneSpec(scorer="fitprune", keep_after=[1.0, 0.5, 0.5, 0.25])])
def test_decision_reads_the_answer_the_exit_would_give(llava, images, prune):
    layer = 1
    batch = llava.prepare(PROMPTS, images)
    exited = forced_exit_logits(llava, prune, layer, batch)
    top = exited.softmax(-1).max(-1).values
    expected = torch.sigmoid(torch.nn.functional.gelu(LOOKAHEAD_SCALE * top))
    router = top_probability_router(llava.signature().hidden_size, layer)
    normal = PrunedEngine(llava, Recipe(model=llava.signature(), prune=prune)).prefill(batch).logits
    order = expected.argsort()
    # a threshold between the two least confident exits: the least confident request stays, the others exit
    threshold = float(expected[order[0]] + expected[order[1]]) / 2
    recipe = Recipe(model=llava.signature(), prune=prune,
                    exit=ExitSpec("unused.safetensors", [layer], threshold, 1, lookahead=True))
    pre = PrunedEngine(llava, recipe, router=router).prefill(batch)
    for b, kept in enumerate(pre.kept):
        stays = b == int(order[0])
        assert kept.exit_layer == (None if stays else layer)
        assert torch.allclose(pre.logits[b], normal[b] if stays else exited[b], atol=1e-4)


def test_label_pass_gives_the_router_the_statistics_it_reads_at_inference(llava, tmp_path):
    calib = load_calibration(str(write_calib(tmp_path, 4)), 4)
    engine = PrunedEngine(llava)
    fitter = RouterFitter.__new__(RouterFitter)  # the label pass only; too few samples for a held-out split
    fitter.engine, fitter.adapter, fitter.base, fitter.calibration = engine, llava, engine.recipe, calib
    fitter.sig, fitter.layers = llava.signature(), [0, 1, 2]
    fitter.config = RouterConfig(micro_batch=4, labels="agreement", lookahead=True)
    got = fitter._collect_batch([0, 1, 2, 3])
    d2 = 2 * llava.signature().hidden_size
    assert got.features.shape == (4, 3, d2 + 3)
    plain = RouterConfig(micro_batch=4, labels="agreement")
    fitter.config = plain
    without = fitter._collect_batch([0, 1, 2, 3])
    assert torch.equal(got.features[..., :d2], without.features) and torch.equal(got.labels, without.labels)
    batch = llava.prepare([s.prompt for s in calib.samples], [s.image for s in calib.samples])
    for j, layer in enumerate(fitter.layers):
        stats = lookahead_statistics(forced_exit_logits(llava, engine.recipe.prune, layer, batch))
        assert torch.allclose(got.features[:, j, d2:], stats, atol=1e-4)


def test_cost_counts_the_text_only_runs_that_are_thrown_away(llava):
    shape, text, rank = llava.shape, 20, 4
    prune = PruneSpec(scorer="fitprune", keep_after=[1.0, 0.5, 0.5, 0.25])
    plain = Recipe(model=llava.signature(), prune=prune, exit=ExitSpec("r.safetensors", [0, 1, 2], 0.5, rank))
    ahead = Recipe(model=llava.signature(), prune=prune,
                   exit=ExitSpec("r.safetensors", [0, 1, 2], 0.5, rank, lookahead=True))

    def rest(after: int) -> int:  # layers after `after` on the text alone, then the lm_head on one position
        layers = range(after + 1, shape.num_layers)
        return sum(decoder_layer_flops(shape, text) for _ in layers) + 2 * shape.hidden_size * shape.vocab_size

    def extra(exit_layer):
        return (prefill_breakdown(shape, ahead, text, exit_layer=exit_layer)["exit_router"]
                - prefill_breakdown(shape, plain, text, exit_layer=exit_layer)["exit_router"])

    stats_inputs = 2 * 3 * rank  # the three statistics' weights, in FLOPs, per evaluated candidate
    assert extra(None) == 3 * stats_inputs + rest(0) + rest(1) + rest(2)  # never exits: every run wasted
    assert extra(1) == 2 * stats_inputs + rest(0)  # exits after 1: that run is its prefill, layer 0's is not
    assert extra(0) == stats_inputs
    shares = {0: 0.25, 2: 0.25, None: 0.5}
    mean = sum(s * sum(prefill_breakdown(shape, ahead, text, exit_layer=k).values()) for k, s in shares.items())
    assert estimate(shape, ahead, text_tokens=text, exits=shares).pruned_flops == pytest.approx(mean, abs=8)
    n = check_router_budget(shape, [0, 1, 2], rank, lookahead=True)
    assert n == ExitRouter(shape.hidden_size, [0, 1, 2], rank, lookahead=True).num_parameters()


def test_router_file_and_recipe_must_agree_on_lookahead(llava, tmp_path):
    sig = llava.signature()
    spec = ExitSpec("router.safetensors", [1], 0.5, 2, lookahead=True)
    recipe = Recipe(model=sig, prune=PruneSpec(scorer="none", keep_after=[1.0] * 4), exit=spec)
    ExitRouter(sig.hidden_size, [1], 2).save(tmp_path / "router.safetensors", sig.num_layers)
    path = recipe.save(tmp_path / "recipe.json")
    assert json.loads(path.read_text())["exit"]["lookahead"] is True
    with pytest.raises(RecipeError, match=r"router.safetensors: the exit router does not read the lookahead "
                                          r"statistics, but the recipe's 'exit.lookahead' is true"):
        PrunedEngine(llava, Recipe.load(path))
    ExitRouter(sig.hidden_size, [1], 2, lookahead=True).save(tmp_path / "router.safetensors", sig.num_layers)
    assert PrunedEngine(llava, Recipe.load(path)).router.lookahead
    data = json.loads(path.read_text())
    del data["exit"]["lookahead"]  # a recipe from before the option: the file must not read them either
    (tmp_path / "old.json").write_text(json.dumps(data))
    with pytest.raises(RecipeError, match="reads the lookahead statistics, but the recipe's 'exit.lookahead' is false"):
        PrunedEngine(llava, Recipe.load(tmp_path / "old.json"))
    data["exit"]["lookahead"] = "yes"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(RecipeError, match="'exit.lookahead' is 'yes', expected true or false"):
        Recipe.load(tmp_path / "bad.json")


def test_fit_writes_a_lookahead_recipe_the_engine_runs(tiny_llava_dir, tmp_path, images, capsys):
    calib = write_calib(tmp_path, 16)
    out = tmp_path / "fit"
    assert main(["fit", str(tiny_llava_dir), "--method", "dyvte", "--lookahead", "--exit-labels", "agreement",
                 "--calib", str(calib), "--n", "16", "--batch-size", "4", "--max-risk", "0.25", "--json",
                 "-o", str(out)]) == 0
    recipe = Recipe.load(out / "recipe.json")
    assert recipe.exit.lookahead
    engine = PrunedEngine.load(tiny_llava_dir, recipe=out / "recipe.json")
    assert engine.router.lookahead and engine.router.inputs == 2 * engine.adapter.signature().hidden_size + 3
    result = engine.generate(PROMPTS, images, max_new_tokens=2)
    assert all(k.exit_layer in (None, *recipe.exit.layers) for k in result.kept)
    capsys.readouterr()
    code = main(["fit", str(tiny_llava_dir), "--method", "fitprune", "--flops-reduction", "0.3", "--lookahead",
                 "--calib", str(calib), "--n", "4", "-o", str(tmp_path / "fp.json")])
    assert code == 2 and "--lookahead is an exit-router option" in capsys.readouterr().err
    assert not Path(tmp_path / "fp.json").exists()
