"""LVPruning-style guides: train small cross-attention scorers that rank visual tokens by the question.

The backbone stays frozen. A schedule `keep@layer,...` says how many visual tokens survive after
each guide layer's attention; at inference the guide's top-k survive (engine scorer "guide").
Training runs the full sequence with a straight-through keep mask: the forward pass drops
exactly the tokens the engine drops (hard top-k, masked out as keys), the backward pass flows
through a sigmoid of each score's distance to the top-k threshold. The loss is the KL divergence
from the unpruned model's answer distribution (teacher forcing on the reference answer; the next
token after the prompt when there is none). Top-k fixes the keep ratio, so no ratio term is needed.
With `regions` and `merge` (recipe prune.regions / prune.merge) the training drops as the engine will:
top-k round robin over the image's regions, each dropped token merged into its most similar kept one,
and a merged key weighted by the tokens it stands for, so the guides learn which tokens to keep when
the rest are merged rather than discarded.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from edge_prune.cost import decoder_parameters, estimate
from edge_prune.engine import PrunedEngine, WorkingSet
from edge_prune.errors import RecipeError
from edge_prune.fit.calibration import CalibrationSet
from edge_prune.fit.distributed import Dist
from edge_prune.fit.training import (ForcedBatch, TrainingInterrupted, checkpoint_path, fingerprint, forced_batch,
                                     load_checkpoint, masked_attention, micro_batches, mlp, pred_logits,
                                     save_checkpoint, sum_gradients)
from edge_prune.merging import merge_into_kept
from edge_prune.models.shapes import ModelShape
from edge_prune.recipe import Budget, GuideSpec, PruneSpec, Recipe
from edge_prune.scoring import GuideSet, grid_regions, guide_parameters, select_visual

GUIDE_BUDGET = 0.02  # total guide parameters <= 2% of the decoder's
MAX_DEFAULT_RANK = 32
GUIDES_FILE = "guides.safetensors"


def parse_schedule(text: str, num_layers: int) -> list[tuple[float, int]]:
    """'0.5@4,0.3@8,0.1@16' -> [(0.5, 4), (0.3, 8), (0.1, 16)]; layers increase, keep fractions decrease."""
    points: list[tuple[float, int]] = []
    for part in text.split(","):
        keep_s, sep, layer_s = part.strip().partition("@")
        try:
            keep, layer = float(keep_s), int(layer_s)
        except ValueError:
            raise RecipeError(f"--schedule {text!r}: entry {part.strip()!r} is not KEEP@LAYER (e.g. 0.5@4)") from None
        if not sep:
            raise RecipeError(f"--schedule {text!r}: entry {part.strip()!r} is not KEEP@LAYER (e.g. 0.5@4)")
        if not 0.0 <= keep < 1.0:
            raise RecipeError(f"--schedule {text!r}: keep {keep} at layer {layer} is not a fraction in [0, 1)")
        if not 0 <= layer < num_layers:
            raise RecipeError(f"--schedule {text!r}: layer {layer} is out of range; this model's decoder layers "
                              f"are 0..{num_layers - 1}")
        if points and layer <= points[-1][1]:
            raise RecipeError(f"--schedule {text!r}: layer {layer} comes after layer {points[-1][1]}; "
                              "layers must increase along the schedule")
        if points and keep >= points[-1][0]:
            raise RecipeError(f"--schedule {text!r}: keep {keep} at layer {layer} is not below {points[-1][0]} at "
                              f"layer {points[-1][1]}; keep fractions must decrease along the schedule")
        points.append((keep, layer))
    return points


def schedule_keep_after(schedule: list[tuple[float, int]], num_layers: int) -> list[float]:
    """keep_after: 1.0 before the first point, then each point's fraction until the next one."""
    keep, out = 1.0, []
    points = dict((layer, k) for k, layer in schedule)
    for i in range(num_layers):
        keep = points.get(i, keep)
        out.append(keep)
    return out


def check_guide_budget(shape: ModelShape, layers: list[int], rank: int) -> int:
    """Guide parameters, or RecipeError when they exceed GUIDE_BUDGET of the decoder's."""
    n = guide_parameters(shape.hidden_size, len(layers), rank)
    limit = GUIDE_BUDGET * decoder_parameters(shape)
    if n > limit:
        raise RecipeError(f"guides at rank {rank} on {len(layers)} layers have {n} parameters, over the "
                          f"{GUIDE_BUDGET:.0%} budget ({int(limit)} of the decoder's {decoder_parameters(shape)}); "
                          "lower --rank or use fewer schedule points")
    return n


