"""The process a training run lives in: its place in a ``torchrun`` job (rank, world, process group) and the
SIGINT/SIGTERM handling that lets a run stop after the current step with its state saved."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as tdist

# -- distributed ---------------------------------------------------------------------------------------


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
    from astcli.tagger import resolve_device

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


def _any_rank(flag: bool, dist: Distributed, device: torch.device) -> bool:
    if not dist.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


# -- signals -------------------------------------------------------------------------------------------


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes the current step, saves its state and returns."""

    def __init__(self):
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag | None = None):
    """Install SIGINT/SIGTERM handlers that set a :class:`StopFlag` (a second SIGINT interrupts at once);
    the previous handlers come back on exit. Outside the main thread nothing is installed."""
    flag = flag or StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.request(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
