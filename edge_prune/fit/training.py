"""Shared machinery for training small modules on a frozen LLaVA: teacher-forced batches, a
differentiable masked forward, data-parallel sums, and resumable checkpoints.

Training keeps every token in the sequence and removes dropped visual tokens by masking them
out as keys (multiplicatively, so a straight-through keep mask carries gradients). With a hard
0/1 mask that is exactly the engine's index removal: a layer's attention sees the tokens that
entered it, and a dropped token is never a key again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as torch_dist

from edge_prune.engine import PrunedEngine, WorkingSet
from edge_prune.errors import InputError
from edge_prune.fit.calibration import CalibrationSample
from edge_prune.fit.distributed import Dist
from edge_prune.recipe import Recipe

CHECKPOINT_DIR = ".edge-prune-train"


def choose_device(requested: str) -> str:
    """'auto' picks CUDA when present, else CPU; anything else is passed through."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {requested}: CUDA is not available on this machine; use --device cpu or auto")
    return requested


# ---- teacher-forced batches ------------------------------------------------------------------------
@dataclass
class ForcedBatch:
    """Prompt + reference answer in one packed working set.

    `ws.text_after` holds the question only (the text after the image that exists at inference),
    so scorers and routers see what they see in the engine; the answer tokens ride along after
    it and, the attention being causal, change nothing before them.
    """

    ws: WorkingSet
    pred: torch.Tensor  # [B, T] positions whose next-token distribution is matched
    targets: torch.Tensor  # [P] reference next token per pred position (-1: take the unpruned argmax)
    last_prompt: torch.Tensor  # [B] index of the last prompt token
    counts: list[list[int]]  # base schedule: visual tokens after each layer, per sample
    sample_ids: list[int]

    @property
    def size(self) -> int:
        return len(self.sample_ids)


def forced_batch(engine: PrunedEngine, samples: Sequence[CalibrationSample], ids: Sequence[int],
                 recipe: Recipe | None = None) -> ForcedBatch:
    """Tokenize prompt + answer, run the vision path, and pack as the engine does.
    `counts` follow `recipe` (default: the engine's)."""
    adapter = engine.adapter
    tok = adapter.processor.tokenizer
    texts, answers = [], []
    for s in samples:
        prompt = adapter.format_prompt(s.prompt, with_image=True)
        if s.answer:
            tail = f" {s.answer}{tok.eos_token}"
            answers.append(tok(tail, add_special_tokens=False)["input_ids"])
            texts.append(prompt + tail)
        else:
            answers.append([])
            texts.append(prompt)
    batch = adapter.prepare(texts, [s.image for s in samples])
    for b, ans in enumerate(answers):
        if ans and batch.input_ids[b, -len(ans):].tolist() != ans:
            raise InputError(f"calibration sample {samples[b].source}: the answer {samples[b].answer!r} does not "
                             "tokenize the same after the prompt as on its own; use a plain-text answer")
    with torch.no_grad():
        embeds, visual = adapter.embed(batch, adapter.image_features(batch))
        ws = engine.initial_working_set(embeds, visual, batch.attention_mask.bool())
    if bool((ws.visual.sum(1) == 0).any()):
        raise InputError("a calibration prompt carries no image; every training sample needs one")
    bsz, width = ws.valid.shape
    length = ws.valid.sum(1)
    idx = torch.arange(width, device=ws.valid.device)[None, :]
    n_ans = torch.tensor([len(a) for a in answers], device=ws.valid.device)[:, None]
    answer = (idx >= length[:, None] - n_ans) & (idx < length[:, None])
    pred_start = length[:, None] - n_ans.clamp(min=1) - (n_ans > 0).long()
    pred = (idx >= pred_start) & (idx < length[:, None] - (n_ans > 0).long())
    ws.text_after = ws.text_after & ~answer
    targets = []
    for ans in answers:
        targets.extend(ans if ans else [-1])
    n_vis = ws.visual.sum(1).tolist()
    return ForcedBatch(ws=ws, pred=pred, targets=torch.tensor(targets, device=ws.valid.device),
                       last_prompt=(length - n_ans[:, 0] - 1),
                       counts=[(recipe or engine.recipe).keep_counts(n) for n in n_vis],
                       sample_ids=list(ids))