def default_guide_rank(shape: ModelShape, layers: list[int]) -> int:
    """The largest power of two up to MAX_DEFAULT_RANK that keeps the guides within budget."""
    rank = MAX_DEFAULT_RANK
    limit = GUIDE_BUDGET * decoder_parameters(shape)
    while rank > 1 and guide_parameters(shape.hidden_size, len(layers), rank) > limit:
        rank //= 2
    return rank


@dataclass
class GuideConfig:
    """Training settings; together with the model and data they fingerprint a resumable run."""

    schedule: list[tuple[float, int]]
    rank: int | None = None  # None: default_guide_rank
    steps: int = 200
    batch_size: int = 8  # samples per optimiser step, over all ranks
    micro_batch: int = 4  # samples per forward pass
    lr: float = 3e-3
    seed: int = 0
    checkpoint_every: int = 10
    # weight of the auxiliary attention-distillation term (0: KL only). Off by default: on the benchmark
    # model, whose attention ranks tokens worse than random (FastV), 0.5 gave 45.5% where KL alone gave 59.7%
    attention_distill: float = 0.0
    regions: int = 1  # drops round robin over regions x regions cells of the image grid (prune.regions)
    merge: bool = False  # dropped tokens merge into kept ones (prune.merge)


@dataclass
class GuideFitResult:
    recipe: Recipe
    guides: GuideSet
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Prepared:
    batch: ForcedBatch  # ws.hidden = state entering the first guide layer
    teacher_logp: torch.Tensor  # [P, vocab] unpruned log-probs at the pred positions
    importance: dict[int, torch.Tensor]  # guide layer -> [B, T] teacher attention mass on each visual token


