"""Quantized and non-XNNPACK ExecuTorch artifacts: 8da4w runs here; Vulkan and Core ML lower here (their
delegation summaries land in the manifest) but need a device runtime; QNN needs Qualcomm's SDK."""

from __future__ import annotations

import numpy as np
import pytest

from edge_prune.converters.executorch import ConvertOptions, convert
from edge_prune.errors import ArtifactError
from edge_prune.models.shapes import load_shape
from edge_prune.models.tiny import TinySpec, write_tiny_llava
from edge_prune.recipe import PruneSpec, Recipe
from edge_prune.runtimes import load, read_manifest
from tests.conftest import PROMPTS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    spec = TinySpec(num_layers=1, vision_layers=1)
    return write_tiny_llava(tmp_path_factory.mktemp("ckpt") / "tiny1", spec)


@pytest.fixture(scope="module")
def recipe(model_dir):
    return Recipe(model=load_shape(model_dir).signature(), prune=PruneSpec(scorer="fastv", keep_after=[0.5]))


def _convert(model_dir, recipe, out, backend="xnnpack", quant="none"):
    options = ConvertOptions(backend=backend, quant=quant, max_prompt_tokens=40, max_new_tokens=4,
                             text_only_prefill=False, progress=False)
    return convert(model_dir, recipe, out, options)


def test_8da4w_artifact_runs_and_stays_close_to_fp32(model_dir, recipe, tmp_path, images):
    fp32 = _convert(model_dir, recipe, tmp_path / "fp32")
    q = _convert(model_dir, recipe, tmp_path / "8da4w", quant="8da4w")
    manifest = read_manifest(q.path)
    assert manifest.quant == "8da4w" and manifest.extra["quant"]["group_size"] == 32
    assert manifest.extra["quant"]["unquantized_linears"] == []
    a = load(fp32.path).generate(images[0], PROMPTS[0], max_new_tokens=2)
    b = load(q.path).generate(images[0], PROMPTS[0], max_new_tokens=2)
    assert b.kept[0].per_layer == a.kept[0].per_layer == [32]
    # int4 weights move the logits, but not far: their correlation with fp32 stays high.
    assert np.corrcoef(a.first_logits[0], b.first_logits[0])[0, 1] > 0.95
    assert not np.array_equal(a.first_logits, b.first_logits)
    # the quantized linears run inside XNNPACK (dynamically quantized int8 x int4 kernels)
    assert q.delegation.methods["prefill"].share > 0.3


def test_int8_artifact_answers_as_fp32_does(model_dir, recipe, tmp_path, images):
    """int8 weights per channel (dynamically quantized activations): close enough to fp32 that the logits
    barely move. The int8 weight-only scheme this replaced lowered with its scales lost (correlation ~0)."""
    fp32 = _convert(model_dir, recipe, tmp_path / "fp32")
    q = _convert(model_dir, recipe, tmp_path / "int8", quant="int8")
    assert read_manifest(q.path).quant == "int8"
    for image in images[:2]:
        a = load(fp32.path).generate(image, PROMPTS[0], max_new_tokens=2)
        b = load(q.path).generate(image, PROMPTS[0], max_new_tokens=2)
        assert np.corrcoef(a.first_logits[0], b.first_logits[0])[0, 1] > 0.99
        assert np.abs(a.first_logits - b.first_logits).max() < 0.1 * np.abs(a.first_logits).max()
    assert q.delegation.methods["prefill"].share > 0.3
    assert q.pte_bytes < fp32.pte_bytes


@pytest.mark.parametrize("backend, registry_name", [("vulkan", "VulkanBackend"), ("coreml", "CoreMLBackend")])
def test_device_backends_lower_here_and_report_delegation(model_dir, recipe, tmp_path, backend,
                                                           registry_name):
    result = _convert(model_dir, recipe, tmp_path / backend, backend=backend)
    manifest = read_manifest(result.path)
    summary = manifest.extra["delegation"]
    assert manifest.backend == backend and summary["backend"] == backend
    assert set(summary["methods"]) == {"vision_encoder", "token_embedding", "prefill", "decode"}
    assert summary["share"] > 0
    assert any(m["delegated_subgraphs"] > 0 for m in summary["methods"].values())
    # the pruned prefill (scoring and top-k included) runs mostly inside the delegate
    assert summary["methods"]["prefill"]["share"] > 0.75
    with pytest.raises(ArtifactError, match=registry_name):
        load(result.path)  # the pip runtime has XNNPACK only


def test_qnn_without_the_sdk_names_it_and_how_to_install(model_dir, recipe, tmp_path, monkeypatch):
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
    missing = "Qualcomm's QNN SDK.*QNN_SDK_ROOT is not set.*export QNN_SDK_ROOT"
    with pytest.raises(ArtifactError, match=missing):
        _convert(model_dir, recipe, tmp_path / "qnn", backend="qnn")
    monkeypatch.setenv("QNN_SDK_ROOT", str(tmp_path))
    with pytest.raises(ArtifactError, match="has no lib/x86_64-linux-clang/libQnnHtp.so"):
        _convert(model_dir, recipe, tmp_path / "qnn", backend="qnn")
    assert not (tmp_path / "qnn").exists()
