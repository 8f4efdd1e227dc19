"""LVPruning-style guides: recipe contract, engine == slow reference, cost, bad files, and training."""

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
from safetensors.torch import load_file

from edge_prune.cli import main
from edge_prune.cost import decoder_parameters, estimate, prefill_breakdown
from edge_prune.engine import PrunedEngine
from edge_prune.errors import RecipeError
from edge_prune.fit.calibration import load_calibration
from edge_prune.fit.guides import (GuideConfig, GuideFitter, check_guide_budget, default_guide_rank,
                                   parse_schedule, schedule_keep_after)
from edge_prune.fit.training import TrainingInterrupted
from edge_prune.models.adapter import LlavaAdapter
from edge_prune.recipe import GuideSpec, PruneSpec, Recipe
from edge_prune.scoring import GuideSet
from tests.conftest import PROMPTS
from tests.reference import reference_logits

KEEP = [1.0, 0.5, 0.25, 0.1]  # tiny models have 4 decoder layers; drops after layers 1, 2, 3
LAYERS = [1, 2, 3]
RANK = 4


def guide_recipe(adapter: LlavaAdapter, folder: Path, seed: int = 3, keep=KEEP, layers=LAYERS,
                 rank: int = RANK) -> Path:
    """Random (untrained) guides saved beside a recipe: enough to check the engine's semantics."""
    sig = adapter.signature()
    guides = GuideSet(sig.hidden_size, layers, rank)
    guides.reset_parameters(seed)
    guides.save(folder / "guides.safetensors", sig.num_layers)
    recipe = Recipe(model=sig, prune=PruneSpec(scorer="guide", keep_after=list(keep),
                                                guides=GuideSpec("guides.safetensors", list(layers), rank)))
    return recipe.save(folder / "recipe.json")


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return LlavaAdapter.load(tiny_llava_dir)


@pytest.fixture(scope="module")
def llava_next(tiny_next_dir):
    return LlavaAdapter.load(tiny_next_dir)


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_guide_pruning_matches_slow_reference(kind, batch_size, llava, llava_next, images, tmp_path):
    adapter = llava if kind == "llava" else llava_next
    path = guide_recipe(adapter, tmp_path)
    recipe = Recipe.load(path)
    engine = PrunedEngine(adapter, recipe)
    batch = adapter.prepare(PROMPTS[:batch_size], images[:batch_size])
    steps = 3
    ref, alive = reference_logits(adapter, recipe, batch, steps=steps,
                                  guides=load_file(tmp_path / "guides.safetensors"))
    pre = engine.prefill(batch)
    assert (pre.logits - ref[0]).abs().max().item() <= 1e-4
    token, pos = pre.logits.argmax(-1), pre.next_positions.clone()
    for step in range(1, steps):
        logits = engine.decode_step(pre.caches, token, pos)
        pos += 1
        assert (logits - ref[step]).abs().max().item() <= 1e-4
        token = logits.argmax(-1)
    for b, kept in enumerate(pre.kept):
        assert kept.per_layer == [round(k * kept.visual_tokens) for k in KEEP]
        assert alive[b] == [kept.visual_tokens, *kept.per_layer[:-1]]


def test_guides_rank_tokens_by_the_question(llava, images, tmp_path):
    """The same image under two questions keeps different tokens: the guides read the text."""
    engine = PrunedEngine(llava, Recipe.load(guide_recipe(llava, tmp_path)))
    kept = []
    for prompt in PROMPTS[:2]:
        ws = engine.initial_working_set(*llava.embed(batch := llava.prepare([prompt], images[:1]),
                                                     llava.image_features(batch)), batch.attention_mask.bool())
        scores = engine.guides.scores(1, ws.hidden, ws.visual, ws.text_after)
        order = scores[0][ws.visual[0]].argsort(descending=True)
        kept.append(set(order[:32].tolist()))  # visual-token indices (the image comes first in both)
    assert kept[0] != kept[1]


