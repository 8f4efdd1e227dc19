"""Eager reference executor of a recipe: prefill with visual-token dropping, per-layer KV caches, decode.

Semantics (ARCHITECTURE.md): layer i's attention sees the tokens that entered it and its KV
cache holds exactly those; after that attention the recipe's scorer drops visual tokens down
to round(keep_after[i] * n_visual); the MLP and every later layer see only the kept ones.
Kept tokens keep their original position ids. Text tokens are never dropped.

A recipe may carry learned modules (beside recipe.json): guides (scorer "guide") rank visual tokens
from the question's text; an exit router decides per request, after a candidate layer l, to drop
all of that request's visual tokens (its keep_after becomes 0 from layer l on); with recipe exit.frozen
they stay as keys and values at their states when they left (FrozenTokens), and nothing else is computed
for them.

Internally every sample's tokens are packed to the left of a [B, T] working set (padding
removed, order kept), with an explicit validity mask and explicit position ids, so samples of
different prompt lengths and different visual-token counts can share one batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from edge_prune.errors import InputError, RecipeError
from edge_prune.merging import merge_into_kept
from edge_prune.models.adapter import ImageInput, LlavaAdapter, PreparedBatch
from edge_prune.recipe import Recipe, router_exits
from edge_prune.runtimes.results import KeptTokens, Timings
from edge_prune.scoring import (
    SCORERS,
    ExitRouter,
    GuideSet,
    ScoreContext,
    fitprune_attention,
    fitprune_combine,
    grid_regions,
    last_token_attention,
    lookahead_statistics,
    pool_visual,
    select_visual,
    with_preview,
)

ATTENTION_SCORERS = ("fastv", "fitprune")


@dataclass
class GenerationResult:
    texts: list[str]
    tokens: list[list[int]]
    kept: list[KeptTokens]
    timings: Timings
    first_logits: torch.Tensor  # [B, vocab] logits of the prefill's last position
    prompt_lengths: list[int] = field(default_factory=list)  # prompt tokens per request, image included

    @property
    def text(self) -> str:
        return self.texts[0]


@dataclass
class WorkingSet:
    """Packed prefill state: row b holds sample b's present tokens, left-aligned, in order."""

    hidden: torch.Tensor  # [B, T, d]
    valid: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T]
    visual: torch.Tensor  # [B, T]
    text_after: torch.Tensor  # [B, T] text tokens after the image
    image_start: torch.Tensor | None = None  # [B] position of the image's first token (region-balanced drops)
    size: torch.Tensor | None = None  # [B, T] tokens each entry stands for once merged (None: one each)
    frozen: FrozenTokens | None = None  # visual tokens of requests that exited with recipe exit.frozen

    def grid_index(self) -> torch.Tensor | None:
        """[B, T] each visual token's patch number on its image's grid (-1 for other tokens), or None
        for a working set built without the image layout."""
        if self.image_start is None:
            return None
        return torch.where(self.visual, self.positions - self.image_start[:, None], -1)

    def key_bias(self) -> torch.Tensor | None:
        """Per-key attention bias of merged tokens (log size, ToMe's proportional attention), or None."""
        return None if self.size is None else self.size.clamp(min=1).log()

    def select(self, keep: torch.Tensor) -> WorkingSet:
        """Keep the tokens marked in `keep` ([B, T] subset of valid), re-packed to the left."""
        counts = keep.sum(1)
        width = int(counts.max())
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
        take = lambda x: torch.gather(x, 1, order)  # noqa: E731
        hidden = torch.gather(self.hidden, 1, order[..., None].expand(-1, -1, self.hidden.shape[-1]))
        valid = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
        return WorkingSet(
            hidden=hidden,
            valid=valid,
            positions=take(self.positions),
            visual=take(self.visual) & valid,
            text_after=take(self.text_after) & valid,
            image_start=self.image_start,
            size=None if self.size is None else take(self.size),
            frozen=self.frozen,
        )


