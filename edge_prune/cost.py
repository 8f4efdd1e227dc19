"""Analytic cost model: prefill/decode FLOPs, KV-cache bytes and weight bytes of a recipe on a model.

Works from a ModelShape alone (config.json, no weights), so a 7B/13B model is costed in milliseconds.

Token semantics (ARCHITECTURE.md, shared with the engine): `recipe.keep_counts(n_visual)[i]` visual
tokens remain after layer i's attention. Each decoder layer is split in two parts:
  * attention part (q/k/v/o projections and the attention itself) sees n_in tokens: the ones that
    ENTERED layer i (`recipe.input_count(n)` visual tokens for layer 0, else the count after layer i-1);
  * MLP part sees n_out tokens: the ones kept after layer i's attention (every later layer too).
Text tokens (`text_tokens`) are never dropped and are part of n_in/n_out. A layer in
`recipe.skip_attention` does no attention-part work at all (no projections, no scores, no KV cache).

Accountings (`recipe.ACCOUNTINGS`):
  * "exact": FLOPs = 2 x multiply-adds of every matmul the model runs in prefill. Vision tower per
    image crop: the bias-free patch-embedding conv, then `vision.layers_run` CLIP layers (q/k/v/o, full
    bidirectional n^2 attention, 2-matrix MLP) over patches + CLS; layers past the deepest selected
    feature layer are not counted (llama.cpp's mmproj drops them; transformers' eager forward still
    runs them). Projector: LLaVA's 2 linears on the selected tokens of every crop. Decoder: q/k/v/o
    with GQA widths, SwiGLU's 3 matrices, and CAUSAL attention: query j scores j+1 keys, so QK^T and
    AV each cost heads*head_dim*n(n+1)/2 multiply-adds. Causal is the work a prefill must do and is
    exactly the sum of the per-token decode costs below (decoding token j attends to its j cached keys
    plus itself), so prefill and decode agree. lm_head: the last prompt position only (generation
    needs one logit row). Not counted: norms, activations, softmax, RoPE, residual adds, biases,
    embedding lookups, LLaVA-NeXT's newline tokens (a learned vector, no matmul).
  * "fastv": FastV's per-layer 4nd^2 + 2n^2d + 2ndm over all tokens (text + visual), decoder only.
  * "fitprune": FitPrune's per-layer 4nd^2 + 2n^2d + 3ndm over visual tokens only, decoder only.
  The paper accountings are evaluated literally as the papers print them (one multiply-add = one
  "FLOP"; square attention; d = hidden, m = intermediate, no GQA), so their absolute values are on the
  papers' scale, not the exact accounting's; compare reductions across accountings, not totals.
  In all three the n^2 (or n(n+1)/2) term uses the attention part's n_in.

Learned modules (exact accounting only; the paper accountings print no term for them):
  * guides (LVPruning-style, at each layer where the schedule drops tokens): per guide, rank r, with
    n_v visual tokens entering the drop and n_t text tokens: q over visual tokens n_v d r, k and v over
    text 2 n_t d r, scores and context 2 n_v n_t r, output n_v r multiply-adds. n_t is `text_tokens`
    (all prompt text), an upper bound: the guides attend to the text after the image only.
  * exit router: per candidate layer it is evaluated at (every candidate up to and including the exit
    layer, while the request still has visual tokens): 2d r + 2r multiply-adds (+ 3r with `lookahead`).
    A lookahead router (recipe `exit.lookahead`) also runs, at each such layer, the rest of the decoder
    text-only and the lm_head on the last position, to read the answer an exit would give: at the exit
    layer that run is the request's rest of prefill (the schedule already counts it), at every other
    candidate it is thrown away and counted here, causal attention over the text tokens included.
Frozen exits (recipe `exit.frozen`): the visual tokens present at the exit stay as keys and values; every
later layer projects their keys and values (n_f d 2 kv_dim) and the text tokens' queries score them
(2 q_dim n_t n_f, QK^T and AV). Later KV caches hold them, so decode attends to them too. In the paper
accountings: 2 n_f d^2 for the projections and 2 n n_f d for the scores, n being that accounting's
query count.
Merging (recipe `prune.merge`, exact accounting only): at each layer that drops visual tokens, n_drop
dropped and n_keep kept: n_drop n_keep d multiply-adds for the cosine similarities and n_drop d for the
weighted sums of the dropped states (edge_prune.merging).
Preview (recipe `prune.preview_layers`, exact accounting only): at each layer l that drops visual tokens,
with n tokens present (text + the visual tokens that entered l), every preview layer after l projects
the keys of all n (n d kv_dim) and the last token's query (d q_dim), and scores that query against them
(q_dim n).
Exits are per request, so a recipe with an exit router is costed as an EXPECTATION: the mean over the
exit-layer distribution (`exit.exit_rates`, measured on held-out calibration data when the router was
fitted; the rest never exit), or over a distribution passed to `estimate` (e.g. one measured by
`edge-prune eval`). Exiting after layer l = keep 0 visual tokens from layer l's MLP on (see recipe.py).

Decode FLOPs (per new token, always the exact accounting, since the papers define prefill only):
projections + MLP for one token, attention over (cache length + 1) keys in each non-skipped layer, and
lm_head. KV bytes: per layer 2 x kv_heads x head_dim x (tokens its attention saw) x bytes/element.

Sliding-window attention is not modelled (every query sees its whole causal prefix); that is exact
for the supported checkpoints (none sets a window) and for any prompt shorter than the window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from edge_prune.models.shapes import ModelShape, llava_next_num_crops, llava_next_visual_tokens
from edge_prune.recipe import ACCOUNTINGS, Recipe, router_inputs

DEFAULT_TEXT_TOKENS = 64
DEFAULT_KV_DTYPE = "fp16"

# Bits per stored KV element. q8_0 / q4_0 are llama.cpp's cache types (--cache-type-k/v): blocks of
# 32 values with one fp16 scale, i.e. 34 and 18 bytes per 32 values.
KV_DTYPE_BITS: dict[str, Fraction] = {
    "fp32": Fraction(32),
    "fp16": Fraction(16),
    "bf16": Fraction(16),
    "q8_0": Fraction(17, 2),
    "q4_0": Fraction(9, 2),
}

# Prefill FLOPs broken down by where they are spent; the paper accountings leave the first two at 0.
PARTS = ("vision_tower", "projector", "attention_projections", "attention_scores", "mlp", "lm_head", "guides",
         "exit_router", "merge", "preview")

# ---- weight formats ------------------------------------------------------------------------------
WEIGHT_FORMATS = ("fp32", "fp16", "bf16", "int8", "8da4w", "q8_0", "q4_0", "q4_k_m")
FLOAT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# ExecuTorch-style formats ("int8", "8da4w") quantize the language model's linear layers (lm_head
# included); token embeddings, norms and biases stay at UNQUANTIZED_BYTES (fp16).
UNQUANTIZED_BYTES = 2
INT8_SCALE_BYTES = 2  # int8 weight-only: one fp16 scale per output channel (symmetric, no zero point)
# 8da4w (int8 dynamic activations, int4 weights): 4-bit weights packed two per byte, one fp32 scale
# per group of 128 input channels (torchao's Int8DynActInt4WeightQuantizer keeps fp32 scales;
# ExecuTorch's Llama export is run with --group_size 128) -> 4 + 32/128 = 4.25 bits/weight.
DA4W_GROUP_SIZE = 128
DA4W_SCALE_BYTES = 4
# GGUF formats (llama.cpp): every 2-D language-model tensor, token embeddings and output included,
# at the format's effective bits/weight; 1-D tensors (norms, biases) stay f32 as llama.cpp writes them.
GGUF_BITS: dict[str, Fraction] = {
    "q8_0": Fraction(17, 2),  # 32 int8 + one fp16 scale per block = 8.5 bits
    "q4_0": Fraction(9, 2),  # 32 4-bit + one fp16 scale per block = 4.5 bits
    # Q4_K_M mixes Q4_K (4.5 bits) with Q6_K for parts of attn_v/ffn_down and the output tensor;
    # llama.cpp's tools/quantize/README.md reports 4.84 bits/weight overall for Llama-2-7B.
    "q4_k_m": Fraction(484, 100),
}
GGUF_VECTOR_BYTES = 4
# The vision tower and projector (llama.cpp's mmproj, ExecuTorch's image encoder) are not quantized
# by any of the quantized formats: their matrices are stored fp16 (1-D tensors f32 in GGUF).
VISION_MATRIX_BYTES = 2


# ---- token schedule ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenSchedule:
    """Tokens every decoder layer handles for one image + prompt: attention part (in) and MLP part (out)."""

    text_tokens: int
    visual_tokens: int  # the image's visual tokens out of the projector, before any pruning
    visual_in: tuple[int, ...]  # visual tokens entering layer i (its attention part sees them)
    visual_out: tuple[int, ...]  # visual tokens after layer i's attention (its MLP and later layers)
    skip_attention: frozenset[int] = frozenset()
    # frozen visual tokens layer i's attention reads as keys and values only (an exit with recipe
    # exit.frozen); empty: none anywhere
    frozen: tuple[int, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.visual_in)

    def attention_tokens(self, layer: int) -> int:
        return self.text_tokens + self.visual_in[layer]

    def mlp_tokens(self, layer: int) -> int:
        return self.text_tokens + self.visual_out[layer]

    def frozen_tokens(self, layer: int) -> int:
        return self.frozen[layer] if self.frozen else 0

    def cache_lengths(self) -> list[int]:
        """Tokens held in each layer's KV cache after prefill (0 where attention is skipped)."""
        return [0 if i in self.skip_attention else self.attention_tokens(i) + self.frozen_tokens(i)
                for i in range(self.num_layers)]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per layer for reports: attention-in, MLP and KV-cache token counts (text included)."""
        cache = self.cache_lengths()
        return [
            {
                "layer": i,
                "attention_in": self.attention_tokens(i),
                "mlp": self.mlp_tokens(i),
                "kv_cache": cache[i],
                "skip_attention": i in self.skip_attention,
            }
            for i in range(self.num_layers)
        ]


Pruning = Recipe | Sequence[int] | TokenSchedule | None


def token_schedule(
    shape: ModelShape,
    pruning: Pruning = None,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    visual_tokens: int | None = None,
    exit_layer: int | None = None,
) -> TokenSchedule:
    """Per-layer token counts for a recipe, a list of keep counts (visual tokens after each layer's
    attention), or None (the unpruned model). A recipe is checked against the model first.
    `exit_layer`: a request that exits after that layer keeps no visual tokens from its MLP on."""
    if isinstance(pruning, TokenSchedule):
        return pruning
    if exit_layer is not None:
        full = token_schedule(shape, pruning, text_tokens, visual_tokens)
        if not 0 <= exit_layer < full.num_layers:
            raise ValueError(f"exit_layer {exit_layer} is not a decoder layer (0..{full.num_layers - 1})")
        out = tuple(0 if i >= exit_layer else c for i, c in enumerate(full.visual_out))
        frozen: tuple[int, ...] = ()
        if isinstance(pruning, Recipe) and pruning.exit is not None and pruning.exit.frozen:
            # the tokens present at the exit stay as keys and values of every later layer
            frozen = tuple(full.visual_out[exit_layer] if i > exit_layer else 0 for i in range(full.num_layers))
        return TokenSchedule(full.text_tokens, full.visual_tokens, (full.visual_in[0], *out[:-1]), out,
                             full.skip_attention, frozen)
    if not isinstance(text_tokens, int) or isinstance(text_tokens, bool) or text_tokens < 0:
        raise ValueError(f"text_tokens must be a non-negative integer, got {text_tokens!r}")
    n_visual = shape.num_visual_tokens if visual_tokens is None else visual_tokens
    if not isinstance(n_visual, int) or n_visual < 0:
        raise ValueError(f"visual_tokens must be a non-negative integer, got {n_visual!r}")
    layers = shape.num_layers
    skip: frozenset[int] = frozenset()
    if pruning is None:
        first, after = n_visual, [n_visual] * layers
    elif isinstance(pruning, Recipe):
        pruning.check_model(shape.signature())
        pruning.validate()
        first, after = pruning.input_count(n_visual), pruning.keep_counts(n_visual)
        skip = frozenset(pruning.skip_attention)
    else:
        after = [int(c) for c in pruning]
        first = n_visual
        if len(after) != layers:
            raise ValueError(
                f"keep counts: got {len(after)} entries, expected one per decoder layer ({layers})"
            )
        previous = n_visual
        for i, count in enumerate(after):
            if not 0 <= count <= previous:
                raise ValueError(
                    f"keep counts: entry {i} is {count}, expected 0..{previous} (counts must not increase "
                    f"and cannot exceed the {n_visual} visual tokens)"
                )
            previous = count
    visual_in = (first, *after[:-1]) if layers else ()
    return TokenSchedule(text_tokens, n_visual, tuple(visual_in), tuple(after), skip)


def image_plan(shape: ModelShape, image_hw: tuple[int, int] | None = None) -> tuple[int, int]:
    """(vision-tower crops, visual tokens) for one image. LLaVA always resizes to one crop; LLaVA-NeXT
    depends on the original (height, width), defaulting to a square image at the tower's resolution."""
    if not shape.is_llava_next:
        return 1, shape.num_visual_tokens
    height, width = image_hw or (shape.vision.image_size, shape.vision.image_size)
    return llava_next_num_crops(shape, height, width), llava_next_visual_tokens(shape, height, width)


