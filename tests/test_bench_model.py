"""The committed benchmark model: a complete fp16 LLaVA within the design limits, that reads its image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, LlavaForConditionalGeneration

from edge_prune.bench.evaluate import evaluate
from edge_prune.bench.train import TrainConfig, polish_config, prefill_flops

BENCH_MODEL = Path(__file__).resolve().parent.parent / "benchmarks" / "models" / "toyvqa-llava"


def test_committed_model_is_a_complete_fp16_llava_within_the_design_limits() -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
                 "chat_template.jinja", "training_log.txt", "training_run.json"):
        assert (BENCH_MODEL / name).is_file(), name
    assert (BENCH_MODEL / "model.safetensors").stat().st_size <= 25 * 2**20
    run = json.loads((BENCH_MODEL / "training_run.json").read_text())
    assert run["complete"] and run["seed"] == TrainConfig.seed
    config = AutoConfig.from_pretrained(BENCH_MODEL)
    assert config.model_type == "llava" and config.image_seq_length == 576
    model = LlavaForConditionalGeneration.from_pretrained(BENCH_MODEL)
    assert model.dtype == torch.float16
    assert prefill_flops(model, 600).vision_share <= 0.15


def test_training_defaults_are_the_committed_models_settings() -> None:
    """`edge-prune bench train` with no options reproduces the committed run: stage 1, the joint stage,
    then stage 3 with polish_config's settings from the joint stage's save. The committed run ran them
    in one process; stages run apart (--init-from a stage's save, --tower-minutes 0, --max-minutes
    less stage 1's) must record the same settings."""
    from dataclasses import asdict

    run = json.loads((BENCH_MODEL / "training_run.json").read_text())
    joint = run["joint_stage"]
    split = {"init_from", "tower_minutes", "max_minutes", "polish_minutes", "polish_steps"}
    defaults = {k: v for k, v in asdict(TrainConfig()).items() if k not in split}
    assert {k: v for k, v in joint["config"].items() if k not in split} == defaults
    # run in one process, the joint stage's record carries the whole budget; run apart, stage 1's
    # minutes come off the joint stage's
    assert (joint["config"]["max_minutes"] + TrainConfig.tower_minutes - joint["config"]["tower_minutes"]
            == TrainConfig.max_minutes)
    polished = asdict(polish_config(TrainConfig(), run["config"]["init_from"]))
    assert {**run["config"], "polish_minutes": 0.0, "polish_steps": 0} == polished
    assert run["config"]["max_minutes"] == TrainConfig.polish_minutes
    assert "test_accuracy_mean_visual" in run


@pytest.fixture(scope="module")
def unpruned_and_ablated():
    kw = dict(n=70, batch_size=14, timing_items=1, progress=False)
    return evaluate(BENCH_MODEL, **kw), evaluate(BENCH_MODEL, ablate_visual="mean", **kw)


def test_committed_model_answers_from_its_image(unpruned_and_ablated) -> None:
    """70 test items (10 per family): replacing the visual tokens by their mean costs most of the accuracy."""
    unpruned, ablated = unpruned_and_ablated
    assert unpruned.accuracy - ablated.accuracy >= 0.2
    # the families a blind model can only guess at lose most
    for family in ("colour", "position"):
        assert unpruned.per_family[family] - ablated.per_family[family] >= 0.3, family
