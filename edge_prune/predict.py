"""Latency and memory predicted from the cost model and a device profile.

Assumptions (printed with every prediction): prefill is compute-bound (FLOPs / sustained FLOP/s for
the compute dtype the runtime uses, plus the profile's fixed time per transformer layer run); decode
is bandwidth-bound (every step streams the language
model's weights and reads the KV cache); memory = weights + KV cache at the full context +
the prefill's largest live activations + a fixed runtime overhead.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np

from edge_prune.cost import decoder_layer_flops, estimate, kv_cache_bytes, token_schedule, weight_bytes
from edge_prune.devices import Compute, DeviceProfile, Memory
from edge_prune.models.shapes import ModelShape
from edge_prune.recipe import Recipe

MB = 1024 * 1024
RUNTIME_OVERHEAD_MB = 150  # runtime library, tokenizer, allocator slack (rough, measured ExecuTorch/llama.cpp RSS)

# artifact quant -> (weight format in the cost model, compute dtype on a CPU/NPU)
QUANT_FORMATS = {
    "none": ("fp32", "fp32"), "fp32": ("fp32", "fp32"), "fp16": ("fp16", "fp16"), "f16": ("fp16", "fp16"),
    "int8": ("int8", "fp32"), "8da4w": ("8da4w", "int8"),
    "q8_0": ("q8_0", "int8"), "q4_0": ("q4_0", "int8"), "q4_k_m": ("q4_k_m", "int8"),
}


@dataclass
class Prediction:
    vision_ms: float
    prefill_ms: float  # decoder prefill
    ttft_ms: float
    decode_tok_s: float
    memory_mb: dict[str, float]  # weights, kv_cache, activations, runtime, total
    artifact_mb: float
    compute_dtype: str
    weight_format: str
    fixed_ms: float  # the part of ttft_ms that is per-layer fixed cost, not FLOPs (0 on most profiles)
    sustained_tflops: float
    sustained_bandwidth_gbs: float
    flops: dict[str, float]
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quant_formats(quant: str, profile: DeviceProfile) -> tuple[str, str]:
    if quant not in QUANT_FORMATS:
        raise ValueError(f"unknown quantization {quant!r}; expected one of {', '.join(QUANT_FORMATS)}")
    weights, dtype = QUANT_FORMATS[quant]
    if profile.kind == "gpu" and dtype == "int8":
        dtype = "fp16"  # GPU kernels dequantize to fp16 and multiply there
    return weights, dtype


def predict(shape: ModelShape, recipe: Recipe | None, profile: DeviceProfile, quant: str = "fp16",
            text_tokens: int = 64, new_tokens: int = 32) -> Prediction:
    """Predicted vision/prefill/TTFT/decode and peak memory of one request on `profile`."""
    weight_format, dtype = quant_formats(quant, profile)
    cost = estimate(shape, recipe, accounting="exact", text_tokens=text_tokens)
    parts = cost.pruned_breakdown
    flops_per_s = profile.compute.achieved_flops(dtype)
    overhead = profile.compute.layer_overhead_ms
    sched = token_schedule(shape, recipe, text_tokens)
    # fixed per-layer time: every CLIP layer run (+ the projector) and every decoder layer with work left
    vision_layers = shape.vision.layers_run + 1
    decoder_layers = sum(1 for i in range(shape.num_layers) if sched.attention_tokens(i) or sched.mlp_tokens(i))
    # a drop (score, top-k, gather the kept rows) is a few small ops: on the benchmark model FastV's
    # measured 0.96 ms against a probed fixed cost of 0.9-1.3 ms per layer, so it counts as one layer's
    decoder_layers += sum(1 for i in range(shape.num_layers) if sched.visual_out[i] < sched.visual_in[i])
    vision_ms = (parts["vision_tower"] + parts["projector"]) / flops_per_s * 1e3 + overhead * vision_layers
    prefill_ms = (sum(v for k, v in parts.items() if k not in ("vision_tower", "projector")) / flops_per_s * 1e3
                  + overhead * decoder_layers)
    wb = weight_bytes(shape, weight_format)
    cache = sched.cache_lengths()
    kv_dtype = "fp32" if dtype == "fp32" else "fp16"
    kv_mid = kv_cache_bytes(shape, [c + new_tokens // 2 if c else 0 for c in cache], kv_dtype)
    bandwidth = profile.memory.achieved_bytes_per_s
    decode_tok_s = bandwidth / (wb.language_model + kv_mid)
    kv_full = kv_cache_bytes(shape, [c + new_tokens if c else 0 for c in cache], kv_dtype)
    act_bytes = 4 if dtype == "fp32" else 2
    n_max = max(sched.attention_tokens(i) for i in range(shape.num_layers))
    # Largest live prefill tensors: residual + normed input + q/k/v + the MLP's gate/up outputs.
    activations = n_max * (3 * shape.hidden_size + shape.q_dim + 2 * shape.kv_dim
                           + 2 * shape.intermediate_size) * act_bytes
    memory = {"weights": wb.total / MB, "kv_cache": kv_full / MB, "activations": activations / MB,
              "runtime": float(RUNTIME_OVERHEAD_MB)}
    memory["total"] = sum(memory.values())
    assumptions = [
        f"prefill compute-bound at {flops_per_s / 1e12:.3g} TFLOP/s sustained ({dtype}, "
        f"{profile.compute.efficiency:.0%} of peak)"
        + (f" + {overhead:.3g} ms fixed per layer ({vision_layers} vision/projector, {decoder_layers} decoder layers and token drops)"
           if overhead else ""),
        f"decode bandwidth-bound at {bandwidth / 1e9:.3g} GB/s sustained: streams {wb.language_model / MB:.0f} MB "
        f"of {weight_format} language-model weights + the KV cache per token",
        f"memory = weights ({weight_format}) + {kv_dtype} KV cache at {text_tokens} text tokens + {new_tokens} new "
        f"tokens + largest prefill activations + {RUNTIME_OVERHEAD_MB} MB runtime overhead",
        f"{text_tokens} text tokens, {cost.visual_tokens} visual tokens per image, exact FLOPs accounting",
    ]
    return Prediction(
        vision_ms=vision_ms, prefill_ms=prefill_ms, ttft_ms=vision_ms + prefill_ms, decode_tok_s=decode_tok_s,
        memory_mb=memory, artifact_mb=wb.total / MB, compute_dtype=dtype, weight_format=weight_format,
        fixed_ms=overhead * (vision_layers + decoder_layers),
        sustained_tflops=flops_per_s / 1e12, sustained_bandwidth_gbs=bandwidth / 1e9,
        flops={"vision": parts["vision_tower"] + parts["projector"], "prefill": cost.pruned_flops,
               "baseline_prefill": cost.baseline_flops},
        assumptions=assumptions,
    )


# ---- host calibration ----------------------------------------------------------------------------
def calibrate_host(profile: DeviceProfile, shape: ModelShape, text_tokens: int = 64,
                   seconds: float = 0.4, prefill: Callable[[int], Any] | None = None) -> DeviceProfile:
    """Measure this machine: a decoder layer of the model's own shape, run in the framework the eager
    engine uses at three token counts (giving sustained FLOP/s and a fixed time per layer), and a large
    memory copy. With `prefill` (f(tokens) running the runtime's own text-only prefill of that many
    tokens, e.g. `PrunedEngine.text_prefill`), the decoder figures come from timing it instead of a
    stand-in layer (see _layer_probe). Returns the profile with measured figures."""
    n = shape.num_visual_tokens + text_tokens
    flops_per_s, overhead_ms = _layer_probe(shape, n, seconds, prefill)
    bandwidth = _copy_probe(seconds)
    tflops = flops_per_s / 1e12
    compute = Compute(fp32=tflops, fp16=tflops, int8=tflops, efficiency=1.0, layer_overhead_ms=overhead_ms)
    memory = Memory(bandwidth_gbs=bandwidth / 1e9, bandwidth_efficiency=1.0, ram_mb=profile.memory.ram_mb)
    return replace(profile, compute=compute, memory=memory)


PROBE_LAYER_FLOPS = 1e9  # above this a layer's fixed cost is negligible and a chained probe too slow
PROBE_BIG_TOKENS = 128  # tokens for probing such a layer: compute-bound, yet ~0.1-1 s per run on a CPU
PROBE_CHAIN = 4  # layers run back to back per timed call (one layer alone ran ~15% slower than in a model)


def probe_sizes(tokens: int) -> list[int]:
    """The token counts the layer probe times for a request of `tokens`: it, a quarter and a sixteenth
    of it, down to what pruned layers see."""
    return [tokens, max(8, tokens // 4), max(8, tokens // 16)]


def _layer_probe(shape: ModelShape, tokens: int, seconds: float,
                 prefill: Callable[[int], Any] | None = None) -> tuple[float, float]:
    """(FLOP/s, ms per layer) from timing a random decoder layer at `tokens`, a quarter and a sixteenth of them.

    A bare GEMM probe reaches far more FLOP/s than a layer does: attention with small heads, norms,
    RoPE and dispatch cost time the FLOPs do not count (the benchmark model's 128-wide layers measured
    133 GFLOP/s in a GEMM and ~50 in the layer). A least-squares line through the three medians,
    time = FLOPs / rate + fixed, separates the per-FLOP rate from the fixed cost of running a layer.

    With `prefill`, the runtime's own text-only prefill at those token counts is timed instead, per
    layer: a runtime's layer costs more than a bare one. The eager engine's layer measured 0.08-0.27 ms
    more than transformers' LlamaDecoderLayer at 8-589 tokens (its RoPE tables per layer, its masks and
    books), the bare layer's fixed term read 0.14-0.2 ms against the engine's 0.30, and pruned prefills,
    whose layers are short, were under-predicted by over 30%. The engine's prefill also embeds the
    prompt and runs the final norm and head; at these sizes that is a small share, and it is counted
    with the layers.
    """
    big = decoder_layer_flops(shape, tokens) > PROBE_LAYER_FLOPS
    if prefill is not None and not big:
        run, per_call = prefill, shape.num_layers  # one call runs every decoder layer
    else:
        try:
            run, per_call = _torch_layer(shape), PROBE_CHAIN
        except ImportError:  # device side without torch: a GEMM probe, no fixed term
            return _matmul_probe(tokens, shape.hidden_size, shape.intermediate_size, seconds), 0.0
    if big:
        # a 7B-class layer: its fixed costs are noise next to its FLOPs, and at the few tokens a quick
        # probe could afford it would be bound by streaming its weights instead. Time a slice that
        # is still compute-bound, once through.
        tokens = min(tokens, PROBE_BIG_TOKENS)
        run(tokens, chain=1)  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            run(tokens, chain=1)
            times.append(time.perf_counter() - t)
        return decoder_layer_flops(shape, tokens) / float(np.median(times)), 0.0
    sizes = probe_sizes(tokens)
    flops = np.array([decoder_layer_flops(shape, n) for n in sizes], dtype=np.float64)
    for n in sizes:
        run(n)  # warm-up
    samples: list[list[float]] = [[] for _ in sizes]
    start = time.perf_counter()
    # sizes interleaved, so a slow spell of a shared machine hits all of them alike
    while len(samples[0]) < 3 or time.perf_counter() - start < seconds:
        for n, times_n in zip(sizes, samples):
            t = time.perf_counter()
            run(n)
            times_n.append(time.perf_counter() - t)
    times = np.array([np.median(t) for t in samples]) / per_call
    slope, fixed = np.polyfit(flops, times, 1)
    if slope <= 0 or fixed < 0:  # noise bent the line: all rate, no fixed term
        return float(flops[0] / times[0]), 0.0
    return float(1.0 / slope), float(fixed * 1e3)


def _torch_layer(shape: ModelShape):
    """f(tokens, chain) running a Llama decoder layer of this shape `chain` times (no grad, fp32,
    random weights: only the time is wanted)."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                         num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
                         head_dim=shape.head_dim, num_hidden_layers=1, vocab_size=8)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):  # transformers' own init of a 7B-class layer takes seconds
        layer = LlamaDecoderLayer(config, 0)
    layer = layer.to_empty(device="cpu").eval()
    for p in layer.parameters():
        p.data.normal_(0.0, 0.02)  # as a trained layer's: finite, not denormal
    rope = LlamaRotaryEmbedding(config)

    inputs = {}

    @torch.no_grad()
    def run(tokens: int, chain: int = PROBE_CHAIN) -> None:
        if tokens not in inputs:
            x = torch.randn(1, tokens, shape.hidden_size)
            positions = torch.arange(tokens)[None]
            inputs[tokens] = (x, positions, rope(x, positions))
        x, positions, embeddings = inputs[tokens]
        for _ in range(chain):  # back to back, as a model's layers run
            x = layer(x, position_embeddings=embeddings, position_ids=positions)

    return run