# ---- prefill -------------------------------------------------------------------------------------
def prefill_breakdown(
    shape: ModelShape,
    pruning: Pruning = None,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    accounting: str = "exact",
    image_hw: tuple[int, int] | None = None,
    exit_layer: int | None = None,
) -> dict[str, int]:
    """Prefill FLOPs per part (keys: PARTS) under one accounting; see the module docstring.
    `exit_layer` costs a recipe's request that exits after that layer (None: it never exits)."""
    _check_choice("accounting", accounting, ACCOUNTINGS)
    crops, n_visual = image_plan(shape, image_hw)
    sched = token_schedule(shape, pruning, text_tokens, n_visual, exit_layer)
    d, m = shape.hidden_size, shape.intermediate_size
    parts = dict.fromkeys(PARTS, 0)
    active = [i for i in range(sched.num_layers) if i not in sched.skip_attention]

    if accounting == "exact":
        v = shape.vision
        t, dv, iv = v.num_positions, v.hidden_size, v.intermediate_size
        patch_conv = v.num_patches * v.num_channels * v.patch_size**2 * dv
        vision_layer = 4 * t * dv * dv + 2 * t * t * dv + 2 * t * dv * iv
        parts["vision_tower"] = crops * (patch_conv + v.layers_run * vision_layer)
        per_token = shape.projector_in_features * shape.projector_hidden_features + (
            shape.projector_hidden_features * shape.projector_out_features
        )
        parts["projector"] = crops * shape.num_visual_tokens * per_token
        for i in active:
            projections, scores = _attention_macs(shape, sched.attention_tokens(i))
            frozen_projections, frozen_scores = _frozen_macs(shape, sched.frozen_tokens(i), sched.text_tokens)
            parts["attention_projections"] += projections + frozen_projections
            parts["attention_scores"] += scores + frozen_scores
        parts["mlp"] = sum(_mlp_macs(shape, sched.mlp_tokens(i)) for i in range(sched.num_layers))
        parts["lm_head"] = d * shape.vocab_size
        if isinstance(pruning, Recipe):
            parts["guides"], parts["exit_router"] = _module_macs(shape, pruning, text_tokens, n_visual, exit_layer)
            if pruning.prune.merge:
                parts["merge"] = _merge_macs(shape, sched)
            if pruning.prune.preview_layers:
                plain = token_schedule(shape, pruning, text_tokens, n_visual)
                parts["preview"] = _preview_macs(shape, plain, pruning.prune.preview_layers, exit_layer)
        return {k: 2 * value for k, value in parts.items()}  # FLOPs = 2 x multiply-adds

    visual_only = accounting == "fitprune"  # FitPrune counts visual tokens only, FastV all tokens
    mlp_mats = 3 if visual_only else 2  # FitPrune counts SwiGLU's 3 matrices, FastV a 2-matrix FFN
    n_in = [sched.visual_in[i] if visual_only else sched.attention_tokens(i) for i in range(sched.num_layers)]
    n_out = [sched.visual_out[i] if visual_only else sched.mlp_tokens(i) for i in range(sched.num_layers)]
    for i in active:
        frozen = sched.frozen_tokens(i)  # keys and values only, scored by the layer's counted queries
        parts["attention_projections"] += 4 * n_in[i] * d * d + 2 * frozen * d * d
        parts["attention_scores"] += 2 * n_in[i] * n_in[i] * d + 2 * n_in[i] * frozen * d
    parts["mlp"] = sum(mlp_mats * n * d * m for n in n_out)
    return parts


