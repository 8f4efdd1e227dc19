"""Model shape facts read from config.json alone (no weights), for the cost model and recipe signatures.

Configs are parsed with transformers' own config classes (`LlavaConfig` / `LlavaNextConfig`), so every
default that the config file leaves out is the value transformers would build the model with. Nothing
here touches the network or loads weights; transformers is imported only when a config is parsed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_prune.errors import ModelError
from edge_prune.recipe import ModelSignature

# model_type of the top-level config -> the architecture it builds.
ARCHITECTURE_BY_MODEL_TYPE = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURE_BY_MODEL_TYPE.values())
SUPPORTED_DECODERS = ("llama", "mistral", "qwen2")
# The cost model knows CLIP's layout (CLS token, pre-layernorm, bias-free patch conv) only.
SUPPORTED_VISION_TOWERS = ("clip_vision_model",)
# What transformers' sub-config defaults fall back to when config.json omits "model_type".
DEFAULT_DECODER = "llama"
DEFAULT_VISION_TOWER = "clip_vision_model"


@dataclass(frozen=True)
class VisionShape:
    """The vision tower (a CLIP ViT) as LLaVA runs it on one image crop."""

    model_type: str
    num_layers: int  # layers in the checkpoint
    layers_run: int  # layers needed for the deepest selected feature layer (see ModelShape docstring)
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    num_patches: int  # (image_size / patch_size)^2
    num_positions: int  # tokens every vision layer processes: patches + CLS


@dataclass(frozen=True)
class ModelShape:
    """Everything the cost model needs about a LLaVA-style checkpoint, read from its config.

    `vision.layers_run` counts the CLIP layers up to the deepest `vision_feature_layer` (23 of 24 for
    the usual -2): later layers cannot change the features LLaVA uses, llama.cpp's mmproj drops them,
    and an efficient runtime skips them. (transformers' eager forward runs all layers regardless.)
    `num_visual_tokens` is the per-image count of the base 336-px grid: (image/patch)^2, +1 for the
    "full" feature strategy that keeps CLS. For LLaVA-NeXT the real count depends on the image size;
    see `llava_next_visual_tokens`.
    """

    architecture: str
    text_model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: q/k/v carry biases; Llama: config.attention_bias (also on o_proj)
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None  # None for the supported checkpoints; the cost model does not use it
    vision: VisionShape
    vision_feature_layers: tuple[int, ...]  # as in the config; several -> features concatenated
    vision_feature_select_strategy: str  # "default" drops CLS, "full" keeps it
    projector_in_features: int  # vision hidden x number of feature layers
    projector_hidden_features: int  # LLaVA's 2-layer MLP: in -> text hidden -> text hidden
    projector_out_features: int
    projector_bias: bool
    num_visual_tokens: int
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None  # LLaVA-NeXT only, (height, width)
    image_newline: bool  # LLaVA-NeXT learns one newline embedding (text hidden) per grid row

    @property
    def q_dim(self) -> int:
        """Width of the query projection output (heads x head_dim)."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of each of the key and value projection outputs (kv heads x head_dim; GQA-aware)."""
        return self.num_key_value_heads * self.head_dim

    @property
    def is_llava_next(self) -> bool:
        return self.architecture == "LlavaNextForConditionalGeneration"

    def signature(self) -> ModelSignature:
        """The recipe contract's view of this model; recipes are checked against it."""
        return ModelSignature(
            architecture=self.architecture,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            num_visual_tokens=self.num_visual_tokens,
        )


def load_shape(path: str | os.PathLike[str]) -> ModelShape:
    """Read a checkpoint directory (or its config.json) into a ModelShape; raises ModelError on bad input."""
    path = Path(path)
    if not path.exists():
        raise ModelError(
            f"model path not found: {path}; pass a Hugging Face checkpoint directory or its config.json"
        )
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise ModelError(
            f"{path} has no config.json; pass a Hugging Face checkpoint directory (the one "
            "`save_pretrained` writes) or the path of its config.json"
        )
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"{config_path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "fix the file or re-download the checkpoint's config.json"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_path}: cannot be read as text ({exc})") from exc
    return shape_from_dict(data, source=str(config_path))


def shape_from_dict(data: Any, source: str = "config") -> ModelShape:
    """Check a parsed config.json for a supported architecture and decoder, then build its ModelShape."""
    if not isinstance(data, dict):
        raise ModelError(f"{source}: expected a JSON object, found {type(data).__name__}")
    architecture = _architecture(data, source)
    for key, default, supported, what in (
        ("text_config", DEFAULT_DECODER, SUPPORTED_DECODERS, "decoder (text_config)"),
        ("vision_config", DEFAULT_VISION_TOWER, SUPPORTED_VISION_TOWERS, "vision tower (vision_config)"),
    ):
        sub = data.get(key) or {}
        found = sub.get("model_type", default) if isinstance(sub, dict) else None
        if found not in supported:
            raise ModelError(
                f"{source}: {what} model_type {found!r} is not supported; supported: "
                f"{', '.join(supported)}. Use a LLaVA checkpoint with one of those, or extend "
                "edge_prune.models.shapes"
            )

    from transformers import LlavaConfig, LlavaNextConfig  # heavy import, only when a config is parsed

    config_class = LlavaNextConfig if architecture == "LlavaNextForConditionalGeneration" else LlavaConfig
    try:
        config = config_class.from_dict(data)
    except Exception as exc:  # transformers' strict config validation raises several types
        raise ModelError(
            f"{source}: transformers' {config_class.__name__} rejected this config ({exc}); "
            "check the field named above"
        ) from exc
    return shape_from_config(config, architecture=architecture, source=source)


def shape_from_config(config: Any, architecture: str | None = None, source: str = "config") -> ModelShape:
    """Build a ModelShape from a transformers LlavaConfig/LlavaNextConfig (e.g. a loaded model's .config)."""
    model_type = getattr(config, "model_type", None)
    if architecture is None:
        architecture = ARCHITECTURE_BY_MODEL_TYPE.get(model_type)  # type: ignore[arg-type]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{source}: model_type {model_type!r} is not supported; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    text = config.text_config
    vis = config.vision_config
    if text.model_type not in SUPPORTED_DECODERS:
        raise ModelError(
            f"{source}: decoder model_type {text.model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_DECODERS)}"
        )
    if vis.model_type not in SUPPORTED_VISION_TOWERS:
        raise ModelError(
            f"{source}: vision tower model_type {vis.model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_VISION_TOWERS)}"
        )

    vision = _vision_shape(vis, config.vision_feature_layer, source)
    feature_layers = _as_tuple(config.vision_feature_layer)
    strategy = config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ModelError(
            f"{source}: vision_feature_select_strategy {strategy!r} is not supported; "
            "expected 'default' or 'full'"
        )
    # Same expression the modeling code uses (LlamaAttention/MistralAttention/Qwen2Attention).
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    attention_bias = bool(getattr(text, "attention_bias", False))
    is_qwen2 = text.model_type == "qwen2"
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    return ModelShape(
        architecture=architecture,
        text_model_type=text.model_type,
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads or text.num_attention_heads,
        head_dim=head_dim,
        vocab_size=text.vocab_size,
        tie_word_embeddings=bool(config.tie_word_embeddings),
        qkv_bias=is_qwen2 or attention_bias,
        o_bias=attention_bias and not is_qwen2,
        mlp_bias=bool(getattr(text, "mlp_bias", False)),
        sliding_window=getattr(text, "sliding_window", None),
        vision=vision,
        vision_feature_layers=feature_layers,
        vision_feature_select_strategy=strategy,
        projector_in_features=vis.hidden_size * len(feature_layers),
        projector_hidden_features=text.hidden_size,
        projector_out_features=text.hidden_size,
        projector_bias=bool(config.multimodal_projector_bias),
        num_visual_tokens=vision.num_patches + (1 if strategy == "full" else 0),
        image_grid_pinpoints=tuple((int(h), int(w)) for h, w in pinpoints) if pinpoints else None,
        image_newline=architecture == "LlavaNextForConditionalGeneration",
    )


def llava_next_num_crops(shape: ModelShape, image_height: int, image_width: int) -> int:
    """Image crops LLaVA-NeXT runs through the vision tower for an image (base view included)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    _require_next(shape)
    return int(image_size_to_num_patches(
        image_size=[image_height, image_width],
        grid_pinpoints=[list(p) for p in shape.image_grid_pinpoints],  # type: ignore[union-attr]
        patch_size=shape.vision.image_size,
    ))


def llava_next_visual_tokens(shape: ModelShape, image_height: int, image_width: int) -> int:
    """Visual tokens LLaVA-NeXT feeds the decoder for one image of the given original size.

    Mirrors LlavaNextModel.pack_image_features with transformers' own helpers: the base grid, plus
    the any-resolution grid after `unpad_image`, plus one `image_newline` token per grid row.
    """
    import numpy as np
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    _require_next(shape)
    if shape.vision_feature_select_strategy != "default":
        # pack_image_features reshapes each crop's tokens into the patch grid, which only works
        # once CLS is dropped; transformers cannot run LLaVA-NeXT crops with "full".
        raise ModelError(
            "LLaVA-NeXT any-resolution packing needs vision_feature_select_strategy 'default'; "
            f"this config has {shape.vision_feature_select_strategy!r}"
        )
    if image_height <= 0 or image_width <= 0:
        raise ValueError(f"image size must be positive, got {image_height}x{image_width}")
    rows, cols = get_anyres_image_grid_shape(
        [image_height, image_width],
        [list(p) for p in shape.image_grid_pinpoints],  # type: ignore[union-attr]
        shape.vision.image_size,
    )
    side = shape.vision.image_size // shape.vision.patch_size
    grid = np.zeros((0, rows * side, cols * side), dtype=np.uint8)  # only the shape matters
    unpadded = unpad_image(grid, [image_height, image_width])
    height, width = unpadded.shape[1:]
    return shape.num_visual_tokens + height * width + height


def _require_next(shape: ModelShape) -> None:
    if not shape.is_llava_next or not shape.image_grid_pinpoints:
        raise ModelError(
            f"{shape.architecture} has a fixed visual-token count ({shape.num_visual_tokens}); "
            "any-resolution token counts apply to LlavaNextForConditionalGeneration only"
        )


def _architecture(data: dict[str, Any], source: str) -> str:
    declared = data.get("architectures") or []
    if not isinstance(declared, list):
        declared = [declared]
    for name in declared:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    if declared:
        found = ", ".join(str(name) for name in declared)
    else:
        by_type = ARCHITECTURE_BY_MODEL_TYPE.get(data.get("model_type"))  # type: ignore[arg-type]
        if by_type is not None:
            return by_type
        found = f"model_type {data.get('model_type')!r}"
    raise ModelError(
        f"{source}: architecture {found} is not supported; supported architectures: "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}. Use a LLaVA or LLaVA-NeXT checkpoint "
        "(e.g. llava-hf/llava-1.5-7b-hf)"
    )


def _vision_shape(vis: Any, feature_layer: int | list[int], source: str) -> VisionShape:
    image_size, patch_size = vis.image_size, vis.patch_size
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise ModelError(
            f"{source}: vision_config image_size {image_size!r} / patch_size {patch_size!r}; "
            "edge-prune supports square images and patches given as single integers"
        )
    num_patches = (image_size // patch_size) ** 2
    # hidden_states has num_layers + 1 entries (index 0 = patch embeddings), so index k needs k layers.
    states = vis.num_hidden_layers + 1
    needed = []
    for index in _as_tuple(feature_layer):
        if not -states <= index < states:
            raise ModelError(
                f"{source}: vision_feature_layer {index} is out of range for a "
                f"{vis.num_hidden_layers}-layer vision tower"
            )
        needed.append(index % states)
    return VisionShape(
        model_type=vis.model_type,
        num_layers=vis.num_hidden_layers,
        layers_run=max(needed),
        hidden_size=vis.hidden_size,
        intermediate_size=vis.intermediate_size,
        num_attention_heads=vis.num_attention_heads,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=vis.num_channels,
        num_patches=num_patches,
        num_positions=num_patches + 1,  # CLIP prepends a class token
    )


def _as_tuple(value: int | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)
