"""Distributed membership: this process's place in a ``torchrun`` job (rank, world size, process group), and the
collective calls the trainer needs to keep every rank in step."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # this module initialised the process group (and tears it down)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    @classmethod
    def current(cls) -> Distributed:
        if tdist.is_available() and tdist.is_initialized():
            local = int(os.environ.get("LOCAL_RANK", tdist.get_rank()))
            return cls(tdist.get_rank(), tdist.get_world_size(), local)
        return cls()


def setup_distributed(device: str | None = None) -> tuple[Distributed, torch.device]:
    """Join the process group that ``torchrun`` describes in WORLD_SIZE / RANK / LOCAL_RANK / MASTER_ADDR /
    MASTER_PORT (nccl on CUDA, gloo on CPU); outside torchrun, a single process on ``device``."""
    from astcli.backends import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Distributed(), resolve_device(device)
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device not in ("cpu",)
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owned = False
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
        owned = True
    return Distributed(tdist.get_rank(), tdist.get_world_size(), local, owned), dev


def any_rank(flag: bool, dist: Distributed, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (an all-reduce MAX; no call when not distributed)."""
    if not dist.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)