def _attention_macs(shape: ModelShape, n: int) -> tuple[int, int]:
    """Multiply-adds of one layer's attention over n tokens: (q/k/v/o projections, causal scores)."""
    proj_width = 2 * shape.q_dim + 2 * shape.kv_dim  # q and o use q_dim, k and v use kv_dim
    return n * shape.hidden_size * proj_width, shape.q_dim * n * (n + 1)  # QK^T + AV, causal n(n+1)/2 each


def _frozen_macs(shape: ModelShape, frozen: int, text_tokens: int) -> tuple[int, int]:
    """Multiply-adds of one layer for `frozen` frozen visual tokens (recipe exit.frozen): their key and value
    projections, and the text tokens' queries scoring them (QK^T and AV). Only an exited request has
    frozen tokens and it has no visual tokens left, so its only queries are its text tokens; all of them
    are counted against every frozen key (exact when the image comes before the text, as in LLaVA's
    layout; an upper bound otherwise)."""
    return frozen * shape.hidden_size * 2 * shape.kv_dim, 2 * shape.q_dim * text_tokens * frozen


def _mlp_macs(shape: ModelShape, n: int) -> int:
    return 3 * n * shape.hidden_size * shape.intermediate_size  # SwiGLU: gate, up, down


def decoder_layer_flops(shape: ModelShape, tokens: int) -> int:
    """Exact FLOPs of one unpruned decoder layer over `tokens` tokens, as prefill_breakdown counts them."""
    return 2 * (sum(_attention_macs(shape, tokens)) + _mlp_macs(shape, tokens))


