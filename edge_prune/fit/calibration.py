"""Calibration data for fitting: a JSONL of {"image", "prompt"[, "answer"]} records, or a benchmark split.

JSONL records follow LLaVA's instruction layout: "prompt" is the user's turn with an "<image>"
placeholder; "image" is a path, relative to the JSONL file's folder unless absolute; the optional
"answer" is the reference answer that guide and exit-router training match distributions on.
'bench:calib' and 'bench:train' draw the synthetic benchmark's splits (with answers). Bad records
are reported with their line numbers; fitting stops if too few good ones remain.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from edge_prune.errors import InputError

BENCH_SOURCE = "bench:calib"
BENCH_SOURCES = ("bench:calib", "bench:train")
IMAGE_PLACEHOLDER = "<image>"


@dataclass
class CalibrationSample:
    image: Image.Image
    prompt: str  # the user's question, without the image placeholder
    source: str  # "file.jsonl:LINE" or "bench:calib:INDEX"
    answer: str | None = None  # reference answer, when the source has one


@dataclass
class CalibrationSet:
    samples: list[CalibrationSample]
    source: str
    skipped: list[str]  # one message per bad record


def load_calibration(source: str, n: int, warn: bool = True) -> CalibrationSet:
    """The first `n` good samples of `source` (a JSONL path, 'bench:calib' or 'bench:train')."""
    if n <= 0:
        raise InputError(f"--n is {n}; expected a positive number of calibration samples")
    if source in BENCH_SOURCES:
        from edge_prune.bench.generator import iter_items

        split = source.split(":", 1)[1]
        samples = [CalibrationSample(it.image, it.question, f"{source}:{it.index}", it.answer)
                   for it in iter_items(split, n)]
        return CalibrationSet(samples, source, [])
    path = Path(source)
    if not path.is_file():
        raise InputError(f"calibration file not found: {path}; pass a JSONL of {{\"image\", \"prompt\"}} "
                         f"records or one of {', '.join(BENCH_SOURCES)}")
    samples: list[CalibrationSample] = []
    skipped: list[str] = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if len(samples) >= n:
                break
            if not line.strip():
                continue
            problem, sample = _parse(line, path, lineno)
            if problem:
                skipped.append(f"{path}:{lineno}: {problem}")
                if warn:
                    print(f"edge-prune: skipping calibration record {path}:{lineno}: {problem}", file=sys.stderr)
            else:
                samples.append(sample)
    if len(samples) < n:
        detail = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        raise InputError(
            f"{path} gave {len(samples)} good calibration samples, {n} were requested"
            + (f" ({len(skipped)} bad records: {detail})" if skipped else "")
            + "; fix the records or lower --n"
        )
    return CalibrationSet(samples, str(path), skipped)


def _parse(line: str, path: Path, lineno: int) -> tuple[str | None, CalibrationSample | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg})", None
    if not isinstance(record, dict) or "image" not in record or "prompt" not in record:
        return "expected an object with keys 'image' and 'prompt'", None
    prompt = str(record["prompt"])
    if IMAGE_PLACEHOLDER not in prompt:
        return "prompt has no <image> placeholder", None
    image_path = Path(record["image"])
    if not image_path.is_absolute():
        image_path = path.parent / image_path
    if not image_path.is_file():
        return f"image file not found: {image_path}", None
    try:
        with Image.open(image_path) as im:
            image = im.convert("RGB")
    except (OSError, ValueError) as exc:
        return f"unreadable image {image_path} ({exc})", None
    question = prompt.replace(IMAGE_PLACEHOLDER, "").strip()
    answer = record.get("answer")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        return "'answer' must be a non-empty string when given", None
    return None, CalibrationSample(image, question, f"{path.name}:{lineno}", answer.strip() if answer else None)
