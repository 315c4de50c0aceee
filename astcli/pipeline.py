"""The `tag` pipeline: files -> decoded blocks -> fbank windows -> packed batches -> scores -> records.

Worker threads decode and resample (soundfile, soxr: no torch, so they never compete with the model's
threads) while the main thread turns blocks into fbank windows and scores packed batches of windows from
any number of files. Records come out in input order, each as soon as its file is complete, and memory
stays bounded whatever the files' lengths.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from astcli.audio import AUDIO_EXTENSIONS, stream_audio
from astcli.errors import AstcliError, ParameterError
from astcli.features import StreamingFbank
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


@dataclass
class FileResult:
    """The outcome for one input: scores per window, or an error."""

    file: str
    duration: float = 0.0
    window_scores: torch.Tensor | None = None  # [windows, classes]
    spans: list[tuple[float, float]] = field(default_factory=list)
    error: str | None = None


def expand_inputs(inputs: Iterable[str], recursive: bool = False, stdin: Iterable[str] | None = None) -> list[str]:
    """Files as given, directories expanded to their audio files (sorted; subfolders with ``recursive``),
    and ``-`` replaced by the paths read from ``stdin``, one per line. Order is kept; a path that does not
    exist stays in the list so that it gets its own error record."""
    out: list[str] = []
    for item in inputs:
        if item == "-":
            out.extend(line.rstrip("\r\n") for line in (stdin or []) if line.strip())
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


def _reason(message: str, path: str) -> str:
    """An error message without the leading ``path:`` (records carry the path separately)."""
    return message[len(path) + 2 :] if message.startswith(path + ": ") else message


class Pipeline:
    """Runs the pipeline for one tagger and one set of options; ``run(paths)`` yields FileResults in order.

    Options that do not fit the tagger raise ``ParameterError`` naming the ``TagOptions`` field."""

    def __init__(self, tagger: Tagger, options: TagOptions):
        self.tagger, self.options = tagger, options
        hop_ms = tagger.feature_hop_ms
        config = tagger.config
        self.window_frames = tagger.window_frames
        if options.window_seconds is not None:
            self.window_frames = max(1, round(options.window_seconds * 1000.0 / hop_ms))
            if config.pads_to_window and self.window_frames > config.max_frames:
                raise ParameterError("window_seconds", f"{options.window_seconds:g} is longer than this AST model's "
                                     f"trained window ({config.max_frames * hop_ms / 1000:g} s)")
        self.hop_frames = self.window_frames
        if options.hop_seconds is not None:
            if options.hop_seconds <= 0:
                raise ParameterError("hop_seconds", "must be positive")
            self.hop_frames = max(1, round(options.hop_seconds * 1000.0 / hop_ms))
        self.batch_tokens = options.batch_tokens or tagger.default_batch_tokens
        for name, value, least in (("batch_tokens", self.batch_tokens, 1), ("workers", options.workers, 1),
                                   ("top_k", options.top_k, 0)):
            if value < least:
                raise ParameterError(name, f"must be at least {least} (got {value})")
        if options.aggregate not in (None, *AGGREGATES):
            raise ParameterError("aggregate", f"must be one of {', '.join(AGGREGATES)}")
        self.frame_seconds = hop_ms / 1000.0

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
                samples = 0
                for block in stream_audio(path, self.tagger.sample_rate, self.options.block_seconds):
                    samples += len(block)
                    if not put(("block", index, block)):
                        return
                put(("end", index, samples))
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
        scores: dict[int, list[tuple[int, torch.Tensor]]] = {}
        finished: set[int] = set()
        pending: list[tuple[int, int, torch.Tensor]] = []
        cutters: dict[int, tuple[StreamingFbank, _Windows]] = {}
        tokens = self.tagger.config.tokens
        pending_tokens = 0

        def flush() -> None:
            nonlocal pending_tokens
            live = [p for p in pending if results[p[0]].error is None]
            if live:
                probs = self.tagger.score_windows([w for _, _, w in live], self.batch_tokens)
                for (index, start, _), row in zip(live, probs, strict=True):
                    scores.setdefault(index, []).append((start, row))
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
                cutters.pop(index, None)
                results[index].error = payload
                finished.add(index)
            else:
                for start, w in self._windows_of(kind, index, payload, cutters, results, finished):
                    pending.append((index, start, w))
                    pending_tokens += tokens(min(len(w), self.window_frames))
                if pending_tokens >= self.batch_tokens:
                    flush()
            # A file's blocks precede its end in the queue, so a finished file is complete once
            # the windows of it still pending are scored.
            while emitted in finished:
                if any(i == emitted for i, _, _ in pending):
                    flush()
                yield self._finish(results[emitted], scores.pop(emitted, []))
                emitted += 1

    def _windows_of(self, kind: str, index: int, payload, cutters: dict, results: list[FileResult],
                    finished: set[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """The (start frame, window) pairs that a decoded block, or a file's end, completes."""
        if index not in cutters:
            cutters[index] = self._cutter()
        features, windows = cutters[index]
        if kind == "block":
            return windows.push(features.push(payload))
        del cutters[index]  # "end": the last, partial windows
        results[index].duration = payload / self.tagger.sample_rate
        finished.add(index)
        return windows.finish(features.num_frames)

    def _cutter(self) -> tuple[StreamingFbank, _Windows]:
        """Per-file state on the main thread: incremental fbank and the window cutter."""
        t = self.tagger
        mel = t.config.num_mel_bins
        return (StreamingFbank(t.sample_rate, num_mel_bins=mel, frame_shift_ms=t.feature_hop_ms),
                _Windows(self.window_frames, self.hop_frames, mel))

    def _finish(self, result: FileResult, rows: list[tuple[int, torch.Tensor]]) -> FileResult:
        if result.error is None:
            rows.sort(key=lambda r: r[0])
            result.window_scores = torch.stack([r for _, r in rows])
            size = self.window_frames * self.frame_seconds
            result.spans = [(s * self.frame_seconds, min(s * self.frame_seconds + size, result.duration))
                            for s, _ in rows]
        return result

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
        aggregate = self.options.aggregate or ("max" if self.tagger.config.multi_label else "mean")
        window_scores = result.window_scores
        overall = window_scores.amax(0) if aggregate == "max" else window_scores.mean(0)
        record = {"file": result.file, "duration": round(result.duration, 3), "tags": self._tags(overall),
                  "error": None}
        if self.options.timeline:
            record["segments"] = [{"start": round(a, 3), "end": round(b, 3), "tags": self._tags(row)}
                                  for (a, b), row in zip(result.spans, window_scores, strict=True)]
        return record


def tag_files(tagger: Tagger, paths: list[str], options: TagOptions | None = None,
              on_audio: Callable[[float], None] | None = None) -> Iterator[dict]:
    """Records (dicts in the documented schema) for ``paths``, in order, one per path."""
    pipeline = Pipeline(tagger, options or TagOptions())
    with closing(pipeline.run(paths, on_audio)) as results:
        for result in results:
            yield pipeline.record(result)
