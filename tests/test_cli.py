"""The command line as a user drives it: JSON outputs carry the documented keys and agree with the library."""

from __future__ import annotations

import json

from edge_prune.cli import main
from edge_prune.cost import estimate
from edge_prune.models.shapes import load_shape
from edge_prune.recipe import Recipe

LLAVA_7B = "tests/fixtures/llava-1.5-7b/config.json"


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_inspect_json(tiny_next_dir, capsys):
    assert main(["inspect", str(tiny_next_dir), "--json"]) == 0
    info = _json(capsys)
    assert info["architecture"] == "LlavaNextForConditionalGeneration"
    assert info["signature"]["num_layers"] == 4 and info["signature"]["num_visual_tokens"] == 64


def test_cost_json_on_a_7b_config(tmp_path, capsys):
    assert main(["baseline", LLAVA_7B, "--method", "fastv", "--flops-reduction", "0.5", "-o",
                 str(tmp_path / "r.json")]) == 0
    capsys.readouterr()
    for accounting in ("exact", "fastv", "fitprune"):
        assert main(["cost", LLAVA_7B, "--recipe", str(tmp_path / "r.json"), "--accounting", accounting,
                     "--text-tokens", "40", "--json"]) == 0
        out = _json(capsys)
        for key in ("baseline_flops", "pruned_flops", "flops_reduction", "kv_bytes_baseline", "kv_bytes_pruned"):
            assert key in out
        expected = estimate(load_shape(LLAVA_7B), Recipe.load(tmp_path / "r.json"), accounting=accounting,
                            text_tokens=40)
        assert out["pruned_flops"] == expected.pruned_flops
        assert out["pruned_flops"] < out["baseline_flops"] and out["kv_bytes_pruned"] < out["kv_bytes_baseline"]


def test_run_json_reports_kept_tokens_and_timings(tiny_llava_dir, images, tmp_path, capsys):
    image = tmp_path / "img.png"
    images[0].save(image)
    assert main(["baseline", str(tiny_llava_dir), "--method", "fastv", "--flops-reduction", "0.3", "--text-tokens", "20",
                 "-o", str(tmp_path / "r.json")]) == 0
    capsys.readouterr()
    assert main(["run", str(tiny_llava_dir), "--image", str(image), "--prompt", "what colour?",
                 "--recipe", str(tmp_path / "r.json"), "--max-new-tokens", "3", "--json"]) == 0
    out = _json(capsys)
    recipe = Recipe.load(tmp_path / "r.json")
    assert out["kept"]["per_layer"] == recipe.keep_counts(64)
    assert out["kept"]["per_layer"][-1] < 64
    assert set(out["timings"]) >= {"vision_ms", "prefill_ms", "ttft_ms", "decode_tok_s"}
    assert 1 <= len(out["tokens"]) <= 3


def test_cost_rejects_negative_text_tokens(capsys):
    assert main(["cost", LLAVA_7B, "--text-tokens", "-3"]) == 2
    assert "--text-tokens is -3" in capsys.readouterr().err
