"""DyVTE-style exit routers: label when a request may drop all its visual tokens, train one light
shared router, and pick its threshold on held-out calibration data.

Labels (DyVTE): for a sample and a candidate layer l, run the (base-recipe) model normally and
with every visual token removed after layer l, teacher-forcing the reference answer; exit = 1
when the answer tokens' argmax agree and the exited loss < 1.03 x the normal loss (+ an optional
absolute slack, `loss_slack`, off by default: see RouterConfig); with `labels="agreement"`, argmax
agreement alone (DyVTE's first condition). Unlike DyVTE,
which samples one exit layer per batch, every candidate layer is labelled for every sample: the
exited branches share the normal run's prefix and carry only the text tokens, so all of them
together cost about one more forward pass.

Threshold: a request exits at the first candidate layer whose probability is >= the threshold.
On the held-out share of the calibration set (every k-th sample, never trained on) every
distinct probability is tried as the threshold; the chosen one gives the lowest expected
prefill FLOPs among those whose *risk* (share of held-out requests that exit where the label
says 0) is at most `max_risk`. The held-out exit-layer shares at that threshold go into the
recipe (`exit.exit_rates`) for the cost model's expected FLOPs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from edge_prune.cost import decoder_parameters, estimate
from edge_prune.engine import PrunedEngine
from edge_prune.errors import RecipeError
from edge_prune.fit.calibration import CalibrationSet
from edge_prune.fit.distributed import Dist
from edge_prune.fit.training import (TrainingInterrupted, all_reduce_sum, checkpoint_path, fingerprint,
                                     forced_batch, load_checkpoint, micro_batches, mlp, pred_logits, save_checkpoint)
from edge_prune.models.shapes import ModelShape
from edge_prune.recipe import ExitSpec, Recipe, router_inputs
from edge_prune.scoring import ExitRouter, lookahead_statistics, router_parameters

ROUTER_BUDGET = 0.01  # router parameters <= 1% of the decoder's
MAX_DEFAULT_RANK = 64
ROUTER_FILE = "router.safetensors"
LOSS_RATIO = 1.03  # DyVTE: exited loss must stay below 1.03 x the normal loss
LABEL_RULES = ("dyvte", "agreement")


def check_router_budget(shape: ModelShape, layers: list[int], rank: int, lookahead: bool = False) -> int:
    """Router parameters, or RecipeError when they exceed ROUTER_BUDGET of the decoder's."""
    n = router_parameters(shape.hidden_size, len(layers), rank, lookahead)
    limit = ROUTER_BUDGET * decoder_parameters(shape)
    if n > limit:
        raise RecipeError(f"an exit router at rank {rank} on {len(layers)} layers has {n} parameters, over the "
                          f"{ROUTER_BUDGET:.0%} budget ({int(limit)} of the decoder's {decoder_parameters(shape)}); "
                          "lower --rank")
    return n


def default_router_rank(shape: ModelShape, layers: list[int], lookahead: bool = False) -> int:
    rank = MAX_DEFAULT_RANK
    while rank > 1 and router_parameters(shape.hidden_size, len(layers), rank, lookahead) > (
            ROUTER_BUDGET * decoder_parameters(shape)):
        rank //= 2
    return rank


