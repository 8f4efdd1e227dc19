"""FitPrune fitting: budget met exactly as `edge-prune cost` predicts, calibration errors, and 2 ranks == 1 rank."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edge_prune.cli import main
from edge_prune.cost import estimate
from edge_prune.engine import PrunedEngine
from edge_prune.errors import InputError, RecipeError
from edge_prune.fit.calibration import load_calibration
from edge_prune.fit.fitprune import FitPruneFitter, prefix_to_drop
from edge_prune.models.shapes import load_shape
from edge_prune.recipe import Recipe

N_CALIB = 8


@pytest.fixture(scope="module")
def calib_jsonl(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(1)
    lines = []
    for i in range(N_CALIB):
        Image.fromarray((rng.random((32 + 4 * i, 32, 3)) * 255).astype("uint8")).save(root / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prompt": f"<image>\nwhat is in picture {i}, and where?"}))
    (root / "calib.jsonl").write_text("\n".join(lines) + "\n")
    return root / "calib.jsonl"


def test_prefix_rule_keeps_the_required_mass():
    mass = torch.tensor([0.5, 0.1, 0.05, 0.3, 0.05])
    dropped = prefix_to_drop(mass, reference=1.0, alpha=0.2)  # keep >= 0.8: drop 0.05 + 0.05 + 0.1 = 0.2
    assert sorted(dropped.tolist()) == [1, 2, 4]
    assert prefix_to_drop(mass, reference=1.0, alpha=0.0).numel() == 0
    assert prefix_to_drop(mass, reference=1.0, alpha=1.0).numel() == 5


def test_fit_meets_the_budget_and_matches_cost(tiny_llava_dir, calib_jsonl, tmp_path, capsys):
    out = tmp_path / "recipe.json"
    assert main(["fit", str(tiny_llava_dir), "--flops-reduction", "0.3", "--calib", str(calib_jsonl),
                 "--n", str(N_CALIB), "--batch-size", "4", "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    recipe = Recipe.load(out)
    assert recipe.prune.scorer == "fitprune" and recipe.provenance["method"] == "fitprune"
    assert recipe.prune.fitprune_combine == "either"  # keep a token that stands out in cross or self mass
    assert recipe.provenance["calibration_samples"] == N_CALIB and 0 < recipe.provenance["alpha"] <= 1
    shape = load_shape(tiny_llava_dir)
    text = recipe.provenance["text_tokens"]
    cost = estimate(shape, recipe, accounting="exact", text_tokens=text)
    assert cost.flops_reduction >= 0.3
    assert cost.flops_reduction == pytest.approx(summary["predicted_flops_reduction"], abs=1e-12)
    # The CLI's cost on the written recipe agrees too.
    assert main(["cost", str(tiny_llava_dir), "--recipe", str(out), "--text-tokens", str(text), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pruned_flops"] == cost.pruned_flops
    # And the engine runs it.
    assert PrunedEngine.load(tiny_llava_dir, recipe=out).generate("hi", Image.new("RGB", (32, 32)),
                                                                   max_new_tokens=1).kept[0].per_layer


@pytest.mark.parametrize("accounting", ["fastv", "fitprune"])
def test_fit_under_paper_accountings(tiny_llava_dir, calib_jsonl, accounting):
    engine = PrunedEngine.load(tiny_llava_dir)
    calib = load_calibration(str(calib_jsonl), 4)
    result = FitPruneFitter(engine, calib, 0.4, accounting=accounting, batch_size=4, progress=False).fit()
    text = result.recipe.provenance["text_tokens"]
    assert estimate(engine.adapter.shape, result.recipe, accounting=accounting, text_tokens=text).flops_reduction >= 0.4


def test_first_layer_keeps_every_token_before_it_and_still_meets_the_budget(tiny_llava_dir, calib_jsonl):
    engine = PrunedEngine.load(tiny_llava_dir)
    calib = load_calibration(str(calib_jsonl), 4)
    result = FitPruneFitter(engine, calib, 0.3, batch_size=4, progress=False, first_layer=1).fit()
    assert result.recipe.prune.keep_after[0] == 1.0 and min(result.recipe.prune.keep_after) < 1.0
    assert result.recipe.provenance["first_layer"] == 1
    text = result.recipe.provenance["text_tokens"]
    assert estimate(engine.adapter.shape, result.recipe, text_tokens=text).flops_reduction >= 0.3
    # the guard costs reach: the budget FitPrune alone meets is out of reach from the last layer
    with pytest.raises(RecipeError, match=r"from layer 3 on: the largest reachable reduction is \d+\.\d%"):
        FitPruneFitter(engine, calib, 0.3, batch_size=4, progress=False, first_layer=3).fit()
    with pytest.raises(RecipeError, match="--first-layer 9 must name a decoder layer"):
        FitPruneFitter(engine, calib, 0.3, batch_size=4, progress=False, first_layer=9)


def test_regions_and_ranking_go_into_the_recipe_and_leave_the_schedule(tiny_llava_dir, calib_jsonl):
    engine = PrunedEngine.load(tiny_llava_dir)
    calib = load_calibration(str(calib_jsonl), 4)
    plain = FitPruneFitter(engine, calib, 0.3, batch_size=4, progress=False).fit().recipe
    balanced = FitPruneFitter(engine, calib, 0.3, batch_size=4, progress=False, regions=4, ranking="random").fit().recipe
    assert (balanced.prune.scorer, balanced.prune.regions) == ("random", 4)
    assert (balanced.provenance["ranking"], balanced.provenance["regions"]) == ("random", 4)
    assert (plain.prune.scorer, plain.prune.regions) == ("fitprune", 1)
    assert balanced.prune.keep_after == plain.prune.keep_after  # the search is the same
    merged = FitPruneFitter(engine, calib, 0.3, batch_size=4, progress=False, merge=True).fit()
    assert merged.recipe.prune.merge and merged.recipe.provenance["merge"] is True
    text = merged.recipe.provenance["text_tokens"]
    cost = estimate(engine.adapter.shape, merged.recipe, text_tokens=text)
    assert cost.flops_reduction == merged.predicted_reduction >= 0.3  # the merging FLOPs are in the budget
    assert cost.pruned_breakdown["merge"] > 0
    with pytest.raises(RecipeError, match="prune.regions' is 9, more than the token grid's side"):
        FitPruneFitter(engine, calib, 0.3, batch_size=4, progress=False, regions=9)
    with pytest.raises(RecipeError, match="--ranking 'fastv'"):
        FitPruneFitter(engine, calib, 0.3, batch_size=4, progress=False, ranking="fastv")


def test_unreachable_budget_reports_the_largest(tiny_llava_dir, calib_jsonl):
    engine = PrunedEngine.load(tiny_llava_dir)
    calib = load_calibration(str(calib_jsonl), 2)
    with pytest.raises(RecipeError, match=r"cannot be met .* largest reachable reduction is \d+\.\d%"):
        FitPruneFitter(engine, calib, 0.99, batch_size=2, progress=False).fit()


def test_bad_calibration_records_are_named_by_line(tmp_path, calib_jsonl, capsys):
    good = calib_jsonl.read_text().splitlines()
    (tmp_path / "broken.png").write_text("not an image")
    records = [
        good[0].replace('"0.png"', f'"{calib_jsonl.parent / "0.png"}"'),
        json.dumps({"image": str(tmp_path / "missing.png"), "prompt": "<image>\nq"}),
        json.dumps({"image": str(tmp_path / "broken.png"), "prompt": "<image>\nq"}),
        json.dumps({"image": str(calib_jsonl.parent / "1.png"), "prompt": "no placeholder"}),
        "{not json",
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(records) + "\n")
    with pytest.raises(InputError) as err:
        load_calibration(str(path), 2, warn=True)
    message = str(err.value)
    assert "gave 1 good calibration samples, 2 were requested" in message
    assert f"{path}:2: image file not found" in message and f"{path}:3: unreadable image" in message
    assert f"{path}:4: prompt has no <image> placeholder" in message and f"{path}:5: not valid JSON" in message
    assert load_calibration(str(path), 1).samples[0].prompt == "what is in picture 0, and where?"


def test_two_ranks_give_the_same_recipe_as_one(tiny_llava_dir, calib_jsonl, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    common = ["fit", str(tiny_llava_dir), "--flops-reduction", "0.35", "--calib", str(calib_jsonl),
              "--n", str(N_CALIB), "--batch-size", "2", "--json"]
    assert main([*common, "-o", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(port)]
    # "--" stops torchrun from reading our "--n" as an abbreviation of its own options.
    proc = subprocess.run([*torchrun, "-m", "edge_prune.cli", "--", *common, "-o", str(two)], capture_output=True,
                          text=True, env=env, timeout=600, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = Recipe.load(one), Recipe.load(two)
    assert b.provenance["world_size"] == 2
    assert a.prune.keep_after == b.prune.keep_after and a.provenance["alpha"] == b.provenance["alpha"]


def test_fit_for_a_device_budget_picks_the_smallest_reduction(tiny_llava_dir, calib_jsonl, tmp_path):
    from edge_prune.devices import load_profile
    from edge_prune.predict import predict

    shape, profile = load_shape(tiny_llava_dir), load_profile("pixel-8")
    text = FitPruneFitter(PrunedEngine.load(tiny_llava_dir), load_calibration(str(calib_jsonl), N_CALIB), None,
                          batch_size=4, progress=False).text_tokens
    full = predict(shape, None, profile, quant="q4_0", text_tokens=text).ttft_ms
    common = ["fit", str(tiny_llava_dir), "--profile", "pixel-8", "--quant", "q4_0", "--calib", str(calib_jsonl),
              "--n", str(N_CALIB), "--batch-size", "4", "--json"]

    out = tmp_path / "tight.json"
    assert main([*common, "--ttft-ms", str(0.7 * full), "-o", str(out)]) == 0
    recipe = Recipe.load(out)
    budget = recipe.provenance["device_budget"]
    assert budget["profile"] == "pixel-8" and budget["budget"] == {"ttft_ms": pytest.approx(0.7 * full)}
    assert budget["required_flops_reduction"] == pytest.approx(0.3, abs=1e-9)
    assert predict(shape, recipe, profile, quant="q4_0", text_tokens=text).ttft_ms <= 0.7 * full
    # the smallest reduction that meets it: the same fit under the plain FLOPs budget gives the same recipe
    plain = tmp_path / "plain.json"
    assert main(["fit", str(tiny_llava_dir), "--flops-reduction", str(budget["required_flops_reduction"]),
                 "--calib", str(calib_jsonl), "--n", str(N_CALIB), "--batch-size", "4", "-o", str(plain), "--json"]) == 0
    assert Recipe.load(plain).prune.keep_after == recipe.prune.keep_after

    loose = tmp_path / "loose.json"
    assert main([*common, "--ttft-ms", str(2 * full), "-o", str(loose)]) == 0
    assert Recipe.load(loose).is_identity


@pytest.mark.parametrize("args, message", [
    (["--profile", "pixel-8"], "ttft-ms"),
    (["--ttft-ms", "100"], "exactly one budget"),
    (["--flops-reduction", "0.5", "--profile", "pixel-8", "--ttft-ms", "100"], "exactly one budget"),
    (["--flops-reduction", "0.5", "--ttft-ms", "100"], "--profile"),
    (["--profile", "pixel-8", "--ttft-ms", "0"], "budgets must be numbers > 0"),
    (["--profile", "no-such-phone", "--ttft-ms", "100"], "known profiles: .*pixel-8"),
    (["--profile", "pixel-8", "--ttft-ms", "100", "--quant", "q3"], "unknown --quant"),
])
def test_device_budget_errors(tiny_llava_dir, calib_jsonl, tmp_path, capsys, args, message):
    import re

    out = tmp_path / "r.json"
    assert main(["fit", str(tiny_llava_dir), "--calib", str(calib_jsonl), "--n", "2", "-o", str(out), *args]) == 2
    assert re.search(message, capsys.readouterr().err) and not out.exists()