def micro_batches(n: int, size: int) -> list[list[int]]:
    """Fixed micro-batches by sample index, so a sample is always computed in the same company."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


# ---- the masked, differentiable forward -------------------------------------------------------------
def masked_attention(engine: PrunedEngine, layer: torch.nn.Module, hidden: torch.Tensor, ws: WorkingSet,
                     key_mask: torch.Tensor) -> torch.Tensor:
    """Attention output of one layer where key j is weighted by key_mask[b, j] (0/1 forward, any backward;
    a merged key's weight is the number of tokens it stands for, ToMe's proportional attention).

    softmax(w) * m / sum(softmax(w) * m) equals softmax over the kept keys when m is 0/1, and
    passes gradients to m when m carries a straight-through estimate.
    """
    attn = layer.self_attn
    q, k, v = engine._qkv(layer, layer.input_layernorm(hidden), ws.positions)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    bsz, t = ws.valid.shape
    idx = torch.arange(t, device=hidden.device)
    allowed = ((idx[None, :] <= idx[:, None])[None] & ws.valid[:, None, :]) | torch.eye(
        t, dtype=torch.bool, device=hidden.device)[None]
    w = torch.matmul(q, k.transpose(-1, -2)) * attn.scaling
    p = torch.softmax(w.float().masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    p = p * key_mask[:, None, None, :].float()
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-30)
    out = torch.matmul(p.to(v.dtype), v)
    return attn.o_proj(out.transpose(1, 2).reshape(bsz, t, -1))


def mlp(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def pred_logits(engine: PrunedEngine, hidden: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """[P, vocab] float logits at the pred positions."""
    adapter = engine.adapter
    return adapter.lm_head(adapter.final_norm(hidden[pred])).float()


# ---- data parallel ----------------------------------------------------------------------------------
def all_reduce_sum(tensor: torch.Tensor, dist: Dist) -> torch.Tensor:
    """In-place sum over ranks (a no-op in a single process)."""
    if dist.world_size > 1:
        torch_dist.all_reduce(tensor)
    return tensor


def sum_gradients(module: torch.nn.Module, dist: Dist) -> None:
    """Data-parallel step: every rank ends with the sum of all ranks' gradients."""
    if dist.world_size <= 1:
        return
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch_dist.all_reduce(p.grad)


# ---- resumable checkpoints ----------------------------------------------------------------------------
def fingerprint(config: dict[str, Any]) -> str:
    """Identifies a training run: a checkpoint resumes only the run with the same settings."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_path(out_dir: str | Path, kind: str) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / f"{kind}.safetensors"


def save_checkpoint(path: Path, module: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None, step: int,
                    print_: str, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Module, optimizer state and extra tensors in one safetensors file, written atomically."""
    from safetensors.torch import save_file

    tensors = {} if module is None else {
        f"module.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    groups: list[dict[str, Any]] = []
    if optimizer is not None:
        state = optimizer.state_dict()
        for pid, slots in state["state"].items():
            for name, value in slots.items():
                tensors[f"optim.{pid}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
        groups = state["param_groups"]
    for k, v in (extra or {}).items():
        tensors[f"extra.{k}"] = v.detach().cpu().contiguous()
    meta = {"fingerprint": print_, "step": str(step), "param_groups": json.dumps(groups)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, module: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None,
                    print_: str) -> tuple[int, dict[str, torch.Tensor]] | None:
    """(step, extra tensors) of a checkpoint written by the same run settings, else None (start fresh)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError):
        return None  # an unreadable checkpoint is only lost progress
    if meta.get("fingerprint") != print_:
        return None
    if module is None:
        return int(meta["step"]), {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    device = next(module.parameters()).device
    module.load_state_dict({k[len("module."):]: v.to(device) for k, v in tensors.items() if k.startswith("module.")})
    if optimizer is not None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v if name == "step" else v.to(device)
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return int(meta["step"]), extra


class TrainingInterrupted(Exception):
    """Raised by a fitter asked to stop after N steps (tests of resuming); the checkpoint is on disk."""
