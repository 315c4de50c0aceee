"""Sound events (class, onset, offset, score) from the scores of overlapping windows, streamed.

How events are made, in three streaming stages (each keeps only a window's worth of state, so memory does
not grow with the length of the audio):

1. ``ActivityGrid`` puts window scores on a fixed time grid of ``step`` frames (the window hop): the activity
   of a cell ``[k*step, (k+1)*step)`` is the mean of the scores of every window that covers the cell's centre
   (``"mean"``), or of those among them whose own centre is nearest to it (``"centre"``: with windows one
   hop apart, the one window centred on the cell). Windows arrive in start order; a cell is final once no
   later window can cover it.
2. ``EventDetector`` applies, per class, hysteresis to the activity: an event opens at the first cell whose
   activity reaches the onset threshold and closes at the first cell whose activity falls below the offset
   threshold (``offset <= onset``; equal thresholds are a plain threshold). Its onset (offset) is the time at
   which the activity, read as samples at the cell centres joined by straight lines, crosses the onset
   (offset) threshold: within half a cell of the cell that opened (closed) it, and finer than the grid when
   the scores rise over several windows. Two events of a class separated by at most ``max_gap`` seconds are
   merged into one; then events shorter than ``min_duration`` are dropped. An event's score is its peak: the
   highest cell activity inside it.
3. Events come out as soon as they can no longer change (closed, and further than ``max_gap`` behind the
   newest cell), so an event that spans a block boundary is one event, found once.

Hysteresis, minimum duration and gap merging are the usual post-processing of frame-wise sound event
detection (e.g. the DCASE challenge baselines; Mesaros et al., "Sound Event Detection: A tutorial",
IEEE Signal Processing Magazine 2021).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from astcli.errors import ParameterError


@dataclass(frozen=True)
class Event:
    """One detected event: class ``index``, ``start`` / ``end`` in seconds, ``score`` = peak activity."""

    index: int
    start: float
    end: float
    score: float


ACTIVITY_RULES = ("mean", "centre")


def check_activity_rule(rule: str) -> None:
    """ParameterError ``activity`` unless ``rule`` is one of ``ACTIVITY_RULES``."""
    if rule not in ACTIVITY_RULES:
        raise ParameterError("activity", f"must be one of {', '.join(ACTIVITY_RULES)} (got {rule!r})")


@dataclass(frozen=True)
class EventOptions:
    """Per-class decision rules (seconds and probabilities).

    ``onset_threshold`` / ``offset_threshold`` (default: half the onset threshold) apply to every class;
    ``class_thresholds`` maps a class index to its own ``(onset, offset)``. ``min_duration`` and ``max_gap``
    are seconds. ``activity`` is how window scores become a cell's activity (``ActivityGrid``): ``"mean"``
    suits models that score a window by any event inside it (clip-level labels, e.g. AudioSet); ``"centre"``
    suits models taught to score a window by the event at its centre, and keeps events shorter than the
    window (docs/events.md). Values that cannot work raise ``ParameterError`` naming the field.
    """

    onset_threshold: float = 0.5
    offset_threshold: float | None = None  # None: onset_threshold / 2
    min_duration: float = 0.0
    max_gap: float = 0.0
    class_thresholds: dict[int, tuple[float, float]] | None = None
    activity: str = "mean"

    def __post_init__(self) -> None:
        on, off = self.onset_threshold, self.offset
        if not 0.0 < on <= 1.0:
            raise ParameterError("onset_threshold", f"must lie in (0, 1] (got {on:g})")
        if not 0.0 <= off <= on:
            raise ParameterError("offset_threshold", f"must lie in [0, onset_threshold] (got {off:g})")
        for name, value in (("min_duration", self.min_duration), ("max_gap", self.max_gap)):
            if not (math.isfinite(value) and value >= 0):
                raise ParameterError(name, f"must be a number of seconds >= 0 (got {value:g})")
        check_activity_rule(self.activity)

    @property
    def offset(self) -> float:
        """The offset threshold in force for classes without their own."""
        return self.onset_threshold / 2 if self.offset_threshold is None else self.offset_threshold

    def thresholds(self, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """Onset and offset thresholds per class, two float arrays ``[num_classes]``."""
        on = np.full(num_classes, self.onset_threshold)
        off = np.full(num_classes, self.offset)
        for index, (a, b) in (self.class_thresholds or {}).items():
            if not 0 <= index < num_classes:
                raise ParameterError("class_thresholds", f"names class {index}, but the model has {num_classes}")
            on[index], off[index] = a, b
        return on, off


def read_class_thresholds(path: str | Path, labels: Sequence[str]) -> dict[int, tuple[float, float]]:
    """Per-class ``(onset, offset)`` thresholds from a file, keyed by class index.

    A ``.json`` file maps a label (or class index) to an onset threshold or to ``[onset, offset]``; any
    other file is CSV with a header ``label,onset[,offset]``. A missing offset is half the onset, as for
    ``EventOptions``. Unknown labels, unreadable files and thresholds outside
    ``0 <= offset <= onset <= 1`` raise ``ParameterError("class_thresholds", ...)``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ParameterError("class_thresholds", f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") \
            from exc
    try:
        rows = _json_rows(text) if path.suffix.lower() == ".json" else _csv_rows(text)
    except (ValueError, TypeError, KeyError) as exc:
        raise ParameterError("class_thresholds", f"{path}: {exc}") from exc
    index_of = {name: i for i, name in enumerate(labels)}
    out = {}
    for label, on, off in rows:
        index = index_of.get(label)
        if index is None and label.isascii() and label.isdigit() and len(label) < 10 and int(label) < len(labels):
            index = int(label)
        if index is None:
            raise ParameterError("class_thresholds", f"{path}: unknown class {label!r}")
        off = on / 2 if off is None else off
        if not 0.0 <= off <= on <= 1.0:
            raise ParameterError("class_thresholds", f"{path}: {label!r} needs 0 <= offset <= onset <= 1 "
                                 f"(got {on:g}, {off:g})")
        out[index] = (on, off)
    return out


def _json_rows(text: str) -> list[tuple[str, float, float | None]]:
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("expected a JSON object {label: onset or [onset, offset]}")
    rows = []
    for label, value in doc.items():
        pair = value if isinstance(value, list) else [value]
        if not 1 <= len(pair) <= 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair):
            raise ValueError(f"{label!r}: expected a number or [onset, offset]")
        rows.append((str(label), float(pair[0]), float(pair[1]) if len(pair) == 2 else None))
    return rows


