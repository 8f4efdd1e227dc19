"""Visual-token importance scorers used at a pruning layer.

Scorers never materialise a full (heads x n x n) attention map: they compute only the query
rows they need, a chunk of rows at a time, so memory stays O(heads * chunk * n) while the
layer's own output still comes from fused SDPA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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


def attention_rows(ctx: ScoreContext, rows: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the query rows `rows` ([B, c] token indices) over all keys: [B, H, c, T]."""
    b, h, t, hd = ctx.query.shape
    idx = rows[:, None, :, None].expand(b, h, rows.shape[1], hd)
    q = torch.gather(ctx.query, 2, idx)
    k = ctx.key
    if k.shape[1] != h:  # grouped-query attention: each kv head serves h / kvh query heads
        k = k.repeat_interleave(h // k.shape[1], dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * ctx.scaling
    key_pos = torch.arange(t, device=q.device)
    allowed = (key_pos[None, None, :] <= rows[:, :, None]) & ctx.valid[:, None, :]  # causal + padding
    logits = logits.masked_fill(~allowed[:, None], torch.finfo(logits.dtype).min)
    return torch.softmax(logits.float(), dim=-1)


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
    b, _, t, _ = ctx.query.shape
    cross = torch.zeros(b, t, device=ctx.query.device)
    self_ = torch.zeros(b, t, device=ctx.query.device)
    cross_rows = ctx.text_after & ctx.valid
    self_rows = ctx.visual & ctx.valid
    needed = cross_rows | self_rows
    positions = torch.arange(t, device=ctx.query.device)
    for start in range(0, t, ctx.chunk):
        sl = slice(start, min(start + ctx.chunk, t))
        if not needed[:, sl].any():
            continue
        rows = positions[sl].expand(b, -1)
        head_max = attention_rows(ctx, rows).amax(dim=1)  # [B, c, T]
        cross += (head_max * cross_rows[:, sl, None]).sum(1)
        self_ += (head_max * self_rows[:, sl, None]).sum(1)
    cross = cross / cross_rows.sum(1, keepdim=True).clamp(min=1)
    self_ = self_ / self_rows.sum(1, keepdim=True).clamp(min=1)
    return cross, self_


def fitprune_scores(ctx: ScoreContext) -> torch.Tensor:
    """FitPrune's inference score: cross x self. [B, T]"""
    cross, self_ = fitprune_components(ctx)
    # A prompt that ends with the image has no cross rows; fall back to the self score alone.
    has_cross = (ctx.text_after & ctx.valid).any(1, keepdim=True)
    return torch.where(has_cross, cross * self_, self_)


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


def select_visual(scores: torch.Tensor, visual: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Mask of visual tokens to keep: per sample the `counts[b]` best, ties to the earlier token."""
    masked = scores.float().masked_fill(~visual, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(visual)
    for b, k in enumerate(counts):
        keep[b, order[b, :k]] = True
    return keep & visual


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
