"""LVPruning-style guides: recipe contract, engine == slow reference, cost, bad files, and training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edge_prune.cost import estimate, prefill_breakdown
from edge_prune.engine import PrunedEngine
from edge_prune.errors import RecipeError
from edge_prune.models.adapter import LlavaAdapter
from edge_prune.recipe import GuideSpec, PruneSpec, Recipe
from edge_prune.scoring import GuideSet
from tests.conftest import PROMPTS
from tests.reference import reference_logits

KEEP = [1.0, 0.5, 0.25, 0.1]  # tiny models have 4 decoder layers; drops after layers 1, 2, 3
LAYERS = [1, 2, 3]
RANK = 4


def guide_recipe(adapter: LlavaAdapter, folder: Path, seed: int = 3, keep=KEEP, layers=LAYERS,
                 rank: int = RANK) -> Path:
    """Random (untrained) guides saved beside a recipe: enough to check the engine's semantics."""
    sig = adapter.signature()
    guides = GuideSet(sig.hidden_size, layers, rank)
    guides.reset_parameters(seed)
    guides.save(folder / "guides.safetensors", sig.num_layers)
    recipe = Recipe(model=sig, prune=PruneSpec(scorer="guide", keep_after=list(keep),
                                                guides=GuideSpec("guides.safetensors", list(layers), rank)))
    return recipe.save(folder / "recipe.json")


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return LlavaAdapter.load(tiny_llava_dir)


@pytest.fixture(scope="module")
def llava_next(tiny_next_dir):
    return LlavaAdapter.load(tiny_next_dir)


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_guide_pruning_matches_slow_reference(kind, batch_size, llava, llava_next, images, tmp_path):
    adapter = llava if kind == "llava" else llava_next
    path = guide_recipe(adapter, tmp_path)
    recipe = Recipe.load(path)
    engine = PrunedEngine(adapter, recipe)
    batch = adapter.prepare(PROMPTS[:batch_size], images[:batch_size])
    steps = 3
    ref, alive = reference_logits(adapter, recipe, batch, steps=steps,
                                  guides=load_file(tmp_path / "guides.safetensors"))
    pre = engine.prefill(batch)
    assert (pre.logits - ref[0]).abs().max().item() <= 1e-4
    token, pos = pre.logits.argmax(-1), pre.next_positions.clone()
    for step in range(1, steps):
        logits = engine.decode_step(pre.caches, token, pos)
        pos += 1
        assert (logits - ref[step]).abs().max().item() <= 1e-4
        token = logits.argmax(-1)
    for b, kept in enumerate(pre.kept):
        assert kept.per_layer == [round(k * kept.visual_tokens) for k in KEEP]
        assert alive[b] == [kept.visual_tokens, *kept.per_layer[:-1]]


def test_guides_rank_tokens_by_the_question(llava, images, tmp_path):
    """The same image under two questions keeps different tokens: the guides read the text."""
    engine = PrunedEngine(llava, Recipe.load(guide_recipe(llava, tmp_path)))
    kept = []
    for prompt in PROMPTS[:2]:
        ws = engine.initial_working_set(*llava.embed(batch := llava.prepare([prompt], images[:1]),
                                                     llava.image_features(batch)), batch.attention_mask.bool())
        scores = engine.guides.scores(1, ws.hidden, ws.visual, ws.text_after)
        order = scores[0][ws.visual[0]].argsort(descending=True)
        kept.append(set(order[:32].tolist()))  # visual-token indices (the image comes first in both)
    assert kept[0] != kept[1]


