"""Deterministic synthetic VQA scenes and questions: the yardstick for pruning quality.

Every scene is a pure function of (split, index), so a benchmark number can be
reproduced anywhere without shipping images. Backgrounds are textured and noisy so
that background visual tokens are not trivially redundant, and the question families
probe colour, shape, counting, existence, spatial relations, absolute position (all
four quadrants, so a pruner that keeps one region fails) and fine detail (a digit
drawn inside an object).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

FAMILIES: tuple[str, ...] = ("colour", "shape", "count", "exists", "relation", "position", "detail")
SPLITS: tuple[str, ...] = ("train", "calib", "test")

IMAGE_SIZE = 192
GRID = 4  # objects sit in distinct cells of a GRID x GRID layout, so positions are unambiguous
CELL = IMAGE_SIZE // GRID
MAX_OBJECTS = 8

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 190, 50),
    "blue": (30, 70, 235),
    "yellow": (245, 225, 20),
    "purple": (160, 40, 210),
    "cyan": (20, 215, 225),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: dict[str, int] = {"small": 18, "medium": 30, "large": 42}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
QUADRANTS: tuple[str, ...] = ("northwest", "northeast", "southwest", "southeast")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
_DARK_COLOURS = {"red", "blue", "purple"}  # digits on these are drawn white, else black

# Seven-segment layout: font-independent, so images are identical on every machine.
_SEGMENTS: dict[str, str] = {
    "0": "abcdef", "1": "bc", "2": "abdeg", "3": "abcdg", "4": "bcfg",
    "5": "acdfg", "6": "acdefg", "7": "abc", "8": "abcdefg", "9": "abcdfg",
}


@dataclass(frozen=True)
class SceneObject:
    """One object: what it is, where it is (cell and pixel centre), and its digit if any."""

    colour: str
    shape: str
    size: str
    row: int
    col: int
    cx: int
    cy: int
    digit: str | None

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def quadrant(self) -> str:
        return QUADRANTS[(self.row >= GRID // 2) * 2 + (self.col >= GRID // 2)]


@dataclass(frozen=True)
class Scene:
    """A rendered-on-demand scene; `seed` fixes its background texture and noise."""

    split: str
    index: int
    seed: int
    objects: tuple[SceneObject, ...]
    background: tuple[int, ...] = field(default=())

    def render(self) -> Image.Image:
        return _render(self)

    def signature(self) -> str:
        """Content hash of the scene; used to prove that splits never share a scene."""
        text = repr((self.seed, self.background, self.objects))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class QA:
    """One question with its one-word answer and the family it probes."""

    question: str
    answer: str
    family: str
    objects: tuple[int, ...] = field(default=(), compare=False)  # indices into scene.objects it is about


@dataclass
class VQAItem:
    """A benchmark item: image, question, one-word answer, family, and where it came from."""

    image: Image.Image
    question: str
    answer: str
    family: str
    split: str
    index: int
    scene: Scene


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")


def _check_families(families: Sequence[str] | None) -> tuple[str, ...]:
    if families is None:
        return FAMILIES
    if isinstance(families, str):
        families = (families,)
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        raise ValueError(f"unknown question family {bad or families!r}; valid families are {', '.join(FAMILIES)}")
    return tuple(families)


def _seed(*parts: object) -> int:
    """Stable 63-bit seed from its parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def make_scene(split: str, index: int, attempt: int = 0, max_objects: int = MAX_OBJECTS) -> Scene:
    """The scene for (split, index); `attempt` gives an alternative when a family cannot be asked.

    `max_objects` below MAX_OBJECTS draws simpler scenes (training's curriculum only).
    """
    _check_split(split)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
    seed = _seed("edge-prune-toyvqa", split, index, attempt)
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    combos = rng.choice(len(COLOURS) * len(SHAPES), size=n, replace=False)
    colour_names = list(COLOURS)
    objects = []
    for cell, combo in zip(cells, combos):
        row, col = divmod(int(cell), GRID)
        colour = colour_names[int(combo) // len(SHAPES)]
        shape = SHAPES[int(combo) % len(SHAPES)]
        size = ("small", "medium", "large")[int(rng.choice(3, p=(0.3, 0.3, 0.4)))]
        half = SIZES[size] // 2
        slack = CELL // 2 - half - 2
        cx = col * CELL + CELL // 2 + int(rng.integers(-slack, slack + 1))
        cy = row * CELL + CELL // 2 + int(rng.integers(-slack, slack + 1))
        digit = str(int(rng.integers(0, 10))) if size == "large" else None
        objects.append(SceneObject(colour, shape, size, row, col, cx, cy, digit))
    background = tuple(int(v) for v in rng.integers(0, 2**31, size=4))
    return Scene(split, index, seed, tuple(objects), background)


def _texture(scene: Scene) -> np.ndarray:
    """Muted textured background: blurred blobs + stripes + pixel noise, never flat."""
    rng = np.random.default_rng(scene.background[0])
    s = IMAGE_SIZE
    low = rng.uniform(0, 1, size=(6, 6, 3))
    low = np.kron(low, np.ones((s // 6 + 1, s // 6 + 1, 1)))[:s, :s]
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(0.08, 0.35)
    stripes = np.sin((x * np.cos(angle) + y * np.sin(angle)) * freq)[..., None]
    base = rng.uniform(70, 130, size=3)
    img = base + 25 * (low - 0.5) + 12 * stripes + rng.normal(0, 10, size=(s, s, 3))
    grey = img.mean(axis=2, keepdims=True)
    img = grey + 0.35 * (img - grey)  # desaturate so object colours stay distinct
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_digit(draw: ImageDraw.ImageDraw, digit: str, cx: int, cy: int, fill: tuple[int, int, int]) -> None:
    w, h, t = 12, 18, 3
    x0, y0, ym = cx - w // 2, cy - h // 2, cy
    boxes = {
        "a": (x0, y0, x0 + w, y0 + t), "g": (x0, ym - t // 2, x0 + w, ym + t // 2 + 1),
        "d": (x0, y0 + h - t, x0 + w, y0 + h),
        "f": (x0, y0, x0 + t, ym), "b": (x0 + w - t, y0, x0 + w, ym),
        "e": (x0, ym, x0 + t, y0 + h), "c": (x0 + w - t, ym, x0 + w, y0 + h),
    }
    for seg in _SEGMENTS[digit]:
        draw.rectangle(boxes[seg], fill=fill)


def _draw_shape(draw: ImageDraw.ImageDraw, o: SceneObject, fill) -> None:
    r = SIZES[o.size] // 2
    cx, cy = o.cx, o.cy
    if o.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif o.shape == "square":
        q = int(r * 0.9)
        draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(cx, cy - r - 2), (cx - r - 2, cy + r), (cx + r + 2, cy + r)], fill=fill)
    else:  # cross
        a = max(3, int(r * 0.42))
        draw.rectangle((cx - r, cy - a, cx + r, cy + a), fill=fill)
        draw.rectangle((cx - a, cy - r, cx + a, cy + r), fill=fill)


def centre_patch(o: SceneObject, patch_size: int) -> tuple[int, int]:
    """(row, col) of the patch holding the object's centre pixel."""
    g = IMAGE_SIZE // patch_size
    return min(o.cy // patch_size, g - 1), min(o.cx // patch_size, g - 1)


def _digit_centre(o: SceneObject) -> tuple[int, int]:
    dy = 4 if o.shape == "triangle" else 0  # a triangle's widest part is low
    return o.cx, o.cy + dy


def _render(scene: Scene) -> Image.Image:
    img = Image.fromarray(_texture(scene))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_shape(draw, o, COLOURS[o.colour])
        if o.digit is not None:
            ink = (255, 255, 255) if o.colour in _DARK_COLOURS else (0, 0, 0)
            _draw_digit(draw, o.digit, *_digit_centre(o), ink)
    return img


@dataclass(frozen=True)
class PatchTargets:
    """What each patch of a scene shows, on the (IMAGE_SIZE/patch)^2 grid; 0 means background/none.

    Used only as auxiliary supervision while training the benchmark model, so its visual
    tokens become informative early (a from-scratch tower otherwise leaves the decoder
    stuck on answer priors); the published model is a plain LLaVA.
    """

    colour: np.ndarray  # 1 + index into COLOURS
    shape: np.ndarray  # 1 + index into SHAPES
    digit: np.ndarray  # 1 + digit drawn over the patch
    centre: np.ndarray  # 1 where an object's centre falls
    cell: np.ndarray  # which GRID x GRID layout cell the patch lies in (0..GRID^2-1)
    owner: np.ndarray  # 1 + index into scene.objects of the object covering the patch


def patch_targets(scene: Scene, patch_size: int) -> PatchTargets:
    """Per-patch labels: the object covering most of a patch (>= 1/4 of it), its digit, its centre."""
    if IMAGE_SIZE % patch_size:
        raise ValueError(f"patch_size must divide the image size {IMAGE_SIZE}, got {patch_size}")
    g = IMAGE_SIZE // patch_size
    owner_img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    ink = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    for k, o in enumerate(scene.objects):
        _draw_shape(ImageDraw.Draw(owner_img), o, k + 1)
        if o.digit is not None:
            _draw_digit(ImageDraw.Draw(ink), o.digit, *_digit_centre(o), 1)
    blocks = np.asarray(owner_img).reshape(g, patch_size, g, patch_size).transpose(0, 2, 1, 3).reshape(g, g, -1)
    cover = np.stack([(blocks == k + 1).mean(-1) for k in range(len(scene.objects))], -1)
    best = cover.argmax(-1)
    has = cover.max(-1) >= 0.25
    inked = np.asarray(ink).reshape(g, patch_size, g, patch_size).sum((1, 3)) >= patch_size
    colour_ids = {c: i + 1 for i, c in enumerate(COLOURS)}
    colour = np.zeros((g, g), np.int64)
    shape = np.zeros((g, g), np.int64)
    digit = np.zeros((g, g), np.int64)
    centre = np.zeros((g, g), np.int64)
    owner = np.where(has, best + 1, 0).astype(np.int64)
    for k, o in enumerate(scene.objects):
        mine = has & (best == k)
        colour[mine] = colour_ids[o.colour]
        shape[mine] = SHAPES.index(o.shape) + 1
        if o.digit is not None:
            digit[mine & inked] = int(o.digit) + 1
        centre[centre_patch(o, patch_size)] = 1
    rows = np.arange(g) * patch_size // CELL
    cell = rows[:, None] * GRID + rows[None, :]
    return PatchTargets(colour, shape, digit, centre, cell, owner)


def _questions(scene: Scene, family: str, rng: np.random.Generator) -> QA | None:
    """One unambiguous question of `family` about `scene`, or None if the scene cannot support it."""
    objs = scene.objects
    colours = list(COLOURS)
    if family == "colour":
        unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        if not unique:
            return None
        o = unique[int(rng.integers(len(unique)))]
        return QA(f"What colour is the {o.shape}?", o.colour, family, (objs.index(o),))
    if family == "shape":
        unique = [o for o in objs if sum(p.colour == o.colour for p in objs) == 1]
        if not unique:
            return None
        o = unique[int(rng.integers(len(unique)))]
        return QA(f"What shape is the {o.colour} object?", o.shape, family, (objs.index(o),))
    if family == "count":
        return QA("How many objects are there?", NUMBER_WORDS[len(objs)], family, tuple(range(len(objs))))
    if family == "exists":
        present = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5:
            c, s = sorted(present)[int(rng.integers(len(present)))]
            return QA(f"Is there a {c} {s}?", "yes", family,
                      tuple(i for i, o in enumerate(objs) if (o.colour, o.shape) == (c, s)))
        absent = [(c, s) for c in colours for s in SHAPES if (c, s) not in present]
        # POPE-style adversarial negatives: prefer absent pairs whose colour or shape is in the scene.
        near = [(c, s) for c, s in absent if any(o.colour == c or o.shape == s for o in objs)]
        pool = near if near and rng.random() < 0.7 else absent
        c, s = pool[int(rng.integers(len(pool)))]
        return QA(f"Is there a {c} {s}?", "no", family)
    if family == "relation":
        rel = RELATIONS[int(rng.integers(4))]
        pairs = []
        for a in objs:
            for b in objs:
                if a is b:
                    continue
                if rel == "left" and a.row == b.row and a.col < b.col:
                    pairs.append((a, b))
                elif rel == "right" and a.row == b.row and a.col > b.col:
                    pairs.append((a, b))
                elif rel == "above" and a.col == b.col and a.row < b.row:
                    pairs.append((a, b))
                elif rel == "below" and a.col == b.col and a.row > b.row:
                    pairs.append((a, b))
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        return QA(f"Where is the {a.name} relative to the {b.name}?", rel, family, (objs.index(a), objs.index(b)))
    if family == "position":
        quad = QUADRANTS[int(rng.integers(4))]
        cands = [o for o in objs if o.quadrant == quad]
        if not cands:
            return None
        o = cands[int(rng.integers(len(cands)))]
        return QA(f"In which quadrant is the {o.name}?", quad, family, (objs.index(o),))
    if family == "detail":
        digit = DIGITS[int(rng.integers(10))]
        cands = [o for o in objs if o.digit == digit]
        if not cands:
            return None
        o = cands[int(rng.integers(len(cands)))]
        return QA(f"Which digit is on the {o.name}?", digit, family, (objs.index(o),))
    raise ValueError(f"unknown question family {family!r}; valid families are {', '.join(FAMILIES)}")


def make_qa(split: str, index: int, family: str) -> tuple[Scene, QA]:
    """Scene and question for one item; re-draws the scene (attempt 1, 2, ...) until the family fits."""
    _check_split(split)
    _check_families((family,))
    for attempt in range(1000):
        scene = make_scene(split, index, attempt)
        qa = _questions(scene, family, np.random.default_rng(_seed("qa", scene.seed, family)))
        if qa is not None:
            return scene, qa
    raise RuntimeError(f"no scene supports family {family!r} for {split}/{index}")  # pragma: no cover


def make_item(split: str, index: int, family: str | None = None) -> VQAItem:
    """The benchmark item (split, index); families cycle with the index unless one is given."""
    fam = FAMILIES[index % len(FAMILIES)] if family is None else family
    scene, qa = make_qa(split, index, fam)
    return VQAItem(scene.render(), qa.question, qa.answer, qa.family, split, index, scene)


def iter_items(split: str, n: int, families: Sequence[str] | None = None, start: int = 0) -> Iterator[VQAItem]:
    """n items of `split`, cycling through `families` (all by default) so each is equally represented."""
    fams = _check_families(families)
    _check_split(split)
    for i in range(start, start + n):
        yield make_item(split, i, fams[i % len(fams)])


def make_conversation(split: str, index: int, turns_per_family: int = 2,
                      max_objects: int = MAX_OBJECTS) -> tuple[Image.Image, list[QA]]:
    """One image with many Q/A turns (for training): amortises the 576 visual tokens over many answers.

    Uses scene `index` of the split; families the scene cannot support are skipped, and
    repeated questions are dropped so no turn can be answered by copying an earlier one.
    """
    _check_split(split)
    scene = make_scene(split, index, max_objects=max_objects)
    rng = np.random.default_rng(_seed("conv", scene.seed))
    qas: list[QA] = []
    seen: set[str] = set()
    for family in FAMILIES:
        for _ in range(20):  # some families need a lucky draw (e.g. a digit that is present)
            if sum(q.family == family for q in qas) >= turns_per_family:
                break
            qa = _questions(scene, family, rng)
            if qa is not None and qa.question not in seen:
                seen.add(qa.question)
                qas.append(qa)
    order = rng.permutation(len(qas))
    return scene.render(), [qas[i] for i in order]


def corpus_lines() -> list[str]:
    """Every word the benchmark can ask or answer, for training the tokenizer."""
    lines = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    lines += list(NUMBER_WORDS) + list(QUADRANTS) + list(RELATIONS) + list(DIGITS) + ["yes", "no"]
    for i in range(400):
        for fam in FAMILIES:
            _, qa = make_qa("train", i, fam)
            lines.append(f"{qa.question} {qa.answer}")
    return lines
