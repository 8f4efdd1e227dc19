"""On-device preprocessing and tokenization equal the checkpoint's HF processor (no torch on the device)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edge_prune.converters.executorch import chat_format, image_config
from edge_prune.models.adapter import LlavaAdapter
from edge_prune.runtimes.preprocess import preprocess
from edge_prune.runtimes.tokenizer import PromptTokenizer
from tests.conftest import PROMPTS


@pytest.fixture(scope="module")
def adapter(tiny_llava_dir):
    return LlavaAdapter.load(tiny_llava_dir)


def _images():
    rng = np.random.default_rng(1)
    sizes = [(32, 32), (40, 72), (70, 36), (17, 90), (200, 150)]  # square, wide, tall, padded, downscaled
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    rgba = Image.fromarray(rng.integers(0, 256, (48, 40, 4), dtype=np.uint8), mode="RGBA")
    return out + [rgba, rng.integers(0, 256, (33, 45, 3), dtype=np.uint8)]


def test_preprocessing_matches_the_hf_processor(adapter):
    cfg = image_config(adapter)
    for image in _images():
        ours = preprocess(image, cfg)
        theirs = adapter.prepare(["describe"], [image]).pixel_values.numpy()
        assert ours.shape == theirs.shape == (1, 3, 32, 32)
        np.testing.assert_array_equal(ours, theirs)


def test_tokenization_matches_the_hf_processor(adapter, tmp_path):
    adapter.processor.tokenizer.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    import json

    (tmp_path / "chat_template.json").write_text(json.dumps(chat_format(adapter).to_dict()))
    tok = PromptTokenizer.load(tmp_path, adapter.image_token_id)
    n = adapter.signature().num_visual_tokens
    for prompt in [*PROMPTS, "USER: <image>\nalready templated ASSISTANT:"]:
        ids = adapter.prepare([prompt], [np.zeros((32, 32, 3), np.uint8)]).input_ids[0].tolist()
        ours = tok.encode(prompt, with_image=True)
        cut = ours.image_start
        expanded = ours.text_ids[:cut] + [adapter.image_token_id] * n + ours.text_ids[cut:]
        assert expanded == ids
        text_only = adapter.prepare([prompt.replace("<image>", "")]).input_ids[0].tolist()
        assert tok.encode(prompt.replace("<image>", ""), with_image=False).text_ids == text_only
    theirs = adapter.processor.tokenizer.decode(ids[-3:], skip_special_tokens=True).strip()
    assert tok.decode(ids[-3:]) == theirs