def _module_macs(shape: ModelShape, recipe: Recipe, text_tokens: int, n_visual: int,
                 exit_layer: int | None) -> tuple[int, int]:
    """Multiply-adds of the guides and the exit router for one request (module docstring)."""
    d = shape.hidden_size
    sched = token_schedule(shape, recipe, text_tokens, n_visual, exit_layer)
    guides = 0
    g = recipe.prune.guides
    if g is not None:
        r, n_t = g.rank, text_tokens
        for layer in g.layers:
            n_v = sched.visual_in[layer]
            if sched.visual_out[layer] < n_v:  # the engine runs a guide only where it drops tokens
                guides += n_v * d * r + 2 * n_t * d * r + 2 * n_v * n_t * r + n_v * r
    router = 0
    e = recipe.exit
    if e is not None:
        plain = token_schedule(shape, recipe, text_tokens, n_visual)
        for layer in e.layers:
            if exit_layer is not None and layer > exit_layer:
                break
            if plain.visual_out[layer] > 0 and text_tokens > 0:  # evaluated while visual tokens remain
                router += router_inputs(d, e.lookahead) * e.rank + 2 * e.rank
                if e.lookahead and layer != exit_layer:
                    frozen = plain.visual_out[layer] if e.frozen else 0
                    router += _text_only_rest_macs(shape, layer, text_tokens, plain.skip_attention, frozen)
    return guides, router


