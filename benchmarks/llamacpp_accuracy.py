"""llama.cpp acceptance figures on the benchmark model (issue 7), written to benchmarks/results/llamacpp.{json,md}.

1. fidelity: transformers' greedy answers vs stock llama.cpp (libmtmd's own chunk evaluation) and
   the edge-prune llama.cpp runtime, unpruned, per quant (f16, q8_0, q4_k_m);
2. transformers reading the language-model GGUF back (`gguf_file=`): logits vs the original;
3. input-level pruning (pool and random scorers) at 50/75/90% dropped: accuracy and TTFT speedup;
4. the cost of mapping mid-network FastV schedules to one input-level count (engine vs llama.cpp);
5. the decode-time exit: KV bytes and decode speed with the visual tokens removed after prefill.

    .venv/bin/python benchmarks/llamacpp_accuracy.py [--model benchmarks/models/toyvqa-llava] [--n 500]
    .venv/bin/python benchmarks/llamacpp_accuracy.py --stand-in --n 40   # untrained stand-in, smoke run
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from edge_prune.bench.generator import iter_items
from edge_prune.bench.tokenizer import prompt as chat_prompt
from edge_prune.converters.gguf import convert_gguf
from edge_prune.runtimes import llamacpp_keys as K
from edge_prune.runtimes import load

BENCH_MODEL = Path(__file__).parent / "models" / "toyvqa-llava"
RESULTS = Path(__file__).parent / "results"
QUANTS = ("f16", "q8_0", "q4_k_m")
# Input-level keep fractions: 50/75/90% of the visual tokens dropped.
KEEPS = {"pool": (0.5, 0.25, 0.1), "random": (0.5, 0.25, 0.1)}
MAX_NEW = 4
SECTIONS = ("fidelity", "pruning", "mapped", "exit")


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0] if words else ""


def stand_in(path: Path) -> Path:
    """An untrained checkpoint with the benchmark model's exact shape and tokenizer (smoke runs)."""
    from edge_prune.bench.train import TrainConfig, build_model, build_processor, save
    from edge_prune.bench.tokenizer import build_tokenizer

    if not (path / "config.json").is_file():
        tok = build_tokenizer()
        cfg = TrainConfig()
        torch.manual_seed(0)
        save(build_model(cfg, tok), build_processor(tok, cfg.patch_size), path, {"stand_in": True})
    return path


