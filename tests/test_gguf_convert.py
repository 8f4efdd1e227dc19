"""`convert_gguf`: the llama.cpp pair, its metadata and tokenizer, quantization, and atomic artifacts.

transformers' own GGUF reader (`gguf_file=`) is the independent second reader of the language model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader, TokenType

from edge_prune.converters import gguf as conv
from edge_prune.errors import ArtifactError, ModelError, RecipeError
from edge_prune.models.tiny import TinySpec, write_tiny_llava
from edge_prune.recipe import PruneSpec, Recipe
from edge_prune.runtimes import llamacpp_keys as K
from edge_prune.runtimes import read_manifest
from edge_prune.runtimes.manifest import CONFIG_FILE


@pytest.fixture(scope="module")
def f16_artifact(tiny_llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "f16"
    conv.convert_gguf(tiny_llava_dir, out, quant="f16", progress=False)
    return out


def _fields(path):
    reader = GGUFReader(str(path))
    return reader, {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def test_artifact_layout_and_manifest(f16_artifact, tiny_llava_dir):
    manifest = read_manifest(f16_artifact)  # verifies every checksum
    assert manifest.backend == "llamacpp" and manifest.quant == "f16"
    assert set(manifest.files) == {K.LM_FILE, K.MMPROJ_FILE, K.RECIPE_FILE, CONFIG_FILE}
    assert (f16_artifact / CONFIG_FILE).read_bytes() == (tiny_llava_dir / CONFIG_FILE).read_bytes()
    assert manifest.versions["gguf"]
    assert not [p for p in f16_artifact.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_language_model_metadata_carries_recipe_and_tokenizer(f16_artifact, tiny_llava_dir):
    from transformers import AutoTokenizer

    _, meta = _fields(f16_artifact / K.LM_FILE)
    assert meta["general.architecture"] == "llama"
    recipe = Recipe.from_dict(json.loads(meta[K.KEY_RECIPE]))
    assert recipe.to_dict() == Recipe.load(f16_artifact / K.RECIPE_FILE).to_dict()
    assert meta[K.KEY_PAIR_ID] == read_manifest(f16_artifact).extra["pair_id"]
    tok = AutoTokenizer.from_pretrained(tiny_llava_dir)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert tokens[: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    image_id = tok.convert_tokens_to_ids("<image>")
    assert meta[K.KEY_IMAGE_TOKEN_ID] == image_id and types[image_id] == TokenType.CONTROL
    assert types[tok.convert_tokens_to_ids("a")] == TokenType.NORMAL
    assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_token_id and meta["tokenizer.ggml.add_bos_token"] is True
    merges = json.loads((tiny_llava_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert len(meta["tokenizer.ggml.merges"]) == len(merges)
    assert "<image>" in meta["tokenizer.chat_template"]


def test_mmproj_is_llamacpp_llava_format(f16_artifact):
    reader, meta = _fields(f16_artifact / K.MMPROJ_FILE)
    assert meta["general.architecture"] == "clip" and meta["clip.projector_type"] == "mlp"
    assert meta["clip.vision.block_count"] == 1  # vision_feature_layer -2 of a 2-layer tower
    assert list(meta[K.KEY_CLIP_FEATURE_LAYER]) == [1]
    names = {t.name for t in reader.tensors}
    assert {"v.patch_embd.weight", "v.position_embd.weight", "v.pre_ln.weight", "v.blk.0.attn_q.weight",
            "v.blk.0.ffn_up.weight", "mm.0.weight", "mm.2.bias"} <= names
    assert "v.class_embd" not in names and "v.blk.1.attn_q.weight" not in names and "v.post_ln.weight" not in names
    pos = next(t for t in reader.tensors if t.name == "v.position_embd.weight")
    assert tuple(int(x) for x in pos.shape) == (32, 64)  # patch rows only: 8x8 patches, no CLS row


def test_rope_permutation_pairs_adjacent_rows():
    # rows of one head: [a0 a1 | b0 b1] (HF pairs a_i with b_i) -> [a0 b0 a1 b1] (GGML pairs neighbours)
    w = np.arange(8, dtype=np.float32)[:, None]
    out = conv.llama_rope_permute(w, n_head=2)[:, 0]
    assert out.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("quant, tol", [("f16", 2e-2), ("q8_0", 6e-2)])
def test_transformers_reads_the_language_model_back(tiny_llava_dir, tmp_path, quant, tol):
    """A second, independent GGUF reader (transformers) gets the original model's logits back."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    out = tmp_path / quant
    conv.convert_gguf(tiny_llava_dir, out, quant=quant, progress=False)
    _, meta = _fields(out / K.LM_FILE)
    reader = GGUFReader(str(out / K.LM_FILE))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == quant.upper() and types["blk.0.attn_norm.weight"] == "F32"
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file=K.LM_FILE, dtype=torch.float32).eval()
    ref = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 17, 60, 99, 150, 200, 250, 33, 8, 40]])
    with torch.no_grad():
        a = ref(input_ids=ids).logits
        b = back(input_ids=ids).logits
    rel = float((a - b).abs().max() / a.abs().max())
    assert rel < tol, f"{quant}: max |logit diff| is {rel:.4f} of the logit range"
    assert torch.equal(a.argmax(-1), b.argmax(-1)) or quant != "f16"


