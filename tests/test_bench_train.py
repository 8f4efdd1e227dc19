"""Training the benchmark model: a tiny smoke run saves a model that loads and generates."""

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from edge_prune.bench.generator import FAMILIES, make_item
from edge_prune.bench.tokenizer import IMAGE, build_tokenizer, prompt
from edge_prune.bench.train import (
    PROBE_FILE,
    SMOKE,
    TrainConfig,
    answer_accuracy,
    build_model,
    exit_stage_config,
    make_batch,
    pixel_values,
    polish_config,
    prefill_flops,
)


def test_smoke_training_saves_a_loadable_llava(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    from edge_prune.cli import main as cli_main

    # through the CLI, as a user runs it: the trainer's own options follow `bench train` directly
    assert cli_main(["bench", "train", "--smoke", "--out", str(out), "--threads", "1"]) == 0
    run = json.loads((out / "training_run.json").read_text())
    assert run["seed"] == TrainConfig.seed and run["complete"] and run["wall_s"] > 0
    assert (out / "training_log.txt").read_text().count("step") >= 2
    records = [json.loads(line) for line in (out / "training_log.jsonl").open()]
    assert any(r["event"] == "eval" for r in records)
    # the answer loss is also logged per question family, so a run shows which families it has learnt
    assert any(set(r.get("family_answer_loss", {})) >= {"count"} for r in records if r["event"] == "step")
    assert all("residual_rms2" in r for r in records if r["event"] == "step")
    # the stage-1 checkpoint carried the training-only probe; the published model does not
    assert any(r["event"] == "tower_step" for r in records)
    assert not (out / PROBE_FILE).exists()
    # stage 3 started from the joint stage's save, logged apart; stage 4 from stage 3's, with stage 3's
    # settings and the image hidden after its layer; the final record keeps both earlier stages'
    polished = [json.loads(line) for line in (out / "polish_log.jsonl").open()]
    config = next(r for r in polished if r["event"] == "config")
    assert config["init_from"] == str(out) and config["family_balance"] == 1.0 and config["tower_steps"] == 0
    assert sum(r["event"] == "step" for r in polished) >= 1
    exiting = [json.loads(line) for line in (out / "exit_stage_log.jsonl").open()]
    config = next(r for r in exiting if r["event"] == "config")
    assert config["init_from"] == str(out)
    assert config["vision_exit_after"] == 0 and config["look_layers"] == "0"
    assert sum(r["event"] == "step" for r in exiting) >= 1 and run["step"] == 2
    stage3 = polish_config(TrainConfig(**SMOKE), out)
    assert run["config"] == asdict(exit_stage_config(stage3, out))
    assert run["polish_stage"]["config"] == asdict(stage3) and run["polish_stage"]["step"] == 2
    assert run["joint_stage"]["config"] == asdict(TrainConfig(**SMOKE)) and run["joint_stage"]["step"] == 3
    assert "joint_stage" not in run["polish_stage"]

    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert model.dtype == torch.float16
    processor = AutoProcessor.from_pretrained(out)
    item = make_item("test", 0)
    inputs = processor(images=item.image, text=prompt(item.question), return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE)
    assert int((inputs["input_ids"] == image_id).sum()) == 576  # LLaVA-1.5's 24 x 24 visual tokens
    assert torch.allclose(inputs["pixel_values"], pixel_values([item.image]))
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]

    acc = answer_accuracy(out, "calib", 7)
    assert set(acc) == {"colour", "shape", "count", "exists", "relation", "position", "detail", "overall"}


def test_tokenizer_has_specials_and_single_token_answers() -> None:
    tok = build_tokenizer()
    assert len(tok) <= 1024
    for special in ("<s>", "</s>", "<pad>", "<unk>", IMAGE):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id or special == "<unk>"
    for answer in ("red", "triangle", "northwest", "below", "seven", "7", "yes"):
        assert len(tok.tokenize(" " + answer)) == 1
    text = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a red cross?"}]}],
        tokenize=False, add_generation_prompt=True,
    )
    assert text == prompt("Is there a red cross?")


