"""With a keep-everything recipe the engine is the model: same tokens and logits as transformers."""

from __future__ import annotations

import pytest
import torch

from edge_prune.engine import PrunedEngine
from edge_prune.models.tiny import TinySpec, write_tiny_llava
from tests.conftest import PROMPTS

NEW_TOKENS = 32


def _hf_generate(engine: PrunedEngine, prompts, images):
    batch = engine.adapter.prepare(prompts, images)
    out = engine.adapter.model.generate(
        **batch.model_inputs(), max_new_tokens=NEW_TOKENS, do_sample=False,
        output_scores=True, return_dict_in_generate=True,
    )
    return out.sequences[:, batch.input_ids.shape[1]:], torch.stack(out.scores, 1)


def _engine_generate_with_scores(engine: PrunedEngine, prompts, images):
    """Greedy decode through the engine's own prefill/decode_step, keeping every step's logits."""
    batch = engine.adapter.prepare(prompts, images)
    pre = engine.prefill(batch)
    logits, tokens = [pre.logits], [pre.logits.argmax(-1)]
    pos = pre.next_positions.clone()
    for _ in range(NEW_TOKENS - 1):
        step = engine.decode_step(pre.caches, tokens[-1], pos)
        pos += 1
        logits.append(step)
        tokens.append(step.argmax(-1))
    return torch.stack(tokens, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_identity_recipe_matches_transformers_generate(kind, batch_size, tiny_llava_dir, tiny_next_dir, images):
    engine = PrunedEngine.load(tiny_llava_dir if kind == "llava" else tiny_next_dir)
    prompts, imgs = PROMPTS[:batch_size], images[:batch_size]
    with torch.no_grad():
        hf_tokens, hf_logits = _hf_generate(engine, prompts, imgs)
        ours_tokens, ours_logits = _engine_generate_with_scores(engine, prompts, imgs)
    # HF stops early only when every row hit EOS; compare the steps both produced.
    steps = hf_tokens.shape[1]
    assert torch.equal(ours_tokens[:, :steps], hf_tokens)
    assert (ours_logits[:, :steps] - hf_logits).abs().max().item() <= 1e-4
    # The public generate() agrees with the step-by-step path.
    result = engine.generate(prompts, imgs, max_new_tokens=NEW_TOKENS)
    for b in range(batch_size):
        assert result.tokens[b] == ours_tokens[b, : len(result.tokens[b])].tolist()


@pytest.mark.parametrize("decoder", ["mistral", "qwen2"])
def test_other_decoders_match_transformers(decoder, tmp_path, images):
    model_dir = write_tiny_llava(tmp_path / decoder, TinySpec(text_model_type=decoder, num_key_value_heads=1))
    engine = PrunedEngine.load(model_dir)
    with torch.no_grad():
        hf_tokens, hf_logits = _hf_generate(engine, PROMPTS[:2], images[:2])
        ours_tokens, ours_logits = _engine_generate_with_scores(engine, PROMPTS[:2], images[:2])
    steps = hf_tokens.shape[1]
    assert torch.equal(ours_tokens[:, :steps], hf_tokens)
    assert (ours_logits[:, :steps] - hf_logits).abs().max().item() <= 1e-4


def test_prompt_without_image_runs_unpruned(tiny_llava_dir):
    from edge_prune.recipe import PruneSpec, Recipe

    engine = PrunedEngine.load(tiny_llava_dir)
    sig = engine.adapter.signature()
    pruning = Recipe(model=sig, prune=PruneSpec(scorer="fastv", keep_after=[1.0, 0.5, 0.25, 0.1]))
    plain = engine.generate("tell me a story", max_new_tokens=4)
    pruned = PrunedEngine(engine.adapter, pruning).generate("tell me a story", max_new_tokens=4)
    assert plain.tokens == pruned.tokens
    assert pruned.kept[0].visual_tokens == 0 and pruned.kept[0].per_layer == [0, 0, 0, 0]


def test_sampling_is_reproducible_by_seed(tiny_llava_dir, images):
    engine = PrunedEngine.load(tiny_llava_dir)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95, top_k=50)
    a = engine.generate(PROMPTS[0], images[0], seed=1, **kw)
    b = engine.generate(PROMPTS[0], images[0], seed=1, **kw)
    c = engine.generate(PROMPTS[0], images[0], seed=2, **kw)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