def _text_only_rest_macs(shape: ModelShape, after_layer: int, text_tokens: int, skip: frozenset[int],
                         frozen: int = 0) -> int:
    """Multiply-adds of the decoder's layers after `after_layer` over the text tokens alone (attending to
    `frozen` frozen visual tokens with recipe exit.frozen), and the lm_head on the last position: the run a
    lookahead router reads at a candidate layer."""
    macs = shape.hidden_size * shape.vocab_size
    for i in range(after_layer + 1, shape.num_layers):
        if i not in skip:
            macs += sum(_attention_macs(shape, text_tokens)) + sum(_frozen_macs(shape, frozen, text_tokens))
        macs += _mlp_macs(shape, text_tokens)
    return macs


def _merge_macs(shape: ModelShape, sched: TokenSchedule) -> int:
    """Multiply-adds of merging (recipe prune.merge): at each layer that drops visual tokens, the cosine
    similarity of every dropped to every kept token and the weighted sums of the dropped states. An exit
    (nothing kept) merges nothing."""
    macs = 0
    for i in range(sched.num_layers):
        dropped, kept = sched.visual_in[i] - sched.visual_out[i], sched.visual_out[i]
        if dropped > 0 and kept > 0:
            macs += dropped * kept * shape.hidden_size + dropped * shape.hidden_size
    return macs


def _preview_macs(shape: ModelShape, sched: TokenSchedule, preview_layers: Sequence[int],
                  exit_layer: int | None) -> int:
    """Multiply-adds of the preview (recipe prune.preview_layers): at each layer where the schedule `sched`
    (without exits) drops visual tokens and keeps some, up to an exit, every later preview layer's keys over
    the tokens present, its query for the last token, and the scores of that query."""
    macs = 0
    for i in range(sched.num_layers if exit_layer is None else exit_layer + 1):
        if 0 < sched.visual_out[i] < sched.visual_in[i]:
            n = sched.attention_tokens(i)
            later = sum(1 for layer in preview_layers if layer > i)
            macs += later * (n * shape.hidden_size * shape.kv_dim + shape.hidden_size * shape.q_dim + shape.q_dim * n)
    return macs


def exit_distribution(recipe: Recipe | None) -> dict[int | None, float]:
    """The recipe's exit-layer distribution {layer or None (never exits): share}; {None: 1} without a router."""
    if recipe is None or recipe.exit is None or not recipe.exit.exit_rates:
        return {None: 1.0}
    dist: dict[int | None, float] = {l: float(r) for l, r in zip(recipe.exit.layers, recipe.exit.exit_rates) if r > 0}
    dist[None] = max(0.0, 1.0 - sum(dist.values()))
    return dist


def prefill_flops(
    shape: ModelShape,
    pruning: Pruning = None,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    accounting: str = "exact",
    image_hw: tuple[int, int] | None = None,
) -> int:
    """Total prefill FLOPs of one image + prompt under `accounting` (a Recipe, keep counts or None)."""
    return sum(prefill_breakdown(shape, pruning, text_tokens, accounting, image_hw).values())


# ---- decode and KV cache -------------------------------------------------------------------------
def decode_flops(shape: ModelShape, cache_lengths: Sequence[int], skip_attention: Sequence[int] = ()) -> int:
    """FLOPs (2 x multiply-adds) to decode one new token given each layer's KV-cache length."""
    if len(cache_lengths) != shape.num_layers:
        raise ValueError(f"cache_lengths: got {len(cache_lengths)} entries, expected {shape.num_layers}")
    d = shape.hidden_size
    skip = set(skip_attention)
    macs = 3 * d * shape.intermediate_size * shape.num_layers + d * shape.vocab_size  # MLPs + lm_head
    for i, length in enumerate(cache_lengths):
        if i not in skip:
            macs += d * (2 * shape.q_dim + 2 * shape.kv_dim)  # q/k/v/o for the new token
            macs += 2 * shape.q_dim * (length + 1)  # QK^T and AV over the cache plus the token itself
    return 2 * macs


def kv_cache_bytes(shape: ModelShape, cache_lengths: Sequence[int], kv_dtype: str = DEFAULT_KV_DTYPE) -> int:
    """Bytes of K and V across layers holding `cache_lengths[i]` tokens each."""
    _check_choice("kv_dtype", kv_dtype, tuple(KV_DTYPE_BITS))
    elements = sum(2 * shape.kv_dim * length for length in cache_lengths)
    return math.ceil(elements * KV_DTYPE_BITS[kv_dtype] / 8)


