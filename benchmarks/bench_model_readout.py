"""Where does a benchmark-model checkpoint lose the answer? Linear probes at the predicting token.

For each question family, collects at the answer-predicting (last prompt) position every
attention head's output (before o_proj) and the residual stream after every decoder layer,
fits a linear probe for the answer on the calib split and scores it on the test split. A
family whose answer the image's tokens carry but no head output does (the published model:
shape 0.99 from an object's pooled visual tokens, 0.62 from the guided head) is lost in the
heads' value path, not in the later layers.

    .venv/bin/python benchmarks/bench_model_readout.py [MODEL_DIR] [--families shape,relation] [--train 700 --test 300]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from edge_prune.bench.generator import FAMILIES, iter_items
from edge_prune.bench.tokenizer import prompt

MODEL = Path(__file__).resolve().parent / "models" / "toyvqa-llava"


class PredictingToken:
    """Head outputs and residual states of a model at the last prompt position, per request."""

    def __init__(self, model_dir: Path) -> None:
        self.model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.processor = LlavaProcessor.from_pretrained(str(model_dir))
        self.processor.tokenizer.padding_side = "left"  # the last position is every row's predicting token
        self.layers = self.model.model.language_model.layers
        self.head_dim = self.layers[0].self_attn.head_dim
        self._heads: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda _m, args, i=i: self._heads.__setitem__(i, args[0][:, -1]))

    @torch.no_grad()
    def features(self, split: str, n: int, family: str) -> tuple[dict[str, torch.Tensor], list[str], float]:
        """({name: [n, dim]}, answers, the model's own first-token accuracy)."""
        feats: dict[str, list[torch.Tensor]] = {}
        answers, correct = [], 0
        items = list(iter_items(split, n, [family]))
        tok = self.processor.tokenizer
        for b in range(0, len(items), 16):
            chunk = items[b:b + 16]
            inputs = self.processor(images=[it.image for it in chunk], text=[prompt(it.question) for it in chunk],
                                    return_tensors="pt", padding=True)
            out = self.model(**inputs, output_hidden_states=True)
            first = out.logits[:, -1].argmax(-1).tolist()
            correct += sum(tok.decode([t]).strip() == it.answer for t, it in zip(first, chunk))
            for i in range(len(self.layers)):
                heads = self._heads[i].view(len(chunk), -1, self.head_dim)
                for h in range(heads.shape[1]):
                    feats.setdefault(f"L{i}h{h}", []).append(heads[:, h])
                feats.setdefault(f"res{i + 1}", []).append(out.hidden_states[i + 1][:, -1])
            answers += [it.answer for it in chunk]
        return {k: torch.cat(v) for k, v in feats.items()}, answers, correct / len(items)


def probe_accuracy(train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor,
                   classes: int, steps: int = 300) -> float:
    """Held-out accuracy of a standardised linear probe (Adam, light weight decay)."""
    mean, std = train.mean(0), train.std(0) + 1e-5
    a, b = (train - mean) / std, (test - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(a.shape[1], classes)
    opt = torch.optim.Adam(linear.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(linear(a), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((linear(b).argmax(-1) == y_test).float().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", type=Path, default=MODEL)
    ap.add_argument("--families", default="shape,relation,exists,detail")
    ap.add_argument("--train", type=int, default=700, help="calib items per family to fit the probes on")
    ap.add_argument("--test", type=int, default=300, help="test items per family to score them on")
    args = ap.parse_args(argv)
    families = args.families.split(",")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; expected some of {', '.join(FAMILIES)}")
    torch.set_num_threads(2)
    probe = PredictingToken(args.model)
    for family in tqdm(families, desc="families"):
        train, y_train, _ = probe.features("calib", args.train, family)
        test, y_test, model_acc = probe.features("test", args.test, family)
        labels = sorted(set(y_train) | set(y_test))
        yt = torch.tensor([labels.index(a) for a in y_train])
        ye = torch.tensor([labels.index(a) for a in y_test])
        majority = float((ye == yt.mode().values).float().mean())
        print(f"\n{family}: model {model_acc:.3f}, majority answer {majority:.3f}")
        rows = {name: probe_accuracy(train[name], yt, test[name], ye, len(labels)) for name in train}
        for i in range(len(probe.layers)):
            heads = "  ".join(f"h{h} {rows[f'L{i}h{h}']:.2f}" for h in range(len(train) // len(probe.layers) - 1))
            print(f"  layer {i}: heads {heads}  | residual after {rows[f'res{i + 1}']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
