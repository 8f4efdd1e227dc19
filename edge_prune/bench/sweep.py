"""Evaluate a list of recipes on the benchmark and write the results as Markdown + JSON tables.

Used by the scripts in benchmarks/: every row is one `evaluate()` run; recipes are saved under
benchmarks/recipes/NAME/recipe.json so each row can be reproduced with `edge-prune eval`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_prune.bench.evaluate import EvalResult, evaluate
from edge_prune.bench.generator import FAMILIES
from edge_prune.engine import PrunedEngine
from edge_prune.recipe import Recipe


@dataclass
class SweepEntry:
    name: str
    recipe: Recipe | None  # None = unpruned
    note: str = ""
    ablate_visual: str | None = None


def save_recipe(recipe: Recipe, recipes_dir: Path, name: str) -> Path:
    return recipe.save(recipes_dir / name / "recipe.json")


def run_sweep(model_dir: Path, entries: list[SweepEntry], n: int, batch_size: int = 16,
              engine: PrunedEngine | None = None, split: str = "test") -> list[dict[str, Any]]:
    engine = engine or PrunedEngine.load(model_dir)
    rows = []
    for entry in entries:
        print(f"== {entry.name} ({entry.note})", flush=True)
        result: EvalResult = evaluate(model_dir, recipe=entry.recipe, split=split, n=n, batch_size=batch_size,
                                      ablate_visual=entry.ablate_visual, engine=engine)
        engine.feature_hook = None  # evaluate() installs the ablation hook on the shared engine
        row = {"name": entry.name, "note": entry.note, **result.to_dict()}
        rows.append(row)
        print(f"   accuracy {result.accuracy:.2%}, FLOPs reduction {result.flops_reduction:.1%}, "
              f"prefill {result.prefill_ms:.1f} ms", flush=True)
    return rows


def prior_accuracy(n: int, split: str = "test") -> dict[str, float]:
    """Accuracy of always giving each family's most frequent answer: the bar a blind model clears."""
    from collections import Counter

    from edge_prune.bench.generator import iter_items

    answers: dict[str, Counter] = {}
    for item in iter_items(split, n):
        answers.setdefault(item.family, Counter())[item.answer] += 1
    return {f: c.most_common(1)[0][1] / sum(c.values()) for f, c in answers.items()}


def markdown_table(rows: list[dict[str, Any]], reference: str | None = None) -> str:
    """One row per run: overall and per-family accuracy, FLOPs reduction, prefill time."""
    ref = next((r for r in rows if r["name"] == reference), None)
    head = ["run", "FLOPs -", "acc", *( ["Δ acc"] if ref else []), *FAMILIES, "prefill ms", "n", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], f"{r['flops_reduction']:.1%}", f"{r['accuracy']:.2%}"]
        if ref:
            cells.append(f"{(r['accuracy'] - ref['accuracy']) * 100:+.2f}")
        cells += [f"{r['per_family'].get(f, float('nan')):.1%}" for f in FAMILIES]
        cells += [f"{r['prefill_ms']:.1f}", str(r["n"]), r.get("note", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict[str, Any]], md_path: Path, header: str, reference: str | None = None) -> None:
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(header.rstrip() + "\n\n" + markdown_table(rows, reference))
    md_path.with_suffix(".json").write_text(json.dumps(rows, indent=2))
