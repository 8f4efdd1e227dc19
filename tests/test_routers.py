"""DyVTE-style exit routers: recipe contract, engine == slow reference in every composition, expected-FLOPs
cost, bad files, and fitting."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from edge_prune.cli import main
from edge_prune.cost import decoder_parameters, estimate, prefill_breakdown, token_schedule
from edge_prune.engine import PrunedEngine
from edge_prune.errors import RecipeError
from edge_prune.fit.calibration import load_calibration
from edge_prune.fit.routers import (ExitLabels, RouterConfig, RouterFitter, check_router_budget,
                                    default_router_rank)
from edge_prune.fit.training import TrainingInterrupted
from edge_prune.models.adapter import LlavaAdapter
from edge_prune.recipe import ExitSpec, GuideSpec, PruneSpec, Recipe
from edge_prune.scoring import ExitRouter, GuideSet
from tests.conftest import PROMPTS
from tests.reference import reference_logits
from tests.test_guides import write_calib

EXIT_LAYERS = [0, 1, 2]
RANK = 4


def exit_recipe(adapter: LlavaAdapter, folder: Path, threshold: float, base: str = "none",
                rates=(0.2, 0.1, 0.1), frozen: bool = False) -> Path:
    """A random (untrained) router, optionally on a fitprune or guide schedule, saved beside a recipe;
    `frozen`: recipe exit.frozen."""
    sig = adapter.signature()
    router = ExitRouter(sig.hidden_size, EXIT_LAYERS, RANK)
    router.reset_parameters(5)
    with torch.no_grad():  # spread the layers' probabilities so thresholds pick different layers
        router.layer_bias.copy_(torch.tensor([-1.0, 0.0, 1.0]))
        router.b1.copy_(torch.linspace(-1, 1, RANK))
    router.save(folder / "router.safetensors", sig.num_layers)
    prune = PruneSpec(scorer="none", keep_after=[1.0] * 4)
    if base == "fitprune":
        prune = PruneSpec(scorer="fitprune", keep_after=[1.0, 0.5, 0.5, 0.25])
    elif base == "guide":
        guides = GuideSet(sig.hidden_size, [1, 3], RANK)
        guides.reset_parameters(3)
        guides.save(folder / "guides.safetensors", sig.num_layers)
        prune = PruneSpec(scorer="guide", keep_after=[1.0, 0.5, 0.5, 0.25],
                          guides=GuideSpec("guides.safetensors", [1, 3], RANK))
    recipe = Recipe(model=sig, prune=prune,
                    exit=ExitSpec("router.safetensors", EXIT_LAYERS, threshold, RANK, list(rates), frozen=frozen))
    return recipe.save(folder / "recipe.json")


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return LlavaAdapter.load(tiny_llava_dir)


@pytest.fixture(scope="module")
def llava_next(tiny_next_dir):
    return LlavaAdapter.load(tiny_next_dir)


@pytest.mark.parametrize(("kind", "base", "frozen"), [
    ("llava", "none", False), ("llava", "fitprune", False), ("llava", "guide", False), ("llava_next", "guide", False),
    ("llava", "none", True), ("llava", "fitprune", True), ("llava_next", "guide", True)])
def test_exits_match_slow_reference(base, kind, frozen, llava, llava_next, images, tmp_path):
    """Prefill, decode and kept counts of exiting requests; with exit.frozen the exited visual tokens stay
    as keys and values at their states when they left (the reference keeps them and resets their rows)."""
    adapter = llava if kind == "llava" else llava_next
    batch = adapter.prepare(PROMPTS, images)
    seen_exits = set()
    thresholds = (0.0, 0.35, 0.5, 1.0) if kind == "llava" else (0.0, 0.5)
    for threshold in thresholds:
        path = exit_recipe(adapter, tmp_path, threshold, base, frozen=frozen)
        recipe = Recipe.load(path)
        engine = PrunedEngine(adapter, recipe)
        guides = load_file(tmp_path / "guides.safetensors") if base == "guide" else None
        ref, alive, exits = reference_logits(adapter, recipe, batch, steps=2, guides=guides,
                                             router=load_file(tmp_path / "router.safetensors"), return_exits=True)
        pre = engine.prefill(batch)
        assert [k.exit_layer for k in pre.kept] == exits
        seen_exits.update(exits)
        assert (pre.logits - ref[0]).abs().max().item() <= 1e-4
        token, pos = pre.logits.argmax(-1), pre.next_positions.clone()
        for step in range(1, 2):
            logits = engine.decode_step(pre.caches, token, pos)
            pos += 1
            assert (logits - ref[step]).abs().max().item() <= 1e-4
            token = logits.argmax(-1)
        for b, kept in enumerate(pre.kept):
            assert alive[b] == [kept.visual_tokens, *kept.per_layer[:-1]]
            if kept.exit_layer is not None:
                assert kept.per_layer[kept.exit_layer:] == [0] * (4 - kept.exit_layer)
    if kind == "llava":  # the thresholds gave early, late and no exits
        assert {0, None} <= seen_exits and len(seen_exits) >= 3


def test_layers_after_an_exit_hold_no_visual_tokens_in_their_kv_cache(llava, images, tmp_path):
    engine = PrunedEngine(llava, Recipe.load(exit_recipe(llava, tmp_path, 0.0)))
    batch = llava.prepare(PROMPTS[:1], images[:1])
    pre = engine.prefill(batch)
    assert pre.kept[0].exit_layer == 0
    n_prompt = int(batch.attention_mask.sum())
    lengths = [int(c.valid.sum()) for c in pre.caches]
    assert lengths == [n_prompt] + [n_prompt - 64] * 3  # layer 0 saw the image, later layers none
    out = engine.generate(PROMPTS[0], images[0], max_new_tokens=3)
    assert out.kept[0].exit_layer == 0


def test_threshold_one_never_exits_even_a_saturated_router(llava, images, tmp_path):
    """A fit that finds no safe threshold stores 1.0; a float32 sigmoid reads exactly 1.0 from a large
    logit, and such a request must still not exit (it did, while the recipe's exit rates said none)."""
    path = exit_recipe(llava, tmp_path, 1.0)
    router = ExitRouter.load(tmp_path / "router.safetensors", llava.signature(), EXIT_LAYERS, RANK)
    with torch.no_grad():
        router.layer_bias.fill_(100.0)  # sigmoid(100) == 1.0 in float32
    batch = llava.prepare(PROMPTS[:1], images[:1])
    never = PrunedEngine(llava, Recipe.load(path), router=router).prefill(batch)
    assert never.kept[0].exit_layer is None
    almost = Recipe.load(path)
    almost.exit.threshold = 0.999999
    assert PrunedEngine(llava, almost, router=router).prefill(batch).kept[0].exit_layer == 0


def test_loss_slack_relaxes_only_the_loss_rule(llava, tmp_path):
    """--loss-slack adds nats to DyVTE's 1.03 x loss bound: a huge slack leaves answer agreement alone."""
    calib = load_calibration(str(write_calib(tmp_path, 4, answers=False)), 4)
    engine = PrunedEngine(llava, Recipe.identity(llava.signature()))
    fitter = RouterFitter.__new__(RouterFitter)  # the label pass only, as above
    fitter.engine, fitter.adapter, fitter.base, fitter.calibration = engine, llava, engine.recipe, calib
    fitter.sig, fitter.layers = llava.signature(), EXIT_LAYERS
    fitter.config = RouterConfig(micro_batch=4, loss_slack=1e9)
    slack = fitter._collect_batch([0, 1, 2, 3])
    agree = slack.agree
    assert slack.labels.bool().tolist() == agree.tolist()
    fitter.config = RouterConfig(micro_batch=4, labels="agreement")
    assert fitter._collect_batch([0, 1, 2, 3]).labels.bool().tolist() == agree.tolist()
    fitter.config = RouterConfig(micro_batch=4)
    strict = fitter._collect_batch([0, 1, 2, 3]).labels.bool()
    assert not (strict & ~agree).any()  # DyVTE's labels are agreement and more
    with pytest.raises(RecipeError, match="--loss-slack"):
        RouterFitter(engine, calib, RouterConfig(loss_slack=-0.1), progress=False)
    with pytest.raises(RecipeError, match="--exit-labels 'loss'"):
        RouterFitter(engine, calib, RouterConfig(labels="loss"), progress=False)
    with pytest.raises(RecipeError, match="does not use; drop one of them"):
        RouterFitter(engine, calib, RouterConfig(labels="agreement", loss_slack=0.01), progress=False)


def test_recipe_exit_round_trip_and_validation(llava, tmp_path):
    path = exit_recipe(llava, tmp_path, 0.5)
    data = json.loads(path.read_text())
    assert data["exit"] == {"router": "router.safetensors", "layers": EXIT_LAYERS, "threshold": 0.5, "rank": RANK,
                            "exit_rates": [0.2, 0.1, 0.1]}
    assert Recipe.load(path).to_dict() == data
    cases = [
        (lambda d: d["exit"].update(threshold=1.5), "'exit.threshold' is 1.5"),
        (lambda d: d["exit"].update(layers=[0, 9]), r"'exit.layers' is \[0, 9\], expected layer indices in \[0, 3\]"),
        (lambda d: d["exit"].update(exit_rates=[0.9, 0.9, 0.0]), "summing to at most 1"),
        (lambda d: d["exit"].update(exit_rates=[0.1]), "has 1 entries, expected one per candidate layer"),
        (lambda d: d["exit"].update(router="gone.safetensors"), "'exit.router' names 'gone.safetensors'"),
        (lambda d: d["exit"].update(bogus=1), r"'exit' has unknown keys \['bogus'\]"),
    ]
    for mutate, message in cases:
        bad = json.loads(json.dumps(data))
        mutate(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(RecipeError, match=message):
            Recipe.load(tmp_path / "bad.json")


def test_router_file_that_does_not_match_the_model(llava, tmp_path):
    path = exit_recipe(llava, tmp_path, 0.5)
    sig = llava.signature()
    ExitRouter(32, EXIT_LAYERS, RANK).save(tmp_path / "router.safetensors", sig.num_layers)
    with pytest.raises(RecipeError, match=r"router.safetensors: the exit router were trained for another model: "
                                          r"hidden size 32 \(model has 64\)"):
        PrunedEngine(llava, Recipe.load(path))
    ExitRouter(sig.hidden_size, [0, 1], RANK).save(tmp_path / "router.safetensors", sig.num_layers)
    with pytest.raises(RecipeError, match=r"holds layers \[0, 1\] at rank 4, but the recipe expects layers \[0, 1, 2\]"):
        PrunedEngine(llava, Recipe.load(path))
    (tmp_path / "router.safetensors").write_bytes(b"garbage" * 4)
    with pytest.raises(RecipeError, match="not a readable safetensors exit router file"):
        PrunedEngine(llava, Recipe.load(path))


def test_expected_flops_over_the_exit_distribution(llava, tmp_path):
    recipe = Recipe.load(exit_recipe(llava, tmp_path, 0.5, base="fitprune"))
    shape, text = llava.shape, 20
    report = estimate(shape, recipe, text_tokens=text)
    shares = {0: 0.2, 1: 0.1, 2: 0.1, None: 0.6}
    per_exit = {l: sum(prefill_breakdown(shape, recipe, text, exit_layer=l).values()) for l in shares}
    assert report.pruned_flops == pytest.approx(sum(s * per_exit[l] for l, s in shares.items()), abs=8)
    assert [(r["exit_layer"], r["share"]) for r in report.exits] == [(0, 0.2), (1, 0.1), (2, 0.1), (None, 0.6)]
    # An exit after layer 1 costs exactly the schedule with no visual tokens from layer 1's MLP on, plus the
    # router at layers 0 and 1.
    sched = token_schedule(shape, recipe, text, exit_layer=1)
    assert sched.visual_in == (64, 64, 0, 0) and sched.visual_out == (64, 0, 0, 0)
    plain = Recipe(model=recipe.model, prune=PruneSpec(scorer="fitprune", keep_after=[1.0, 0.0, 0.0, 0.0]))
    router_flops = 2 * 2 * (2 * shape.hidden_size * RANK + 2 * RANK)
    assert per_exit[1] == sum(prefill_breakdown(shape, plain, text).values()) + router_flops
    # A measured distribution overrides the recipe's.
    assert estimate(shape, recipe, text_tokens=text, exits={1: 1.0}).pruned_flops == per_exit[1]
    assert estimate(shape, recipe, text_tokens=text, exits={None: 1.0}).pruned_flops == per_exit[None]
    assert "exit after layer 0" in __import__("edge_prune.cost", fromlist=["format_report"]).format_report(report)


# ---- fitting ---------------------------------------------------------------------------------------




@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_calib(tmp_path_factory.mktemp("router-calib"), 16)


def test_router_parameters_stay_within_one_percent_of_the_decoder(llava):
    shape = llava.shape
    rank = default_router_rank(shape, [0, 1, 2])
    assert check_router_budget(shape, [0, 1, 2], rank) <= 0.01 * decoder_parameters(shape)
    with pytest.raises(RecipeError, match=r"over the 1% budget"):
        check_router_budget(shape, [0, 1, 2], rank * 4)
    from edge_prune.models.shapes import load_shape

    big = load_shape(Path(__file__).parent / "fixtures" / "llava-1.5-7b" / "config.json")
    layers = list(range(31))
    # DyVTE's own router is 2d x 2048 + 2048 x 2 per layer (~537M at 7B); ours at rank 64, shared:
    assert check_router_budget(big, layers, default_router_rank(big, layers)) < 0.0002 * decoder_parameters(big)


@pytest.mark.parametrize("base", ["none", "fitprune"])
def test_labels_follow_dyvtes_rule_on_the_engines_exits(llava, tmp_path, base):
    """Labels from the shared-prefix branches equal running the engine with a forced exit at each layer."""
    calib = load_calibration(str(write_calib(tmp_path, 4, answers=False)), 4)
    base_recipe = Recipe.identity(llava.signature()) if base == "none" else Recipe(
        model=llava.signature(), prune=PruneSpec(scorer="fitprune", keep_after=[1.0, 0.5, 0.5, 0.25]))
    engine = PrunedEngine(llava, base_recipe)
    config = RouterConfig(micro_batch=4)
    fitter = RouterFitter.__new__(RouterFitter)  # the label pass only; too few samples for a held-out split
    fitter.engine, fitter.adapter, fitter.base, fitter.calibration, fitter.config = (
        engine, llava, base_recipe, calib, config)
    fitter.sig, fitter.layers = llava.signature(), EXIT_LAYERS
    got = fitter._collect_batch([0, 1, 2, 3])
    labels, eligible, agree = got.labels, got.eligible, got.agree
    batch = llava.prepare([s.prompt for s in calib.samples], [s.image for s in calib.samples])
    normal = engine.prefill(batch).logits
    target = normal.argmax(-1)
    for j, layer in enumerate(EXIT_LAYERS):
        forced = ExitRouter(llava.signature().hidden_size, [layer], 1)
        torch.nn.init.zeros_(forced.w1)
        recipe = Recipe(model=base_recipe.model, prune=base_recipe.prune,
                        exit=ExitSpec("unused.safetensors", [layer], 0.0, 1))
        exited = PrunedEngine(llava, recipe, router=forced).prefill(batch)
        assert [k.exit_layer for k in exited.kept] == [layer] * 4
        same = exited.logits.argmax(-1) == target
        ratio_ok = F.cross_entropy(exited.logits, target, reduction="none") < 1.03 * F.cross_entropy(
            normal, target, reduction="none")
        assert agree[:, j].tolist() == same.tolist()
        assert labels[:, j].bool().tolist() == (same & ratio_ok).tolist()
    assert bool(eligible.all())


def test_threshold_is_the_cheapest_within_the_held_out_risk(llava, calib):
    fitter = RouterFitter(PrunedEngine(llava), load_calibration(str(calib), 16),
                          RouterConfig(max_risk=0.25, micro_batch=8), progress=False)
    n = 16
    router = ExitRouter(64, EXIT_LAYERS, fitter.rank)
    torch.manual_seed(0)
    feats = torch.randn(n, 3, 128)
    labels = (torch.rand(n, 3) > 0.4).float()
    data = ExitLabels(feats, labels, torch.ones(n, 3, dtype=torch.bool), labels.bool())
    threshold, risk, rates, curve = fitter.choose_threshold(router, data, text_tokens=20)
    assert risk <= 0.25 and sum(rates) <= 1.0
    chosen = [c for c in curve if min(c["threshold"], 1.0) == pytest.approx(threshold)]
    assert chosen and chosen[0]["risk"] == risk
    assert chosen[0]["flops_reduction"] == max(c["flops_reduction"] for c in curve if c["risk"] <= 0.25)
    assert any(c["risk"] > 0.25 for c in curve)  # the risk bound actually excluded cheaper thresholds


def test_router_trained_on_noisy_labels_keeps_held_out_requests_apart(llava, calib):
    """A few hundred samples with noisy labels must not overfit the router into probabilities of exactly
    1.0: tied there, the threshold search can no longer tell requests apart (see RouterConfig.weight_decay)."""
    fitter = RouterFitter(PrunedEngine(llava), load_calibration(str(calib), 16), RouterConfig(), progress=False)
    gen = torch.Generator().manual_seed(0)
    n, d2 = 400, 2 * llava.shape.hidden_size
    feats = torch.randn(n, 3, d2, generator=gen)
    clean = feats[..., :8].sum(-1) > 0
    noisy = clean ^ (torch.rand(n, 3, generator=gen) < 0.1)
    data = ExitLabels(feats, noisy.float(), torch.ones(n, 3, dtype=torch.bool), noisy)
    fitter.train_ids, fitter.heldout = list(range(300)), list(range(300, n))
    router = fitter.train(data)
    probs = fitter.probabilities(router, data, fitter.heldout)
    assert int((probs >= 1.0).sum()) == 0
    assert len(set(probs.flatten().tolist())) == probs.numel()
    # and it still ranks: held-out requests whose clean label says exit score higher
    truth = clean[300:]
    assert float(probs[truth].mean()) > float(probs[~truth].mean()) + 0.3


def test_fit_on_a_fitprune_recipe_resumes_and_runs(tiny_llava_dir, llava, calib, tmp_path, images):
    base = Recipe(model=llava.signature(), prune=PruneSpec(scorer="fitprune", keep_after=[1.0, 0.5, 0.5, 0.25]),
                  provenance={"method": "fitprune"})
    data = load_calibration(str(calib), 16)
    config = RouterConfig(micro_batch=4, max_risk=0.25, checkpoint_every=1, train_steps=50)
    straight = RouterFitter(PrunedEngine(llava, base), data, config, progress=False).fit()
    with pytest.raises(TrainingInterrupted):
        RouterFitter(PrunedEngine(llava, base), data, config, progress=False, work_dir=tmp_path).fit(stop_after=2)
    fitter = RouterFitter(PrunedEngine(llava, base), data, config, progress=False, work_dir=tmp_path)
    resumed = fitter.fit()
    assert resumed.threshold == straight.threshold
    for a, b in zip(straight.router.parameters(), resumed.router.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    path = fitter.save(resumed, tmp_path / "out" / "recipe.json")
    recipe = Recipe.load(path)
    assert recipe.prune.keep_after == base.prune.keep_after and recipe.exit.layers == EXIT_LAYERS
    assert recipe.provenance["method"] == "fitprune+dyvte"
    assert recipe.provenance["router_parameters"] <= 0.01 * decoder_parameters(llava.shape)
    out = PrunedEngine.load(tiny_llava_dir, recipe=path).generate(PROMPTS, images, max_new_tokens=2)
    assert all(k.exit_layer in (None, *EXIT_LAYERS) for k in out.kept)


def test_cli_on_guides_and_two_ranks_agree(tiny_llava_dir, llava, calib, tmp_path):
    base = exit_recipe(llava, tmp_path / "base", 0.5, base="guide")
    data = json.loads(base.read_text())
    data["exit"] = None
    base.write_text(json.dumps(data))
    common = ["fit", str(tiny_llava_dir), "--method", "dyvte", "--calib", str(calib), "--n", "16",
              "--base-recipe", str(base), "--batch-size", "4", "--max-risk", "0.25", "--json"]
    assert main([*common, "-o", str(tmp_path / "one")]) == 0
    one = Recipe.load(tmp_path / "one" / "recipe.json")
    assert one.prune.scorer == "guide" and one.exit is not None
    assert (tmp_path / "one" / "guides.safetensors").is_file()  # the base recipe's guides came along
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(port)]
    proc = subprocess.run([*torchrun, "-m", "edge_prune.cli", "--", *common, "-o", str(tmp_path / "two")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = Recipe.load(tmp_path / "two" / "recipe.json")
    assert two.provenance["training"]["world_size"] == 2
    assert two.exit.threshold == pytest.approx(one.exit.threshold, abs=1e-5)
    assert two.exit.exit_rates == pytest.approx(one.exit.exit_rates)
    a, b = load_file(tmp_path / "one" / "router.safetensors"), load_file(tmp_path / "two" / "router.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_dyvte_rejects_a_router_recipe_and_a_fastv_base(tiny_llava_dir, llava, calib, tmp_path, capsys):
    path = exit_recipe(llava, tmp_path, 0.5)
    code = main(["fit", str(tiny_llava_dir), "--method", "dyvte", "--calib", str(calib), "--n", "16",
                 "--base-recipe", str(path), "-o", str(tmp_path / "o")])
    assert code == 2 and "already has an exit router" in capsys.readouterr().err


def test_eval_reports_exit_layers_and_mean_flops(tiny_llava_dir, llava, tmp_path):
    from edge_prune.bench.evaluate import evaluate, format_result

    path = exit_recipe(llava, tmp_path, 0.35)
    result = evaluate(tiny_llava_dir, recipe=path, n=7, batch_size=7, timing_items=1, progress=False)
    assert sum(result.exit_layers.values()) == 7
    assert sum(sum(c.values()) for c in result.exit_layers_per_family.values()) == 7
    measured = {None if k == "none" else int(k): v / 7 for k, v in result.exit_layers.items()}
    expected = estimate(llava.shape, Recipe.load(path), text_tokens=round(result.text_tokens), exits=measured)
    assert result.pruned_flops == expected.pruned_flops
    assert "exit layers (FLOPs are per-request means)" in format_result(result)


def test_answer_checks_match_greedy_answers_with_and_without_an_exit():
    """The label pass's answer checks (used to score routers in accuracy) equal the engine's greedy
    answers against the reference: on the committed benchmark model, where answers are right without an
    exit and often wrong after an early one, so both outcomes occur."""
    from edge_prune.bench.evaluate import chat_prompt

    model = Path(__file__).resolve().parent.parent / "benchmarks" / "models" / "toyvqa-llava"
    engine = PrunedEngine.load(model)
    adapter = engine.adapter
    calib = load_calibration("bench:calib", 8)
    fitter = RouterFitter.__new__(RouterFitter)  # the label pass only
    fitter.engine, fitter.adapter, fitter.base, fitter.calibration = engine, adapter, engine.recipe, calib
    fitter.sig, fitter.layers = adapter.signature(), [0, 2, 4]
    fitter.config = RouterConfig(micro_batch=8, labels="agreement")
    got = fitter._collect_batch(list(range(8)))
    tok = adapter.processor.tokenizer
    prompts = [chat_prompt(s.prompt) for s in calib.samples]
    images = [s.image for s in calib.samples]

    def right(result) -> list[bool]:
        return [tokens[:len(ref) + 1] == ref + [tok.eos_token_id]
                for tokens, ref in zip(result.tokens, (tok(f" {s.answer}", add_special_tokens=False)["input_ids"]
                                                       for s in calib.samples))]

    assert got.normal_correct.tolist() == right(engine.generate(prompts, images, max_new_tokens=4))
    for j, layer in enumerate(fitter.layers):
        forced = ExitRouter(fitter.sig.hidden_size, [layer], 1)
        torch.nn.init.zeros_(forced.w1)
        recipe = Recipe(model=fitter.sig, prune=engine.recipe.prune,
                        exit=ExitSpec("unused.safetensors", [layer], 0.0, 1))
        exited = PrunedEngine(adapter, recipe, router=forced).generate(prompts, images, max_new_tokens=4)
        assert got.exit_correct[:, j].tolist() == right(exited)
    assert got.normal_correct.sum() >= 6 and not got.exit_correct[:, 0].all()  # both outcomes are exercised
    fitter.calibration = dataclasses.replace(calib, samples=[dataclasses.replace(s, answer=None)
                                                             for s in calib.samples])
    unchecked = fitter._collect_batch(list(range(8)))
    assert not unchecked.normal_correct.any() and not unchecked.exit_correct.any()
