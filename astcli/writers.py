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
from typing import IO

from astcli.errors import ParameterError

FORMATS = ("table", "jsonl", "json", "csv", "tsv")
CSV_COLUMNS = ("file", "start", "end", "label", "score", "error", "warning")

_SURROGATE = re.compile("[\ud800-\udfff]")
_UNPRINTABLE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_NAMED_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def format_for(path: str | None, stdout_is_tty: bool) -> str:
    """The default format: from the output file's extension, else table on a terminal, jsonl in a pipe."""
    if path:
        suffix = path.rsplit(".", 1)[-1].lower() if "." in path else ""
        return suffix if suffix in FORMATS and suffix != "table" else "jsonl"
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
    """Long form, one row per (file, span, label): the whole file's tags, then each window's with --timeline.
    A failed file is one row with its error; a warning is repeated on each row of its file."""

    def __init__(self, stream: IO[str], delimiter: str):
        super().__init__(stream)
        self.rows = csv.writer(stream, delimiter=delimiter, lineterminator="\n")
        # csv quotes fields holding "\n" (the line terminator) but not a lone "\r": rows with one quote all
        self.quoted = csv.writer(stream, delimiter=delimiter, lineterminator="\n", quoting=csv.QUOTE_ALL)
        self.rows.writerow(CSV_COLUMNS)

    def write(self, record: dict) -> None:
        file, warning = record["file"], record.get("warning") or ""
        if record.get("error"):
            rows = [[file, "", "", "", "", record["error"], warning]]
        else:
            spans = [{"start": 0.0, "end": record["duration"], "tags": record["tags"]}, *record.get("segments", [])]
            rows = [[file, _number(span["start"], 3), _number(span["end"], 3), tag["label"],
                     _number(tag["score"], 6), "", warning] for span in spans for tag in span["tags"]]
            rows = rows or [[file, "0.000", _number(record["duration"], 3), "", "", "", warning]]
        for row in rows:
            (self.quoted if any("\r" in field for field in row) else self.rows).writerow(row)
        self.stream.flush()


def _number(value, decimals: int) -> str:
    return f"{value:.{decimals}f}" if isinstance(value, int | float) and math.isfinite(value) else ""


class TableWriter(Writer):
    """A rich table for people at a terminal, printed file by file."""

    def __init__(self, stream: IO[str], file_width: int = 16):
        super().__init__(stream)
        from rich.console import Console

        # A terminal's width is respected; written to a file or pipe the table is never squeezed.
        width = None if stream.isatty() else 1000
        self.console = Console(file=stream, highlight=False, soft_wrap=False, width=width, markup=False,
                               emoji=False)
        self.first = True
        self.file_width = file_width  # the longest input name, so that every file's rows line up

    def write(self, record: dict) -> None:
        from rich.table import Table
        from rich.text import Text

        name = printable(record["file"])
        self.file_width = max(self.file_width, len(name))
        table = Table(show_header=self.first, box=None, pad_edge=False, expand=False)
        widths = {"file": self.file_width, "seconds": 8, "label": 32, "score": 6}
        for column, justify in (("file", "left"), ("seconds", "right"), ("label", "left"), ("score", "right")):
            table.add_column(column, justify=justify, style="bold" if column == "file" else None,
                             min_width=widths[column], max_width=None if column != "label" else 48)
        if record.get("error"):
            table.add_row(name, "", Text(f"error: {printable(record['error'])}", style="red"), "")
        else:
            tags = record["tags"] or [{"label": "-", "score": None}]
            for i, tag in enumerate(tags):
                table.add_row(name if i == 0 else "", _number(record["duration"], 2) if i == 0 else "",
                              Text(printable(tag["label"])), _number(tag["score"], 3))
        if record.get("warning"):
            table.add_row("", "", Text(f"warning: {printable(record['warning'])}", style="yellow"), "")
        self.console.print(table)
        self.first = False
        self.stream.flush()


def make_writer(fmt: str, stream: IO[str], names: list[str] | None = None) -> Writer:
    """A writer of format ``fmt`` (one of FORMATS) over ``stream``; ``names`` (the inputs) size the table.

    A text stream that can be reconfigured (a file, stdout) is set to ``errors="surrogateescape"`` so that
    names that are not UTF-8 go out as their own bytes (CSV/TSV); JSON and the table never need it."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")
    if fmt == "jsonl":
        return JsonlWriter(stream)
    if fmt == "json":
        return JsonWriter(stream)
    if fmt in ("csv", "tsv"):
        return DelimitedWriter(stream, "," if fmt == "csv" else "\t")
    if fmt == "table":
        return TableWriter(stream, max([16, *(len(printable(n)) for n in names or [])]))
    raise ValueError(f"unknown format {fmt!r} (choose {', '.join(FORMATS)})")
