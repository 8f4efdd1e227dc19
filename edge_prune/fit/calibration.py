"""Calibration data for fitting: a JSONL of {"image", "prompt"} records, or the benchmark's calib split.

JSONL records follow LLaVA's instruction layout: "prompt" is the user's turn with an "<image>"
placeholder; "image" is a path, relative to the JSONL file's folder unless absolute. Bad records
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
IMAGE_PLACEHOLDER = "<image>"


@dataclass
class CalibrationSample:
    image: Image.Image
    prompt: str  # the user's question, without the image placeholder
    source: str  # "file.jsonl:LINE" or "bench:calib:INDEX"


@dataclass
class CalibrationSet:
    samples: list[CalibrationSample]
    source: str
    skipped: list[str]  # one message per bad record


def load_calibration(source: str, n: int, warn: bool = True) -> CalibrationSet:
    """The first `n` good samples of `source` (a JSONL path or 'bench:calib')."""
    if n <= 0:
        raise InputError(f"--n is {n}; expected a positive number of calibration samples")
    if source == BENCH_SOURCE:
        from edge_prune.bench.generator import iter_items

        samples = [CalibrationSample(it.image, it.question, f"{BENCH_SOURCE}:{it.index}")
                   for it in iter_items("calib", n)]
        return CalibrationSet(samples, source, [])
    path = Path(source)
    if not path.is_file():
        raise InputError(f"calibration file not found: {path}; pass a JSONL of {{\"image\", \"prompt\"}} "
                         f"records or '{BENCH_SOURCE}'")
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
    return None, CalibrationSample(image, question, f"{path.name}:{lineno}")