def test_labels_cover_only_answers() -> None:
    tok = build_tokenizer()
    batch = make_batch(tok, "train", [0, 1], turns_per_family=1, n_visual=576)
    labelled = batch["labels"][batch["labels"] != -100]
    words = set(tok.decode([int(t)]).strip() for t in labelled)
    assert "</s>" in words and not {"USER", "ASSISTANT", "<image>"} & words


def test_family_balanced_answer_loss_weighs_every_family_alike() -> None:
    """The balanced loss is the mean over families of transformers' own answer loss with only that
    family's answers labelled; count, one turn per image, weighs as much as colour's several."""
    from edge_prune.bench.train import family_balanced_answer_loss

    tok, model, _ = _smoke_model_with_look_guide()
    batch = make_batch(tok, "train", [0, 1, 2], turns_per_family=3, n_visual=576)
    turns = batch.pop("answer_turns")
    for key in ("look_targets", "patch_targets", "answer_queries"):
        batch.pop(key)
    per_family = [int((turns[:, 2] == f).sum()) for f in range(len(FAMILIES))]
    assert per_family[FAMILIES.index("count")] == 3 < per_family[FAMILIES.index("colour")]  # one per image
    with torch.no_grad():
        out = model(**batch)
        balanced = family_balanced_answer_loss(out.logits, batch["labels"], turns)
        by_family = []
        for f in sorted(set(turns[:, 2].tolist())):
            labels = torch.full_like(batch["labels"], -100)
            for row, pos, fam in turns.tolist():
                end = pos + 1
                while end < labels.shape[1] and batch["labels"][row, end] != -100:
                    end += 1
                if fam == f:
                    labels[row, pos + 1:end] = batch["labels"][row, pos + 1:end]
            by_family.append(model(**{**batch, "labels": labels}).loss)
    assert float(balanced) == pytest.approx(float(torch.stack(by_family).mean()), rel=1e-5)
    assert float(balanced) != pytest.approx(float(out.loss), rel=1e-3)  # not the plain token mean


def test_default_model_meets_the_design_limits() -> None:
    cfg = TrainConfig()
    model = build_model(cfg, build_tokenizer(cfg.vocab_size))
    assert cfg.num_visual_tokens == 576
    assert model.config.text_config.num_hidden_layers >= 6
    assert model.config.text_config.num_key_value_heads < model.config.text_config.num_attention_heads
    assert sum(p.numel() for p in model.parameters()) * 2 < 25e6  # fp16 bytes
    assert prefill_flops(model, 600).vision_share <= 0.15
    assert SMOKE["steps"] < cfg.steps


def _smoke_model_with_look_guide():
    """(tokenizer, smoke model with eager attention, LookGuide on its layer 1)."""
    from edge_prune.bench.train import LookGuide

    cfg = TrainConfig(**SMOKE)
    tok = build_tokenizer(cfg.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    model.config.text_config._attn_implementation = "eager"
    return tok, model, LookGuide(model, [1])


def test_look_guide_loss_is_the_attention_mass_on_the_named_objects() -> None:
    """The guidance loss computed from q/k equals -log(mass) read off transformers' eager attention,
    for both guided heads; a relation question sends each head to one of its two objects."""
    tok, model, guide = _smoke_model_with_look_guide()
    assert guide.heads == (0, 1)  # smoke model: 2 heads sharing 1 KV head
    batch = make_batch(tok, "train", [0, 1, 2, 3], turns_per_family=3, n_visual=576, look_heads=2)
    look = batch.pop("look_targets")
    batch.pop("patch_targets")
    turns = batch.pop("answer_turns")
    batch.pop("answer_queries")
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
        loss, read, _ = guide.loss(batch["input_ids"], model.config.image_token_id, look)
    assert float(read) == 0.0  # no read-out heads given
    is_image = batch["input_ids"] == model.config.image_token_id
    expected = []
    for row, query, patches, slot in zip(look["row"], look["query"], look["patches"], look["slot"]):
        weights = out.attentions[1][row, guide.heads[slot], query]
        image_positions = is_image[row].nonzero().squeeze(1)
        expected.append(-torch.log(weights[image_positions[patches]].sum()))
    assert len(expected) >= 6
    assert float(loss) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)
    # relation turns: the two slots look at disjoint patches (one object each); other turns: the same ones
    relation = {(int(r), int(q)) for r, q, f in turns.tolist() if f == FAMILIES.index("relation")}
    by_turn: dict = {}
    for row, query, patches, slot in zip(look["row"], look["query"], look["patches"], look["slot"]):
        by_turn.setdefault((int(row), int(query)), {})[int(slot)] = patches
    assert relation and all(t in by_turn for t in relation)
    for turn, slots in by_turn.items():
        if turn in relation:
            assert not (slots[0] & slots[1]).any()
        elif len(slots) == 2:
            assert torch.equal(slots[0], slots[1])


