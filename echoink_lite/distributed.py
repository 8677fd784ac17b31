"""One process, or several under torchrun / `accelerate launch`: data parallel over each step's prompts.

Both launchers set RANK, WORLD_SIZE and LOCAL_RANK; the kit reads those and starts the process group
itself (NCCL on CUDA, gloo on CPU). Every cross-process reduction goes through `Dist.sum_`, which moves the
tensor to the group's device first: NCCL reduces CUDA tensors only, and the metrics, normaliser and
due-time flags are built on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # this process's compute device, also the reduction device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True on every process when `ok` is true on every process: a failure on one process (say rank 0
        writing a checkpoint) then stops all of them, instead of leaving the others waiting at a barrier."""
        if self.world == 1:
            return ok
        return float(self.sum_(torch.tensor([0.0 if ok else 1.0])).item()) == 0.0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over processes; returns a tensor on `t`'s device (reduced on the process group's device)."""
        if self.world == 1:
            return t
        on_group = t.to(self.device)
        dist.all_reduce(on_group, op=dist.ReduceOp.SUM)
        return on_group.to(t.device)

    def gather_(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's `t` (same shape on each), concatenated in rank order along dim 0."""
        if self.world == 1:
            return t
        on_group = t.to(self.device)
        parts = [torch.empty_like(on_group) for _ in range(self.world)]
        dist.all_gather(parts, on_group)
        return torch.cat(parts).to(t.device)


def setup_dist() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, device=device)
