"""Issue 4's figures: FitPrune on the benchmark model at 40-90% prefill-FLOPs reduction, against
random / pool / FastV at the same FLOPs, fit time, and predicted-FLOPs == `edge-prune cost`.

Also: what the fitted schedule's drops should do (rank by FitPrune's score or at random, over the
whole image or region by region, discard or merge the dropped tokens: `--ranking`, `--regions`,
`--merge`), chosen on the calibration split and reported on the test split; and how many decoder
layers must see the image (all visual tokens dropped after layer K), which bounds what any schedule
can save on this model.

    .venv/bin/python benchmarks/fitprune_curve.py [--n 2100] [--n-curve 700]

Writes benchmarks/results/fitprune.md/.json/.png and recipes under benchmarks/recipes/NAME/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from edge_prune.bench.sweep import SweepEntry, run_sweep, save_recipe, write_results  # noqa: E402
from edge_prune.cost import estimate  # noqa: E402
from edge_prune.engine import PrunedEngine  # noqa: E402
from edge_prune.errors import RecipeError  # noqa: E402
from edge_prune.fit.baselines import baseline_recipe  # noqa: E402
from edge_prune.fit.calibration import load_calibration  # noqa: E402
from edge_prune.fit.fitprune import FitPruneFitter  # noqa: E402
from edge_prune.recipe import PruneSpec, Recipe  # noqa: E402

ROOT = Path(__file__).resolve().parent
MODEL = ROOT / "models" / "toyvqa-llava"
CURVE = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
RANKINGS = ("fitprune", "random")
REGIONS = (1, 4, 8, 12)  # R x R regions of the 24 x 24 token grid
MERGE = (False, True)


def fit(engine: PrunedEngine, calib, target: float, accounting: str = "exact", ranking: str = "fitprune",
        regions: int = 1, merge: bool = False):
    return FitPruneFitter(engine, calib, target, accounting=accounting, batch_size=16, progress=False,
                          ranking=ranking, regions=regions, merge=merge).fit()


def variant_name(target: float, ranking: str, regions: int, merge: bool = False) -> str:
    name = f"fitprune-{round(target * 100)}"
    if ranking != "fitprune":
        name += f"-{ranking}"
    return name + (f"-r{regions}" if regions > 1 else "") + ("-merge" if merge else "")


def variant_flags(ranking: str, regions: int, merge: bool) -> str:
    return f"--ranking {ranking} --regions {regions}" + (" --merge" if merge else "")


def image_seen_by(shape) -> list[SweepEntry]:
    """Recipes that drop every visual token after layer K-1: only the first K layers' attention sees the image."""
    entries = []
    layers = shape.num_layers
    for k in range(1, layers):
        prune = PruneSpec(scorer="random", keep_after=[1.0] * (k - 1) + [0.0] * (layers - k + 1))
        recipe = Recipe(model=shape.signature(), prune=prune,
                        provenance={"method": "diagnostic: every visual token leaves after layer K-1"})
        save_recipe(recipe, ROOT / "recipes", f"image-seen-by-{k}")
        entries.append(SweepEntry(f"image-seen-by-{k}", recipe, f"layers 0..{k - 1} see the image"))
    return entries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--n", type=int, default=2100, help="items for the 60%% comparison (>= 2000)")
    ap.add_argument("--n-curve", type=int, default=700, help="items per curve point")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--n-select", type=int, default=700, help="calibration-split items per ranking candidate")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    start = time.time()
    engine = PrunedEngine.load(args.model)
    shape = engine.adapter.shape
    calib = load_calibration("bench:calib", args.calib)
    notes = []

    # Fit time: three fits of the 60% recipe with 64 samples (statistics + search), median.
    times = []
    for _ in range(3):
        result = fit(engine, calib, 0.6)
        times.append(result.seconds)
    fit60 = result
    notes.append(f"FitPrune fit at 60% with {args.calib} calibration samples: median {statistics.median(times):.1f} s "
                 f"of 3 ({', '.join(f'{t:.1f}' for t in times)}), alpha {fit60.alpha:.4f}")

    # Predicted FLOPs equal the cost model's under every accounting.
    for accounting in ("exact", "fastv", "fitprune"):
        res = fit60 if accounting == "exact" else fit(engine, calib, 0.6, accounting)
        text = res.recipe.provenance["text_tokens"]
        cost = estimate(shape, res.recipe, accounting=accounting, text_tokens=text).flops_reduction
        same = cost == res.predicted_reduction
        notes.append(f"accounting {accounting}: predicted {res.predicted_reduction:.6f}, `edge-prune cost` {cost:.6f} "
                     f"-> {'equal' if same else 'DIFFERENT'}")
        save_recipe(res.recipe, ROOT / "recipes", f"fitprune-60-{accounting}")

    text = fit60.recipe.provenance["text_tokens"]
    same_flops = [SweepEntry("unpruned", None), SweepEntry("fitprune-60", fit60.recipe, f"alpha {fit60.alpha:.3f}")]
    save_recipe(fit60.recipe, ROOT / "recipes", "fitprune-60")
    for method in ("random", "pool", "fastv"):
        for k in (2, 1):
            try:
                recipe = baseline_recipe(shape, method, 0.6, k=k, text_tokens=text)
            except RecipeError:
                continue
            save_recipe(recipe, ROOT / "recipes", f"{method}-60")
            same_flops.append(SweepEntry(f"{method}-60", recipe, f"K={k}" if method != "pool" else ""))
            break
    # FitPrune's search with no drop after layer 0, whose attention is positional on this model
    first1 = FitPruneFitter(engine, calib, 0.6, batch_size=16, progress=False, first_layer=1).fit()
    save_recipe(first1.recipe, ROOT / "recipes", "fitprune-60-first1")
    same_flops.append(SweepEntry("fitprune-60-first1", first1.recipe, f"alpha {first1.alpha:.3f}, --first-layer 1"))

    # What the 60% schedule's drops do (ranking, regions, merging), chosen on the calibration split
    # (never on test).
    candidates, settings = [], {}
    for merge in MERGE:
        for ranking in RANKINGS:
            for regions in REGIONS:
                res = fit(engine, calib, 0.6, ranking=ranking, regions=regions, merge=merge)
                name = variant_name(0.6, ranking, regions, merge)
                settings[name] = (ranking, regions, merge)
                candidates.append(SweepEntry(name, res.recipe, variant_flags(ranking, regions, merge)))
    selection = run_sweep(args.model, candidates, n=args.n_select, engine=engine, split="calib")

    def best_where(keep) -> dict:
        return max((r for r in selection if keep(*settings[r["name"]])), key=lambda r: r["accuracy"])

    best = best_where(lambda rk, rg, mg: True)
    best_fitprune = best_where(lambda rk, rg, mg: rk == "fitprune")
    best_discard = best_where(lambda rk, rg, mg: not mg)
    best_ranking, best_regions, best_merge = settings[best["name"]]
    notes.append(f"drop variant chosen on the calibration split (n={args.n_select} per candidate): {best['name']} "
                 f"({best['accuracy']:.2%}); the best with FitPrune's own score: {best_fitprune['name']} "
                 f"({best_fitprune['accuracy']:.2%}); the best that discards: {best_discard['name']} "
                 f"({best_discard['accuracy']:.2%})")
    shown = {best["name"], best_fitprune["name"], best_discard["name"], variant_name(0.6, "random", 1)}
    for entry in candidates:
        save_recipe(entry.recipe, ROOT / "recipes", entry.name)
        if entry.name in shown:
            same_flops.append(entry)
    rows60 = run_sweep(args.model, same_flops, n=args.n, engine=engine)

    curve_entries = []
    for target in CURVE:
        name = f"fitprune-{round(target * 100)}"
        try:
            res = fit60 if target == 0.6 else fit(engine, calib, target)
        except RecipeError as exc:  # e.g. 90% when the vision tower alone is more than 10% of prefill
            notes.append(f"{name}: {exc}")
            print(f"== {name}: {exc}", flush=True)
            continue
        save_recipe(res.recipe, ROOT / "recipes", name)
        curve_entries.append(SweepEntry(name, res.recipe, f"alpha {res.alpha:.3f}"))
        if (best_ranking, best_regions, best_merge) != ("fitprune", 1, False):
            chosen = fit(engine, calib, target, ranking=best_ranking, regions=best_regions, merge=best_merge)
            name = variant_name(target, best_ranking, best_regions, best_merge)
            save_recipe(chosen.recipe, ROOT / "recipes", name)
            curve_entries.append(SweepEntry(name, chosen.recipe, f"alpha {chosen.alpha:.3f}"))
    curve = run_sweep(args.model, curve_entries, n=args.n_curve, engine=engine)
    seen = run_sweep(args.model, image_seen_by(shape), n=args.n_curve, engine=engine)

    base = rows60[0]
    notes.append(f"at 60%: FitPrune {rows60[1]['accuracy']:.2%} vs unpruned {base['accuracy']:.2%} "
                 f"(drop {(base['accuracy'] - rows60[1]['accuracy']) * 100:.2f} points); "
                 + ", ".join(f"{r['name']} {r['accuracy']:.2%}" for r in rows60[2:]))
    header = ("# FitPrune on the benchmark model\n\n"
              f"Test split; the 60% comparison uses n={args.n}, the curve n={args.n_curve} per point. "
              "FLOPs: exact accounting unless noted. Command: `.venv/bin/python benchmarks/fitprune_curve.py`. "
              f"Wall time {time.time() - start:.0f} s.\n\n" + "\n".join(f"- {n}" for n in notes)
              + "\n\n## Same FLOPs (60%)\n")
    write_results(rows60, ROOT / "results" / "fitprune.md", header, reference="unpruned")
    md = ROOT / "results" / "fitprune.md"
    from edge_prune.bench.sweep import markdown_table

    md.write_text(md.read_text() + "\n## Curve\n\n" + markdown_table([base, *curve], reference="unpruned")
                  + "\n![accuracy vs FLOPs](fitprune.png)\n"
                  + f"\n## What the 60% schedule's drops do (calibration split, n={args.n_select})\n\n"
                  + markdown_table(selection)
                  + "\n## How many layers must see the image (test split)\n\n"
                  + "Every visual token is dropped after layer K-1, so only the first K layers' attention sees "
                  "the image. No schedule that drops tokens a later layer still reads can keep full accuracy.\n\n"
                  + markdown_table([base, *seen], reference="unpruned"))
    (ROOT / "results" / "fitprune.json").write_text(json.dumps(
        {"same_flops": rows60, "curve": curve, "ranking_selection": selection, "image_seen_by": seen, "notes": notes},
        indent=2))
    plot(base, curve, rows60[2:], ROOT / "results" / "fitprune.png")
    print(md.read_text())
    return 0


