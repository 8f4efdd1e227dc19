"""Writes what the demo needs: a benchmark scene image with its question, and (when the trained
benchmark model is absent) a tiny random checkpoint so the pipeline still runs end to end.

    python examples/demo_inputs.py OUT_DIR   -> prints the model dir, image path and question
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edge_prune.bench.generator import make_item
from edge_prune.models.tiny import TinySpec, write_tiny_llava

BENCH_MODEL = Path(__file__).resolve().parent.parent / "benchmarks" / "models" / "toyvqa-llava"


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    item = make_item("test", 7, family="position")
    image = out / "scene.png"
    item.image.save(image)
    if (BENCH_MODEL / "config.json").is_file():
        model = BENCH_MODEL
    else:
        model = out / "tiny-llava"
        if not (model / "config.json").is_file():
            write_tiny_llava(model, TinySpec(num_layers=8, image_size=192, patch_size=8, hidden_size=128,
                                             intermediate_size=344))
    print(json.dumps({"model": str(model), "image": str(image), "question": item.question, "answer": item.answer}))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/demo"))
