"""The `tag` pipeline: files -> decoded blocks -> fbank windows -> packed batches -> scores -> records.

Worker threads decode and resample (soundfile, soxr: no torch, so they never compete with the model's
threads) while the main thread turns blocks into fbank windows and scores packed batches of windows from
any number of files. Records come out in input order, each as soon as its file is complete, and memory
stays bounded whatever the files' lengths.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

import torch

from astcli.audio import AUDIO_EXTENSIONS, read_path_list, stream_audio
from astcli.errors import AstcliError, ParameterError
from astcli.events import Event, EventOptions, EventTracker, default_event_windows
from astcli.features import FRAME_LENGTH_MS, StreamingFbank
from astcli.tagger import Tagger

AGGREGATES = ("mean", "max")


@dataclass
class TagOptions:
    """How files are cut into windows and how scores become tags."""

    window_seconds: float | None = None  # seconds per window; default: the model's window
    hop_seconds: float | None = None  # seconds between window starts; default: the window (no overlap)
    aggregate: str | None = None  # mean | max over windows; default: max for multi-label, mean otherwise
    top_k: int = 5  # 0 = every class
    threshold: float | None = None
    timeline: bool = False
    batch_tokens: int | None = None  # default: the tagger's for its device
    workers: int = 1
    block_seconds: float = 10.0
    events: EventOptions | None = None  # detect events; window and hop default to the family's event windows
    plot_dir: str | None = None  # one PNG per file here (needs events and matplotlib)


@dataclass
class FileResult:
    """The outcome for one input: its aggregate scores (and per-window scores with ``timeline``, events with
    ``events``), or an error."""

    file: str
    duration: float = 0.0
    overall: torch.Tensor | None = None  # [classes]: mean or max over windows
    window_scores: torch.Tensor | None = None  # [windows, classes], with ``timeline`` only
    spans: list[tuple[float, float]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    picture: Path | None = None
    error: str | None = None
    warning: str | None = None  # something doubtful about a tagged file (it ended before its header said)


def expand_inputs(inputs: Iterable[str], recursive: bool = False, stdin: IO | None = None) -> list[str]:
    """Files as given, directories expanded to their audio files (sorted; subfolders with ``recursive``),
    and ``-`` replaced by the paths read from ``stdin`` (``read_path_list``: one per line, BOM and CRLF
    tolerated, bytes that are not UTF-8 kept). Order is kept; a path that does not exist stays in the list so
    that it gets its own error record. Audio data on ``stdin`` is a UsageError."""
    out: list[str] = []
    listed: list[str] | None = None
    for item in inputs:
        if item == "-":
            if listed is None:
                data = stdin.read() if stdin is not None else b""
                listed = read_path_list(data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data)
            out.extend(listed)
        elif os.path.isdir(item):
            walk = Path(item).rglob("*") if recursive else Path(item).iterdir()
            found = sorted(str(p) for p in walk if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
            out.extend(found or [item])
        else:
            out.append(item)
    return out


class _Windows:
    """Cuts a growing frame sequence into windows of ``size`` frames every ``hop`` frames."""

    def __init__(self, size: int, hop: int, mel: int):
        self.size, self.hop = size, hop
        self.buffer = torch.empty(0, mel)
        self.offset = 0  # frame index of buffer[0]
        self.next_start = 0

    def push(self, frames: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        self.buffer = torch.cat([self.buffer, frames])
        while self.offset + len(self.buffer) >= self.next_start + self.size:
            yield self._take(self.size)
        self._trim()

    def finish(self, total: int) -> Iterator[tuple[int, torch.Tensor]]:
        """The last, partial windows: those that hold frames no earlier window held."""
        while (self.next_start < total and (self.next_start == 0 or self._new_frames(total))) or self.next_start == 0:
            yield self._take(total - self.next_start)

    def _new_frames(self, total: int) -> bool:
        """Whether a window starting at next_start would hold frames past the previous window's end."""
        return self.next_start - self.hop + self.size < total

    def _take(self, length: int) -> tuple[int, torch.Tensor]:
        at = self.next_start - self.offset
        window = self.buffer[at : at + length].clone()
        start = self.next_start
        self.next_start += self.hop
        return start, window

    def _trim(self) -> None:
        drop = min(self.next_start - self.offset, len(self.buffer))
        if drop > 0:
            self.buffer, self.offset = self.buffer[drop:], self.offset + drop