def plot(base, curve, baselines, path: Path) -> None:
    baseline_rows = []
    table = ROOT / "results" / "baselines.json"
    if table.is_file():
        baseline_rows = [r for r in json.loads(table.read_text()) if "-" in r["name"] and r["name"] != "mean-visual"]
    variants: dict[str, list] = {}  # "fitprune-60-random-r8" -> "random-r8"
    for r in curve:
        variants.setdefault(r["name"].split("-", 2)[2] if r["name"].count("-") > 1 else "", []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], None, "overall"), (axes[1], "position", "position family")):
        get = (lambda r: r["accuracy"]) if key is None else (lambda r: r["per_family"][key])
        for variant, pts in variants.items():
            label = f"FitPrune schedule, {variant} (chosen ranking)" if variant else "FitPrune"
            ax.plot([r["flops_reduction"] * 100 for r in pts], [get(r) * 100 for r in pts], "o-", label=label)
        for method, marker in (("random", "x"), ("pool", "s"), ("fastv", "^")):
            pts = [r for r in baseline_rows if r["name"].startswith(method + "-")]
            pts += [r for r in baselines if r["name"].startswith(method + "-")]
            pts.sort(key=lambda r: r["flops_reduction"])
            if pts:
                ax.plot([r["flops_reduction"] * 100 for r in pts], [get(r) * 100 for r in pts], marker + "--",
                        label=method, alpha=0.8)
        for r in baselines:
            if r["name"] == "fitprune-60-first1":
                ax.plot([r["flops_reduction"] * 100], [get(r) * 100], "*", markersize=11, label="FitPrune, --first-layer 1")
        ax.axhline(get(base) * 100, color="grey", linestyle=":", label="unpruned")
        ax.set(xlabel="prefill FLOPs reduction (%, exact)", ylabel="accuracy (%)", title=title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
