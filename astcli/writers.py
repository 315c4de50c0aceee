"""Record writers: table, JSONL, JSON, CSV and TSV; each record is written and flushed as it arrives.

File names are whatever bytes the operating system holds, decoded as Python does (``os.fsdecode``: bytes that
are not UTF-8 become lone surrogates, "surrogateescape"). Every format gives them back without loss:

* JSON / JSONL: strict JSON (no NaN or Infinity; a non-finite number would be written as ``null``). A byte
  that is not UTF-8 is written as the escape ``\\udcXX`` of its surrogate, so ``os.fsencode(json.loads(line)
  ["file"])`` is the original name; tools that want valid Unicode see U+FFFD there.
* CSV / TSV: RFC 4180 quoting (a field holding the delimiter, a quote or a line break is double-quoted, both
  in CSV and TSV); the name's bytes are written as they are (as ``ls`` and ``find`` print them).
* table: for people, one line per name: a backslash, a control character (tab, newline, escape, ...) or a
  byte that is not UTF-8 is shown as ``\\\\``, ``\\t``, ``\\n`` or ``\\xNN``, which is unambiguous.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import IO

from astcli.errors import ParameterError
from astcli.files import unique_name, write_text

FORMATS = ("table", "jsonl", "json", "csv", "tsv")
CSV_COLUMNS = ("file", "scope", "start", "end", "label", "score", "error", "warning")

_SURROGATE = re.compile("[\ud800-\udfff\x85\u2028\u2029]")  # and the line breaks str.splitlines() sees
_UNPRINTABLE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_NAMED_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def format_for(path: str | None, stdout_is_tty: bool) -> str:
    """The default format: from the output file's extension, else table on a terminal, jsonl in a pipe."""
    if path:
        suffix = path.rsplit(".", 1)[-1].lower() if "." in path else ""
        return suffix if suffix in (*FORMATS, "vtt", "srt") and suffix != "table" else "jsonl"
    return "table" if stdout_is_tty else "jsonl"


