"""How far an exit router that reads DyVTE's inputs can go on the benchmark model.

`exit_ceiling.py` bounds exits with oracles that know each answer. This asks the narrower question
behind issue 5's router figure (>= 40% fewer prefill FLOPs at <= 0.5 points): given the router's
inputs (the text tokens' mean state and the last prompt token's state after each candidate layer),
how many FLOPs can any threshold rule save at that accuracy? It collects the label pass of
`edge-prune fit --method dyvte` (features, exit labels and, per request and candidate layer, whether
the greedy answer after that exit is the reference) on the benchmark's train split and on test
items, then scores on the test items:

- the product's router (rank and training as `edge-prune fit --method dyvte --exit-labels agreement`)
  on the committed calibration size and on 4x as many samples, with the threshold the fit picks on
  held-out calibration data at --max-risk 0.005 / 0.01 / 0.02;
- the same routers with the threshold chosen on the test items themselves (one threshold, and one per
  layer): the best any threshold could do with that ranking of requests;
- an unconstrained probe: one MLP per (question family, layer), ~200x the router's parameters, told
  the family, trained on the 4x calibration set, thresholds chosen on the test items: what DyVTE's
  inputs carry at all, beyond which family a question is;
- product-sized alternatives to the router, each within its 1% parameter budget, trained and thresholded
  as the fit does: the router with the logit lens of the last prompt state added to its input (the final
  norm and LM head on it: top probability, top-two margin, normalised entropy), one low-rank MLP per
  layer instead of one shared, and a shared first layer with per-layer second layers;
- the label oracles: one exit layer per family (`exit_ceiling.py`'s search), and per request (the
  answer-knowing bounds).

Accuracy here is the teacher-forced greedy answer equal to the reference (answer tokens then end of
sequence), the harness's rule up to answers that differ after their first word.

    .venv/bin/python benchmarks/router_ceiling.py [--n-train 10240] [--n-test 2000] [--labels-cache FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge_prune.bench.evaluate import weights_sha256
from edge_prune.bench.generator import FAMILIES, iter_items
from edge_prune.cost import decoder_parameters
from edge_prune.engine import PrunedEngine
from edge_prune.fit.calibration import CalibrationSample, CalibrationSet
from edge_prune.fit.routers import ROUTER_BUDGET, ExitLabels, RouterConfig, RouterFitter

from exit_ceiling import per_family_oracle  # sibling benchmark: the same per-family search

ROOT = Path(__file__).resolve().parent
MODEL = ROOT / "models" / "toyvqa-llava"
COMMITTED_N = 2560  # calibration samples of the committed dyvte-agree router
RISKS = (0.005, 0.01, 0.02)
ALLOWANCES = (0.25, 0.5, 1.0)  # accuracy drops (points) at which the frontiers are read
PROBE_HIDDEN = 64
LENS_SCALE = 3.0  # lens statistics lie in [0, 1]; the RMS-normalised states' entries are of order 1


def bench_set(split: str, n: int) -> tuple[CalibrationSet, list[str]]:
    items = list(iter_items(split, n))
    samples = [CalibrationSample(it.image, it.question, f"bench:{split}:{it.index}", it.answer) for it in items]
    return CalibrationSet(samples, f"bench:{split}", []), [it.family for it in items]


def subset(data: ExitLabels, n: int) -> ExitLabels:
    return ExitLabels(**{f.name: getattr(data, f.name)[:n] for f in fields(data)})


class Scorer:
    """Accuracy and mean FLOPs reduction of exit decisions on the test items."""

    def __init__(self, test: ExitLabels, saving: torch.Tensor):
        self.test, self.saving = test, saving  # saving[j]: FLOPs reduction of an exit after candidate j
        self.unpruned = float(test.normal_correct.float().mean())

    def first_exit(self, probs: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
        passes = probs >= torch.tensor(thresholds)[None]
        return torch.where(passes.any(1), passes.float().argmax(1), torch.full_like(probs[:, 0], -1).long())

    def score(self, first: torch.Tensor) -> tuple[float, float]:
        """(accuracy drop in points, mean FLOPs reduction) of per-request exit choices (-1: no exit)."""
        exited = first >= 0
        at = first.clamp(min=0)[:, None]
        right = torch.where(exited, self.test.exit_correct.gather(1, at)[:, 0], self.test.normal_correct)
        reduction = torch.where(exited, self.saving[first.clamp(min=0)], torch.zeros(len(first)))
        return 100 * (self.unpruned - float(right.float().mean())), float(reduction.mean())

    def best_single(self, probs: torch.Tensor, allowance: float) -> tuple[float, float, list[float]]:
        """The threshold (one for every layer) chosen on the test items: most FLOPs within the allowance."""
        best = (0.0, 0.0, [2.0] * probs.shape[1])
        for theta in sorted({float(p) for p in probs.flatten() if p >= 0}):
            drop, red = self.score(self.first_exit(probs, [theta] * probs.shape[1]))
            if drop <= allowance + 1e-9 and red > best[1]:
                best = (drop, red, [theta] * probs.shape[1])
        return best

    def best_per_layer(self, probs: torch.Tensor, allowance: float,
                       single: tuple[float, float, list[float]]) -> tuple[float, float, list[float]]:
        """One threshold per layer, by coordinate ascent from `single` (best_single's answer), on the test items."""
        drop, red, th = single
        grid = torch.linspace(0, 1, 400)  # quantiles: a few hundred thresholds per layer are enough to search
        candidates = [sorted({float(q) for q in torch.quantile(probs[:, j][probs[:, j] >= 0], grid)} | {2.0})
                      for j in range(probs.shape[1])]
        for _ in range(8):
            improved = False
            for j, cands in enumerate(candidates):
                for theta in cands:
                    trial = th[:j] + [theta] + th[j + 1:]
                    d, r = self.score(self.first_exit(probs, trial))
                    if d <= allowance + 1e-9 and r > red + 1e-9:
                        drop, red, th, improved = d, r, trial, True
            if not improved:
                break
        return drop, red, th

    def family_oracle(self, families: list[str], allowance: float) -> tuple[float, float]:
        """One exit layer (or none) per family, the best of every combination (exit_ceiling's search)."""
        t = self.test
        exited_right = torch.where(t.eligible, t.exit_correct, t.normal_correct[:, None])
        correct = torch.cat([exited_right, t.normal_correct[:, None]], 1).numpy()  # last column: no exit
        saving = np.array([*self.saving.tolist(), 0.0])
        floor = math.ceil(int(t.normal_correct.sum()) - allowance / 100 * len(families) - 1e-9)
        columns = per_family_oracle(correct, saving, np.array(families), floor)["columns"]
        no_exit = len(saving) - 1
        return self.score(torch.tensor([-1 if columns[f] == no_exit else columns[f] for f in families]))

    def item_oracle(self, allowance: float) -> tuple[float, float]:
        """Per request, the earliest exit whose answer is right (a lucky guess counts: a loose bound), the
        earliest one for requests the unpruned model gets wrong anyway, and the allowance spent on requests
        no exit answers right."""
        t = self.test
        right_exit = t.exit_correct & t.eligible
        first = torch.where(right_exit.any(1), right_exit.float().argmax(1), torch.full((len(right_exit),), -1))
        first[(first < 0) & ~t.normal_correct] = 0
        lost = ((first < 0) & t.normal_correct).nonzero()[:, 0]  # these exit only by losing their answer
        first[lost[:int(allowance / 100 * len(first))]] = 0
        return self.score(first)


def heldout_rows(fitter: RouterFitter, router: torch.nn.Module, data: ExitLabels, test_probs: torch.Tensor,
                 scorer: Scorer, text: int, name: str) -> list[dict]:
    """Rows for the threshold the fit picks on `fitter`'s held-out share of `data`, per --max-risk."""
    rows, config = [], fitter.config
    for risk in RISKS:
        fitter.config = replace(config, max_risk=risk)
        threshold, _, _, _ = fitter.choose_threshold(router, data, text)
        drop, red = scorer.score(scorer.first_exit(test_probs, [threshold] * len(fitter.layers)))
        rows.append({"router": name, "calibration": len(data.labels),
                     "threshold": f"held-out, --max-risk {risk}", "drop": drop, "flops_reduction": red})
    fitter.config = config
    return rows


def test_chosen_rows(scorer: Scorer, probs: torch.Tensor, router: str, calibration: int) -> list[dict]:
    """Rows for thresholds chosen on the test items: one for every layer, then one per layer, per allowance."""
    rows = []
    for allowance in ALLOWANCES:
        single = scorer.best_single(probs, allowance)
        for rule, (drop, red, _) in (("test-chosen, one", single),
                                     ("test-chosen, per layer", scorer.best_per_layer(probs, allowance, single))):
            rows.append({"router": router, "calibration": calibration, "threshold": f"{rule}, drop <= {allowance}",
                         "drop": drop, "flops_reduction": red})
    return rows


def fit_probe(train: ExitLabels, families: list[str], test: ExitLabels, test_families: list[str]) -> torch.Tensor:
    """Unconstrained probe: one MLP per (family, layer) on DyVTE's inputs; [N_test, C] exit probabilities."""
    torch.manual_seed(0)
    probs = torch.full(test.labels.shape, -1.0)
    for family in FAMILIES:
        tr = torch.tensor([i for i, f in enumerate(families) if f == family])
        te = torch.tensor([i for i, f in enumerate(test_families) if f == family])
        for j in range(train.labels.shape[1]):
            y = train.labels[tr, j]
            if y.min() == y.max():
                probs[te, j] = float(y[0])
                continue
            mlp = torch.nn.Sequential(torch.nn.Linear(train.features.shape[-1], PROBE_HIDDEN), torch.nn.GELU(),
                                      torch.nn.Linear(PROBE_HIDDEN, 1))
            opt = torch.optim.Adam(mlp.parameters(), lr=3e-3, weight_decay=1e-2)
            for _ in range(400):
                opt.zero_grad()
                F.binary_cross_entropy_with_logits(mlp(train.features[tr, j])[:, 0], y).backward()
                opt.step()
            with torch.no_grad():
                probs[te, j] = torch.sigmoid(mlp(test.features[te, j])[:, 0])
    return torch.where(test.eligible, probs, torch.full_like(probs, -1.0))


def lens_statistics(adapter, features: torch.Tensor) -> torch.Tensor:
    """[..., 3] logit lens of the last prompt state: top probability, top-two margin, entropy / log(vocab).

    The router input's second half is that state RMS-normalised; the final norm is an RMSNorm, which
    ignores the state's scale, so it reads the same from that half as from the state itself."""
    d = features.shape[-1] // 2
    with torch.no_grad():
        probs = adapter.lm_head(adapter.final_norm(features[..., d:])).float().softmax(-1)
    top = probs.topk(2, -1).values
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(probs.shape[-1])
    return torch.stack([top[..., 0], top[..., 0] - top[..., 1], entropy], -1)


class RouterVariant(torch.nn.Module):
    """A product-sized alternative to the shared router (`ExitRouter`), same training and threshold rule.

    "shared": ExitRouter's layout on a wider input (for the lens statistics); "per layer": one rank-r MLP per
    candidate layer; "two-level": ExitRouter's shared first layer, then a rank-r2 layer and output per layer."""

    def __init__(self, kind: str, layers: list[int], inputs: int, rank: int, rank2: int = 16):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        n, own_first = len(layers), kind == "per layer"
        self.kind, self.layers = kind, list(layers)
        self.w1 = torch.nn.Parameter(torch.randn(n if own_first else 1, rank, inputs, generator=gen) / inputs**0.5)
        self.b1 = torch.nn.Parameter(torch.zeros(n if own_first else 1, rank))
        self.layer_embed = torch.nn.Parameter(torch.zeros(n, rank))
        width = rank
        if kind == "two-level":
            self.w_mid = torch.nn.Parameter(torch.randn(n, rank2, rank, generator=gen) / rank**0.5)
            self.b_mid = torch.nn.Parameter(torch.zeros(n, rank2))
            width = rank2
        self.w2 = torch.nn.Parameter(torch.randn(1 if kind == "shared" else n, width, generator=gen) / width**0.5)
        self.layer_bias = torch.nn.Parameter(torch.zeros(n))

    def logits(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        j = self.layers.index(layer)
        first = j if self.w1.shape[0] > 1 else 0
        h = F.gelu(features @ self.w1[first].T + self.b1[first] + self.layer_embed[j])
        if self.kind == "two-level":
            h = F.gelu(h @ self.w_mid[j].T + self.b_mid[j])
        return h @ self.w2[j if self.w2.shape[0] > 1 else 0] + self.layer_bias[j]


def variant_rows(engine: PrunedEngine, fitter: RouterFitter, train: ExitLabels, test: ExitLabels, scorer: Scorer,
                 text: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Rows (held-out thresholds as the fit picks them, then test-chosen) for each product-sized variant."""
    d2, layers = train.features.shape[-1], fitter.layers
    with_lens = {name: replace(data, features=torch.cat(
        [data.features, LENS_SCALE * lens_statistics(engine.adapter, data.features)], -1))
        for name, data in (("train", train), ("test", test))}
    budget = ROUTER_BUDGET * decoder_parameters(engine.adapter.shape)
    variants = [("+ logit lens inputs, shared", RouterVariant("shared", layers, d2 + 3, fitter.rank), with_lens),
                ("per-layer heads", RouterVariant("per layer", layers, d2, 9), {"train": train, "test": test}),
                ("two-level", RouterVariant("two-level", layers, d2, fitter.rank), {"train": train, "test": test})]
    rows, probs_by_name = [], {}
    for label, variant, data in variants:
        n_params = sum(p.numel() for p in variant.parameters())
        assert n_params <= budget, f"{label}: {n_params} parameters, over the {int(budget)} budget"
        name = f"variant: {label} ({n_params} parameters)"
        variant = fitter.train(data["train"], router=variant)
        probs = fitter.probabilities(variant, data["test"], list(range(len(test.labels))))
        rows += heldout_rows(fitter, variant, data["train"], probs, scorer, text, name)
        rows += test_chosen_rows(scorer, probs, name, len(train.labels))
        probs_by_name[name] = probs
    return rows, probs_by_name


def auc(score: torch.Tensor, label: torch.Tensor) -> float | None:
    pos, neg = score[label > 0.5], score[label < 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return None
    return float((pos[:, None] > neg[None]).float().mean() + 0.5 * (pos[:, None] == neg[None]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--n-train", type=int, default=4 * COMMITTED_N)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "results" / "router_ceiling"))
    ap.add_argument("--labels-cache", help="file to keep the label passes in, and reuse them from when the model, "
                                           "calibration and settings match (they take ~10 of the 12 minutes)")
    args = ap.parse_args()
    start = time.perf_counter()
    engine = PrunedEngine.load(args.model)
    train_set, train_families = bench_set("train", args.n_train)
    test_set, test_families = bench_set("test", args.n_test)
    config = RouterConfig(labels="agreement")
    big = RouterFitter(engine, train_set, config)
    model_sha = weights_sha256(args.model)
    key = [big.run_id, model_sha, args.n_test]
    cached = torch.load(args.labels_cache) if args.labels_cache and Path(args.labels_cache).is_file() else None
    reused = cached is not None and cached["key"] == key
    if reused:
        train_data, test_data = ExitLabels(**cached["train"]), ExitLabels(**cached["test"])
    else:
        train_data, test_data = big.collect(), RouterFitter(engine, test_set, config).collect()
        if args.labels_cache:
            torch.save({"key": key, "train": vars(train_data), "test": vars(test_data)},
                       args.labels_cache)
    text = big._mean_text_tokens()
    flops = big._flops_per_exit(text)
    saving = torch.tensor([1 - flops[layer] / flops["baseline"] for layer in big.layers])
    scorer = Scorer(test_data, saving)

    rows, test_probs = [], {}
    committed = "router, committed calibration size"
    for name, n in ((committed, min(COMMITTED_N, args.n_train)),
                    ("router, 4x calibration", args.n_train)):
        fitter = RouterFitter(engine, CalibrationSet(train_set.samples[:n], train_set.source, []), config,
                              progress=False)
        data = subset(train_data, n)
        router = fitter.train(data)
        probs = fitter.probabilities(router, test_data, list(range(args.n_test)))
        rows += heldout_rows(fitter, router, data, probs, scorer, text, name)
        rows += test_chosen_rows(scorer, probs, name, n)
        test_probs[name] = probs
        if name == committed:  # the variants train on the same samples
            more_rows, more_probs = variant_rows(engine, fitter, data, test_data, scorer, text)
            rows += more_rows
            test_probs.update(more_probs)
    probe = fit_probe(subset(train_data, args.n_train), train_families, test_data, test_families)
    test_probs["probe"] = probe
    rows += test_chosen_rows(scorer, probe, "probe: MLP per (family, layer), family given", args.n_train)
    for name, oracle in (("oracle: one exit layer per family", lambda a: scorer.family_oracle(test_families, a)),
                         ("oracle: per request (loose)", scorer.item_oracle)):
        for allowance in ALLOWANCES:
            drop, red = oracle(allowance)
            rows.append({"router": name, "calibration": None, "threshold": f"drop <= {allowance}", "drop": drop,
                         "flops_reduction": red})

    # within-family ranking: does the router tell a safe request from an unsafe one of the same kind?
    within = []
    for family in FAMILIES:
        idx = torch.tensor([i for i, f in enumerate(test_families) if f == family])
        for j, layer in enumerate(big.layers):
            label = test_data.labels[idx, j]
            entry = {"family": family, "layer": layer, "safe_share": float(label.mean())}
            for name, probs in test_probs.items():
                entry[name] = auc(probs[idx, j], label)
            within.append(entry)
    seconds = time.perf_counter() - start
    write(Path(args.out), rows, within, scorer, big.layers, saving, args, seconds, list(test_probs), reused,
          model_sha)


def write(out: Path, rows: list[dict], within: list[dict], scorer: Scorer, layers: list[int], saving: torch.Tensor,
          args: argparse.Namespace, seconds: float, auc_names: list[str], reused: bool, model_sha: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"rows": rows, "within_family_auc": within, "unpruned_accuracy": scorer.unpruned,
               "exit_layers": layers, "flops_reduction_per_exit": saving.tolist(), "n_train": args.n_train,
               "n_test": args.n_test, "seconds": round(seconds, 1), "labels_reused": reused, "model_sha256": model_sha}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# Exit routers on DyVTE's inputs: how many FLOPs any threshold can save (benchmark model)",
        "",
        f"Label pass of `edge-prune fit --method dyvte --exit-labels agreement` on {args.n_train} train-split "
        f"samples and {args.n_test} test items; unpruned accuracy on them {100 * scorer.unpruned:.2f}% "
        "(teacher-forced greedy answer equal to the reference). Exit after layer "
        + ", ".join(f"{layer}: {100 * float(s):.1f}%" for layer, s in zip(layers, saving))
        + f" fewer prefill FLOPs (exact accounting). Model weights sha256 {model_sha[:16]}. "
        "Command: `.venv/bin/python benchmarks/router_ceiling.py`. "
        f"Wall time {seconds / 60:.0f} min" + (" (label passes reused from --labels-cache; they take ~10 min on 2 "
                                               "cores)." if reused else "."),
        "",
        "Rows marked *test-chosen* pick their thresholds on the very test items they are scored on: no fit "
        "can do better with that ranking of requests. The probe has no parameter budget and is told the "
        "question family. *Variants* are product-sized alternatives to the router (each within the 1% parameter "
        "budget), trained on the committed calibration size and thresholded as the fit does.",
        "",
        "| router | calibration | threshold | Δ accuracy (pt) | FLOPs reduction |",
        "|---|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['router']} | {r['calibration'] or '-'} | {r['threshold']} | {-r['drop']:+.2f} | "
                     f"{100 * r['flops_reduction']:.1f}% |")
    lines += ["", "## Within-family ranking (test AUC of the exit probability against the label; 0.5 = none)", "",
              "| family | exit after | safe share | " + " | ".join(auc_names) + " |",
              "|---|---:|---:|" + "---:|" * len(auc_names)]
    for w in within:
        cells = " | ".join("-" if w[n] is None else f"{w[n]:.2f}" for n in auc_names)
        lines.append(f"| {w['family']} | {w['layer']} | {100 * w['safe_share']:.1f}% | {cells} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
