"""Image preprocessing on the device, identical to the checkpoint's CLIP image processor (PIL backend).

transformers' PIL-backend CLIP processor resizes the shortest edge with Pillow, centre-crops,
rescales in float64 and normalises in float32. We do the same steps with Pillow (for decoding
and the resize, so the interpolation is bit-identical) and numpy for the rest; no torch.
The numbers come from the checkpoint's processor config, copied into the artifact at convert time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_prune.errors import ArtifactError, InputError

PREPROCESS_FILE = "preprocess.json"


@dataclass(frozen=True)
class ImageConfig:
    """The processor settings that change pixels, named as in preprocessor_config.json."""

    image_size: int  # what the vision tower takes (crop size); checked against the output
    patch_size: int
    do_resize: bool = True
    shortest_edge: int = 336
    resample: int = 3  # PIL.Image.BICUBIC
    do_center_crop: bool = True
    crop_height: int = 336
    crop_width: int = 336
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = PREPROCESS_FILE) -> ImageConfig:
        try:
            cfg = cls(**data)
        except TypeError as exc:
            raise ArtifactError(
                f"{source}: malformed image preprocessing config ({exc}); re-run `edge-prune convert`"
            ) from exc
        return cls(**{**asdict(cfg), "image_mean": tuple(cfg.image_mean), "image_std": tuple(cfg.image_std)})

    @classmethod
    def load(cls, path: Path) -> ImageConfig:
        try:
            return cls.from_dict(json.loads(path.read_text()), source=str(path))
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(
                f"{path}: cannot read the preprocessing config ({exc}); re-run `edge-prune convert`") from exc


def load_rgb(image: Any, min_side: int = 1):
    """A path, PIL image or HxWx3 uint8 array as an RGB PIL image (as the reference engine loads it)."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                rgb = im.convert("RGB")
        except (OSError, ValueError) as exc:
            raise InputError(f"{path} is not a readable image ({exc}); pass a PNG or JPEG file") from exc
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise InputError(f"image array has shape {image.shape}; expected (height, width, 3) uint8")
        rgb = Image.fromarray(image.astype(np.uint8)).convert("RGB")
    elif isinstance(image, Image.Image):
        rgb = image.convert("RGB")
    else:
        raise InputError(f"image of type {type(image).__name__}; pass a path, a PIL image or an HxWx3 array")
    if min(rgb.size) < min_side:
        raise InputError(
            f"image is {rgb.size[0]}x{rgb.size[1]} pixels; each side must be at least {min_side} px")
    return rgb


def preprocess(image: Any, cfg: ImageConfig) -> np.ndarray:
    """pixel_values [1, 3, H, W] float32, as the HF processor returns for one image."""
    rgb = load_rgb(image, min_side=cfg.patch_size)
    if cfg.do_resize:
        width, height = rgb.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = cfg.shortest_edge, int(cfg.shortest_edge * long / short)
        new_h, new_w = (new_long, new_short) if width <= height else (new_short, new_long)
        rgb = rgb.resize((new_w, new_h), resample=cfg.resample)
    pixels = np.moveaxis(np.asarray(rgb), -1, 0)  # HWC uint8 -> CHW
    if cfg.do_center_crop:
        pixels = _center_crop(pixels, cfg.crop_height, cfg.crop_width)
    if cfg.do_rescale:
        pixels = (pixels.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        if not np.issubdtype(pixels.dtype, np.floating):
            pixels = pixels.astype(np.float32)
        mean = np.array(cfg.image_mean, dtype=pixels.dtype)
        std = np.array(cfg.image_std, dtype=pixels.dtype)
        pixels = ((pixels.T - mean) / std).T
    out = np.ascontiguousarray(pixels, dtype=np.float32)[None]
    if out.shape[-2:] != (cfg.image_size, cfg.image_size):
        raise InputError(
            f"preprocessed image is {out.shape[-1]}x{out.shape[-2]} px but the vision encoder takes "
            f"{cfg.image_size}x{cfg.image_size}; the artifact's preprocess.json disagrees with the model"
        )
    return out


def _center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers' center_crop: crop when the image is large enough, else zero-pad around it."""
    _, h, w = pixels.shape
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0 and top + crop_h <= h and left + crop_w <= w:
        return pixels[:, top:top + crop_h, left:left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    padded = np.zeros((pixels.shape[0], new_h, new_w), dtype=pixels.dtype)
    top_pad, left_pad = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
    padded[:, top_pad:top_pad + h, left_pad:left_pad + w] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[:, max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]
