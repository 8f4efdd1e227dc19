"""Where 8da4w loses accuracy on the benchmark model: eager torchao variants of the language model.

8da4w with torchao's default affine scales scored 1.2 points under fp32 on 500 test items as a .pte
(benchmarks/results/executorch_run16.md). This script quantizes the decoder eagerly,
as the converter does (torchao `quantize_`), with one part changed at a time: the scale algorithm
(HQQ), lm_head precision, 8-bit weights for some projections, no activation quantization, and prints
accuracy and agreement with fp32 per variant. The eager fp32 and affine 8da4w rows match the .pte
artifacts' accuracy, so the other rows say what a converter option buys, with one exception measured
on the .pte: with an int8 weight-only lm_head the keep-all artifact scored 87.8% (eager: 91.4%). Only the HQQ row went into the
converter. Choose on --split calib:
500 items move a point with 5 answers, so agreement with fp32 is the steadier figure.

    .venv/bin/python benchmarks/quant_sensitivity.py [--split test] [--n 500] [--variant NAME ...]

Prints a markdown table; benchmarks/results/quant_sensitivity.md holds the calib and test tables.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
MODEL = ROOT / "models" / "toyvqa-llava"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def configs() -> dict[str, object]:
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig

    from torchao.quantization.quantize_.workflows import IntxChooseQParamsAlgorithm

    return {
        "8da4w": Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)),
        "8da4w hqq": Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(32),
            intx_choose_qparams_algorithm=IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY),
        "8da8w": Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
        "int8 weight-only": IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
        "int4 weight-only": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
    }


# variant -> (decoder projections' scheme, projections held at 8da8w instead, lm_head's scheme or None);
# "converter" runs edge-prune convert's own quantize_language_model, so that row cannot drift from it
VARIANTS = {
    "fp32": (None, (), None),
    "8da4w, affine scales (torchao's default)": ("8da4w", (), "8da4w"),
    "8da4w, HQQ scales (the converter's)": ("converter", (), None),  # converters.executorch's own quantizer
    "8da4w, HQQ scales, lm_head int8 weight-only": ("8da4w hqq", (), "int8 weight-only"),
    "8da4w, lm_head fp32": ("8da4w", (), None),
    "8da4w, v_proj + down_proj 8da8w": ("8da4w", ("v_proj", "down_proj"), "8da4w"),
    "8da4w, attention 8da8w": ("8da4w", ATTENTION, "8da4w"),
    "8da8w everywhere": ("8da8w", (), "8da8w"),
    "int4 weight-only (no activation quant)": ("int4 weight-only", (), "int4 weight-only"),
}


def quantized(base: nn.Module, scheme: str | None, eight_bit: tuple[str, ...], head: str | None) -> nn.Module:
    from torchao.quantization import quantize_

    model = copy.deepcopy(base)
    if scheme == "converter":
        from edge_prune.converters.executorch import DEFAULT_GROUP_SIZE, quantize_language_model

        parts = SimpleNamespace(language_model=model.model.language_model, lm_head=model.lm_head)
        quantize_language_model(parts, "8da4w", DEFAULT_GROUP_SIZE)
        return model
    table = configs()
    layers = model.model.language_model.layers

    def named(names: tuple[str, ...], inside: bool):
        return lambda m, fqn: isinstance(m, nn.Linear) and (fqn.split(".")[-1] in names) == inside

    if eight_bit:
        quantize_(layers, table["8da8w"], filter_fn=named(eight_bit, True))
    if scheme:
        quantize_(layers, table[scheme], filter_fn=named(eight_bit, False))
    if head:
        quantize_(nn.ModuleDict({"lm_head": model.lm_head}), table[head], filter_fn=lambda m, _f: isinstance(m, nn.Linear))
    return model


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from edge_prune.bench.generator import iter_items
    from edge_prune.bench.tokenizer import prompt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--variant", action="append", help="run only this variant (repeatable; fp32 always runs first)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    processor = AutoProcessor.from_pretrained(args.model)
    base = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    items = list(iter_items(args.split, args.n))
    inputs = [processor(images=it.image, text=prompt(it.question), return_tensors="pt") for it in items]
    reference: list[int] = []
    print(f"| variant ({args.split}, n={args.n}) | accuracy | vs fp32 | same answer as fp32 |\n|---|---|---|---|")
    wanted = set(args.variant or VARIANTS)
    if wanted - set(VARIANTS):
        ap.error(f"unknown variant(s) {sorted(wanted - set(VARIANTS))}; choose from {list(VARIANTS)}")
    for name, spec in VARIANTS.items():
        if name != "fp32" and name not in wanted:
            continue
        model = quantized(base, *spec)
        with torch.no_grad():  # the benchmark's answers are single tokens: the first one decides
            answers = [int(model(**x).logits[0, -1].argmax()) for x in tqdm(inputs, desc=name, leave=False)]
        reference = reference or answers
        correct = sum(processor.tokenizer.decode([a]).strip() == it.answer for a, it in zip(answers, items))
        if name == "fp32":
            fp32 = correct
        same = sum(a == b for a, b in zip(answers, reference))
        print(f"| {name} | {correct / args.n:.1%} | {100 * (correct - fp32) / args.n:+.1f} pt | {same / args.n:.1%} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
