"""What people see on stderr while a command runs: warnings and progress (stdout carries only data).

``warn`` prints one ``ast: warning: ...`` line; ``warn_once`` makes a reporter that says its warning at the
first call only. ``Progress`` draws a rich bar on stderr when stderr is a terminal or a caller forces it,
and does nothing otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def warn(message: str) -> None:
    """Print ``ast: warning: <message>`` on stderr (one line, flushed at once)."""
    print(f"ast: warning: {message}", file=sys.stderr, flush=True)


def warn_once(message: Callable[[str], str], quiet: bool = False) -> Callable[[str], None]:
    """A reporter ``report(detail)`` that warns ``message(detail)`` at its first call and is silent after
    (silent from the start when ``quiet``)."""
    said = [quiet]

    def report(detail: str) -> None:
        if not said[0]:
            said[0] = True
            warn(message(detail))

    return report


def progress_wanted(force: bool | None = None) -> bool:
    """Whether to draw progress: ``force`` when given, else whether stderr is a terminal."""
    return sys.stderr.isatty() if force is None else bool(force)


class Progress:
    """One rich progress bar on stderr at a time, with a status text after the counts; or nothing.

    ``unit="items"`` shows ``done/total``; ``unit="bytes"`` shows sizes and transfer speed. ``start`` begins a
    bar (it replaces a finished one), ``advance`` moves it and sets its status text, ``finish`` removes it,
    ``log`` prints a line above it, ``close`` ends the display. With ``enabled=False`` every call is a no-op.
    Usable as a context manager (``close`` at the end).
    """

    def __init__(self, enabled: bool, unit: str = "items", elapsed: bool = True):
        self._bar = None
        self._task = None
        if not enabled:
            return
        from rich import progress as rp
        from rich.console import Console

        counts = [rp.DownloadColumn(), rp.TransferSpeedColumn()] if unit == "bytes" else [rp.MofNCompleteColumn()]
        columns = [rp.TextColumn("{task.description}"), rp.BarColumn(), *counts, rp.TextColumn("{task.fields[status]}")]
        if elapsed:
            columns.append(rp.TimeElapsedColumn())
        self._bar = rp.Progress(*columns, console=Console(stderr=True), redirect_stdout=False, redirect_stderr=False)
        self._bar.start()

    @property
    def enabled(self) -> bool:
        return self._bar is not None

    def start(self, description: str, total: float | None, completed: float = 0, status: str = "") -> None:
        """Show a bar ``description`` from ``completed`` to ``total`` (None: unknown total)."""
        if self._bar is not None:
            self.finish()
            self._task = self._bar.add_task(description, total=total, completed=completed, status=status)

    def advance(self, amount: float = 1, status: str | None = None) -> None:
        """Move the bar by ``amount``; replace its status text when ``status`` is given."""
        if self._bar is not None and self._task is not None:
            fields = {} if status is None else {"status": status}
            self._bar.update(self._task, advance=amount, **fields)

    def finish(self) -> None:
        """Remove the current bar (its summary, if any, is the caller's ``log`` line)."""
        if self._bar is not None and self._task is not None:
            self._bar.remove_task(self._task)
            self._task = None

    def log(self, message: str) -> None:
        """Print ``message`` on stderr above the bar (nothing when disabled)."""
        if self._bar is not None:
            self._bar.console.print(message, highlight=False, markup=False)

    def close(self) -> None:
        """Stop drawing; the last state of the bar stays on the terminal."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
