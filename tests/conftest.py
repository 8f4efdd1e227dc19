"""Shared fixtures: tiny random checkpoints written to disk with save_pretrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from edge_prune.models.tiny import TinySpec, write_tiny_llava

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    return write_tiny_llava(tmp_path_factory.mktemp("ckpt") / "tiny-llava", TinySpec(kind="llava"))


@pytest.fixture(scope="session")
def tiny_next_dir(tmp_path_factory):
    return write_tiny_llava(tmp_path_factory.mktemp("ckpt") / "tiny-llava-next", TinySpec(kind="llava_next"))


@pytest.fixture(scope="session")
def images():
    """Three distinct images of different sizes (LLaVA-NeXT then gets different tile counts)."""
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (40, 72), (70, 36)]
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in sizes]


PROMPTS = [
    "what colour is the square?",
    "how many circles are on the left side of the image, counting small ones too?",
    "yes or no",
]