@dataclass
class FrozenTokens:
    """Visual tokens that left the computation at an exit but stay in the context (recipe exit.frozen):
    per request, the states they had at the exit, packed to the left. Every later layer computes their
    keys and values from these states; nothing else is computed for them."""

    hidden: torch.Tensor  # [B, F, d]
    positions: torch.Tensor  # [B, F]
    valid: torch.Tensor  # [B, F]
    bias: torch.Tensor | None = None  # [B, F] log size of merged tokens (recipes with prune.merge)

    @staticmethod
    def gather(ws: WorkingSet, rows: torch.Tensor, previous: FrozenTokens | None) -> FrozenTokens:
        """`previous` (or nothing) plus the visual tokens of `ws` in the requests marked by `rows` ([B]),
        with their current states."""
        leaving = ws.select(ws.visual & ws.valid & rows[:, None])
        new = FrozenTokens(leaving.hidden, leaving.positions, leaving.valid, leaving.key_bias())
        if previous is None:
            return new
        # a request freezes once (it has no visual tokens left after), so the two sets never share a row
        return FrozenTokens(torch.cat([previous.hidden, new.hidden], 1),
                            torch.cat([previous.positions, new.positions], 1),
                            torch.cat([previous.valid, new.valid], 1),
                            _cat_bias((previous.bias, previous.valid), (new.bias, new.valid)))


def _cat_bias(*parts: tuple[torch.Tensor | None, torch.Tensor]) -> torch.Tensor | None:
    """Per-key log sizes of keys laid side by side, from (bias or None, [B, n] mask) per part: None when no
    part has any, else 0 for the parts without."""
    if all(bias is None for bias, _ in parts):
        return None
    return torch.cat([torch.zeros_like(mask, dtype=torch.float32) if bias is None else bias for bias, mask in parts], 1)


@dataclass
class LayerCache:
    key: torch.Tensor  # [B, KVH, L, hd]
    value: torch.Tensor
    valid: torch.Tensor  # [B, L]
    bias: torch.Tensor | None = None  # [B, L] log size of merged keys (recipes with prune.merge)


@dataclass
class PrefillOutput:
    logits: torch.Tensor  # [B, vocab]
    caches: list[LayerCache | None]
    next_positions: torch.Tensor  # [B] position id of the first generated token
    kept: list[KeptTokens] = field(default_factory=list)
    vision_ms: float = 0.0
    prefill_ms: float = 0.0