def test_one_guided_head_looks_at_every_named_object_two_split_a_relation() -> None:
    """look_heads=1: one look per answer, at every object the question names; look_heads=2 (the
    default) splits a relation's two objects between the heads, and their union is that look."""
    tok = build_tokenizer(TrainConfig().vocab_size)
    one = make_batch(tok, "train", [0, 1, 2, 3], turns_per_family=3, n_visual=576)
    two = make_batch(tok, "train", [0, 1, 2, 3], turns_per_family=3, n_visual=576, look_heads=2)
    l1, l2 = one["look_targets"], two["look_targets"]
    assert (l1["slot"] == 0).all() and (l2["slot"] == 1).any()
    for row, query, patches in zip(l1["row"], l1["query"], l1["patches"]):
        mine = (l2["row"] == row) & (l2["query"] == query)
        union = l2["patches"][mine].any(0)  # a relation's two split looks together = the single look
        assert torch.equal(patches, union)


def _count_batch(tok, rows, **count_options):
    """(model inputs, look targets, {(row, predicting position)} of the count questions) of a training batch."""
    batch = make_batch(tok, "train", rows, turns_per_family=3, n_visual=576, look_heads=2, **count_options)
    look = batch.pop("look_targets")
    batch.pop("patch_targets")
    turns = batch.pop("answer_turns")
    batch.pop("answer_queries")
    counting = {(int(r), int(q)) for r, q, f in turns.tolist() if f == FAMILIES.index("count")}
    assert counting
    return batch, look, counting


def test_count_looks_are_one_centre_per_object_and_a_sink_on_the_second_head() -> None:
    """With count_sink > 0 a count question's second guided head is asked for weight 1 on each
    object's centre patch and count_sink at position 0 (KL to that), and its first head is free;
    every other look keeps the mass loss."""
    from edge_prune.bench.generator import make_scene, patch_targets

    tok, model, guide = _smoke_model_with_look_guide()
    rows = [0, 1, 2, 3]
    batch, look, counting = _count_batch(tok, rows, count_sink=6.0)
    for row, query, patches, slot, sink in zip(look["row"], look["query"], look["patches"], look["slot"], look["sink"]):
        if (int(row), int(query)) not in counting:
            assert float(sink) == 0.0
            continue
        assert int(slot) == 1 and float(sink) == 6.0
        scene = make_scene("train", rows[int(row)])
        centres = patch_targets(scene, 8).centre.reshape(-1).astype(bool)
        assert torch.equal(patches, torch.from_numpy(centres)) and int(patches.sum()) == len(scene.objects)
    sunk = look["sink"] > 0
    assert {(int(r), int(q)) for r, q in zip(look["row"][sunk], look["query"][sunk])} == counting  # one look each
    assert int(sunk.sum()) == len(counting)
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
        loss, _, _ = guide.loss(batch["input_ids"], model.config.image_token_id, look)
    is_image = batch["input_ids"] == model.config.image_token_id
    expected = []
    for row, query, patches, slot, sink in zip(look["row"], look["query"], look["patches"], look["slot"], look["sink"]):
        weights = out.attentions[1][row, guide.heads[slot], query]
        image_positions = is_image[row].nonzero().squeeze(1)
        if sink == 0:
            expected.append(-torch.log(weights[image_positions[patches]].sum()))
            continue
        wanted = torch.zeros_like(weights)
        wanted[image_positions[patches]] = 1.0
        wanted[0] = sink
        wanted /= wanted.sum()
        kept = wanted > 0
        expected.append((wanted[kept] * (wanted[kept].log() - weights[kept].log())).sum())
    assert float(loss) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)