class _FileState:
    """What the main thread keeps of one file while it streams: incremental fbank, the window cutter, running
    aggregates, per-window rows (``timeline`` only), the event tracker and the picture's pooled data."""

    def __init__(self, pipeline: Pipeline):
        t, opts = pipeline.tagger, pipeline.options
        mel, classes = t.config.num_mel_bins, t.config.num_classes
        self.features = StreamingFbank(t.sample_rate, num_mel_bins=mel, frame_shift_ms=t.feature_hop_ms)
        self.windows = _Windows(pipeline.window_frames, pipeline.hop_frames, mel)
        self.seen = pipeline._seen
        self.rows: list[tuple[int, int, torch.Tensor]] | None = [] if opts.timeline else None
        self.sum = torch.zeros(classes, dtype=torch.float64)
        self.max = torch.zeros(classes)
        self.count = 0
        self.events: list[Event] = []
        self.spectrogram = self.activity = None
        if opts.plot_dir is not None:
            from astcli.plot import Pooled

            self.spectrogram, self.activity = Pooled(mel), Pooled(classes, reduce="max")
        self.tracker = None
        if opts.events is not None:
            self.tracker = EventTracker(classes, pipeline.hop_frames, pipeline.frame_seconds, opts.events,
                                        on_cells=self.activity.push if self.activity is not None else None)

    def cut(self, block: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Windows completed by the next audio block."""
        frames = self.features.push(block)
        if self.spectrogram is not None:
            self.spectrogram.push(frames.numpy())
        return self.windows.push(frames)

    def end(self) -> Iterator[tuple[int, torch.Tensor]]:
        """The last, partial windows."""
        return self.windows.finish(self.features.num_frames)

    def add(self, start: int, length: int, row: torch.Tensor) -> None:
        """The scores ``[classes]`` of the next window (windows arrive in start order)."""
        self.sum += row
        self.max = torch.maximum(self.max, row) if self.count else row.clone()
        self.count += 1
        if self.rows is not None:
            self.rows.append((start, length, row))
        if self.tracker is not None:
            self.events += self.tracker.add(start, self.seen(length), row.numpy())  # the frames it scored

    def finish(self, duration: float) -> None:
        if self.tracker is not None:
            self.events += self.tracker.finish(self.features.num_frames, duration)


def _frames(name: str, seconds: float, hop_ms: float, least: int, unit: str) -> int:
    """``seconds`` in feature frames of ``hop_ms``; ParameterError ``name`` unless finite and at least ``least``
    frames (``unit`` names that least length)."""
    if not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds <= 0:
        raise ParameterError(name, f"must be a positive number of seconds (got {seconds})")
    frames = round(seconds * 1000.0 / hop_ms)
    if frames < least:
        raise ParameterError(name, f"{seconds:g} is shorter than {unit} ({least * hop_ms / 1000:g} s)")
    return frames


def _windows(tagger: Tagger, options: TagOptions) -> tuple[TagOptions, int, int]:
    """``options`` with the event windows filled in (the family's defaults unless given), and the window and
    hop in feature frames. ParameterError for a window the model cannot score or, with events, a hop longer
    than the window (audio between windows would never be scored)."""
    hop_ms, config = tagger.feature_hop_ms, tagger.config
    if options.events is not None:  # a given window keeps the default's windows per moment
        window, hop = default_event_windows(config.family, config.max_frames * hop_ms / 1000)
        given = options.window_seconds, options.hop_seconds
        options = replace(options, window_seconds=window if given[0] is None else given[0],
                          hop_seconds=given[1] if given[1] is not None else hop if given[0] is None
                          else given[0] * hop / window)
    window_frames = tagger.window_frames
    if options.window_seconds is not None:
        window_frames = _frames("window_seconds", options.window_seconds, hop_ms, config.patch_size, "one patch")
        if window_frames > config.max_frames:
            what = "trained window" if config.pads_to_window else "time table (the longest audio it scores)"
            raise ParameterError("window_seconds", f"{options.window_seconds:g} is longer than this model's "
                                 f"{what}: {config.max_frames * hop_ms / 1000:g} s")
    hop_frames = window_frames
    if options.hop_seconds is not None:
        hop_frames = _frames("hop_seconds", options.hop_seconds, hop_ms, 1, "one feature frame")
    if options.events is not None and hop_frames > window_frames:
        raise ParameterError("hop_seconds", f"{options.hop_seconds:g} is longer than the window "
                             f"({options.window_seconds:g} s): with events, audio between windows would never "
                             "be scored")
    return options, window_frames, hop_frames


def _reason(message: str, path: str) -> str:
    """An error message without the leading ``path:`` (records carry the path separately)."""
    return message[len(path) + 2 :] if message.startswith(path + ": ") else message


class Pipeline:
    """Runs the pipeline for one tagger and one set of options; ``run(paths)`` yields FileResults in order.

    Options that do not fit the tagger raise ``ParameterError`` naming the ``TagOptions`` field."""

    def __init__(self, tagger: Tagger, options: TagOptions):
        self.tagger = tagger
        hop_ms = tagger.feature_hop_ms
        self.options, self.window_frames, self.hop_frames = _windows(tagger, options)
        options = self.options
        self.batch_tokens = options.batch_tokens or tagger.default_batch_tokens
        for name, value, least in (("batch_tokens", self.batch_tokens, 1), ("workers", options.workers, 1),
                                   ("top_k", options.top_k, 0)):
            if value < least:
                raise ParameterError(name, f"must be at least {least} (got {value})")
        if options.aggregate not in (None, *AGGREGATES):
            raise ParameterError("aggregate", f"must be one of {', '.join(AGGREGATES)}")
        self.frame_seconds = hop_ms / 1000.0
        self.picture_names: set[str] = set()
        if options.plot_dir is not None:
            if options.events is None:
                raise ParameterError("plot_dir", "needs events (pictures show the detected events)")
            from astcli.plot import require_matplotlib

            require_matplotlib()

    # -- producer side: decode + resample, in worker threads ---------------------------------------------

    def _produce(self, jobs: Iterator[tuple[int, str]], lock: threading.Lock, out: queue.Queue,
                 stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        while not stop.is_set():
            with lock:
                job = next(jobs, None)
            if job is None:
                break
            index, path = job
            try:
                stream = stream_audio(path, self.tagger.sample_rate, self.options.block_seconds)
                for block in stream:
                    if not put(("block", index, block)):
                        return
                put(("end", index, (stream.samples, stream.finish())))
            except AstcliError as exc:
                put(("error", index, _reason(str(exc), path)))
            except Exception as exc:  # a file must never take the run down with it
                put(("error", index, f"{type(exc).__name__}: {exc}".splitlines()[0]))

    # -- consumer side: pack windows from any files, score, assemble records ------------------------------

    def run(self, paths: list[str], on_window_batch: Callable[[float], None] | None = None) -> Iterator[FileResult]:
        """FileResults in the order of ``paths``; ``on_window_batch(audio_seconds)`` reports scored audio."""
        with self._decoding(paths) as items:
            yield from self._consume(paths, items, on_window_batch)

    @contextlib.contextmanager
    def _decoding(self, paths: list[str]) -> Iterator[queue.Queue]:
        """Worker threads decoding ``paths`` into a bounded queue of ("block" | "end" | "error", index, payload);
        on exit (also an early close: broken pipe, Ctrl-C) they are stopped and joined."""
        items: queue.Queue = queue.Queue(maxsize=8)
        stop = threading.Event()
        lock = threading.Lock()
        jobs = iter(enumerate(paths))
        workers = [threading.Thread(target=self._produce, args=(jobs, lock, items, stop), daemon=True)
                   for _ in range(min(self.options.workers, max(1, len(paths))))]
        for w in workers:
            w.start()
        try:
            yield items
        finally:
            stop.set()
            for w in workers:
                w.join()

    def _consume(self, paths: list[str], items: queue.Queue,
                 on_window_batch: Callable[[float], None] | None) -> Iterator[FileResult]:
        results = [FileResult(p) for p in paths]
        states: dict[int, _FileState] = {}
        finished: set[int] = set()
        pending: list[tuple[int, int, torch.Tensor]] = []
        tokens = self.tagger.config.tokens
        pending_tokens = 0

        def flush() -> None:
            nonlocal pending_tokens
            live = [p for p in pending if results[p[0]].error is None]
            if live:
                probs = self.tagger.score_windows([w for _, _, w in live], self.batch_tokens)
                for (index, start, w), row in zip(live, probs, strict=True):
                    states[index].add(start, len(w), row)
                if on_window_batch:
                    on_window_batch(sum(len(w) for _, _, w in live) * self.frame_seconds)
            pending.clear()
            pending_tokens = 0

        emitted = 0
        while emitted < len(paths):
            try:
                kind, index, payload = items.get(timeout=0.05 if pending else None)
            except queue.Empty:  # decoding is the slower side: do not wait for a full batch
                flush()
                continue
            if kind == "error":
                states.pop(index, None)
                results[index].error = payload
                finished.add(index)
            else:
                for start, w in self._windows_of(kind, index, payload, states, results, finished):
                    pending.append((index, start, w))
                    pending_tokens += tokens(min(len(w), self.window_frames))
                if pending_tokens >= self.batch_tokens:
                    flush()
            # A file's blocks precede its end in the queue, so a finished file is complete once
            # the windows of it still pending are scored.
            while emitted in finished:
                if any(i == emitted for i, _, _ in pending):
                    flush()
                yield self._finish(results[emitted], states.pop(emitted, None))
                emitted += 1

    def _windows_of(self, kind: str, index: int, payload, states: dict, results: list[FileResult],
                    finished: set[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """The (start frame, window) pairs that a decoded block, or a file's end, completes."""
        state = states.get(index) or states.setdefault(index, _FileState(self))
        if kind == "block":
            return state.cut(payload)
        samples, results[index].warning = payload  # "end": the last, partial windows
        results[index].duration = samples / self.tagger.sample_rate
        finished.add(index)
        return state.end()

    def tag_waveform(self, waveform: torch.Tensor, sample_rate: int, name: str = "<waveform>") -> FileResult:
        """The FileResult of one in-memory 1-D waveform at ``sample_rate``, in blocks of ``block_seconds``."""
        if waveform.dim() != 1:
            raise ParameterError("audio", f"must be a 1-D waveform (got shape {tuple(waveform.shape)})")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ParameterError("sample_rate", f"must be a positive whole number of Hz (got {sample_rate!r})")
        if sample_rate != self.tagger.sample_rate:
            from astcli.audio import resample

            waveform = resample(waveform, sample_rate, self.tagger.sample_rate)
        if len(waveform) < self.tagger.sample_rate * 0.025:
            raise ParameterError("audio", "is shorter than one 25 ms feature frame")
        state = _FileState(self)
        block = max(1, round(self.options.block_seconds * self.tagger.sample_rate))
        for at in range(0, len(waveform), block):
            self._score(state, list(state.cut(waveform[at : at + block])))
        self._score(state, list(state.end()))
        return self._finish(FileResult(name, duration=len(waveform) / self.tagger.sample_rate), state)

    def _score(self, state: _FileState, windows: list[tuple[int, torch.Tensor]]) -> None:
        if windows:
            probs = self.tagger.score_windows([w for _, w in windows], self.batch_tokens)
            for (start, w), row in zip(windows, probs, strict=True):
                state.add(start, len(w), row)

    def _finish(self, result: FileResult, state: _FileState | None) -> FileResult:
        if result.error is not None or state is None:
            return result
        state.finish(round(result.duration, 3))  # events end by the duration the record shows
        multi = self.tagger.config.multi_label
        aggregate = self.options.aggregate or ("max" if multi else "mean")
        result.overall = state.max if aggregate == "max" else (state.sum / max(state.count, 1)).float()
        result.events = sorted(state.events, key=lambda e: (e.start, e.index))
        if not torch.isfinite(result.overall).all():
            result.error = "the model gave non-finite scores for this audio"
            return result
        if state.rows is not None:
            result.window_scores = torch.stack([r for _, _, r in state.rows])
            result.spans = [self._span(start, frames, result.duration) for start, frames, _ in state.rows]
        if self.options.plot_dir is not None:
            result.picture = self._draw(result, state)
        return result

    def _draw(self, result: FileResult, state: _FileState) -> Path:
        from astcli.files import unique_name
        from astcli.plot import draw

        folder = Path(self.options.plot_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return draw(folder / unique_name(result.file, ".png", self.picture_names), title=result.file,
                    duration=result.duration, spectrogram=state.spectrogram, frame_seconds=self.frame_seconds,
                    activity=state.activity, cell_seconds=self.hop_frames * self.frame_seconds,
                    events=[self._event(e) for e in result.events], labels=self.tagger.labels)

    def _span(self, start: int, frames: int, duration: float) -> tuple[float, float]:
        """Seconds (start, end) of a window of ``frames`` frames from frame ``start``: its whole length, cut at
        the file's end; where the model sees fewer frames (an ElasticAST window cut to whole patches), the end
        of the last frame it sees."""
        f, seen = self.frame_seconds, self._seen(frames)
        if seen == frames:
            return start * f, min((start + self.window_frames) * f, duration)
        return start * f, min((start + seen - 1) * f + FRAME_LENGTH_MS / 1000, duration)

    def _seen(self, frames: int) -> int:
        """Frames of a ``frames``-frame window that reach the model: all of them for AST (padded to its window);
        ElasticAST cuts a window to whole patches (one patch at least, zero-padded)."""
        patch = self.tagger.config.patch_size
        return frames if self.tagger.config.pads_to_window or frames < patch else frames // patch * patch

    # -- records --------------------------------------------------------------------------------------------

    def _tags(self, probs: torch.Tensor) -> list[dict]:
        k = probs.numel() if self.options.top_k == 0 else min(self.options.top_k, probs.numel())
        values, indices = probs.topk(k)
        labels = self.tagger.labels
        threshold = self.options.threshold
        return [{"label": labels[i], "index": int(i), "score": round(float(v), 6)}
                for v, i in zip(values.tolist(), indices.tolist(), strict=True)
                if threshold is None or v >= threshold]

    def record(self, result: FileResult) -> dict:
        """The output record of one file, in the documented schema."""
        if result.error is not None:
            return {"file": result.file, "error": result.error}
        record = {"file": result.file, "duration": round(result.duration, 3), "tags": self._tags(result.overall),
                  "error": None}
        if result.warning:
            record["warning"] = result.warning
        if self.options.timeline:
            record["segments"] = [{"start": round(a, 3), "end": round(b, 3), "tags": self._tags(row)}
                                  for (a, b), row in zip(result.spans, result.window_scores, strict=True)]
        if self.options.events is not None:
            record["events"] = [self._event(e) for e in result.events]
        return record

    def _event(self, event: Event) -> dict:
        return {"label": self.tagger.labels[event.index], "index": event.index, "start": event.start,
                "end": event.end, "score": event.score}


def tag_files(tagger: Tagger, paths: list[str], options: TagOptions | None = None,
              on_audio: Callable[[float], None] | None = None) -> Iterator[dict]:
    """Records (dicts in the documented schema) for ``paths``, in order, one per path. Options that do not fit
    raise ``ParameterError`` here, before any file is opened."""
    pipeline = Pipeline(tagger, options or TagOptions())
    return _records(pipeline, paths, on_audio)


def _records(pipeline: Pipeline, paths: list[str], on_audio: Callable[[float], None] | None) -> Iterator[dict]:
    with closing(pipeline.run(paths, on_audio)) as results:
        for result in results:
            yield pipeline.record(result)


def find_events(tagger, audio, *, options: EventOptions | None = None, window_seconds: float | None = None,
                hop_seconds: float | None = None, sample_rate: int = 16000,
                batch_tokens: int | None = None) -> list[dict]:
    """Sound events in one recording, as ``ast tag --events`` finds them.

    ``audio`` is a path (decoded in blocks, bounded memory) or a 1-D float waveform in [-1, 1] at
    ``sample_rate`` Hz. Windows default to the model family's event windows (``default_event_windows``).
    Returns ``[{"label", "index", "start", "end", "score"}]`` (seconds; score = peak activity) in start
    order. Raises ``AudioError`` for unreadable audio, ``ParameterError`` for options that cannot work.
    """
    from astcli.errors import AudioError

    tag_options = TagOptions(window_seconds=window_seconds, hop_seconds=hop_seconds, batch_tokens=batch_tokens,
                             events=options or EventOptions())
    pipeline = Pipeline(tagger, tag_options)
    if isinstance(audio, (str, os.PathLike)):
        with closing(pipeline.run([os.fspath(audio)])) as results:
            result = next(results)
        if result.error is not None:
            raise AudioError(f"{os.fspath(audio)}: {result.error}")
    else:
        result = pipeline.tag_waveform(torch.as_tensor(audio, dtype=torch.float32), sample_rate)
        if result.error is not None:
            raise AudioError(f"waveform: {result.error}")
    return [pipeline._event(e) for e in result.events]