def check_output(path: str) -> None:
    """Raise ParameterError (parameter ``output``) unless a file could be created at ``path``: run before
    anything else happens, so that a bad path fails at once and no existing file is touched."""
    directory = os.path.dirname(path) or "."
    if os.path.isdir(path):
        raise ParameterError("output", f"{printable(path)} is a directory")
    if not os.path.isdir(directory):
        raise ParameterError("output", f"{printable(path)}: no such directory {printable(directory)}")
    if not os.access(directory, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ParameterError("output", f"{printable(path)}: permission denied")


def check_folder(path: str) -> None:
    """Raise ParameterError (parameter ``output``) unless ``path`` is, or could be made, a writable folder (its
    missing parents are made too): run before the model loads, like :func:`check_output`."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ParameterError("output", f"{printable(path)} is a file, not a folder for one track per input")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ParameterError("output", f"{printable(path)}: {printable(existing)} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ParameterError("output", f"{printable(path)}: permission denied")


def printable(text: str) -> str:
    """``text`` on one line for a terminal, losslessly: backslashes, control characters and undecodable bytes
    (surrogateescape) become ``\\\\``, ``\\t``, ``\\n``, ``\\r``, ``\\xNN`` (a byte) or ``\\uNNNN`` (a C1 control
    character, or a lone surrogate that is no byte)."""
    def escape(match: re.Match) -> str:
        char = match.group()
        code = ord(char)
        if char in _NAMED_ESCAPES:
            return _NAMED_ESCAPES[char]
        if code >= 0xD800:  # a byte that is not UTF-8 (surrogateescape keeps it as U+DC80..U+DCFF)
            return f"\\x{code - 0xDC00:02x}" if code >= 0xDC80 else f"\\u{code:04x}"
        return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"  # C0/DEL as bytes, C1 as characters

    return _UNPRINTABLE.sub(escape, text)


def _finite(value):
    """``value`` with every non-finite float replaced by None (lists and dicts walked)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def to_json(record: dict) -> str:
    """One record as strict JSON text on one line (see the module notes on names and numbers)."""
    try:
        text = json.dumps(record, ensure_ascii=False, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(record), ensure_ascii=False, allow_nan=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class Writer:
    """Base writer: ``write(record_dict)`` per file, ``close()`` at the end."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, record: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stream.flush()


class JsonlWriter(Writer):
    """One JSON object per line."""

    def write(self, record: dict) -> None:
        self.stream.write(to_json(record) + "\n")
        self.stream.flush()


class JsonWriter(Writer):
    """One JSON array, streamed element by element."""

    def __init__(self, stream: IO[str]):
        super().__init__(stream)
        self.count = 0

    def write(self, record: dict) -> None:
        self.stream.write(("[\n  " if self.count == 0 else ",\n  ") + to_json(record))
        self.stream.flush()
        self.count += 1

    def close(self) -> None:
        self.stream.write("[]\n" if self.count == 0 else "\n]\n")
        super().close()


class DelimitedWriter(Writer):
    """Long form, one row per (file, span, label); ``scope`` tells the whole file's rows ("file") from a window's
    ("window", with --timeline) and an event's ("event", with --events). Every input has at least one "file"
    row: with no tag kept, its label and score are empty; a failed file's row holds its error. A warning is
    repeated on each row of its file. Times are in seconds to the millisecond, as in every format."""

    def __init__(self, stream: IO[str], delimiter: str):
        super().__init__(stream)
        self.rows = csv.writer(stream, delimiter=delimiter, lineterminator="\n")
        # csv quotes fields holding "\n" (the line terminator) but not a lone "\r": rows with one quote all
        self.quoted = csv.writer(stream, delimiter=delimiter, lineterminator="\n", quoting=csv.QUOTE_ALL)
        self.rows.writerow(CSV_COLUMNS)

    def write(self, record: dict) -> None:
        file, warning = record["file"], record.get("warning") or ""
        if record.get("error"):
            rows = [[file, "file", "", "", "", "", record["error"], warning]]
        else:
            whole = {"start": 0.0, "end": record["duration"], "tags": record["tags"] or [{"label": "", "score": ""}]}
            spans = [("file", whole), *(("window", span) for span in record.get("segments", []))]
            spans += [("event", {**e, "tags": [e]}) for e in record.get("events", [])]
            rows = [[file, scope, _number(span["start"], 3), _number(span["end"], 3), tag["label"],
                     _number(tag["score"], 6), "", warning] for scope, span in spans for tag in span["tags"]]
        for row in rows:
            (self.quoted if any("\r" in field for field in row) else self.rows).writerow(row)
        self.stream.flush()


def _number(value, decimals: int) -> str:
    return f"{value:.{decimals}f}" if isinstance(value, int | float) and math.isfinite(value) else ""


class TableWriter(Writer):
    """Aligned columns for people, file by file: ``file seconds label score`` (with ``--timeline`` each window's
    rows follow, its span in the file column). Columns are sized from the content known up front (the input
    names, the model's labels, the window spans) and fitted to ``width`` (a terminal's; None: never squeezed):
    a name too long keeps its end behind "…", a label too long wraps, a score is never cut.
    ``emit(line)`` prints one line (default: to ``stream``); a live progress bar passes its console's print
    so that rows appear above the bar."""

    GAP = "  "
    SECONDS, SCORE = 8, 5  # "seconds" / "9999.999"; "score" / "0.912"
    LABEL_MAX, LABEL_MIN = 40, 24

    def __init__(self, stream: IO[str], names: list[str], labels: list[str] | None = None, timeline: bool = False,
                 width: int | None = None, emit=None):
        super().__init__(stream)
        self.emit = emit or (lambda line: stream.write(line + "\n"))
        label = min(self.LABEL_MAX, max(len("label"), *(map(len, labels) if labels else [24])))
        spans = [len("  0000.000-0000.000")] if timeline else []
        file = max([len("file"), *spans, *(len(printable(n)) for n in names)])
        if width is not None and file + label > width - 1 - self.SECONDS - self.SCORE - 3 * len(self.GAP):
            # too wide: labels wrap down to LABEL_MIN, names are cut to what is left; scores keep their room
            room = width - 1 - self.SECONDS - self.SCORE - 3 * len(self.GAP)
            label = min(label, max(self.LABEL_MIN, room - file, room // 2), max(8, room - 12))
            file = max(8, min(file, room - label))
        self.file_width, self.label_width, self.width = file, label, width
        self.header = False

    def write(self, record: dict) -> None:
        if not self.header:
            self._row("file", "seconds", "label", "score")
            self.header = True
        name = printable(record["file"])
        terminal = self.width is not None
        name = _keep_end(name, self.file_width) if terminal else name  # off a terminal a name is never cut
        if record.get("error"):
            self._message(name, "error: " + printable(record["error"]))
        else:
            self._tags(name, _number(record["duration"], 3), record["tags"])
            for segment in record.get("segments", []):
                span = f"  {_number(segment['start'], 3)}-{_number(segment['end'], 3)}"
                self._tags(span, "", segment["tags"])
        if record.get("warning"):
            self._message("", "warning: " + printable(record["warning"]))
        self.stream.flush()

    def _tags(self, name: str, seconds: str, tags: list[dict]) -> None:
        for i, tag in enumerate(tags or [{"label": "-", "score": None}]):
            self._row(name if i == 0 else "", seconds if i == 0 else "", printable(tag["label"]),
                      _number(tag["score"], 3))

    def _row(self, name: str, seconds: str, label: str, score: str) -> None:
        import textwrap

        lines = textwrap.wrap(label, self.label_width, break_on_hyphens=False) if label else [label]
        first = f"{name:<{self.file_width}}{self.GAP}{seconds:>{self.SECONDS}}{self.GAP}"
        self.emit(f"{first}{lines[0]:<{self.label_width}}{self.GAP}{score:>{self.SCORE}}".rstrip())
        for more in lines[1:]:
            self.emit(" " * len(first) + more)

    def _message(self, name: str, text: str) -> None:
        """An error or warning after the name: wrapped at words to the terminal's width (at least the label and
        score columns), one line off a terminal (so that grep finds it whole)."""
        import textwrap

        first = f"{name:<{self.file_width}}{self.GAP}{'':>{self.SECONDS}}{self.GAP}"
        room = max(self.label_width + len(self.GAP) + self.SCORE, (self.width or 0) - 1 - len(first))
        if self.width is None:
            lines = [text]
        else:
            lines = textwrap.wrap(text, room, break_on_hyphens=False, break_long_words=True)
        self.emit((first + lines[0]).rstrip())
        for more in lines[1:]:
            self.emit(" " * len(first) + more)


def _keep_end(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters from the left, "…" marking the cut (the end of a path tells most)."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1:]


def make_writer(fmt: str, stream: IO[str], names: list[str] | None = None, **table) -> Writer:
    """A writer of format ``fmt`` (one of FORMATS, or of EVENT_FORMATS for a run of one input) over ``stream``;
    ``names`` (the inputs) and ``table`` (``labels``, ``timeline``, ``width``, ``emit``: see TableWriter) shape
    the table.

    A text stream that can be reconfigured (a file, stdout) is set to ``errors="surrogateescape"`` so that
    names that are not UTF-8 go out as their own bytes (CSV/TSV); JSON and the table never need it."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")
    if fmt in EVENT_FORMATS:
        return EventTrackWriter(stream, fmt)
    if fmt == "jsonl":
        return JsonlWriter(stream)
    if fmt == "json":
        return JsonWriter(stream)
    if fmt in ("csv", "tsv"):
        return DelimitedWriter(stream, "," if fmt == "csv" else "\t")
    if fmt == "table":
        return TableWriter(stream, names or [], **table)
    raise ValueError(f"unknown format {fmt!r} (choose {', '.join(FORMATS)})")