@dataclass
class RouterConfig:
    """Fitting settings; with the model, base recipe and data they fingerprint a resumable run."""

    layers: list[int] | None = None  # candidate exit layers; None: every layer but the last that has visual tokens
    rank: int | None = None  # None: default_router_rank
    heldout_every: int = 4  # every k-th calibration sample is held out for the threshold
    max_risk: float = 0.01
    loss_ratio: float = LOSS_RATIO
    # nats the exited loss may exceed loss_ratio x the normal loss by (0 = DyVTE's rule). A ratio of
    # near-zero losses is all noise: at p = 0.999 (loss 0.001) the ratio rule rejects an exit that
    # leaves p at 0.998, so a confident model's labels say "do not exit" while its answers agree
    loss_slack: float = 0.0
    # "dyvte": agreement and the loss rule above; "agreement": argmax agreement alone, the condition the
    # benchmark's accuracy depends on (a request whose answer does not change cannot lose accuracy)
    labels: str = "dyvte"
    # the router also reads the answer an exit would give (recipe exit.lookahead): on the benchmark model
    # it ranks requests within a question family better than the text states alone do
    lookahead: bool = False
    # exiting requests keep their visual tokens as frozen keys and values (recipe exit.frozen): the labels
    # and the lookahead come from exited runs that attend to them
    frozen: bool = False
    train_steps: int = 300  # full-batch optimiser steps on the collected features
    lr: float = 1e-2
    # a few hundred samples overfit the router: at 1e-4 its logits grew past float32's sigmoid range, so
    # held-out probabilities tied at 1.0 and the threshold search could not tell those requests apart,
    # and the exits found varied with the seed. Lab sweep (1,280 samples on two models, three label
    # rules, 1e-4 / 1e-3 / 1e-2 / 3e-2, three seeds): 1e-2 was best or close to it in five of six
    # settings; 3e-2 smoothed away the few early exits that DyVTE's strict labels allow
    weight_decay: float = 1e-2
    seed: int = 0
    micro_batch: int = 8
    checkpoint_every: int = 4  # micro-batches between checkpoints of the label collection


@dataclass
class ExitLabels:
    """Router inputs and DyVTE labels for every sample and candidate layer."""

    features: torch.Tensor  # [N, C, 2d]
    labels: torch.Tensor  # [N, C] 1.0 = exiting here keeps the answer
    eligible: torch.Tensor  # [N, C] visual tokens still present and text after the image
    agree: torch.Tensor  # [N, C] argmax agreement alone (reported)
    # the greedy answer equals the sample's reference answer: after an exit at each candidate layer
    # [N, C], and without exiting [N]; False for samples without a reference. Not used for training;
    # they let a benchmark score a router in accuracy, not only in changed answers
    exit_correct: torch.Tensor | None = None
    normal_correct: torch.Tensor | None = None


@dataclass
class RouterFitResult:
    recipe: Recipe
    router: ExitRouter
    threshold: float
    heldout_risk: float
    heldout_exit_rates: list[float]
    seconds: float
    curve: list[dict[str, float]] = field(default_factory=list)


