"""The modules the ExecuTorch converter exports, run eagerly, equal the reference engine for every scorer,
input pooling, guides and exit routers (lowering is slow: test_executorch_artifact.py does it once)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_prune.converters import executorch as cx
from edge_prune.engine import PrunedEngine
from edge_prune.merging import merge_into_kept
from edge_prune.models.adapter import LlavaAdapter
from edge_prune.recipe import ExitSpec, GuideSpec, PruneSpec, Recipe
from edge_prune.runtimes.executorch import exit_method_names
from edge_prune.scoring import ExitRouter, GuideSet
from tests.conftest import PROMPTS


@pytest.fixture(scope="module")
def adapter(tiny_llava_dir):
    return LlavaAdapter.load(tiny_llava_dir)


def _run_exported_modules(engine: PrunedEngine, prompt: str, image, boundaries: list[int]):
    """What the runtime does with the program's methods, on the un-lowered modules."""
    ad, recipe = engine.adapter, engine.recipe
    spec = cx.build_spec(ad, recipe, cx.ConvertOptions(segment_boundaries=boundaries))
    parts = cx.DecoderParts(ad, recipe, spec, engine.guides, engine.router).eval()
    segments = [cx.Prefill(parts, a, b) for a, b in spec.prefill_segments]
    tails = {layer: cx.Prefill(parts, layer + 1, spec.num_layers, mode="exited")
             for layer in exit_method_names(spec)}
    batch = ad.prepare([prompt], [image])
    ids = batch.input_ids[0]
    start = torch.tensor([int((ids == ad.image_token_id).nonzero()[0])])
    text_ids = ids[ids != ad.image_token_id][None]
    with torch.no_grad():
        state = [cx.TokenEmbedding(parts)(text_ids), cx.VisionEncoder(ad)(batch.pixel_values)]
        exit_layer = None
        for seg in segments:
            state = list(seg(*state, start))
            layer = seg.end - 1
            if layer not in spec.exit_layers:
                continue
            p_exit = None if spec.exit_lookahead and layer in tails else float(state.pop()[0])
            # a frozen exit's run takes the visual states (before this layer's MLP), positions (and sizes)
            frozen = state[1:] if spec.exit_frozen and layer in tails else []
            if spec.kept[layer] == 0:
                continue
            if p_exit is None:  # lookahead: the exit's own run gives the decision
                exited, p_run = tails[layer](state[0], *frozen, start)
                if float(p_run[0]) >= spec.exit_threshold:
                    exit_layer, state = layer, [exited]
                    break
            elif p_exit >= spec.exit_threshold:
                exit_layer = layer
                state = list(tails[layer](state[0], *frozen, start)) if layer in tails else state
                break
        logits = state[0]
        seen = spec.visual_lengths(exit_layer)
        t = text_ids.shape[1]
        step = cx.Decode(parts)(logits.argmax(-1)[:, None], torch.tensor([t + spec.input_visual_tokens]),
                                torch.tensor([t]), torch.tensor(seen))
    return batch, logits, step, exit_layer


def _check(engine: PrunedEngine, images, boundaries=()):
    exits = []
    for prompt, image in zip(PROMPTS, images):
        batch, logits, step, exit_layer = _run_exported_modules(engine, prompt, image, list(boundaries))
        with torch.no_grad():
            pre = engine.prefill(batch)
            ref_step = engine.decode_step(pre.caches, pre.logits.argmax(-1), pre.next_positions)
        assert (logits - pre.logits).abs().max().item() < 1e-4
        assert (step - ref_step).abs().max().item() < 1e-4
        assert exit_layer == pre.kept[0].exit_layer
        exits.append(exit_layer)
    return exits


@pytest.mark.parametrize("scorer, keep, keep_input, combine", [
    ("fitprune", [1.0, 0.5, 0.25, 0.1], 1.0, "product"),
    ("fitprune", [1.0, 0.5, 0.25, 0.1], 1.0, "either"),
    ("fastv", [1.0, 0.3, 0.3, 0.3], 1.0, "product"),
    ("random", [0.9, 0.5, 0.25, 0.1], 1.0, "product"),
    ("pool", [0.25] * 4, 0.25, "product"),
])
def test_in_graph_scorers_match_the_engine(adapter, images, scorer, keep, keep_input, combine):
    prune = PruneSpec(scorer=scorer, keep_after=keep, keep_input=keep_input, fitprune_combine=combine)
    recipe = Recipe(model=adapter.signature(), prune=prune)
    _check(PrunedEngine(adapter, recipe), images)


@pytest.mark.parametrize("scorer, regions, merge", [
    ("fitprune", 2, False),
    ("fitprune", 4, True),
    ("fitprune", 1, True),
    ("fastv", 2, True),
    ("random", 8, True),
])
def test_region_balanced_and_merged_drops_match_the_engine(adapter, images, scorer, regions, merge):
    prune = PruneSpec(scorer=scorer, keep_after=[1.0, 0.5, 0.25, 0.1], fitprune_combine="either",
                      regions=regions, merge=merge)
    _check(PrunedEngine(adapter, Recipe(model=adapter.signature(), prune=prune)), images)


