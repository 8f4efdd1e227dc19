"""The synthetic VQA generator: deterministic, disjoint splits, balanced and unambiguous."""

from collections import Counter

import numpy as np
import pytest

from edge_prune.bench.generator import (
    FAMILIES,
    QUADRANTS,
    RELATIONS,
    SPLITS,
    iter_items,
    make_conversation,
    make_item,
    make_scene,
)


def test_same_seed_same_item() -> None:
    a, b = make_item("test", 17), make_item("test", 17)
    assert (a.question, a.answer, a.family) == (b.question, b.answer, b.family)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_splits_are_disjoint() -> None:
    signatures = {split: {make_scene(split, i).signature() for i in range(400)} for split in SPLITS}
    assert not signatures["train"] & signatures["test"]
    assert not signatures["train"] & signatures["calib"]
    assert not signatures["calib"] & signatures["test"]
    train_pixels = {make_scene("train", i).render().tobytes() for i in range(60)}
    assert not train_pixels & {make_scene("test", i).render().tobytes() for i in range(60)}


def test_every_family_present_with_one_word_answers() -> None:
    items = list(iter_items("test", 140))
    assert Counter(it.family for it in items) == {f: 20 for f in FAMILIES}
    for it in items:
        assert it.answer and len(it.answer.split()) == 1
        assert it.image.size == (192, 192)


def test_answer_priors_are_balanced() -> None:
    exists = Counter(it.answer for it in iter_items("test", 300, ["exists"]))
    assert abs(exists["yes"] - exists["no"]) < 45
    position = Counter(it.answer for it in iter_items("test", 200, ["position"]))
    assert set(position) == set(QUADRANTS) and min(position.values()) > 30
    relation = Counter(it.answer for it in iter_items("test", 200, ["relation"]))
    assert set(relation) == set(RELATIONS) and min(relation.values()) > 30
    detail = Counter(it.answer for it in iter_items("test", 300, ["detail"]))
    assert len(detail) == 10 and max(detail.values()) < 3 * min(detail.values())


def test_questions_are_unambiguous() -> None:
    for it in iter_items("test", 140, ["colour", "shape"]):
        objs = it.scene.objects
        if it.family == "colour":
            shape = it.question.split()[-1].rstrip("?")
            assert sum(o.shape == shape for o in objs) == 1
        else:
            colour = it.question.split()[-2]
            assert sum(o.colour == colour for o in objs) == 1
    for i in range(50):  # no two objects share colour and shape, so "the red circle" is unique
        names = [o.name for o in make_scene("train", i).objects]
        assert len(names) == len(set(names))


def test_background_is_textured_not_flat() -> None:
    scene = make_scene("test", 0)
    pixels = np.asarray(scene.render(), dtype=np.float32)
    corner = pixels[:8, :8]  # an 8x8 patch of background is not a single colour
    assert corner.std() > 3.0


def test_conversation_covers_many_families() -> None:
    _, qas = make_conversation("train", 5, turns_per_family=3)
    assert len({qa.question for qa in qas}) == len(qas)
    assert len({qa.family for qa in qas}) >= 3


def test_unknown_split_or_family_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="train, calib, test"):
        make_item("dev", 0)
    with pytest.raises(ValueError, match="colour"):
        list(iter_items("test", 3, ["size"]))
