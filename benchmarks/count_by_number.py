"""Count accuracy by the true number of objects, on many count questions (issue 3's weakest family).

The harness's 2,100-item test run asks 300 count questions: ±2.5 points of noise, as large as the
differences between training variants. This asks `--n` count questions (test split) of each model
and splits the answers by how many objects the scene holds, so variants are compared side by side.

    .venv/bin/python benchmarks/count_by_number.py [MODEL_DIR ...] [--n 2100] [--recipe RECIPE]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from tqdm import tqdm

from edge_prune.bench.evaluate import answer, is_correct
from edge_prune.bench.generator import MAX_OBJECTS, iter_items
from edge_prune.engine import PrunedEngine

MODEL = Path(__file__).resolve().parent / "models" / "toyvqa-llava"
BATCH = 16


def count_accuracy(model_dir: Path, n: int,
                   recipe: Path | None = None) -> tuple[collections.Counter, collections.Counter]:
    """(right, asked) per true object count, answered and scored exactly as the eval harness does."""
    engine = PrunedEngine.load(model_dir, recipe=recipe)
    items = list(iter_items("test", n, families=["count"]))
    right, asked = collections.Counter(), collections.Counter()
    for start in tqdm(range(0, n, BATCH), desc=model_dir.name, mininterval=5):
        chunk = items[start:start + BATCH]
        for item, text in zip(chunk, answer(engine, chunk).texts):
            objects = len(item.scene.objects)
            asked[objects] += 1
            right[objects] += is_correct(text, item.answer)
    return right, asked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path, default=[MODEL], help="model directories (default: the benchmark model)")
    parser.add_argument("--n", type=int, default=2100, help="count questions per model")
    parser.add_argument("--recipe", type=Path, help="answer under this pruning recipe (default: unpruned)")
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
        right, asked = count_accuracy(model_dir, args.n, args.recipe)
        overall = sum(right.values()) / sum(asked.values())
        cells = " | ".join(f"{right[k] / asked[k]:.1%} ({asked[k]})" if asked[k] else "-" for k in numbers)
        label = f"{model_dir} + {args.recipe}" if args.recipe else str(model_dir)
        print(f"| {label} | {overall:.1%} | {cells} |")


if __name__ == "__main__":
    main()
