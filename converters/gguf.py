"""Convert a LLaVA checkpoint and its recipe into a llama.cpp artifact: model.gguf + mmproj.gguf.

The language model becomes a llama-architecture GGUF with its byte-level BPE tokenizer (as
llama.cpp's gpt2-style vocab + merges) and the recipe as `edge_prune.*` metadata keys; the CLIP
tower and the 2-layer MLP projector become an mmproj GGUF in llama.cpp's multimodal format
(`clip.*` keys, projector type `mlp`, `v.*`/`mm.*` tensors). Both are written with gguf-py's
GGUFWriter and load in stock llama.cpp as an ordinary LLaVA pair.

Quantization: f16 and Q8_0/Q4_0 through gguf-py (`gguf.quants`); Q4_K_M through llama.cpp's own
quantizer (`llama_model_quantize`, from llama-cpp-python). The mmproj always stays f16:
llama.cpp's clip graph needs its patch convolution in f16/f32, and the tower is a small share of
the weights while quantizing it moves every visual token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from edge_prune.converters.artifact import ArtifactWriter
from edge_prune.errors import ArtifactError, ModelError
from edge_prune.models.shapes import ModelShape, load_shape
from edge_prune.recipe import Recipe
from edge_prune.runtimes import llamacpp_keys as K
from edge_prune.runtimes.manifest import CONFIG_FILE, Manifest

log = logging.getLogger(__name__)

# Decoders written as llama.cpp's `llama` architecture (same block layout, NORM rope).
LLAMA_ARCH_DECODERS = ("llama", "mistral")
# CLIP activations llama.cpp's clip graph implements: hidden_act -> clip.use_gelu.
CLIP_ACTIVATIONS = {"quick_gelu": False, "gelu": True}
QUANT_FILE_TYPES = {"f16": 1, "q8_0": 7, "q4_0": 2, "q4_k_m": 15}  # gguf.LlamaFileType values


@dataclass
class GGUFConversion:
    """What `convert_gguf` wrote: the artifact directory, its manifest, and per-file tensor types."""

    out_dir: Path
    manifest: Manifest
    tensor_types: dict[str, dict[str, int]] = field(default_factory=dict)  # file -> {type name: count}


def convert_gguf(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    recipe: Recipe | str | os.PathLike[str] | None = None,
    quant: str = "f16",
    keep_class_token: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> GGUFConversion:
    """Write model.gguf + mmproj.gguf + recipe.json + config.json + manifest.json to `out_dir`, atomically.

    `keep_class_token=False` (default) writes the CLIP tower without its class embedding and
    with the patch rows of the position table: llama.cpp's llava graph currently places CLS after
    the patches while filling positions for CLS-first (ggml-org/llama.cpp#25814), which shifts
    every patch; without CLS both the buggy and the fixed graph compute the same, correct patch
    positions, at the cost of CLS no longer taking part in the tower's attention.
    """
    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    if quant not in K.QUANTS:
        raise ArtifactError(f"--quant {quant!r} is not supported for gguf; choose one of {', '.join(K.QUANTS)}")
    shape = load_shape(model_dir)
    _check_supported(shape, model_dir)
    if recipe is None:
        recipe = Recipe.identity(shape.signature(), source=str(model_dir))
    elif not isinstance(recipe, Recipe):
        recipe = Recipe.load(recipe)
    recipe.check_model(shape.signature())

    model, tokenizer, processor = _load_checkpoint(model_dir)
    vocab = read_bpe_vocab(model_dir / "tokenizer.json", tokenizer, shape.vocab_size)
    pair_id = _pair_id(model_dir, recipe)

    with ArtifactWriter(out_dir, overwrite=overwrite) as art:
        lm_path, mm_path = art.path(K.LM_FILE), art.path(K.MMPROJ_FILE)
        lm_quant = "f16" if quant == "q4_k_m" else quant
        _write_language_model(lm_path, model, shape, vocab, tokenizer, processor, recipe, pair_id, lm_quant,
                              progress)
        if quant == "q4_k_m":
            _llamacpp_quantize(lm_path, "q4_k_m")
        _write_mmproj(mm_path, model, shape, processor, pair_id, keep_class_token, progress,
                      modules=recipe_module_tensors(recipe))
        # a copy: saving re-points a recipe at its new folder, and this one is the caller's (and the temp dir goes)
        replace(recipe).save(art.path(K.RECIPE_FILE))  # copies guide / router files beside it
        # The checkpoint's config lets `edge-prune profile ARTIFACT` predict, not only measure.
        art.copy_file(CONFIG_FILE, model_dir / CONFIG_FILE)
        types = {K.LM_FILE: _tensor_type_counts(lm_path), K.MMPROJ_FILE: _tensor_type_counts(mm_path)}
        manifest = art.commit(
            backend=K.BACKEND,
            quant=quant,
            versions=_tool_versions(),
            extra={
                "lm_file": K.LM_FILE,
                "mmproj_file": K.MMPROJ_FILE,
                "pair_id": pair_id,
                "image_token_id": int(model.config.image_token_id),
                "num_visual_tokens": shape.num_visual_tokens,
                "keep_class_token": keep_class_token,
                "tensor_types": types,
                "source": str(model_dir),
            },
        )
    return GGUFConversion(out_dir=out_dir, manifest=manifest, tensor_types=types)


# ---- checkpoint -------------------------------------------------------------------------------
def _check_supported(shape: ModelShape, model_dir: Path) -> None:
    if shape.is_llava_next:
        raise ModelError(
            f"{model_dir}: LLaVA-NeXT any-resolution tiling is not supported by the gguf converter yet; "
            "convert a LlavaForConditionalGeneration checkpoint, or use --format executorch"
        )
    if shape.text_model_type not in LLAMA_ARCH_DECODERS:
        raise ModelError(
            f"{model_dir}: decoder {shape.text_model_type!r} cannot be written as llama.cpp's llama "
            f"architecture; supported decoders: {', '.join(LLAMA_ARCH_DECODERS)}"
        )
    if shape.qkv_bias or shape.o_bias or shape.mlp_bias:
        raise ModelError(f"{model_dir}: attention/MLP biases are not supported by the llama GGUF writer")
    if shape.sliding_window:
        raise ModelError(
            f"{model_dir}: sliding-window attention ({shape.sliding_window}) is not written to GGUF; "
            "use a checkpoint without a sliding window"
        )
    if len(shape.vision_feature_layers) != 1:
        raise ModelError(f"{model_dir}: several vision_feature_layer values are not supported by the mmproj writer")


def _load_checkpoint(model_dir: Path) -> tuple[Any, Any, Any]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    try:
        model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype="auto", local_files_only=True)
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load the checkpoint in {model_dir}: {exc}") from exc
    return model.eval(), processor.tokenizer, processor


def _f32(tensor: Any) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def _pair_id(model_dir: Path, recipe: Recipe, sample: int = 1 << 20) -> str:
    """Identifies the (checkpoint, recipe) a pair was converted from, so a runtime can tell an mmproj of
    another checkpoint even when the shapes match. Hashes the config, the recipe, and each weight file's
    size plus its first and last MiB (cheap at 7B, and enough to tell two trainings apart)."""
    digest = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode())
    digest.update((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        size = f.stat().st_size
        digest.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(sample))
            fh.seek(max(0, size - sample))
            digest.update(fh.read(sample))
    return digest.hexdigest()[:16]


# ---- tokenizer --------------------------------------------------------------------------------
@dataclass
class BPEVocab:
    """A byte-level BPE tokenizer as llama.cpp's gpt2-style vocab stores it."""

    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    merges: list[str]  # "left right"
    bos_id: int
    eos_id: int
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    chat_template: str | None


def read_bpe_vocab(tokenizer_json: Path, tokenizer: Any, model_vocab_size: int) -> BPEVocab:
    """Map a `tokenizers` byte-level BPE (tokenizer.json) onto llama.cpp's gpt2 vocab layout.

    Special added tokens become CONTROL (llama.cpp matches them when parsing special text and
    hides them when detokenizing), other added tokens USER_DEFINED. Embedding rows beyond the
    tokenizer (padded vocabularies) become UNUSED `[PAD<i>]` tokens, as llama.cpp's converter does.
    """
    from gguf import TokenType

    if not tokenizer_json.is_file():
        raise ModelError(f"{tokenizer_json.parent} has no tokenizer.json; the gguf converter needs the fast tokenizer file")
    data = json.loads(tokenizer_json.read_text())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(data.get("pre_tokenizer")):
        raise ModelError(
            f"{tokenizer_json}: only byte-level BPE tokenizers (GPT-2 style) are supported by the gguf "
            f"converter; found model type {model.get('type')!r} with pre-tokenizer "
            f"{(data.get('pre_tokenizer') or {}).get('type')!r}"
        )
    id_to_token: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for added in data.get("added_tokens") or []:
        id_to_token[int(added["id"])] = added["content"]
        types[int(added["id"])] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    size = max(id_to_token) + 1
    if size > model_vocab_size:
        raise ModelError(
            f"{tokenizer_json}: the tokenizer has {size} tokens but the model's embedding only "
            f"{model_vocab_size} rows; the tokenizer does not belong to this checkpoint"
        )
    tokens, token_types = [], []
    for i in range(model_vocab_size):
        if i in id_to_token:
            tokens.append(id_to_token[i])
            token_types.append(types.get(i, int(TokenType.NORMAL)))
        else:
            tokens.append(f"[PAD{i}]")
            token_types.append(int(TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ModelError(f"{tokenizer_json.parent}: tokenizer has no bos/eos token; llama.cpp needs both")
    probe = tokenizer("a").input_ids
    template = getattr(tokenizer, "chat_template", None)
    return BPEVocab(tokens=tokens, token_types=token_types, merges=merges, bos_id=int(bos), eos_id=int(eos),
                    pad_id=tokenizer.pad_token_id, unk_id=tokenizer.unk_token_id,
                    add_bos=bool(probe) and probe[0] == bos, chat_template=template)


def _is_byte_level(pre: Any) -> bool:
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return pre.get("type") == "Sequence" and any(_is_byte_level(p) for p in pre.get("pretokenizers") or [])


# ---- language model -----------------------------------------------------------------------------
def llama_rope_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's rotate-half RoPE pairing (i, i+d/2) to GGML's
    adjacent pairing (2i, 2i+1), which llama.cpp's llama architecture (NORM rope) expects."""
    rows = weight.shape[0]
    head_dim = rows // n_head
    return weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _language_tensors(model: Any, shape: ModelShape) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every language-model tensor, in llama.cpp's naming."""
    lm = model.model.language_model
    yield "token_embd.weight", _f32(lm.embed_tokens.weight)
    for i, layer in enumerate(lm.layers):
        attn, mlp = layer.self_attn, layer.mlp
        yield f"blk.{i}.attn_norm.weight", _f32(layer.input_layernorm.weight)
        yield f"blk.{i}.attn_q.weight", llama_rope_permute(_f32(attn.q_proj.weight), shape.num_attention_heads)
        yield f"blk.{i}.attn_k.weight", llama_rope_permute(_f32(attn.k_proj.weight), shape.num_key_value_heads)
        yield f"blk.{i}.attn_v.weight", _f32(attn.v_proj.weight)
        yield f"blk.{i}.attn_output.weight", _f32(attn.o_proj.weight)
        yield f"blk.{i}.ffn_norm.weight", _f32(layer.post_attention_layernorm.weight)
        yield f"blk.{i}.ffn_gate.weight", _f32(mlp.gate_proj.weight)
        yield f"blk.{i}.ffn_up.weight", _f32(mlp.up_proj.weight)
        yield f"blk.{i}.ffn_down.weight", _f32(mlp.down_proj.weight)
    yield "output_norm.weight", _f32(lm.norm.weight)
    if not shape.tie_word_embeddings:
        yield "output.weight", _f32(model.lm_head.weight)


def _quantized(name: str, data: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """The array to store and its GGML type under `quant` (gguf-py's quantizers only)."""
    from gguf import GGMLQuantizationType as T
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import quantize

    if data.ndim < 2:
        return data.astype(np.float32), T.F32
    if quant == "f16":
        return data.astype(np.float16), T.F16
    qtype = {"q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]
    if quant == "q4_0" and name == "output.weight":
        qtype = T.Q8_0  # as llama.cpp's quantizer: the output matrix keeps more bits than the body
    block = GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        log.warning("%s: rows of %d are not a multiple of %d; stored as f16", name, data.shape[-1], block)
        return data.astype(np.float16), T.F16
    return quantize(data, qtype), qtype


def _write_language_model(path: Path, model: Any, shape: ModelShape, vocab: BPEVocab, tokenizer: Any,
                          processor: Any, recipe: Recipe, pair_id: str, quant: str, progress: bool) -> None:
    import gguf

    text = model.config.text_config
    rope = getattr(text, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ModelError(f"RoPE scaling {rope_type!r} is not written by the gguf converter; only the default RoPE is")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(Path(str(model.config.name_or_path or "edge-prune")).name or "edge-prune")
    w.add_file_type(QUANT_FILE_TYPES[quant])
    if quant != "f16":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(int(text.max_position_embeddings))
    w.add_embedding_length(shape.hidden_size)
    w.add_block_count(shape.num_layers)
    w.add_feed_forward_length(shape.intermediate_size)
    w.add_head_count(shape.num_attention_heads)
    w.add_head_count_kv(shape.num_key_value_heads)
    w.add_rope_dimension_count(shape.head_dim)
    if shape.head_dim * shape.num_attention_heads != shape.hidden_size:
        w.add_key_length(shape.head_dim)
        w.add_value_length(shape.head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(text.rms_norm_eps))
    w.add_vocab_size(shape.vocab_size)
    # tokenizer: gpt2-style BPE with GPT-2's pre-tokenizer regex (what tokenizers' ByteLevel uses)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    if vocab.pad_id is not None:
        w.add_pad_token_id(vocab.pad_id)
    if vocab.unk_id is not None:
        w.add_unk_token_id(vocab.unk_id)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(False)
    template = vocab.chat_template or getattr(processor, "chat_template", None)
    if template:
        w.add_chat_template(template)
    # the policy: recipe JSON and what a runtime needs to place the image
    w.add_uint32(K.KEY_VERSION, K.KEYS_VERSION)
    w.add_string(K.KEY_RECIPE, json.dumps(recipe.to_dict(), sort_keys=True))
    w.add_string(K.KEY_PAIR_ID, pair_id)
    w.add_uint32(K.KEY_IMAGE_TOKEN_ID, int(model.config.image_token_id))
    w.add_uint32(K.KEY_NUM_VISUAL_TOKENS, shape.num_visual_tokens)
    w.add_string(K.KEY_SOURCE_ARCHITECTURE, shape.architecture)
    edge, crop = _resize_and_crop(processor.image_processor)
    w.add_uint32(K.KEY_RESIZE_SHORTEST_EDGE, edge)
    w.add_uint32(K.KEY_CROP_SIZE, crop)
    names = 3 + 9 * shape.num_layers - (1 if shape.tie_word_embeddings else 0)
    for name, data in tqdm(_language_tensors(model, shape), total=names, desc=f"gguf: {path.name} ({quant})",
                           disable=not progress, unit="tensor"):
        stored, qtype = _quantized(name, data, quant)
        w.add_tensor(name, stored, raw_dtype=qtype)
    _finish(w)


def _resize_and_crop(image_processor: Any) -> tuple[int, int]:
    """(shortest edge, square crop side) of a CLIP image processor; 0 where the step is off."""
    def get(obj: Any, key: str) -> Any:
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    size, crop = getattr(image_processor, "size", None), getattr(image_processor, "crop_size", None)
    edge = get(size, "shortest_edge") if getattr(image_processor, "do_resize", True) else None
    side = get(crop, "height") if getattr(image_processor, "do_center_crop", True) else None
    if side is not None and get(crop, "width") != side:
        raise ModelError(f"image processor crops to {crop}; llama.cpp's llava encoder takes square images only")
    return int(edge or 0), int(side or 0)


def _llamacpp_quantize(path: Path, quant: str) -> None:
    """Re-quantize an f16 GGUF in place with llama.cpp's own quantizer (K-quants need its importance logic)."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ArtifactError(
            f"--quant {quant} uses llama.cpp's quantizer (llama_model_quantize), which needs llama-cpp-python; "
            "install requirements/core.txt or choose f16/q8_0/q4_0"
        ) from exc
    ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[quant]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = max(1, min(4, os.cpu_count() or 1))
    src = path.with_name(path.name + ".f16")
    path.rename(src)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(path).encode(), params)
    src.unlink()
    if rc != 0:
        raise ArtifactError(f"llama_model_quantize failed with code {rc} while writing {quant}; see llama.cpp's log above")


# ---- mmproj -------------------------------------------------------------------------------------
def _vision_tensors(model: Any, shape: ModelShape, keep_class_token: bool) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for the CLIP layers LLaVA uses and the projector, in clip.cpp's naming."""
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    emb = tower.embeddings
    positions = _f32(emb.position_embedding.weight)  # row 0 belongs to CLS
    yield "v.patch_embd.weight", _f32(emb.patch_embedding.weight)
    if keep_class_token:
        yield "v.class_embd", _f32(emb.class_embedding)
        yield "v.position_embd.weight", positions
    else:
        yield "v.position_embd.weight", positions[1:]
    yield "v.pre_ln.weight", _f32(tower.pre_layrnorm.weight)
    yield "v.pre_ln.bias", _f32(tower.pre_layrnorm.bias)
    for i, layer in enumerate(tower.encoder.layers[: shape.vision.layers_run]):
        a = layer.self_attn
        for gguf_name, module in (("attn_q", a.q_proj), ("attn_k", a.k_proj), ("attn_v", a.v_proj),
                                  ("attn_out", a.out_proj), ("ln1", layer.layer_norm1), ("ln2", layer.layer_norm2),
                                  ("ffn_up", layer.mlp.fc1), ("ffn_down", layer.mlp.fc2)):
            yield f"v.blk.{i}.{gguf_name}.weight", _f32(module.weight)
            yield f"v.blk.{i}.{gguf_name}.bias", _f32(module.bias)
    proj = model.model.multi_modal_projector
    yield "mm.0.weight", _f32(proj.linear_1.weight)
    yield "mm.0.bias", _f32(proj.linear_1.bias)
    yield "mm.2.weight", _f32(proj.linear_2.weight)
    yield "mm.2.bias", _f32(proj.linear_2.bias)


def recipe_module_tensors(recipe: Recipe) -> dict[str, np.ndarray]:
    """Guide and exit-router weights as `edge_prune.guide.*` / `edge_prune.router.*` mmproj tensors.

    They go into the mmproj because stock llama.cpp refuses a language-model GGUF with tensors its
    architecture does not use ("wrong number of tensors"), while clip.cpp ignores unknown tensors.
    """
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    files = [("guide", recipe.prune.guides.file if recipe.prune.guides else None),
             ("router", recipe.exit.router if recipe.exit else None)]
    for kind, rel in files:
        if rel is None:
            continue
        path = recipe.resolve(rel)
        if not path.is_file():
            raise ArtifactError(f"the recipe names {kind} weights {rel!r}, but {path} does not exist; "
                                "pass the recipe.json that sits beside its module files")
        for key, value in load_file(str(path)).items():
            name = f"{K.TENSOR_PREFIX[kind]}{key}"
            if len(name) >= K.GGUF_MAX_TENSOR_NAME:
                raise ArtifactError(f"{rel}: tensor {key!r} gives the GGUF name {name!r}, longer than GGUF's "
                                    f"{K.GGUF_MAX_TENSOR_NAME - 1} characters; shorten the module's parameter names")
            out[name] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def _write_mmproj(path: Path, model: Any, shape: ModelShape, processor: Any, pair_id: str,
                  keep_class_token: bool, progress: bool, modules: dict[str, np.ndarray] | None = None) -> None:
    import gguf

    vis_cfg = model.config.vision_config
    act = getattr(vis_cfg, "hidden_act", "quick_gelu")
    if act not in CLIP_ACTIVATIONS:
        raise ModelError(f"vision tower activation {act!r} is not one llama.cpp's clip graph runs "
                         f"({', '.join(CLIP_ACTIVATIONS)})")
    if model.config.projector_hidden_act != "gelu":
        raise ModelError(f"projector activation {model.config.projector_hidden_act!r}: llama.cpp's mlp projector "
                         "applies GELU only")
    if shape.vision_feature_select_strategy != "default":
        raise ModelError("vision_feature_select_strategy 'full' (CLS fed to the decoder) has no llama.cpp equivalent")
    image_processor = processor.image_processor
    v = shape.vision
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name("edge-prune mmproj")
    w.add_file_type(QUANT_FILE_TYPES["f16"])
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type("mlp")
    w.add_vision_image_size(v.image_size)
    w.add_vision_patch_size(v.patch_size)
    w.add_vision_embedding_length(v.hidden_size)
    w.add_vision_feed_forward_length(v.intermediate_size)
    w.add_vision_block_count(v.layers_run)
    w.add_vision_head_count(v.num_attention_heads)
    w.add_vision_attention_layernorm_eps(float(vis_cfg.layer_norm_eps))
    w.add_vision_projection_dim(shape.projector_out_features)
    w.add_vision_image_mean([float(x) for x in image_processor.image_mean])
    w.add_vision_image_std([float(x) for x in image_processor.image_std])
    w.add_vision_use_gelu(CLIP_ACTIVATIONS[act])
    # Explicit feature layer: clip.cpp otherwise assumes LLaVA-1.5's "penultimate" (-2) choice.
    w.add_array(K.KEY_CLIP_FEATURE_LAYER, [v.layers_run])
    w.add_string(K.KEY_MMPROJ_PAIR_ID, pair_id)
    w.add_bool(K.KEY_MMPROJ_CLASS_TOKEN, keep_class_token)
    count = 4 + (1 if keep_class_token else 0) + 16 * v.layers_run + 4
    for name, data in tqdm(_vision_tensors(model, shape, keep_class_token), total=count,
                           desc=f"gguf: {path.name} (f16)", disable=not progress, unit="tensor"):
        big_matrix = data.ndim >= 2 and name != "v.position_embd.weight"
        w.add_tensor(name, data.astype(np.float16 if big_matrix else np.float32))
    for name, data in (modules or {}).items():
        w.add_tensor(name, data)
    _finish(w)


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensor_type_counts(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("edge-prune", "gguf", "llama_cpp_python", "transformers", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out
