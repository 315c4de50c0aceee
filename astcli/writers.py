"""Record writers: table, JSONL, JSON, CSV and TSV; each record is written and flushed as it arrives."""

from __future__ import annotations

import csv
import json
from typing import IO

FORMATS = ("table", "jsonl", "json", "csv", "tsv")
CSV_COLUMNS = ("file", "start", "end", "label", "score", "error")


def format_for(path: str | None, stdout_is_tty: bool) -> str:
    """The default format: from the output file's extension, else table on a terminal, jsonl in a pipe."""
    if path:
        suffix = path.rsplit(".", 1)[-1].lower() if "." in path else ""
        return suffix if suffix in FORMATS and suffix != "table" else "jsonl"
    return "table" if stdout_is_tty else "jsonl"


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
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stream.flush()


class JsonWriter(Writer):
    """One JSON array, streamed element by element."""

    def __init__(self, stream: IO[str]):
        super().__init__(stream)
        self.count = 0

    def write(self, record: dict) -> None:
        self.stream.write(("[\n  " if self.count == 0 else ",\n  ") + json.dumps(record, ensure_ascii=False))
        self.stream.flush()
        self.count += 1

    def close(self) -> None:
        self.stream.write("[]\n" if self.count == 0 else "\n]\n")
        super().close()


class DelimitedWriter(Writer):
    """Long form, one row per (file, span, label): the whole file's tags, then each window's with --timeline.
    A failed file is one row with its error."""

    def __init__(self, stream: IO[str], delimiter: str):
        super().__init__(stream)
        self.rows = csv.writer(stream, delimiter=delimiter, lineterminator="\n")
        self.rows.writerow(CSV_COLUMNS)

    def write(self, record: dict) -> None:
        file = record["file"]
        if record.get("error"):
            self.rows.writerow([file, "", "", "", "", record["error"]])
        else:
            spans = [{"start": 0.0, "end": record["duration"], "tags": record["tags"]}, *record.get("segments", [])]
            for span in spans:
                for tag in span["tags"]:
                    self.rows.writerow([file, f"{span['start']:.3f}", f"{span['end']:.3f}", tag["label"],
                                        f"{tag['score']:.6f}", ""])
        self.stream.flush()


class TableWriter(Writer):
    """A rich table for people at a terminal, printed file by file."""

    def __init__(self, stream: IO[str], file_width: int = 16):
        super().__init__(stream)
        from rich.console import Console

        # A terminal's width is respected; written to a file or pipe the table is never squeezed.
        width = None if stream.isatty() else 1000
        self.console = Console(file=stream, highlight=False, soft_wrap=False, width=width)
        self.first = True
        self.file_width = file_width  # the longest input name, so that every file's rows line up

    def write(self, record: dict) -> None:
        from rich.table import Table

        self.file_width = max(self.file_width, len(record["file"]))
        table = Table(show_header=self.first, box=None, pad_edge=False, expand=False)
        widths = {"file": self.file_width, "seconds": 8, "label": 32, "score": 6}
        for name, justify in (("file", "left"), ("seconds", "right"), ("label", "left"), ("score", "right")):
            table.add_column(name, justify=justify, style="bold" if name == "file" else None,
                             min_width=widths[name], max_width=None if name != "label" else 48)
        if record.get("error"):
            table.add_row(record["file"], "", f"[red]error: {record['error']}[/red]", "")
        else:
            tags = record["tags"] or [{"label": "-", "score": None}]
            for i, tag in enumerate(tags):
                score = "" if tag["score"] is None else f"{tag['score']:.3f}"
                table.add_row(record["file"] if i == 0 else "", f"{record['duration']:.2f}" if i == 0 else "",
                              tag["label"], score)
        self.console.print(table)
        self.first = False
        self.stream.flush()


def make_writer(fmt: str, stream: IO[str], names: list[str] | None = None) -> Writer:
    """A writer of format ``fmt`` (one of FORMATS) over ``stream``; ``names`` (the inputs) size the table."""
    if fmt == "jsonl":
        return JsonlWriter(stream)
    if fmt == "json":
        return JsonWriter(stream)
    if fmt in ("csv", "tsv"):
        return DelimitedWriter(stream, "," if fmt == "csv" else "\t")
    if fmt == "table":
        return TableWriter(stream, max([16, *(len(n) for n in names or [])]))
    raise ValueError(f"unknown format {fmt!r} (choose {', '.join(FORMATS)})")
