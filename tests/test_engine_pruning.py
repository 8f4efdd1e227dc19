"""Pruned prefill/decode equals an independent slow reference, and drops what the recipe says."""

from __future__ import annotations

import pytest
import torch

from edge_prune.engine import PrunedEngine
from edge_prune.models.adapter import LlavaAdapter
from edge_prune.recipe import PruneSpec, Recipe
from tests.conftest import PROMPTS
from tests.reference import reference_logits

SCHEDULE = [1.0, 0.5, 0.25, 0.1]  # tiny models have 4 decoder layers


def _recipe(adapter: LlavaAdapter, scorer: str, keep=SCHEDULE, **kw) -> Recipe:
    return Recipe(model=adapter.signature(), prune=PruneSpec(scorer=scorer, keep_after=list(keep), **kw))


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return LlavaAdapter.load(tiny_llava_dir)


@pytest.fixture(scope="module")
def llava_next(tiny_next_dir):
    return LlavaAdapter.load(tiny_next_dir)


@pytest.mark.parametrize("scorer", ["fastv", "fitprune", "fitprune-either", "random"])
@pytest.mark.parametrize("kind", ["llava", "llava_next"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_pruned_engine_matches_slow_reference(scorer, kind, batch_size, llava, llava_next, images):
    adapter = llava if kind == "llava" else llava_next
    scorer, _, combine = scorer.partition("-")
    recipe = _recipe(adapter, scorer, fitprune_combine=combine or "product")
    engine = PrunedEngine(adapter, recipe)
    prompts, imgs = PROMPTS[:batch_size], images[:batch_size]
    batch = adapter.prepare(prompts, imgs)
    steps = 4
    ref_logits, ref_alive = reference_logits(adapter, recipe, batch, steps=steps)
    pre = engine.prefill(batch)
    assert (pre.logits - ref_logits[0]).abs().max().item() <= 1e-4
    token, pos = pre.logits.argmax(-1), pre.next_positions.clone()
    for step in range(1, steps):
        logits = engine.decode_step(pre.caches, token, pos)
        pos += 1
        assert (logits - ref_logits[step]).abs().max().item() <= 1e-4
        token = logits.argmax(-1)
    for b, kept in enumerate(pre.kept):
        n = kept.visual_tokens
        assert kept.per_layer == [round(k * n) for k in SCHEDULE]
        # Layer i's attention saw what entered it: the reference logged those counts.
        assert ref_alive[b] == [n, *kept.per_layer[:-1]]


def test_kv_cache_holds_what_each_layer_saw_and_positions_are_kept(llava, images):
    recipe = _recipe(llava, "fitprune")
    batch = llava.prepare(PROMPTS[:1], images[:1])
    pre = PrunedEngine(llava, recipe).prefill(batch)
    n_text = int(batch.attention_mask.sum()) - 64
    seen = [64, *pre.kept[0].per_layer[:-1]]
    assert [int(c.valid.sum()) for c in pre.caches] == [n_text + s for s in seen]
    # Positions continue from the original prompt length, not the pruned length.
    assert int(pre.next_positions[0]) == int(batch.attention_mask.sum())


def test_keep_everything_recipe_is_identity(llava, images):
    recipe = _recipe(llava, "fastv", keep=[1.0] * 4)
    batch = llava.prepare(PROMPTS[:2], images[:2])
    a = PrunedEngine(llava, recipe).prefill(batch).logits
    b = PrunedEngine(llava).prefill(batch).logits
    assert torch.equal(a, b)


def test_skip_attention_layer_holds_no_cache(llava, images):
    recipe = Recipe(model=llava.signature(), prune=PruneSpec(scorer="none", keep_after=[1.0] * 4),
                    skip_attention=[3])
    engine = PrunedEngine(llava, recipe)
    pre = engine.prefill(llava.prepare(PROMPTS[:1], images[:1]))
    assert pre.caches[3] is None and all(c is not None for c in pre.caches[:3])
    full = PrunedEngine(llava).prefill(llava.prepare(PROMPTS[:1], images[:1]))
    assert not torch.allclose(pre.logits, full.logits)
    out = engine.generate(PROMPTS[0], images[0], max_new_tokens=3)
    assert len(out.tokens[0]) >= 1


def test_pool_reduces_before_the_decoder(llava, images):
    """Pooling 8x8 -> 4x4 equals feeding the pooled embeddings to transformers with consecutive positions."""
    recipe = _recipe(llava, "pool", keep=[0.25] * 4, keep_input=0.25)
    batch = llava.prepare(PROMPTS[:1], images[:1])
    pre = PrunedEngine(llava, recipe).prefill(batch)
    assert pre.kept[0].entered_decoder == 16 and pre.kept[0].per_layer == [16] * 4
    feats = llava.image_features(batch)  # [64, d]
    d = feats.shape[-1]
    pooled = torch.nn.functional.avg_pool2d(feats.T.reshape(1, d, 8, 8), 2).reshape(d, 16).T
    embeds, visual = llava.embed(batch, feats)
    idx = visual[0].nonzero()[:, 0]
    new = torch.cat([embeds[0, : idx[0]], pooled, embeds[0, idx[-1] + 1:]])[None]
    with torch.no_grad():
        out = llava.model.model.language_model(inputs_embeds=new)
        ref = llava.lm_head(out.last_hidden_state[:, -1])
    assert (pre.logits - ref).abs().max().item() <= 1e-4


def test_fewer_tokens_change_the_answer_distribution_differently_per_scorer(llava, images):
    batch = llava.prepare(PROMPTS[:1], images[:1])
    outs = {s: PrunedEngine(llava, _recipe(llava, s)).prefill(batch).logits for s in ("fastv", "fitprune", "random")}
    assert not torch.allclose(outs["fastv"], outs["fitprune"])
    assert not torch.allclose(outs["fastv"], outs["random"])


@pytest.mark.parametrize("scorer", ["fitprune", "random"])
def test_regions_keep_every_region_its_share_at_every_layer(scorer, llava, images):
    """prune.regions = 2 on the tiny model's 8 x 8 grid: after each drop each quarter of the image holds
    floor or ceil of count / 4 visual tokens, for every request of a batch whose prompts differ in length."""
    recipe = _recipe(llava, scorer, keep=[0.5, 0.25, 0.125, 0.0625], regions=2)
    engine = PrunedEngine(llava, recipe)
    batch = llava.prepare(PROMPTS, images)
    embeds, visual = llava.embed(batch, llava.image_features(batch))
    ws = engine.initial_working_set(embeds, visual, batch.attention_mask.bool())
    for i, layer in enumerate(llava.layers):
        ws, _ = engine.attend_and_drop(layer, i, ws, [round(recipe.prune.keep_after[i] * 64)] * len(PROMPTS))
        for b in range(len(PROMPTS)):
            grid = ws.positions[b][ws.visual[b]] - int(ws.image_start[b])
            quarters = (grid // 8 // 4) * 2 + (grid % 8) // 4
            count = int(ws.visual[b].sum())
            assert torch.bincount(quarters, minlength=4).tolist() == [count // 4] * 4  # counts are multiples of 4
        ws.hidden = ws.hidden + layer.mlp(layer.post_attention_layernorm(ws.hidden))


def test_region_ranking_is_independent_of_the_batch(llava, images):
    recipe = _recipe(llava, "fitprune", regions=4)
    engine = PrunedEngine(llava, recipe)
    together = engine.prefill(llava.prepare(PROMPTS, images)).logits
    for b in range(len(PROMPTS)):
        alone = engine.prefill(llava.prepare(PROMPTS[b:b + 1], images[b:b + 1])).logits
        assert (alone[0] - together[b]).abs().max().item() <= 1e-4
    # and it is a different selection from the global ranking's
    plain = PrunedEngine(llava, _recipe(llava, "fitprune")).prefill(llava.prepare(PROMPTS, images)).logits
    assert (plain - together).abs().max().item() > 1e-4


def test_merging_keeps_every_dropped_token_counted_and_decode_attends_as_prefill(llava, images):
    """With prune.merge the kept visual tokens stand for all the image's tokens at every layer (sizes sum
    to n_visual), and a decode step over the cache (log sizes included) gives the logits a fresh prefill
    of the prompt plus the generated tokens gives (random ranking: the drops do not depend on the text)."""
    recipe = _recipe(llava, "random", merge=True)
    engine = PrunedEngine(llava, recipe)
    batch = llava.prepare(PROMPTS[:1], images[:1])
    embeds, visual = llava.embed(batch, llava.image_features(batch))
    ws = engine.initial_working_set(embeds, visual, batch.attention_mask.bool())
    for i, layer in enumerate(llava.layers):
        ws, _ = engine.attend_and_drop(layer, i, ws, [round(SCHEDULE[i] * 64)])
        if ws.size is not None:
            assert float(ws.size[ws.visual].sum()) == pytest.approx(64.0)
        ws.hidden = ws.hidden + layer.mlp(layer.post_attention_layernorm(ws.hidden))
    assert ws.size is not None and float(ws.size[ws.visual].max()) > 1

    pre = engine.prefill(batch)
    token, pos = pre.logits.argmax(-1), pre.next_positions.clone()
    generated = []
    for _ in range(2):
        generated.append(token)
        logits = engine.decode_step(pre.caches, token, pos)
        pos += 1
        token = logits.argmax(-1)
    ids = torch.cat([batch.input_ids, torch.stack(generated, 1)], dim=1)
    longer = type(batch)(ids, torch.ones_like(ids), batch.pixel_values, batch.image_sizes)
    assert (engine.prefill(longer).logits - logits).abs().max().item() <= 1e-4
    # and merging changes the answer distribution against discarding the same tokens
    plain = PrunedEngine(llava, _recipe(llava, "random")).prefill(batch).logits
    assert (plain - pre.logits).abs().max().item() > 1e-4


def test_a_score_hook_reranks_the_drops_under_the_recipes_schedule(llava, images):
    """benchmarks/drop_ceiling.py ranks by the scene's labels through `score_hook`: the hook sees the
    tokens' grid indices and its scores decide which tokens stay, at the recipe's counts."""
    engine = PrunedEngine(llava, _recipe(llava, "fitprune", keep=[0.25] * 4))
    seen_grid = []

    def last_rows_first(ctx, scores):
        seen_grid.append(ctx.grid_index[ctx.visual].tolist())
        return torch.where(ctx.visual, ctx.grid_index.float(), scores)

    engine.score_hook = last_rows_first
    batch = llava.prepare(PROMPTS[:1], images[:1])
    embeds, visual = llava.embed(batch, llava.image_features(batch))
    ws = engine.initial_working_set(embeds, visual, batch.attention_mask.bool())
    ws, _ = engine.attend_and_drop(llava.layers[0], 0, ws, [16])
    assert seen_grid == [list(range(64))]
    assert ws.grid_index()[ws.visual].tolist() == list(range(48, 64))