# ---- weights -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """`count` parameter tensors of one shape; kind says how quantized formats store them."""

    name: str
    part: str  # "language_model" or "vision_projector"
    kind: str  # "linear" / "embedding" (language model), "matrix" (vision side, >= 2-D), "vector" (1-D)
    shape: tuple[int, ...]
    count: int = 1

    @property
    def numel(self) -> int:
        return self.count * math.prod(self.shape)


def parameter_inventory(shape: ModelShape) -> list[TensorSpec]:
    """Every parameter tensor of the checkpoint (all stored vision layers, lm_head unless tied)."""
    d, m, L = shape.hidden_size, shape.intermediate_size, shape.num_layers
    lm = "language_model"
    out = [
        TensorSpec("embed_tokens", lm, "embedding", (shape.vocab_size, d)),
        TensorSpec("q_proj", lm, "linear", (shape.q_dim, d), L),
        TensorSpec("k_proj+v_proj", lm, "linear", (shape.kv_dim, d), 2 * L),
        TensorSpec("o_proj", lm, "linear", (d, shape.q_dim), L),
        TensorSpec("gate_proj+up_proj", lm, "linear", (m, d), 2 * L),
        TensorSpec("down_proj", lm, "linear", (d, m), L),
        TensorSpec("layernorms", lm, "vector", (d,), 2 * L + 1),
    ]
    if shape.qkv_bias:
        out += [TensorSpec("q_bias", lm, "vector", (shape.q_dim,), L),
                TensorSpec("k_bias+v_bias", lm, "vector", (shape.kv_dim,), 2 * L)]
    if shape.o_bias:
        out.append(TensorSpec("o_bias", lm, "vector", (d,), L))
    if shape.mlp_bias:
        out += [TensorSpec("gate_bias+up_bias", lm, "vector", (m,), 2 * L),
                TensorSpec("down_bias", lm, "vector", (d,), L)]
    if not shape.tie_word_embeddings:
        out.append(TensorSpec("lm_head", lm, "linear", (shape.vocab_size, d)))

    v, vp = shape.vision, "vision_projector"
    dv, iv, Lv = v.hidden_size, v.intermediate_size, v.num_layers
    out += [
        TensorSpec("class_embedding", vp, "vector", (dv,)),
        TensorSpec("patch_embedding", vp, "matrix", (dv, v.num_channels, v.patch_size, v.patch_size)),
        TensorSpec("position_embedding", vp, "matrix", (v.num_positions, dv)),
        # pre/post layernorm (weight+bias) + per layer: 2 layernorms (weight+bias), q/k/v/o and fc2 biases
        TensorSpec("vision_vectors", vp, "vector", (dv,), 4 + Lv * (4 + 4 + 1)),
        TensorSpec("vision_qkvo", vp, "matrix", (dv, dv), 4 * Lv),
        TensorSpec("vision_fc1", vp, "matrix", (iv, dv), Lv),
        TensorSpec("vision_fc2", vp, "matrix", (dv, iv), Lv),
        TensorSpec("vision_fc1_bias", vp, "vector", (iv,), Lv),
        TensorSpec("projector_linear_1", vp, "matrix",
                   (shape.projector_hidden_features, shape.projector_in_features)),
        TensorSpec("projector_linear_2", vp, "matrix",
                   (shape.projector_out_features, shape.projector_hidden_features)),
    ]
    if shape.projector_bias:
        out += [TensorSpec("projector_bias_1", vp, "vector", (shape.projector_hidden_features,)),
                TensorSpec("projector_bias_2", vp, "vector", (shape.projector_out_features,))]
    if shape.image_newline:
        out.append(TensorSpec("image_newline", vp, "vector", (shape.hidden_size,)))
    return out


def decoder_parameters(shape: ModelShape) -> int:
    """Parameters of the decoder layers (attention, MLP, their norms): the base of the learned-module budgets.

    Token embeddings, the final norm and lm_head are left out, so the budgets are conservative."""
    outside = {"embed_tokens", "lm_head"}
    total = sum(t.numel for t in parameter_inventory(shape) if t.part == "language_model" and t.name not in outside)
    return total - shape.hidden_size  # the final norm is one of the 2L+1 layernorm vectors


def parameter_count(shape: ModelShape, part: str | None = None) -> int:
    """Number of parameters, optionally of one part ("language_model" or "vision_projector")."""
    return sum(t.numel for t in parameter_inventory(shape) if part is None or t.part == part)


@dataclass(frozen=True)
class WeightBytes:
    """Stored weight bytes of one format, split language model vs vision tower + projector."""

    format: str
    language_model: int
    vision_projector: int

    @property
    def total(self) -> int:
        return self.language_model + self.vision_projector

    def to_dict(self) -> dict[str, int]:
        return {"language_model": self.language_model, "vision_projector": self.vision_projector,
                "total": self.total}