def test_exported_merge_breaks_exact_ties_as_the_engine(adapter):
    """Dropped tokens whose best cosine is shared by several kept tokens (equal states) join the first
    of them, as the engine's argmax does: the export's one-hot has exactly one 1 per dropped token."""
    recipe = Recipe(model=adapter.signature(), prune=PruneSpec(scorer="fitprune", keep_after=[1.0, 0.5, 0.25, 0.1],
                                                               merge=True))
    spec = cx.build_spec(adapter, recipe, cx.ConvertOptions())
    parts = cx.DecoderParts(adapter, recipe, spec, None, None).eval()
    g = torch.Generator().manual_seed(0)
    d = adapter.signature().hidden_size
    distinct = torch.randn(4, d, generator=g)
    # kept: 8 tokens in 4 equal pairs; dropped: 4 parallel to a pair, 3 others
    states = torch.cat([distinct.repeat_interleave(2, 0), 3 * distinct, torch.randn(3, d, generator=g)])[None]
    size = torch.rand(1, states.shape[1], generator=g) + 1
    kept, dropped = torch.arange(8), torch.arange(8, states.shape[1])
    with torch.no_grad():
        merged, total = parts.merge_into_kept(states, size, kept, dropped)
    keep_visual = torch.zeros(1, states.shape[1], dtype=torch.bool)
    keep_visual[0, :8] = True
    ref_states, ref_size = merge_into_kept(states, size, torch.ones_like(keep_visual), keep_visual)
    assert torch.allclose(merged, ref_states[:, :8], atol=1e-6)
    assert torch.allclose(total, ref_size[:, :8])
    assert total.sum().item() == pytest.approx(size.sum().item())  # every dropped token counted once


def test_merged_segments_hand_on_the_sizes(adapter, images):
    prune = PruneSpec(scorer="fitprune", keep_after=[0.6, 0.5, 0.25, 0.1], regions=4, merge=True)
    _check(PrunedEngine(adapter, Recipe(model=adapter.signature(), prune=prune)), images, boundaries=[1, 3])


def test_prefill_split_into_segments_matches(adapter, images):
    prune = PruneSpec(scorer="fitprune", keep_after=[1.0, 0.5, 0.25, 0.1])
    recipe = Recipe(model=adapter.signature(), prune=prune)
    _check(PrunedEngine(adapter, recipe), images, boundaries=[1, 2, 3])


def test_guides_run_in_graph(adapter, images, tmp_path):
    sig = adapter.signature()
    GuideSet(sig.hidden_size, [1, 2], 8).save(tmp_path / "guides.safetensors", sig.num_layers)
    recipe = Recipe(model=sig, prune=PruneSpec(scorer="guide", keep_after=[1.0, 0.5, 0.25, 0.25],
                                               guides=GuideSpec("guides.safetensors", [1, 2], 8)))
    recipe = Recipe.load(recipe.save(tmp_path / "recipe.json"))
    _check(PrunedEngine(adapter, recipe), images)


@pytest.mark.parametrize("text_after", [5, 0])
def test_guide_scores_of_the_exported_prefill_equal_the_engines(adapter, text_after):
    """The export computes only visual rows x text columns, masked by an additive bias; the scores are
    the engine's, also for a prompt with no text after the image (zero context)."""
    sig = adapter.signature()
    guides = GuideSet(sig.hidden_size, [1, 2], 8)
    recipe = Recipe(model=sig, prune=PruneSpec(scorer="guide", keep_after=[1.0, 0.5, 0.25, 0.25],
                                               guides=GuideSpec("guides.safetensors", [1, 2], 8)))
    spec = cx.build_spec(adapter, recipe, cx.ConvertOptions())
    parts = cx.DecoderParts(adapter, recipe, spec, guides).eval()
    torch.manual_seed(0)
    n_vis, t = 40, 9
    x = torch.randn(1, n_vis + t, sig.hidden_size) * 3
    after = torch.arange(t) >= t - text_after
    visual = (torch.arange(n_vis + t) < n_vis)[None]
    text = torch.cat([torch.zeros(n_vis, dtype=torch.bool), after])[None]
    with torch.no_grad():
        for layer in (1, 2):
            got = parts.guide_scores(layer, x[:, :n_vis], x[:, n_vis:], after)
            want = guides.scores(layer, x, visual, text)[0, :n_vis]
            assert got.shape == (n_vis,)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("frozen", [False, True])
def test_exit_router_decides_between_segments(adapter, images, tmp_path, threshold, frozen):
    """With exit.frozen the exited program attends to the frozen visual keys and writes them to the later
    layers' caches, which decode then reads."""
    sig = adapter.signature()
    router = ExitRouter(sig.hidden_size, [1, 2], 8)
    router.reset_parameters(3)
    router.save(tmp_path / "router.safetensors", sig.num_layers)
    recipe = Recipe(model=sig, prune=PruneSpec(scorer="fastv", keep_after=[1.0, 0.5, 0.5, 0.5]),
                    exit=ExitSpec("router.safetensors", [1, 2], threshold, 8, frozen=frozen))
    recipe = Recipe.load(recipe.save(tmp_path / "recipe.json"))
    exits = _check(PrunedEngine(adapter, recipe), images)
    if threshold == 0.0:
        assert exits == [1, 1, 1]
    if threshold == 1.0:  # sigmoid of a small random router never reaches 1
        assert exits == [None, None, None]


