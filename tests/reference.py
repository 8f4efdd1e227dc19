"""An independent, slow reference of recipe semantics for tests.

It keeps every token in the sequence at every layer and removes dropped tokens by masking
them out as keys, computes full attention maps eagerly, and scores from those full maps.
It shares no code with edge_prune.engine beyond the model weights.
"""

from __future__ import annotations

import torch

from edge_prune.models.adapter import LlavaAdapter, PreparedBatch
from edge_prune.recipe import Recipe


def _rope(adapter: LlavaAdapter, q, k, x, positions):
    cos, sin = adapter.rotary_emb(x, positions)
    cos, sin = cos[:, None], sin[:, None]

    def rot(t):
        half = t.shape[-1] // 2
        return torch.cat([-t[..., half:], t[..., :half]], dim=-1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _scores(kind: str, probs: torch.Tensor, visual: torch.Tensor, text_after: torch.Tensor,
            valid_query: torch.Tensor, seed: int, layer: int, combine: str = "product") -> torch.Tensor:
    """probs: full attention [H, T, T] of one sample; visual/text_after/valid_query: [T] masks."""
    t = probs.shape[-1]
    if kind == "fastv":
        last = int(valid_query.nonzero()[-1, 0])
        return probs[:, last, :].mean(0)
    if kind == "fitprune":
        hm = probs.max(dim=0).values  # [T, T] head-max map
        cross = hm[text_after].sum(0)
        self_ = hm[visual].sum(0) / max(int(visual.sum()), 1)
        if not bool(text_after.any()):
            return self_
        if combine == "either":  # the larger of the two, each relative to its mean over the visual tokens
            return torch.maximum(cross / cross[visual].mean(), self_ / self_[visual].mean())
        return cross * self_
    if kind == "random":
        x = (torch.arange(t) * 2654435761 + seed * 97531 + layer * 7919) % 2**32
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) % 2**32
        return (x ^ (x >> 16)).double().div(2**32).float()
    raise ValueError(kind)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _guide_scores(w: dict, j: int, rank: int, h: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """LVPruning-style guide from raw tensors: visual queries over the question's text. h: [T, d]."""
    x = _rms(h)
    q = x @ w["wq"][j].T
    if not bool(text.any()):
        ctx = torch.zeros_like(q)
    else:
        k, v = x[text] @ w["wk"][j].T, x[text] @ w["wv"][j].T
        ctx = torch.softmax(q @ k.T / rank**0.5, -1) @ v
    return torch.nn.functional.gelu(q + ctx) @ w["w_out"][j] + w["b_out"][j]


def _router_prob(w: dict, j: int, h: torch.Tensor, text: torch.Tensor, last: int) -> float:
    """DyVTE-style exit probability from raw tensors: [mean text state, last prompt state]."""
    f = torch.cat([_rms(h[text].mean(0)), _rms(h[last])])
    z = torch.nn.functional.gelu(w["w1"] @ f + w["b1"] + w["layer_embed"][j])
    return float(torch.sigmoid(z @ w["w2"] + w["layer_bias"][j]))


@torch.no_grad()
def reference_logits(adapter: LlavaAdapter, recipe: Recipe, batch: PreparedBatch, steps: int = 1,
                     guides: dict | None = None, router: dict | None = None, return_exits: bool = False):
    """Greedy-decode `steps` tokens by full recomputation; returns (list of [B, vocab] logits, alive per layer).

    `guides` / `router` are the raw tensors of the recipe's module files (safetensors.torch.load_file);
    with return_exits the exit layer of every request is returned as a third value.
    """
    feats = adapter.image_features(batch)
    embeds, visual_all = adapter.embed(batch, feats)
    out_logits = []
    tokens_so_far: list[list[int]] = [[] for _ in range(embeds.shape[0])]
    per_layer_alive = None
    exits: list[int | None] = []
    for step in range(steps):
        logits_rows = []
        alive_rows = []
        exits = []
        for b in range(embeds.shape[0]):
            real = batch.attention_mask[b].bool()
            e = embeds[b][real]
            vis = visual_all[b][real]
            n_vis = int(vis.sum())
            if tokens_so_far[b]:
                extra = adapter.embed_tokens(torch.tensor(tokens_so_far[b]))
                e = torch.cat([e, extra])
                vis = torch.cat([vis, torch.zeros(len(extra), dtype=torch.bool)])
            n_prompt = int(real.sum())
            t = e.shape[0]
            positions = torch.arange(t)[None]
            text_after = torch.zeros(t, dtype=torch.bool)
            if n_vis:
                text_after[int(vis.nonzero()[-1, 0]) + 1:n_prompt] = True
            counts = recipe.keep_counts(n_vis) if n_vis else [0] * adapter.num_layers
            alive = torch.ones(t, dtype=torch.bool)
            alive_log = []
            exit_layer = None
            frozen = torch.zeros(t, dtype=torch.bool)  # recipe exit.frozen: keys and values only, never updated
            frozen_state = None
            h = e[None]
            for i, layer in enumerate(adapter.layers):
                attn = layer.self_attn
                x = layer.input_layernorm(h)
                q = attn.q_proj(x).view(1, t, -1, attn.head_dim).transpose(1, 2)
                k = attn.k_proj(x).view(1, t, -1, attn.head_dim).transpose(1, 2)
                v = attn.v_proj(x).view(1, t, -1, attn.head_dim).transpose(1, 2)
                q, k = _rope(adapter, q, k, x, positions)
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
                w = (q @ k.transpose(-1, -2)) * attn.scaling
                mask = torch.tril(torch.ones(t, t, dtype=torch.bool)) & alive[None, :]
                w = w.masked_fill(~mask, float("-inf"))
                probs = torch.softmax(w.float(), -1)[0]  # [H, T, T]
                o = (probs[None] @ v).transpose(1, 2).reshape(1, t, -1)
                h = h + attn.o_proj(o)
                if frozen_state is not None:
                    h[0, frozen] = frozen_state
                present = alive & vis & ~frozen
                alive_log.append(int(present.sum()))
                target = counts[i]
                if target < int(present.sum()):
                    # Scores are computed from prompt-time attention, over the prompt only.
                    if recipe.prune.scorer == "guide":
                        g = recipe.prune.guides
                        sc = _guide_scores(guides, g.layers.index(i), g.rank, h[0, :n_prompt], text_after[:n_prompt])
                    else:
                        sc = _scores(recipe.prune.scorer, probs[:, :n_prompt, :n_prompt], present[:n_prompt],
                                     text_after[:n_prompt], alive[:n_prompt], recipe.prune.seed, i,
                                     recipe.prune.fitprune_combine)
                    sc = sc.masked_fill(~present[:n_prompt], float("-inf"))
                    order = torch.sort(sc, descending=True, stable=True).indices
                    keep = torch.zeros(t, dtype=torch.bool)
                    keep[order[:target]] = True
                    alive = alive & (~vis | keep)
                before_mlp = h
                h = h + layer.mlp(layer.post_attention_layernorm(h))
                if frozen_state is not None:
                    h[0, frozen] = frozen_state
                e = recipe.exit
                if (e is not None and i in e.layers and exit_layer is None and bool((alive & vis & ~frozen).any())
                        and bool(text_after.any())):
                    p = _router_prob(router, e.layers.index(i), h[0], text_after, n_prompt - 1)
                    if p >= e.threshold and e.threshold < 1.0:  # 1.0: never
                        exit_layer = i
                        if e.frozen:  # the present visual tokens stay, at their states before this MLP
                            frozen = alive & vis
                            frozen_state = before_mlp[0, frozen]
                            h[0, frozen] = frozen_state
                        else:
                            alive = alive & ~vis
                        counts = [c if k < i else 0 for k, c in enumerate(counts)]
            logits_rows.append(adapter.lm_head(adapter.final_norm(h[0, -1])).float())
            alive_rows.append(alive_log)
            exits.append(exit_layer)
        logits = torch.stack(logits_rows)
        out_logits.append(logits)
        per_layer_alive = alive_rows
        for b, tok in enumerate(logits.argmax(-1).tolist()):
            tokens_so_far[b].append(tok)
    if return_exits:
        return out_logits, per_layer_alive, exits
    return out_logits, per_layer_alive
