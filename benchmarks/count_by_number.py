"""Count accuracy by the true number of objects, on many count questions (issue 3's weakest family).

The harness's 2,100-item test run asks 300 count questions: ±2.5 points of noise, as large as the
differences between training variants. This asks `--n` count questions (test split) of each model
and splits the answers by how many objects the scene holds, so variants are compared side by side.

    .venv/bin/python benchmarks/count_by_number.py [MODEL_DIR ...] [--n 2100]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from edge_prune.bench.generator import MAX_OBJECTS, iter_items
from edge_prune.bench.tokenizer import prompt

MODEL = Path(__file__).resolve().parent / "models" / "toyvqa-llava"


def count_accuracy(model_dir: Path, n: int) -> tuple[collections.Counter, collections.Counter]:
    """(right, asked) per true object count, greedy first answer token as the harness reads it."""
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    processor = LlavaProcessor.from_pretrained(str(model_dir))
    right, asked = collections.Counter(), collections.Counter()
    for item in tqdm(iter_items("test", n, families=["count"]), total=n, desc=model_dir.name, mininterval=5):
        inputs = processor(images=item.image, text=prompt(item.question), return_tensors="pt")
        with torch.no_grad():
            token = int(model(**inputs).logits[0, -1].argmax())
        objects = len(item.scene.objects)
        asked[objects] += 1
        right[objects] += processor.tokenizer.decode([token]).strip() == item.answer
    return right, asked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path, default=[MODEL], help="model directories (default: the benchmark model)")
    parser.add_argument("--n", type=int, default=2100, help="count questions per model")
    args = parser.parse_args()
    if args.n <= 0:
        parser.error(f"--n is {args.n}; expected a positive number of questions")
    for model_dir in args.models:
        if not (model_dir / "config.json").is_file():
            parser.error(f"{model_dir} is not a model directory (no config.json); pass a saved LLaVA checkpoint")
    numbers = range(1, MAX_OBJECTS + 1)
    print("| model | count | " + " | ".join(f"{k} objects" for k in numbers) + " |")
    print("|---|---|" + "---|" * len(numbers))
    for model_dir in args.models:
        right, asked = count_accuracy(model_dir, args.n)
        overall = sum(right.values()) / sum(asked.values())
        cells = " | ".join(f"{right[k] / asked[k]:.1%} ({asked[k]})" if asked[k] else "-" for k in numbers)
        print(f"| {model_dir} | {overall:.1%} | {cells} |")


if __name__ == "__main__":
    main()
