"""Does a benchmark-model checkpoint read its image? Per-layer residual norms and image sensitivity.

For one calibration question asked about several different images, prints per decoder layer:
the residual-stream norm at image and at the answer-predicting (last) position, what the
layer's attention and MLP add there, and how far the last position moves when only the image
changes. A model stuck at answer priors shows a last position that barely moves, and (what
the runs so far showed) an MLP in layer 0 that writes a near-constant vector hundreds of times
larger than the token embeddings into every position.

    .venv/bin/python benchmarks/bench_model_diagnostics.py [MODEL_DIR] [--images 6]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from edge_prune.bench.generator import make_item
from edge_prune.bench.tokenizer import prompt

MODEL = Path(__file__).resolve().parent / "models" / "toyvqa-llava"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", type=Path, default=MODEL)
    ap.add_argument("--images", type=int, default=6, help="different images asked the same question")
    args = ap.parse_args(argv)
    model = LlavaForConditionalGeneration.from_pretrained(str(args.model), dtype=torch.float32).eval()
    processor = LlavaProcessor.from_pretrained(str(args.model))
    question = make_item("calib", 0, "colour").question
    layers = model.model.language_model.layers
    added: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        layer.self_attn.register_forward_hook(lambda _m, _i, out, i=i: added.__setitem__(f"attn{i}", out[0]))
        layer.mlp.register_forward_hook(lambda _m, _i, out, i=i: added.__setitem__(f"mlp{i}", out))
    states, parts, answers = [], [], []
    for index in range(args.images):
        item = make_item("calib", index, "colour")
        inputs = processor(images=item.image, text=prompt(question), return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
        image = inputs["input_ids"][0] == model.config.image_token_id
        states.append([(h[0, image].norm(dim=-1).mean(), h[0, -1]) for h in out.hidden_states])
        parts.append({k: (v[0, image].norm(dim=-1).mean(), v[0, -1].norm()) for k, v in added.items()})
        top = out.logits[0, -1].softmax(-1).max(-1)
        answers.append((processor.tokenizer.decode([int(top.indices)]).strip(), float(top.values)))
    print(f"question: {question!r} asked about {args.images} calibration images")
    print(f"top answers: {answers}")
    print("layer | image-pos norm | last-pos norm | attn adds (img/last) | mlp adds (img/last) | last pos moves across images")
    for layer in range(len(out.hidden_states)):
        img_norm = torch.stack([s[layer][0] for s in states]).mean()
        last = torch.stack([s[layer][1] for s in states])
        spread = (last - last.mean(0)).norm(dim=-1).mean()
        row = f"{layer:5d} | {img_norm:14.1f} | {last.norm(dim=-1).mean():13.1f} |"
        if layer < len(layers):
            a = [torch.stack([p[f"attn{layer}"][j] for p in parts]).mean() for j in (0, 1)]
            m = [torch.stack([p[f"mlp{layer}"][j] for p in parts]).mean() for j in (0, 1)]
            row += f" {a[0]:8.1f} / {a[1]:8.1f} | {m[0]:8.1f} / {m[1]:8.1f} |"
        else:
            row += " (final norm)" + " " * 30 + "|"
        print(f"{row} {spread:8.2f} ({100 * spread / last.norm(dim=-1).mean():.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
