"""Convert a LLaVA checkpoint + recipe into an ExecuTorch artifact (.pte with the recipe baked in).

One program, several methods (names in `edge_prune.runtimes.executorch`):
  vision_encoder(pixel_values [1,3,S,S]) -> visual features [1, N, d]  (CLIP + feature layer + projector)
  token_embedding(ids [1,T]) -> [1, T, d]
  prefill(text_embeds [1,T,d], visual_embeds [1,N,d], image_start [1]) -> logits [1, vocab]
      (or prefill_0 .. prefill_{k-1} when the decoder is split into segments, see `segments`)
  prefill_text(text_embeds [1,T,d]) -> logits            a prompt without an image (never pruned)
  decode(token [1,1], position [1], text_len [1], visual_len [L]) -> logits [1, vocab]

The prefill keeps the working set as [visual tokens ; text tokens]. Visual counts are static
per layer (the recipe's round(keep_after[i] * N)); only the text length T is dynamic
(torch.export.Dim, max `max_prompt_tokens`). Attention masks come from explicit position ids
(a key is visible when its original position is not later than the query's), so dropping visual
rows never renumbers anything: kept tokens keep their positions. After layer i's attention the
recipe's scorer ranks the visual tokens from that attention's own probabilities and a stable
rank (ties to the earlier token, exactly as edge_prune.scoring.select_visual) keeps the best;
region-balanced recipes rank round robin over the image grid's regions, and merging recipes fold
each dropped token into its most similar kept one (edge_prune.merging), carrying the tokens' sizes.

KV cache: one mutable buffer pair per decoder layer, shared by prefill and decode
(`share_mutable_buffers`). Layer i's buffer is [1, kv_heads, seen_i + text_capacity, head_dim]:
slots [0, seen_i) hold the visual tokens its attention saw, then the text tokens, prompt and
generated, so its length reflects the pruning (a layer after a 90% drop holds 10% of the image).
A merging program also keeps, per layer, the log size of each visual key ([1, seen_i]), which the
prefill writes and decode adds to its attention logits, as the engine's LayerCache.bias.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from edge_prune.converters.artifact import ArtifactWriter
from edge_prune.errors import ArtifactError, ModelError, RecipeError
from edge_prune.recipe import Recipe
from edge_prune.runtimes.executorch import (
    DECODE,
    EMBED,
    PREFILL_TEXT,
    PROGRAM_LAYOUT,
    PTE_FILE,
    VISION,
    DelegationSummary,
    MethodDelegation,
    ProgramSpec,
    exit_method_names,
    prefill_method_names,
)
from edge_prune.runtimes.manifest import CONFIG_FILE
from edge_prune.runtimes.preprocess import PREPROCESS_FILE, ImageConfig
from edge_prune.runtimes.tokenizer import CHAT_FILE, TOKENIZER_FILE, ChatFormat

BACKENDS = ("xnnpack", "vulkan", "coreml", "qnn")
QUANTS = ("none", "8da4w", "int8")
DEFAULT_MAX_PROMPT_TOKENS = 256  # text tokens of one prompt (the image's tokens are extra)
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_GROUP_SIZE = 32  # 8da4w weight group (ExecuTorch's LLM export default for 8da4w)
RECIPE_FILE = "recipe.json"
_QUESTION = "\x00QUESTION\x00"  # placeholder used to pre-render the chat template

log = logging.getLogger(__name__)


@dataclass
class ConvertOptions:
    """Everything `edge-prune convert --format executorch` can be told."""

    backend: str = "xnnpack"
    quant: str = "none"
    group_size: int = DEFAULT_GROUP_SIZE
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    # Decoder layer boundaries of the prefill segments, e.g. [4] splits 8 layers into 0-3 and 4-7.
    # Empty = one prefill method (the default: every extra segment costs prefill time, more so on more
    # threads; benchmarks/executorch_exit_threads.py measures it).
    segment_boundaries: list[int] = field(default_factory=list)
    qnn_soc: str = "SM8650"
    text_only_prefill: bool = True  # export prefill_text, for prompts without an image
    overwrite: bool = False
    progress: bool = True

    def check(self, num_layers: int) -> None:
        if self.backend not in BACKENDS:
            raise ArtifactError(f"--backend is {self.backend!r}; expected one of {', '.join(BACKENDS)}")
        if self.quant not in QUANTS:
            raise ArtifactError(f"--quant is {self.quant!r}; expected one of {', '.join(QUANTS)}")
        if self.max_prompt_tokens < 2 or self.max_new_tokens < 1:
            raise ArtifactError(
                f"--max-prompt-tokens {self.max_prompt_tokens} / --max-new-tokens {self.max_new_tokens}; "
                "expected at least 2 and 1"
            )
        if self.group_size <= 0:
            raise ArtifactError(f"--group-size is {self.group_size}; expected a positive integer such as 32")
        bounds = self.segment_boundaries
        if sorted(set(bounds)) != list(bounds) or any(not 0 < b < num_layers for b in bounds):
            raise ArtifactError(
                f"segment boundaries {bounds} must be increasing layer indices in [1, {num_layers - 1}]"
            )


@dataclass
class ConvertResult:
    path: Path
    spec: ProgramSpec
    delegation: DelegationSummary
    pte_bytes: int
    seconds: float


# ---- the exported modules ---------------------------------------------------------------------
class KVCache(nn.Module):
    """Per-layer key/value buffers; layer i holds spec.slots[i] visual slots, then text slots."""

    def __init__(self, seen: list[int], text_capacity: int, skip: set[int], kv_heads: int, head_dim: int,
                 dtype: torch.dtype, merge: bool = False):
        super().__init__()
        for i, n in enumerate(seen):
            if i in skip:
                continue
            shape = (1, kv_heads, n + text_capacity, head_dim)
            self.register_buffer(f"k_{i}", torch.zeros(shape, dtype=dtype), persistent=False)
            self.register_buffer(f"v_{i}", torch.zeros(shape, dtype=dtype), persistent=False)
            if merge:  # log size of each visual key (merged tokens weigh as the tokens they stand for)
                self.register_buffer(f"b_{i}", torch.zeros(1, n, dtype=dtype), persistent=False)

    def kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k_{i}"), getattr(self, f"v_{i}")

    def key_bias(self, i: int) -> torch.Tensor:
        return getattr(self, f"b_{i}")


class DecoderParts(nn.Module):
    """The language model pieces every decoder method uses, plus the shared KV cache (one set of FQNs)."""

    def __init__(self, adapter: Any, recipe: Recipe, spec: ProgramSpec, guides: nn.Module | None = None,
                 router: nn.Module | None = None):
        super().__init__()
        lm = adapter.language_model
        self.guides = guides  # LVPruning-style scorer modules (scorer "guide"), run in-graph
        self.router = router  # DyVTE-style exit router, run in-graph at the end of an exit segment
        self.layers = lm.layers
        self.norm = lm.norm
        self.rotary_emb = lm.rotary_emb
        self.embed_tokens = lm.embed_tokens
        self.lm_head = adapter.lm_head
        self.apply_rotary: Callable = adapter.apply_rotary
        self.scorer = recipe.prune.scorer
        self.fitprune_combine = recipe.prune.fitprune_combine
        self.preview_layers = list(recipe.prune.preview_layers)  # fitprune scorer: PrunedEngine.preview
        self.seed = recipe.prune.seed
        self.merge = spec.merge
        self.spec = spec
        self.skip = set(spec.skip_attention)
        first = self.layers[0].self_attn
        self.head_dim = first.head_dim
        self.heads = adapter.text_config.num_attention_heads
        self.kv_heads = adapter.text_config.num_key_value_heads or self.heads
        d = adapter.text_config.hidden_size
        dtype = adapter.embed_tokens.weight.dtype
        self.register_buffer("mean_weight", torch.full((1, d), 1.0 / d, dtype=dtype), persistent=False)
        rotation = _rotate_half_matrix(self.head_dim, dtype)  # x @ R; a linear's weight is R^T
        self.rotate_half: torch.Tensor | None
        if _applies_rotate_half(self.apply_rotary, rotation):
            self.register_buffer("rotate_half", rotation.T.contiguous(), persistent=False)
        else:  # a decoder family with another RoPE layout: its own helper, slices and all
            self.rotate_half = None
        self.register_buffer("sum_weight", torch.ones(1, d, dtype=torch.float32), persistent=False)
        self.cache = KVCache(spec.slots, spec.text_capacity, self.skip, self.kv_heads, self.head_dim,
                             adapter.embed_tokens.weight.dtype, spec.merge)

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, n, 1, hd] for `positions` [1, n]: computed once per prefill, again after a drop."""
        cos, sin = self.rotary_emb(x, positions)
        return cos[:, :, None], sin[:, :, None]

    def qkv(self, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """q [KVH, G*n, hd] (grouped, see `grouped`; scaled by the layer's 1/sqrt(hd)), k and v [1, KVH, n, hd].

        Written for the delegate: with the text length dynamic, XNNPACK lowers no reshape with a
        symbolic size (torch.export spells a -1 out as one), nor a slice, an expand or the expand +
        view around a 4-d matmul; what it does not take runs as a single-threaded portable kernel (a
        real copy) between two partitions. So the remaining head split/merge copies touch only the
        [n, hd]-sized q/k/v and outputs, and attention is a 3-d bmm whose [KVH, G*Q, K] results are
        never reshaped.
        """
        attn = self.layers[i].self_attn
        cos, sin = rope
        q = self.rotate(attn.q_proj(x).view(1, -1, self.heads, self.head_dim), cos, sin)
        return (self.grouped(q.transpose(1, 2) * attn.scaling), *self.kv(i, x, rope))

    def kv(self, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """k and v [1, KVH, n, hd] of layer i, as `qkv` gives them (a frozen exit's tokens need no queries)."""
        v = self.layers[i].self_attn.v_proj(x).view(1, -1, self.kv_heads, self.head_dim)
        return self.keys(i, x, rope), v.transpose(1, 2)

    def keys(self, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """k [1, KVH, n, hd] of layer i, rotated (a preview needs no values)."""
        cos, sin = rope
        k = self.rotate(self.layers[i].self_attn.k_proj(x).view(1, -1, self.kv_heads, self.head_dim), cos, sin)
        return k.transpose(1, 2)

    def preview(self, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                key_bias: torch.Tensor | float) -> torch.Tensor | None:
        """[K] attention the last token would pay each key in the recipe's preview layers after layer i, head-max,
        summed (PrunedEngine.preview for one request: every key is visible to the last token); None if none."""
        later = [j for j in self.preview_layers if j > i]
        if not later:
            return None
        cos, sin = rope
        total = None
        for j in later:
            xn = self.rms_norm(self.layers[j].input_layernorm, x)
            q = self.qkv(j, xn[:, -1:], (cos[:, -1:], sin[:, -1:]))[0]  # grouped, scaled: [KVH, G, hd]
            probs = self.attention_probs(q, self.keys(j, xn, rope), key_bias)  # [KVH, G, K]
            head_max = probs.amax(dim=1).amax(dim=0)
            total = head_max if total is None else total + head_max
        return total

    def rotate(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE of t [1, n, heads, hd] as the model applies it; rotate_half as a linear by a signed
        permutation (exact: one nonzero term per output) instead of two slices and a cat."""
        if self.rotate_half is None:  # another RoPE layout: the model's own helper, in its [1, heads, n, hd] layout
            return self.apply_rotary(t.transpose(1, 2), t.transpose(1, 2), cos[:, :, 0], sin[:, :, 0])[0].transpose(1, 2)
        return t * cos + torch.nn.functional.linear(t, self.rotate_half) * sin

    def grouped(self, t: torch.Tensor) -> torch.Tensor:
        """[1, H, Q, hd] -> [KVH, G*Q, hd]: the query heads that share a kv head, stacked along the rows.

        Grouped-query attention without repeating K/V (head h reads kv head h // G, as HF's
        repeat_kv); logits and probabilities stay in this layout, [KVH, G*Q, K]: regrouping them,
        with Q and K both dynamic, would be a portable copy of the layer's largest tensor.
        """
        # the row count spelled out: from a -1 the lowered graph derives it as numel // (KVH * hd), a
        # symbolic floordiv that Core ML's converter (coremltools 9) types as a float and fails on
        return t.reshape(self.kv_heads, (self.heads // self.kv_heads) * t.shape[2], self.head_dim)

    def head_probs(self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> list[torch.Tensor]:
        """Each head's softmax attention [1, Q, K] (float32), from grouped q and k as `qkv` gives them.

        For the scorers that reduce over heads (FitPrune's head max): the delegate can neither
        regroup the grouped probabilities (a reshape or slice of a tensor with two dynamic sizes) nor
        reduce across their leading dim, so it would copy the layer's largest tensor in portable
        kernels, single-threaded, at every dropping layer. Computing the logits head by head instead
        (and attending with them, `attend_heads`) keeps it all in bmm and softmax, which the delegate
        runs; only q's and k's small head slices are portable copies. `bias` [Q, K]: see `causal_bias`.
        """
        g = self.heads // self.kv_heads
        rows = bias.shape[0]  # Q; not q.shape[1] // g, a symbolic floordiv Core ML's converter types as a float
        out = []
        for kv in range(self.kv_heads):
            keys = k[:, kv].transpose(1, 2)
            for h in range(g):
                q_h = q[kv, h * rows:(h + 1) * rows][None]
                out.append(torch.softmax((torch.bmm(q_h, keys) + bias).float(), dim=-1))
        return out

    def guide_scores(self, layer: int, x_vis: torch.Tensor, x_text: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """`scoring.GuideSet.scores` of the visual tokens [n_vis]: they query the text after the image.

        Only the visual rows and the text columns are computed ([n_vis, t] logits, not the engine's
        [T, T]), and the text mask is an additive bias rather than a boolean masked_fill and where:
        over [T, T] those were portable kernels that made guides-90's prefill slower than keep-all's.
        A masked logit's exp underflows to exactly 0 either way; without text the context is zero."""
        g = self.guides
        j = g.layers.index(layer)
        q = self.normalized(x_vis).to(g.wq.dtype) @ g.wq[j].T  # [1, n_vis, r]
        text = self.normalized(x_text).to(g.wq.dtype)
        k, v = text @ g.wk[j].T, text @ g.wv[j].T  # [1, t, r]
        is_after = after.to(q.dtype)
        logits = torch.bmm(q, k.transpose(1, 2)) / g.rank ** 0.5 + (is_after - 1) * 1e30
        context = torch.bmm(torch.softmax(logits, dim=-1), v) * is_after.sum().clamp(0, 1)
        # a linear to one output rather than a matmul by the [r] vector, which Core ML's converter
        # (coremltools 9) cannot type
        return torch.nn.functional.linear(torch.nn.functional.gelu(q + context), g.w_out[j][None], g.b_out[j:j + 1])[0, :, 0]

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """`scoring.rms_normalize` (no weight), the mean of squares as a linear, as `rms_norm`."""
        from edge_prune.scoring import RMS_EPS

        return x * torch.rsqrt(torch.nn.functional.linear(x.float() * x.float(), self.mean_weight.float()) + RMS_EPS).to(x.dtype)

    def rms_norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """HF's RMSNorm, the mean of squares as a matmul by 1/d: XNNPACK takes a linear, not mean.dim."""
        mean_sq = torch.nn.functional.linear(x * x, self.mean_weight)
        return norm.weight * (x * torch.rsqrt(mean_sq + norm.variance_epsilon))

    def attention_probs(self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Softmax attention [KVH, G*Q, K] (float32) of grouped, scaled q and keys k [1, KVH, K, hd].
        `bias` [G*Q, K] (see `bias`) is 0 where a key is visible and the float minimum elsewhere: an add,
        not a masked_fill, so the delegate keeps the whole attention in one partition."""
        keys = k.reshape(self.kv_heads, -1, self.head_dim).transpose(1, 2)
        return torch.softmax((torch.bmm(q, keys) + bias).float(), dim=-1)

    def attend(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Grouped probs [KVH, G*Q, K] x values [1, KVH, K, hd] -> [1, Q, H * hd]."""
        values = v.reshape(self.kv_heads, -1, self.head_dim)
        out = torch.bmm(probs.to(v.dtype), values).reshape(self.heads, -1, self.head_dim)
        return out.transpose(0, 1).reshape(1, -1, self.heads * self.head_dim)

    def attend_heads(self, probs: list[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
        """Per-head probs [1, Q, K] in `head_probs`' order (head h reads kv head h // G) x values
        [1, KVH, K, hd] -> [1, Q, H * hd], as `attend` gives from the grouped probs."""
        g = self.heads // self.kv_heads
        return torch.cat([torch.bmm(p_h.to(v.dtype), v[:, h // g]) for h, p_h in enumerate(probs)], dim=-1)

    def causal_bias(self, pos: torch.Tensor, dtype: torch.dtype, groups: int,
                    key_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Additive mask [groups*Q, K] of the prefill from positions `pos` [Q] (keys = queries, or at
        `key_pos` [K]): 0 where a key's original position is not later than the query's, the float
        minimum elsewhere; row g*Q + j is query j. Arithmetic on float positions (exact integers below
        2^24), which the delegate runs, where comparing them and converting the [Q, K] booleans were
        portable kernels, again after every drop."""
        positions = pos.float()
        keys = positions if key_pos is None else key_pos.float()
        later = (keys[None, :] - positions.repeat(groups)[:, None]).clamp(0, 1)  # 1 where the key is later
        bias = later * torch.finfo(dtype).min
        return bias if dtype == torch.float32 else bias.to(dtype)

    def bias(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [G*Q, K] for the grouped rows from `allowed` [Q, K] (row g*Q + j is query j)."""
        return ((~allowed).to(dtype) * torch.finfo(dtype).min).repeat(self.heads // self.kv_heads, 1)

    def key_bias(self, size_vis: torch.Tensor, t: int | torch.SymInt, dtype: torch.dtype) -> torch.Tensor:
        """[n_vis + t] additive logit bias per key of the working set: log size of the visual keys
        (ToMe's proportional attention, as WorkingSet.key_bias), 0 for text."""
        return torch.cat([size_vis[0].clamp(min=1).log(), torch.zeros(t, dtype=size_vis.dtype)]).to(dtype)

    def merge_into_kept(self, x_vis: torch.Tensor, size_vis: torch.Tensor, kept: torch.Tensor,
                        dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """edge_prune.merging.merge_into_kept for one request at static counts: (states [1, c, d], sizes
        [1, c]) of the kept tokens `kept` after each `dropped` token joined its most similar one.

        The group sums are a one-hot matmul rather than index_add: a batched matmul the delegate runs.
        The one-hot is built from amax, clamps and a running sum instead of argmax and a comparison, which
        run as slow portable kernels: a lab timing of the first drop's merge (286 dropped x 290 kept) took
        1.16 ms with them and 0.57 ms with this form, which picks the same partner."""
        xk, xd = x_vis.index_select(1, kept).float(), x_vis.index_select(1, dropped).float()
        sk, sd = size_vis.index_select(1, kept), size_vis.index_select(1, dropped)
        similarity = torch.bmm(self.unit(xd), self.unit(xk).transpose(1, 2))  # [1, m, c] cosines
        gap = similarity.amax(-1, keepdim=True) - similarity  # 0 at each dropped token's best kept tokens
        best = 1 - torch.ceil(torch.clamp(gap, 0, 1))  # 1 at every maximum (any gap > 0 ceils to 1)
        # Ties go to the earlier kept token, as the engine's argmax: keep a maximum only while the running
        # count of maxima is 1.
        onehot = best * (1 - torch.clamp(torch.cumsum(best, -1) - 1, 0, 1))  # [1, m, c]
        total = sk + torch.bmm(sd[:, None], onehot)[:, 0]
        summed = xk * sk[..., None] + torch.bmm(onehot.transpose(1, 2), xd * sd[..., None])
        return (summed / total[..., None]).to(x_vis.dtype), total

    def unit(self, x: torch.Tensor) -> torch.Tensor:
        """F.normalize(x, dim=-1) (float32), the sum of squares as a linear the delegate takes."""
        sum_sq = torch.nn.functional.linear(x * x, self.sum_weight)
        return x / sum_sq.sqrt().clamp(min=1e-12)

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.rms_norm(self.norm, last_hidden)).float()


class Prefill(nn.Module):
    """Decoder layers [start, end) of the pruned prefill; the whole decoder when it is one segment.

    mode "image": first segment takes (text_embeds, visual_embeds, image_start), later ones
    (x_text, x_vis, pos_vis, image_start); the last returns (logits,), others (x_text, x_vis, pos_vis).
    A merging program hands the visual tokens' sizes on too: (x_text, x_vis, pos_vis, size_vis).
    A segment that ends right after an exit-candidate layer also returns the router's exit probability,
    and hands its visual tokens on *before* that layer's MLP: an exiting request never runs it (as the
    engine and the cost model have it), a frozen exit keeps exactly those states, and the next image
    segment applies that MLP first when the request stays.
    mode "exited": the rest of the decoder after a request exited: (x_text, image_start) -> (logits,),
    no visual tokens, text positions as in the image prompt; with a lookahead router it runs before the
    decision and returns (logits, p_exit), the router reading its input states and the answer it gives
    (then only the last image segment, whose logits are that answer, returns a probability).
    mode "text": a prompt without an image.
    """

    def __init__(self, parts: DecoderParts, start: int, end: int, mode: str = "image"):
        super().__init__()
        self.parts = parts
        self.start, self.end = start, end
        self.mode = mode

    def forward(self, *args: torch.Tensor):
        p, spec = self.parts, self.parts.spec
        first, last = self.start == 0, self.end == spec.num_layers
        n_in = spec.input_visual_tokens
        x_frz = pos_frz = size_frz = None  # a frozen exit's visual tokens: keys and values only
        if self.mode == "text":
            (x_text,) = args
            image_start, n_in = torch.zeros(1, dtype=torch.long), 0
        elif self.mode == "exited" and spec.exit_frozen:
            if p.merge:
                x_text, x_frz, pos_frz, size_frz, image_start = args
            else:
                x_text, x_frz, pos_frz, image_start = args
                size_frz = torch.ones(1, x_frz.shape[1])
        elif self.mode == "exited":
            x_text, image_start = args
        elif first:
            x_text, visual, image_start = args
            x_vis = self._pool(visual)
            pos_vis = (image_start + torch.arange(n_in))[None]
            size_vis = torch.ones(1, n_in)
        elif p.merge:
            x_text, x_vis, pos_vis, size_vis, image_start = args
        else:
            x_text, x_vis, pos_vis, image_start = args
        if self.mode != "image":
            x_vis = x_text[:, :0]
            pos_vis = torch.zeros(1, 0, dtype=torch.long)
        if self.mode != "image" or not p.merge:
            size_vis = torch.ones(1, x_vis.shape[1])
        # after an exit candidate the previous segment left the visual MLP of its last layer to the request
        # that stays (this segment); one that ends at a candidate leaves its own to the next
        resumes = self.mode == "image" and not first and self.start - 1 in spec.exit_layers
        defers = self.mode == "image" and not last and self.end - 1 in spec.exit_layers
        if resumes:
            layer = p.layers[self.start - 1]
            x_vis = x_vis + layer.mlp(p.rms_norm(layer.post_attention_layernorm, x_vis))
        x_text_in = x_text  # the exit decision's input states (a lookahead router reads them in "exited" mode)
        t = x_text.shape[1]
        idx_text = torch.arange(t)
        after = idx_text >= image_start  # text tokens after the image (FitPrune's cross rows, guides' keys)
        pos_text = (idx_text + after.long() * n_in)[None]
        if self.mode == "text":
            after = torch.zeros_like(after)
        x = torch.cat([x_vis, x_text], dim=1)
        pos = torch.cat([pos_vis, pos_text], dim=1)
        bias = rope = None  # the causal mask and RoPE tables: the same until tokens are dropped
        key_bias: torch.Tensor | float = 0.0  # merged keys' log sizes (merging programs)
        frozen_ctx = None if x_frz is None else self._frozen_context(x_frz, pos_frz, size_frz, pos, x.dtype)
        for i in range(self.start, self.end):
            n_vis = x.shape[1] - t
            layer = p.layers[i]
            probs = None
            target = spec.kept[i] if self.mode == "image" else 0
            if i not in p.skip:
                if bias is None:
                    key_bias = p.key_bias(size_vis, t, x.dtype)[None] if p.merge and n_vis else 0.0
                    bias, rope = p.causal_bias(pos[0], x.dtype, p.heads // p.kv_heads) + key_bias, p.rope(x, pos)
                q, k, v = p.qkv(i, p.rms_norm(layer.input_layernorm, x), rope)
                if frozen_ctx is not None:  # exited: text queries over the frozen keys and their own
                    self._write_cache(i, k, v, n_vis, size_vis)
                    x = x + layer.self_attn.o_proj(self._attend_frozen(i, frozen_ctx, q, k, v, bias))
                    x = x + layer.mlp(p.rms_norm(layer.post_attention_layernorm, x))
                    continue
                self._write_cache(i, k, v, n_vis, size_vis)
                if target < n_vis and p.scorer == "fitprune":
                    # FitPrune reduces each head's probabilities (see head_probs): attend with those
                    # too, rather than computing the layer's attention a second time, grouped
                    probs = p.head_probs(q, k, p.causal_bias(pos[0], x.dtype, 1) + key_bias)
                    x = x + layer.self_attn.o_proj(p.attend_heads(probs, v))
                else:
                    probs = p.attention_probs(q, k, bias)
                    x = x + layer.self_attn.o_proj(p.attend(probs, v))
            if target < n_vis:
                scores = self._scores(i, probs, x, pos, n_vis, after)
                preview = p.preview(i, x, rope if rope is not None else p.rope(x, pos), key_bias) \
                    if p.scorer == "fitprune" and target > 0 else None
                if preview is not None:  # scoring.with_preview over this request's visual tokens
                    from edge_prune.scoring import with_preview

                    present = torch.ones(1, n_vis, dtype=torch.bool)
                    scores = with_preview(scores[None], preview[None, :n_vis], present)[0]
                keep = self._keep_visual(scores, target, pos[0, :n_vis], image_start)
                kept = self._indices(keep, target)
                x_vis = x[:, :n_vis].index_select(1, kept)
                if p.merge and target > 0:
                    x_vis, size_vis = p.merge_into_kept(x[:, :n_vis], size_vis, kept,
                                                        self._indices(1 - keep, n_vis - target))
                else:
                    size_vis = size_vis.index_select(1, kept)
                x = torch.cat([x_vis, x[:, n_vis:]], dim=1)
                pos = torch.cat([pos[:, :n_vis].index_select(1, kept), pos[:, n_vis:]], dim=1)
                bias = rope = None
            if defers and i == self.end - 1:  # text only: the visual MLP waits for the exit decision
                n_vis = x.shape[1] - t
                x_txt = x[:, n_vis:]
                x = torch.cat([x[:, :n_vis], x_txt + layer.mlp(p.rms_norm(layer.post_attention_layernorm, x_txt))], 1)
            else:
                x = x + layer.mlp(p.rms_norm(layer.post_attention_layernorm, x))
        n_vis = x.shape[1] - t
        extra: tuple[torch.Tensor, ...] = ()
        logits = p.logits(x[:, -1]) if last else None  # the prompt ends in text (the runtime checks)
        candidate = self.end - 1 in spec.exit_layers
        if self.mode == "image" and candidate and (not spec.exit_lookahead or last):
            extra = (self._exit_probability(self.end - 1, x[:, n_vis:], after, logits),)
        elif self.mode == "exited" and spec.exit_lookahead:
            extra = (self._exit_probability(self.start - 1, x_text_in, after, logits),)
        if logits is not None:
            return (logits, *extra)
        sizes = (size_vis,) if p.merge else ()
        return (x[:, n_vis:], x[:, :n_vis], pos[:, :n_vis], *sizes, *extra)

    def _frozen_context(self, x_frz: torch.Tensor, pos_frz: torch.Tensor, size_frz: torch.Tensor,
                        pos_text: torch.Tensor, dtype: torch.dtype):
        """What every layer of an exited frozen program reuses: the frozen states, their RoPE tables, and
        the text queries' additive mask over them (later positions hidden, merged sizes' log added)."""
        p = self.parts
        groups = p.heads // p.kv_heads
        bias = p.causal_bias(pos_text[0], dtype, groups, key_pos=pos_frz[0])
        if p.merge:
            bias = bias + size_frz[0].clamp(min=1).log().to(dtype)[None]
        return x_frz, p.rope(x_frz, pos_frz), bias, size_frz

    def _attend_frozen(self, i: int, ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       bias: torch.Tensor) -> torch.Tensor:
        """Layer i's attention output for the text queries q over [frozen keys ; text keys]; the frozen
        tokens' keys and values are computed here from their frozen states and written to the cache."""
        p = self.parts
        x_frz, rope_frz, bias_frz, size_frz = ctx
        kf, vf = p.kv(i, p.rms_norm(p.layers[i].input_layernorm, x_frz), rope_frz)
        self._write_frozen(i, kf, vf, size_frz)
        probs = p.attention_probs(q, torch.cat([kf, k], dim=2), torch.cat([bias_frz, bias], dim=1))
        return p.attend(probs, torch.cat([vf, v], dim=2))

    def _write_frozen(self, i: int, kf: torch.Tensor, vf: torch.Tensor, size_frz: torch.Tensor) -> None:
        """A frozen exit's visual keys and values go to the layer's first visual slots."""
        kc, vc = self.parts.cache.kv(i)
        n = kf.shape[2]
        kc[:, :, :n] = kf
        vc[:, :, :n] = vf
        if self.parts.merge:
            self.parts.cache.key_bias(i)[:, :n] = size_frz.clamp(min=1).log().to(kc.dtype)

    def _exit_probability(self, layer: int, x_text: torch.Tensor, after: torch.Tensor,
                          exit_logits: torch.Tensor | None) -> torch.Tensor:
        """The router's p(exit) at this layer's output, from the text states (DyVTE's features) and, for a
        lookahead router, the logits the request gets if it exits here; shape [1]."""
        from edge_prune.scoring import ExitRouter, lookahead_statistics

        feats = ExitRouter.features(x_text, after[None], x_text[:, -1])
        if self.parts.spec.exit_lookahead:
            assert exit_logits is not None
            feats = torch.cat([feats, lookahead_statistics(exit_logits).to(feats.dtype)], -1)
        return torch.sigmoid(self.parts.router.logits(layer, feats).float())

    def _pool(self, visual: torch.Tensor) -> torch.Tensor:
        """keep_input < 1 (the pool scorer): spatial pooling before the decoder, as scoring.pool_visual."""
        from edge_prune.scoring import pool_visual

        n_in = self.parts.spec.input_visual_tokens
        if n_in >= visual.shape[1]:
            return visual
        return pool_visual(visual[0], n_in)[None]

    def _write_cache(self, i: int, k: torch.Tensor, v: torch.Tensor, n_vis: int, size_vis: torch.Tensor) -> None:
        """Visual keys go to slots [0, n_vis) (n_vis == seen[i]), text keys to seen[i] + j: one slice.
        A merging program also records the visual keys' log sizes for decode.

        A slice assignment lowers to `slice_scatter`, a row copy; the same write through an index
        tensor was the portable `index_put`, element by element: 26 of the keep-all prefill's 61 ms."""
        kc, vc = self.parts.cache.kv(i)
        slots = self.parts.spec.slots[i]
        if n_vis in (0, slots):  # one slice: the visual keys fill their slots, or there are none
            start = slots - n_vis  # static: 0 with the image, slots[i] for text-only segments
            kc[:, :, start:start + k.shape[2]] = k
            vc[:, :, start:start + v.shape[2]] = v
        else:  # fewer visual keys than slots (room left for a frozen exit's): text after the slots
            kc[:, :, :n_vis], vc[:, :, :n_vis] = k[:, :, :n_vis], v[:, :, :n_vis]
            kc[:, :, slots:slots + k.shape[2] - n_vis] = k[:, :, n_vis:]
            vc[:, :, slots:slots + v.shape[2] - n_vis] = v[:, :, n_vis:]
        if self.parts.merge and n_vis:
            self.parts.cache.key_bias(i)[:, :n_vis] = size_vis.clamp(min=1).log().to(kc.dtype)

    def _keep_visual(self, scores: torch.Tensor, count: int, pos_vis: torch.Tensor,
                     image_start: torch.Tensor) -> torch.Tensor:
        """[n_vis] 1.0 for the visual tokens the recipe keeps, 0.0 for the rest."""
        spec = self.parts.spec
        side = math.isqrt(spec.num_visual_tokens)
        if spec.regions > 1 and pos_vis.shape[0] == spec.num_visual_tokens and side % spec.regions == 0:
            # the first drop sees the whole grid in order: the regions are a fixed, even partition
            return self._grid_round_robin_mask(scores, count, side, spec.regions)
        return self._keep_mask(scores, count, self._regions(pos_vis, image_start))

    def _regions(self, pos_vis: torch.Tensor, image_start: torch.Tensor) -> torch.Tensor | None:
        """Region id (float) of each visual token for a region-balanced program, as scoring.grid_regions."""
        from edge_prune.scoring import grid_regions

        spec = self.parts.spec
        if spec.regions <= 1:
            return None
        return grid_regions(pos_vis - image_start, spec.num_visual_tokens, spec.regions).float()

    def _scores(self, i: int, probs: torch.Tensor | None, x: torch.Tensor, pos: torch.Tensor, n_vis: int,
                after: torch.Tensor) -> torch.Tensor:
        """The recipe scorer's importance of each visual token, [n_vis], as edge_prune.scoring computes it."""
        scorer = self.parts.scorer
        if scorer == "random":
            return _position_hash(self.parts.seed, i, pos[0, :n_vis])
        if scorer == "guide":  # LVPruning-style guide on the states after this layer's attention
            return self.parts.guide_scores(i, x[:, :n_vis], x[:, n_vis:], after)
        if probs is None:
            raise RecipeError(f"scorer {scorer!r} drops tokens at layer {i}, whose attention is skipped")
        # Both reduce [Q, K]-sized probabilities only with ops the delegate runs (batched matmuls and
        # elementwise max); indexing them would be a portable copy of the layer's largest tensor.
        if scorer == "fastv":  # attention the prompt's last token pays each token, mean over heads
            rows = probs.shape[1]  # grouped [KVH, G*Q, K]: row g*Q + j is query j of the group's head g
            q = x.shape[1]  # Q as the states' length, not rows // G: Core ML's converter types a symbolic floordiv as a float
            last = ((torch.arange(rows) % q) == q - 1).to(probs.dtype) / self.parts.heads
            # [KVH, 1, rows] by a broadcasting add, not an expand: Core ML's converter (coremltools 9)
            # types an expand's symbolic size as a float and fails on it
            per_group = torch.zeros(probs.shape[0], 1, 1, dtype=probs.dtype) + last
            return torch.bmm(per_group, probs).sum(0)[0, :n_vis]
        if scorer == "fitprune":  # cross x self, head-max (scoring.fitprune_scores); probs: see head_probs
            head_max = probs[0]
            for p_h in probs[1:]:
                head_max = torch.maximum(head_max, p_h)  # [1, Q, K]
            is_after = torch.cat([torch.zeros(n_vis, dtype=head_max.dtype), after.to(head_max.dtype)])
            n_after = is_after.sum()
            is_visual = (torch.arange(head_max.shape[1]) < n_vis).to(head_max.dtype)
            weights = torch.stack([is_after / n_after.clamp(min=1), is_visual / max(n_vis, 1)])[None]  # [1, 2, Q]
            masses = torch.bmm(weights, head_max)  # [1, 2, K]: cross and self mass of every key
            self_ = masses[0, 1, :n_vis]
            if self.parts.fitprune_combine == "either":  # scoring.fitprune_combine: each over its mean
                # the means as one more bmm with the visual-key indicator: a sum would be a portable
                # kernel between two partitions at every dropping layer
                means = torch.bmm(masses, is_visual[None, :, None]) / max(n_vis, 1)  # [1, 2, 1]
                relative = masses / means.clamp(min=torch.finfo(masses.dtype).tiny)
                combined = torch.maximum(relative[0, 0, :n_vis], relative[0, 1, :n_vis])
            else:
                combined = masses[0, 0, :n_vis] * self_
            return torch.where(n_after > 0, combined, self_)
        raise RecipeError(f"scorer {scorer!r} cannot drop tokens inside an exported decoder")

    @staticmethod
    def _keep_mask(scores: torch.Tensor, count: int, regions: torch.Tensor | None = None) -> torch.Tensor:
        """[n] 1.0 for the `count` best tokens, else 0.0; ties go to the earlier token (a stable sort).
        With `regions` (region id per token) the ranking goes round robin over the regions, as
        scoring.select_visual: every region's best, then every region's second best, ...

        topk finds the count-th best score t (the runtime has no sort, and topk's order among equal
        scores is its own): every token above t is kept, and of those equal to t the earliest ones
        that are still needed, counted by a cumsum. All on [n] vectors: the [n, n] rank comparison
        this replaces cost about a tenth of FitPrune-60's prefill. ceil(clamp(d, 0, 1)) is exactly 1
        for d > 0 and 0 otherwise, and a float difference is 0 only between equal floats (scores are
        finite; differences below float32's normal range would count as ties).
        """
        n = scores.shape[0]
        if count <= 0:
            return torch.zeros(n)
        s = scores.float()
        if regions is not None:
            return Prefill._round_robin_mask(s, count, regions)
        t = torch.topk(s, count).values[count - 1]
        above = (s - t).clamp(0, 1).ceil()
        equal = 1 - (s - t).abs().clamp(0, 1).ceil()
        wanted = count - above.sum()  # how many of the tokens equal to t are kept
        return above + equal * (wanted - torch.cumsum(equal, 0) + 1).clamp(0, 1)

    @staticmethod
    def _round_robin_mask(s: torch.Tensor, count: int, regions: torch.Tensor) -> torch.Tensor:
        """The round-robin order is by (rank within the region, rank in the image), both counted from one
        [n, n] "ranks ahead" matrix (the sort scoring.select_visual uses is not in the runtime). The
        combined key is an exact integer in float32 (below 2^24 for up to 4,096 tokens) and unique."""
        n = s.shape[0]
        ahead = Prefill._ranks_ahead(s, torch.arange(n).float())  # [j, k]: k ranks ahead of j
        same = 1 - (regions[None, :] - regions[:, None]).abs().clamp(0, 1).ceil()
        key = (ahead * same).sum(1) * (n + 1) + ahead.sum(1)  # smaller is better
        t = torch.topk(-key, count).values[count - 1]
        return (1 - key - t).clamp(0, 1)  # 1 where -key >= t: keys are integers

    @staticmethod
    def _grid_round_robin_mask(s: torch.Tensor, count: int, side: int, regions: int) -> torch.Tensor:
        """`_round_robin_mask` over a whole side x side grid in row-major order, cut into regions x regions
        equal regions (side % regions == 0), without its [n, n] matrix (5.5 of 13.6 ms of a 576-token
        prefill): every region has the same m tokens, so the first count // G rounds keep whole tiers, and
        only the next tier's G candidates (one per region) compete for the count % G places left."""
        n, cell, g = side * side, side // regions, regions * regions
        if count <= 0:
            return torch.zeros(n)
        m = cell * cell
        # constants (Python lists, not traced ops): each region's grid indices, ascending; and the inverse
        order = [(ry * cell + y) * side + rx * cell + x
                 for ry in range(regions) for rx in range(regions) for y in range(cell) for x in range(cell)]
        members = torch.tensor(order).view(g, m)
        inverse = torch.tensor(sorted(range(n), key=order.__getitem__))
        scores = s.float().index_select(0, members.reshape(-1)).view(g, m)
        rank = Prefill._ranks_ahead(scores, members.float()).sum(-1)  # [g, m] rank within the region
        tier, wanted = divmod(count, g)
        keep = (tier - rank).clamp(0, 1)  # rank < tier (ranks are integers)
        if wanted:
            at_tier = 1 - (rank - tier).abs().clamp(0, 1).ceil()  # each region's tier-th best
            candidates = torch.stack([(scores * at_tier).sum(-1), (members.float() * at_tier).sum(-1)])
            place = Prefill._ranks_ahead(candidates[0][None], candidates[1][None])[0].sum(-1)  # [g]
            keep = keep + at_tier * (wanted - place).clamp(0, 1)[:, None]
        return keep.reshape(-1).index_select(0, inverse)  # grid order back from region order

    @staticmethod
    def _ranks_ahead(s: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """[..., k, k]: 1.0 where token b ranks ahead of token a in the same row of s [..., k] (a higher
        score, or an equal one and a smaller `index`), as a stable descending sort orders them."""
        d = s[..., None, :] - s[..., :, None]  # d[..., a, b] = s_b - s_a
        earlier = (index[..., :, None] - index[..., None, :]).clamp(0, 1)  # index_b < index_a (integers)
        return d.clamp(0, 1).ceil() + (1 - d.abs().clamp(0, 1).ceil()) * earlier

    @staticmethod
    def _indices(mask: torch.Tensor, count: int) -> torch.Tensor:
        """Indices (ascending) of the `count` tokens marked 1.0 in `mask`."""
        n = mask.shape[0]
        if count <= 0:
            return torch.zeros(0, dtype=torch.long)
        # topk of (n - index) over the marked tokens lists them in their original order.
        return torch.topk((n - torch.arange(n).float()) * mask, count).indices

    @staticmethod
    def _select(scores: torch.Tensor, count: int, regions: torch.Tensor | None = None) -> torch.Tensor:
        """Indices (ascending) of the tokens `_keep_mask` keeps."""
        return Prefill._indices(Prefill._keep_mask(scores, count, regions), count)


def _rotate_half_matrix(head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """R with x @ R == cat(-x[half:], x[:half]) (transformers' rotate_half)."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim, dtype=dtype)
    r[torch.arange(half) + half, torch.arange(half)] = -1.0
    r[torch.arange(half), torch.arange(half) + half] = 1.0
    return r


def _applies_rotate_half(apply_rotary: Callable, rotation: torch.Tensor) -> bool:
    """Whether the model's RoPE helper is q * cos + rotate_half(q) * sin (every Llama-family decoder)."""
    gen = torch.Generator().manual_seed(0)
    d = rotation.shape[0]
    q = torch.randn(1, 2, 3, d, generator=gen, dtype=rotation.dtype)
    cos, sin = (torch.randn(1, 3, d, generator=gen, dtype=rotation.dtype) for _ in range(2))
    theirs = apply_rotary(q, q, cos, sin)[0]
    return torch.allclose(theirs, q * cos[:, None] + torch.matmul(q, rotation) * sin[:, None], atol=1e-6)


def _position_hash(seed: int, layer: int, positions: torch.Tensor) -> torch.Tensor:
    """scoring.position_hash_uniform, spelled with ops ExecuTorch's portable kernels have."""
    x = (positions.long() * 2654435761 + seed * 97531 + layer * 7919) % 2**32
    x = torch.bitwise_xor(x, torch.bitwise_right_shift(x, 16))
    x = (x * 0x45D9F3B) % 2**32
    x = torch.bitwise_xor(x, torch.bitwise_right_shift(x, 16))
    return (x.double() / 2**32).float()


class Decode(nn.Module):
    """One generated token: writes each layer's K/V at slot seen_i + text_len and attends to what is valid."""

    def __init__(self, parts: DecoderParts):
        super().__init__()
        self.parts = parts

    def forward(self, token: torch.Tensor, position: torch.Tensor, text_len: torch.Tensor,
                visual_len: torch.Tensor) -> torch.Tensor:
        p, spec = self.parts, self.parts.spec
        h = p.embed_tokens(token)
        pos = position.view(1, 1)
        rope = p.rope(h, pos)
        for i, layer in enumerate(p.layers):
            if i not in p.skip:
                kc, vc = p.cache.kv(i)
                seen = spec.slots[i]  # the text slots start after the visual ones
                slot = seen + text_len
                q, k, v = p.qkv(i, p.rms_norm(layer.input_layernorm, h), rope)
                # Attend over [cache ; new key] and write the cache on the side, so the cache update is not
                # on the layer's critical path and the delegate sees one chain per layer.
                idx = torch.arange(kc.shape[2])
                cached = (idx < visual_len[i]) | ((idx >= seen) & (idx < slot))
                allowed = torch.cat([cached, torch.ones(1, dtype=torch.bool)])[None, :]
                keys, values = torch.cat([kc, k], dim=2), torch.cat([vc, v], dim=2)
                bias = p.bias(allowed, q.dtype)
                if p.merge and seen:  # the visual keys' log sizes, as the prefill recorded them
                    bias = bias + torch.cat([p.cache.key_bias(i)[0], torch.zeros(spec.text_capacity + 1, dtype=q.dtype)])[None]
                probs = p.attention_probs(q, keys, bias)
                kc[:, :, slot] = k
                vc[:, :, slot] = v
                h = h + layer.self_attn.o_proj(p.attend(probs, values))
            h = h + layer.mlp(p.rms_norm(layer.post_attention_layernorm, h))
        return p.logits(h[:, -1])


class VisionEncoder(nn.Module):
    """CLIP tower -> the configured feature layer(s) -> LLaVA's projector: [1, N, d] visual tokens."""

    def __init__(self, adapter: Any):
        super().__init__()
        self.tower = adapter.model.model.vision_tower
        self.projector = adapter.model.model.multi_modal_projector
        self.feature_layer = adapter.config.vision_feature_layer
        self.strategy = adapter.config.vision_feature_select_strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        states = self.tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        picked = [states[i][:, 1:] if self.strategy == "default" else states[i] for i in layers]
        return self.projector(torch.cat(picked, dim=-1))


class TokenEmbedding(nn.Module):
    def __init__(self, parts: DecoderParts):
        super().__init__()
        self.parts = parts

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.parts.embed_tokens(ids)


# ---- conversion -------------------------------------------------------------------------------------
def build_spec(adapter: Any, recipe: Recipe, options: ConvertOptions) -> ProgramSpec:
    """The static facts of the program: token counts per layer, cache capacities, method layout."""
    shape = adapter.shape
    if shape.is_llava_next:
        raise ModelError(
            "LLaVA-NeXT's visual-token count depends on each image's size, but an ExecuTorch program needs "
            "static visual counts; convert a LLaVA (fixed grid) checkpoint, or use the GGUF converter"
        )
    n = shape.num_visual_tokens
    kept = recipe.keep_counts(n)
    n_in = recipe.input_count(n)
    seen = [n_in, *kept[:-1]]
    exit_layers = sorted(recipe.exit.layers) if recipe.exit is not None else []
    # An exit decision must reach the runtime between layers: a segment ends after every candidate layer.
    after_exits = {layer + 1 for layer in exit_layers if layer + 1 < shape.num_layers}
    cuts = sorted(set(options.segment_boundaries) | after_exits)
    bounds = [0, *cuts, shape.num_layers]
    frozen = recipe.exit is not None and recipe.exit.frozen
    # a frozen exit after l leaves kept[l] visual keys in every later layer's cache
    slots = [max([s, *(kept[layer] for layer in exit_layers if layer < i)]) for i, s in enumerate(seen)] if frozen else []
    tok = adapter.processor.tokenizer
    eos = sorted(adapter.eos_token_ids)
    return ProgramSpec(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        vocab_size=int(adapter.lm_head.out_features),
        num_visual_tokens=n,
        input_visual_tokens=n_in,
        seen=seen,
        kept=kept,
        skip_attention=sorted(recipe.skip_attention),
        max_prompt_tokens=options.max_prompt_tokens,
        max_new_tokens=options.max_new_tokens,
        image_token_id=adapter.image_token_id,
        eos_token_ids=eos,
        pad_token_id=int(adapter.pad_token_id),
        bos_token_id=tok.bos_token_id,
        prefill_segments=[[a, b] for a, b in zip(bounds[:-1], bounds[1:])],
        layout=PROGRAM_LAYOUT,
        text_only_prefill=options.text_only_prefill,
        exit_layers=exit_layers,
        exit_threshold=recipe.exit.threshold if recipe.exit is not None else None,
        exit_lookahead=recipe.exit is not None and recipe.exit.lookahead,
        exit_frozen=frozen,
        visual_slots=slots if slots != seen else [],
        regions=recipe.prune.regions,
        merge=recipe.prune.merge,
    )


def chat_format(adapter: Any) -> ChatFormat:
    """Render the checkpoint's chat template for one user turn around a placeholder question."""
    image_text = adapter.format_prompt(_QUESTION, with_image=True)
    text_only = adapter.format_prompt(_QUESTION, with_image=False)
    image_prefix, image_suffix = image_text.split(_QUESTION)
    text_prefix, text_suffix = text_only.split(_QUESTION)
    template = getattr(adapter.processor, "chat_template", None)
    return ChatFormat(image_token="<image>", image_prefix=image_prefix, image_suffix=image_suffix,
                      text_prefix=text_prefix, text_suffix=text_suffix, template=template)


def image_config(adapter: Any) -> ImageConfig:
    """The checkpoint's CLIP processor settings; other processors are refused rather than approximated."""
    ip = adapter.processor.image_processor
    kind = type(ip).__name__
    if not kind.startswith("CLIPImageProcessor"):
        raise ModelError(
            f"image processor {kind} is not supported by the on-device preprocessing (CLIP-style "
            "resize / centre-crop / normalise only)"
        )
    if "Pil" not in kind:
        warnings.warn(
            f"{kind} resizes with torchvision; the device resizes with Pillow (the PIL backend), which can "
            "differ by a grey level on images that need resizing", stacklevel=2)
    size, crop = ip.size, ip.crop_size

    def get(obj: Any, key: str) -> Any:
        return obj[key] if isinstance(obj, dict) else getattr(obj, key)

    vis = adapter.vision_config
    return ImageConfig(
        image_size=vis.image_size, patch_size=vis.patch_size,
        do_resize=bool(ip.do_resize), shortest_edge=int(get(size, "shortest_edge")),
        resample=int(ip.resample),
        do_center_crop=bool(ip.do_center_crop), crop_height=int(get(crop, "height")),
        crop_width=int(get(crop, "width")), do_rescale=bool(ip.do_rescale),
        rescale_factor=float(ip.rescale_factor),
        do_normalize=bool(ip.do_normalize), image_mean=tuple(float(x) for x in ip.image_mean),
        image_std=tuple(float(x) for x in ip.image_std),
    )


def quantize_language_model(adapter: Any, quant: str, group_size: int) -> list[str]:
    """torchao quantization of the language model's linear layers (lm_head included); returns skipped layers.

    8da4w: int8 dynamic activations, int4 weights in groups of `group_size` (XNNPACK's qd8-f32-qb4w),
    with HQQ-chosen scales: on the benchmark model they kept the fp32 answer on 98.8% of 500
    calibration items against 97.8% with torchao's default affine scales, and the keep-all .pte went
    from -1.2 to -0.4 points on the test split (benchmarks/quant_sensitivity.py).
    int8: int8 weights per output channel with dynamically quantized int8 activations (XNNPACK's
    qd8-f32-qc8w). Not weight-only, as issue 6 words it: with torchao 0.18 and executorch 1.5.1 every
    weight-only scheme (int8 per channel or per group, int4) lowers to XNNPACK with wrong outputs, as if
    its scales were dropped (one 128 -> 384 linear: error ~3,400 where eager's is 0.009), and the
    benchmark model's int8 weight-only .pte answered 5.4% of 500 test items against fp32's 95.2%.
    Embeddings, norms and the vision tower stay float.
    """
    if quant == "none":
        return []
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.quantize_.workflows import IntxChooseQParamsAlgorithm

    skipped: list[str] = []

    def wanted(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if quant == "8da4w" and module.in_features % group_size:
            skipped.append(fqn)
            return False
        return True

    if quant == "8da4w":
        config = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(group_size),
            intx_choose_qparams_algorithm=IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY)
    else:
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    holder = nn.ModuleDict({"layers": adapter.language_model.layers, "lm_head": adapter.lm_head})
    quantize_(holder, config, filter_fn=wanted)
    if skipped:
        log.warning("left %d linear layers unquantized (in_features not a multiple of %d): %s",
                    len(skipped), group_size, ", ".join(skipped[:4]))
    return skipped


def partitioners(options: ConvertOptions) -> list[Any]:
    """The backend's ExecuTorch partitioner(s); QNN needs Qualcomm's SDK and says so."""
    if options.backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return [XnnpackPartitioner()]
    if options.backend == "vulkan":
        from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner

        # The text length is dynamic: take only ops whose Vulkan kernels can resize (as ExecuTorch's LLM export).
        return [VulkanPartitioner({"require_dynamic_shapes": True})]
    if options.backend == "coreml":
        from executorch.backends.apple.coreml.compiler.coreml_preprocess import (
            MULTIMETHOD_WEIGHT_SHARING_STRATEGY,
            CoreMLBackend,
        )
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner

        # Our methods split into different partition counts, so Core ML's positional weight sharing
        # across methods does not apply; each method's partitions are compiled on their own.
        import coremltools as ct

        # The KV cache is a mutable buffer, i.e. Core ML "state", which needs iOS 18 / macOS 15.
        # coremltools 9's fuse_linear_bias pass crashes on the RMSNorm's mean (a linear to one output)
        # plus its scalar eps ('tuple index out of range'); run its default pipeline without that pass.
        passes = [name for name in ct.PassPipeline.DEFAULT.passes if name != "common::fuse_linear_bias"]
        specs = CoreMLBackend.generate_compile_specs(minimum_deployment_target=ct.target.iOS18, pass_names=passes)
        specs.append(CoreMLBackend.generate_multimethod_weight_sharing_strategy_compile_spec(
            MULTIMETHOD_WEIGHT_SHARING_STRATEGY.DISABLED))
        return [CoreMLPartitioner(compile_specs=specs)]
    return [qnn_partitioner(options.qnn_soc)]


def qnn_sdk_root() -> Path:
    """Qualcomm's QNN SDK (QAIRT) location, or an error saying how to get it."""
    root = os.environ.get("QNN_SDK_ROOT")
    host = "x86_64-linux-clang"
    if not root or not (Path(root) / "lib" / host / "libQnnHtp.so").is_file():
        found = f"QNN_SDK_ROOT={root!r} has no lib/{host}/libQnnHtp.so" if root else "QNN_SDK_ROOT is not set"
        raise ArtifactError(
            f"--backend qnn needs Qualcomm's QNN SDK (QAIRT) on this machine, and {found}. Download the "
            "Qualcomm AI Runtime SDK (QAIRT 2.37 or newer) from https://softwarecenter.qualcomm.com "
            "(or qpm-cli --install qualcomm_ai_engine_direct), unpack it, then "
            "`export QNN_SDK_ROOT=/path/to/qairt/<version>` and "
            f"`export LD_LIBRARY_PATH=$QNN_SDK_ROOT/lib/{host}:$LD_LIBRARY_PATH`, and re-run the convert"
        )
    return Path(root)


def qnn_partitioner(soc: str) -> Any:
    qnn_sdk_root()
    from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner
    from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset
    from executorch.backends.qualcomm.utils.utils import (
        generate_htp_compiler_spec,
        generate_qnn_executorch_compiler_spec,
    )

    try:
        chipset = getattr(QcomChipset, soc)
    except AttributeError as exc:
        raise ArtifactError(f"--qnn-soc {soc!r} is unknown; e.g. SM8650, SM8550, SM8450") from exc
    specs = generate_qnn_executorch_compiler_spec(
        soc_model=chipset, backend_options=generate_htp_compiler_spec(use_fp16=True))
    return QnnPartitioner(specs)


def _examples(spec: ProgramSpec, adapter: Any) -> dict[str, tuple[tuple[Any, ...], Any]]:
    """Example inputs and dynamic shapes per method (the text length is the only dynamic dimension)."""
    from torch.export import Dim

    d = spec.hidden_size
    size = adapter.vision_config.image_size
    t_example = min(12, spec.max_prompt_tokens)
    text = Dim.DYNAMIC(min=2, max=spec.max_prompt_tokens)
    dtype = adapter.embed_tokens.weight.dtype
    text_embeds = torch.randn(1, t_example, d, dtype=dtype)
    start = torch.tensor([3])
    out: dict[str, tuple[tuple[Any, ...], Any]] = {
        VISION: ((torch.randn(1, 3, size, size, dtype=dtype),), None),
        EMBED: ((torch.zeros(1, t_example, dtype=torch.long),), ({1: text},)),
        PREFILL_TEXT: ((text_embeds,), ({1: text},)),
        DECODE: ((torch.tensor([[1]]), torch.tensor([t_example]), torch.tensor([t_example]),
                  torch.tensor(spec.seen, dtype=torch.long)), None),
    }
    for layer, name in exit_method_names(spec).items():
        if spec.exit_frozen:  # (x_text, x_frozen, pos_frozen[, size_frozen], image_start)
            n = spec.kept[layer]
            sizes = (torch.ones(1, n),) if spec.merge else ()
            out[name] = ((text_embeds, torch.randn(1, n, d, dtype=dtype), torch.arange(n)[None] + 3, *sizes, start),
                         ({1: text}, None, None, *(None,) * len(sizes), None))
        else:
            out[name] = ((text_embeds, start), ({1: text}, None))
    for k, (a, b) in enumerate(spec.prefill_segments):
        name = prefill_method_names(spec)[k]
        if a == 0:
            args = (text_embeds, torch.randn(1, spec.num_visual_tokens, d, dtype=dtype), start)
            dyn = ({1: text}, None, None)
        else:
            n = spec.kept[a - 1]
            sizes = (torch.ones(1, n),) if spec.merge else ()
            args = (text_embeds, torch.randn(1, n, d, dtype=dtype), torch.arange(n)[None] + 3, *sizes, start)
            dyn = ({1: text}, None, None, *(None,) * len(sizes), None)
        out[name] = (args, dyn)
    return out


def export_methods(adapter: Any, recipe: Recipe, spec: ProgramSpec, progress: bool = True,
                   guides: nn.Module | None = None, router: nn.Module | None = None) -> dict[str, Any]:
    """torch.export every method of the program (weights and KV cache shared by FQN)."""
    from tqdm import tqdm

    parts = DecoderParts(adapter, recipe, spec, guides, router).eval().requires_grad_(False)
    modules: dict[str, nn.Module] = {VISION: VisionEncoder(adapter), EMBED: TokenEmbedding(parts),
                                     DECODE: Decode(parts)}
    if spec.text_only_prefill:
        modules[PREFILL_TEXT] = Prefill(parts, 0, spec.num_layers, mode="text")
    for name, (a, b) in zip(prefill_method_names(spec), spec.prefill_segments):
        modules[name] = Prefill(parts, a, b)
    for layer, name in exit_method_names(spec).items():
        modules[name] = Prefill(parts, layer + 1, spec.num_layers, mode="exited")
    examples = _examples(spec, adapter)
    exported = {}
    with torch.no_grad():
        for name in tqdm(list(modules), desc="export", disable=not progress):
            args, dynamic = examples[name]
            if isinstance(modules[name], Prefill) and dynamic is not None:
                dynamic = (dynamic,)  # Prefill.forward takes *args: its inputs form one tuple
            exported[name] = torch.export.export(modules[name].eval(), args, dynamic_shapes=dynamic,
                                                 strict=False)
    return exported


def lower(exported: dict[str, Any], options: ConvertOptions) -> tuple[bytes, DelegationSummary]:
    """to_edge + the backend's partitioner + serialisation; returns (.pte bytes, delegation summary)."""
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    edge = to_edge_transform_and_lower(
        exported, partitioner=partitioners(options),
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
    )
    methods = {}
    for name in exported:
        info = get_delegation_info(edge.exported_program(name).graph_module)
        leftover = sorted(
            ((op, b.non_delegated) for op, b in info.delegation_by_operator.items() if b.non_delegated),
            key=lambda kv: -kv[1],
        )
        methods[name] = MethodDelegation(
            delegated_nodes=info.num_delegated_nodes, non_delegated_nodes=info.num_non_delegated_nodes,
            delegated_subgraphs=info.num_delegated_subgraphs, top_non_delegated=dict(leftover[:8]),
        )
    program = edge.to_executorch(ExecutorchBackendConfig(
        memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
        emit_mutable_buffer_names=True,
    ))
    return program.buffer, DelegationSummary(backend=options.backend, methods=methods)


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import edge_prune

    out = {"edge_prune": edge_prune.__version__, "python": platform.python_version()}
    for pkg in ("torch", "executorch", "torchao", "transformers", "tokenizers", "coremltools"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def convert(model_dir: str | Path, recipe: Recipe | str | Path | None, output: str | Path,
            options: ConvertOptions | None = None) -> ConvertResult:
    """Checkpoint + recipe -> artifact directory (manifest, recipe, config, model.pte, tokenizer, preprocessing)."""
    import time

    from tqdm import tqdm

    from edge_prune.engine import PrunedEngine

    options = options or ConvertOptions()
    start = time.perf_counter()
    if options.backend == "qnn":
        qnn_sdk_root()  # fail before minutes of export
    if recipe is not None and not isinstance(recipe, Recipe):
        recipe = Recipe.load(recipe)
    engine = PrunedEngine.load(model_dir, recipe=recipe)  # validates the recipe against the model
    adapter, recipe = engine.adapter, engine.recipe
    options.check(adapter.num_layers)
    spec = build_spec(adapter, recipe, options)
    with ArtifactWriter(output, overwrite=options.overwrite) as art:
        steps = tqdm(total=4, desc=f"convert ({options.backend}, {options.quant})",
                     disable=not options.progress)
        # a copy: saving re-points a recipe at its new folder, and this one is the caller's (and the temp dir goes)
        replace(recipe).save(art.path(RECIPE_FILE))  # copies guide / router files beside it
        art.write_json(PREPROCESS_FILE, image_config(adapter).to_dict())
        art.write_json(CHAT_FILE, chat_format(adapter).to_dict())
        adapter.processor.tokenizer.backend_tokenizer.save(str(art.path(TOKENIZER_FILE)))
        # The checkpoint's config lets `edge-prune profile ARTIFACT` predict, not only measure.
        art.copy_file(CONFIG_FILE, Path(model_dir) / CONFIG_FILE)
        steps.update()
        unquantized = quantize_language_model(adapter, options.quant, options.group_size)
        steps.update()
        exported = export_methods(adapter, recipe, spec, progress=options.progress, guides=engine.guides,
                                  router=engine.router)
        steps.update()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pte, delegation = lower(exported, options)
        art.write_bytes(PTE_FILE, pte)
        steps.update()
        steps.close()
        extra = {"program": spec.to_dict(), "delegation": delegation.to_dict(),
                 "quant": {"scheme": options.quant,
                           "group_size": options.group_size if options.quant == "8da4w" else None,
                           "unquantized_linears": unquantized}}
        art.commit(backend=options.backend, quant=options.quant, versions=tool_versions(), extra=extra)
    return ConvertResult(path=Path(output), spec=spec, delegation=delegation, pte_bytes=len(pte),
                         seconds=time.perf_counter() - start)