def test_q4_0_keeps_output_matrix_at_q8_0(tiny_llava_dir, tmp_path):
    result = conv.convert_gguf(tiny_llava_dir, tmp_path / "q4", quant="q4_0", progress=False)
    reader = GGUFReader(str(tmp_path / "q4" / K.LM_FILE))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_up.weight"] == "Q4_0" and types["output.weight"] == "Q8_0"
    assert result.tensor_types[K.MMPROJ_FILE].keys() <= {"F16", "F32"}


def test_recipe_travels_inside_the_gguf(tiny_llava_dir, tmp_path):
    from edge_prune.models.shapes import load_shape

    sig = load_shape(tiny_llava_dir).signature()
    recipe = Recipe(model=sig, prune=PruneSpec(scorer="pool", keep_input=0.25, keep_after=[0.25] * sig.num_layers))
    conv.convert_gguf(tiny_llava_dir, tmp_path / "a", recipe=recipe, progress=False)
    _, meta = _fields(tmp_path / "a" / K.LM_FILE)
    assert Recipe.from_dict(json.loads(meta[K.KEY_RECIPE])).prune.keep_input == 0.25


def test_bad_inputs_are_named(tiny_llava_dir, tmp_path):
    with pytest.raises(ArtifactError, match="--quant 'q3_k'"):
        conv.convert_gguf(tiny_llava_dir, tmp_path / "x", quant="q3_k", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not an edge-prune artifact"):
        conv.convert_gguf(tiny_llava_dir, tmp_path / "busy", progress=False)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]  # left untouched
    qwen = write_tiny_llava(tmp_path / "qwen", TinySpec(text_model_type="qwen2"))
    with pytest.raises(ModelError, match="qwen2"):
        conv.convert_gguf(qwen, tmp_path / "q", progress=False)
    other = write_tiny_llava(tmp_path / "wide", TinySpec(hidden_size=96, intermediate_size=192))
    from edge_prune.models.shapes import load_shape

    with pytest.raises(RecipeError, match="fitted for another model"):
        conv.convert_gguf(tiny_llava_dir, tmp_path / "r", recipe=Recipe.identity(load_shape(other).signature()),
                          progress=False)


def test_interrupted_convert_leaves_the_old_artifact(f16_artifact, tiny_llava_dir, tmp_path, monkeypatch):
    import shutil

    target = tmp_path / "art"
    shutil.copytree(f16_artifact, target)
    before = read_manifest(target).files

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(conv, "_write_mmproj", boom)
    with pytest.raises(ArtifactError, match="--overwrite"):
        conv.convert_gguf(tiny_llava_dir, target, quant="q8_0", progress=False)
    with pytest.raises(RuntimeError, match="disk full"):
        conv.convert_gguf(tiny_llava_dir, target, quant="q8_0", overwrite=True, progress=False)
    assert read_manifest(target).files == before and read_manifest(target).quant == "f16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