# ---- references ------------------------------------------------------------------------------
def transformers_answers(model_dir: Path, items: list, batch: int = 16) -> list[str]:
    """Greedy answers of transformers' own LlavaForConditionalGeneration.generate (the reference)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(model_dir)
    proc.tokenizer.padding_side = "left"
    out = []
    for i in tqdm(range(0, len(items), batch), desc="transformers", unit="batch"):
        chunk = items[i:i + batch]
        enc = proc(text=[chat_prompt(it.question) for it in chunk], images=[it.image for it in chunk],
                   return_tensors="pt", padding=True)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False,
                                 pad_token_id=proc.tokenizer.pad_token_id)
        out += [t.strip() for t in proc.tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:],
                                                                 skip_special_tokens=True)]
    return out


def engine_accuracy(model_dir: Path, recipe: Any, items: list) -> tuple[float, list[str]]:
    from edge_prune.engine import PrunedEngine

    engine = PrunedEngine.load(model_dir, recipe=recipe)
    answers = []
    for i in tqdm(range(0, len(items), 16), desc="engine", unit="batch"):
        chunk = items[i:i + 16]
        res = engine.generate([chat_prompt(it.question) for it in chunk], [it.image for it in chunk],
                              max_new_tokens=MAX_NEW)
        answers += res.texts
    return accuracy(answers, items), answers


def accuracy(answers: list[str], items: list) -> float:
    return sum(first_word(a) == it.answer for a, it in zip(answers, items)) / len(items)


def agreement(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


# ---- stock llama.cpp ---------------------------------------------------------------------------
def stock_answers(art: Path, items: list, threads: int) -> list[str]:
    """Stock llama.cpp's multimodal pipeline, no edge-prune code: libmtmd tokenizes the prompt with its
    media marker, mtmd_helper_eval_chunks encodes the image and decodes everything, we only argmax."""
    import llama_cpp
    from llama_cpp import mtmd_cpp

    from edge_prune.runtimes.llamacpp import _init_backend

    _init_backend(verbose=False)  # llama.cpp's and libmtmd's logs off
    mp = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(art / K.LM_FILE).encode(), mp)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 2048, 512, 512, threads, threads
    ctx = llama_cpp.llama_init_from_model(model, cp)
    vocab = llama_cpp.llama_model_get_vocab(model)
    mparams = mtmd_cpp.mtmd_context_params_default()
    mparams.use_gpu, mparams.n_threads, mparams.print_timings = False, threads, False
    mctx = mtmd_cpp.mtmd_init_from_file(str(art / K.MMPROJ_FILE).encode(), model, mparams)
    marker = mtmd_cpp.mtmd_default_marker().decode()
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    batch = llama_cpp.llama_batch_init(1, 0, 1)
    out = []
    for it in tqdm(items, desc="stock llama.cpp", unit="item", mininterval=15):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        text = chat_prompt(it.question).replace("<image>", marker).encode()
        rgb = np.ascontiguousarray(np.asarray(it.image.convert("RGB")), dtype=np.uint8)
        bmp = mtmd_cpp.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes()))
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        inp = mtmd_cpp.mtmd_input_text(text, len(text), True, True)
        assert mtmd_cpp.mtmd_tokenize(mctx, chunks, ctypes.byref(inp), (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bmp), 1) == 0
        n_past = llama_cpp.llama_pos(0)
        assert mtmd_cpp.mtmd_helper_eval_chunks(mctx, ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) == 0
        tokens = []
        for _ in range(MAX_NEW):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            tok = int(np.argmax(logits))
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                break
            tokens.append(tok)
            batch.n_tokens = 1
            batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.seq_id[0][0], batch.logits[0] = tok, n_past.value, 1, 0, 1
            n_past.value += 1
            assert llama_cpp.llama_decode(ctx, batch) == 0
        piece = b""
        buf = ctypes.create_string_buffer(64)
        for t in tokens:
            n = llama_cpp.llama_token_to_piece(vocab, t, buf, 64, 0, False)
            piece += buf.raw[:n]
        out.append(piece.decode("utf-8", errors="replace").strip())
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        mtmd_cpp.mtmd_bitmap_free(bmp)
    llama_cpp.llama_batch_free(batch)
    mtmd_cpp.mtmd_free(mctx)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return out


# ---- edge-prune llama.cpp runtime ----------------------------------------------------------------
def runtime_run(art: Path, items: list, threads: int, desc: str, **options: Any) -> dict[str, Any]:
    session = load(art, n_threads=threads, **options)
    answers, ttft, prefill, vision, kv, kept = [], [], [], [], [], []
    for it in tqdm(items, desc=desc, unit="item", mininterval=15):
        res = session.generate(it.image, chat_prompt(it.question), max_new_tokens=MAX_NEW)
        answers.append(res.text)
        ttft.append(res.timings.ttft_ms)
        prefill.append(res.timings.prefill_ms)
        vision.append(res.timings.vision_ms)
        kv.append(res.kv_cache_bytes)
        kept.append(res.kept[0].entered_decoder)
    session.close()
    return {"answers": answers, "ttft_ms": statistics.median(ttft), "prefill_ms": statistics.median(prefill),
            "vision_ms": statistics.median(vision), "kv_bytes": statistics.median(kv),
            "entered_decoder": statistics.fmean(kept), "peak_rss_mb": res.peak_rss_mb,
            "input_level": res.kept[0].input_level, "schedule": res.kept[0].schedule}


def decode_speed(art: Path, items: list, threads: int, exit_after_prefill: bool, close_gap: bool = True,
                 n_tokens: int = 32) -> dict[str, float]:
    """Decode tok/s over n_tokens (EOS ignored) and the KV bytes decoding attends, with or without the exit."""
    session = load(art, n_threads=threads, exit_after_prefill=exit_after_prefill, exit_close_gap=close_gap)
    speeds, kv = [], []
    for it in items:
        res = session.generate(it.image, chat_prompt(it.question), max_new_tokens=n_tokens, stop_at_eos=False)
        speeds.append(res.timings.decode_tok_s)
        kv.append(res.kv_cache_bytes)
    session.close()
    return {"decode_tok_s": statistics.median(speeds), "kv_bytes": statistics.median(kv)}


def gguf_readback(model_dir: Path, art: Path, items: list) -> dict[str, float]:
    """transformers reads the language-model GGUF (`gguf_file=`); compare logits on real prompts."""
    from transformers import AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration

    ref = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(art, gguf_file=K.LM_FILE, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(model_dir)
    rel, agree = [], []
    for it in items:
        ids = proc.tokenizer(chat_prompt(it.question).replace("<image>", "") + " " + it.answer,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            a = ref.model.language_model(input_ids=ids).last_hidden_state
            a = ref.lm_head(a)
            b = back(input_ids=ids).logits
        rel.append(float((a - b).abs().max() / a.abs().max()))
        agree.append(float((a.argmax(-1) == b.argmax(-1)).float().mean()))
    return {"max_rel_logit_diff": max(rel), "median_rel_logit_diff": statistics.median(rel),
            "argmax_agreement": statistics.fmean(agree)}


def side_by_side(model_dir: Path, work: Path, items: list, threads: int, base: dict[str, Any]) -> dict[str, Any]:
    """TTFT, same machine and run: llama.cpp unpruned vs edge-prune llama.cpp pruned vs edge-prune
    ExecuTorch pruned, one FastV recipe (-50% FLOPs), 8-bit weights on both (q8_0 / int8)."""
    from edge_prune.fit.baselines import baseline_recipe
    from edge_prune.models.shapes import load_shape

    recipe = baseline_recipe(load_shape(model_dir), "fastv", 0.5, k=2)
    out: dict[str, Any] = {"recipe": "fastv K=2 at -50% FLOPs", "items": len(items)}
    q8 = work / "sbs-q8_0"
    convert_gguf(model_dir, q8, recipe=recipe, quant="q8_0", overwrite=True, progress=False)
    out["llamacpp_unpruned_q8_0_ttft_ms"] = runtime_run(q8, items, threads, "sbs llama.cpp unpruned", keep=1.0)["ttft_ms"]
    out["llamacpp_pruned_q8_0_ttft_ms"] = runtime_run(q8, items, threads, "sbs llama.cpp pruned")["ttft_ms"]
    try:
        from edge_prune.converters.executorch import ConvertOptions, convert

        et = work / "sbs-executorch-int8"
        convert(model_dir, recipe, et, ConvertOptions(quant="int8", overwrite=True, progress=False))
        session = load(et)
        ttft = [session.generate(it.image, chat_prompt(it.question), max_new_tokens=1).timings.ttft_ms for it in items]
        out["executorch_pruned_int8_ttft_ms"] = statistics.median(ttft)
    except Exception as exc:  # the ExecuTorch path is another engineer's work in progress: record, do not fail
        out["executorch_error"] = f"{type(exc).__name__}: {exc}"
    return out


# ---- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=BENCH_MODEL)
    ap.add_argument("--stand-in", action="store_true", help="untrained checkpoint of the benchmark shape")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("out/llamacpp-bench"))
    ap.add_argument("--results", type=Path, default=RESULTS / "llamacpp")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--with-executorch", action="store_true", help="add the TTFT table against the ExecuTorch runtime")
    ap.add_argument("--timing-items", type=int, default=30, help="items timed for the side-by-side table")
    args = ap.parse_args(argv)
    sections = [x for x in args.sections.split(",") if x]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    model_dir = stand_in(args.work / "stand-in") if args.stand_in else args.model
    if not (model_dir / "config.json").is_file():
        print(f"no checkpoint at {model_dir}; train it (edge-prune bench train) or pass --stand-in", file=sys.stderr)
        return 2
    items = list(iter_items("test", args.n))
    report: dict[str, Any] = {"model": str(model_dir), "n": len(items), "threads": args.threads,
                              "stand_in": args.stand_in, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    training = model_dir / "training_run.json"
    if training.is_file():
        run = json.loads(training.read_text())
        report["checkpoint"] = {"step": run.get("step"), "complete": run.get("complete")}

    def save() -> None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        args.results.with_suffix(".md").write_text(render(report))

    arts = {}
    for q in QUANTS:
        arts[q] = args.work / q
        convert_gguf(model_dir, arts[q], quant=q, overwrite=True, progress=False)
    report["artifact_mb"] = {q: round(sum(f.stat().st_size for f in a.iterdir()) / 2**20, 2) for q, a in arts.items()}

    hf = transformers_answers(model_dir, items)
    report["transformers_accuracy"] = accuracy(hf, items)
    base = runtime_run(arts["f16"], items, args.threads, "runtime f16")
    report["base"] = {k: base[k] for k in ("ttft_ms", "prefill_ms", "vision_ms", "kv_bytes")}

    if "fidelity" in sections:
        stock = stock_answers(arts["f16"], items, args.threads)
        fidelity: dict[str, Any] = {"stock_f16": {"agreement_with_transformers": agreement(stock, hf),
                                                  "accuracy": accuracy(stock, items)}}
        for q in QUANTS:
            run_q = base if q == "f16" else runtime_run(arts[q], items, args.threads, f"runtime {q}")
            fidelity[q] = {"agreement_with_transformers": agreement(run_q["answers"], hf),
                           "agreement_with_stock": agreement(run_q["answers"], stock),
                           "accuracy": accuracy(run_q["answers"], items), "ttft_ms": run_q["ttft_ms"]}
        report["fidelity"] = fidelity
        report["gguf_readback"] = {q: gguf_readback(model_dir, arts[q], items[:40]) for q in ("f16", "q8_0")}
        save()

    if "pruning" in sections:
        rows = []
        for scorer, keeps in KEEPS.items():
            for keep in keeps:
                r = runtime_run(arts["f16"], items, args.threads, f"keep {keep} {scorer}", keep=keep,
                                input_scorer=scorer)
                rows.append({"scorer": scorer, "keep": keep, "entered_decoder": r["entered_decoder"],
                             "accuracy": accuracy(r["answers"], items), "ttft_ms": r["ttft_ms"],
                             "prefill_ms": r["prefill_ms"], "ttft_speedup": base["ttft_ms"] / r["ttft_ms"],
                             "prefill_speedup": base["prefill_ms"] / r["prefill_ms"], "kv_bytes": r["kv_bytes"]})
                report["pruning"] = rows
                save()

    if "mapped" in sections:
        from edge_prune.fit.baselines import baseline_recipe
        from edge_prune.models.shapes import load_shape

        shape = load_shape(model_dir)
        report["mapped_schedules"] = []
        # FastV with K=2 reaches at most ~60% on a 6-layer decoder: stay inside that
        for fr in (0.4, 0.6):
            recipe = baseline_recipe(shape, "fastv", fr, k=2)
            eng_acc, _ = engine_accuracy(model_dir, recipe, items)
            art = args.work / f"fastv-{fr}"
            convert_gguf(model_dir, art, recipe=recipe, quant="f16", overwrite=True, progress=False)
            r = runtime_run(art, items, args.threads, f"mapped fastv {fr}")
            report["mapped_schedules"].append({
                "recipe": f"fastv K=2 at -{int(fr * 100)}% FLOPs", "engine_accuracy": eng_acc,
                "llamacpp_accuracy": accuracy(r["answers"], items), "input_count": r["entered_decoder"],
                "schedule": r["schedule"], "ttft_speedup": base["ttft_ms"] / r["ttft_ms"]})
            save()

    if "exit" in sections:
        sub = items[: min(40, len(items))]
        full = decode_speed(arts["f16"], sub, args.threads, exit_after_prefill=False)
        report["exit"] = {"full": full, "rows": []}
        for close_gap in (True, False):
            r = runtime_run(arts["f16"], items, args.threads, f"exit close_gap={close_gap}",
                            exit_after_prefill=True, exit_close_gap=close_gap)
            d = decode_speed(arts["f16"], sub, args.threads, exit_after_prefill=True, close_gap=close_gap)
            report["exit"]["rows"].append({
                "close_gap": close_gap, "accuracy": accuracy(r["answers"], items),
                "agreement_with_unpruned": agreement(r["answers"], base["answers"]),
                "kv_bytes": d["kv_bytes"], "kv_saving": 1 - d["kv_bytes"] / full["kv_bytes"],
                "decode_tok_s": d["decode_tok_s"], "decode_speedup": d["decode_tok_s"] / full["decode_tok_s"]})
            save()

    if args.with_executorch:
        report["side_by_side"] = side_by_side(model_dir, args.work, items[:args.timing_items], args.threads, base)
    save()
    print(render(report))
    return 0


def render(r: dict[str, Any]) -> str:
    ck = r.get("checkpoint") or {}
    state = "" if not ck else f" (training step {ck.get('step')}, {'complete' if ck.get('complete') else 'INCOMPLETE'})"
    lines = [
        "# llama.cpp: fidelity, quantization, input-level pruning, exit (issue 7)", "",
        f"Model `{r['model']}`{' (untrained stand-in)' if r['stand_in'] else ''}{state}; {r['n']} test items; "
        f"{r['threads']} CPU threads; greedy, {MAX_NEW} new tokens; created {r['created']}. Generated by "
        "`benchmarks/llamacpp_accuracy.py`.", "",
        f"transformers accuracy: {r['transformers_accuracy']:.3f}; llama.cpp unpruned f16 TTFT "
        f"{r['base']['ttft_ms']:.1f} ms (vision {r['base']['vision_ms']:.1f} ms, prefill {r['base']['prefill_ms']:.1f} ms).",
    ]
    f = r.get("fidelity")
    if f:
        lines += ["", "| path | quant | same answer as transformers | accuracy | TTFT ms (median) | artifact MB |",
                  "|---|---|---|---|---|---|",
                  f"| stock llama.cpp (libmtmd tokenize + helper_eval_chunks) | f16 | "
                  f"{f['stock_f16']['agreement_with_transformers']:.3f} | {f['stock_f16']['accuracy']:.3f} | | "
                  f"{r['artifact_mb']['f16']} |"]
        for q in QUANTS:
            lines.append(f"| edge-prune runtime, unpruned | {q} | {f[q]['agreement_with_transformers']:.3f} | "
                         f"{f[q]['accuracy']:.3f} | {f[q]['ttft_ms']:.1f} | {r['artifact_mb'][q]} |")
        lines += ["", "transformers reading the language-model GGUF back (`gguf_file=`), text-only logits on 40 prompts:",
                  "", "| quant | max rel. logit diff | median | argmax agreement |", "|---|---|---|---|"]
        for q, g in r["gguf_readback"].items():
            lines.append(f"| {q} | {g['max_rel_logit_diff']:.4f} | {g['median_rel_logit_diff']:.4f} | "
                         f"{g['argmax_agreement']:.4f} |")
    if r.get("pruning"):
        lines += ["", "Input-level pruning (f16):", "",
                  "| scorer | keep | dropped | visual tokens in | accuracy | TTFT ms | TTFT speedup | prefill speedup |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in r["pruning"]:
            lines.append(f"| {row['scorer']} | {row['keep']:.2f} | {1 - row['keep']:.0%} | {row['entered_decoder']:.0f} | "
                         f"{row['accuracy']:.3f} | {row['ttft_ms']:.1f} | {row['ttft_speedup']:.2f}x | "
                         f"{row['prefill_speedup']:.2f}x |")
    if r.get("mapped_schedules"):
        lines += ["", "Mid-network schedules mapped to one input-level count (KV-equal; pooled):", "",
                  "| recipe | engine accuracy (exact schedule) | llama.cpp accuracy (mapped) | input count | TTFT speedup |",
                  "|---|---|---|---|---|"]
        for row in r["mapped_schedules"]:
            lines.append(f"| {row['recipe']} | {row['engine_accuracy']:.3f} | {row['llamacpp_accuracy']:.3f} | "
                         f"{row['input_count']:.0f} | {row['ttft_speedup']:.2f}x |")
    e = r.get("exit")
    if e and e["rows"]:
        lines += ["", f"Decode-time exit (visual tokens removed from the KV cache after prefill; decode over 32 tokens, "
                  f"40 items; without exit: {e['full']['decode_tok_s']:.1f} tok/s, KV {e['full']['kv_bytes'] / 2**10:.0f} KiB):",
                  "", "| close position gap | accuracy | same answer as unpruned | KV KiB | KV saving | decode tok/s | speedup |",
                  "|---|---|---|---|---|---|---|"]
        for row in e["rows"]:
            lines.append(f"| {row['close_gap']} | {row['accuracy']:.3f} | {row['agreement_with_unpruned']:.3f} | "
                         f"{row['kv_bytes'] / 2**10:.0f} | {row['kv_saving']:.1%} | {row['decode_tok_s']:.1f} | "
                         f"{row['decode_speedup']:.2f}x |")
    sbs = r.get("side_by_side")
    if sbs is None:
        lines += ["", "Side-by-side TTFT against the ExecuTorch runtime: not run (pass --with-executorch).", ""]
    else:
        et = (f"{sbs['executorch_pruned_int8_ttft_ms']:.1f} ms" if "executorch_pruned_int8_ttft_ms" in sbs
              else f"failed: {sbs.get('executorch_error', '?')}")
        lines += ["", f"Side-by-side TTFT, same run, {sbs['items']} items, recipe {sbs['recipe']} (llama.cpp maps it "
                  "to one input-level count, ExecuTorch runs it exactly):", "",
                  "| llama.cpp unpruned (q8_0, keep 1.0) | edge-prune llama.cpp pruned (q8_0) | edge-prune ExecuTorch pruned (int8) |",
                  "|---|---|---|",
                  f"| {sbs['llamacpp_unpruned_q8_0_ttft_ms']:.1f} ms | {sbs['llamacpp_pruned_q8_0_ttft_ms']:.1f} ms | {et} |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
