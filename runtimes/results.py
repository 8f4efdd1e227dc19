"""Result records shared by the eager engine and the on-device runtimes (no torch here).

One definition keeps `result.timings` and `result.kept` identical wherever a request runs, so
`edge-prune eval` and `edge-prune profile` read every backend the same way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Timings:
    vision_ms: float = 0.0
    prefill_ms: float = 0.0  # decoder prefill (embedding merge + all layers + first logits)
    ttft_ms: float = 0.0  # (preprocessing +) vision + prefill + choosing the first token
    decode_tok_s: float = 0.0
    preprocess_ms: float = 0.0  # image preprocessing + tokenization, where the runtime times it apart


@dataclass
class KeptTokens:
    """Visual tokens of one request: how many entered the decoder and how many survived each layer."""

    visual_tokens: int
    entered_decoder: int
    per_layer: list[int]
    exit_layer: int | None = None
