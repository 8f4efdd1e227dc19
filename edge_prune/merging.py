"""Merging dropped visual tokens into the kept ones (recipe field `prune.merge`).

A plain drop removes a token's share of every later softmax. A model that reads something as an
average over the image (how many cells are occupied, how much of it is red) then reads a different
average from the tokens that remain. Merging keeps the averages: each dropped visual token joins the
kept visual token whose state is most similar to its own (cosine, on the states after the attention
that ranked them), the kept token's state becomes the size-weighted mean of its group, and every
later attention adds log(size) to that key's logits, so a key standing for s tokens weighs as much as
s copies of it (ToMe's proportional attention, Bolya et al. 2023). The KV cache keeps the log sizes,
so decoding attends exactly as the prefill did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def merge_into_kept(hidden: torch.Tensor, size: torch.Tensor, visual: torch.Tensor,
                    keep_visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(states, sizes) after merging each request's dropped visual tokens into its most similar kept one.

    hidden [B, T, d]; size [B, T] tokens each entry stands for; visual / keep_visual [B, T] masks.
    Only kept visual tokens change; dropped ones are left as they were (the caller removes them). A
    request that keeps no visual token (an exit) has nothing to merge into and is left unchanged.
    """
    hidden, size = hidden.clone(), size.clone()
    for b in range(hidden.shape[0]):
        kept = (visual[b] & keep_visual[b]).nonzero()[:, 0]
        dropped = (visual[b] & ~keep_visual[b]).nonzero()[:, 0]
        if len(kept) == 0 or len(dropped) == 0:
            continue
        states = hidden[b].float()
        similarity = F.normalize(states[dropped], dim=-1) @ F.normalize(states[kept], dim=-1).T
        target = similarity.argmax(1)  # position in `kept` of each dropped token's partner
        weight = size[b, dropped]
        total = size[b, kept].index_add(0, target, weight)
        summed = (states[kept] * size[b, kept, None]).index_add(0, target, states[dropped] * weight[:, None])
        hidden[b, kept] = (summed / total[:, None]).to(hidden.dtype)
        size[b, kept] = total
    return hidden, size