def weight_bytes(shape: ModelShape, fmt: str = "fp16") -> WeightBytes:
    """Weight bytes of the model stored in `fmt` (one of WEIGHT_FORMATS; rules beside the constants)."""
    _check_choice("weight format", fmt, WEIGHT_FORMATS)
    totals = {"language_model": Fraction(0), "vision_projector": Fraction(0)}
    for t in parameter_inventory(shape):
        totals[t.part] += _tensor_bytes(t, fmt)
    return WeightBytes(fmt, math.ceil(totals["language_model"]), math.ceil(totals["vision_projector"]))


def _tensor_bytes(t: TensorSpec, fmt: str) -> Fraction:
    if fmt in FLOAT_BYTES:
        return Fraction(t.numel * FLOAT_BYTES[fmt])
    gguf = fmt in GGUF_BITS
    if t.kind == "vector":
        return Fraction(t.numel * (GGUF_VECTOR_BYTES if gguf else UNQUANTIZED_BYTES))
    if t.kind == "matrix":
        return Fraction(t.numel * VISION_MATRIX_BYTES)
    if gguf:
        return t.numel * GGUF_BITS[fmt] / 8
    if t.kind == "embedding":
        return Fraction(t.numel * UNQUANTIZED_BYTES)
    rows, cols = t.shape
    if fmt == "int8":
        return Fraction(t.count * (rows * cols + rows * INT8_SCALE_BYTES))
    groups = math.ceil(cols / DA4W_GROUP_SIZE)  # 8da4w
    return Fraction(t.count * rows * (Fraction(cols, 2) + groups * DA4W_SCALE_BYTES))


# ---- report --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostReport:
    """Baseline vs pruned cost of one image + prompt under a recipe; `to_dict()` for JSON output."""

    architecture: str
    accounting: str
    text_tokens: int
    visual_tokens: int
    image_crops: int
    baseline_flops: int
    pruned_flops: int
    baseline_breakdown: dict[str, int]
    pruned_breakdown: dict[str, int]
    kv_dtype: str
    kv_bytes_baseline: int
    kv_bytes_pruned: int
    decode_flops_baseline: int
    decode_flops_pruned: int
    tokens_per_layer: list[dict[str, Any]]
    weight_bytes: dict[str, WeightBytes] = field(default_factory=dict)
    # With an exit router, pruned figures are means over this distribution: one entry per exit layer
    # (None = no exit) with its share and that request's prefill FLOPs. Empty without a router.
    exits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def flops_reduction(self) -> float:
        """1 - pruned/baseline prefill FLOPs (0 when the baseline is 0)."""
        return 1.0 - self.pruned_flops / self.baseline_flops if self.baseline_flops else 0.0

    @property
    def kv_reduction(self) -> float:
        return 1.0 - self.kv_bytes_pruned / self.kv_bytes_baseline if self.kv_bytes_baseline else 0.0

    @property
    def flops_unit(self) -> str:
        return "FLOPs (2 x multiply-adds)" if self.accounting == "exact" else "paper units (multiply-adds)"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["weight_bytes"] = {name: wb.to_dict() for name, wb in self.weight_bytes.items()}
        out.update(flops_reduction=self.flops_reduction, kv_reduction=self.kv_reduction,
                   flops_unit=self.flops_unit, decode_accounting="exact")
        return out