def _csv_rows(text: str) -> list[tuple[str, float, float | None]]:
    reader = csv.DictReader(text.splitlines())
    if "label" not in (reader.fieldnames or []) or "onset" not in (reader.fieldnames or []):
        raise ValueError("expected a CSV header label,onset[,offset]")
    return [(row["label"].strip(), float(row["onset"]),
             float(row["offset"]) if (row.get("offset") or "").strip() else None) for row in reader]


class ActivityGrid:
    """Window scores -> per-cell activity on a grid of ``step`` frames. ``rule`` ``"mean"``: the mean of the
    windows covering a cell's centre; ``"centre"``: the mean of those covering windows whose centre is nearest
    to the cell's (ties happen when the window is an even number of hops long). Feed windows in start order
    with ``add``; ``finish(total_frames)`` closes the grid.

    State: one row ``[classes]`` of sums per cell that a window seen so far covers and that a later window
    may still cover, i.e. about ``window / step`` rows.
    """

    def __init__(self, step: int, num_classes: int, rule: str = "mean"):
        if step < 1:
            raise ParameterError("step", f"must be at least 1 frame (got {step})")
        check_activity_rule(rule)
        self.step = step
        self.rule = rule
        self.first = 0  # index of the first cell not yet returned
        self.sums = np.zeros((0, num_classes))
        self.counts = np.zeros(0)
        self.last: np.ndarray | None = None  # the scores of the latest window
        self.distance = np.zeros(0, dtype=np.int64)  # "centre": twice the frames from the cell's centre to the
        # centre of the windows in its sum

    def _cells(self, start: int, end: int) -> tuple[int, int]:
        """Cells ``[a, b)`` whose centre ``(k + 0.5) * step`` lies in frames ``[start, end)``."""
        a = max(0, -(-(2 * start - self.step) // (2 * self.step)))
        b = max(0, -(-(2 * end - self.step) // (2 * self.step)))
        return a, b

    def add(self, start: int, length: int, scores: np.ndarray) -> tuple[int, np.ndarray]:
        """Add a window of ``length`` frames from frame ``start`` with ``scores`` ``[classes]``; return the cells
        that are now final as ``(first_cell, activity [n, classes])`` (``n`` may be 0)."""
        a, b = self._cells(start, start + length)
        if a < self.first:
            raise ParameterError("start", "windows must come in start order")
        self._grow(b)
        rows = np.arange(a, b) - self.first
        if self.rule == "centre":  # keep only the windows whose centre is nearest to the cell's
            distance = np.abs((2 * np.arange(a, b) + 1) * self.step - (2 * start + length))
            nearer = rows[distance < self.distance[rows]]
            self.sums[nearer], self.counts[nearer] = 0.0, 0
            self.distance[rows] = np.minimum(distance, self.distance[rows])
            rows = rows[distance == self.distance[rows]]
        self.sums[rows] += scores
        self.counts[rows] += 1
        self.last = scores
        return self._take(a)  # later windows start at or after ``start``: no cell before ``a`` changes

    def finish(self, total_frames: int) -> tuple[int, np.ndarray]:
        """The remaining cells up to ``ceil(total_frames / step)``. The last cells may have their centre past
        the end of the last window (the audio ends less than half a cell into them, or is shorter than half a
        cell): they take the last window's scores. Any other cell no window covered gets activity 0."""
        self._grow(-(-total_frames // self.step))
        covered = np.flatnonzero(self.counts)
        tail = covered[-1] + 1 if len(covered) else 0
        if self.last is not None and tail < len(self.counts):
            self.sums[tail:], self.counts[tail:] = self.last, 1
        return self._take(self.first + len(self.counts))

    def _grow(self, end: int) -> None:
        extra = end - self.first - len(self.counts)
        if extra > 0:
            self.sums = np.concatenate([self.sums, np.zeros((extra, self.sums.shape[1]))])
            self.counts = np.concatenate([self.counts, np.zeros(extra)])
            self.distance = np.concatenate([self.distance, np.full(extra, np.iinfo(np.int64).max)])

    def _take(self, end: int) -> tuple[int, np.ndarray]:
        n = max(0, min(end - self.first, len(self.counts)))
        first = self.first
        activity = self.sums[:n] / np.maximum(self.counts[:n], 1)[:, None]
        self.sums, self.counts, self.distance = self.sums[n:], self.counts[n:], self.distance[n:]
        self.first = first + n
        return first, activity


class EventDetector:
    """Per-class hysteresis, gap merging and minimum duration over activity cells fed in blocks.

    ``push(activity)`` takes the next cells ``[n, classes]`` and returns the events that can no longer change;
    ``finish()`` returns the rest. Cells are ``cell_seconds`` long and start at 0; the activity of cell ``k``
    is taken as its value at the cell's centre, ``(k + 0.5) * cell_seconds``, and onsets and offsets are
    where the straight line between two neighbouring centres crosses the threshold (an event already on in
    the first cell starts at 0; one still on after the last cell ends there). ``duration`` (seconds), when
    given to ``finish``, clips the last event's end. Events of one call are sorted by (start, index).
    State per class: whether an event is open, its onset time and peak, the previous cell's activity, and
    one closed event awaiting a merge.
    """

    def __init__(self, num_classes: int, cell_seconds: float, options: EventOptions | None = None):
        if not (math.isfinite(cell_seconds) and cell_seconds > 0):
            raise ParameterError("cell_seconds", f"must be a positive number of seconds (got {cell_seconds:g})")
        self.options = options or EventOptions()
        self.on, self.off = self.options.thresholds(num_classes)
        self.cell_seconds = cell_seconds
        self.next_cell = 0
        self.active = np.zeros(num_classes, dtype=bool)
        self.onset = np.zeros(num_classes)  # seconds
        self.peak = np.zeros(num_classes)
        self.previous = np.zeros(num_classes)  # the activity of cell ``next_cell - 1``
        self.held: dict[int, tuple[float, float, float]] = {}  # class -> closed (onset, offset, peak) in seconds
        self.end: float | None = None  # the audio's duration, once ``finish`` knows it

    def push(self, activity: np.ndarray) -> list[Event]:
        """Feed the next ``[n, classes]`` cells; return the events that are now final."""
        activity = np.asarray(activity, dtype=np.float64)
        n = len(activity)
        if n == 0:
            return []
        state = self._hysteresis(activity)
        before = np.concatenate([self.active[None], state[:-1]])
        earlier = np.concatenate([self.previous[None], activity[:-1]])  # each cell's predecessor
        base = self.next_cell
        starts = {int(c): 0 for c in np.flatnonzero(self.active)}  # class -> first cell of its event in the block
        out: list[Event] = []
        for cell, cls in zip(*(i.tolist() for i in np.nonzero(state != before)), strict=True):
            if state[cell, cls]:
                self._open(cls, self._crossing(base + cell, earlier[cell, cls], activity[cell, cls], self.on[cls]),
                           out)
                starts[cls] = cell
            else:
                self.peak[cls] = np.fmax.reduce(activity[starts.pop(cls) : cell, cls], initial=self.peak[cls])
                offset = self._crossing(base + cell, earlier[cell, cls], activity[cell, cls], self.off[cls])
                self.held[cls] = (float(self.onset[cls]), offset, float(self.peak[cls]))
        for cls, first in starts.items():
            self.peak[cls] = np.fmax.reduce(activity[first:, cls], initial=self.peak[cls])
        self.active = state[-1].copy()
        self.previous = activity[-1].copy()
        self.next_cell = base + n
        out += self._release(self.next_cell)
        return sorted(out, key=lambda e: (e.start, e.index))

    def finish(self, duration: float | None = None, activity: np.ndarray | None = None) -> list[Event]:
        """Push the last cells ``activity`` (if any), close open events after them and return every remaining
        event; ``duration`` (seconds) clips the ends, those of events the last cells close included (the last
        cell may reach past the audio)."""
        self.end = duration
        out = self.push(activity) if activity is not None else []
        for cls in np.flatnonzero(self.active).tolist():
            self.held[cls] = (float(self.onset[cls]), self.next_cell * self.cell_seconds, float(self.peak[cls]))
        self.active[:] = False
        return sorted(out + self._release(None), key=lambda e: (e.start, e.index))

    def _crossing(self, cell: int, before: float, value: float, threshold: float) -> float:
        """Seconds at which the line from the centre of ``cell - 1`` (activity ``before``) to the centre of
        ``cell`` (``value``) crosses ``threshold``; the hysteresis guarantees it lies between the two. An
        onset in the first cell has no earlier centre and is placed at 0."""
        if cell == 0:
            return 0.0
        share = float((threshold - before) / (value - before))
        share = min(max(share, 0.0), 1.0) if math.isfinite(share) else 1.0  # a NaN score before: the centre
        return (cell - 0.5 + share) * self.cell_seconds

    def _open(self, cls: int, onset: float, out: list[Event]) -> None:
        """An onset: merge with the held event of the class when the gap is short enough, else start anew."""
        held = self.held.pop(cls, None)
        if held is not None and onset - held[1] <= self.options.max_gap + 1e-9:
            self.onset[cls], self.peak[cls] = held[0], held[2]
            return
        if held is not None:
            out += self._final(cls, *held)
        self.onset[cls], self.peak[cls] = onset, 0.0

    def _release(self, now: int | None) -> list[Event]:
        """Held events that no later onset can merge with any more (all of them when ``now`` is None): an
        onset in cell ``now`` or later lies after the centre of cell ``now - 1``."""
        earliest = None if now is None else (now - 0.5) * self.cell_seconds
        done = [cls for cls, (_, off, _) in self.held.items()
                if earliest is None or earliest - off > self.options.max_gap + 1e-9]
        return [e for cls in done for e in self._final(cls, *self.held.pop(cls))]

    def _final(self, cls: int, start: float, end: float, peak: float) -> list[Event]:
        """The event, or nothing when it is shorter than ``min_duration``."""
        if self.end is not None:
            end = min(end, self.end)
        if end - start < self.options.min_duration - 1e-9 or end <= start:
            return []
        return [Event(cls, round(start, 6), round(end, 6), round(peak, 6))]

    def _hysteresis(self, activity: np.ndarray) -> np.ndarray:
        """Active state per cell ``[n, classes]``: the last decisive cell (>= onset: on, < offset: off) wins;
        before any decisive cell the state carried from the previous block holds."""
        rising, falling = activity >= self.on, activity < self.off
        decisive = rising | falling
        idx = np.where(decisive, np.arange(len(activity))[:, None], -1)
        last = np.maximum.accumulate(idx, axis=0)
        value = np.take_along_axis(rising, np.maximum(last, 0), axis=0)
        return np.where(last >= 0, value, self.active[None])


def detect_events(activity: np.ndarray, cell_seconds: float, options: EventOptions | None = None,
                  duration: float | None = None) -> list[Event]:
    """Events of a whole activity track ``[cells, classes]`` at once (the streaming detector fed one block)."""
    activity = np.asarray(activity, dtype=np.float64)
    detector = EventDetector(activity.shape[1], cell_seconds, options)
    return sorted(detector.push(activity) + detector.finish(duration), key=lambda e: (e.start, e.index))


class EventTracker:
    """One file's window scores -> events, streamed: an ``ActivityGrid`` feeding an ``EventDetector``.

    ``add(start, length, scores)`` takes windows in start order (frames, probabilities ``[classes]``);
    ``finish(total_frames, duration)`` ends the file. Both return the events that became final. ``on_cells``,
    when given, receives every final block of activity ``[n, classes]`` (e.g. for a picture).
    """

    def __init__(self, num_classes: int, step_frames: int, frame_seconds: float,
                 options: EventOptions | None = None, on_cells=None):
        self.detector = EventDetector(num_classes, step_frames * frame_seconds, options)
        self.grid = ActivityGrid(step_frames, num_classes, self.detector.options.activity)
        self.on_cells = on_cells

    def _final_cells(self, cells: tuple[int, np.ndarray]) -> np.ndarray:
        activity = cells[1]
        if self.on_cells is not None and len(activity):
            self.on_cells(activity)
        return activity

    def add(self, start: int, length: int, scores) -> list[Event]:
        cells = self.grid.add(start, length, np.asarray(scores, dtype=np.float64))
        return self.detector.push(self._final_cells(cells))

    def finish(self, total_frames: int, duration: float | None = None) -> list[Event]:
        return self.detector.finish(duration, self._final_cells(self.grid.finish(total_frames)))


def default_event_windows(family: str, trained_window_seconds: float) -> tuple[float, float]:
    """(window, hop) in seconds for event detection when none are given.

    ElasticAST runs at native length, so short windows cost only their own tokens: 1 s windows every 1/3 s
    (each moment is seen by three windows: about 3x the tokens of plain tagging; onsets to within half a hop,
    1/6 s, with a classifier that scores a window by the event at its centre: docs/events.md). Every 0.25 s
    would cost a third more model time, which on 2 CPU cores is the difference between above and below 50x
    real time for ElasticAST-tiny (docs/benchmarks.md).
    AST only knows its trained window (shorter input is padded to it, so a shorter window saves nothing):
    that window every quarter window (10.24 s every 2.56 s for AudioSet models: 4x the cost of plain tagging,
    2.56 s resolution).
    """
    if family == "elastic":
        return 1.0, 1.0 / 3.0
    return trained_window_seconds, trained_window_seconds / 4
