"""Visual-token importance scorers used at a pruning layer.

Scorers never materialise a full (heads x n x n) attention map: they compute only the query
rows they need, a chunk of rows at a time, so memory stays O(heads * chunk * n). FastV needs one
row, beside the layer's fused SDPA; FitPrune needs nearly all rows, so a layer it scores computes
its own output from the same chunked probabilities (fitprune_attention) instead.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_prune.errors import RecipeError
from edge_prune.recipe import ModelSignature, router_inputs

DEFAULT_CHUNK = 64


@dataclass
class ScoreContext:
    """What a scorer may look at in the layer where tokens are dropped (the current working set)."""

    layer: int
    query: torch.Tensor  # [B, H, T, hd], after RoPE
    key: torch.Tensor  # [B, KVH, T, hd], after RoPE
    scaling: float
    valid: torch.Tensor  # [B, T] real (non-padding) tokens
    visual: torch.Tensor  # [B, T] visual tokens still present
    text_after: torch.Tensor  # [B, T] text tokens after the image (FitPrune's "cross" rows)
    positions: torch.Tensor  # [B, T] original position ids
    seed: int = 0
    chunk: int = DEFAULT_CHUNK
    hidden: torch.Tensor | None = None  # [B, T, d] states after the layer's attention (learned scorers)
    fitprune_combine: str = "product"  # see edge_prune.recipe.FITPRUNE_COMBINES
    key_bias: torch.Tensor | None = None  # [B, T] log of the tokens each key stands for (merged recipes)
    grid_index: torch.Tensor | None = None  # [B, T] visual tokens' patch numbers, else -1 (for score hooks)


def attention_rows(ctx: ScoreContext, rows: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the query rows `rows` ([B, c] token indices) over all keys: [B, H, c, T]."""
    b, h, t, hd = ctx.query.shape
    idx = rows[:, None, :, None].expand(b, h, rows.shape[1], hd)
    q = torch.gather(ctx.query, 2, idx)
    k = _per_query_head(ctx.key, h)
    # In place where possible: a chunk's [B, H, c, T] logits are the largest tensors scoring makes.
    logits = torch.matmul(q, k.transpose(-1, -2)).float().mul_(ctx.scaling)
    if ctx.key_bias is not None:
        logits.add_(ctx.key_bias[:, None, None, :])
    key_pos = torch.arange(t, device=q.device)
    allowed = (key_pos[None, None, :] <= rows[:, :, None]) & ctx.valid[:, None, :]  # causal + padding
    logits.masked_fill_(~allowed[:, None], torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1)


def fastv_scores(ctx: ScoreContext) -> torch.Tensor:
    """FastV: attention the last prompt token pays each token, mean over heads. [B, T]"""
    last = (ctx.valid.long().cumsum(1) * ctx.valid).argmax(1)  # index of the last real token
    probs = attention_rows(ctx, last[:, None])  # [B, H, 1, T]
    return probs.mean(dim=1)[:, 0]


def fitprune_components(ctx: ScoreContext) -> tuple[torch.Tensor, torch.Tensor]:
    """FitPrune's per-token attention mass, head-max: (cross, self), each [B, T].

    cross = attention a token receives from the text after the image, per such text row;
    self = attention it receives from the visual tokens, per visual token.
    """
    cross, self_, _ = _fitprune_pass(ctx, None)
    return cross, self_


def fitprune_scores(ctx: ScoreContext) -> torch.Tensor:
    """FitPrune's inference score: cross x self. [B, T]"""
    return fitprune_combine(ctx, *fitprune_components(ctx))