def _matmul_probe(n: int, d: int, m: int, seconds: float) -> float:
    a, w1, w2 = (np.random.rand(*s).astype(np.float32) for s in ((n, d), (d, m), (m, d)))
    np.matmul(np.matmul(a, w1), w2)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        np.matmul(np.matmul(a, w1), w2)
        done += 1
    return done * 4 * n * d * m / (time.perf_counter() - start)


def _copy_probe(seconds: float) -> float:
    src = np.ones(64 * MB // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        np.copyto(dst, src)
        done += 1
    return done * 2 * src.nbytes / (time.perf_counter() - start)  # read + write


# ---- device-aware fitting ------------------------------------------------------------------------
def required_reduction(shape: ModelShape, profile: DeviceProfile, ttft_ms: float | None = None,
                       peak_rss_mb: float | None = None, quant: str = "fp16", text_tokens: int = 64) -> float:
    """The smallest prefill-FLOPs reduction (exact accounting) whose predicted TTFT and memory fit the budget.

    Prefill is modelled compute-bound, so TTFT beyond the profile's fixed per-layer cost scales with
    FLOPs: the allowed FLOPs are what is left of the budget times the device's sustained FLOP/s.
    Memory only shrinks through the KV cache and activations.
    """
    from edge_prune.errors import ProfileError

    for name, value in (("--ttft-ms", ttft_ms), ("--peak-rss-mb", peak_rss_mb)):
        if value is not None and value <= 0:
            raise ProfileError(f"{name} is {value}; budgets must be numbers > 0")
    if ttft_ms is None and peak_rss_mb is None:
        raise ProfileError("give --ttft-ms and/or --peak-rss-mb to fit against a device budget")
    full = predict(shape, None, profile, quant=quant, text_tokens=text_tokens)
    needed = 0.0
    if ttft_ms is not None and full.ttft_ms > ttft_ms:
        if ttft_ms <= full.fixed_ms:
            raise ProfileError(
                f"{profile.name}: --ttft-ms {ttft_ms:g} is below the {full.fixed_ms:.1f} ms the model's layers cost "
                "before any FLOPs (the profile's fixed time per layer); no token dropping can meet it")
        needed = 1.0 - (ttft_ms - full.fixed_ms) / (full.ttft_ms - full.fixed_ms)
    if peak_rss_mb is not None and full.memory_mb["total"] > peak_rss_mb:
        excess = full.memory_mb["total"] - peak_rss_mb
        prunable = full.memory_mb["kv_cache"] + full.memory_mb["activations"]
        if excess >= prunable:
            raise ProfileError(
                f"{profile.name}: predicted memory {full.memory_mb['total']:.0f} MB exceeds --peak-rss-mb "
                f"{peak_rss_mb:.0f} by more than dropping visual tokens can save ({prunable:.0f} MB of KV cache and "
                "activations); choose a smaller quantization or a device with more memory")
        needed = max(needed, min(0.99, excess / prunable))  # a conservative share of FLOPs saved
    return needed


def device_target(shape: ModelShape, profile_name: str, ttft_ms: float | None = None,
                  peak_rss_mb: float | None = None, quant: str = "fp16", text_tokens: int = 64) -> tuple[float, dict]:
    """`fit --profile`: the reduction to fit for, and the provenance that records the device budget.

    `host` is calibrated on this machine first. The reduction is 0 when the unpruned model
    already meets the budget (the caller then writes a keep-everything recipe).
    """
    from edge_prune.devices import load_profile

    profile = load_profile(profile_name)
    if profile.calibrate:
        profile = calibrate_host(profile, shape, text_tokens)
    needed = required_reduction(shape, profile, ttft_ms, peak_rss_mb, quant=quant, text_tokens=text_tokens)
    full = predict(shape, None, profile, quant=quant, text_tokens=text_tokens)
    provenance = {"profile": profile.name, "quant": quant, "text_tokens": text_tokens,
                  "budget": {k: v for k, v in (("ttft_ms", ttft_ms), ("peak_rss_mb", peak_rss_mb)) if v is not None},
                  "unpruned_prediction": {"ttft_ms": full.ttft_ms, "peak_rss_mb": full.memory_mb["total"]},
                  "required_flops_reduction": needed}
    return needed, provenance