def test_recipe_with_guides_round_trips(llava, tmp_path):
    path = guide_recipe(llava, tmp_path / "a")
    data = json.loads(path.read_text())
    assert data["prune"]["scorer"] == "guide"
    assert data["prune"]["guides"] == {"file": "guides.safetensors", "layers": LAYERS, "rank": RANK}
    recipe = Recipe.load(path)
    # Saving elsewhere copies the module file, so a recipe folder stays self-contained.
    moved = recipe.save(tmp_path / "b" / "recipe.json")
    assert (tmp_path / "b" / "guides.safetensors").read_bytes() == (tmp_path / "a" / "guides.safetensors").read_bytes()
    assert Recipe.load(moved).to_dict() == recipe.to_dict()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["prune"].update(guides=None), "'guide' but 'prune.guides' is null"),
        (lambda d: d["prune"].update(scorer="fastv"), "'prune.guides' is set but 'prune.scorer' is 'fastv'"),
        (lambda d: d["prune"]["guides"].update(layers=[1, 2]), r"drops tokens at layers \[3\]"),
        (lambda d: d["prune"]["guides"].update(layers=[1, 2, 7]), r"layer indices in \[0, 3\]"),
        (lambda d: d["prune"]["guides"].update(layers=[2, 1, 3]), "strictly increasing"),
        (lambda d: d["prune"]["guides"].update(rank=0), "'prune.guides.rank' is 0"),
        (lambda d: d["prune"]["guides"].update(file="../elsewhere.safetensors"), "relative to the recipe"),
        (lambda d: d["prune"]["guides"].update(file="missing.safetensors"), "missing.safetensors.*does not exist"),
        (lambda d: d["prune"]["guides"].pop("rank"), r"missing keys \['rank'\]"),
    ],
)
def test_bad_guide_fields_name_the_field(llava, tmp_path, mutate, message):
    data = json.loads(guide_recipe(llava, tmp_path).read_text())
    mutate(data)
    (tmp_path / "recipe.json").write_text(json.dumps(data))
    with pytest.raises(RecipeError, match=message):
        Recipe.load(tmp_path / "recipe.json")


