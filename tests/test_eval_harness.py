"""`edge-prune eval`: the documented JSON keys, FLOPs from the cost model, ablation, and bad requests."""

from __future__ import annotations

import json

import pytest

from edge_prune.bench.evaluate import evaluate
from edge_prune.bench.generator import FAMILIES
from edge_prune.cli import main
from edge_prune.errors import InputError
from edge_prune.models.tiny import TinySpec, write_tiny_llava


@pytest.fixture(scope="module")
def bench_sized_dir(tmp_path_factory):
    """A random model at the benchmark's resolution (192 px, 8 px patches: 576 visual tokens)."""
    return write_tiny_llava(tmp_path_factory.mktemp("m") / "bench-sized",
                            TinySpec(image_size=192, patch_size=8, num_layers=4))


def test_eval_json_has_the_documented_keys(bench_sized_dir, tmp_path, capsys):
    recipe = tmp_path / "fastv.json"
    assert main(["baseline", str(bench_sized_dir), "--method", "fastv", "--flops-reduction", "0.4",
                 "--text-tokens", "20", "-o", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["eval", str(bench_sized_dir), "--recipe", str(recipe), "--n", "14", "--batch-size", "7",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("accuracy", "per_family", "n", "flops_reduction", "prefill_ms", "kept_per_layer"):
        assert key in out
    assert out["n"] == 14 and 0.0 <= out["accuracy"] <= 1.0
    assert set(out["per_family"]) == set(FAMILIES)  # 14 items cycle through all 7 families
    assert out["flops_reduction"] > 0.3 and len(out["kept_per_layer"]) == 4
    assert out["kept_per_layer"][0] == 576 and out["kept_per_layer"][-1] < 576


def test_eval_is_deterministic_and_ablation_changes_answers(bench_sized_dir):
    a = evaluate(bench_sized_dir, n=7, batch_size=7, timing_items=1, progress=False)
    b = evaluate(bench_sized_dir, n=7, batch_size=7, timing_items=1, progress=False)
    assert a.per_family == b.per_family and a.flops_reduction == 0.0
    ablated = evaluate(bench_sized_dir, n=7, batch_size=7, timing_items=1, ablate_visual="mean", progress=False)
    assert ablated.ablate_visual == "mean" and ablated.n == 7


@pytest.mark.parametrize(("args", "message"), [
    (["--split", "dev"], "unknown split 'dev'"),
    (["--family", "smell"], "unknown family 'smell'"),
    (["--n", "0"], "--n is 0"),
])
def test_bad_requests(bench_sized_dir, args, message, capsys):
    assert main(["eval", str(bench_sized_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_not_a_llava_dir(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    assert main(["eval", str(tmp_path), "--n", "3"]) == 2
    assert "BertModel" in capsys.readouterr().err
    with pytest.raises(InputError):
        evaluate(tmp_path, n=-1)


def test_weights_fingerprint_follows_the_weights_not_the_folder(bench_sized_dir, tmp_path):
    """Benchmark scripts keep results across runs keyed by this: a retrained model must not match."""
    import shutil

    from safetensors.torch import load_file, save_file

    from edge_prune.bench.evaluate import weights_sha256

    copy = tmp_path / "copy"
    shutil.copytree(bench_sized_dir, copy)
    assert weights_sha256(copy) == weights_sha256(bench_sized_dir)
    (weights_file,) = copy.glob("*.safetensors")
    tensors = load_file(str(weights_file))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(weights_file), metadata={"format": "pt"})
    assert weights_sha256(copy) != weights_sha256(bench_sized_dir)
