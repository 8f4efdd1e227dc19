"""The `edge-prune` command line. Each subcommand is a thin layer over a library function.

Bad input raises an EdgePruneError; main() prints it as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from edge_prune.errors import EdgePruneError, InputError

Handler = Callable[[argparse.Namespace], int]


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# ---- inspect ------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    from edge_prune.cost import parameter_count
    from edge_prune.models.shapes import load_shape

    if (Path(args.path) / "manifest.json").is_file():  # a converted artifact
        from edge_prune.converters.artifact import describe

        info, lines = describe(args.path)
        if args.json:
            _print_json(info)
        else:
            print("\n".join(lines))
        return 0
    shape = load_shape(args.path)
    sig = shape.signature()
    info = {
        "path": str(args.path),
        "architecture": shape.architecture,
        "decoder": shape.text_model_type,
        "signature": sig.__dict__,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size,
        "vision": {
            "image_size": shape.vision.image_size,
            "patch_size": shape.vision.patch_size,
            "layers": shape.vision.num_layers,
            "hidden_size": shape.vision.hidden_size,
        },
        "parameters": {
            "language_model": parameter_count(shape, "language_model"),
            "vision_and_projector": parameter_count(shape, "vision"),
            "total": parameter_count(shape),
        },
    }
    if args.json:
        _print_json(info)
        return 0
    print(f"{info['path']}: {shape.architecture} with a {shape.text_model_type} decoder")
    print(f"  decoder: {sig.num_layers} layers, hidden {sig.hidden_size}, MLP {sig.intermediate_size}, "
          f"{sig.num_attention_heads} heads ({sig.num_key_value_heads} KV), vocab {shape.vocab_size}")
    v = info["vision"]
    print(f"  vision:  {v['layers']} layers, hidden {v['hidden_size']}, {v['image_size']} px / patch "
          f"{v['patch_size']} -> {sig.num_visual_tokens} visual tokens per base image")
    p = info["parameters"]
    print(f"  params:  {p['total'] / 1e6:.2f} M ({p['language_model'] / 1e6:.2f} M language model)")
    return 0


# ---- cost ---------------------------------------------------------------------------------
def cmd_cost(args: argparse.Namespace) -> int:
    from edge_prune.cost import estimate, format_report
    from edge_prune.models.shapes import load_shape
    from edge_prune.recipe import Recipe

    shape = load_shape(args.path)
    recipe = Recipe.load(args.recipe) if args.recipe else Recipe.identity(shape.signature())
    if args.text_tokens < 0:
        raise InputError(f"--text-tokens is {args.text_tokens}; expected 0 or more")
    report = estimate(shape, recipe, accounting=args.accounting, text_tokens=args.text_tokens,
                      kv_dtype=args.kv_dtype)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(format_report(report))
    return 0


# ---- run ----------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    image = None if args.image is None else Path(args.image)
    if (Path(args.model) / "manifest.json").is_file():  # a converted artifact: its runtime, its recipe
        from edge_prune.runtimes import load

        if args.recipe or args.sample:
            raise InputError("an artifact carries its recipe and decodes greedily; drop --recipe/--sample, or "
                             "re-run `edge-prune convert` with another recipe")
        result = load(args.model, threads=args.threads).generate(image, args.prompt,
                                                                   max_new_tokens=args.max_new_tokens)
    else:
        import torch

        from edge_prune.engine import PrunedEngine
        from edge_prune.runtimes import check_threads

        if args.threads is not None:
            torch.set_num_threads(check_threads(args.threads))
        engine = PrunedEngine.load(args.model, recipe=args.recipe, device=args.device)
        result = engine.generate(args.prompt, image, max_new_tokens=args.max_new_tokens,
                                 do_sample=args.sample, temperature=args.temperature, seed=args.seed)
    kept = result.kept[0]
    if args.json:
        _print_json({"text": result.text, "tokens": result.tokens[0], "kept": kept.__dict__,
                     "timings": result.timings.__dict__})
        return 0
    print(result.text)
    t = result.timings
    print(f"[visual tokens {kept.visual_tokens} -> {kept.per_layer[-1] if kept.per_layer else 0} "
          f"after the last layer; vision {t.vision_ms:.1f} ms, prefill {t.prefill_ms:.1f} ms, "
          f"TTFT {t.ttft_ms:.1f} ms, decode {t.decode_tok_s:.1f} tok/s]", file=sys.stderr)
    return 0


# ---- convert ------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        from edge_prune.converters.gguf import convert_gguf

        convert_gguf(args.model, args.output, recipe=args.recipe, quant=args.quant or "f16",
                     overwrite=args.overwrite, progress=not args.json)
    else:
        from edge_prune.converters.executorch import ConvertOptions, convert

        options = ConvertOptions(backend=args.backend, quant=args.quant or "none", overwrite=args.overwrite,
                                 progress=not args.json, max_prompt_tokens=args.max_prompt_tokens,
                                 max_new_tokens=args.max_new_tokens_cap, group_size=args.group_size,
                                 segment_boundaries=args.segments, qnn_soc=args.qnn_soc)
        convert(args.model, args.recipe, args.output, options)
    from edge_prune.runtimes import read_manifest

    manifest = read_manifest(args.output)
    if args.json:
        _print_json(manifest.to_dict())
    else:
        print(f"{args.output}: {manifest.backend} artifact, quant {manifest.quant}, files {', '.join(manifest.files)}")
    return 0


# ---- baseline -----------------------------------------------------------------------------
def cmd_baseline(args: argparse.Namespace) -> int:
    from edge_prune.fit.baselines import baseline_recipe
    from edge_prune.models.shapes import load_shape

    shape = load_shape(args.path)
    recipe = baseline_recipe(shape, args.method, args.flops_reduction, k=args.k, accounting=args.accounting,
                             text_tokens=args.text_tokens, seed=args.seed)
    recipe.save(args.output)
    p = recipe.provenance
    print(f"wrote {args.output}: {args.method} keeps {p['visual_tokens_kept']} of {shape.num_visual_tokens} "
          f"visual tokens, predicted reduction {p['predicted_flops_reduction']:.1%} ({args.accounting})")
    return 0


# ---- fit ----------------------------------------------------------------------------------
def cmd_fit(args: argparse.Namespace) -> int:
    from edge_prune.engine import PrunedEngine
    from edge_prune.fit.calibration import load_calibration
    from edge_prune.fit.distributed import Dist
    from edge_prune.fit.fitprune import FitPruneFitter, parse_preview_layers
    from edge_prune.predict import QUANT_FORMATS
    from edge_prune.recipe import Recipe

    if args.quant not in QUANT_FORMATS:
        raise InputError(f"unknown --quant {args.quant!r}; expected one of {', '.join(QUANT_FORMATS)}")
    for option, given in (("--lookahead", args.lookahead), ("--frozen-exit", args.frozen_exit)):
        if given and args.method != "dyvte":
            raise InputError(f"{option} is an exit-router option; use it with --method dyvte")
    if args.preview_layers and args.method != "fitprune":
        raise InputError("--preview-layers adds to FitPrune's ranking; use it with --method fitprune")
    if args.method in ("lvpruning", "dyvte"):
        from edge_prune.fit.commands import fit_learned

        return fit_learned(args)
    if (args.flops_reduction is None) == (args.profile is None):
        raise InputError("--method fitprune needs exactly one budget: --flops-reduction (e.g. 0.6 for 60% fewer "
                         "prefill FLOPs) or --profile NAME with --ttft-ms and/or --peak-rss-mb")
    if args.profile is None and (args.ttft_ms is not None or args.peak_rss_mb is not None):
        raise InputError("--ttft-ms/--peak-rss-mb are device budgets: name the device with --profile")
    args.device = args.device or "cpu"
    dist = Dist.from_env(args.device)
    try:
        engine = PrunedEngine.load(args.model, device=args.device)
        calibration = load_calibration(args.calib, args.n, warn=dist.rank == 0)
        fitter = FitPruneFitter(engine, calibration, args.flops_reduction, accounting=args.accounting,
                                batch_size=args.batch_size, dist=dist, progress=not args.json,
                                first_layer=args.first_layer, regions=args.regions, ranking=args.ranking,
                                merge=args.merge,
                                preview_layers=parse_preview_layers(args.preview_layers, engine.adapter.num_layers))
        device_budget = None
        if args.profile is not None:
            from edge_prune.predict import device_target

            if args.accounting != "exact":
                raise InputError("a device budget is met under exact FLOPs accounting; drop --accounting")
            needed, device_budget = device_target(engine.adapter.shape, args.profile, args.ttft_ms, args.peak_rss_mb,
                                                  quant=args.quant, text_tokens=fitter.text_tokens)
            if needed <= 0.0:
                if dist.rank == 0:
                    recipe = Recipe.identity(engine.adapter.signature(), method="fitprune", device_budget=device_budget)
                    recipe.save(args.output)
                    print(f"wrote {args.output}: {args.profile} meets the budget unpruned "
                          f"(predicted TTFT {device_budget['unpruned_prediction']['ttft_ms']:.0f} ms); keeps every token")
                return 0
            fitter.retarget(needed)
        result = fitter.fit()
        if device_budget is not None:
            result.recipe.provenance["device_budget"] = device_budget
        if dist.rank == 0:
            result.recipe.save(args.output)
            summary = {"recipe": str(args.output), "alpha": result.alpha,
                       "predicted_flops_reduction": result.predicted_reduction, "accounting": args.accounting,
                       "keep_after": result.recipe.prune.keep_after, "seconds": result.seconds,
                       "calibration_samples": len(calibration.samples), "skipped_records": calibration.skipped,
                       "world_size": dist.world_size}
            if args.json:
                _print_json(summary)
            else:
                counts = result.recipe.keep_counts(engine.adapter.signature().num_visual_tokens)
                print(f"wrote {args.output}: alpha {result.alpha:.4f}, predicted reduction "
                      f"{result.predicted_reduction:.1%} ({args.accounting}), visual tokens after each layer "
                      f"{counts}, {result.seconds:.1f} s")
    finally:
        dist.close()
    return 0


# ---- eval ---------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from edge_prune.bench.evaluate import check_request, evaluate, format_result

    check_request(args.split, args.n, args.family)
    result = evaluate(args.model, recipe=args.recipe, split=args.split, n=args.n, families=args.family,
                      batch_size=args.batch_size, ablate_visual=args.ablate_visual, progress=not args.json)
    if args.json:
        _print_json(result.to_dict())
    else:
        print(format_result(result))
    return 0


# ---- profile ------------------------------------------------------------------------------
def cmd_profile(args: argparse.Namespace) -> int:
    from edge_prune.profile_job import format_result, run_profile

    budgets = {"ttft_ms": args.ttft_ms, "decode_tok_s": args.decode_tok_s, "peak_rss_mb": args.peak_rss_mb}
    result = run_profile(args.target, args.profile, recipe_path=args.recipe, config=args.config, runs=args.runs,
                         warmup=args.warmup, quant=args.quant, text_tokens=args.text_tokens, report=args.report,
                         eval_results=args.eval, image=args.image, prompt=args.prompt,
                         budgets={k: v for k, v in budgets.items() if v is not None}, progress=not args.json,
                         threads=args.threads)
    if args.json:
        _print_json(result.to_dict())
    else:
        print(format_result(result))
    return result.verdict.exit_code


def cmd_profiles(args: argparse.Namespace) -> int:
    from edge_prune.devices import all_profiles

    profiles = all_profiles()
    if args.json:
        _print_json([{"name": p.name, "description": p.description, "kind": p.kind, "runtime": p.runtime,
                      "backend": p.backend, "budget": p.budget.__dict__} for p in profiles])
        return 0
    print(f"{'name':<22} {'kind':<4} {'runtime/backend':<22} {'TTFT ms':>8} {'tok/s':>6} {'RSS MB':>7}  description")
    for p in profiles:
        b = p.budget
        print(f"{p.name:<22} {p.kind:<4} {p.runtime + '/' + p.backend:<22} {b.ttft_ms:>8.0f} {b.decode_tok_s:>6.0f} "
              f"{b.peak_rss_mb:>7.0f}  {p.description}")
    return 0


# ---- bench --------------------------------------------------------------------------------
def cmd_bench_train(args: argparse.Namespace) -> int:
    from edge_prune.bench.train import main as train_main

    return int(train_main(args.rest) or 0)


THREADS_HELP = ("CPU threads for the artifact's runtime (ExecuTorch's threadpool, llama.cpp's n_threads) or the "
                "eager engine; default: the runtime's own choice")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-prune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="describe a LLaVA checkpoint (or its config.json), or a converted artifact")
    p.add_argument("path", help="checkpoint directory, config.json, or artifact directory (with manifest.json)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("cost", help="FLOPs, KV-cache and weight bytes of a recipe, from the config alone")
    p.add_argument("path", help="checkpoint directory or config.json")
    p.add_argument("--recipe", help="recipe.json (default: keep everything)")
    p.add_argument("--accounting", choices=("exact", "fastv", "fitprune"), default="exact")
    p.add_argument("--text-tokens", type=int, default=64, help="prompt text tokens besides the image")
    p.add_argument("--kv-dtype", default="fp16")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("run", help="answer one prompt about one image, optionally under a recipe")
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("--image", help="image file (omit for a text-only prompt)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--recipe")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("convert", help="bake a checkpoint + recipe into an on-device artifact (ExecuTorch or GGUF)")
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("--recipe", help="recipe.json (default: keep every token)")
    p.add_argument("--format", choices=("executorch", "gguf"), required=True)
    p.add_argument("--quant", choices=("none", "8da4w", "int8", "f16", "q8_0", "q4_0", "q4_k_m"),
                   help="executorch: none|8da4w|int8 (default none); gguf: f16|q8_0|q4_0|q4_k_m (default f16)")
    p.add_argument("--backend", default="xnnpack", help="executorch delegate: xnnpack|vulkan|coreml|qnn")
    p.add_argument("--max-prompt-tokens", type=int, default=256,
                   help="executorch: most text tokens in one prompt (the image's tokens come on top)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens_cap", type=int, default=128,
                   help="executorch: KV-cache room for generated tokens")
    p.add_argument("--group-size", type=int, default=32, help="executorch 8da4w: int4 weight group size")
    p.add_argument("--segments", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                   help="executorch: split the prefill before these decoder layers, e.g. 4 or 2,4,6")
    p.add_argument("--qnn-soc", default="SM8650", help="executorch qnn: target Snapdragon SoC")
    p.add_argument("-o", "--output", required=True, help="artifact directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("baseline", help="a baseline recipe (fastv, random, pool) at a FLOPs-reduction budget")
    p.add_argument("path", help="checkpoint directory or config.json")
    p.add_argument("--method", choices=("fastv", "random", "pool"), required=True)
    p.add_argument("--flops-reduction", type=float, required=True, help="e.g. 0.6 for 60%% fewer prefill FLOPs")
    p.add_argument("--k", type=int, default=2, help="FastV's K: tokens drop after layer K-1's attention")
    p.add_argument("--accounting", choices=("exact", "fastv", "fitprune"), default="exact")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="random scorer seed")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("fit", help="fit a pruning recipe: fitprune (training-free, FLOPs budget), lvpruning "
                                   "(language-guided guides), dyvte (exit router)")
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("--method", choices=("fitprune", "lvpruning", "dyvte"), default="fitprune")
    p.add_argument("--flops-reduction", type=float, help="fitprune: e.g. 0.6 for 60%% fewer prefill FLOPs")
    p.add_argument("--accounting", choices=("exact", "fastv", "fitprune"), default="exact")
    p.add_argument("--first-layer", type=int, default=0,
                   help="fitprune: first decoder layer after whose attention tokens may drop (1 = FastV's K=2); "
                        "0 = FitPrune as published")
    p.add_argument("--regions", type=int, default=1,
                   help="fitprune, lvpruning: rank tokens within R x R regions of the image, round robin, so "
                        "every region keeps its share (1 = one global ranking, as published)")
    p.add_argument("--ranking", choices=("fitprune", "random"), default="fitprune",
                   help="fitprune: how the schedule's drops rank tokens (FitPrune's attention score, or random)")
    p.add_argument("--merge", action="store_true",
                   help="fitprune, lvpruning: merge each dropped token into its most similar kept one "
                        "(proportional attention) instead of discarding it; lvpruning trains with it")
    p.add_argument("--preview-layers", default="",
                   help="fitprune: later layers whose attention from the last prompt token, previewed on the states "
                        "at each drop, joins FitPrune's ranking: 'last', 'all' or indices such as 4,5 (costs FLOPs, "
                        "which the search counts); empty = FitPrune's score alone")
    p.add_argument("--profile", help="fitprune: fit the smallest reduction that meets this device's budget "
                                     "(see `edge-prune profiles`), with --ttft-ms and/or --peak-rss-mb")
    p.add_argument("--ttft-ms", type=float, help="with --profile: time-to-first-token budget")
    p.add_argument("--peak-rss-mb", type=float, help="with --profile: peak memory budget")
    p.add_argument("--quant", default="fp16", help="with --profile: the artifact's weights (fp16, 8da4w, q4_0, ...)")
    p.add_argument("--calib", required=True,
                   help="JSONL of {image, prompt[, answer]} records, or 'bench:calib' / 'bench:train'")
    p.add_argument("--n", type=int, default=64, help="calibration samples")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch (lvpruning: per optimiser step)")
    p.add_argument("--device", default=None, help="cpu, cuda, or auto (default: cpu for fitprune, auto otherwise)")
    p.add_argument("-o", "--output", required=True,
                   help="fitprune: recipe.json path; lvpruning/dyvte: output folder (or a .json path in it)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--schedule", help="lvpruning: KEEP@LAYER,... e.g. 0.5@4,0.3@8,0.1@16")
    p.add_argument("--base-recipe", help="dyvte: recipe the router sits on (fitprune, guides); default none")
    p.add_argument("--rank", type=int, help="guide/router inner width (default: largest within budget)")
    p.add_argument("--steps", type=int, default=200, help="lvpruning: optimiser steps")
    p.add_argument("--micro-batch", type=int, default=4, help="lvpruning: samples per forward pass")
    p.add_argument("--attention-distill", type=float, default=0.0,
                   help="lvpruning: weight of an attention-distillation term next to the answer KL (default 0: KL only)")
    p.add_argument("--lr", type=float, help="learning rate (lvpruning 3e-3, dyvte 1e-2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exit-layers", help="dyvte: candidate layers, e.g. 1,3 (default: all but the last); in an "
                   "ExecuTorch artifact each one ends a prefill segment, which costs time (README)")
    p.add_argument("--max-risk", type=float, default=0.01,
                   help="dyvte: share of held-out requests allowed to exit where the label says no")
    p.add_argument("--loss-slack", type=float, default=0.0,
                   help="dyvte: nats an exit's answer loss may exceed 1.03 x the normal loss by and still be "
                        "labelled safe (0 = DyVTE's rule; the ratio of near-zero losses is noise)")
    p.add_argument("--exit-labels", choices=("dyvte", "agreement"), default="dyvte",
                   help="dyvte: an exit is safe when the answer agrees and the loss rule holds (DyVTE); "
                        "agreement: when the answer agrees")
    p.add_argument("--lookahead", action="store_true",
                   help="dyvte: the router also reads the answer an exit would give (the rest of the decoder run "
                        "text-only at each candidate; counted in the FLOPs where the request does not exit)")
    p.add_argument("--frozen-exit", action="store_true",
                   help="dyvte: an exiting request keeps its visual tokens as frozen keys and values (CALM-style; "
                        "later layers compute only their keys and values) instead of removing them (DyVTE)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("eval", help="accuracy per family, FLOPs and prefill time on the synthetic benchmark")
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("--recipe")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--family", action="append", help="restrict to a question family (repeatable)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ablate-visual", choices=("mean",), help="replace visual tokens by their mean")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("profile", help="measure or predict latency and memory against a device profile's budgets")
    p.add_argument("target", nargs="?", help="artifact directory, or checkpoint directory (eager engine)")
    p.add_argument("--profile", required=True, help="profile name (see `edge-prune profiles`) or a TOML file")
    p.add_argument("--config", help="predict only, from a config.json (e.g. a 7B checkpoint's)")
    p.add_argument("--recipe", help="recipe for a checkpoint target or a --config prediction")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quant", help="weight format for predictions (default: the artifact's, fp16 for --config)")
    p.add_argument("--text-tokens", type=int, help="prompt text tokens for predictions")
    p.add_argument("--image")
    p.add_argument("--prompt")
    p.add_argument("--ttft-ms", type=float, help="override the profile's TTFT budget")
    p.add_argument("--decode-tok-s", type=float, help="override the profile's decode-speed budget")
    p.add_argument("--peak-rss-mb", type=float, help="override the profile's memory budget")
    p.add_argument("--eval", action="append", help="`edge-prune eval --json` output(s) for the accuracy plot")
    p.add_argument("--report", help="write report.html (+ .json, .md beside it)")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("profiles", help="list the shipped device profiles")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profiles)

    p = sub.add_parser("bench", help="the synthetic VQA benchmark")
    bench = p.add_subparsers(dest="bench_command", required=True)
    b = bench.add_parser("train", help="train the benchmark model (options: edge-prune bench train --help)",
                         add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench_train)
    return parser


def _quiet_libraries() -> None:
    """transformers' per-load progress bars and hub warnings are noise in a CLI that never downloads."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging

    # torchao (pulled in by transformers' quantizer checks) warns about CUDA-only kernels on CPU machines.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["bench", "train"]:
        # the trainer parses its own options; argparse's REMAINDER drops a first one that starts with "-"
        return cmd_bench_train(argparse.Namespace(rest=argv[2:]))
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except EdgePruneError as exc:
        print(f"edge-prune: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