def estimate(
    shape: ModelShape,
    recipe: Recipe | None,
    accounting: str = "exact",
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    kv_dtype: str = DEFAULT_KV_DTYPE,
    image_hw: tuple[int, int] | None = None,
    weight_formats: Sequence[str] = WEIGHT_FORMATS,
    exits: Mapping[int | None, float] | None = None,
) -> CostReport:
    """Cost a recipe (None = unpruned) on a model for one image + `text_tokens` prompt tokens.

    `image_hw` (original height, width) matters for LLaVA-NeXT only; see `image_plan`.
    `exits` overrides the recipe's exit-layer distribution {layer or None: share} (shares are
    normalised); with an exit router the pruned figures are expectations over it.
    Raises RecipeError if the recipe was fitted for another model.
    """
    _check_choice("accounting", accounting, ACCOUNTINGS)
    _check_choice("kv_dtype", kv_dtype, tuple(KV_DTYPE_BITS))
    crops, n_visual = image_plan(shape, image_hw)
    base = token_schedule(shape, None, text_tokens, n_visual)
    pruned = token_schedule(shape, recipe, text_tokens, n_visual)
    base_parts = prefill_breakdown(shape, base, text_tokens, accounting, image_hw)
    dist = dict(exits) if exits is not None else exit_distribution(recipe)
    total = sum(dist.values())
    if total <= 0 or any(p < 0 for p in dist.values()):
        raise ValueError(f"exit distribution {dist} must hold non-negative shares with a positive sum")
    dist = {k: v / total for k, v in dist.items() if v > 0}
    pruned_parts = dict.fromkeys(PARTS, 0.0)
    kv_pruned = decode_pruned = 0.0
    exit_rows = []
    for layer, share in sorted(dist.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        sched = token_schedule(shape, recipe, text_tokens, n_visual, layer)
        parts = prefill_breakdown(shape, recipe if isinstance(recipe, Recipe) else sched, text_tokens, accounting,
                                  image_hw, layer)
        for k, v in parts.items():
            pruned_parts[k] += share * v
        kv_pruned += share * kv_cache_bytes(shape, sched.cache_lengths(), kv_dtype)
        decode_pruned += share * decode_flops(shape, sched.cache_lengths(), sorted(sched.skip_attention))
        exit_rows.append({"exit_layer": layer, "share": share, "prefill_flops": sum(parts.values())})
    pruned_parts = {k: round(v) for k, v in pruned_parts.items()}
    has_router = isinstance(recipe, Recipe) and recipe.exit is not None
    return CostReport(
        architecture=shape.architecture,
        accounting=accounting,
        text_tokens=text_tokens,
        visual_tokens=n_visual,
        image_crops=crops,
        baseline_flops=sum(base_parts.values()),
        pruned_flops=sum(pruned_parts.values()),
        baseline_breakdown=base_parts,
        pruned_breakdown=pruned_parts,
        kv_dtype=kv_dtype,
        kv_bytes_baseline=kv_cache_bytes(shape, base.cache_lengths(), kv_dtype),
        kv_bytes_pruned=math.ceil(kv_pruned - 1e-9),
        decode_flops_baseline=decode_flops(shape, base.cache_lengths()),
        decode_flops_pruned=round(decode_pruned),
        tokens_per_layer=pruned.rows(),
        weight_bytes={fmt: weight_bytes(shape, fmt) for fmt in weight_formats},
        exits=exit_rows if (has_router or exits is not None) else [],
    )


def format_report(report: CostReport) -> str:
    """A plain-text table of a CostReport for the CLI."""
    r = report
    lines = [
        f"cost estimate: {r.architecture}, accounting={r.accounting} [{r.flops_unit}]",
        f"prompt: {r.text_tokens} text + {r.visual_tokens} visual tokens"
        + (f" ({r.image_crops} image crops)" if r.image_crops > 1 else ""),
        "",
        f"{'':<26}{'baseline':>14}{'pruned':>14}{'change':>10}",
        _row("prefill FLOPs", r.baseline_flops, r.pruned_flops, _flops),
    ]
    for part in PARTS:
        if r.baseline_breakdown[part] or r.pruned_breakdown[part]:
            lines.append(_row("  " + part.replace("_", " "), r.baseline_breakdown[part],
                              r.pruned_breakdown[part], _flops))
    lines += [
        _row("decode FLOPs/token (exact)", r.decode_flops_baseline, r.decode_flops_pruned, _flops),
        _row(f"KV cache ({r.kv_dtype})", r.kv_bytes_baseline, r.kv_bytes_pruned, _bytes),
    ]
    if r.exits:
        lines += ["", "exit router: pruned figures are means over the exit-layer distribution"]
        for row in r.exits:
            where = "never exits" if row["exit_layer"] is None else f"exit after layer {row['exit_layer']}"
            lines.append(f"  {where:<26}{row['share']:>7.1%}  prefill {_flops(row['prefill_flops'])}")
    if r.weight_bytes:
        lines += ["", f"{'weights':<10}{'language model':>16}{'vision+proj':>14}{'total':>12}"]
        for name, wb in r.weight_bytes.items():
            lines.append(f"{name:<10}{_bytes(wb.language_model):>16}{_bytes(wb.vision_projector):>14}"
                         f"{_bytes(wb.total):>12}")
    lines += ["", "tokens per decoder layer (text + visual): attention in -> MLP"]
    start = 0
    rows = r.tokens_per_layer
    for i in range(1, len(rows) + 1):  # collapse runs of identical layers
        key = ("attention_in", "mlp", "skip_attention")
        if i == len(rows) or any(rows[i][k] != rows[start][k] for k in key):
            span = f"layer  {start}" if i - 1 == start else f"layers {start}-{i - 1}"
            note = "  (attention skipped)" if rows[start]["skip_attention"] else ""
            lines.append(f"  {span:<14}{rows[start]['attention_in']:>7} -> {rows[start]['mlp']}{note}")
            start = i
    return "\n".join(lines)


def _row(label: str, base: int, pruned: int, fmt: Any) -> str:
    change = f"{(pruned - base) / base:+.1%}" if base else "n/a"
    return f"{label:<26}{fmt(base):>14}{fmt(pruned):>14}{change:>10}"


def _flops(value: float) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3f} {prefix}"
    return f"{value:.0f}"


def _bytes(value: float) -> str:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what} {value!r} is not known; expected one of {', '.join(choices)}")
