"""Bad input gets a clear error naming the problem, from the library and from the CLI (exit code 2)."""

from __future__ import annotations

import json

import pytest
import torch

from edge_prune.cli import main
from edge_prune.engine import PrunedEngine
from edge_prune.errors import InputError, ModelError, RecipeError
from edge_prune.models.adapter import LlavaAdapter
from edge_prune.recipe import ModelSignature, PruneSpec, Recipe


def test_missing_model_dir(tmp_path, capsys):
    with pytest.raises(ModelError, match="model directory not found"):
        LlavaAdapter.load(tmp_path / "nope")
    assert main(["run", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "not found" in capsys.readouterr().err


def test_non_llava_checkpoint(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      vocab_size=100)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(ModelError, match="LlamaForCausalLM.*supported architectures: LlavaForConditionalGeneration"):
        LlavaAdapter.load(tmp_path / "llama")
    assert main(["inspect", str(tmp_path / "llama")]) == 2
    assert "LlamaForCausalLM" in capsys.readouterr().err


def test_recipe_for_another_model(tiny_llava_dir, tmp_path, capsys):
    other = ModelSignature("LlavaForConditionalGeneration", 32, 4096, 11008, 32, 32, 576)
    path = Recipe.identity(other).save(tmp_path / "7b.json")
    with pytest.raises(RecipeError, match="fitted for another model"):
        PrunedEngine.load(tiny_llava_dir, recipe=path)
    assert main(["run", str(tiny_llava_dir), "--prompt", "hi", "--recipe", str(path)]) == 2
    assert "fitted for another model" in capsys.readouterr().err


def test_malformed_recipe_json_via_cli(tiny_llava_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["run", str(tiny_llava_dir), "--prompt", "hi", "--recipe", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_keep_fraction_out_of_range(tiny_llava_dir, tmp_path):
    data = Recipe.identity(LlavaAdapter.load(tiny_llava_dir).signature()).to_dict()
    data["prune"].update(scorer="fastv", keep_after=[1.0, 1.0, 1.2, 0.5])
    (tmp_path / "r.json").write_text(json.dumps(data))
    with pytest.raises(RecipeError, match=r"keep_after\[2\]' is 1.2"):
        PrunedEngine.load(tiny_llava_dir, recipe=tmp_path / "r.json")


def test_image_of_the_wrong_size(tiny_llava_dir, images):
    from PIL import Image

    engine = PrunedEngine.load(tiny_llava_dir)
    with pytest.raises(InputError, match="image is 2x2 pixels"):
        engine.generate("what?", Image.new("RGB", (2, 2)))
    batch = engine.adapter.prepare(["what?"], images[:1])
    batch.pixel_values = torch.zeros(1, 3, 20, 20)
    with pytest.raises(InputError, match=r"pixel_values has shape \(1, 3, 20, 20\); this model expects \(batch, 3, 32, 32\)"):
        engine.prefill(batch)


def test_unreadable_or_missing_image(tiny_llava_dir, tmp_path, capsys):
    (tmp_path / "x.png").write_text("not a png")
    engine = PrunedEngine.load(tiny_llava_dir)
    with pytest.raises(InputError, match="not a readable image"):
        engine.generate("what?", tmp_path / "x.png")
    assert main(["run", str(tiny_llava_dir), "--prompt", "what?", "--image", str(tmp_path / "missing.png")]) == 2
    assert "image file not found" in capsys.readouterr().err


def test_prompt_without_image_is_not_pruned(tiny_llava_dir):
    engine = PrunedEngine.load(tiny_llava_dir)
    sig = engine.adapter.signature()
    recipe = Recipe(model=sig, prune=PruneSpec(scorer="fitprune", keep_after=[0.5, 0.5, 0.1, 0.1]))
    out = PrunedEngine(engine.adapter, recipe).generate("no picture here", max_new_tokens=2)
    assert out.kept[0].visual_tokens == 0
    assert out.tokens == engine.generate("no picture here", max_new_tokens=2).tokens