def test_count_look_off_leaves_count_questions_without_a_look() -> None:
    """count_look=False: no look at a count question's predicting token; every other look is as before."""
    tok = build_tokenizer(TrainConfig().vocab_size)
    rows = [0, 1, 2, 3]
    _, on, counting = _count_batch(tok, rows)
    _, off, _ = _count_batch(tok, rows, count_look=False)
    at = lambda look: [(int(r), int(q)) for r, q in zip(look["row"], look["query"])]
    assert any(key in counting for key in at(on))
    kept = [i for i, key in enumerate(at(on)) if key not in counting]
    assert at(off) == [at(on)[i] for i in kept]
    assert torch.equal(off["patches"], on["patches"][kept])


def test_training_refuses_count_look_off_with_a_count_look_option(tmp_path: Path) -> None:
    from edge_prune.bench.train import main

    with pytest.raises(ValueError, match="--count-look 0"):
        main(["--smoke", "--out", str(tmp_path / "m"), "--count-look", "0", "--count-sink", "6"])
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_training_on_cuda_without_one_is_a_clear_error(tmp_path: Path) -> None:
    from edge_prune.bench.train import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present here")
    with pytest.raises(SystemExit):
        main(["--smoke", "--out", str(tmp_path / "m"), "--device", "cuda"])
    assert not (tmp_path / "m").exists()


def test_count_pool_looks_spread_over_the_image_and_read_the_count() -> None:
    """With count_pool a count question's second guided head is asked for even attention over every
    visual token (KL to that) and its output, at the predicting token, is read out as the object
    count; the first head keeps its look at the objects; the mean visual token is read out too."""
    from edge_prune.bench.generator import make_scene
    from edge_prune.bench.train import PatchProbe

    tok, model, guide = _smoke_model_with_look_guide()
    rows = [0, 1, 2, 3]
    batch, look, counting = _count_batch(tok, rows, count_pool=True)
    assert look["scene_count"].tolist() == [len(make_scene("train", i).objects) - 1 for i in rows]
    pooled = look["count"] >= 0
    assert {(int(r), int(q)) for r, q in zip(look["row"][pooled], look["query"][pooled])} == counting
    assert int(pooled.sum()) == len(counting) and (look["slot"][pooled] == 1).all()
    assert look["patches"][pooled].all() and (look["count"][pooled] == look["scene_count"][look["row"][pooled]]).all()
    first_head = (look["slot"] == 0) & torch.tensor([(int(r), int(q)) in counting for r, q in zip(look["row"], look["query"])])
    assert int(first_head.sum()) == len(counting) and not look["patches"][first_head].all(1).any()  # the objects only

    cfg = TrainConfig(**SMOKE)
    probe = PatchProbe(cfg.text_hidden, cfg.text_hidden // cfg.text_heads, count_layers=[1])
    seen = {}
    model.model.language_model.layers[1].self_attn.o_proj.register_forward_pre_hook(
        lambda _m, args: seen.__setitem__("out", args[0]))
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
        loss, _, counted = guide.loss(batch["input_ids"], model.config.image_token_id, look, None, probe.count_readout)
    is_image = batch["input_ids"] == model.config.image_token_id
    expected = []
    for row, query, patches, slot, count in zip(look["row"], look["query"], look["patches"], look["slot"], look["count"]):
        weights = out.attentions[1][row, guide.heads[slot], query]
        on_image = weights[is_image[row].nonzero().squeeze(1)[patches]]
        if count < 0:
            expected.append(-torch.log(on_image.sum()))
        else:  # KL(uniform over the 576 visual tokens || attention)
            expected.append((-(on_image.log()) - math.log(576)).mean())
    assert float(loss) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)
    d = cfg.text_hidden // cfg.text_heads
    head_out = seen["out"].view(*seen["out"].shape[:2], -1, d)[look["row"][pooled], look["query"][pooled], guide.heads[1]]
    reference = torch.nn.functional.cross_entropy(probe.count_readout["1"](head_out), look["count"][pooled])
    assert float(counted) == pytest.approx(float(reference), rel=1e-5)
    features = torch.randn(4, 576, cfg.text_hidden) * torch.rand(4, 576, 1)
    normed = features / features.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    reference = torch.nn.functional.cross_entropy(probe.count(normed.mean(1)), look["scene_count"])
    assert float(probe.count_loss(features, look["scene_count"])) == pytest.approx(float(reference), rel=1e-5)


