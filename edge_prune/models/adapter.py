"""Load a LLaVA-family checkpoint and expose what the pruning engine needs.

The adapter hides the difference between LLaVA (fixed 576-token grid) and LLaVA-NeXT
(any-resolution: tile count, and so visual-token count, differs per image) and between
Llama, Mistral and Qwen2 decoders (same block layout: q/k/v/o projections, RoPE, RMSNorm,
SwiGLU MLP). The engine then walks the decoder layers itself.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from edge_prune.errors import InputError, ModelError
from edge_prune.models.shapes import ModelShape, load_shape
from edge_prune.recipe import ModelSignature

IMAGE_PLACEHOLDER = "<image>"

ImageInput = Image.Image | str | Path | np.ndarray


def check_model_dir(model_dir: str | Path) -> ModelShape:
    """Check the directory and its config.json before any weights load, so bad input fails fast."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ModelError(f"model directory not found: {model_dir}")
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir} is a file; pass the checkpoint directory that holds config.json")
    return load_shape(model_dir)


@dataclass
class PreparedBatch:
    """Processor output for one request batch, on the model's device."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 1 = real token
    pixel_values: torch.Tensor | None
    image_sizes: torch.Tensor | None

    def model_inputs(self) -> dict[str, torch.Tensor]:
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.pixel_values is not None:
            out["pixel_values"] = self.pixel_values
        if self.image_sizes is not None:
            out["image_sizes"] = self.image_sizes
        return out


class LlavaAdapter:
    """One loaded LLaVA / LLaVA-NeXT checkpoint: processor, vision path, and decoder parts."""

    def __init__(self, model: torch.nn.Module, processor: Any, model_dir: Path, shape: ModelShape):
        self.model = model
        self.processor = processor
        self.model_dir = model_dir
        self.shape = shape
        self.architecture = shape.architecture
        self.is_next = shape.is_llava_next
        cfg = model.config
        self.config = cfg
        self.text_config = cfg.text_config
        self.vision_config = cfg.vision_config
        self.image_token_id = int(cfg.image_token_id)
        self.language_model = model.model.language_model
        self.layers = list(self.language_model.layers)
        self.rotary_emb = self.language_model.rotary_emb
        self.final_norm = self.language_model.norm
        self.embed_tokens = self.language_model.embed_tokens
        self.lm_head = model.lm_head
        # Each decoder family ships its own RoPE helper; use the one from the attention's module.
        attn_module = sys.modules[type(self.layers[0].self_attn).__module__]
        self.apply_rotary: Callable = attn_module.apply_rotary_pos_emb
        tok = processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else tok.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos_token_ids))

    # ---- loading ----------------------------------------------------------------------
    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LlavaAdapter:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model_dir = Path(model_dir)
        shape = check_model_dir(model_dir)
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                model_dir, dtype=dtype, attn_implementation="sdpa", local_files_only=True
            )
            processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"could not load the checkpoint in {model_dir}: {exc}") from exc
        model.to(device).eval()
        return cls(model, processor, model_dir, shape)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def signature(self) -> ModelSignature:
        return self.shape.signature()

    # ---- request preparation ------------------------------------------------------------
    def format_prompt(self, prompt: str, with_image: bool) -> str:
        """Wrap a plain question in the checkpoint's chat template; pass templated prompts through."""
        if IMAGE_PLACEHOLDER in prompt:
            if not with_image:
                raise InputError("the prompt contains <image> but no image was given")
            return prompt
        template = getattr(self.processor, "chat_template", None)
        if not template:
            return f"{IMAGE_PLACEHOLDER}\n{prompt}" if with_image else prompt
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def load_image(self, image: ImageInput) -> Image.Image:
        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise InputError(f"image file not found: {path}")
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except (OSError, ValueError) as exc:
                raise InputError(f"{path} is not a readable image ({exc}); pass a PNG or JPEG file") from exc
        elif isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] not in (3, 4):
                raise InputError(f"image array has shape {image.shape}; expected (height, width, 3) uint8")
            image = Image.fromarray(image.astype(np.uint8)).convert("RGB")
        elif isinstance(image, Image.Image):
            image = image.convert("RGB")
        else:
            raise InputError(f"image of type {type(image).__name__}; pass a path, a PIL image or an HxWx3 array")
        patch = self.vision_config.patch_size
        if min(image.size) < patch:
            raise InputError(
                f"image is {image.size[0]}x{image.size[1]} pixels; each side must be at least the vision "
                f"patch size ({patch} px), and {self.vision_config.image_size} px is what the model was trained on"
            )
        return image

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Pre-processed tensors bypass the processor, so check their shape here."""
        size = self.vision_config.image_size
        if pixel_values.dim() < 4 or tuple(pixel_values.shape[-3:]) != (3, size, size):
            raise InputError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; this model expects "
                f"(batch, 3, {size}, {size}){' with a tile axis' if self.is_next else ''}. "
                "Pass images instead and let the processor resize them"
            )

    def prepare(self, prompts: Sequence[str], images: Sequence[ImageInput] | None = None) -> PreparedBatch:
        """Tokenize prompts and preprocess images exactly as the checkpoint's processor does."""
        if images is not None and len(images) != len(prompts):
            raise InputError(f"{len(images)} images for {len(prompts)} prompts; give one image per prompt")
        with_image = images is not None
        texts = [self.format_prompt(p, with_image) for p in prompts]
        for text in texts:
            count = text.count(IMAGE_PLACEHOLDER)
            if with_image and count != 1:
                raise InputError(f"a prompt holds {count} <image> placeholders; edge-prune runs one image per prompt")
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if with_image:
            kwargs["images"] = [self.load_image(im) for im in images]
        enc = self.processor(**kwargs)
        dev = self.device
        pixel_values = enc.get("pixel_values")
        if pixel_values is not None:
            pixel_values = pixel_values.to(dev, self.embed_tokens.weight.dtype)
        image_sizes = enc.get("image_sizes")
        return PreparedBatch(
            input_ids=enc["input_ids"].to(dev),
            attention_mask=enc["attention_mask"].to(dev),
            pixel_values=pixel_values,
            image_sizes=image_sizes.to(dev) if image_sizes is not None else None,
        )

    # ---- model pieces -------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, batch: PreparedBatch) -> torch.Tensor | None:
        """Vision tower + projector (+ LLaVA-NeXT packing); one row per visual token, all images."""
        if batch.pixel_values is None:
            return None
        self.check_pixel_values(batch.pixel_values)
        kwargs: dict[str, Any] = {
            "pixel_values": batch.pixel_values,
            "vision_feature_layer": self.config.vision_feature_layer,
            "vision_feature_select_strategy": self.config.vision_feature_select_strategy,
        }
        if self.is_next:
            kwargs["image_sizes"] = batch.image_sizes
        out = self.model.model.get_image_features(**kwargs, return_dict=True)
        return torch.cat(list(out.pooler_output), dim=0)

    @torch.no_grad()
    def embed(self, batch: PreparedBatch, image_features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with image features scattered into the <image> slots; returns (embeds, visual mask)."""
        embeds = self.embed_tokens(batch.input_ids)
        visual = batch.input_ids == self.image_token_id
        if image_features is None:
            if visual.any():
                raise InputError("the prompt holds image tokens but no image was given")
            return embeds, visual
        if int(visual.sum()) != image_features.shape[0]:
            raise InputError(
                f"{int(visual.sum())} image tokens in the prompts but {image_features.shape[0]} image "
                "features; the processor and the model disagree on the visual-token count"
            )
        embeds = embeds.masked_scatter(visual.unsqueeze(-1), image_features.to(embeds.dtype))
        return embeds, visual
