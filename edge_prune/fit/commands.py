"""`edge-prune fit --method lvpruning|dyvte`: train guides or an exit router and write a recipe folder.

The folder holds recipe.json and the module files it names (guides.safetensors, router.safetensors,
and a base recipe's guides when a router sits on top of them). Re-running the same command
resumes from the checkpoint a previous, interrupted run left in OUT/.edge-prune-train/.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from edge_prune.errors import InputError
from edge_prune.fit.training import CHECKPOINT_DIR, choose_device

LEARNED_METHODS = ("lvpruning", "dyvte")


def output_paths(output: str) -> tuple[Path, Path]:
    """(folder, recipe.json path): `-o out/` writes out/recipe.json; `-o out/name.json` names the recipe."""
    path = Path(output)
    if path.suffix == ".json":
        return path.parent, path
    return path, path / "recipe.json"


def fit_learned(args: argparse.Namespace) -> int:
    """Body of `edge-prune fit` for the learned methods; returns the exit code."""
    from edge_prune.engine import PrunedEngine
    from edge_prune.fit.calibration import load_calibration
    from edge_prune.fit.distributed import Dist
    from edge_prune.recipe import Recipe

    device = choose_device(args.device or "auto")
    dist = Dist.from_env(device)
    folder, recipe_path = output_paths(args.output)
    summary: dict[str, Any]
    try:
        if args.method == "lvpruning":
            from edge_prune.fit.guides import GUIDES_FILE, GuideConfig, GuideFitter, parse_schedule

            if not args.schedule:
                raise InputError("--method lvpruning needs --schedule KEEP@LAYER,... (e.g. 0.5@4,0.3@8,0.1@16)")
            if args.base_recipe:
                raise InputError("--base-recipe applies to --method dyvte only")
            engine = PrunedEngine.load(args.model, device=device)
            schedule = parse_schedule(args.schedule, engine.adapter.num_layers)
            calibration = load_calibration(args.calib, args.n, warn=dist.rank == 0)
            config = GuideConfig(schedule=schedule, rank=args.rank, steps=args.steps, batch_size=args.batch_size,
                                 micro_batch=min(args.micro_batch, args.batch_size), lr=args.lr or 3e-3,
                                 seed=args.seed, attention_distill=args.attention_distill,
                                 regions=args.regions, merge=args.merge)
            fitter = GuideFitter(engine, calibration, config, dist=dist, progress=not args.json, work_dir=folder)
            result = fitter.fit()
            p = result.recipe.provenance
            summary = {"recipe": str(recipe_path), "method": "lvpruning", "schedule": p["schedule"],
                       "rank": fitter.rank, "guide_parameters": p["guide_parameters"],
                       "decoder_parameters": p["decoder_parameters"],
                       "predicted_flops_reduction": p["predicted_flops_reduction"],
                       "loss_first10": p["training"]["loss_first10"], "loss_last10": p["training"]["loss_last10"],
                       "seconds": result.seconds, "world_size": dist.world_size}
            if dist.rank == 0:
                result.guides.save(folder / GUIDES_FILE, engine.adapter.num_layers)
                result.recipe.save(recipe_path)
        else:
            from edge_prune.fit.routers import RouterConfig, RouterFitter

            if args.schedule:
                raise InputError("--schedule applies to --method lvpruning; give dyvte a --base-recipe instead")
            if args.regions != 1 or args.merge:
                raise InputError("--regions/--merge shape a schedule's drops; dyvte keeps its --base-recipe's "
                                 "(fit that recipe with them)")
            base = Recipe.load(args.base_recipe) if args.base_recipe else None
            engine = PrunedEngine.load(args.model, recipe=base, device=device)
            calibration = load_calibration(args.calib, args.n, warn=dist.rank == 0)
            layers = [int(x) for x in args.exit_layers.split(",")] if args.exit_layers else None
            config = RouterConfig(layers=layers, rank=args.rank, max_risk=args.max_risk, lr=args.lr or 1e-2,
                                  seed=args.seed, micro_batch=args.batch_size, loss_slack=args.loss_slack,
                                  labels=args.exit_labels, lookahead=args.lookahead,
                                  frozen=args.frozen_exit)
            fitter = RouterFitter(engine, calibration, config, dist=dist, progress=not args.json, work_dir=folder)
            result = fitter.fit()
            p = result.recipe.provenance
            summary = {"recipe": str(recipe_path), "method": p["method"], "exit_layers": fitter.layers,
                       "rank": fitter.rank, "router_parameters": p["router_parameters"],
                       "decoder_parameters": p["decoder_parameters"], "threshold": result.threshold,
                       "heldout_risk": result.heldout_risk, "exit_rates": result.heldout_exit_rates,
                       "predicted_flops_reduction": p["predicted_flops_reduction"], "seconds": result.seconds,
                       "world_size": dist.world_size}
            if dist.rank == 0:
                fitter.save(result, recipe_path)
        if dist.rank == 0:
            shutil.rmtree(folder / CHECKPOINT_DIR, ignore_errors=True)
            if args.json:
                print(json.dumps(summary, indent=2, default=str))
            else:
                print(_describe(summary))
    finally:
        dist.close()
    return 0


def _describe(s: dict[str, Any]) -> str:
    share = lambda n: f"{n} parameters, {n / s['decoder_parameters']:.2%} of the decoder"  # noqa: E731
    if s["method"] == "lvpruning":
        return (f"wrote {s['recipe']}: guides for {s['schedule']} at rank {s['rank']} ({share(s['guide_parameters'])}); "
                f"training loss {s['loss_first10']:.4f} -> {s['loss_last10']:.4f}; predicted prefill "
                f"reduction {s['predicted_flops_reduction']:.1%} (exact); {s['seconds']:.0f} s")
    rates = ", ".join(f"{layer}:{r:.0%}" for layer, r in zip(s["exit_layers"], s["exit_rates"]) if r > 0) or "none"
    return (f"wrote {s['recipe']}: exit router on layers {s['exit_layers']} at rank {s['rank']} "
            f"({share(s['router_parameters'])}); threshold {s['threshold']:.4f}, held-out risk "
            f"{s['heldout_risk']:.1%}, held-out exits {rates}; expected prefill reduction "
            f"{s['predicted_flops_reduction']:.1%} (exact); {s['seconds']:.0f} s")