# -- event tracks: Audacity labels, WebVTT and SubRip subtitles ---------------------------------------------

EVENT_FORMATS = ("audacity", "vtt", "srt")
EVENT_EXTENSIONS = {"audacity": ".txt", "vtt": ".vtt", "srt": ".srt"}


def timestamp(seconds: float, separator: str = ".") -> str:
    """``HH:MM:SS.mmm`` (WebVTT) or, with ``separator=","``, ``HH:MM:SS,mmm`` (SubRip); rounded to the
    millisecond, hours as many digits as they need (at least two)."""
    ms = _ms(seconds)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    return f"{hours:02d}:{minutes:02d}:{ms // 1000:02d}{separator}{ms % 1000:03d}"


def _ms(seconds: float) -> int:
    """Whole milliseconds, rounded as ``round(seconds, 3)`` rounds the decimal value (3.0005 -> 3001)."""
    return max(0, round(round(seconds, 3) * 1000))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _cues(record: dict) -> list[tuple[str, str, str]]:
    """(start, end, text) per event in the record, in start order; a cue lasts at least one millisecond."""
    cues = []
    for event in sorted(record.get("events") or [], key=lambda e: (e["start"], e["index"])):
        start = _ms(event["start"])
        end = max(start + 1, _ms(event["end"]))
        cues.append((start / 1000, end / 1000, f"{_one_line(event['label'])} ({event['score']:.2f})"))
    return cues


