"""Device profiles, predictions, budget verdicts (exit codes 0/1/2) and the profiling report."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from edge_prune.cli import main
from edge_prune.devices import builtin_names, load_profile, parse_profile
from edge_prune.errors import ProfileError

LLAVA_7B = "tests/fixtures/llava-1.5-7b/config.json"
SHIPPED = {"jetson-orin-nano-8gb", "jetson-agx-orin-64gb", "raspberry-pi-5", "snapdragon-8-gen-3", "pixel-8",
           "iphone-15-pro", "host"}


def test_every_shipped_profile_is_valid(capsys):
    assert SHIPPED <= set(builtin_names())
    for name in builtin_names():
        p = load_profile(name)
        assert p.name == name and p.budget.ttft_ms > 0 and p.memory.bandwidth_gbs > 0
    assert main(["profiles"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in SHIPPED)


def test_unknown_profile_lists_the_known_ones(capsys):
    assert main(["profile", "--config", LLAVA_7B, "--profile", "toaster"]) == 2
    err = capsys.readouterr().err
    assert "unknown profile 'toaster'" in err and "jetson-orin-nano-8gb" in err


def test_malformed_toml_names_line_and_field(tmp_path, capsys):
    text = load_profile("pixel-8").source
    good = open("profiles/pixel-8.toml").read()
    bad = tmp_path / "bad.toml"
    bad.write_text(good.replace("fp16 = 3.2", "fp16 = = 3.2"))
    assert main(["profile", "--config", LLAVA_7B, "--profile", str(bad)]) == 2
    assert re.search(r"malformed TOML: .*line \d+", capsys.readouterr().err)
    with pytest.raises(ProfileError, match="field 'memory.bandwidth_gbs' is missing"):
        parse_profile(good.replace("bandwidth_gbs = 68.0", ""), "x.toml")
    assert text.endswith("pixel-8.toml")


def test_budgets_must_be_positive(tmp_path, capsys):
    good = open("profiles/pixel-8.toml").read()
    with pytest.raises(ProfileError, match="budget 'ttft_ms' is -5; budgets must be numbers > 0"):
        parse_profile(good.replace("ttft_ms = 2500", "ttft_ms = -5"), "x.toml")
    assert main(["profile", "--config", LLAVA_7B, "--profile", "pixel-8", "--ttft-ms", "0"]) == 2
    assert "budget 'ttft_ms' is 0.0" in capsys.readouterr().err


def test_target_without_manifest_or_config(tmp_path, capsys):
    assert main(["profile", str(tmp_path), "--profile", "host"]) == 2
    assert "neither manifest.json" in capsys.readouterr().err


def test_7b_prediction_on_jetson_with_and_without_a_recipe(tmp_path, capsys):
    recipe = tmp_path / "r60.json"
    assert main(["baseline", LLAVA_7B, "--method", "fastv", "--flops-reduction", "0.6", "-o", str(recipe)]) == 0
    capsys.readouterr()
    out = {}
    for name, extra in (("full", []), ("pruned", ["--recipe", str(recipe)])):
        code = main(["profile", "--config", LLAVA_7B, "--profile", "jetson-orin-nano-8gb", "--quant", "q4_0",
                     "--json", *extra])
        out[name] = json.loads(capsys.readouterr().out)
        assert code in (0, 1) and code == (0 if out[name]["verdict"]["passed"] else 1)
    full, pruned = out["full"]["prediction"], out["pruned"]["prediction"]
    assert set(full["memory_mb"]) == {"weights", "kv_cache", "activations", "runtime", "total"}
    assert 3500 < full["memory_mb"]["weights"] < 4500  # 7B at ~4.5 bits/weight
    assert pruned["memory_mb"]["kv_cache"] < full["memory_mb"]["kv_cache"]
    assert pruned["prefill_ms"] < 0.5 * full["prefill_ms"] and pruned["ttft_ms"] < full["ttft_ms"]
    assert all(c["source"] == "predicted" for c in out["full"]["verdict"]["checks"])


def test_measured_profile_and_failing_budget_exit_code(tiny_llava_dir, images, tmp_path, capsys):
    image = tmp_path / "img.png"
    images[0].save(image)
    args = ["profile", str(tiny_llava_dir), "--profile", "host", "--runs", "3", "--warmup", "1",
            "--image", str(image), "--prompt", "what colour?", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    m = out["measurement"]
    assert m["runs"] == 3 and m["peak_rss_mb"] > 50 and m["stages"]["ttft_ms"]["median"] > 0
    assert {c["source"] for c in out["verdict"]["checks"]} == {"measured"}
    assert main([*args, "--ttft-ms", "0.001"]) == 1  # nothing answers in a microsecond
    capsys.readouterr()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is installed by scripts/setup.sh; not found on PATH")
def test_report_renders_in_headless_chromium(tiny_llava_dir, images, tmp_path, capsys):
    image = tmp_path / "img.png"
    images[0].save(image)
    evals = tmp_path / "evals.json"
    evals.write_text(json.dumps([{"name": "unpruned", "accuracy": 0.95, "flops_reduction": 0.0},
                                 {"name": "fastv-60", "accuracy": 0.90, "flops_reduction": 0.6}]))
    report = tmp_path / "out" / "report.html"
    main(["profile", str(tiny_llava_dir), "--profile", "host", "--runs", "2", "--warmup", "0", "--image",
          str(image), "--prompt", "hi", "--report", str(report), "--eval", str(evals)])
    capsys.readouterr()
    assert report.is_file() and report.with_suffix(".json").is_file() and report.with_suffix(".md").is_file()
    # Ask the browser which embedded plots actually decoded, by the image's alt text.
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace(
        "</body>", "<script>document.body.dataset.loaded=[...document.images].filter(i=>i.complete&&"
                   "i.naturalWidth>100).map(i=>i.alt).join(',')</script></body>"))
    profile_dir = tmp_path / "chrome"
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile_dir}", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    loaded = set(re.search(r'data-loaded="([^"]*)"', dom).group(1).split(","))
    assert loaded == {"kept-per-layer", "latency-by-stage", "accuracy-vs-flops", "memory-over-time"}
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile_dir}", f"--screenshot={shot}",
                    "--window-size=1200,1600", report.as_uri()], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_required_reduction_is_the_smallest_that_meets_the_ttft_budget():
    from edge_prune.fit.baselines import baseline_recipe
    from edge_prune.models.shapes import load_shape
    from edge_prune.predict import predict, required_reduction

    shape, jetson = load_shape(LLAVA_7B), load_profile("jetson-orin-nano-8gb")
    needed = required_reduction(shape, jetson, ttft_ms=1500, quant="q4_0")
    assert 0.2 < needed < 0.8
    meets = baseline_recipe(shape, "fastv", needed, k=2)
    assert predict(shape, meets, jetson, quant="q4_0").ttft_ms <= 1500
    short = baseline_recipe(shape, "fastv", needed - 0.05, k=2)
    assert predict(shape, short, jetson, quant="q4_0").ttft_ms > 1500
    assert required_reduction(shape, jetson, ttft_ms=60_000, quant="q4_0") == 0.0  # already fast enough
    with pytest.raises(ProfileError, match="--ttft-ms is -1"):
        required_reduction(shape, jetson, ttft_ms=-1)
    with pytest.raises(ProfileError, match="more than dropping visual tokens can save"):
        required_reduction(shape, jetson, peak_rss_mb=1000, quant="q4_0")


def test_profiles_take_an_optional_fixed_cost_per_layer():
    good = open("profiles/pixel-8.toml").read()
    assert load_profile("pixel-8").compute.layer_overhead_ms == 0.0
    with_overhead = good.replace("[compute]\n", "[compute]\nlayer_overhead_ms = 0.5\n")
    assert parse_profile(with_overhead, "x.toml").compute.layer_overhead_ms == 0.5
    with pytest.raises(ProfileError, match="field 'compute.layer_overhead_ms' is -1"):
        parse_profile(good.replace("[compute]\n", "[compute]\nlayer_overhead_ms = -1\n"), "x.toml")


def test_fixed_layer_cost_adds_per_layer_run_and_per_drop_and_the_ttft_fit_leaves_it_out():
    from dataclasses import replace

    from edge_prune.fit.baselines import baseline_recipe
    from edge_prune.models.shapes import load_shape
    from edge_prune.predict import predict, required_reduction

    shape, jetson = load_shape(LLAVA_7B), load_profile("jetson-orin-nano-8gb")
    slow = replace(jetson, compute=replace(jetson.compute, layer_overhead_ms=2.0))
    recipe = baseline_recipe(shape, "fastv", 0.6, k=2)  # drops once, after layer 1
    for r, drops in ((None, 0), (recipe, 1)):
        base, more = predict(shape, r, jetson, quant="q4_0"), predict(shape, r, slow, quant="q4_0")
        assert more.vision_ms - base.vision_ms == pytest.approx(2.0 * (shape.vision.layers_run + 1))
        assert more.prefill_ms - base.prefill_ms == pytest.approx(2.0 * (shape.num_layers + drops))
        assert more.fixed_ms == pytest.approx(2.0 * (shape.vision.layers_run + 1 + shape.num_layers + drops))
    # the fixed part does not shrink with FLOPs, so the same budget needs a larger reduction
    assert required_reduction(shape, slow, ttft_ms=1500, quant="q4_0") > required_reduction(shape, jetson, ttft_ms=1500, quant="q4_0")
    needed = required_reduction(shape, slow, ttft_ms=1500, quant="q4_0")
    assert predict(shape, baseline_recipe(shape, "fastv", needed, k=2), slow, quant="q4_0").ttft_ms <= 1500 + 2.0
    with pytest.raises(ProfileError, match="below the .* ms the model's layers cost"):
        required_reduction(shape, slow, ttft_ms=100, quant="q4_0")


def test_host_layer_probe_separates_rate_from_fixed_cost(monkeypatch):
    """On a 'machine' whose layer takes FLOPs / 2 GFLOP/s + 3 ms, the probe recovers both numbers,
    even when a busy host makes every fifth call three times slower (the medians must absorb it).

    The clock is simulated: a real sleep overshoots by a millisecond or more on a loaded CI host,
    which is the fixed cost this test measures."""
    import itertools
    import types

    import edge_prune.predict as predict_mod
    from edge_prune.cost import decoder_layer_flops
    from edge_prune.models.shapes import load_shape

    shape = load_shape("benchmarks/models/toyvqa-llava")
    clock = {"now": 0.0}
    calls = itertools.count()

    def fake_layer(_shape):
        def run(tokens, chain=predict_mod.PROBE_CHAIN):
            slow = 3.0 if next(calls) % 5 == 4 else 1.0
            clock["now"] += slow * chain * (decoder_layer_flops(shape, tokens) / 2e9 + 0.003)
        return run

    monkeypatch.setattr(predict_mod, "_torch_layer", fake_layer)
    monkeypatch.setattr(predict_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    rate, fixed_ms = predict_mod._layer_probe(shape, 300, seconds=0.5)
    assert rate == pytest.approx(2e9, rel=0.02)
    assert fixed_ms == pytest.approx(3.0, rel=0.02)


def test_host_probe_times_the_runtimes_own_prefill_when_given_one(monkeypatch):
    """With the runtime's text-only prefill at hand, the probe times it (every decoder layer per call)
    rather than a bare layer: a prefill costing num_layers x (FLOPs / 1 GFLOP/s + 0.5 ms) gives those
    per-layer figures, and no stand-in layer is built."""
    import types

    import edge_prune.predict as predict_mod
    from edge_prune.cost import decoder_layer_flops
    from edge_prune.models.shapes import load_shape

    shape = load_shape("benchmarks/models/toyvqa-llava")
    clock = {"now": 0.0}
    asked: list[int] = []

    def prefill(tokens):
        asked.append(tokens)
        clock["now"] += shape.num_layers * (decoder_layer_flops(shape, tokens) / 1e9 + 0.0005)

    def no_layer(_shape):
        raise AssertionError("the bare-layer probe ran although the runtime's prefill was given")

    monkeypatch.setattr(predict_mod, "_torch_layer", no_layer)
    monkeypatch.setattr(predict_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    rate, fixed_ms = predict_mod._layer_probe(shape, 589, seconds=0.5, prefill=prefill)
    assert rate == pytest.approx(1e9, rel=0.01)
    assert fixed_ms == pytest.approx(0.5, rel=0.01)
    assert set(asked) == {589, 147, 36}


def test_engine_text_prefill_runs_every_layer_on_a_text_only_prompt(tiny_llava_dir):
    from edge_prune.engine import PrunedEngine

    engine = PrunedEngine.load(tiny_llava_dir)
    out = engine.text_prefill(12)
    assert out.logits.shape[0] == 1 and len(out.caches) == engine.adapter.num_layers
    assert all(c.key.shape[2] == 12 for c in out.caches)
    assert out.kept[0].visual_tokens == 0
