"""Scoring at 576 visual tokens x 32 heads must stay below one full attention map (measured peak RSS)."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = r"""
import json, re, torch
from edge_prune.scoring import ScoreContext, fitprune_scores, fastv_scores
torch.manual_seed(0)
torch.set_num_threads(1)

def hwm_kib():
    return int(re.search(r'VmHWM:\s+(\d+)', open('/proc/self/status').read()).group(1))

def reset_hwm():
    with open('/proc/self/clear_refs', 'w') as fh:
        fh.write('5')

H, KVH, HD, T, V0, NV = 32, 32, 128, 640, 35, 576   # LLaVA-1.5-7B heads, 576 visual + 64 text tokens
q = torch.randn(1, H, T, HD); k = torch.randn(1, KVH, T, HD)
pos = torch.arange(T)
visual = ((pos >= V0) & (pos < V0 + NV))[None]
ctx = ScoreContext(layer=2, query=q, key=k, scaling=HD ** -0.5, valid=torch.ones(1, T, dtype=torch.bool),
                   visual=visual, text_after=(pos >= V0 + NV)[None], positions=pos[None])
fitprune_scores(ctx); fastv_scores(ctx)   # warm up allocator and kernels
out = {}
for name, fn in (("fitprune", fitprune_scores), ("fastv", fastv_scores)):
    reset_hwm(); base = hwm_kib()
    fn(ctx)
    out[name] = (hwm_kib() - base) * 1024
reset_hwm(); base = hwm_kib()
full = torch.softmax((q @ k.transpose(-1, -2)) * HD ** -0.5, dim=-1)   # one full [H, T, T] map
out["full_map_measured"] = (hwm_kib() - base) * 1024
out["full_map_bytes"] = full.numel() * full.element_size()
print(json.dumps(out))
"""


def test_scoring_peak_memory_is_below_one_full_attention_map():
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    m = json.loads(res.stdout)
    one_map = m["full_map_bytes"]  # 32 x 640 x 640 fp32 = 52 MB
    assert m["full_map_measured"] >= 0.9 * one_map  # the probe does see a map-sized allocation
    assert m["fitprune"] < 0.5 * one_map, m
    assert m["fastv"] < 0.5 * one_map, m