def audacity_labels(record: dict) -> str:
    """An Audacity label track: one ``start<TAB>end<TAB>label`` line per event (seconds with six decimals,
    as Audacity exports them; tabs and line breaks in labels become spaces)."""
    events = sorted(record.get("events") or [], key=lambda e: (e["start"], e["index"]))
    return "".join(f"{e['start']:.6f}\t{e['end']:.6f}\t{_one_line(e['label'])}\n" for e in events)


def webvtt(record: dict) -> str:
    """A WebVTT file (W3C WebVTT, cue text escaped: ``&``, ``<``, ``>``): the header and a blank line, then
    per event a numbered cue reading ``label (score)`` and a blank line."""
    def escape(text: str) -> str:
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    return "WEBVTT\n\n" + "".join(f"{i}\n{timestamp(a)} --> {timestamp(b)}\n{escape(text)}\n\n"
                                  for i, (a, b, text) in enumerate(_cues(record), 1))


def subrip(record: dict) -> str:
    """A SubRip (.srt) file: cues numbered from 1, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, the text, a blank line.
    SubRip has no escapes: ``-->`` in a label is written ``->`` so that no text line reads as a timing."""
    cues = _cues(record)
    return "".join(f"{i}\n{timestamp(a, ',')} --> {timestamp(b, ',')}\n{text.replace('-->', '->')}\n\n"
                   for i, (a, b, text) in enumerate(cues, 1))


EVENT_TRACKS = {"audacity": audacity_labels, "vtt": webvtt, "srt": subrip}


class EventTrackWriter(Writer):
    """The events of exactly one input as an Audacity label track, WebVTT or SubRip file on ``stream``."""

    def __init__(self, stream: IO[str], fmt: str):
        super().__init__(stream)
        self.render = EVENT_TRACKS[fmt]

    def write(self, record: dict) -> None:
        if not record.get("error"):
            self.stream.write(self.render(record))
            self.stream.flush()


class EventTrackFolderWriter:
    """One event track per input in ``folder``, named after the input (``rain.wav`` -> ``rain.vtt``; a name
    taken by an earlier input gets ``-2``, ``-3``, ...). A failed input gets no file."""

    def __init__(self, folder: str | Path, fmt: str):
        self.folder = Path(folder)
        self.render, self.suffix = EVENT_TRACKS[fmt], EVENT_EXTENSIONS[fmt]
        self.taken: set[str] = set()
        self.folder.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if not record.get("error"):
            write_text(self.folder / unique_name(record["file"], self.suffix, self.taken), self.render(record))

    def close(self) -> None:
        pass