def test_guide_file_that_does_not_match_the_model_or_recipe(llava, tmp_path):
    path = guide_recipe(llava, tmp_path)
    sig = llava.signature()
    GuideSet(sig.hidden_size * 2, LAYERS, RANK).save(tmp_path / "guides.safetensors", sig.num_layers)
    with pytest.raises(RecipeError, match=r"guides.safetensors: the guides were trained for another model: hidden "
                                          r"size 128 \(model has 64\)"):
        PrunedEngine(llava, Recipe.load(path))
    GuideSet(sig.hidden_size, LAYERS, RANK).save(tmp_path / "guides.safetensors", 12)
    with pytest.raises(RecipeError, match=r"12 decoder layers \(model has 4\)"):
        PrunedEngine(llava, Recipe.load(path))
    GuideSet(sig.hidden_size, [1, 2, 3], RANK * 2).save(tmp_path / "guides.safetensors", sig.num_layers)
    with pytest.raises(RecipeError, match=r"holds layers \[1, 2, 3\] at rank 8, but the recipe expects layers "
                                          r"\[1, 2, 3\] at rank 4"):
        PrunedEngine(llava, Recipe.load(path))
    (tmp_path / "guides.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + b"0" * 64)
    with pytest.raises(RecipeError, match="guides.safetensors: not a readable safetensors guides file"):
        PrunedEngine(llava, Recipe.load(path))
    from safetensors.torch import save_file

    save_file({"wq": torch.zeros(1)}, str(tmp_path / "guides.safetensors"), metadata={"format": "other"})
    with pytest.raises(RecipeError, match="metadata 'format' is 'other', expected 'edge-prune-guides'"):
        PrunedEngine(llava, Recipe.load(path))


def test_cost_counts_the_guides(llava, tmp_path):
    recipe = Recipe.load(guide_recipe(llava, tmp_path))
    shape = llava.shape
    text = 20
    parts = prefill_breakdown(shape, recipe, text)
    d, r = shape.hidden_size, RANK
    n_in = [64, 32, 16]  # visual tokens entering the drops at layers 1, 2, 3
    macs = sum(n * d * r + 2 * text * d * r + 2 * n * text * r + n * r for n in n_in)
    assert parts["guides"] == 2 * macs and parts["exit_router"] == 0
    same_schedule = Recipe(model=recipe.model, prune=PruneSpec(scorer="fitprune", keep_after=KEEP))
    assert estimate(shape, recipe, text_tokens=text).pruned_flops == (
        estimate(shape, same_schedule, text_tokens=text).pruned_flops + 2 * macs)
    # Paper accountings print no term for the guides.
    assert prefill_breakdown(shape, recipe, text, "fitprune")["guides"] == 0


# ---- fitting ---------------------------------------------------------------------------------------



SCHEDULE = "0.5@1,0.25@2,0.1@3"


def write_calib(folder: Path, n: int, answers: bool = True) -> Path:
    """A JSONL of random images, questions and (optionally) one-word answers."""
    rng = np.random.default_rng(7)
    words = ["red", "blue", "two", "yes", "no", "left"]
    lines = []
    for i in range(n):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
        record = {"image": f"{i}.png", "prompt": f"<image>\nhow many circles are left of shape {i}?"}
        if answers:
            record["answer"] = words[i % len(words)]
        lines.append(json.dumps(record))
    (folder / "calib.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "calib.jsonl"


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_calib(tmp_path_factory.mktemp("guides-calib"), 16)


@pytest.fixture(scope="module")
def engine(tiny_llava_dir):
    return PrunedEngine.load(tiny_llava_dir)


def test_schedule_parsing_and_errors():
    assert parse_schedule("0.5@4,0.3@8,0.1@16", 32) == [(0.5, 4), (0.3, 8), (0.1, 16)]
    assert schedule_keep_after([(0.5, 1), (0.1, 3)], 4) == [1.0, 0.5, 0.5, 0.1]
    for text, message in [
        ("0.3@4,0.5@8", r"keep 0.5 at layer 8 is not below 0.3 at layer 4; keep fractions must decrease"),
        ("0.5@4,0.3@40", r"layer 40 is out of range; this model's decoder layers are 0..31"),
        ("0.5@8,0.3@4", "layer 4 comes after layer 8; layers must increase"),
        ("0.5-4", r"entry '0.5-4' is not KEEP@LAYER"),
        ("1.5@4", r"keep 1.5 at layer 4 is not a fraction in \[0, 1\)"),
    ]:
        with pytest.raises(RecipeError, match=message):
            parse_schedule(text, 32)


def test_bad_schedule_via_cli(tiny_llava_dir, calib, tmp_path, capsys):
    code = main(["fit", str(tiny_llava_dir), "--method", "lvpruning", "--schedule", "0.2@1,0.4@2", "--calib",
                 str(calib), "--n", "4", "-o", str(tmp_path / "out")])
    assert code == 2 and "keep fractions must decrease" in capsys.readouterr().err
    code = main(["fit", str(tiny_llava_dir), "--method", "lvpruning", "--schedule", "0.5@1,0.2@9", "--calib",
                 str(calib), "--n", "4", "-o", str(tmp_path / "out")])
    assert code == 2 and "layer 9 is out of range; this model's decoder layers are 0..3" in capsys.readouterr().err


def test_guide_parameters_stay_within_two_percent_of_the_decoder(engine):
    shape = engine.adapter.shape
    layers = [1, 2, 3]
    rank = default_guide_rank(shape, layers)
    assert check_guide_budget(shape, layers, rank) <= 0.02 * decoder_parameters(shape)
    with pytest.raises(RecipeError, match=r"over the 2% budget"):
        check_guide_budget(shape, layers, rank * 4)
    # At LLaVA-1.5-7B scale the default rank (32) on three layers is far below the budget.
    from edge_prune.models.shapes import load_shape

    big = load_shape(Path(__file__).parent / "fixtures" / "llava-1.5-7b" / "config.json")
    assert default_guide_rank(big, [4, 8, 16]) == 32
    assert check_guide_budget(big, [4, 8, 16], 32) < 0.001 * decoder_parameters(big)


@pytest.mark.parametrize("regions, merge", [(1, False), (4, True)])
def test_straight_through_forward_is_exactly_the_engine_drop(engine, tmp_path, regions, merge):
    """Hard-mask training forward at the last prompt position == the engine's pruned prefill, also when
    the drops go round robin over regions and merge into the kept tokens."""
    calib = load_calibration(str(write_calib(tmp_path, 4, answers=False)), 4)
    config = GuideConfig(parse_schedule(SCHEDULE, 4), micro_batch=4, batch_size=4, regions=regions, merge=merge)
    fitter = GuideFitter(engine, calib, config, progress=False)
    guides = GuideSet(64, fitter.layers, fitter.rank)
    guides.reset_parameters(11)
    prep = fitter._prepare([0, 1, 2, 3])
    with torch.no_grad():
        student = fitter.student_logits(guides, prep, hard_only=True)
        straight_through = fitter.student_logits(guides, prep)
    recipe = Recipe(model=engine.adapter.signature(), prune=fitter.recipe.prune)
    pruned = PrunedEngine(engine.adapter, recipe, guides=guides)
    batch = engine.adapter.prepare([s.prompt for s in calib.samples], [s.image for s in calib.samples])
    assert (student - pruned.prefill(batch).logits).abs().max().item() <= 1e-4
    assert torch.equal(student, straight_through)  # the soft part only changes gradients
    fitter.sample_kl(guides, prep).sum().backward()
    assert float(guides.wq.grad.abs().sum()) > 0  # the keep decisions still train the guides


def test_training_lowers_the_pruned_models_loss(engine, calib):
    """Straight-through KL training alone (no distillation term) lowers the hard-pruned model's KL."""
    config = GuideConfig(parse_schedule(SCHEDULE, 4), steps=25, batch_size=8, micro_batch=4, lr=2e-2,
                         attention_distill=0.0)
    fitter = GuideFitter(engine, load_calibration(str(calib), 16), config, progress=False)
    preps = [fitter._prepare(m) for m in fitter.micro]
    untrained = GuideSet(64, fitter.layers, fitter.rank)
    untrained.reset_parameters(config.seed)
    before = fitter.evaluate(untrained, preps)
    result = fitter.fit()
    after = fitter.evaluate(result.guides, preps)
    assert after < 0.8 * before, (before, after)
    assert result.recipe.provenance["guide_parameters"] <= 0.02 * decoder_parameters(engine.adapter.shape)


def test_attention_distillation_term_is_learned(engine, calib):
    """The auxiliary listwise cross-entropy (hard-pruned forward, fixed batches) falls with training."""
    config = GuideConfig(parse_schedule(SCHEDULE, 4), steps=12, batch_size=8, micro_batch=4, lr=2e-2,
                         attention_distill=0.5)
    fitter = GuideFitter(engine, load_calibration(str(calib), 16), config, progress=False)
    preps = [fitter._prepare(m) for m in fitter.micro]

    def excess(guides: GuideSet) -> float:
        total = 0.0
        with torch.no_grad():
            for p in preps:
                distill: list[torch.Tensor] = []
                fitter.student_logits(guides, p, hard_only=True, distill=distill)
                total += float(torch.stack(distill).sum())
        return total

    untrained = GuideSet(64, fitter.layers, fitter.rank)
    untrained.reset_parameters(config.seed)
    before = excess(untrained)
    after = excess(fitter.fit().guides)
    assert after < before - 0.01, (before, after)


def test_interrupted_training_resumes_to_the_same_guides(engine, calib, tmp_path):
    config = GuideConfig(parse_schedule(SCHEDULE, 4), steps=6, batch_size=8, micro_batch=4, checkpoint_every=2)
    data = load_calibration(str(calib), 8)
    straight = GuideFitter(engine, data, config, progress=False).fit()
    with pytest.raises(TrainingInterrupted):
        GuideFitter(engine, data, config, progress=False, work_dir=tmp_path).fit(stop_after=3)
    assert (tmp_path / ".edge-prune-train" / "guides.safetensors").is_file()
    resumed = GuideFitter(engine, data, config, progress=False, work_dir=tmp_path).fit()
    assert [h["step"] for h in resumed.history] == [float(s) for s in range(1, 7)]
    for a, b in zip(straight.guides.parameters(), resumed.guides.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # A different run (other seed) does not pick up this checkpoint.
    other = GuideConfig(parse_schedule(SCHEDULE, 4), steps=2, batch_size=8, micro_batch=4, seed=5)
    assert len(GuideFitter(engine, data, other, progress=False, work_dir=tmp_path).fit().history) == 2


def test_cli_trains_guides_with_merged_region_drops(tiny_llava_dir, calib, tmp_path, capsys):
    assert main(["fit", str(tiny_llava_dir), "--method", "lvpruning", "--schedule", SCHEDULE, "--calib", str(calib),
                 "--n", "8", "--batch-size", "4", "--steps", "1", "--regions", "4", "--merge", "--json",
                 "-o", str(tmp_path / "merged")]) == 0
    recipe = Recipe.load(tmp_path / "merged" / "recipe.json")
    assert recipe.prune.regions == 4 and recipe.prune.merge is True
    assert recipe.provenance["regions"] == 4 and recipe.provenance["merge"] is True
    capsys.readouterr()
    code = main(["fit", str(tiny_llava_dir), "--method", "dyvte", "--merge", "--calib", str(calib), "--n", "8",
                 "-o", str(tmp_path / "router")])
    assert code == 2 and "dyvte keeps its --base-recipe's" in capsys.readouterr().err
    assert not (tmp_path / "router").exists()


def test_cli_and_two_ranks_train_the_same_guides(tiny_llava_dir, calib, tmp_path):
    common = ["fit", str(tiny_llava_dir), "--method", "lvpruning", "--schedule", SCHEDULE, "--calib", str(calib),
              "--n", "16", "--batch-size", "8", "--micro-batch", "4", "--steps", "3", "--json"]
    assert main([*common, "-o", str(tmp_path / "one")]) == 0
    recipe = Recipe.load(tmp_path / "one" / "recipe.json")
    assert recipe.prune.scorer == "guide" and recipe.provenance["method"] == "lvpruning"
    assert not (tmp_path / "one" / ".edge-prune-train").exists()  # the checkpoint goes once training is done
    out = PrunedEngine.load(tiny_llava_dir, recipe=tmp_path / "one" / "recipe.json").generate(
        "what is there?", Image.new("RGB", (32, 32)), max_new_tokens=2)
    assert out.kept[0].per_layer == [64, 32, 16, 6]
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
    a, b = load_file(tmp_path / "one" / "guides.safetensors"), load_file(tmp_path / "two" / "guides.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    assert not torch.allclose(a["wq"], GuideSet(64, [1, 2, 3], recipe.prune.guides.rank).wq)  # it trained


def test_teacher_forcing_predicts_the_answer_where_decoding_would(engine, calib):
    """The training batch's pred positions give the logits the engine's decode loop gives for the answer."""
    data = load_calibration(str(calib), 2)
    fitter = GuideFitter(engine, data, GuideConfig(parse_schedule(SCHEDULE, 4), micro_batch=2, batch_size=2),
                         progress=False)
    prep = fitter._prepare([0, 1])
    tok = engine.adapter.processor.tokenizer
    row = 0
    for b, sample in enumerate(data.samples):
        answer = tok(f" {sample.answer}{tok.eos_token}", add_special_tokens=False)["input_ids"]
        pre = engine.prefill(engine.adapter.prepare([sample.prompt], [sample.image]))
        logits, pos = [pre.logits], pre.next_positions.clone()
        for token in answer[:-1]:
            logits.append(engine.decode_step(pre.caches, torch.tensor([token]), pos))
            pos += 1
        expected = torch.log_softmax(torch.cat(logits), -1)
        got = prep.teacher_logp[row:row + len(answer)]
        assert (got - expected).abs().max().item() <= 1e-4
        assert prep.batch.targets[row:row + len(answer)].tolist() == answer
        row += len(answer)
