"""Train the benchmark's small LLaVA from scratch on the synthetic VQA generator.

A real `LlavaForConditionalGeneration` (CLIP tower, 2-layer GELU projector, Llama decoder,
576 visual tokens as LLaVA-1.5) that every pruning-quality claim is measured against.
Each training sequence is one image with many Q/A turns (loss on answers only), which
amortises the 576 visual tokens so the model trains on two CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from edge_prune.bench.generator import (
    COLOURS, FAMILIES, GRID, IMAGE_SIZE, MAX_OBJECTS, QA, SHAPES, PatchTargets, centre_patch, iter_items, make_conversation, make_scene,
    patch_targets,
)
from edge_prune.bench.tokenizer import ASSISTANT, EOS, IMAGE, USER, build_tokenizer, prompt
from edge_prune.scoring import rms_normalize

DEFAULT_OUT = Path("benchmarks/models/toyvqa-llava")
PROBE_FILE = "training_probe.safetensors"  # in checkpoints only (see save)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TrainConfig:
    """Model shape and optimisation settings; the defaults are the published benchmark model."""

    patch_size: int = 8  # 192 px / 8 = 24 x 24 = 576 visual tokens, as LLaVA-1.5
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 256
    # 6 x 128: an 8 x 192 decoder costs 2.2 s a step on two cores and stayed at answer priors for
    # 640 steps; this one costs 0.9 s, and six layers still give per-layer schedules room
    text_hidden: int = 128
    text_layers: int = 6
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 384
    vocab_size: int = 512
    steps: int = 6000
    batch_size: int = 4
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 80
    weight_decay: float = 0.05
    turns_per_family: int = 5
    curriculum: float = 0.6  # share of training over which scenes grow from 1 to MAX_OBJECTS objects; 0 = off
    # adaptive curriculum (0 = off): one more object per scene once the colour and shape answer
    # losses are below this, the model having learnt to read the scenes it has seen so far; with
    # --curriculum too, that schedule is the latest each size is reached
    curriculum_loss: float = 0.4
    curriculum_min_steps: int = 40  # at least this many steps at each scene size
    rope_theta: float = 10000.0
    look_weight: float = 0.5  # attention guidance at answer tokens (see LookGuide); 0 = off
    look_layers: str = "1,3"
    # guided heads per look layer: 1 = head 0 looks at every object a question names; 2 = also the
    # first head of the second KV group, and a relation's two objects are split between them (run 15:
    # relation answer loss 1.31 at step 890 against run 12's 1.69, with one head)
    look_heads: int = 2
    # > 0 with look_heads=2: a count question's second guided head is asked for weight 1 on each
    # counted object's centre patch and this much on the sequence's first token (a sink), so that its
    # output (n * centre + s * sink) / (n + s) encodes n; its first head learns freely. 0 (the
    # published model) = both heads put their mass anywhere on the counted objects, whose average
    # says nothing of how many there are (run 16: count 70% at test). Run 17 (6.0, otherwise run 16)
    # did worse: count 65.0%, relation 74.7% (92.7%), overall 89.7%; its head's sink share fell with
    # the count (0.98 at one object, 0.35-0.43 at eight) but only a third of the wanted weight
    # reached the centres
    count_sink: float = 0.0
    # > 0 with look_heads=2: a count question's second guided head is asked to spread its attention
    # evenly over the whole image (KL to uniform over the visual tokens), so that its output is the
    # mean visual token, and linear read-outs of the count (this weight) from that output and from the
    # mean of the visual tokens (PatchProbe.count) teach the tower to make that mean say how many
    # objects there are. A mean over a fixed 576 tokens keeps the number, where a mean over the objects
    # (count_sink = 0) averages it away. Before it, a linear read-out of the count from run 16's mean
    # visual token scored 0.57 on test scenes. 0 = off (the published model). Run 18 (1.0, otherwise
    # run 16) was stopped at 62 minutes, behind run 16 everywhere: calib accuracy 0.76 (run 16: 0.89 at
    # 60 minutes), count 0.45 (0.75), detail 0.25 (0.75); its count read-out loss (two cross-entropies,
    # 4.2 at chance) stayed at 1.9-2.4 from 3 objects on: the mean visual token never said the count sharply
    count_pool: float = 0.0
    # 1 = a count question's guided heads are asked to look at every object (up to run 20); 0 = no
    # look at count questions, the heads learn freely there. In a GPU sweep of tower shapes at the
    # host's step budgets, the one run whose guided looks never took (look loss ~1.0) had the lowest
    # count answer loss (0.50 against 0.65-0.83) and 78% count at test, against 66-69% for the rest.
    # Off from run 25 (the published model), with occupancy_weight below
    count_look: int = 0
    # > 0: a per-patch read-out on the projector output (PatchProbe.occupancy_loss, this weight) of
    # whether an object sits in the patch's layout cell. Objects own distinct cells of a 6 x 6-patch
    # block each, so once every patch says it, the mean visual token is (count / 16) along one
    # direction: an even look over the image then reads the count, which no average over the objects
    # can. On run 20's tower this read-out was at 0.86 (majority 0.71) and the count from its mean 24%;
    # trained alone on it, the tower reached 0.998 and 98.5% in 200 steps. On in every stage. As a
    # stage 3 only, from run 16 (1,050 steps, lab), it raised count just from 73.1% to 74.2-76.0% on
    # 2,100 count questions (benchmarks/count_by_number.py); on from stage 1 through the joint stage
    # (run 25, the published model) count reached 99.7% (n=300) and the joint stage's count answer
    # loss fell to ~0.2, where run 16's stayed at 0.7-0.9
    occupancy_weight: float = 1.0
    # >= 0: in a share `vision_exit_rate` of training sequences, text tokens cannot attend to the visual
    # tokens in the decoder layers after this one (VisionExitMask), so the model learns to have read
    # the image by then, as LLaVA-1.5 has by its shallow layers (FastV: attention to image tokens is
    # small after layer 2); every later layer still sees the image in the other sequences. -1 = off
    vision_exit_after: int = -1
    vision_exit_rate: float = 0.5
    # share of the answer loss taken family by family (see family_balanced_answer_loss): 1 = every
    # question family weighs the same in each batch, 0 = the plain mean over answer tokens (the
    # published model), under which count, one question per image, has a fifth of exists' weight.
    # Run 19 (1.0 with a fresh stage 1, 100 minutes) trailed run 16 from the start (calib 0.31 vs 0.61
    # at 15 minutes, colour and shape included) and was stopped; a fresh stage 1 did as badly in run 13
    family_balance: float = 0.0
    # read-out loss on the guided heads' outputs (see LookGuide); 0 = off. Not needed once the query
    # read-out is on: the heads' value path already carried the answer (see LookGuide.query_loss)
    readout_weight: float = 0.0
    # read-out loss on what the predicting token's query can see entering each look layer: the colour
    # and shape words the question names, and its family (see QUERY_CLASSES and LookGuide.query_loss).
    # Run 16 (the published model): test accuracy 0.667 -> 0.929
    query_weight: float = 1.0
    # penalty on the squared RMS of the last hidden state (before the final norm) at text positions
    # (see text_residual_penalty); 0 = off
    residual_weight: float = 1e-2
    aux_weight: float = 0.5  # per-patch probe loss on the projector output (see PatchProbe); 0 = off
    # learning-rate multiplier of the vision tower in the joint stage (LLaVA freezes its tower: 0).
    # Ours must keep learning: at 0.1 the decoder still answered colour at chance after 2,000 steps
    # (answer loss 1.81, calib accuracy 0.29), where the full rate had reached 1.26
    tower_lr_scale: float = 1.0
    # stage 1 (see pretrain_tower): vision tower + projector alone on the probe losses, for this many
    # minutes of the --max-minutes budget (or --tower-steps steps), before the decoder trains
    tower_minutes: float = 10.0
    tower_steps: int = 0
    tower_batch: int = 8
    init_from: str = ""  # start from this checkpoint's weights (e.g. a stage-1 save) instead of random ones
    # start the vision tower only from this checkpoint (e.g. a stage-1 save under a smaller decoder,
    # for quick decoder experiments)
    init_tower_from: str = ""
    # after stage 1, rescale the projector so visual tokens have this mean norm (0 = leave as trained)
    image_norm: float = 1.0
    embed_std: float = 0.0  # init std of the text embeddings (0 = transformers' initializer_range)
    seed: int = 1234
    eval_every_s: float = 900.0
    eval_n: int = 140
    checkpoint_every_s: float = 600.0
    # wall-time budget of stages 1 and 2 that also drives the LR schedule; 0 = steps only. Stages 1-4 of
    # the defaults spend at most 76 + 12 + 12 = 100 minutes (run 26's stages 1 and 2 took 75.4)
    max_minutes: float = 76.0
    # stage 3 (see polish_config): this many minutes more from the joint stage's saved fp16 weights,
    # every question family's answer loss weighted the same, on full scenes, at `polish_lr`
    # (`polish_steps` > 0: a step budget instead; both 0 = no stage 3). Run 20 (12 minutes from
    # run 16): test accuracy 0.929 -> 0.949, relation 0.927 -> 0.973, detail 0.880 -> 0.947, count
    # 0.700 -> 0.730
    polish_minutes: float = 12.0
    polish_steps: int = 0
    polish_lr: float = 5e-4
    # stage 3's --look-layers ("" = the joint stage's) and --vision-exit-after (-1 = off), so a run can
    # look early in both stages and learn to do without the image after a layer in stage 3 only
    polish_look_layers: str = ""
    polish_vision_exit_after: int = -1
    # stage 4 (see exit_stage_config): this many minutes more from stage 3's save with stage 3's settings,
    # but with the image hidden from the text after decoder layer `exit_stage_after` in a share
    # `exit_stage_rate` of the sequences (VisionExitMask) and the looks at `exit_stage_look_layers`, so
    # the model has read its image by mid-depth, as LLaVA-1.5 has (`exit_stage_steps` > 0: a step budget
    # instead; both 0 = no stage 4). Run 26 (the published model; 1,041 steps from run 25): test
    # accuracy 0.993 -> 0.989; with every visual token gone after layer 2, 0.420 -> 0.815 (count
    # 0.897, relation 0.337, position 0.530); FitPrune-60 with merged drops, -3.14 -> -1.90 points (n=2100)
    exit_stage_minutes: float = 12.0
    exit_stage_steps: int = 0
    exit_stage_look_layers: str = "1,2"
    exit_stage_after: int = 2
    exit_stage_rate: float = 0.25
    test_n: int = 2100  # final test-split accuracy recorded with the model (0 = skip)
    ablation_n: int = 700  # same with every visual token replaced by the mean one (0 = skip)

    @property
    def num_visual_tokens(self) -> int:
        return (IMAGE_SIZE // self.patch_size) ** 2


SMOKE = dict(vision_hidden=32, vision_layers=1, vision_heads=2, vision_intermediate=64, text_hidden=32,
             text_layers=2, text_heads=2, text_kv_heads=1, text_intermediate=64, steps=3, batch_size=2,
             warmup_steps=1, turns_per_family=1, eval_n=7, eval_every_s=1e9, checkpoint_every_s=1e9,
             test_n=0, ablation_n=0, max_minutes=0.0, look_layers="1", tower_steps=2, tower_batch=2,
             polish_minutes=0.0, polish_steps=2, exit_stage_minutes=0.0, exit_stage_steps=2,
             exit_stage_look_layers="0", exit_stage_after=0)


def build_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 layout at toy size: CLIP tower (CLS dropped), GELU MLP projector, Llama with GQA."""
    if IMAGE_SIZE % cfg.patch_size:
        raise ValueError(f"patch_size must divide the image size {IMAGE_SIZE}, got {cfg.patch_size}")
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
        image_size=IMAGE_SIZE, patch_size=cfg.patch_size, hidden_act="quick_gelu", projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads, max_position_embeddings=2048, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, rope_theta=cfg.rope_theta,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        projector_hidden_act="gelu", vision_feature_select_strategy="default",
        # the last layer: with a tower this shallow the penultimate would waste a layer
        vision_feature_layer=-1, image_seq_length=cfg.num_visual_tokens,
    )
    config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def build_processor(tokenizer: PreTrainedTokenizerFast, patch_size: int) -> LlavaProcessor:
    """Processor that expands `<image>` to exactly (IMAGE_SIZE/patch)^2 image tokens."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True, do_center_crop=True, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token=IMAGE, chat_template=tokenizer.chat_template,
    )


@dataclass
class FlopsShare:
    """Prefill FLOPs of one single-question prompt, split by component (exact matmul accounting)."""

    vision: float
    projector: float
    decoder: float

    @property
    def vision_share(self) -> float:
        return self.vision / (self.vision + self.projector + self.decoder)


def prefill_flops(model: LlavaForConditionalGeneration, prompt_tokens: int) -> FlopsShare:
    """Matmul FLOPs (2 per MAC) of one prefill; attention counted over the full n x n map."""
    v, t = model.config.vision_config, model.config.text_config
    n_v = (v.image_size // v.patch_size) ** 2 + 1
    d = v.hidden_size
    vision = 2 * (n_v - 1) * 3 * v.patch_size**2 * d
    vision += v.num_hidden_layers * (2 * n_v * (4 * d * d + 2 * d * v.intermediate_size) + 4 * n_v * n_v * d)
    n_img = n_v - 1
    projector = 2 * n_img * (d * t.hidden_size + t.hidden_size * t.hidden_size)
    h, kv = t.hidden_size, t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    per_layer = 2 * prompt_tokens * (2 * h * h + 2 * h * kv + 3 * h * t.intermediate_size) + 4 * prompt_tokens**2 * h
    decoder = t.num_hidden_layers * per_layer + 2 * h * t.vocab_size  # logits of the last token only
    return FlopsShare(float(vision), float(projector), float(decoder))


def pixel_values(images: Sequence, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CLIP normalisation, identical to the saved CLIPImageProcessor at the native size (no resize)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    arr = (arr - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(dtype)


def conversation_text(qas: Sequence[QA], n_visual: int) -> tuple[str, list[tuple[int, int]]]:
    """Multi-turn LLaVA-1.5 text with `<image>` expanded, and the char spans of answers (+ </s>)."""
    text = f"{USER} {IMAGE * n_visual}\n"
    spans = []
    for i, qa in enumerate(qas):
        if i:
            text += f"{USER} "
        text += f"{qa.question} {ASSISTANT}"
        start = len(text)
        text += f" {qa.answer}{EOS}"
        spans.append((start, len(text)))
    return text, spans


def _to(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in tensors.items()}


def stack_targets(targets: Sequence[PatchTargets]) -> dict[str, torch.Tensor]:
    """Per-patch labels of a batch of scenes as (B, N) tensors, keyed as PatchProbe reads them."""
    return {k: torch.from_numpy(np.stack([getattr(t, k).reshape(-1) for t in targets])) for k in (*PROBE_CLASSES, "owner")}


def make_batch(
    tokenizer: PreTrainedTokenizerFast, split: str, indices: Sequence[int], turns_per_family: int, n_visual: int,
    max_objects: int = MAX_OBJECTS, look_heads: int = 1, count_sink: float = 0.0, count_pool: bool = False,
    count_look: bool = True,
) -> dict[str, torch.Tensor]:
    """Padded batch of conversations; labels are -100 everywhere except answer tokens and </s>.
    `look_targets` has one look per answer and guided head (see LookGuide and TrainConfig.look_heads)."""
    images, ids, labels, targets, looks, turns, queries, counts = [], [], [], [], [], [], [], []
    patch = IMAGE_SIZE // math.isqrt(n_visual)
    for r, index in enumerate(indices):
        image, qas = make_conversation(split, index, turns_per_family, max_objects)
        scene = make_scene(split, index, max_objects=max_objects)
        counts.append(len(scene.objects) - 1)
        target = patch_targets(scene, patch)
        targets.append(target)
        text, spans = conversation_text(qas, n_visual)
        enc = tokenizer(text, return_offsets_mapping=True)
        lab = [-100] * len(enc["input_ids"])
        first: dict[int, int] = {}  # answer span -> its first token
        for k, (a, b) in enumerate(enc["offset_mapping"]):
            for j, (s, e) in enumerate(spans):
                if b > a and s <= a and b <= e:
                    lab[k] = enc["input_ids"][k]
                    first.setdefault(j, k)
        owner = target.owner.reshape(-1)
        turns += [(r, first[j] - 1, FAMILIES.index(qa.family)) for j, qa in enumerate(qas) if j in first]
        queries += [named_attributes(qa.question) for j, qa in enumerate(qas) if j in first]
        for j, qa in enumerate(qas):
            if not qa.objects or j not in first or (qa.family == "count" and not count_look):
                continue
            # a relation names two objects: with two guided heads the first looks at the first, the
            # second at the other (one head averaging both cannot tell which is left); otherwise alike
            counting = qa.family == "count" and look_heads == 2 and count_sink > 0
            pooling = qa.family == "count" and look_heads == 2 and count_pool and not counting
            if look_heads == 1:
                groups = [qa.objects]
            elif counting:
                groups = [(), qa.objects]  # see TrainConfig.count_sink
            elif pooling:
                groups = [qa.objects, None]  # see TrainConfig.count_pool: None = the whole image
            else:
                groups = [qa.objects[:1], qa.objects[1:]] if qa.family == "relation" else [qa.objects, qa.objects]
            for slot, objects in enumerate(groups):
                if counting:  # no objects (the free head): no look
                    where = _centres(scene, patch, objects)
                elif objects is None:
                    where = np.ones(n_visual, dtype=bool)
                else:
                    where = np.isin(owner, [o + 1 for o in objects])
                if qa.family == "detail":  # look at the digit itself: averaged over the whole object it is diluted
                    where &= target.digit.reshape(-1) > 0
                if where.any():
                    # the token that predicts the answer should look at the objects the question is about
                    pooled = objects is None
                    looks.append((r, first[j] - 1, torch.from_numpy(where), slot,
                                  _object_attributes(scene, () if pooled else objects), count_sink if counting else 0.0,
                                  len(scene.objects) - 1 if pooled else -100))
        images.append(image)
        ids.append(enc["input_ids"])
        labels.append(lab)
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    label_t = torch.full((len(ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, (x, y) in enumerate(zip(ids, labels)):  # right padding: training needs no generation
        input_ids[r, : len(x)] = torch.tensor(x)
        label_t[r, : len(y)] = torch.tensor(y)
        mask[r, : len(x)] = 1
    probe = stack_targets(targets)
    look = {"row": torch.tensor([x[0] for x in looks], dtype=torch.long),
            "query": torch.tensor([x[1] for x in looks], dtype=torch.long),
            "patches": torch.stack([x[2] for x in looks]) if looks else torch.zeros((0, n_visual), dtype=torch.bool),
            "slot": torch.tensor([x[3] for x in looks], dtype=torch.long),
            "attributes": torch.tensor([x[4] for x in looks], dtype=torch.long).reshape(-1, len(READOUT_CLASSES)),
            "sink": torch.tensor([x[5] for x in looks], dtype=torch.float32),
            # count_pool looks: the image's object count - 1 (-100 on every other look)
            "count": torch.tensor([x[6] for x in looks], dtype=torch.long),
            "scene_count": torch.tensor(counts, dtype=torch.long)}
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t, "pixel_values": pixel_values(images),
            "patch_targets": probe, "look_targets": look,
            "answer_turns": torch.tensor(turns, dtype=torch.long).reshape(-1, 3),  # (row, predicting pos, family)
            "answer_queries": torch.tensor(queries, dtype=torch.long).reshape(-1, len(NAMED_SLOTS))}  # see named_attributes


# the colour and shape words a question names, in order (a relation names two objects): what the
# predicting token must gather from the question before a look layer can find the object
NAMED_SLOTS = {"colour0": len(COLOURS) + 1, "shape0": len(SHAPES) + 1, "colour1": len(COLOURS) + 1, "shape1": len(SHAPES) + 1}
QUERY_CLASSES = {**NAMED_SLOTS, "family": len(FAMILIES)}


def named_attributes(question: str) -> list[int]:
    """[colour0, shape0, colour1, shape1] named by `question`, in order of appearance; a slot the
    question leaves open is the extra class (len(COLOURS) or len(SHAPES))."""
    words = question.rstrip("?").split()
    colours = [list(COLOURS).index(w) for w in words if w in COLOURS] + [len(COLOURS)] * 2
    shapes = [SHAPES.index(w) for w in words if w in SHAPES] + [len(SHAPES)] * 2
    return [colours[0], shapes[0], colours[1], shapes[1]]


# what a guided head's output must say about the one object it looks at (see LookGuide): -100 = not asked
READOUT_CLASSES = {"colour": len(COLOURS), "shape": len(SHAPES), "digit": 11, "cell": GRID * GRID}


def _centres(scene, patch: int, objects: Sequence[int]) -> np.ndarray:
    """Flat (g * g,) mask of the patches holding `objects`' centres, one patch per object."""
    g = IMAGE_SIZE // patch
    mask = np.zeros((g, g), dtype=bool)
    for k in objects:
        mask[centre_patch(scene.objects[k], patch)] = True
    return mask.reshape(-1)


