"""What people see on stderr while a command runs: warnings and progress (stdout carries only data).

``warn`` prints one ``ast: warning: ...`` line, ``note`` one ``ast: ...`` line; ``warn_once`` makes a reporter
that says its warning at the first call only. ``Progress`` draws a rich bar on stderr when stderr is a terminal
or a caller forces it, and does nothing otherwise.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def warn(message: str) -> None:
    """Print ``ast: warning: <message>`` on stderr (one line, flushed at once)."""
    print(f"ast: warning: {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    """Print ``ast: <message>`` on stderr: what a long command decided before it starts (one line, flushed)."""
    print(f"ast: {message}", file=sys.stderr, flush=True)


def route_audio_warnings() -> None:
    """Show the library's ``AudioWarning`` (a truncated file: decoding stopped before the header's length) as
    one ``ast: warning:`` line, once per message in a process, instead of Python's two-line warning with a
    source line; other warnings keep Python's display. The command-line tool calls this once at its start
    (DataLoader workers inherit it)."""
    import warnings

    from astcli.errors import AudioWarning

    shown: set[str] = set()
    python_display = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, AudioWarning):
            return python_display(message, category, filename, lineno, file, line)
        if str(message) not in shown:
            shown.add(str(message))
            warn(str(message))

    warnings.showwarning = show


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


PLAIN_SECONDS = 5.0  # seconds between two plain progress lines (stderr not a terminal)


class Progress:
    """Progress of one task at a time on stderr, with a status text after the counts; or nothing.

    On a terminal: a live rich bar (with ``transient=True`` it leaves the screen when the display closes).
    Forced on while stderr is not a terminal (a log file, CI): plain lines, the first at ``start`` and then at
    most one every ``interval`` seconds, e.g. ``ast: tagging: 120/600 s (20%), 1/3 files, 0:00:30, ETA 0:02:00``.
    ``unit`` is "items" (``done/total``), "seconds" (of audio, with an ETA) or "bytes" (sizes and speed).
    ``start`` begins a task (it replaces a finished one), ``advance`` moves it (``update`` sets it) and sets its
    status text, ``finish`` removes it, ``log`` prints a line above it, ``close`` ends the display. With
    ``enabled=False`` every call is a no-op. Usable as a context manager (``close`` at the end).
    """

    def __init__(self, enabled: bool, unit: str = "items", elapsed: bool = True, transient: bool = False,
                 interval: float = PLAIN_SECONDS, clock: Callable[[], float] = time.monotonic):
        self._bar = self._task = self._plain = None
        self.unit, self.interval, self.clock = unit, interval, clock
        if not enabled:
            return
        if not sys.stderr.isatty():
            self._plain = {}
            return
        from rich import progress as rp
        from rich.console import Console

        counts = {"bytes": [rp.DownloadColumn(), rp.TransferSpeedColumn()],
                  "seconds": [rp.TextColumn("{task.completed:.0f}/{task.total:.0f} s")],
                  }.get(unit, [rp.MofNCompleteColumn()])
        columns = [rp.TextColumn("{task.description}"), rp.BarColumn(), *counts, rp.TextColumn("{task.fields[status]}")]
        if elapsed:
            columns.append(rp.TimeElapsedColumn())
        if unit == "seconds":
            columns += [rp.TextColumn("ETA"), rp.TimeRemainingColumn()]
        self._bar = rp.Progress(*columns, console=Console(stderr=True), redirect_stdout=False, redirect_stderr=False,
                                transient=transient)
        self._bar.start()

    @property
    def enabled(self) -> bool:
        return self._bar is not None or self._plain is not None

    @property
    def console(self):
        """The rich console under a live bar (print through it to appear above the bar), else None."""
        return self._bar.console if self._bar is not None else None

    def start(self, description: str, total: float | None, completed: float = 0, status: str = "") -> None:
        """Show a task ``description`` from ``completed`` to ``total`` (None: unknown total)."""
        if self._bar is not None:
            self.finish()
            self._task = self._bar.add_task(description, total=total, completed=completed, status=status)
        elif self._plain is not None:
            now = self.clock()
            self._plain = {"description": description, "total": total, "completed": completed, "status": status,
                           "started": now, "first": completed}
            self._say(now)

    def advance(self, amount: float = 1, status: str | None = None) -> None:
        """Move the task by ``amount``; replace its status text when ``status`` is given."""
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=amount, **({} if status is None else {"status": status}))
        elif self._plain:
            self.update(self._plain["completed"] + amount, status)

    def update(self, completed: float, status: str | None = None) -> None:
        """Set the task's progress to ``completed``; replace its status text when ``status`` is given."""
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=completed, **({} if status is None else {"status": status}))
        elif self._plain:
            self._plain["completed"] = completed
            if status is not None:
                self._plain["status"] = status
            now = self.clock()
            if now - self._plain["said"] >= self.interval:
                self._say(now)

    def finish(self) -> None:
        """Remove the current task (its summary, if any, is the caller's ``log`` line)."""
        if self._bar is not None and self._task is not None:
            self._bar.remove_task(self._task)
            self._task = None
        elif self._plain:
            self._final()
            self._plain = {}

    def log(self, message: str) -> None:
        """Print ``message`` on stderr above the bar, or as a line of its own in plain mode."""
        if self._bar is not None:
            self._bar.console.print(message, highlight=False, markup=False)
        elif self._plain is not None:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Stop drawing; the last state of the bar stays on the terminal unless the bar is transient."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._plain:
            self._final()
        self._plain = None

    def _final(self) -> None:
        """The last plain line of a task, unless the latest line already showed its final state."""
        if self._plain["completed"] != self._plain["said_completed"]:
            self._say(self.clock())

    def _say(self, now: float) -> None:
        """One plain line: description, counts (percent where the total is known), status, elapsed, ETA."""
        p = self._plain
        p["said"], p["said_completed"] = now, p["completed"]
        done, total, spent = p["completed"], p["total"], now - p["started"]
        parts = [_amount(done, total, self.unit)]
        if p["status"]:
            parts.append(p["status"])
        parts.append(_clock(spent))
        if total and total > done > p["first"] and spent > 0:
            parts.append("ETA " + _clock((total - done) * spent / (done - p["first"])))
        print(f"ast: {p['description']}: {', '.join(parts)}", file=sys.stderr, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _amount(done: float, total: float | None, unit: str) -> str:
    scale, suffix = {"bytes": (1e6, " MB"), "seconds": (1, " s")}.get(unit, (1, ""))
    text = f"{done / scale:.0f}" + (f"/{total / scale:.0f}{suffix} ({100 * done / total:.0f}%)" if total else suffix)
    return text


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
