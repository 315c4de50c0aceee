"""Temporary home of file and console helpers shared by the training modules."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    _fsync_replace(tmp, path)


def _atomic_torch(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    _fsync_replace(tmp, path)


class _Progress:
    """A rich progress bar on stderr (loss, clips/s), or nothing."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.1f} clips/s"),
                TimeElapsedColumn(), console=Console(stderr=True),
            )
            self.bar.start()
        self.task = None

    def start(self, description: str, total: int, completed: int) -> None:
        if self.bar is not None:
            self.task = self.bar.add_task(description, total=total, completed=completed, loss=0.0, rate=0.0)

    def update(self, loss: float, rate: float) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=1, loss=loss, rate=rate)

    def done(self) -> None:
        """Drop the finished epoch's bar (its summary line follows)."""
        if self.bar is not None and self.task is not None:
            self.bar.remove_task(self.task)
            self.task = None

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.print(message, highlight=False, markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _warn(message: str) -> None:
    print(f"ast: warning: {message}", file=sys.stderr, flush=True)


def _once(quiet: bool = False) -> Callable[[str], None]:
    """A reporter of unreadable clips that warns at the first one only (never when ``quiet``)."""
    done = [quiet]

    def report(reason: str) -> None:
        if not done[0]:
            _warn(f"skipping unreadable audio ({reason}); further failures are counted in the logs, not shown")
            done[0] = True

    return report
