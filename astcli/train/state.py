"""Training state on disk: the resumable checkpoint of a fit (``state.pt``), with the running weight average.

``state.pt`` holds everything an exact resume needs (weights, optimizer, gradient scaler, sampler, torch RNG
state, where the run stands, the weight average so far) as tensors and primitives, so it loads with
``torch.load(weights_only=True)``.
Every file is written to a temporary name, synced and renamed, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from astcli.errors import UsageError
from astcli.files import save_torch

STATE_VERSION = 3


def _fresh_partial() -> dict:
    return {"loss_sum": 0.0, "clips": 0, "tokens": 0, "seconds": 0.0}


@dataclass
class TrainingState:
    """Where a fit stands: ``epoch`` finished epochs, ``batch`` batches of the next one done, ``step`` optimizer
    steps; ``partial`` the running sums of the epoch in progress (loss_sum, clips, tokens, seconds); ``history``
    one record per finished epoch; ``best`` the best validation value and its epoch; ``bad`` the examples that
    failed to decode, with the reason."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    partial: dict = field(default_factory=_fresh_partial)
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": 0, "value": -math.inf})
    bad: dict[int, str] = field(default_factory=dict)

    def next_epoch(self, epoch: int) -> None:
        """Mark ``epoch`` finished: the batch count and running sums start again."""
        self.epoch, self.batch, self.partial = epoch, 0, _fresh_partial()


def rng_state() -> dict:
    """The global torch RNG states (CPU, and every CUDA device when there is one): what dropout and
    initialisation draw from, so that a resumed run draws the same numbers."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, progress: TrainingState, parts: dict, data: dict) -> None:
    """Write ``state.pt``: ``progress``, the ``state_dict()`` of each object in ``parts`` (model, optimizer,
    sampler, ...; None is saved as empty), the torch RNG state, and ``data`` (sizes of the split, checked on
    resume)."""
    state = {
        "version": STATE_VERSION, "epoch": progress.epoch, "batch": progress.batch, "step": progress.step,
        "partial": dict(progress.partial), "history": progress.history, "best": dict(progress.best),
        "bad": {int(k): v for k, v in progress.bad.items()}, "rng": rng_state(), "data": dict(data),
        "parts": {name: part.state_dict() if part is not None else {} for name, part in parts.items()},
    }
    save_torch(state, path)


def load_state(path: Path, parts: dict, data: dict) -> TrainingState | None:
    """Load ``state.pt`` into the objects of ``parts`` and the torch RNG and return where the fit stood; None
    when there is no file. Raises UsageError for an unreadable file, another version, or a state saved for
    another run (``data`` differs: the split's sizes, or the epochs and averaged range, which the step floor
    derives from the number of processes)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file: say so in one line
        raise UsageError(f"{path}: cannot read the training state ({type(exc).__name__})") from exc
    if state.get("version") != STATE_VERSION:
        raise UsageError(f"{path}: training state version {state.get('version')} is not supported")
    if state["data"] != data:
        other = ", ".join(f"{key} {state['data'].get(key)} (now {value})" for key, value in data.items()
                          if state["data"].get(key) != value)
        raise UsageError(f"{path}: saved for another run ({other}); resume with the same data and processes")
    for name, part in parts.items():
        if part is not None and state["parts"][name]:
            part.load_state_dict(state["parts"][name])
    set_rng_state(state["rng"])
    return TrainingState(state["epoch"], state["batch"], state["step"], dict(state["partial"]),
                         list(state["history"]), dict(state["best"]), {int(k): v for k, v in state["bad"].items()})


class WeightAverage:
    """Running sum of a model's weights over epochs, for AST's weight averaging (the element-wise mean of the
    weights after each epoch of a range), accumulated in float64. One sum instead of a file per epoch, so the
    disk a run needs does not grow with its epochs; it is saved inside ``state.pt`` (``state_dict`` /
    ``load_state_dict``), so a resumed run goes on with the same sum."""

    def __init__(self) -> None:
        self.total: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, weights: dict[str, torch.Tensor]) -> None:
        """Add one epoch's ``state_dict()``."""
        for key, value in weights.items():
            value = value.detach().to("cpu", torch.float64)
            self.total[key] = self.total[key] + value if key in self.total else value
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        """The element-wise mean of the weights added so far, as float32.

        Raises UsageError when nothing was added."""
        if not self.count:
            raise UsageError("weight averaging found no epoch weights to average")
        return {key: (value / self.count).float() for key, value in self.total.items()}

    def state_dict(self) -> dict:
        return {"count": self.count, "total": dict(self.total)}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.total = int(state["count"]), dict(state["total"])
