"""One picture per file: the log-mel spectrogram, the top classes' activity over time, detected events as bars.

The data is gathered while the file streams (``Picture``: fixed-size, pooled in time, so an hour costs what a
minute does) and drawn with matplotlib (the ``plot`` extra, imported only when a picture is drawn).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from astcli.errors import UsageError

COLUMNS = 1200  # time columns kept per picture: about one per pixel of the 12-inch, 100-dpi figure
TOP_CLASSES = 8
TICK_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600)


def require_matplotlib() -> None:
    """Raise UsageError with the fix when matplotlib (the ``plot`` extra) is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UsageError("pictures need matplotlib: pip install 'astcli[plot]'") from exc


class Pooled:
    """Rows of a time series pooled into at most ``2 * limit`` columns of ``factor`` rows each (``"mean"`` or
    ``"max"``); when the columns fill up, neighbours merge and ``factor`` doubles. Memory: ``2 * limit`` rows."""

    def __init__(self, width: int, limit: int = COLUMNS, reduce: str = "mean"):
        self.limit, self.reduce = limit, reduce
        self.factor = 1
        self.columns = np.zeros((0, width))
        self.partial = np.zeros(width) if reduce == "mean" else np.full(width, -np.inf)
        self.count = 0  # rows in ``partial``

    def _combine(self, a: np.ndarray, axis: int) -> np.ndarray:
        return a.sum(axis) if self.reduce == "mean" else a.max(axis)

    def _empty(self) -> np.ndarray:
        return np.zeros_like(self.partial) if self.reduce == "mean" else np.full_like(self.partial, -np.inf)

    def push(self, rows: np.ndarray) -> None:
        """Append rows ``[n, width]`` (whole columns pooled at once)."""
        rows = np.asarray(rows, dtype=np.float64)
        while len(rows):
            if self.count or len(rows) < self.factor:  # top up the partial column
                take = min(len(rows), self.factor - self.count)
                self.partial = self._combine(np.vstack([self.partial[None], rows[:take]]), 0)
                self.count, rows = self.count + take, rows[take:]
                if self.count == self.factor:
                    full, self.partial, self.count = self.partial[None], self._empty(), 0
                    self._append(full)
            else:
                n = len(rows) // self.factor
                pooled = self._combine(rows[: n * self.factor].reshape(n, self.factor, -1), 1)
                rows = rows[n * self.factor :]
                self._append(pooled)

    def _append(self, columns: np.ndarray) -> None:
        """Add whole columns (the partial one is empty); merge neighbours while there are too many."""
        self.columns = np.vstack([self.columns, columns])
        while len(self.columns) >= 2 * self.limit:
            if len(self.columns) % 2:  # the odd last column starts the partial one of the doubled factor
                self.partial = self._combine(np.vstack([self.partial[None], self.columns[-1:]]), 0)
                self.count += self.factor
                self.columns = self.columns[:-1]
            self.columns = self._combine(self.columns.reshape(len(self.columns) // 2, 2, -1), 1)
            self.factor *= 2

    def values(self) -> tuple[np.ndarray, int]:
        """(columns ``[m, width]``, rows per column); means are divided out, the last column may be partial."""
        columns, sizes = self.columns, np.full(len(self.columns), self.factor)
        if self.count:
            columns, sizes = np.vstack([columns, self.partial[None]]), np.append(sizes, self.count)
        return (columns / sizes[:, None] if self.reduce == "mean" else columns), self.factor


def clock(seconds: float, _=None) -> str:
    """``m:ss`` below an hour, ``h:mm:ss`` from an hour on (tick labels)."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def tick_step(duration: float, ticks: int = 10) -> int:
    """The smallest of TICK_STEPS (seconds) that gives at most ``ticks`` ticks over ``duration``."""
    return next((s for s in TICK_STEPS if duration / s <= ticks), TICK_STEPS[-1])


def top_classes(activity: np.ndarray, events: list[dict], count: int = TOP_CLASSES) -> list[int]:
    """Classes to show: those with events (highest event score first), then the most active, ``count`` in all."""
    chosen: list[int] = []
    for event in sorted(events, key=lambda e: -e["score"]):
        if event["index"] not in chosen:
            chosen.append(event["index"])
    peak = activity.max(0) if len(activity) else np.zeros(activity.shape[1])
    chosen += [int(i) for i in np.argsort(-peak, kind="stable") if int(i) not in chosen]
    return chosen[:count]


def draw(path: str | Path, *, title: str, duration: float, spectrogram: Pooled, frame_seconds: float,
         activity: Pooled, cell_seconds: float, events: list[dict], labels: list[str]) -> Path:
    """Write the PNG: spectrogram (mel bins x time), under it the top classes' activity as a heat map with
    the events drawn over their rows as bars (at least 0.25 % of the width, so short events stay visible)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    spec, spec_rows = spectrogram.values()
    act, act_rows = activity.values()
    shown = top_classes(act, events)
    fig = Figure(figsize=(12, 3.2 + 0.32 * len(shown)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2.6, 0.32 * max(len(shown), 1)])
    end = duration
    top.imshow(spec.T, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
               extent=(0, len(spec) * spec_rows * frame_seconds, 0, spec.shape[1]))
    top.set_ylabel("mel bin")
    top.set_title(title, loc="left", fontsize=10)
    grid = act[:, shown].T if shown else np.zeros((1, max(len(act), 1)))
    image = bottom.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest",
                          extent=(0, len(act) * act_rows * cell_seconds, len(shown) - 0.5, -0.5))
    bottom.set_yticks(range(len(shown)), [_short(labels[i]) for i in shown], fontsize=8)
    row_of = {cls: r for r, cls in enumerate(shown)}
    least = end / 400
    for event in events:
        if event["index"] in row_of:
            width = max(event["end"] - event["start"], least)
            bottom.broken_barh([(event["start"], width)], (row_of[event["index"]] + 0.18, 0.26),
                               facecolors="#ff3b30", edgecolors="none")
    fig.colorbar(image, ax=bottom, fraction=0.02, pad=0.01, label="activity")
    bottom.set_xlim(0, end)
    bottom.xaxis.set_major_locator(MultipleLocator(tick_step(end)))
    bottom.xaxis.set_major_formatter(FuncFormatter(clock))
    bottom.set_xlabel("time (red bars: detected events)")
    path = Path(path)
    fig.savefig(path)
    return path


def _short(label: str, width: int = 28) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"