class RouterFitter:
    """Collects labels on the base recipe (identity, FitPrune, guides...), trains the router, picks the threshold."""

    def __init__(self, engine: PrunedEngine, calibration: CalibrationSet, config: RouterConfig,
                 dist: Dist | None = None, progress: bool = True, work_dir: str | Path | None = None):
        base = engine.recipe
        if base.exit is not None:
            raise RecipeError("the base recipe already has an exit router; pass a recipe without 'exit'")
        if base.prune.scorer == "fastv":
            raise RecipeError("exit routers cannot be fitted on a FastV base recipe (FastV scores with the last "
                              "token, which teacher forcing moves); use a fitprune, guide or random base recipe")
        if config.labels not in LABEL_RULES:
            raise RecipeError(f"--exit-labels {config.labels!r}: expected one of {', '.join(LABEL_RULES)}")
        if not config.loss_slack >= 0:
            raise RecipeError(f"--loss-slack {config.loss_slack}: expected nats >= 0 (0 = DyVTE's loss-ratio rule)")
        if config.labels == "agreement" and config.loss_slack:
            raise RecipeError("--loss-slack relaxes DyVTE's loss rule, which --exit-labels agreement does not use; "
                              "drop one of them")
        self.engine, self.adapter, self.base = engine, engine.adapter, base
        self.calibration, self.config = calibration, config
        self.dist = dist or Dist.single()
        self.progress = progress and self.dist.rank == 0
        self.shape, self.sig = self.adapter.shape, self.adapter.signature()
        num_layers = self.sig.num_layers
        if config.layers is None:
            self.layers = [i for i in range(num_layers - 1) if base.prune.keep_after[i] > 0]
        else:
            self.layers = list(config.layers)
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad or self.layers != sorted(set(self.layers)):
                raise RecipeError(f"--exit-layers {self.layers}: expected increasing layer indices in "
                                  f"[0, {num_layers - 1}]")
        if not self.layers:
            raise RecipeError("no candidate exit layer: the base recipe keeps no visual tokens anywhere")
        self.rank = config.rank or default_router_rank(self.shape, self.layers, config.lookahead)
        self.n_params = check_router_budget(self.shape, self.layers, self.rank, config.lookahead)
        n = len(calibration.samples)
        self.heldout = [i for i in range(n) if i % config.heldout_every == config.heldout_every - 1]
        self.train_ids = [i for i in range(n) if i % config.heldout_every != config.heldout_every - 1]
        if len(self.heldout) < 4 or len(self.train_ids) < 4:
            raise RecipeError(f"{n} calibration samples are too few for an exit router: it needs at least 4 to "
                              f"train on and 4 held out (every {config.heldout_every}th); raise --n")
        self.micro = micro_batches(n, config.micro_batch)
        self.work_dir = Path(work_dir) if work_dir is not None else None
        # the label fields are part of the fingerprint: a checkpoint from a label pass that stored fewer
        # of them (before the answer checks) starts fresh instead of failing on the missing tensors
        self.run_id = fingerprint({"kind": "router", "model": asdict(self.sig), "base": base.to_dict()["prune"],
                                   "config": asdict(config), "layers": self.layers, "rank": self.rank,
                                   "calibration": calibration.source, "n": n,
                                   "label_fields": [f.name for f in fields(ExitLabels)]})

    @property
    def feature_width(self) -> int:
        """Router inputs per (sample, layer): DyVTE's two states, plus the lookahead statistics if asked."""
        return router_inputs(self.sig.hidden_size, self.config.lookahead)

    # ---- labels -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _collect_batch(self, ids: list[int]) -> ExitLabels:
        """Features, labels and answer checks of one micro-batch."""
        engine, layers = self.engine, self.adapter.layers
        fb = forced_batch(engine, [self.calibration.samples[i] for i in ids], ids)
        ws, counts = fb.ws, fb.counts
        bsz = fb.size
        width = int(ws.positions.max()) + 1
        pred_table = torch.zeros(bsz, width, dtype=torch.bool, device=ws.valid.device)
        pred_table[fb.pred.nonzero(as_tuple=True)[0], ws.positions[fb.pred]] = True
        bidx = torch.arange(bsz, device=ws.valid.device)
        last_pos = ws.positions[bidx, fb.last_prompt]

        def find_pred(w) -> torch.Tensor:
            return pred_table.gather(1, w.positions) & w.valid

        # row of each sample's first pred position among the pred rows (pred rows are in sample order)
        first_pred = torch.cumsum(fb.pred.sum(1), 0) - fb.pred.sum(1)

        c = len(self.layers)
        feats = torch.zeros(bsz, c, self.feature_width, device=ws.hidden.device)
        eligible = torch.zeros(bsz, c, dtype=torch.bool, device=ws.hidden.device)
        exit_logits: list[torch.Tensor] = []
        for i, layer in enumerate(layers):
            ws, _ = engine.attend_and_drop(layer, i, ws, [cnt[i] for cnt in counts])
            before_mlp = ws.hidden
            ws.hidden = mlp(layer, ws.hidden)
            if i not in self.layers:
                continue
            j = self.layers.index(i)
            text = ws.text_after & ws.valid
            last = ((ws.positions == last_pos[:, None]) & ws.valid).float().argmax(1)
            feats[:, j, :2 * self.sig.hidden_size] = ExitRouter.features(ws.hidden, text, ws.hidden[bidx, last]).float()
            eligible[:, j] = text.any(1) & (ws.visual & ws.valid).any(1)
            # an exit skips the visual tokens' MLP here: with exit.frozen they freeze at their states before it
            at_exit = replace(ws, hidden=torch.where(ws.visual[..., None], before_mlp, ws.hidden))
            branch = engine.run_exited(engine.without_visual(at_exit, torch.ones_like(eligible[:, j]), self.config.frozen), i)
            exit_logits.append(pred_logits(engine, branch.hidden, find_pred(branch)))
            if self.config.lookahead:  # the first answer token's logits: what the last prompt token predicts
                feats[:, j, 2 * self.sig.hidden_size:] = lookahead_statistics(exit_logits[-1][first_pred])
        normal = pred_logits(engine, ws.hidden, find_pred(ws))
        targets_t = torch.where(fb.targets < 0, normal.argmax(-1), fb.targets)
        rows = fb.pred.nonzero()[:, 0]  # pred positions are never dropped, so row order is kept
        per_row = fb.pred.sum(1).clamp(min=1).float()

        def per_sample(values: torch.Tensor) -> torch.Tensor:
            return torch.zeros(bsz, device=values.device).index_add(0, rows, values.float())

        ce_normal = per_sample(F.cross_entropy(normal, targets_t, reduction="none")) / per_row
        answer_len = fb.pred.sum(1).float()
        has_reference = per_sample((fb.targets >= 0).float()) == answer_len

        def all_match(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            """[B] every answer position's argmax equals `target` (teacher forcing: the greedy answer)."""
            return per_sample((logits.argmax(-1) == target).float()) == answer_len

        labels = torch.zeros(bsz, c, device=ws.hidden.device)
        agree = torch.zeros(bsz, c, dtype=torch.bool, device=ws.hidden.device)
        exit_correct = torch.zeros(bsz, c, dtype=torch.bool, device=ws.hidden.device)
        for j, logits in enumerate(exit_logits):
            same = all_match(logits, normal.argmax(-1))
            ce_exit = per_sample(F.cross_entropy(logits, targets_t, reduction="none")) / per_row
            agree[:, j] = same
            exit_correct[:, j] = has_reference & all_match(logits, fb.targets)
            within = ce_exit < self.config.loss_ratio * ce_normal + self.config.loss_slack
            labels[:, j] = (same if self.config.labels == "agreement" else same & within).float()
        normal_correct = has_reference & all_match(normal, fb.targets)
        return ExitLabels(feats, labels, eligible, agree, exit_correct, normal_correct)

    def collect(self, stop_after: int | None = None) -> ExitLabels:
        """Labels for every sample (this rank's share, summed over ranks); resumable per micro-batch."""
        n, c, d2 = len(self.calibration.samples), len(self.layers), self.feature_width
        dev = self.adapter.device
        feats = torch.zeros(n, c, d2, device=dev)
        labels = torch.zeros(n, c, device=dev)
        eligible = torch.zeros(n, c, device=dev)
        agree = torch.zeros(n, c, device=dev)
        exit_correct = torch.zeros(n, c, device=dev)
        normal_correct = torch.zeros(n, device=dev)
        done = torch.zeros(len(self.micro), device=dev)
        rank_tag = f"router-labels-rank{self.dist.rank}-of{self.dist.world_size}"
        ckpt = checkpoint_path(self.work_dir, rank_tag) if self.work_dir is not None else None
        if ckpt is not None:
            resumed = load_checkpoint(ckpt, None, None, self.run_id)
            if resumed is not None:
                _, extra = resumed
                feats, labels = extra["features"].to(dev), extra["labels"].to(dev)
                eligible, agree, done = extra["eligible"].to(dev), extra["agree"].to(dev), extra["done"].to(dev)
                exit_correct, normal_correct = extra["exit_correct"].to(dev), extra["normal_correct"].to(dev)
                if self.progress:
                    tqdm.write(f"router: resuming the label collection ({int(done.sum())} micro-batches done, {ckpt})")
        owned = [m for m in range(len(self.micro)) if m % self.dist.world_size == self.dist.rank]
        bar = tqdm(total=len(owned), initial=sum(int(done[m]) for m in owned), desc="router: labels",
                   unit="batch", disable=not self.progress)
        processed = 0
        for m in owned:
            if done[m]:
                continue
            ids = self.micro[m]
            got = self._collect_batch(ids)
            feats[ids], labels[ids], eligible[ids], agree[ids] = (got.features, got.labels, got.eligible.float(),
                                                                  got.agree.float())
            exit_correct[ids], normal_correct[ids] = got.exit_correct.float(), got.normal_correct.float()
            done[m] = 1
            processed += 1
            bar.update(1)
            stop = stop_after is not None and processed >= stop_after
            if ckpt is not None and (processed % self.config.checkpoint_every == 0 or stop):
                save_checkpoint(ckpt, None, None, int(done.sum()), self.run_id,
                                {"features": feats, "labels": labels, "eligible": eligible, "agree": agree,
                                 "exit_correct": exit_correct, "normal_correct": normal_correct, "done": done})
            if stop and done[owned].sum() < len(owned):
                bar.close()
                raise TrainingInterrupted(f"stopped after {processed} micro-batches")
        bar.close()
        for t in (feats, labels, eligible, agree, exit_correct, normal_correct):
            all_reduce_sum(t, self.dist)
        return ExitLabels(feats, labels, eligible.bool(), agree.bool(), exit_correct.bool(), normal_correct.bool())

    def save(self, result: RouterFitResult, recipe_path: Path) -> Path:
        """Write the router, the base recipe's module files and recipe.json into one folder."""
        folder = recipe_path.parent
        result.router.save(folder / ROUTER_FILE, self.sig.num_layers)
        self.base.copy_module_files(folder)
        result.recipe.base_dir = folder
        return result.recipe.save(recipe_path)

    # ---- router and threshold --------------------------------------------------------------------------
    def train(self, data: ExitLabels, router: torch.nn.Module | None = None) -> ExitRouter:
        """BCE on every (training sample, eligible layer) pair; full batch, deterministic on every rank.

        `router`: another module with ExitRouter's `logits(layer, features)` to train the same way (a
        benchmark comparing router designs); None trains a fresh ExitRouter seeded by the config."""
        cfg = self.config
        if router is None:
            router = ExitRouter(self.sig.hidden_size, self.layers, self.rank, cfg.lookahead)
            router.reset_parameters(cfg.seed)
        router.to(self.adapter.device)
        idx = torch.tensor(self.train_ids, device=self.adapter.device)
        feats, labels, elig = data.features[idx], data.labels[idx], data.eligible[idx]
        optim = torch.optim.Adam(router.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        bar = tqdm(range(cfg.train_steps), desc="router: training", unit="step", disable=not self.progress)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matmuls: thread synchronisation would cost more than the work
        try:
            for _ in bar:
                optim.zero_grad()
                logits = torch.stack([router.logits(layer, feats[:, j]) for j, layer in enumerate(self.layers)],
                                     dim=1)
                loss = F.binary_cross_entropy_with_logits(logits[elig], labels[elig])
                loss.backward()
                optim.step()
                bar.set_postfix(bce=f"{float(loss.detach()):.4f}")
        finally:
            torch.set_num_threads(threads)
        return router.eval()

    @torch.no_grad()
    def probabilities(self, router: ExitRouter, data: ExitLabels, ids: list[int]) -> torch.Tensor:
        """[len(ids), C] exit probabilities; -1 where the layer is not eligible."""
        idx = torch.tensor(ids, device=self.adapter.device)
        probs = torch.stack([torch.sigmoid(router.logits(layer, data.features[idx, j]))
                             for j, layer in enumerate(self.layers)], dim=1)
        return torch.where(data.eligible[idx], probs, torch.full_like(probs, -1.0))

    def choose_threshold(self, router: ExitRouter, data: ExitLabels,
                         text_tokens: int) -> tuple[float, float, list[float], list[dict[str, float]]]:
        """(threshold, held-out risk, held-out exit shares per layer, the whole trade-off curve)."""
        probs = self.probabilities(router, data, self.heldout)
        labels = data.labels[torch.tensor(self.heldout, device=probs.device)]
        flops = self._flops_per_exit(text_tokens)
        # thresholds below 1.0 only: the recipe's 1.0 means "never" (see router_exits), so a saturated
        # probability of exactly 1.0 passes every candidate here, as it will at inference
        never = 1.0 + 1e-6
        candidates = sorted({float(p) for p in probs.flatten().tolist() if 0 <= p < 1} | {never})
        curve = []
        best: tuple[float, float, float, list[float]] | None = None
        for theta in candidates:
            passes = probs >= theta
            first = torch.where(passes.any(1), passes.float().argmax(1), torch.full_like(probs[:, 0], -1).long())
            exited = first >= 0
            unsafe = exited & (labels.gather(1, first.clamp(min=0)[:, None])[:, 0] < 0.5)
            risk = float(unsafe.float().mean())
            rates = [float((first == j).float().mean()) for j in range(len(self.layers))]
            mean_flops = sum(r * flops[layer] for r, layer in zip(rates, self.layers)) + (1 - sum(rates)) * flops[None]
            reduction = 1 - mean_flops / flops["baseline"]
            curve.append({"threshold": theta, "risk": risk, "flops_reduction": reduction,
                          "exit_share": float(exited.float().mean())})
            if risk <= self.config.max_risk + 1e-12 and (best is None or reduction > best[2] + 1e-12):
                best = (theta, risk, reduction, rates)
        assert best is not None  # the never-exit threshold has zero risk
        return min(best[0], 1.0), best[1], best[3], curve

    def _flops_per_exit(self, text_tokens: int) -> dict[Any, float]:
        out: dict[Any, float] = {}
        probe = Recipe(model=self.sig, prune=self.base.prune, skip_attention=list(self.base.skip_attention),
                       exit=ExitSpec(ROUTER_FILE, self.layers, 0.5, self.rank, lookahead=self.config.lookahead,
                                     frozen=self.config.frozen))
        for layer in [*self.layers, None]:
            report = estimate(self.shape, probe, text_tokens=text_tokens, exits={layer: 1.0}, weight_formats=())
            out[layer] = report.pruned_flops
            out["baseline"] = report.baseline_flops
        return out

    # ---- all of it ------------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> RouterFitResult:
        start = time.perf_counter()
        data = self.collect(stop_after)
        router = self.train(data)
        text = self._mean_text_tokens()
        threshold, risk, rates, curve = self.choose_threshold(router, data, text)
        seconds = time.perf_counter() - start
        import edge_prune

        recipe = Recipe(model=self.sig, prune=self.base.prune, skip_attention=list(self.base.skip_attention),
                        exit=ExitSpec(ROUTER_FILE, self.layers, threshold, self.rank,
                                      [round(r, 6) for r in rates], lookahead=self.config.lookahead,
                                      frozen=self.config.frozen),
                        budget=self.base.budget)
        report = estimate(self.shape, recipe, text_tokens=text, weight_formats=())
        el = data.eligible
        recipe.provenance = {
            "method": "dyvte" if self.base.is_identity else f"{self.base.provenance.get('method', 'base')}+dyvte",
            "router_parameters": self.n_params,
            "decoder_parameters": decoder_parameters(self.shape),
            "calibration": self.calibration.source,
            "calibration_samples": len(self.calibration.samples),
            "heldout_samples": len(self.heldout),
            "threshold_rule": f"lowest expected FLOPs with held-out risk <= {self.config.max_risk}",
            "heldout_risk": risk,
            "label_rate_per_layer": [round(float(data.labels[:, j][el[:, j]].mean()) if el[:, j].any() else 0.0, 4)
                                     for j in range(len(self.layers))],
            "agree_rate_per_layer": [round(float(data.agree[:, j][el[:, j]].float().mean()) if el[:, j].any()
                                           else 0.0, 4) for j in range(len(self.layers))],
            "labels": self.config.labels,
            "loss_ratio": self.config.loss_ratio,
            "loss_slack": self.config.loss_slack,
            "predicted_flops_reduction": report.flops_reduction,
            "accounting": "exact",
            "text_tokens": text,
            "training": {"seconds": round(seconds, 1), "train_steps": self.config.train_steps,
                         "world_size": self.dist.world_size, "device": str(self.adapter.device),
                         "threads": torch.get_num_threads(), "seed": self.config.seed,
                         "weight_decay": self.config.weight_decay},
            "threshold_curve": [{k: round(v, 5) for k, v in row.items()} for row in curve[:: max(1, len(curve) // 40)]],
            "base": self.base.provenance,
            "edge_prune": edge_prune.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        return RouterFitResult(recipe, router, threshold, risk, rates, seconds, curve)

    def _mean_text_tokens(self) -> int:
        tok = self.adapter.processor.tokenizer
        lengths = [len(tok(self.adapter.format_prompt(s.prompt, with_image=True))["input_ids"]) - 1
                   for s in self.calibration.samples[:64]]
        return round(sum(lengths) / len(lengths))