def test_look_guide_read_out_sees_the_guided_heads_output() -> None:
    """The read-out loss is computed from exactly what the guided head passes to o_proj."""
    from edge_prune.bench.train import READOUT_CLASSES, LookGuide

    cfg = TrainConfig(**SMOKE)
    tok = build_tokenizer(cfg.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    guide = LookGuide(model, [1])
    batch = make_batch(tok, "train", [0, 1], turns_per_family=3, n_visual=576, look_heads=2)
    look = batch.pop("look_targets")
    batch.pop("patch_targets")
    batch.pop("answer_turns")
    batch.pop("answer_queries")
    captured = {}
    model.model.language_model.layers[1].self_attn.o_proj.register_forward_pre_hook(
        lambda _m, args: captured.__setitem__("out", args[0]))
    seen = {}

    class Recorder(dict):
        def __getitem__(self, key):
            def readout(x):
                seen[key] = x
                return torch.zeros(x.shape[0], READOUT_CLASSES[key.split("_", 2)[2]])
            return readout

    with torch.no_grad():
        model(**batch)
        _, read, _ = guide.loss(batch["input_ids"], model.config.image_token_id, look, Recorder())
    d = cfg.text_hidden // cfg.text_heads
    heads = torch.tensor(guide.heads)[look["slot"]]
    reference = captured["out"].view(*captured["out"].shape[:2], -1, d)[look["row"], look["query"], heads]
    assert torch.allclose(seen["1_0_shape"], reference, atol=1e-5)
    # single-object looks carry their object's labels; uniform logits give log(classes) per attribute
    assert (look["attributes"] >= 0).any()
    expected = sum(math.log(n) for n in READOUT_CLASSES.values()) / len(READOUT_CLASSES)
    assert float(read) == pytest.approx(expected, rel=1e-5)


def test_named_attributes_are_the_questions_colour_and_shape_words_in_order() -> None:
    from edge_prune.bench.generator import COLOURS, SHAPES
    from edge_prune.bench.train import named_attributes

    c, s = list(COLOURS).index, SHAPES.index
    no_c, no_s = len(COLOURS), len(SHAPES)
    assert named_attributes("What shape is the red object?") == [c("red"), no_s, no_c, no_s]
    assert named_attributes("What colour is the cross?") == [no_c, s("cross"), no_c, no_s]
    assert named_attributes("How many objects are there?") == [no_c, no_s, no_c, no_s]
    assert named_attributes("Where is the blue circle relative to the red square?") == [
        c("blue"), s("circle"), c("red"), s("square")]


def test_query_read_out_sees_the_predicting_token_entering_the_look_layer() -> None:
    """The query loss reads each answer-predicting token's residual entering a look layer, after
    that layer's input norm; its gradient trains the layers below, not the look layer itself."""
    from edge_prune.bench.train import QUERY_CLASSES, LookGuide, PatchProbe

    cfg = TrainConfig(**SMOKE)
    tok = build_tokenizer(cfg.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    guide = LookGuide(model, [1])
    probe = PatchProbe(cfg.text_hidden, query_keys=LookGuide.query_keys([1]))
    batch = make_batch(tok, "train", [0, 1], turns_per_family=3, n_visual=576)
    for key in ("look_targets", "patch_targets"):
        batch.pop(key)
    turns, named = batch.pop("answer_turns"), batch.pop("answer_queries")
    assert named.shape == (len(turns), 4)
    out = model(**batch, output_hidden_states=True)
    loss = guide.query_loss(turns, named, probe.query)
    layer = model.model.language_model.layers[1]
    rows, pos, family = turns.unbind(1)
    seen = layer.input_layernorm(out.hidden_states[1][rows, pos])
    expected = torch.stack([torch.nn.functional.cross_entropy(probe.query[f"1_{k}"](seen), y) for k, y in
                            zip(QUERY_CLASSES, [*named.unbind(1), family])]).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert model.model.language_model.layers[0].self_attn.o_proj.weight.grad.abs().sum() > 0
    assert layer.self_attn.q_proj.weight.grad is None


def test_patch_targets_mark_each_object_and_its_centre() -> None:
    from edge_prune.bench.generator import SHAPES, make_scene, patch_targets

    scene = make_scene("train", 3)
    t = patch_targets(scene, 8)
    assert t.colour.shape == (24, 24) and int(t.centre.sum()) == len(scene.objects)
    for k, o in enumerate(scene.objects):
        mine = t.owner == k + 1
        assert mine.any() and (t.shape[mine] == SHAPES.index(o.shape) + 1).all()
        assert t.owner[o.cy // 8, o.cx // 8] == k + 1  # an object covers the patch of its centre


def test_cell_occupancy_marks_every_patch_of_an_occupied_cell_so_its_mean_is_the_count() -> None:
    """The occupancy read-out's target: the mean over the 576 patches must be count / 16 for every scene,
    and a patch is marked exactly when an object's centre sits in its cell."""
    from edge_prune.bench.generator import GRID, make_scene, patch_targets
    from edge_prune.bench.train import cell_occupancy, stack_targets

    scenes = [make_scene("test", i) for i in range(12)]
    targets = stack_targets([patch_targets(s, 8) for s in scenes])
    wanted = cell_occupancy(targets["cell"].reshape(len(scenes), -1), targets["owner"].reshape(len(scenes), -1))
    assert sorted({len(s.objects) for s in scenes}) != [len(scenes[0].objects)]  # several counts are tried
    for row, scene in enumerate(scenes):
        assert float(wanted[row].mean()) * GRID * GRID == pytest.approx(len(scene.objects))
        cells = {o.row * GRID + o.col for o in scene.objects}
        marked = {int(c) for c in targets["cell"].reshape(len(scenes), -1)[row][wanted[row] > 0]}
        assert marked == cells


def test_object_probe_reads_each_objects_shape_colour_digit_and_quadrant_from_its_patches() -> None:
    """Features that spell out each patch's own labels give the object read-outs ~zero loss: the
    pooled labels (shape, colour, digit, quadrant of the object under the patches) are the right ones."""
    from edge_prune.bench.generator import QUADRANTS, make_scene, patch_targets
    from edge_prune.bench.train import OBJECT_PROBES, PROBE_CLASSES, PatchProbe, stack_targets

    scenes = [make_scene("train", i) for i in range(6)]
    assert any(o.digit for sc in scenes for o in sc.objects)
    targets = [patch_targets(sc, 8) for sc in scenes]
    batch = stack_targets(targets)
    # a digit is inked on part of its object only: give every patch of the object its digit
    digit = batch["digit"].clone()
    for r, t in enumerate(targets):
        for k in range(1, int(t.owner.max()) + 1):
            mine = torch.from_numpy(t.owner.reshape(-1) == k)
            inked = digit[r][mine & (digit[r] > 0)]
            digit[r][mine] = int(inked[0]) if len(inked) else 0
    blocks = [torch.nn.functional.one_hot(batch[k], PROBE_CLASSES[k]).float() for k in ("colour", "shape")]
    blocks.append(torch.nn.functional.one_hot(digit, PROBE_CLASSES["digit"]).float())
    quadrant = torch.zeros_like(digit)  # the quadrant of the object under each patch, as questions name it
    for r, (sc, t) in enumerate(zip(scenes, targets)):
        for k, o in enumerate(sc.objects):
            quadrant[r][torch.from_numpy(t.owner.reshape(-1) == k + 1)] = QUADRANTS.index(o.quadrant)
    blocks.append(torch.nn.functional.one_hot(quadrant, 4).float())
    features = torch.cat(blocks, -1)
    probe = PatchProbe(features.shape[-1])
    start = 0
    with torch.no_grad():
        for k in OBJECT_PROBES:
            head, n = probe.objects[k], PROBE_CLASSES[k]
            head.weight.zero_()
            head.bias.zero_()
            head.weight[:, start : start + n] = 30 * torch.eye(n)
            start += n
        probe.quadrant.weight.zero_()
        probe.quadrant.bias.zero_()
        probe.quadrant.weight[:, start:] = 30 * torch.eye(4)
        assert float(probe.object_loss(features, batch)) < 1e-3
        shuffled = {**batch, "owner": batch["owner"].roll(1, dims=0)}  # owners of other scenes: wrong labels
        assert float(probe.object_loss(features, shuffled)) > 1.0


def test_tower_stage_trains_the_vision_side_only() -> None:
    from edge_prune.bench.train import PatchProbe, pretrain_tower

    cfg = TrainConfig(**{**SMOKE, "tower_steps": 2, "tower_batch": 2, "occupancy_weight": 0.0})
    model = build_model(cfg, build_tokenizer(cfg.vocab_size))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    records = []
    log = lambda record, _text: records.append(record)  # noqa: E731
    assert pretrain_tower(model, PatchProbe(cfg.text_hidden), cfg, log) == 2
    occupancy_cfg = replace(cfg, occupancy_weight=1.0)  # the occupancy read-out trains in stage 1 too
    probe = PatchProbe(cfg.text_hidden, occupancy=True)
    head = probe.occupancy.weight.detach().clone()
    assert pretrain_tower(model, probe, occupancy_cfg, log) == 2
    assert not torch.equal(probe.occupancy.weight, head)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("model.vision_tower.") for n in changed)
    assert any(n.startswith("model.multi_modal_projector.") for n in changed)
    assert not any(n.startswith(("model.language_model.", "lm_head.")) for n in changed)
    assert records and records[0]["event"] == "tower_step"


def test_visual_tokens_are_rescaled_to_the_asked_norm() -> None:
    from edge_prune.bench.generator import make_scene
    from edge_prune.bench.train import scale_visual_tokens

    cfg = TrainConfig(**SMOKE)
    model = build_model(cfg, build_tokenizer(cfg.vocab_size))
    scale_visual_tokens(model, 3.0)
    with torch.no_grad():  # other scenes than the ones it measured on: the mean norm is a property of the tower
        images = [make_scene("calib", i).render() for i in range(8)]
        features = torch.stack(list(model.model.get_image_features(pixel_values=pixel_values(images)).pooler_output))
    assert float(features.norm(dim=-1).mean()) == pytest.approx(3.0, rel=0.15)


def test_rescaling_visual_tokens_leaves_the_probe_loss_unchanged() -> None:
    from edge_prune.bench.generator import make_scene, patch_targets
    from edge_prune.bench.train import PatchProbe, scale_visual_tokens, stack_targets

    cfg = TrainConfig(**SMOKE)
    model = build_model(cfg, build_tokenizer(cfg.vocab_size))
    probe = PatchProbe(cfg.text_hidden, occupancy=True)
    scenes = [make_scene("calib", i) for i in range(4)]
    targets = stack_targets([patch_targets(sc, cfg.patch_size) for sc in scenes])
    images = pixel_values([sc.render() for sc in scenes])

    def probe_losses() -> tuple[float, float]:
        with torch.no_grad():
            features = torch.stack(list(model.model.get_image_features(pixel_values=images).pooler_output))
            return float(probe.loss(features, targets)), float(probe.occupancy_loss(features, targets))

    before = probe_losses()
    factor = scale_visual_tokens(model, 50.0, probe)
    assert abs(factor - 1) > 0.5  # the features really were rescaled
    after = probe_losses()
    assert after[0] == pytest.approx(before[0], rel=1e-4)
    # the occupancy read-out reads RMS-normalised features: its loss must not move either (the norm's
    # epsilon alone moves it by ~3e-4)
    assert after[1] == pytest.approx(before[1], rel=1e-3)


def test_residual_penalty_is_the_mean_square_rms_at_text_positions_only() -> None:
    from edge_prune.bench.train import text_residual_penalty

    hidden = torch.zeros(1, 4, 8)
    hidden[0, :2] = 100.0  # visual tokens may be large: only text positions feed answers
    hidden[0, 2] = 2.0  # RMS 2 -> 4
    text = torch.tensor([[False, False, True, True]])
    assert float(text_residual_penalty(hidden, text)) == pytest.approx(2.0)


def test_vision_exit_mask_is_the_decoder_run_without_visual_tokens_after_its_layer() -> None:
    """A masked row's text logits equal a run that drops its visual tokens after layer `after` (what a
    recipe's keep_after = 0 does at inference); an unmasked row is untouched; the mask is one-shot."""
    from edge_prune.bench.train import VisionExitMask

    cfg = TrainConfig(**{**SMOKE, "text_layers": 3})
    tok = build_tokenizer(cfg.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg, tok).eval()
    batch = make_batch(tok, "train", [0, 1], turns_per_family=1, n_visual=576)
    for key in ("look_targets", "patch_targets", "answer_turns", "answer_queries", "labels"):
        batch.pop(key)
    ids, image = batch["input_ids"], model.config.image_token_id
    lm = model.model.language_model
    entering: dict = {}
    lm.layers[2].register_forward_pre_hook(lambda _m, args, kw: entering.__setitem__("h", kw.get("hidden_states", args[0] if args else None)), with_kwargs=True)
    with torch.no_grad():
        plain = model(**batch).logits
        exit_mask = VisionExitMask(model, after=1)
        exit_mask.set_rows(ids, image, torch.tensor([True, False]))
        masked = model(**batch).logits
        exit_mask.clear()
        assert torch.equal(model(**batch).logits, plain)  # hidden cleared: the whole image again
        # by hand: row 0's text tokens from layer 2 on, at their own positions, visual tokens gone
        row = 0
        real = batch["attention_mask"][row] > 0
        kept = (real & (ids[row] != image)).nonzero().squeeze(1)
        h = entering["h"][row:row + 1, kept]
        position_embeddings = lm.rotary_emb(h, kept[None])
        h = lm.layers[2](h, attention_mask=None, position_ids=kept[None], position_embeddings=position_embeddings)
        by_hand = model.lm_head(lm.norm(h))[0]
    first_text_after_image = int((ids[row] == image).nonzero().max()) + 1
    after_image = kept >= first_text_after_image
    assert after_image.sum() > 5
    torch.testing.assert_close(masked[row, kept[after_image]], by_hand[after_image], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(masked[row, kept[after_image]], plain[row, kept[after_image]], atol=1e-3)
    torch.testing.assert_close(masked[1], plain[1])


def test_training_refuses_a_look_layer_after_the_vision_exit(tmp_path: Path) -> None:
    from edge_prune.bench.train import main

    with pytest.raises(ValueError, match="--vision-exit-after"):
        main(["--smoke", "--out", str(tmp_path / "m"), "--look-layers", "1", "--vision-exit-after", "0"])
    with pytest.raises(ValueError, match="--polish-vision-exit-after"):  # stage 3's, checked before stage 1
        main(["--smoke", "--out", str(tmp_path / "m"), "--look-layers", "1", "--polish-vision-exit-after", "0"])
    with pytest.raises(ValueError, match="--polish-vision-exit-after must name a decoder layer 0..0"):
        main(["--smoke", "--out", str(tmp_path / "m"), "--look-layers", "0", "--polish-vision-exit-after", "1"])
    with pytest.raises(ValueError, match="--exit-stage-look-layers 1 include a layer after --exit-stage-after"):
        main(["--smoke", "--out", str(tmp_path / "m"), "--exit-stage-look-layers", "1"])
    with pytest.raises(ValueError, match="--exit-stage-look-layers 0,5 must name decoder layers 0..1"):
        main(["--smoke", "--out", str(tmp_path / "m"), "--exit-stage-look-layers", "0,5"])
    with pytest.raises(ValueError, match="--exit-stage-rate must be in"):
        main(["--smoke", "--out", str(tmp_path / "m"), "--exit-stage-rate", "0"])
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_smoke_training_with_a_vision_exit_saves_a_plain_llava(tmp_path: Path) -> None:
    """The mask is training-only: the saved model loads as a LlavaForConditionalGeneration with no hooks."""
    from edge_prune.bench.train import main

    main(["--smoke", "--out", str(tmp_path / "m"), "--look-layers", "0", "--vision-exit-after", "0",
          "--vision-exit-rate", "1", "--polish-vision-exit-after", "0"])
    run = json.loads((tmp_path / "m" / "training_run.json").read_text())
    assert run["joint_stage"]["config"]["vision_exit_after"] == 0  # the joint stage
    assert run["polish_stage"]["config"]["vision_exit_after"] == 0  # stage 3 (polish_config)
    assert run["config"]["vision_exit_after"] == 0  # stage 4 (exit_stage_config)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert not any(layer.self_attn._forward_pre_hooks for layer in model.model.language_model.layers)