def test_recipe_with_guides_round_trips(llava, tmp_path):
    path = guide_recipe(llava, tmp_path / "a")
    data = json.loads(path.read_text())
    assert data["prune"]["scorer"] == "guide"
    assert data["prune"]["guides"] == {"file": "guides.safetensors", "layers": LAYERS, "rank": RANK}
    recipe = Recipe.load(path)
    # Saving elsewhere copies the module file, so a recipe folder stays self-contained.
    moved = recipe.save(tmp_path / "b" / "recipe.json")
    assert (tmp_path / "b" / "guides.safetensors").read_bytes() == (tmp_path / "a" / "guides.safetensors").read_bytes()
    assert Recipe.load(moved).to_dict() == recipe.to_dict()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["prune"].update(guides=None), "'guide' but 'prune.guides' is null"),
        (lambda d: d["prune"].update(scorer="fastv"), "'prune.guides' is set but 'prune.scorer' is 'fastv'"),
        (lambda d: d["prune"]["guides"].update(layers=[1, 2]), r"drops tokens at layers \[3\]"),
        (lambda d: d["prune"]["guides"].update(layers=[1, 2, 7]), r"layer indices in \[0, 3\]"),
        (lambda d: d["prune"]["guides"].update(layers=[2, 1, 3]), "strictly increasing"),
        (lambda d: d["prune"]["guides"].update(rank=0), "'prune.guides.rank' is 0"),
        (lambda d: d["prune"]["guides"].update(file="../elsewhere.safetensors"), "relative to the recipe"),
        (lambda d: d["prune"]["guides"].update(file="missing.safetensors"), "missing.safetensors.*does not exist"),
        (lambda d: d["prune"]["guides"].pop("rank"), r"missing keys \['rank'\]"),
    ],
)
def test_bad_guide_fields_name_the_field(llava, tmp_path, mutate, message):
    data = json.loads(guide_recipe(llava, tmp_path).read_text())
    mutate(data)
    (tmp_path / "recipe.json").write_text(json.dumps(data))
    with pytest.raises(RecipeError, match=message):
        Recipe.load(tmp_path / "recipe.json")


def test_guide_file_that_does_not_match_the_model_or_recipe(llava, tmp_path):
    path = guide_recipe(llava, tmp_path)
    sig = llava.signature()
    GuideSet(sig.hidden_size * 2, LAYERS, RANK).save(tmp_path / "guides.safetensors", sig.num_layers)
    with pytest.raises(RecipeError, match=r"guides.safetensors: the guides were trained for another model: hidden "
                                          r"size 128 \(model has 64\)"):
        PrunedEngine(llava, Recipe.load(path))
    GuideSet(sig.hidden_size, LAYERS, RANK).save(tmp_path / "guides.safetensors", 12)
    with pytest.raises(RecipeError, match=r"12 decoder layers \(model has 4\)"):
        PrunedEngine(llava, Recipe.load(path))
    GuideSet(sig.hidden_size, [1, 2, 3], RANK * 2).save(tmp_path / "guides.safetensors", sig.num_layers)
    with pytest.raises(RecipeError, match=r"holds layers \[1, 2, 3\] at rank 8, but the recipe expects layers "
                                          r"\[1, 2, 3\] at rank 4"):
        PrunedEngine(llava, Recipe.load(path))
    (tmp_path / "guides.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + b"0" * 64)
    with pytest.raises(RecipeError, match="guides.safetensors: not a readable safetensors guides file"):
        PrunedEngine(llava, Recipe.load(path))
    from safetensors.torch import save_file

    save_file({"wq": torch.zeros(1)}, str(tmp_path / "guides.safetensors"), metadata={"format": "other"})
    with pytest.raises(RecipeError, match="metadata 'format' is 'other', expected 'edge-prune-guides'"):
        PrunedEngine(llava, Recipe.load(path))


def test_cost_counts_the_guides(llava, tmp_path):
    recipe = Recipe.load(guide_recipe(llava, tmp_path))
    shape = llava.shape
    text = 20
    parts = prefill_breakdown(shape, recipe, text)
    d, r = shape.hidden_size, RANK
    n_in = [64, 32, 16]  # visual tokens entering the drops at layers 1, 2, 3
    macs = sum(n * d * r + 2 * text * d * r + 2 * n * text * r + n * r for n in n_in)
    assert parts["guides"] == 2 * macs and parts["exit_router"] == 0
    same_schedule = Recipe(model=recipe.model, prune=PruneSpec(scorer="fitprune", keep_after=KEEP))
    assert estimate(shape, recipe, text_tokens=text).pruned_flops == (
        estimate(shape, same_schedule, text_tokens=text).pruned_flops + 2 * macs)
    # Paper accountings print no term for the guides.
    assert prefill_breakdown(shape, recipe, text, "fitprune")["guides"] == 0