class PrunedEngine:
    """Runs a LLaVA checkpoint under a recipe. Without a recipe it is the unpruned model."""

    def __init__(self, adapter: LlavaAdapter, recipe: Recipe | None = None, score_chunk: int = 64,
                 guides: GuideSet | None = None, router: ExitRouter | None = None):
        """`guides`/`router` override the recipe's module files (fitters pass in-memory modules)."""
        self.adapter = adapter
        signature = adapter.signature()
        if recipe is None:
            recipe = Recipe.identity(signature)
        recipe.check_model(signature)
        self.recipe = recipe
        self.score_chunk = score_chunk
        self.guides: GuideSet | None = None
        self.router: ExitRouter | None = None
        g = recipe.prune.guides
        if g is not None:
            self.guides = guides if guides is not None else GuideSet.load(recipe.resolve(g.file), signature,
                                                                          g.layers, g.rank)
            self.guides.to(adapter.device).eval()
        e = recipe.exit
        if e is not None:
            self.router = router if router is not None else ExitRouter.load(recipe.resolve(e.router), signature,
                                                                           e.layers, e.rank, e.lookahead)
            if router is not None and router.lookahead != e.lookahead:  # a loaded file is checked by load()
                raise RecipeError(f"the exit router passed in {'reads' if self.router.lookahead else 'does not read'} "
                                  f"the lookahead statistics, but the recipe's 'exit.lookahead' is {e.lookahead}")
            self.router.to(adapter.device).eval()
        self.exit_layers = set(e.layers) if e is not None else set()
        # Optional f(features, visual_counts_per_request) -> features, for ablations.
        self.feature_hook: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None
        # Optional f(context, scores) -> scores that re-ranks a drop's visual tokens (oracle studies:
        # benchmarks/drop_ceiling.py); the recipe's schedule, regions and merging still apply.
        self.score_hook: Callable[[ScoreContext, torch.Tensor], torch.Tensor] | None = None
        self.skip = set(recipe.skip_attention)
        for i, (before, after) in enumerate(zip([recipe.prune.keep_input, *recipe.prune.keep_after],
                                                 recipe.prune.keep_after)):
            if after < before and i in self.skip and recipe.prune.scorer in ATTENTION_SCORERS:
                raise RecipeError(
                    f"recipe drops tokens at layer {i} with the attention-based scorer "
                    f"{recipe.prune.scorer!r}, but that layer's attention is skipped"
                )

    @classmethod
    def load(cls, model_dir: str | Path, recipe: Recipe | str | Path | None = None, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> PrunedEngine:
        if recipe is not None and not isinstance(recipe, Recipe):
            recipe = Recipe.load(recipe)
        return cls(LlavaAdapter.load(model_dir, device=device, dtype=dtype), recipe)

    # ---- public API -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str],
        images: ImageInput | Sequence[ImageInput] | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> GenerationResult:
        if isinstance(prompts, str):
            prompts = [prompts]
            images = None if images is None else [images]  # type: ignore[list-item]
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens is {max_new_tokens}; expected at least 1")
        batch = self.adapter.prepare(prompts, images)  # type: ignore[arg-type]
        start = time.perf_counter()
        pre = self.prefill(batch)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        pick = lambda logits: _choose(logits, do_sample, temperature, top_k, top_p, gen)  # noqa: E731
        token = pick(pre.logits)
        ttft_ms = (time.perf_counter() - start) * 1000
        out = [token]
        finished = torch.tensor([t in self.adapter.eos_token_ids for t in token.tolist()])
        positions = pre.next_positions.clone()
        decode_start = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            if bool(finished.all()):
                break
            logits = self.decode_step(pre.caches, token, positions)
            positions += 1
            token = pick(logits)
            token = torch.where(finished.to(token.device), torch.full_like(token, self.adapter.pad_token_id), token)
            finished |= torch.tensor([t in self.adapter.eos_token_ids for t in token.tolist()])
            out.append(token)
        decode_s = time.perf_counter() - decode_start
        steps = len(out) - 1
        tokens = self._trim(torch.stack(out, dim=1))
        tok = self.adapter.processor.tokenizer
        timings = Timings(
            vision_ms=pre.vision_ms, prefill_ms=pre.prefill_ms, ttft_ms=ttft_ms,
            decode_tok_s=(steps / decode_s) if steps and decode_s > 0 else 0.0,
        )
        return GenerationResult(
            texts=[tok.decode(t, skip_special_tokens=True).strip() for t in tokens],
            tokens=tokens, kept=pre.kept, timings=timings, first_logits=pre.logits,
            prompt_lengths=batch.attention_mask.sum(1).tolist(),
        )

    @torch.no_grad()
    def text_prefill(self, tokens: int) -> PrefillOutput:
        """Prefill a text-only prompt of `tokens` tokens (the pad token repeated): what the host
        profile's probe times at three lengths for the engine's own per-layer rate and fixed cost
        (predict.calibrate_host)."""
        ids = torch.full((1, tokens), self.adapter.pad_token_id, dtype=torch.long, device=self.adapter.device)
        return self.prefill(PreparedBatch(ids, torch.ones_like(ids), None, None))

    @torch.no_grad()
    def prefill(self, batch: PreparedBatch) -> PrefillOutput:
        t0 = time.perf_counter()
        features = self.adapter.image_features(batch)
        if features is not None and self.feature_hook is not None:
            counts = (batch.input_ids == self.adapter.image_token_id).sum(1).tolist()
            features = self.feature_hook(features, counts)
        t1 = time.perf_counter()
        embeds, visual = self.adapter.embed(batch, features)
        ws = self.initial_working_set(embeds, visual, batch.attention_mask.bool())
        n_visual = visual.sum(1).tolist()
        entered = ws.visual.sum(1).tolist()
        counts = [self.recipe.keep_counts(n) for n in n_visual]
        exits: list[int | None] = [None] * len(n_visual)
        caches: list[LayerCache | None] = []
        for i, layer in enumerate(self.adapter.layers):
            ws, cache = self.attend_and_drop(layer, i, ws, [c[i] for c in counts])
            caches.append(cache)
            if i in self.exit_layers:
                ws = self._mlp_and_exit(layer, i, ws, counts, exits)
                continue
            residual = ws.hidden
            ws.hidden = residual + layer.mlp(layer.post_attention_layernorm(ws.hidden))
        last = ws.valid.long().sum(1) - 1
        logits = self.last_logits(ws)
        t2 = time.perf_counter()
        next_positions = torch.stack([ws.positions[b, last[b]] for b in range(len(last))]) + 1
        kept = [
            KeptTokens(visual_tokens=int(n), entered_decoder=int(e), per_layer=c, exit_layer=x)
            for n, e, c, x in zip(n_visual, entered, counts, exits)
        ]
        return PrefillOutput(logits, caches, next_positions, kept, (t1 - t0) * 1000, (t2 - t1) * 1000)

    @torch.no_grad()
    def decode_step(self, caches: list[LayerCache | None], token: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
        """One new token per sample; appends to every non-skipped layer's cache. Returns [B, vocab]."""
        h = self.adapter.embed_tokens(token[:, None])
        pos = positions[:, None]
        for i, layer in enumerate(self.adapter.layers):
            cache = caches[i]
            if cache is not None:
                attn = layer.self_attn
                q, k, v = self._qkv(layer, layer.input_layernorm(h), pos)
                cache.key = torch.cat([cache.key, k], dim=2)
                cache.value = torch.cat([cache.value, v], dim=2)
                cache.valid = torch.cat([cache.valid, torch.ones_like(cache.valid[:, :1])], dim=1)
                mask = cache.valid[:, None, None, :]
                if cache.bias is not None:
                    cache.bias = torch.cat([cache.bias, torch.zeros_like(cache.bias[:, :1])], dim=1)
                    mask = _float_mask(mask, cache.bias, q.dtype)
                out = F.scaled_dot_product_attention(q, cache.key, cache.value, attn_mask=mask,
                                                     scale=attn.scaling, enable_gqa=True)
                h = h + attn.o_proj(out.transpose(1, 2).reshape(h.shape[0], 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.adapter.lm_head(self.adapter.final_norm(h[:, -1])).float()

    # ---- internals --------------------------------------------------------------------------
    def initial_working_set(self, embeds: torch.Tensor, visual: torch.Tensor,
                             attention_mask: torch.Tensor) -> WorkingSet:
        """Drop padding, apply input-level pooling, and pack every sample to the left."""
        rows = []
        target_frac = self.recipe.prune.keep_input
        for b in range(embeds.shape[0]):
            real = attention_mask[b]
            e, vis = embeds[b][real], visual[b][real]
            if target_frac < 1.0 and bool(vis.any()):
                idx = vis.nonzero()[:, 0]
                start, end = int(idx[0]), int(idx[-1]) + 1
                pooled = pool_visual(e[start:end], self.recipe.input_count(end - start))
                e = torch.cat([e[:start], pooled, e[end:]])
                vis = torch.cat([vis[:start], torch.ones(len(pooled), dtype=torch.bool, device=vis.device),
                                 vis[end:]])
            after = torch.zeros_like(vis)
            if bool(vis.any()):
                after[int(vis.nonzero()[-1, 0]) + 1:] = True
            rows.append((e, vis, after))
        width = max(len(r[0]) for r in rows)
        bsz, dim = len(rows), embeds.shape[-1]
        hidden = embeds.new_zeros(bsz, width, dim)
        valid = torch.zeros(bsz, width, dtype=torch.bool, device=embeds.device)
        vis_mask, after_mask = valid.clone(), valid.clone()
        for b, (e, vis, after) in enumerate(rows):
            n = len(e)
            hidden[b, :n], valid[b, :n], vis_mask[b, :n], after_mask[b, :n] = e, True, vis, after
        positions = torch.arange(width, device=embeds.device).expand(bsz, -1).clone()
        # Before any drop a row's visual tokens are its image's grid in order, so a visual token's grid
        # index is its position minus the first one's (pooled inputs never rank by region).
        image_start = vis_mask.long().argmax(1)  # 0 for a row without an image
        return WorkingSet(hidden, valid, positions, vis_mask, after_mask, image_start)

    def _qkv(self, layer: torch.nn.Module, x: torch.Tensor, positions: torch.Tensor, queries: bool = True,
             values: bool = True):
        """(q, k, v) of `x`, rotated at `positions`; q is None with queries=False, v with values=False."""
        attn = layer.self_attn
        bsz, t, _ = x.shape
        k = attn.k_proj(x).view(bsz, t, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(bsz, t, -1, attn.head_dim).transpose(1, 2) if values else None
        cos, sin = self.adapter.rotary_emb(x, positions)
        if not queries:
            return None, self.adapter.apply_rotary(k, k, cos, sin)[1], v
        q = attn.q_proj(x).view(bsz, t, -1, attn.head_dim).transpose(1, 2)
        q, k = self.adapter.apply_rotary(q, k, cos, sin)
        return q, k, v

    def attend_and_drop(self, layer: torch.nn.Module, i: int, ws: WorkingSet,
                        targets: list[int]) -> tuple[WorkingSet, LayerCache | None]:
        """Layer i's attention part (none if the recipe skips it), then the recipe's drop down to
        `targets` visual tokens per request: (working set for the MLP, the layer's KV cache)."""
        drops = any(t < p for t, p in zip(targets, ws.visual.sum(1).tolist()))
        cache = attn_ctx = None
        if i not in self.skip:
            score_here = drops and self.recipe.prune.scorer == "fitprune"
            attn_out, cache, attn_ctx = self.attend(layer, ws, i if score_here else None)
            ws.hidden = ws.hidden + attn_out
        if drops:
            ws = self._drop(ws, i, attn_ctx, targets)
        return ws, cache

    def attend(self, layer: torch.nn.Module, ws: WorkingSet, fitprune_layer: int | None = None):
        """Layer attention over the working set: (output, the layer's KV cache, context for the scorer).

        The context is (q, k, scaling, fitprune): with `fitprune_layer` (this layer's index), `fitprune`
        is FitPrune's (cross, self) from the same attention probabilities as the output
        (scoring.fitprune_attention); otherwise None.
        """
        attn = layer.self_attn
        x = layer.input_layernorm(ws.hidden)
        q, k, v = self._qkv(layer, x, ws.positions)
        bsz, t = ws.valid.shape
        components = None
        bias = ws.key_bias()
        if fitprune_layer is not None:
            out, cross, self_ = fitprune_attention(self.score_context(ws, fitprune_layer, q, k, attn.scaling), v)
            components = (cross, self_)
        if ws.frozen is not None:
            # frozen visual tokens are keys and values only. A request with any has no visual tokens in the
            # working set, so FitPrune's scores above (other requests') do not depend on them.
            out, cache = self._attend_with_frozen(layer, ws, q, k, v)
        else:
            cache = LayerCache(key=k, value=v, valid=ws.valid.clone(), bias=None if bias is None else bias.clone())
            if fitprune_layer is not None:
                pass  # `out` came with FitPrune's scores
            elif bool(ws.valid.all()) and bias is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=True)
            else:
                idx = torch.arange(t, device=q.device)
                causal = idx[None, :] <= idx[:, None]
                # Padding rows attend to themselves only, so they stay finite (their output is ignored).
                mask = ((causal[None] & ws.valid[:, None, :])
                        | torch.eye(t, dtype=torch.bool, device=q.device)[None])[:, None]
                if bias is not None:
                    mask = _float_mask(mask, bias, q.dtype)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
        out = attn.o_proj(out.transpose(1, 2).reshape(bsz, t, -1))
        return out, cache, (q, k, attn.scaling, components)

    def _attend_with_frozen(self, layer: torch.nn.Module, ws: WorkingSet, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor) -> tuple[torch.Tensor, LayerCache]:
        """Attention of the working set's tokens over the frozen tokens' keys and values (computed here,
        by this layer, from their frozen states) and their own, causal by position id."""
        frozen = ws.frozen
        assert frozen is not None
        _, kf, vf = self._qkv(layer, layer.input_layernorm(frozen.hidden), frozen.positions, queries=False)
        keys, values = torch.cat([kf, k], 2), torch.cat([vf, v], 2)
        key_pos = torch.cat([frozen.positions, ws.positions], 1)
        key_valid = torch.cat([frozen.valid, ws.valid], 1)
        allowed = (key_pos[:, None, :] <= ws.positions[:, :, None]) & key_valid[:, None, :]
        t, f = ws.valid.shape[1], frozen.valid.shape[1]
        own = torch.zeros(t, f + t, dtype=torch.bool, device=q.device)
        own[:, f:] = torch.eye(t, dtype=torch.bool, device=q.device)  # padding rows see themselves (finite)
        allowed = (allowed | own[None])[:, None]
        bias = _cat_bias((frozen.bias, frozen.valid), (ws.key_bias(), ws.valid))
        mask = allowed if bias is None else _float_mask(allowed, bias, q.dtype)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=layer.self_attn.scaling,
                                             enable_gqa=True)
        cache = LayerCache(key=keys, value=values, valid=key_valid, bias=bias)
        return out, cache

    def _mlp_and_exit(self, layer: torch.nn.Module, i: int, ws: WorkingSet, counts: list[list[int]],
                      exits: list[int | None]) -> WorkingSet:
        """Layer i's MLP with the exit decision folded in.

        The router reads the text tokens' states at the layer's output. The MLP works per token, so
        those states do not depend on the visual tokens' MLP: the text tokens go through the MLP first,
        the router decides, and an exiting request's visual tokens skip this MLP and every later layer
        (its keep count is 0 from layer i on; with recipe exit.frozen they stay as frozen keys and
        values at their states after this layer's attention). A lookahead router also reads the answer
        the request would give if it exited here (run_exited from these text states).
        """
        norm, mlp = layer.post_attention_layernorm, layer.mlp
        text = ws.text_after & ws.valid
        nonvisual = ws.valid & ~ws.visual
        present = (ws.visual & ws.valid).sum(1)
        eligible = text.any(1) & (present > 0)
        hidden = ws.hidden.clone()
        if bool(nonvisual.any()):
            hidden[nonvisual] = ws.hidden[nonvisual] + mlp(norm(ws.hidden[nonvisual]))
        exiting = torch.zeros_like(eligible)
        if bool(eligible.any()):
            last = ws.valid.long().sum(1) - 1
            bidx = torch.arange(hidden.shape[0], device=hidden.device)
            feats = ExitRouter.features(hidden, text, hidden[bidx, last])
            assert self.router is not None and self.recipe.exit is not None
            if self.router.lookahead:  # `hidden`'s visual rows are still the states an exit would freeze
                text_only = self.without_visual(replace(ws, hidden=hidden), torch.ones_like(eligible),
                                                self.recipe.exit.frozen)
                feats = torch.cat([feats, lookahead_statistics(self.last_logits(self.run_exited(text_only, i)))
                                   .to(feats.dtype)], -1)
            prob = torch.sigmoid(self.router.logits(i, feats).float())
            exiting = eligible & router_exits(prob, self.recipe.exit.threshold)
        rest = ws.valid & ws.visual & ~exiting[:, None]
        if bool(rest.any()):
            hidden[rest] = ws.hidden[rest] + mlp(norm(ws.hidden[rest]))
        ws.hidden = hidden
        if not bool(exiting.any()):
            return ws
        for b in exiting.nonzero()[:, 0].tolist():
            exits[b] = i
            counts[b][i:] = [0] * (len(counts[b]) - i)
        return self.without_visual(ws, exiting, self.recipe.exit.frozen)

    @staticmethod
    def without_visual(ws: WorkingSet, rows: torch.Tensor, frozen: bool) -> WorkingSet:
        """`ws` without the visual tokens of the requests marked in `rows` ([B]), as an exit leaves it:
        removed (DyVTE), or with `frozen` (recipe exit.frozen) kept as keys and values at their current states."""
        leaving = ws.visual & ws.valid & rows[:, None]
        if frozen and bool(leaving.any()):
            ws = replace(ws, frozen=FrozenTokens.gather(ws, rows, ws.frozen))
        return ws.select(ws.valid & ~leaving)

    def run_exited(self, ws: WorkingSet, after_layer: int) -> WorkingSet:
        """The decoder's layers after `after_layer` on a working set without visual tokens (an exited
        request's rest of prefill), in place; its KV caches are not kept."""
        for k in range(after_layer + 1, len(self.adapter.layers)):
            layer = self.adapter.layers[k]
            if k not in self.skip:
                out, _, _ = self.attend(layer, ws)
                ws.hidden = ws.hidden + out
            ws.hidden = ws.hidden + layer.mlp(layer.post_attention_layernorm(ws.hidden))
        return ws

    def last_logits(self, ws: WorkingSet) -> torch.Tensor:
        """[B, vocab] float logits at each request's last valid token."""
        last = ws.valid.long().sum(1) - 1
        final = self.adapter.final_norm(ws.hidden[torch.arange(ws.hidden.shape[0]), last])
        return self.adapter.lm_head(final).float()

    def _drop(self, ws: WorkingSet, layer: int, attn_ctx, targets: list[int]) -> WorkingSet:
        scorer = self.recipe.prune.scorer
        if attn_ctx is None:
            q = k = ws.hidden.new_zeros(ws.hidden.shape[0], 1, ws.hidden.shape[1], 1)
            scaling, components = 1.0, None
        else:
            q, k, scaling, components = attn_ctx
        ctx = self.score_context(ws, layer, q, k, scaling)
        if scorer == "guide":
            assert self.guides is not None
            scores = self.guides.scores(layer, ws.hidden, ws.visual, ws.text_after & ws.valid)
        elif scorer not in SCORERS:
            raise RecipeError(f"scorer {scorer!r} cannot drop tokens inside the decoder")
        else:
            scores = fitprune_combine(ctx, *components) if components else SCORERS[scorer](ctx)
            preview = self.preview(ws, layer) if scorer == "fitprune" and max(targets) > 0 else None
            if preview is not None:
                scores = with_preview(scores, preview, ws.visual & ws.valid)
        if self.score_hook is not None:
            scores = self.score_hook(ctx, scores)
        keep_visual = select_visual(scores, ws.visual, targets, self._regions(ws))
        return self._keep(ws, keep_visual)

    def preview(self, ws: WorkingSet, layer: int) -> torch.Tensor | None:
        """[B, T] attention the prompt's last token would pay each token in the recipe's preview layers after
        `layer` (prune.preview_layers), each layer's own norm and projections applied to the current states,
        head-max, summed over those layers; None when no preview layer comes after `layer`."""
        later = [i for i in self.recipe.prune.preview_layers if i > layer]
        if not later:
            return None
        rows = torch.arange(ws.hidden.shape[0], device=ws.hidden.device)
        last = ws.valid.long().sum(1) - 1  # working sets are packed left
        total = torch.zeros(ws.valid.shape, dtype=torch.float32, device=ws.hidden.device)
        for i in later:
            block = self.adapter.layers[i]
            x = block.input_layernorm(ws.hidden)
            _, k, _ = self._qkv(block, x, ws.positions, queries=False, values=False)  # keys only, as costed
            q, _, _ = self._qkv(block, x[rows, last][:, None], ws.positions[rows, last][:, None], values=False)
            total += last_token_attention(q[:, :, 0], k, block.self_attn.scaling, ws.valid, ws.key_bias())
        return total

    def _keep(self, ws: WorkingSet, keep_visual: torch.Tensor) -> WorkingSet:
        """The working set with only `keep_visual` of its visual tokens, the rest merged in if the recipe says so."""
        if self.recipe.prune.merge:
            size = ws.size if ws.size is not None else torch.ones_like(ws.valid, dtype=torch.float32)
            ws.hidden, ws.size = merge_into_kept(ws.hidden, size, ws.visual & ws.valid, keep_visual)
        return ws.select(ws.valid & (~ws.visual | keep_visual))

    def _regions(self, ws: WorkingSet) -> torch.Tensor | None:
        """Region id of every token for a region-balanced recipe (prune.regions > 1), else None."""
        regions = self.recipe.prune.regions
        if regions <= 1:
            return None
        grid_index = ws.grid_index()
        if grid_index is None:
            raise RecipeError("prune.regions needs the image's grid layout; build the working set with "
                              "initial_working_set")
        return grid_regions(grid_index, self.recipe.model.num_visual_tokens, regions)

    def score_context(self, ws: WorkingSet, layer: int, q: torch.Tensor, k: torch.Tensor,
                       scaling: float) -> ScoreContext:
        return ScoreContext(layer=layer, query=q, key=k, scaling=scaling, valid=ws.valid, visual=ws.visual,
                            text_after=ws.text_after, positions=ws.positions, seed=self.recipe.prune.seed,
                            chunk=self.score_chunk, fitprune_combine=self.recipe.prune.fitprune_combine,
                            key_bias=ws.key_bias(),
                            grid_index=ws.grid_index() if self.score_hook is not None else None)

    def _trim(self, tokens: torch.Tensor) -> list[list[int]]:
        """Cut each row after its first end-of-sequence token (which is kept)."""
        out = []
        for row in tokens.tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in self.adapter.eos_token_ids), len(row))
            out.append(row[:cut])
        return out


def _float_mask(allowed: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive SDPA mask: -inf where `allowed` ([B, 1, Q, K] or broadcastable) is false, else the
    key's bias ([B, K])."""
    bias = bias[:, None, None, :].to(dtype)
    return torch.where(allowed, bias, torch.tensor(float("-inf"), dtype=dtype, device=bias.device))


def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
            gen: torch.Generator) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise InputError(f"temperature is {temperature}; expected > 0 when sampling")
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs.cpu(), 1, generator=gen)[:, 0].to(logits.device)
