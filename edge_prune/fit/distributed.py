"""torch.distributed, when launched under torchrun; a single process otherwise.

Fitting statistics are sums over calibration samples, so each rank computes its share and a
float64 all-reduce combines them (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int
    world_size: int
    device: str = "cpu"

    @classmethod
    def single(cls, device: str = "cpu") -> Dist:
        return cls(0, 1, device)

    @classmethod
    def from_env(cls, device: str = "cpu") -> Dist:
        """Join the process group torchrun describes in the environment (WORLD_SIZE > 1)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls.single(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def sum(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