def fitprune_attention(ctx: ScoreContext, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's attention output [B, H, T, hd] for `value` [B, KVH, T, hd], and FitPrune's (cross, self).

    One pass over the probabilities serves both, so a layer that FitPrune scores computes its
    attention once instead of once in the fused kernel and again, row by row, to score (the second
    pass cost as much as the layer's attention itself).
    """
    cross, self_, out = _fitprune_pass(ctx, value)
    assert out is not None
    return out, cross, self_


def fitprune_combine(ctx: ScoreContext, cross: torch.Tensor, self_: torch.Tensor) -> torch.Tensor:
    """cross x self ("product") or the larger of the two over their means ("either", see
    recipe.FITPRUNE_COMBINES); a prompt that ends with the image has no cross rows, and scores by self alone."""
    has_cross = (ctx.text_after & ctx.valid).any(1, keepdim=True)
    if ctx.fitprune_combine == "either":
        visual = (ctx.visual & ctx.valid).float()
        n = visual.sum(1, keepdim=True).clamp(min=1)

        def over_mean(x: torch.Tensor) -> torch.Tensor:
            return x / ((x * visual).sum(1, keepdim=True) / n).clamp(min=torch.finfo(x.dtype).tiny)

        combined = torch.maximum(over_mean(cross), over_mean(self_))
    else:
        combined = cross * self_
    return torch.where(has_cross, combined, self_)


def _fitprune_pass(ctx: ScoreContext, value: torch.Tensor | None):
    """(cross, self, attention output or None), chunk by chunk of query rows: no full [T, T] map.

    Causal attention lets rows [s, e) see keys [0, e) only, so each chunk works on those keys
    (half the work of all T on average) and masks just its diagonal block (and padding, if any).
    """
    b, h, t, _ = ctx.query.shape
    cross = torch.zeros(b, t, device=ctx.query.device)
    self_ = torch.zeros(b, t, device=ctx.query.device)
    cross_rows = ctx.text_after & ctx.valid
    self_rows = ctx.visual & ctx.valid
    needed = cross_rows | self_rows
    key = _per_query_head(ctx.key, h)  # expanded once, not per chunk
    out = None
    if value is not None:
        out = ctx.query.new_empty(b, h, t, value.shape[-1])
        value = _per_query_head(value, h)
    padded = not bool(ctx.valid.all())
    low = torch.finfo(torch.float32).min
    for start in range(0, t, ctx.chunk):
        end = min(start + ctx.chunk, t)
        if out is None and not needed[:, start:end].any():
            continue
        logits = torch.matmul(ctx.query[:, :, start:end], key[:, :, :end].transpose(-1, -2)).float().mul_(ctx.scaling)
        if ctx.key_bias is not None:
            logits.add_(ctx.key_bias[:, None, None, :end])
        diagonal = torch.ones(end - start, end - start, dtype=torch.bool, device=logits.device).tril_()
        logits[..., start:].masked_fill_(~diagonal, low)
        if padded:
            logits.masked_fill_(~ctx.valid[:, None, None, :end], low)
        # softmax in place: a second [B, H, c, end] buffer would be the pass's largest allocation
        probs = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
        probs.div_(probs.sum(dim=-1, keepdim=True))
        if out is not None:
            out[:, :, start:end] = torch.matmul(probs.to(value.dtype), value[:, :, :end])
        head_max = probs.amax(dim=1)  # [B, c, end]
        # sums over the chunk's cross (text) and self (visual) query rows, without [B, c, end] products
        cross[:, :end] += torch.bmm(cross_rows[:, None, start:end].float(), head_max)[:, 0]
        self_[:, :end] += torch.bmm(self_rows[:, None, start:end].float(), head_max)[:, 0]
    cross = cross / cross_rows.sum(1, keepdim=True).clamp(min=1)
    self_ = self_ / self_rows.sum(1, keepdim=True).clamp(min=1)
    return cross, self_, out


def _per_query_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query attention: each kv head serves heads / kv_heads query heads."""
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def random_scores(ctx: ScoreContext) -> torch.Tensor:
    """Uniform random ranking keyed by (recipe seed, layer, original position).

    Keying by position rather than by slot makes the choice independent of batching,
    padding and earlier drops, so every runtime can reproduce it exactly.
    """
    return position_hash_uniform(ctx.seed, ctx.layer, ctx.positions)


def position_hash_uniform(seed: int, layer: int, positions: torch.Tensor) -> torch.Tensor:
    """A cheap integer hash of (seed, layer, position) mapped to [0, 1)."""
    x = (positions.long() * 2654435761 + seed * 97531 + layer * 7919) % 2**32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) % 2**32
    x = x ^ (x >> 16)
    return x.double().div(2**32).float()


SCORERS = {"fastv": fastv_scores, "fitprune": fitprune_scores, "random": random_scores}


def last_token_attention(query: torch.Tensor, key: torch.Tensor, scaling: float, valid: torch.Tensor,
                         key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Head-max attention of one query per request (the prompt's last token) over every key: [B, T].

    query [B, H, hd] and key [B, KVH, T, hd] after RoPE; the query comes last, so it sees every valid key.
    With `key_bias` (merged tokens' log sizes) a key weighs as the tokens it stands for, as in attention.
    """
    logits = torch.einsum("bhd,bhtd->bht", query, _per_query_head(key, query.shape[1])).float() * scaling
    if key_bias is not None:
        logits = logits + key_bias[:, None, :]
    logits = logits.masked_fill(~valid[:, None, :], torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1).amax(dim=1)


def standardised_log(scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """log(scores) shifted and scaled to mean 0, deviation 1 over each request's `present` tokens, so
    that two scores on different scales weigh the same in a sum."""
    x = torch.log(scores.float().clamp(min=1e-30))
    weight = present.float()
    n = weight.sum(1, keepdim=True).clamp(min=1)
    mean = (x * weight).sum(1, keepdim=True) / n
    std = ((((x - mean) * weight) ** 2).sum(1, keepdim=True) / n).sqrt().clamp(min=1e-4)
    return (x - mean) / std


def with_preview(scores: torch.Tensor, preview: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """A drop's ranking with a preview (recipe prune.preview_layers): FitPrune's score and the later layers'
    attention from the last token, each as a standardised log over the visual tokens present, summed."""
    return standardised_log(scores, present) + standardised_log(preview, present)


def select_visual(scores: torch.Tensor, visual: torch.Tensor, counts: list[int],
                  regions: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of visual tokens to keep: per sample the `counts[b]` best, ties to the earlier token.

    With `regions` ([B, T] region id of each visual token, see grid_regions) the ranking goes round
    robin: every region's best, then every region's second best, ... so each region keeps its share
    (floor or ceil of count / regions) of the kept tokens, the best ones first.
    """
    masked = scores.float().masked_fill(~visual, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    if regions is not None:
        region_sorted = torch.gather(regions.clamp(min=0), 1, order)
        onehot = torch.nn.functional.one_hot(region_sorted, int(regions.max()) + 1)
        rank_in_region = (onehot.cumsum(1) * onehot).sum(-1)  # 1 for a region's best, 2 for its next ...
        rank_in_region.masked_fill_(~torch.gather(visual, 1, order), torch.iinfo(rank_in_region.dtype).max)
        order = torch.gather(order, 1, torch.sort(rank_in_region, dim=1, stable=True).indices)
    keep = torch.zeros_like(visual)
    for b, k in enumerate(counts):
        keep[b, order[b, :k]] = True
    return keep & visual


def grid_regions(grid_index: torch.Tensor, n_visual: int, regions: int) -> torch.Tensor:
    """Region id (0 .. regions^2 - 1, row-major) of each token on a square grid of n_visual tokens,
    from its grid index (row-major patch number); entries outside [0, n_visual) get -1."""
    side = math.isqrt(n_visual)
    inside = (grid_index >= 0) & (grid_index < n_visual)
    g = grid_index.clamp(0, n_visual - 1)
    ids = (g // side) * regions // side * regions + (g % side) * regions // side
    return torch.where(inside, ids, torch.full_like(ids, -1))


def pool_grid(n: int, target: int) -> tuple[int, int] | None:
    """(rows, cols) for pooling a square n-token grid to `target` tokens, if a near-square grid fits."""
    side = math.isqrt(n)
    rows = math.isqrt(target)
    if side * side != n or rows == 0:
        return None
    for cols in (rows, rows + 1):
        if rows * cols == target and cols <= side:
            return rows, cols
    return None


def pool_visual(features: torch.Tensor, target: int) -> torch.Tensor:
    """Spatial average pooling of one image's visual tokens ([n, d]) down to `target` tokens.

    A square grid pooled to a square or near-square (rows x rows+1) count uses 2-D adaptive
    pooling; anything else (LLaVA-NeXT's packed tiles) pools along the token sequence.
    """
    n, d = features.shape
    if target >= n:
        return features
    x = features.float().T[None]  # [1, d, n]
    grid = pool_grid(n, target)
    if grid is not None:
        side = math.isqrt(n)
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.reshape(1, d, side, side), grid).reshape(d, target)
    else:
        pooled = torch.nn.functional.adaptive_avg_pool1d(x, target)[0]
    return pooled.T.to(features.dtype)


# ---- learned modules: LVPruning-style guides and DyVTE-style exit routers --------------------------
# Both read the decoder's hidden states through a parameter-free RMS normalisation (so they do not
# depend on the scale of one checkpoint's residual stream) and live in safetensors beside recipe.json.

GUIDES_FORMAT = "edge-prune-guides"
ROUTER_FORMAT = "edge-prune-exit-router"
MODULE_VERSION = "1"
RMS_EPS = 1e-6


def rms_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + RMS_EPS).to(x.dtype)


class GuideSet(torch.nn.Module):
    """One low-rank cross-attention guide per pruning layer: visual tokens query the prompt's text.

    For a visual token with normalised state x and text states t_j: q = Wq x, k_j = Wk t_j,
    v_j = Wv t_j (all rank r), c = softmax_j(q.k_j / sqrt r) v_j, score = w . gelu(q + c) + b.
    Higher score = keep. Parameters per guide: 3 d r + r + 1.
    """

    def __init__(self, hidden_size: int, layers: list[int], rank: int):
        super().__init__()
        self.hidden_size, self.layers, self.rank = hidden_size, list(layers), rank
        self.wq = torch.nn.Parameter(torch.empty(len(layers), rank, hidden_size))
        self.wk = torch.nn.Parameter(torch.empty(len(layers), rank, hidden_size))
        self.wv = torch.nn.Parameter(torch.empty(len(layers), rank, hidden_size))
        self.w_out = torch.nn.Parameter(torch.empty(len(layers), rank))
        self.b_out = torch.nn.Parameter(torch.zeros(len(layers)))
        self.reset_parameters()

    def reset_parameters(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for w in (self.wq, self.wk, self.wv):
                w.copy_(torch.randn(w.shape, generator=gen) / self.hidden_size**0.5)
            self.w_out.copy_(torch.randn(self.w_out.shape, generator=gen) / self.rank**0.5)
            self.b_out.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def scores(self, layer: int, hidden: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Keep scores [B, T] at decoder layer `layer` (meaningful on visual tokens only).

        hidden: [B, T, d] states after the layer's attention; text: [B, T] the prompt's text tokens
        after the image (the question), which are the keys and values.
        """
        j = self.layers.index(layer)
        x = rms_normalize(hidden).to(self.wq.dtype)
        q = x @ self.wq[j].T  # [B, T, r]
        k = x @ self.wk[j].T
        v = x @ self.wv[j].T
        logits = (q @ k.transpose(1, 2)) / self.rank**0.5  # [B, T(query), T(key)]
        logits = logits.masked_fill(~text[:, None, :], float("-inf"))
        has_text = text.any(1)[:, None, None]
        attn = torch.softmax(torch.where(has_text, logits, torch.zeros_like(logits)), dim=-1)
        context = torch.where(has_text, attn @ v, torch.zeros_like(q))
        return torch.nn.functional.gelu(q + context) @ self.w_out[j] + self.b_out[j]

    def save(self, path: str | Path, num_layers: int) -> Path:
        tensors = {"wq": self.wq, "wk": self.wk, "wv": self.wv, "w_out": self.w_out, "b_out": self.b_out}
        meta = {"format": GUIDES_FORMAT, "version": MODULE_VERSION, "hidden_size": str(self.hidden_size),
                "num_layers": str(num_layers), "layers": json.dumps(self.layers), "rank": str(self.rank)}
        return _save_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path, signature: ModelSignature, layers: list[int], rank: int) -> GuideSet:
        """Load and check the guides against the model and the recipe (RecipeError naming the file)."""
        tensors, meta = _load_safetensors(path, GUIDES_FORMAT, "guides", signature, layers, rank)
        d, n = signature.hidden_size, len(layers)
        module = cls(d, layers, rank)
        expected = {"wq": (n, rank, d), "wk": (n, rank, d), "wv": (n, rank, d), "w_out": (n, rank), "b_out": (n,)}
        _fill(module, tensors, expected, path, "guides")
        return module


# the lookahead statistics lie in [0, 1]; the RMS-normalised states beside them have entries of order 1,
# and at scale 1 the router's first layer barely used them (lab, benchmark model: 33.3% against 35.5% fewer
# held-out FLOPs at scale 3 and 35.6% at 10, at the same held-out risk)
LOOKAHEAD_SCALE = 3.0


def lookahead_statistics(logits: torch.Tensor) -> torch.Tensor:
    """[..., 3] of the exited run's next-token logits [..., vocab]: top probability, top-two margin and
    entropy / log(vocab), times LOOKAHEAD_SCALE (the router's extra inputs, recipe `exit.lookahead`)."""
    probs = logits.float().softmax(-1)
    top = probs.topk(2, -1).values
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(probs.shape[-1])
    return LOOKAHEAD_SCALE * torch.stack([top[..., 0], top[..., 0] - top[..., 1], entropy], -1)


class ExitRouter(torch.nn.Module):
    """DyVTE's exit decision, made light: one shared low-rank MLP for every candidate layer.

    Input (DyVTE): concat(mean state of the text tokens after the image, state of the last prompt
    token) at the layer's output, each RMS-normalised; with `lookahead`, also the statistics of the
    answer the exited run gives (lookahead_statistics). p_exit = sigmoid(w2 . gelu(W1 x + b1 + e_l) + c_l)
    with a per-layer embedding e_l and bias c_l. Parameters: router_parameters().
    """

    def __init__(self, hidden_size: int, layers: list[int], rank: int, lookahead: bool = False):
        super().__init__()
        self.hidden_size, self.layers, self.rank, self.lookahead = hidden_size, list(layers), rank, lookahead
        self.inputs = router_inputs(hidden_size, lookahead)
        self.w1 = torch.nn.Parameter(torch.empty(rank, self.inputs))
        self.b1 = torch.nn.Parameter(torch.zeros(rank))
        self.layer_embed = torch.nn.Parameter(torch.zeros(len(layers), rank))
        self.w2 = torch.nn.Parameter(torch.empty(rank))
        self.layer_bias = torch.nn.Parameter(torch.zeros(len(layers)))
        self.reset_parameters()

    def reset_parameters(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.w1.copy_(torch.randn(self.w1.shape, generator=gen) / self.inputs ** 0.5)
            self.w2.copy_(torch.randn(self.w2.shape, generator=gen) / self.rank**0.5)
            for p in (self.b1, self.layer_embed, self.layer_bias):
                p.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @staticmethod
    def features(text_states: torch.Tensor, text: torch.Tensor, last_state: torch.Tensor) -> torch.Tensor:
        """[B, 2d] router input from [B, T, d] states, the [B, T] text-after-image mask and [B, d] last states."""
        count = text.sum(1, keepdim=True).clamp(min=1).to(text_states.dtype)
        mean = (text_states * text[..., None].to(text_states.dtype)).sum(1) / count
        return torch.cat([rms_normalize(mean), rms_normalize(last_state)], dim=-1)

    def logits(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """[B] exit logits at decoder layer `layer` (one of self.layers)."""
        j = self.layers.index(layer)
        h = torch.nn.functional.gelu(features.to(self.w1.dtype) @ self.w1.T + self.b1 + self.layer_embed[j])
        # a linear to one output, not a matmul by the [rank] vector: the exported prefill calls this,
        # and Core ML's converter (coremltools 9) cannot type a matmul by a vector
        return torch.nn.functional.linear(h, self.w2[None], self.layer_bias[j:j + 1])[..., 0]

    def save(self, path: str | Path, num_layers: int) -> Path:
        tensors = {"w1": self.w1, "b1": self.b1, "layer_embed": self.layer_embed, "w2": self.w2,
                   "layer_bias": self.layer_bias}
        meta = {"format": ROUTER_FORMAT, "version": MODULE_VERSION, "hidden_size": str(self.hidden_size),
                "num_layers": str(num_layers), "layers": json.dumps(self.layers), "rank": str(self.rank),
                "lookahead": json.dumps(self.lookahead)}
        return _save_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path, signature: ModelSignature, layers: list[int], rank: int,
             lookahead: bool = False) -> ExitRouter:
        """Load and check the router against the model and the recipe (RecipeError naming the file)."""
        tensors, meta = _load_safetensors(path, ROUTER_FORMAT, "exit router", signature, layers, rank)
        file_lookahead = meta.get("lookahead", "false") == "true"  # files from before the option: false
        if file_lookahead != lookahead:
            reads = "reads" if file_lookahead else "does not read"
            raise RecipeError(f"{path}: the exit router {reads} the lookahead statistics, but the recipe's "
                              f"'exit.lookahead' is {json.dumps(lookahead)}; the recipe and the file do not "
                              "belong together")
        d, n = signature.hidden_size, len(layers)
        module = cls(d, layers, rank, lookahead)
        expected = {"w1": (rank, module.inputs), "b1": (rank,), "layer_embed": (n, rank), "w2": (rank,),
                    "layer_bias": (n,)}
        _fill(module, tensors, expected, path, "exit router")
        return module


def guide_parameters(hidden_size: int, n_layers: int, rank: int) -> int:
    return n_layers * (3 * hidden_size * rank + rank + 1)


def router_parameters(hidden_size: int, n_layers: int, rank: int, lookahead: bool = False) -> int:
    return router_inputs(hidden_size, lookahead) * rank + 2 * rank + n_layers * (rank + 1)


def _save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write atomically (temp file + rename): a crash never leaves a half module file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _load_safetensors(path: str | Path, fmt: str, what: str, signature: ModelSignature, layers: list[int],
                      rank: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{what} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise RecipeError(f"{path}: not a readable safetensors {what} file ({exc}); re-fit it or copy it "
                          "again") from exc
    if meta.get("format") != fmt:
        raise RecipeError(f"{path}: metadata 'format' is {meta.get('format')!r}, expected {fmt!r}; this is not "
                          f"an edge-prune {what} file")
    try:
        hidden, num_layers = int(meta["hidden_size"]), int(meta["num_layers"])
        file_layers, file_rank = json.loads(meta["layers"]), int(meta["rank"])
    except (KeyError, ValueError) as exc:
        raise RecipeError(f"{path}: metadata is incomplete or malformed ({exc}); re-fit the {what}") from exc
    problems = []
    if hidden != signature.hidden_size:
        problems.append(f"hidden size {hidden} (model has {signature.hidden_size})")
    if num_layers != signature.num_layers:
        problems.append(f"{num_layers} decoder layers (model has {signature.num_layers})")
    if problems:
        raise RecipeError(f"{path}: the {what} were trained for another model: {', '.join(problems)}; fit "
                          f"them for this checkpoint with `edge-prune fit`")
    if file_layers != list(layers) or file_rank != rank:
        raise RecipeError(f"{path}: the {what} file holds layers {file_layers} at rank {file_rank}, but the "
                          f"recipe expects layers {list(layers)} at rank {rank}; the recipe and the file do "
                          "not belong together")
    return tensors, meta


def _fill(module: torch.nn.Module, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
          path: str | Path, what: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise RecipeError(f"{path}: the {what} file lacks tensors {missing}; re-fit it")
    with torch.no_grad():
        for name, shape in expected.items():
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise RecipeError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape} for "
                                  f"this model and recipe; re-fit the {what}")
            if not torch.isfinite(t).all():
                raise RecipeError(f"{path}: tensor {name!r} holds NaN or infinite values; re-fit the {what}")
            getattr(module, name).copy_(t)
