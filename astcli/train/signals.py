"""SIGINT/SIGTERM handling that lets a training run stop after the current step with its state saved."""

from __future__ import annotations

import contextlib
import signal
import threading


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