@pytest.mark.parametrize("threshold", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("layers", [[1, 2], [1, 3]])
def test_lookahead_router_decides_from_the_exits_own_run(adapter, images, tmp_path, threshold, layers):
    """prefill_exit_<l> runs before the decision and hands back p(exit); a request that stays then runs the
    next segment over the KV entries that run wrote. Candidate 3 is the last layer: its segment decides."""
    sig = adapter.signature()
    router = ExitRouter(sig.hidden_size, layers, 8, lookahead=True)
    router.reset_parameters(3)
    with torch.no_grad():  # make the lookahead statistics matter
        router.w1[:, 2 * sig.hidden_size:] *= 40
    router.save(tmp_path / "router.safetensors", sig.num_layers)
    recipe = Recipe(model=sig, prune=PruneSpec(scorer="fitprune", keep_after=[1.0, 0.5, 0.5, 0.5]),
                    exit=ExitSpec("router.safetensors", layers, threshold, 8, lookahead=True))
    recipe = Recipe.load(recipe.save(tmp_path / "recipe.json"))
    assert cx.build_spec(adapter, recipe, cx.ConvertOptions()).exit_lookahead
    exits = _check(PrunedEngine(adapter, recipe), images)
    if threshold == 0.0:
        assert exits == [1, 1, 1]
    if threshold == 0.3:  # a request that stayed after running prefill_exit_1 exits at the second candidate
        assert exits == [layers[1], None, None]
    if threshold == 1.0:
        assert exits == [None, None, None]


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("lookahead", [False, True])
def test_frozen_exits_on_a_schedule_that_keeps_dropping(adapter, images, tmp_path, merge, lookahead):
    """The schedule drops after the candidates, so later caches need room for more visual keys than their
    attention saw: the text slots move past that room, in prefill and in decode."""
    sig = adapter.signature()
    router = ExitRouter(sig.hidden_size, [0, 1], 8, lookahead=lookahead)
    router.reset_parameters(3)
    router.save(tmp_path / "router.safetensors", sig.num_layers)
    prune = PruneSpec(scorer="fitprune", keep_after=[0.75, 0.5, 0.25, 0.1], merge=merge)
    seen_exits = set()
    for threshold in (0.0, 0.45, 1.0):
        recipe = Recipe(model=sig, prune=prune,
                        exit=ExitSpec("router.safetensors", [0, 1], threshold, 8, lookahead=lookahead, frozen=True))
        recipe = Recipe.load(recipe.save(tmp_path / "recipe.json"))
        spec = cx.build_spec(adapter, recipe, cx.ConvertOptions())
        assert spec.slots == [spec.seen[0], spec.seen[1], spec.kept[0], spec.kept[0]]
        seen_exits.update(_check(PrunedEngine(adapter, recipe), images))
    assert {0, None} <= seen_exits


def test_stable_selection_breaks_ties_towards_the_earlier_token():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.9, 0.5])
    assert cx.Prefill._select(scores, 3).tolist() == [0, 1, 4]
    np.testing.assert_array_equal(cx.Prefill._select(torch.zeros(5), 2).numpy(), [0, 1])
    assert cx.Prefill._select(scores, 0).tolist() == []


def test_selection_matches_the_engines_stable_sort_with_many_ties():
    from edge_prune.scoring import select_visual

    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        scores = torch.randint(0, 4, (n,), generator=gen).float() / 3  # few distinct values: many ties
        count = int(torch.randint(1, n + 1, (1,), generator=gen))
        keep = select_visual(scores[None], torch.ones(1, n, dtype=torch.bool), [count])[0]
        assert cx.Prefill._select(scores, count).tolist() == keep.nonzero()[:, 0].tolist(), (trial, scores, count)


@pytest.mark.parametrize("regions", [2, 4, 8])
def test_round_robin_selection_matches_the_engines_with_many_ties(regions):
    from edge_prune.scoring import grid_regions, select_visual

    gen = torch.Generator().manual_seed(regions)
    region_ids = grid_regions(torch.arange(64)[None], 64, regions)
    for trial in range(100):
        scores = torch.randint(0, 4, (64,), generator=gen).float() / 3
        count = int(torch.randint(1, 65, (1,), generator=gen))
        keep = select_visual(scores[None], torch.ones(1, 64, dtype=torch.bool), [count], region_ids)[0]
        got = cx.Prefill._select(scores, count, region_ids[0].float())
        assert got.tolist() == keep.nonzero()[:, 0].tolist(), (trial, scores, count)
        # the first drop's shortcut over the whole grid (regions a fixed partition) keeps the same tokens
        whole_grid = cx.Prefill._grid_round_robin_mask(scores, count, 8, regions)
        assert whole_grid.bool().tolist() == keep.tolist(), (trial, scores, count)