def _object_attributes(scene, objects: Sequence[int]) -> list[int]:
    """Read-out labels for a look at `objects`: colour, shape, digit (0 = none) and layout cell of a
    single object; several objects (count, a repeated pair in exists) have no single answer."""
    if len(objects) != 1:
        return [-100] * len(READOUT_CLASSES)
    o = scene.objects[objects[0]]
    return [list(COLOURS).index(o.colour), SHAPES.index(o.shape), int(o.digit) + 1 if o.digit else 0, o.row * GRID + o.col]


class LookGuide:
    """Attention guidance for two heads per layer: at each answer-predicting token, put attention mass
    on the patches of the objects the question names (loss: -log of that mass, averaged over turns),
    and make what the head then reads say what that object is.

    Training only, like PatchProbe: retrieval over 576 visual tokens is what a from-scratch decoder
    learns last (the answer loss alone stays at answer priors for thousands of CPU steps). In each of
    `layers` head 0 is guided, and with `heads=2` also the first head of the second KV group (for a
    relation question the first looks at the first object named, the second at the other); every
    other head and layer learns freely. This gives the model the behaviour attention-based pruners assume of real LLaVA
    (some heads look at the asked-about object), which the docs say when they report results on it.

    Looking is not enough: with attention alone, run 12's guided head found the object (look loss
    ~0.5) but a linear read-out of its output at the predicting token gave the shape question's
    answer 62% of the time, where one of the object's pooled visual tokens gave 99%: the value path
    had not learnt to carry it. So PatchProbe's `readout` heads ask that output for the looked-at
    object's colour, shape, digit and layout cell (`READOUT_CLASSES`).
    """

    def __init__(self, model: LlavaForConditionalGeneration, layers: Sequence[int], heads: int = 2) -> None:
        self.captured: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        lm = model.model.language_model
        config = model.config.text_config
        group = config.num_attention_heads // config.num_key_value_heads
        second = group if config.num_key_value_heads > 1 else min(1, config.num_attention_heads - 1)
        self.heads = (0, second)[:heads]
        self.attn = {i: lm.layers[i].self_attn for i in layers}
        for i, attn in self.attn.items():
            attn.register_forward_pre_hook(self._capture(i), with_kwargs=True)

    @staticmethod
    def readout_keys(layers: Sequence[int], heads: int) -> list[str]:
        return [f"{i}_{slot}_{name}" for i in layers for slot in range(heads) for name in READOUT_CLASSES]

    @staticmethod
    def query_keys(layers: Sequence[int]) -> list[str]:
        return [f"{i}_{name}" for i in layers for name in QUERY_CLASSES]

    def query_loss(self, turns: torch.Tensor, named: torch.Tensor, heads: torch.nn.ModuleDict) -> torch.Tensor:
        """Cross-entropy of linear read-outs, at each answer-predicting token entering each look layer
        (after its input norm: what the query projection sees), of the question's named colours and
        shapes (`named`, see named_attributes) and family. Call before `loss`, which consumes the capture.

        Run 12's guided heads put 98% of their attention on the right object when a question names
        a shape, but ~30% (no better than spreading it over every object) when it names a colour: a
        linear probe of the predicting token's residual read the named colour at chance (17-32%)
        entering layers 1-3. The value path was not the problem (the head's output renormalised
        over the right object gave the shape 100%); the question never reached the query.
        """
        rows, pos, family = turns.unbind(1)
        targets = {**{k: named[:, a] for a, k in enumerate(NAMED_SLOTS)}, "family": family}
        losses = []
        for i in self.attn:
            seen = self.captured[i][0][rows, pos]  # the attention's input: after the layer's input norm
            losses += [torch.nn.functional.cross_entropy(heads[f"{i}_{k}"](seen), y) for k, y in targets.items()]
        return torch.stack(losses).mean()

    @staticmethod
    def _count_divergence(logp: torch.Tensor, target: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
        """KL(wanted || attention) per look, where `wanted` puts weight 1 on each target patch (the
        counted objects' centres) and `sink` on position 0 (see TrainConfig.count_sink); with `sink` 0,
        the KL to even attention over the target patches (TrainConfig.count_pool)."""
        wanted = target.float()
        wanted[:, 0] = sink
        wanted = wanted / wanted.sum(-1, keepdim=True)
        return (wanted * (wanted.clamp_min(1e-12).log() - logp.clamp_min(-1e4))).sum(-1)

    def _capture(self, i: int):
        def hook(_module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            self.captured[i] = (hidden, kwargs["position_embeddings"])
        return hook

    def loss(self, input_ids: torch.Tensor, image_token_id: int, look: dict[str, torch.Tensor],
             readout: torch.nn.ModuleDict | None = None,
             count_readout: torch.nn.ModuleDict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(look loss, read-out loss, count read-out loss) over the batch's looks; the second is 0
        without `readout`, the third without `count_readout` (keyed by layer) or count_pool looks."""
        from transformers.models.llama.modeling_llama import rotate_half

        rows, queries, patches, slots, sink = look["row"], look["query"], look["patches"], look["slot"], look["sink"]
        counted = look["count"]
        pooled = counted >= 0  # count_pool looks: even over the image, KL to that (sink 0 below)
        if rows.numel() == 0:
            zero = input_ids.new_zeros((), dtype=torch.float32)
            return zero, zero, zero
        is_image = input_ids == image_token_id
        target = torch.zeros_like(is_image[rows])
        target[is_image[rows]] = patches.reshape(-1)  # the j-th image token is patch j
        causal = torch.arange(input_ids.shape[1], device=input_ids.device)[None] > queries[:, None]
        heads = torch.tensor(self.heads, device=slots.device)[slots]
        looks, reads, counts = [], [], []
        for i, attn in self.attn.items():
            hidden, (cos, sin) = self.captured.pop(i)
            cos, sin = cos.expand(hidden.shape[0], -1, -1), sin.expand(hidden.shape[0], -1, -1)  # shared positions
            d = attn.head_dim
            group = attn.config.num_attention_heads // attn.config.num_key_value_heads
            batch, seq = hidden.shape[:2]
            q = attn.q_proj(hidden[rows, queries]).view(len(rows), -1, d)[torch.arange(len(rows), device=rows.device), heads]  # (T, d)
            k = attn.k_proj(hidden).view(batch, seq, -1, d)[rows, :, heads // group]  # (T, S, d)
            v = attn.v_proj(hidden).view(batch, seq, -1, d)[rows, :, heads // group]
            cos_q, sin_q = cos[rows, queries], sin[rows, queries]
            q = q * cos_q + rotate_half(q) * sin_q
            k = k * cos[rows] + rotate_half(k) * sin[rows]
            logits = torch.einsum("td,tsd->ts", q, k) * attn.scaling
            logp = logits.masked_fill(causal, float("-inf")).log_softmax(-1)
            loss = -torch.logsumexp(logp.masked_fill(~target, float("-inf")), -1)  # -log(mass on the target)
            divergent = (sink > 0) | pooled
            if divergent.any():  # count looks (TrainConfig.count_sink, count_pool): off in the published model's training
                loss = torch.where(divergent, self._count_divergence(logp, target, sink), loss)
            looks.append(loss.mean())
            reads_count = count_readout is not None and bool(pooled.any())
            if readout is None and not reads_count:
                continue
            seen = torch.einsum("ts,tsd->td", logp.exp(), v)  # the head's output at the predicting token
            if reads_count:
                counts.append(torch.nn.functional.cross_entropy(count_readout[str(i)](seen[pooled]), counted[pooled]))
            if readout is None:
                continue
            for a, name in enumerate(READOUT_CLASSES):
                for slot in range(len(self.heads)):
                    y = look["attributes"][:, a].masked_fill(slots != slot, -100)
                    if (y >= 0).any():
                        reads.append(torch.nn.functional.cross_entropy(readout[f"{i}_{slot}_{name}"](seen), y, ignore_index=-100))
        zero = input_ids.new_zeros((), dtype=torch.float32)
        read = torch.stack(reads).mean() if reads else zero
        return torch.stack(looks).mean(), read, torch.stack(counts).mean() if counts else zero


def family_balanced_answer_loss(logits: torch.Tensor, labels: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Mean over the batch's question families of each family's mean answer-token cross-entropy.

    A training conversation drops repeated questions, so a family with one possible question
    (count: "How many objects are there?") gets one turn per image where colour, shape and exists get
    up to five: under the plain token mean it has a fifth of their gradient, while the test split asks
    every family equally often. `turns` is make_batch's (row, predicting position, family) per answer;
    each answer's tokens run from the position after it while labels are set.
    """
    target = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=-100,
                                           reduction="none")
    answered = (target != -100).tolist()
    family = torch.full_like(target, -1)
    for row, pos, fam in turns.tolist():
        while pos < len(answered[row]) and answered[row][pos]:  # the answer word(s) and </s>
            family[row, pos] = fam
            pos += 1
    return torch.stack([ce[family == f].mean() for f in family[family >= 0].unique()]).mean()


class VisionExitMask:
    """Training only: in the chosen rows of a batch, hide the visual tokens from every text token in
    the decoder layers after `after`, as if all visual tokens had exited there (what the recipes'
    `keep_after` = 0 and the exit routers do at inference). The visual tokens themselves still run,
    so this is a mask on the layers' attention, not a shorter sequence: same shapes, one batch.
    """

    def __init__(self, model: LlavaForConditionalGeneration, after: int) -> None:
        """`after`: a decoder layer with a later one to exit before (train checks it, _check_vision_exit)."""
        layers = model.model.language_model.layers
        self.hidden: torch.Tensor | None = None  # (B, T, T) True = this query may not see this key
        for layer in layers[after + 1:]:
            layer.self_attn.register_forward_pre_hook(self._mask, with_kwargs=True)

    def set_rows(self, input_ids: torch.Tensor, image_token_id: int, rows: torch.Tensor) -> None:
        """Exit the visual tokens in `rows` (bool, one per sequence) for the next forward pass."""
        visual = input_ids == image_token_id
        self.hidden = (rows[:, None, None] & ~visual[:, :, None] & visual[:, None, :]) if bool(rows.any()) else None

    def clear(self) -> None:
        """Later passes (evaluation, the next step before set_rows) see the whole image."""
        self.hidden = None

    def _mask(self, _module, args, kwargs):
        if self.hidden is None:
            return None
        mask = kwargs.get("attention_mask")
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        n = hidden_states.shape[1]
        if mask is None:  # no padding: SDPA would run causal without a mask; spell it out
            mask = torch.ones(n, n, dtype=torch.bool, device=hidden_states.device).tril()[None, None]
        if mask.dtype != torch.bool:
            raise ValueError("VisionExitMask needs the boolean masks of the sdpa attention implementation")
        kwargs["attention_mask"] = mask & ~self.hidden[:, None]
        return args, kwargs


def text_residual_penalty(last_hidden: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Mean squared RMS of the decoder's last hidden state (before the final norm) at text positions.

    Without it, a decoder wider than ~64 soon has its layer-0 MLP write a near-constant vector
    hundreds of times the embeddings' norm into every text position: after the final RMSNorm that
    spells the answer priors and divides whatever the image adds (and its gradient) by the same
    factor, so the model stays at priors (run 11: MLP 0 added norm 377 at the answer position, and
    the answer distribution moved 2.5% across images). Training only; the model stays a plain LLaVA.
    """
    rms2 = last_hidden.float().pow(2).mean(-1)
    return rms2[text].mean()


PROBE_CLASSES = {"colour": 1 + len(COLOURS), "shape": 1 + len(SHAPES), "digit": 11, "centre": 2, "cell": GRID * GRID}
OBJECT_PROBES = ("colour", "shape", "digit")


class PatchProbe(torch.nn.Module):
    """Linear read-outs of what each patch shows, from the projector output (training only, never saved).

    A from-scratch vision tower gives the decoder nothing to attend to at first, and the
    answer loss alone then settles on answer priors (two 45-minute runs stayed at ~0.3
    accuracy). Asking the visual tokens to linearly encode colour, shape, digit, object
    centre and layout cell makes them informative from the first steps; the decoder then
    only has to learn to find them. The published model is a plain LLaVA.
    """

    def __init__(self, hidden: int, head_dim: int = 0, readout_keys: Sequence[str] = (), query_keys: Sequence[str] = (),
                 count_layers: Sequence[int] = (), occupancy: bool = False) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, n) for k, n in PROBE_CLASSES.items()})
        # LookGuide's read-outs of the guided heads' outputs, keyed layer_slot_attribute
        self.readout = torch.nn.ModuleDict({k: torch.nn.Linear(head_dim, READOUT_CLASSES[k.split("_", 2)[2]])
                                            for k in readout_keys})
        # LookGuide's query read-outs of the predicting token entering a look layer, keyed layer_target
        self.query = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, QUERY_CLASSES[k.split("_", 1)[1]]) for k in query_keys})
        # the same questions about each object, from the mean of its patches: what the decoder reads
        # when it attends to an object. Interior patches of a square and a circle look alike, so a
        # per-patch shape read-out alone stayed at chance; the pooled one learns from the edges.
        self.objects = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, PROBE_CLASSES[k]) for k in OBJECT_PROBES})
        self.quadrant = torch.nn.Linear(hidden, 4)  # which image quadrant the object is in
        if count_layers:  # TrainConfig.count_pool: the count from the mean visual token, and from the
            # second guided head's output at count questions in each look layer (LookGuide.loss)
            self.count = torch.nn.Linear(hidden, MAX_OBJECTS)
            self.count_readout = torch.nn.ModuleDict({str(i): torch.nn.Linear(head_dim, MAX_OBJECTS) for i in count_layers})
        if occupancy:  # TrainConfig.occupancy_weight: is my layout cell occupied (created only when used, so
            # that runs without it draw the same random initialisations as before it existed)
            self.occupancy = torch.nn.Linear(hidden, 1)

    def occupancy_loss(self, features: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """Binary cross-entropy, per patch, of "an object sits in my layout cell" (TrainConfig.occupancy_weight),
        read after the RMS norm the decoder applies first."""
        wanted = cell_occupancy(targets["cell"].reshape(features.shape[:2]), targets["owner"].reshape(features.shape[:2]))
        return torch.nn.functional.binary_cross_entropy_with_logits(self.occupancy(rms_normalize(features)).squeeze(-1), wanted)

    def count_loss(self, features: torch.Tensor, scene_count: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the object count (minus one) read from the mean visual token, each token
        RMS-normalised first as the decoder's input norm does: what an even look over the image sees."""
        return torch.nn.functional.cross_entropy(self.count(rms_normalize(features).mean(1)), scene_count)

    def loss(self, features: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        flat = features.reshape(-1, features.shape[-1])
        total = features.new_zeros(())
        for k, head in self.heads.items():
            y = targets[k].reshape(-1)
            ce = torch.nn.functional.cross_entropy(head(flat), y, reduction="none")
            if k == "cell":  # every patch has a layout cell
                total = total + ce.mean()
                continue
            # object patches are ~2% of a scene: a plain mean is won by predicting "background"
            # everywhere (shape stayed at chance on object patches), so weight both sides equally
            fg = y > 0
            total = total + 0.5 * (ce[fg].mean() if fg.any() else 0.0) + 0.5 * (ce[~fg].mean() if (~fg).any() else 0.0)
        return total + self.object_loss(features, targets)

    def object_loss(self, features: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        owner = targets["owner"].reshape(features.shape[:2])
        if int(owner.max()) == 0:
            return features.new_zeros(())
        member = torch.nn.functional.one_hot(owner, int(owner.max()) + 1)[..., 1:].to(features.dtype)  # (B, N, K)
        count = member.sum(1)  # (B, K)
        pooled = torch.einsum("bnk,bnd->bkd", member, features) / count.clamp(min=1)[..., None]
        present = count > 0
        total = features.new_zeros(())
        for k, head in self.objects.items():
            y = targets[k].reshape(owner.shape)
            inked = member * (y > 0)[..., None] if k == "digit" else member  # a digit covers part of its object
            total = total + torch.nn.functional.cross_entropy(head(pooled[present]), _object_label(inked, y)[present])
        # the quadrant of the patch holding the object's centre
        cell = targets["cell"].reshape(owner.shape)
        quadrant = (cell // GRID >= GRID // 2).long() * 2 + (cell % GRID >= GRID // 2).long()
        at_centre = member * targets["centre"].reshape(owner.shape)[..., None]
        return total + torch.nn.functional.cross_entropy(self.quadrant(pooled[present]), _object_label(at_centre, quadrant)[present])


def cell_occupancy(cell: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """(B, N) layout cell and owning object (0 = background) of each patch -> 1.0 where an object sits
    in the patch's cell. Every cell has the same number of patches, so the mean is count / GRID**2."""
    occupied = torch.zeros(cell.shape[0], GRID * GRID, device=cell.device)
    occupied = occupied.scatter_reduce(1, cell, (owner > 0).float(), "amax")  # any object patch in the cell
    return occupied.gather(1, cell)


def _object_label(patches: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Each object's label: the mean of `values` (B, N) over its patches marked in `patches` (B, N, K),
    which all carry the same label, so the mean is that label (0 where an object has none marked)."""
    return (torch.einsum("bnk,bn->bk", patches, values.to(patches.dtype)) / patches.sum(1).clamp(min=1)).round().long()


def _load(model_or_dir: LlavaForConditionalGeneration | str | Path) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    if isinstance(model_or_dir, (str, Path)):
        model = LlavaForConditionalGeneration.from_pretrained(str(model_or_dir), dtype=torch.float32)
        processor = LlavaProcessor.from_pretrained(str(model_or_dir))
        return model, processor
    processor = getattr(model_or_dir, "_bench_processor", None)
    if processor is None:
        raise ValueError("pass a model directory, or a model with its processor attached as `_bench_processor`")
    return model_or_dir, processor


@torch.no_grad()
def answer_accuracy(
    model_or_dir: LlavaForConditionalGeneration | str | Path,
    split: str = "test",
    n: int = 2100,
    families: Sequence[str] | None = None,
    batch_size: int = 16,
    ablate_visual: bool = False,
    progress: bool = False,
    device: str | None = None,
) -> dict[str, float]:
    """Greedy one-word answer accuracy per family (+ 'overall') on `n` generator items.

    With `ablate_visual` every visual token is replaced by the image's mean visual token:
    if the model really uses the image, accuracy then falls towards chance.
    """
    model, processor = _load(model_or_dir)
    if device is not None:
        model.to(device)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    hook = None
    if ablate_visual:
        projector = model.model.multi_modal_projector
        hook = projector.register_forward_hook(lambda _m, _i, out: out.mean(dim=1, keepdim=True).expand_as(out))
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    items = list(iter_items(split, n, families))
    try:
        for b in tqdm(range(0, len(items), batch_size), disable=not progress, desc=f"eval {split}"):
            chunk = items[b : b + batch_size]
            texts = [prompt(it.question) for it in chunk]
            inputs = processor(images=[it.image for it in chunk], text=texts, return_tensors="pt", padding=True)
            inputs = inputs.to(model.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for it, ans in zip(chunk, answers):
                words = ans.strip().split()
                total[it.family] = total.get(it.family, 0) + 1
                correct[it.family] = correct.get(it.family, 0) + int(bool(words) and words[0] == it.answer)
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    acc = {f: correct[f] / total[f] for f in FAMILIES if f in total}
    acc["overall"] = sum(correct.values()) / max(1, sum(total.values()))
    return acc


def _lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warmup by step, then cosine over `progress` in [0, 1] down to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _max_objects(progress: float, cfg: TrainConfig) -> int:
    """Curriculum: one object per scene at first, so the decoder learns to read visual tokens before
    it must pick one object among many; MAX_OBJECTS once `cfg.curriculum` of training is done."""
    if cfg.curriculum <= 0:
        return MAX_OBJECTS
    return min(MAX_OBJECTS, 1 + int(progress / cfg.curriculum * MAX_OBJECTS))


def _progress(step: int, elapsed_s: float, cfg: TrainConfig) -> float:
    """Share of training done: by steps, or by wall time when --max-minutes is set and binds first.

    A time budget still anneals the learning rate fully on a slow or shared machine; the
    steps actually run are logged, and `--steps N` without a budget replays them exactly.
    """
    by_steps = (step + 1) / cfg.steps
    if cfg.max_minutes > 0:
        return max(by_steps, elapsed_s / (cfg.max_minutes * 60))
    return by_steps


def save(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out: Path, meta: dict,
         probe: "PatchProbe | None" = None) -> None:
    """fp16 safetensors + processor + run metadata; written to a temp dir then swapped in.

    Checkpoints pass the training-only `probe`, saved beside the model so `--init-from` resumes
    it; the final save passes none and removes it, so the published model is a plain LLaVA.
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to("cpu", torch.float16)
    half.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    (tmp / "training_run.json").write_text(json.dumps(meta, indent=2))
    if probe is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()}, str(tmp / PROBE_FILE))
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
    if probe is None:
        (out / PROBE_FILE).unlink(missing_ok=True)


class _ThreadTuner:
    """Picks 1 or 2 torch threads by measured seconds per token, re-checked every `every` steps.

    On a small shared CPU a second thread helps when the core is free and hurts badly
    (threads wait on a descheduled peer) when another process holds it.
    """

    def __init__(self, choices: Sequence[int], every: int = 60, probe: int = 3) -> None:
        self.choices, self.every, self.probe = list(choices), every, probe
        self.cost: dict[int, float] = {}
        self.current = self.choices[-1]
        self.samples: list[float] = []
        torch.set_num_threads(self.current)

    def threads_for(self, step: int) -> int:
        if len(self.choices) > 1:
            phase = step % self.every
            k = phase // self.probe
            if k < len(self.choices):  # probing window: each choice runs `probe` steps
                want = self.choices[k]
            else:
                want = min(self.cost, key=self.cost.__getitem__) if self.cost else self.current
            if want != self.current:
                torch.set_num_threads(want)
                self.current = want
        return self.current

    def record(self, step: int, seconds_per_token: float) -> None:
        phase = step % self.every
        if len(self.choices) > 1 and phase // self.probe < len(self.choices):
            self.samples.append(seconds_per_token)
            if phase % self.probe == self.probe - 1:
                # drop the first probe step: it pays for the thread switch
                self.cost[self.current] = float(np.median(self.samples[1:] or self.samples))
                self.samples = []


class _Log:
    """Writes each record to training_log.txt (human) and training_log.jsonl (machine) and stdout."""

    def __init__(self, out: Path, name: str = "training_log") -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.txt = open(out / f"{name}.txt", "w")
        self.jsonl = open(out / f"{name}.jsonl", "w")

    def __call__(self, record: dict, text: str) -> None:
        tqdm.write(text)
        self.txt.write(text + "\n")
        self.txt.flush()
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()


def pretrain_tower(model: LlavaForConditionalGeneration, probe: PatchProbe, cfg: TrainConfig, log: "_Log") -> int:
    """Stage 1: train the vision tower and projector alone on the PatchProbe losses; returns steps run.

    LLaVA starts from a pretrained CLIP; ours is from scratch, and a ViT learns shapes and
    digits slowly. Without the decoder a step costs a fraction of a joint one, so the tower
    sees several times more scenes per minute here than in joint training.
    """
    if cfg.tower_steps <= 0 and cfg.tower_minutes <= 0:
        return 0
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    opt = torch.optim.AdamW(params + list(probe.parameters()), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    patch = cfg.patch_size
    t0 = time.time()
    step = 0
    bar = tqdm(itertools.count() if cfg.tower_steps <= 0 else range(cfg.tower_steps),
               total=cfg.tower_steps or None, desc="stage 1: vision tower", mininterval=10)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
        # indices far past the joint stage's, so the two stages see different training scenes
        scenes = [make_scene("train", 10**8 + step * cfg.tower_batch + i) for i in range(cfg.tower_batch)]
        targets = [patch_targets(sc, patch) for sc in scenes]
        batch = _to(stack_targets(targets), model.device)
        images = pixel_values([sc.render() for sc in scenes]).to(model.device)
        features = model.model.get_image_features(pixel_values=images).pooler_output
        features = torch.stack(list(features))
        loss = probe.loss(features, batch)
        if cfg.occupancy_weight > 0:  # the tower learns it here in ~200 steps, before the decoder needs it
            loss = loss + cfg.occupancy_weight * probe.occupancy_loss(features, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        elapsed = time.time() - t0
        if step % 20 == 0:
            log({"event": "tower_step", "step": step, "probe_loss": loss.item(), "elapsed_s": elapsed},
                f"stage 1 step {step:5d} probe loss {loss.item():.3f} t {elapsed:.0f}s")
        if cfg.tower_steps <= 0 and elapsed >= cfg.tower_minutes * 60:
            break
    return step + 1


@torch.no_grad()
def scale_visual_tokens(model: LlavaForConditionalGeneration, norm: float, probe: "PatchProbe | None" = None) -> float:
    """Rescale the projector's output layer so visual tokens have mean norm `norm`; returns the factor.

    Stage 1 rewards large features (the probes' logits grow with them): its visual tokens come out
    ~200x the norm of text embeddings, and would dominate the residual stream of every text
    position that attends to them. Linear read-outs are unchanged by the rescale, and `probe`'s
    weights are divided by the same factor so its logits are too: left as they were, its loss
    jumped from ~1.4 to ~16 at the start of the joint stage, and its gradient reshaped the tower
    for ~3,000 steps while the decoder was trying to learn to read it.
    """
    scenes = [make_scene("train", 10**9 + i) for i in range(8)]
    images = pixel_values([s.render() for s in scenes]).to(model.device)
    features = torch.stack(list(model.model.get_image_features(pixel_values=images).pooler_output))
    factor = norm / float(features.norm(dim=-1).mean())
    last = model.model.multi_modal_projector.linear_2
    last.weight.mul_(factor)
    last.bias.mul_(factor)
    if probe is not None:
        for name, layer in probe.named_modules():
            # readout/query/count_readout read attention heads' outputs, not features; occupancy/count
            # read RMS-normalised features. The rescale leaves all of them as they were (dividing the
            # occupancy and count heads blew their logits up 200-fold)
            if isinstance(layer, torch.nn.Linear) and not name.startswith(("readout.", "query.", "occupancy", "count")):
                layer.weight.div_(factor)
    return factor


def polish_config(cfg: TrainConfig, joint_dir: str | Path) -> TrainConfig:
    """Stage 3's settings: from the joint stage's saved model in `joint_dir`, `cfg.polish_minutes`
    (or `cfg.polish_steps`) more with every family's answer loss weighted the same.

    The joint stage asks a family as often as a conversation can (count once per image, exists five
    times), and grows scenes from one object; stage 3 balances the families and shows full scenes
    from the start, at `polish_lr` (a quarter of the joint stage's peak rate) with a short warm-up (Adam's
    moments start afresh). The final save drops the probe's heads, so their losses are off here:
    restarted from random they would push the tower and decoder about, and the decoder already reads
    the query (its query loss was 0.06). The projector is not rescaled again.
    """
    return replace(cfg, init_from=str(joint_dir), init_tower_from="", tower_minutes=0.0, tower_steps=0, image_norm=0.0,
                   lr=cfg.polish_lr, warmup_steps=min(cfg.warmup_steps, 40), family_balance=1.0, curriculum=0.0,
                   curriculum_loss=0.0, aux_weight=0.0, query_weight=0.0, readout_weight=0.0,
                   steps=cfg.polish_steps if cfg.polish_steps > 0 else cfg.steps, max_minutes=cfg.polish_minutes,
                   eval_every_s=min(cfg.eval_every_s, 300.0), polish_minutes=0.0, polish_steps=0,
                   look_layers=cfg.polish_look_layers or cfg.look_layers, vision_exit_after=cfg.polish_vision_exit_after)


def exit_stage_config(cfg: TrainConfig, polish_dir: str | Path) -> TrainConfig:
    """Stage 4's settings: stage 3's (`cfg` is stage 3's config) from its saved model in `polish_dir`,
    `cfg.exit_stage_minutes` (or `cfg.exit_stage_steps`) more, with the image hidden after
    `exit_stage_after` in a share `exit_stage_rate` of the sequences and the looks at or before that layer.

    Without it the model reads count and position only in its last layer (run 25: 42% with every visual
    token gone after layer 2 of 6), unlike the LLaVA-1.5 checkpoints whose early reading FastV, FitPrune
    and DyVTE exploit; in the other sequences every layer still sees the image. Adam's moments start afresh.
    """
    return replace(cfg, init_from=str(polish_dir), tower_minutes=0.0, tower_steps=0, image_norm=0.0,
                   steps=cfg.exit_stage_steps if cfg.exit_stage_steps > 0 else cfg.steps,
                   max_minutes=cfg.exit_stage_minutes, polish_minutes=0.0, polish_steps=0,
                   exit_stage_minutes=0.0, exit_stage_steps=0, look_layers=cfg.exit_stage_look_layers,
                   vision_exit_after=cfg.exit_stage_after, vision_exit_rate=cfg.exit_stage_rate)


def _next_stage(cfg: TrainConfig, out: Path) -> tuple[str, TrainConfig] | None:
    """(log name, config) of the stage after the one `cfg` configures: stage 3 when it is on and still
    ahead, else stage 4 likewise, else None (each stage's config switches itself and earlier ones off)."""
    if cfg.polish_minutes > 0 or cfg.polish_steps > 0:
        return "polish_log", polish_config(cfg, out)
    if cfg.exit_stage_minutes > 0 or cfg.exit_stage_steps > 0:
        return "exit_stage_log", exit_stage_config(cfg, out)
    return None


# the key of a stage's record in the later stages' training_run.json (the last stage has none: none follows it)
STAGE_RECORDS = {"training_log": "joint_stage", "polish_log": "polish_stage"}


def train(cfg: TrainConfig, out: Path = DEFAULT_OUT, threads: Sequence[int] = (2,),
          log_name: str = "training_log", earlier: dict | None = None,
          device: str = "cpu") -> LlavaForConditionalGeneration:
    """Train from a fixed seed and save to `out` (periodic checkpoints there, final save at the end);
    then stage 3 (see polish_config), logged to polish_log.txt, and stage 4 (see exit_stage_config),
    logged to exit_stage_log.txt, unless they are off. `earlier`: the records of the stages before this
    one by name ("joint_stage", "polish_stage"), kept in the next stage's training_run.json. `device`:
    where the model trains (scenes are always drawn on the CPU); the published model's budget is
    wall time on 2 CPU cores, which a GPU run replays by steps (`--max-minutes 0 --steps N
    --tower-steps N --polish-steps N --exit-stage-steps N`)."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = Path(out)
    log = _Log(out, log_name)
    tokenizer = build_tokenizer(cfg.vocab_size)
    processor = build_processor(tokenizer, cfg.patch_size)
    model = build_model(cfg, tokenizer)
    if cfg.init_from:
        start = LlavaForConditionalGeneration.from_pretrained(cfg.init_from, dtype=torch.float32)
        model.load_state_dict(start.state_dict())  # strict: the shapes must be this config's
        del start
    if cfg.init_tower_from:
        start = LlavaForConditionalGeneration.from_pretrained(cfg.init_tower_from, dtype=torch.float32)
        model.model.vision_tower.load_state_dict(start.model.vision_tower.state_dict())
        del start
    if cfg.embed_std > 0:
        torch.nn.init.normal_(model.model.language_model.embed_tokens.weight, std=cfg.embed_std)
    model.to(device)
    model._bench_processor = processor
    n_visual = cfg.num_visual_tokens
    n_params = sum(p.numel() for p in model.parameters())
    prompt_len = len(processor(images=make_conversation("train", 0)[0], text=prompt("What colour is the circle?"))["input_ids"][0])
    share = prefill_flops(model, prompt_len)
    log({"event": "config", **asdict(cfg), "params": n_params, "fp16_mb": n_params * 2 / 2**20,
         "prefill_gflops": (share.vision + share.projector + share.decoder) / 1e9, "vision_share": share.vision_share,
         "prompt_tokens": prompt_len, "torch_threads": torch.get_num_threads()},
        f"config {asdict(cfg)}\nparams {n_params / 1e6:.2f}M (fp16 {n_params * 2 / 2**20:.1f} MB), "
        f"visual tokens {n_visual}, prefill of a {prompt_len}-token prompt: "
        f"vision {share.vision / 1e9:.3f} GFLOPs, projector {share.projector / 1e9:.3f}, decoder {share.decoder / 1e9:.3f}; "
        f"vision tower share {100 * share.vision_share:.1f}%")
    look_layers = [int(x) for x in cfg.look_layers.split(",")]
    if cfg.look_heads not in (1, 2):
        raise ValueError(f"--look-heads must be 1 or 2, got {cfg.look_heads}")
    _check_vision_exit(cfg, look_layers, log_name)
    ahead = _next_stage(cfg, out)
    while ahead:  # later stages' settings, before hours of training
        _check_vision_exit(ahead[1], [int(x) for x in ahead[1].look_layers.split(",")], ahead[0])
        ahead = _next_stage(ahead[1], out)
    readout_keys = (LookGuide.readout_keys(look_layers, cfg.look_heads)
                    if cfg.look_weight > 0 and cfg.readout_weight > 0 else [])
    query_keys = LookGuide.query_keys(look_layers) if cfg.look_weight > 0 and cfg.query_weight > 0 else []
    if cfg.count_pool > 0 and (cfg.look_heads != 2 or cfg.look_weight <= 0 or cfg.count_sink > 0):
        raise ValueError("--count-pool needs --look-heads 2, --look-weight > 0 and no --count-sink "
                         "(it sets the second guided head's look at count questions)")
    if cfg.count_look <= 0 and (cfg.count_sink > 0 or cfg.count_pool > 0):
        raise ValueError("--count-look 0 leaves count questions without a look; --count-sink and --count-pool "
                         "set that look, so they need --count-look 1")
    count_layers = look_layers if cfg.count_pool > 0 else []
    probe = PatchProbe(cfg.text_hidden, cfg.text_hidden // cfg.text_heads, readout_keys, query_keys, count_layers,
                       cfg.occupancy_weight > 0).to(device)
    if cfg.init_from and (Path(cfg.init_from) / PROBE_FILE).exists():
        # a stage-1 save has no read-out or query heads yet (stage 1 trains no decoder): they start fresh
        missing, unexpected = probe.load_state_dict(load_file(str(Path(cfg.init_from) / PROBE_FILE), device=str(device)), strict=False)
        if unexpected or any(not k.startswith(("readout.", "query.", "count.", "count_readout.", "occupancy.")) for k in missing):
            raise ValueError(f"{cfg.init_from}/{PROBE_FILE} does not match this configuration's probe "
                             f"(missing {missing}, unexpected {unexpected})")
    captured: dict[str, torch.Tensor] = {}
    model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: captured.__setitem__("features", out))
    model.model.language_model.norm.register_forward_pre_hook(lambda _m, args: captured.__setitem__("last_hidden", args[0]))
    guide = LookGuide(model, look_layers, cfg.look_heads) if cfg.look_weight > 0 else None
    vision_exit = VisionExitMask(model, cfg.vision_exit_after) if cfg.vision_exit_after >= 0 else None
    exit_rng = torch.Generator().manual_seed(cfg.seed)
    groups = []
    for in_tower in (False, True):
        named = [(n, p) for n, p in model.named_parameters() if n.startswith("model.vision_tower.") == in_tower]
        scale = cfg.tower_lr_scale if in_tower else 1.0
        groups.append({"params": [p for n, p in named if p.ndim >= 2 and "embed" not in n],
                       "weight_decay": cfg.weight_decay, "lr_scale": scale})
        # the probe's weights are ~1/200 of what they would be on unscaled features (scale_visual_tokens):
        # decaying them would shrink its logits and reward the tower for growing its features again
        groups.append({"params": [p for n, p in named if p.ndim < 2 or "embed" in n] + ([] if in_tower else list(probe.parameters())),
                       "weight_decay": 0.0, "lr_scale": scale})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
    model.train()
    t_start = time.time()
    torch.set_num_threads(max(threads))
    tower_steps = pretrain_tower(model, probe, cfg, log)
    if cfg.image_norm > 0:
        scale_visual_tokens(model, cfg.image_norm, probe)
    tower_s = time.time() - t_start
    if tower_steps:
        save(model, processor, out, {"seed": cfg.seed, "config": asdict(cfg), "stage": 1, "tower_steps": tower_steps, "complete": False}, probe)
    full_cfg, cfg = cfg, replace(cfg, max_minutes=max(1.0, cfg.max_minutes - tower_s / 60) if cfg.max_minutes > 0 else 0.0)
    t0 = time.time()  # the joint stage's clock: its LR schedule spans what is left of the budget
    last_eval = last_ckpt = t0
    meta = {"seed": cfg.seed, "config": asdict(full_cfg), "params": n_params, "vision_flops_share": share.vision_share,
            "tower_steps": tower_steps, "tower_s": tower_s, **(earlier or {})}
    tuner = _ThreadTuner(threads)
    bar = tqdm(range(cfg.steps), desc="train", mininterval=10)
    ema = None
    fam_ema: dict[int, float] = {}
    level, level_since = 1, 0  # adaptive curriculum: current max objects per scene, and since when
    step = 0
    for step in bar:
        progress = _progress(step, time.time() - t0, cfg)
        lr = _lr_at(step, progress, cfg)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        indices = range(step * cfg.batch_size, (step + 1) * cfg.batch_size)
        if cfg.curriculum_loss > 0:
            ready = all(fam_ema.get(FAMILIES.index(f), 1e9) < cfg.curriculum_loss for f in ("colour", "shape"))
            if ready and step - level_since >= cfg.curriculum_min_steps and level < MAX_OBJECTS:
                level, level_since = level + 1, step
                fam_ema.clear()  # judge the new scene size on its own answers
            # a --curriculum schedule, if also given, is the latest each scene size may be reached
            max_objects = max(level, _max_objects(progress, cfg)) if cfg.curriculum > 0 else level
        else:
            max_objects = _max_objects(progress, cfg)
        batch = make_batch(tokenizer, "train", indices, cfg.turns_per_family, n_visual, max_objects, cfg.look_heads,
                           cfg.count_sink, cfg.count_pool > 0, cfg.count_look > 0)
        targets = _to(batch.pop("patch_targets"), device)
        look = _to(batch.pop("look_targets"), device)
        batch = _to(batch, device)
        turns = batch.pop("answer_turns")
        named = batch.pop("answer_queries")
        n_threads = tuner.threads_for(step)
        t_step = time.time()
        if vision_exit is not None:
            rows = torch.rand(batch["input_ids"].shape[0], generator=exit_rng) < cfg.vision_exit_rate
            vision_exit.set_rows(batch["input_ids"], model.config.image_token_id, rows.to(device))
        out_step = model(**batch)
        if vision_exit is not None:
            vision_exit.clear()
        answer_loss = out_step.loss
        balanced = (family_balanced_answer_loss(out_step.logits, batch["labels"], turns) if cfg.family_balance > 0
                    else answer_loss.new_zeros(()))
        with torch.no_grad():  # answer-word loss per family: which families the model has started to read
            rows, pos, fam = turns.unbind(1)
            word = -out_step.logits[rows, pos].float().log_softmax(-1).gather(1, batch["labels"][rows, pos + 1, None])[:, 0]
            for f in fam.unique().tolist():
                v = float(word[fam == f].mean())
                fam_ema[f] = v if f not in fam_ema else 0.9 * fam_ema[f] + 0.1 * v
        features = captured.pop("features")
        aux = probe.loss(features, targets) if cfg.aux_weight > 0 else answer_loss.new_zeros(())
        asked = guide.query_loss(turns, named, probe.query) if query_keys else answer_loss.new_zeros(())
        looked, read, counted = (guide.loss(batch["input_ids"], model.config.image_token_id, look,
                                            probe.readout if readout_keys else None,
                                            probe.count_readout if count_layers else None)
                                 if guide else (answer_loss.new_zeros(()),) * 3)
        if count_layers:
            counted = counted + probe.count_loss(features, look["scene_count"])
        occupied = probe.occupancy_loss(features, targets) if cfg.occupancy_weight > 0 else answer_loss.new_zeros(())
        text = (batch["attention_mask"] > 0) & (batch["input_ids"] != model.config.image_token_id)
        residual = text_residual_penalty(captured.pop("last_hidden"), text)
        loss = ((1 - cfg.family_balance) * answer_loss + cfg.family_balance * balanced + cfg.aux_weight * aux + cfg.look_weight * looked + cfg.readout_weight * read
                + cfg.query_weight * asked + cfg.residual_weight * residual + cfg.count_pool * counted
                + cfg.occupancy_weight * occupied)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        tuner.record(step, (time.time() - t_step) / batch["attention_mask"].sum().item())
        lv = answer_loss.item()
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
        now = time.time()
        if step % 10 == 0 or step == cfg.steps - 1:
            log({"event": "step", "step": step, "loss": lv, "loss_ema": ema, "probe_loss": float(aux), "look_loss": float(looked), "readout_loss": float(read), "query_loss": float(asked), "count_loss": float(counted), "occupancy_loss": float(occupied), "balanced_answer_loss": float(balanced), "residual_rms2": float(residual), "lr": lr,
                 "progress": progress, "grad_norm": gnorm, "elapsed_s": now - t0, "threads": n_threads, "max_objects": max_objects,
                 "family_answer_loss": {FAMILIES[f]: v for f, v in sorted(fam_ema.items())}},
                f"step {step:5d} loss {lv:.4f} ema {ema:.4f} probe {float(aux):.3f} look {float(looked):.3f} read {float(read):.3f} query {float(asked):.3f} count {float(counted):.3f} occ {float(occupied):.3f} rms2 {float(residual):.1f} lr {lr:.2e} prog {progress:.3f} gnorm {gnorm:.2f} "
                f"t {now - t0:.0f}s ({(now - t0) / (step + 1):.2f}s/step, {n_threads} thr)\n    answer loss by family: "
                + " ".join(f"{FAMILIES[f]} {v:.2f}" for f, v in sorted(fam_ema.items())))
        out_of_time = _progress(step, now - t0, cfg) >= 1.0 and step + 1 < cfg.steps
        if now - last_eval > cfg.eval_every_s:
            _log_eval(log, model, cfg, step, now - t0)
            last_eval = time.time()
        if now - last_ckpt > cfg.checkpoint_every_s:
            save(model, processor, out, {**meta, "step": step + 1, "complete": False, "wall_s": time.time() - t_start}, probe)
            last_ckpt = time.time()
        if out_of_time:
            log({"event": "stop", "step": step, "reason": "max_minutes"}, f"stopping at step {step}: --max-minutes budget spent")
            break
    wall = time.time() - t_start
    acc = _log_eval(log, model, cfg, step, wall)
    meta.update({"step": step + 1, "complete": True, "wall_s": wall, "calib_accuracy": acc})
    save(model, processor, out, meta)
    log({"event": "saved", "dir": str(out), "wall_s": wall}, f"saved {out} after {wall / 60:.1f} min")
    ahead = _next_stage(full_cfg, out)
    if ahead:  # the test accuracy is recorded for the finished model only
        del model, opt
        this_stage = {k: v for k, v in meta.items() if k not in STAGE_RECORDS.values()}
        return train(ahead[1], out, threads, ahead[0],
                     {**(earlier or {}), STAGE_RECORDS[log_name]: this_stage}, device)
    for key, n, ablate in (("test_accuracy", cfg.test_n, False), ("test_accuracy_mean_visual", cfg.ablation_n, True)):
        if n:
            # measured on the fp16 weights as saved, so the number describes the published model
            res = answer_accuracy(out, "test", n, ablate_visual=ablate, progress=True, device=device)
            meta[key] = {"n": n, **res}
            (out / "training_run.json").write_text(json.dumps(meta, indent=2))
            log({"event": key, "n": n, "accuracy": res}, f"{key} n={n}: " + " ".join(f"{k} {v:.3f}" for k, v in res.items()))
    return model


# the options that set a stage's exit mask: after which layer, the looks, the share of sequences
_EXIT_FLAGS = {"training_log": ("--vision-exit-after", "--look-layers", "--vision-exit-rate"),
               "polish_log": ("--polish-vision-exit-after", "--polish-look-layers", "--vision-exit-rate"),
               "exit_stage_log": ("--exit-stage-after", "--exit-stage-look-layers", "--exit-stage-rate")}


def _check_vision_exit(cfg: TrainConfig, look_layers: list[int], stage: str) -> None:
    """Looks must sit at or before the layer after which the image is hidden (VisionExitMask).
    `stage`: the stage's log name, which says which options set them."""
    after_flag, looks_flag, rate_flag = _EXIT_FLAGS.get(stage, _EXIT_FLAGS["training_log"])
    if any(not 0 <= i < cfg.text_layers for i in look_layers):
        raise ValueError(f"{looks_flag} {cfg.look_layers} must name decoder layers 0..{cfg.text_layers - 1}")
    if cfg.vision_exit_after < 0:
        return
    if cfg.vision_exit_after >= cfg.text_layers - 1:
        raise ValueError(f"{after_flag} must name a decoder layer 0..{cfg.text_layers - 2} (a later "
                         f"layer must remain to exit before), got {cfg.vision_exit_after}")
    if cfg.look_weight > 0 and max(look_layers) > cfg.vision_exit_after:
        raise ValueError(f"{looks_flag} {cfg.look_layers} include a layer after {after_flag} "
                         f"{cfg.vision_exit_after}, where the image is hidden: look at or before it")
    if not 0 < cfg.vision_exit_rate <= 1:
        raise ValueError(f"{rate_flag} must be in (0, 1], got {cfg.vision_exit_rate}")


def _log_eval(log: _Log, model: LlavaForConditionalGeneration, cfg: TrainConfig, step: int, elapsed: float) -> dict[str, float]:
    t = time.time()
    acc = answer_accuracy(model, "calib", cfg.eval_n)
    log({"event": "eval", "split": "calib", "n": cfg.eval_n, "step": step, "elapsed_s": elapsed, "accuracy": acc},
        f"eval step {step} calib n={cfg.eval_n} ({time.time() - t:.0f}s): " + " ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    return acc


def _keep_freed_memory() -> None:
    """Stop glibc from returning big freed blocks to the OS: re-faulting them each step
    costs more than the matmuls on a small CPU (measured ~3x step time)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 2**30)  # M_MMAP_THRESHOLD: serve large tensors from the heap
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never trim the heap
        libc.mallopt(-2, 2**28)  # M_TOP_PAD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def main(argv: Sequence[str] | None = None) -> int:
    """`edge-prune bench train`: train the benchmark model (or a tiny one with --smoke)."""
    parser = argparse.ArgumentParser(prog="edge-prune bench train", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model directory")
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps (for tests)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda, or auto (cuda when present); the model's budget is set on 2 CPU cores")
    parser.add_argument("--threads", default="auto",
                        help="torch CPU threads, or 'auto' to pick 1 or 2 by measured speed as the step runs")
    for f in fields(TrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)
    args = parser.parse_args(argv)
    if args.threads == "auto":
        threads: tuple[int, ...] = (1, 2)
    elif args.threads.isdigit() and int(args.threads) > 0:
        threads = (int(args.threads),)
    else:
        parser.error(f"--threads must be a positive integer or 'auto', got {args.threads!r}")
    _keep_freed_memory()
    overrides = dict(SMOKE) if args.smoke else {}
    overrides.update({f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None})
    cfg = TrainConfig(**overrides)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is visible to torch here; use --device cpu")
    train(cfg, args.out, threads, device=device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