def soft_keep(scores: torch.Tensor, present: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Differentiable stand-in for top-k: sigmoid of each score's distance to the k-th/(k+1)-th midpoint,
    in units of the present scores' spread (both constants for the gradient)."""
    s = scores.float()
    ranked = s.detach().masked_fill(~present, float("-inf")).sort(dim=1, descending=True).values
    k = torch.tensor(counts, device=s.device)[:, None]
    width = ranked.shape[1]
    hi = ranked.gather(1, (k - 1).clamp(0, width - 1))
    lo = ranked.gather(1, k.clamp(max=width - 1))
    lo = torch.where(k >= present.sum(1, keepdim=True), torch.full_like(lo, float("-inf")), lo)
    tau = torch.where(k > 0, (hi + lo) / 2, hi + 1.0)
    pf = present.float()
    count = pf.sum(1, keepdim=True).clamp(min=1)
    mean = (s.detach() * pf).sum(1, keepdim=True) / count
    spread = (((s.detach() - mean) * pf) ** 2).sum(1, keepdim=True).div(count).sqrt().clamp(min=1e-3)
    return torch.sigmoid((s - tau) / spread)


def _listwise_ce(scores: torch.Tensor, importance: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """[B] cross-entropy between the teacher's importance and softmax(scores), over the present visual tokens."""
    target = importance * present
    target = target / target.sum(1, keepdim=True).clamp(min=1e-12)
    logp = torch.log_softmax(scores.float().masked_fill(~present, float("-inf")), dim=1)
    return -(target * logp.masked_fill(~present, 0.0)).sum(1)


class GuideFitter:
    """Trains guides for one schedule on a calibration set; data-parallel across torchrun ranks."""

    def __init__(self, engine: PrunedEngine, calibration: CalibrationSet, config: GuideConfig,
                 dist: Dist | None = None, progress: bool = True, work_dir: str | Path | None = None):
        if not engine.recipe.is_identity:
            raise RecipeError("guides are trained against the unpruned model; load the engine without a recipe")
        self.engine, self.adapter = engine, engine.adapter
        self.calibration, self.config = calibration, config
        self.dist = dist or Dist.single()
        self.progress = progress and self.dist.rank == 0
        self.shape, self.sig = self.adapter.shape, self.adapter.signature()
        num_layers = self.sig.num_layers
        self.keep_after = schedule_keep_after(config.schedule, num_layers)
        self.layers = [layer for _, layer in config.schedule]
        self.rank = config.rank or default_guide_rank(self.shape, self.layers)
        self.n_params = check_guide_budget(self.shape, self.layers, self.rank)
        if config.batch_size % config.micro_batch:
            raise RecipeError(f"--batch-size {config.batch_size} is not a multiple of the micro-batch "
                              f"{config.micro_batch}")
        self.recipe = Recipe(model=self.sig, prune=PruneSpec(scorer="guide", keep_after=self.keep_after,
                                                              guides=GuideSpec(GUIDES_FILE, self.layers, self.rank),
                                                              regions=config.regions, merge=config.merge))
        self.recipe.validate("the guides' recipe")
        self.start = self.layers[0]
        self.micro = micro_batches(len(calibration.samples), config.micro_batch)
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.run_id = fingerprint({"kind": "guides", "model": asdict(self.sig), "config": asdict(config),
                                   "rank": self.rank, "calibration": calibration.source,
                                   "n": len(calibration.samples)})

    # ---- data ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _prepare(self, ids: list[int]) -> _Prepared:
        """Teacher-forced batch, run unpruned up to the first guide layer; teacher log-probs at the end."""
        samples = [self.calibration.samples[i] for i in ids]
        engine = self.engine
        fb = forced_batch(engine, samples, ids, recipe=self.recipe)
        ws = fb.ws
        for layer in self.adapter.layers[:self.start]:
            out, _, _ = engine.attend(layer, ws)
            ws.hidden = mlp(layer, ws.hidden + out)
        prefix = ws.hidden.clone()
        last_visual = (ws.visual.long() * torch.arange(ws.visual.shape[1], device=ws.visual.device)).amax(1)
        after = ws.valid & (torch.arange(ws.valid.shape[1], device=ws.valid.device)[None] > last_visual[:, None])
        mass = []
        for i, layer in enumerate(self.adapter.layers[self.start:], start=self.start):
            out, _, (q, k, scaling, _) = engine.attend(layer, ws)
            mass.append(self._text_attention(q, k, scaling, ws, after))
            ws.hidden = mlp(layer, ws.hidden + out)
        teacher = torch.log_softmax(pred_logits(engine, ws.hidden, fb.pred), dim=-1)
        ws.hidden = prefix
        fb.targets = torch.where(fb.targets < 0, teacher.argmax(-1), fb.targets)
        importance = {}
        for layer in self.layers:
            later = mass[layer + 1 - self.start:] or mass[-1:]
            importance[layer] = torch.stack(later).mean(0) * ws.visual
        return _Prepared(fb, teacher, importance)

    @staticmethod
    def _text_attention(q: torch.Tensor, k: torch.Tensor, scaling: float, ws: WorkingSet,
                        rows: torch.Tensor) -> torch.Tensor:
        """[B, T] attention the `rows` tokens pay each token (mean over heads and rows), causal."""
        from edge_prune.scoring import ScoreContext, attention_rows

        out = torch.zeros(ws.valid.shape, device=q.device)
        for b in range(q.shape[0]):
            idx = rows[b].nonzero()[:, 0]
            if not len(idx):
                continue
            ctx = ScoreContext(layer=0, query=q[b:b + 1], key=k[b:b + 1], scaling=scaling, valid=ws.valid[b:b + 1],
                               visual=ws.visual[b:b + 1], text_after=ws.text_after[b:b + 1],
                               positions=ws.positions[b:b + 1])
            out[b] = attention_rows(ctx, idx[None]).mean(dim=(1, 2))[0]
        return out

    # ---- the straight-through student -----------------------------------------------------------------
    def student_logits(self, guides: GuideSet, prep: _Prepared, hard_only: bool = False,
                       distill: list[torch.Tensor] | None = None) -> torch.Tensor:
        """[P, vocab] logits of the guide-pruned model; forward identical to the engine's drops.
        `distill` collects each guide layer's [B] attention-distillation loss."""
        fb, engine = prep.batch, self.engine
        ws = fb.ws
        h = ws.hidden
        key_mask = ws.valid.float()
        size = torch.ones_like(key_mask)  # tokens each position stands for (merging)
        present = ws.visual.clone()
        regions = None
        if self.config.regions > 1:
            regions = grid_regions(ws.grid_index(), self.sig.num_visual_tokens, self.config.regions)
        for i in range(self.start, self.sig.num_layers):
            layer = self.adapter.layers[i]
            h = h + masked_attention(engine, layer, h, ws, key_mask * size)
            if i in self.layers:
                targets = [c[i] for c in fb.counts]
                if any(t < int(p) for t, p in zip(targets, present.sum(1).tolist())):
                    scores = guides.scores(i, h, present, ws.text_after)
                    if distill is not None:
                        distill.append(_listwise_ce(scores, prep.importance[i], present))
                    hard = select_visual(scores.detach(), present, targets, regions)
                    if self.config.merge:
                        h, size = merge_into_kept(h, size, present, hard)
                    if hard_only:
                        factor = hard.float()
                    else:
                        soft = soft_keep(scores, present, targets)
                        factor = hard.float() + (soft - soft.detach())
                    key_mask = key_mask * torch.where(present, factor, torch.ones_like(factor))
                    present = present & hard
            h = mlp(layer, h)
        return pred_logits(engine, h, fb.pred)

    def sample_loss(self, guides: GuideSet, prep: _Prepared) -> torch.Tensor:
        """[B] training loss per sample: KL + attention_distill x mean listwise CE over the guide layers."""
        distill: list[torch.Tensor] = []
        kl = self.sample_kl(guides, prep, distill=distill if self.config.attention_distill > 0 else None)
        if not distill:
            return kl
        return kl + self.config.attention_distill * torch.stack(distill).mean(0)

    def sample_kl(self, guides: GuideSet, prep: _Prepared, hard_only: bool = False,
                  distill: list[torch.Tensor] | None = None) -> torch.Tensor:
        """[B] KL(teacher || student) per sample, averaged over that sample's predicted positions."""
        logp = torch.log_softmax(self.student_logits(guides, prep, hard_only, distill), dim=-1)
        t = prep.teacher_logp
        per_pos = (t.exp() * (t - logp)).sum(-1)
        rows = prep.batch.pred.nonzero()[:, 0]
        per_sample = torch.zeros(prep.batch.size, device=per_pos.device).index_add(0, rows, per_pos)
        return per_sample / prep.batch.pred.sum(1).clamp(min=1)

    @torch.no_grad()
    def evaluate(self, guides: GuideSet, preps: list[_Prepared]) -> float:
        """Mean KL of the hard (inference) pruning over prepared micro-batches."""
        total = sum(float(self.sample_kl(guides, p, hard_only=True).sum()) for p in preps)
        return total / max(1, sum(p.batch.size for p in preps))

    # ---- training loop ------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> GuideFitResult:
        """Train; resumes from the work dir's checkpoint of the same run; `stop_after` interrupts (tests)."""
        cfg, dist = self.config, self.dist
        start_time = time.perf_counter()
        torch.manual_seed(cfg.seed)
        guides = GuideSet(self.sig.hidden_size, self.layers, self.rank).to(self.adapter.device)
        guides.reset_parameters(cfg.seed)
        guides.to(self.adapter.device)
        for p in self.adapter.model.parameters():
            p.requires_grad_(False)
        # Top-k and the soft mask are shift-invariant, so the output bias has no gradient: keep it at 0
        # (Adam would otherwise turn rounding noise into full-size steps that differ between ranks).
        guides.b_out.requires_grad_(False)
        optim = torch.optim.Adam([p for p in guides.parameters() if p.requires_grad], lr=cfg.lr)
        ckpt = checkpoint_path(self.work_dir, "guides") if self.work_dir is not None else None
        step = 0
        history: list[dict[str, float]] = []
        if ckpt is not None:
            resumed = load_checkpoint(ckpt, guides, optim, self.run_id)
            if resumed is not None:
                step, extra = resumed
                history = [{"step": float(s), "loss": float(v)} for s, v in extra.get("history", torch.zeros(0, 2))]
                if self.progress:
                    tqdm.write(f"guides: resuming from the checkpoint at step {step} ({ckpt})")
        order = self._order(cfg.steps)
        owned = {m for m in range(len(self.micro)) if m % dist.world_size == dist.rank}
        cache: dict[int, _Prepared] = {}
        prep_bar = tqdm(total=len(owned), desc="guides: teacher pass", unit="batch", disable=not self.progress)
        for m in sorted(owned):
            cache[m] = self._prepare(self.micro[m])
            prep_bar.update(1)
        prep_bar.close()
        bar = tqdm(total=cfg.steps, initial=step, desc="guides: training", unit="step", disable=not self.progress)
        while step < cfg.steps:
            chunk = order[step]
            n_global = sum(len(self.micro[m]) for m in chunk)
            optim.zero_grad(set_to_none=False)
            local = torch.zeros((), device=self.adapter.device)
            for m in chunk:
                if m in owned:
                    loss = self.sample_loss(guides, cache[m]).sum() / n_global
                    loss.backward()
                    local += loss.detach()
            sum_gradients(guides, dist)
            if dist.world_size > 1:
                torch.distributed.all_reduce(local)
            torch.nn.utils.clip_grad_norm_([p for p in guides.parameters() if p.requires_grad], 1.0)
            optim.step()
            step += 1
            history.append({"step": float(step), "loss": float(local)})
            bar.set_postfix(kl=f"{float(local):.4f}")
            bar.update(1)
            at_stop = stop_after is not None and step >= stop_after
            if ckpt is not None and dist.rank == 0 and (step % cfg.checkpoint_every == 0 or at_stop):
                save_checkpoint(ckpt, guides, optim, step, self.run_id,
                                {"history": torch.tensor([[h["step"], h["loss"]] for h in history])})
            if at_stop and step < cfg.steps:
                if dist.world_size > 1:
                    torch.distributed.barrier()
                bar.close()
                raise TrainingInterrupted(f"stopped after step {step}")
        bar.close()
        seconds = time.perf_counter() - start_time
        recipe = self._finish_recipe(history, seconds)
        return GuideFitResult(recipe, guides, seconds, history)

    def _order(self, steps: int) -> list[list[int]]:
        """Micro-batch ids of every step: epochs of seeded permutations, cut into optimiser steps."""
        per_step = self.config.batch_size // self.config.micro_batch
        seq: list[int] = []
        epoch = 0
        while len(seq) < steps * per_step:
            gen = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
            seq += torch.randperm(len(self.micro), generator=gen).tolist()
            epoch += 1
        return [seq[s * per_step:(s + 1) * per_step] for s in range(steps)]

    def _finish_recipe(self, history: list[dict[str, float]], seconds: float) -> Recipe:
        import edge_prune

        recipe = Recipe(model=self.sig, prune=self.recipe.prune, budget=Budget(accounting="exact"))
        text = self._mean_text_tokens()
        reduction = estimate(self.shape, recipe, text_tokens=text).flops_reduction
        recipe.budget.flops_reduction = round(math.floor(reduction * 1e4) / 1e4, 4)
        first = [h["loss"] for h in history[:10]]
        last = [h["loss"] for h in history[-10:]]
        recipe.provenance = {
            "method": "lvpruning",
            "schedule": ",".join(f"{k}@{layer}" for k, layer in self.config.schedule),
            "regions": self.config.regions,
            "merge": self.config.merge,
            "guide_parameters": self.n_params,
            "decoder_parameters": decoder_parameters(self.shape),
            "calibration": self.calibration.source,
            "calibration_samples": len(self.calibration.samples),
            "predicted_flops_reduction": reduction,
            "accounting": "exact",
            "text_tokens": text,
            "training": {"steps": self.config.steps, "batch_size": self.config.batch_size, "lr": self.config.lr,
                         "seed": self.config.seed, "seconds": round(seconds, 1), "world_size": self.dist.world_size,
                         "device": str(self.adapter.device), "threads": torch.get_num_threads(),
                         "loss_first10": sum(first) / max(1, len(first)), "loss_last10": sum(last) / max(1, len(last))},
            "edge_prune": edge_prune.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        return recipe

    def _mean_text_tokens(self) -> int:
        """Mean prompt text tokens (image excluded, answer excluded) for the FLOPs figure."""
        tok = self.adapter.processor.tokenizer
        lengths = [len(tok(self.adapter.format_prompt(s.prompt, with_image=True))["input_ids"]) - 1
                   for s in self.calibration.samples[:64]]
        return round(sum(lengths) / len(lengths))
