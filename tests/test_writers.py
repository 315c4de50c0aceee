"""Writers give every file name back without loss, write strict JSON and never fail on a record."""

from __future__ import annotations

import csv
import io
import json
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from astcli.errors import ParameterError
from astcli.writers import FORMATS, check_output, make_writer, printable, to_json

# A path the OS can hold: any bytes but NUL (the slash only separates components)
names = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b).map(os.fsdecode)
scores = st.floats(0.0, 1.0)


def _record(name: str, score: float, kind: int) -> dict:
    tags = [{"label": "Dog, \"barking\"\tloud", "index": 3, "score": score}]
    if kind == 0:
        return {"file": name, "error": "corrupt or truncated audio"}
    record = {"file": name, "duration": 2.5, "tags": tags, "error": None}
    if kind == 2:
        record["warning"] = "truncated: the header declares 2.000 s, the file holds 0.666 s"
        record["segments"] = [{"start": 0.0, "end": 2.5, "tags": tags}]
    return record


def _strict_json(text: str):
    """json.loads that refuses NaN / Infinity, as strict parsers do."""
    def refuse(token):
        raise ValueError(f"non-standard JSON number {token}")

    return json.loads(text, parse_constant=refuse)


def _write(fmt: str, records: list[dict]) -> str:
    stream = io.StringIO()
    writer = make_writer(fmt, stream, [r["file"] for r in records])
    for record in records:
        writer.write(record)
    writer.close()
    return stream.getvalue()


def _unprintable(text: str) -> str:
    r"""Invert ``printable``: \\ \t \n \r, \xNN (a byte; non-UTF-8 ones as surrogates) and \uNNNN."""
    def back(match: re.Match) -> str:
        token = match.group()
        named = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\r": "\r"}
        if token in named:
            return named[token]
        code = int(token[2:], 16)
        return chr(code + 0xDC00) if token[1] == "x" and code >= 0x80 else chr(code)

    return re.sub(r"\\\\|\\[tnr]|\\x[0-9a-f]{2}|\\u[0-9a-f]{4}", back, text)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(names, scores, st.integers(0, 2)), min_size=1, max_size=4))
def test_names_round_trip_in_every_format(items):
    records = [_record(*item) for item in items]
    wanted = [os.fsencode(r["file"]) for r in records]
    for fmt in ("jsonl", "json"):
        text = _write(fmt, records)
        text.encode("utf-8")  # valid UTF-8 text whatever the names
        parsed = [_strict_json(line) for line in text.splitlines()] if fmt == "jsonl" else _strict_json(text)
        assert [os.fsencode(r["file"]) for r in parsed] == wanted
        assert [r.get("warning") for r in parsed] == [r.get("warning") for r in records]
    for fmt, delimiter in (("csv", ","), ("tsv", "\t")):
        data = _write(fmt, records).encode("utf-8", "surrogateescape")  # the bytes a file would hold
        rows = list(csv.DictReader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline=""),
                                   delimiter=delimiter))
        files = [os.fsencode(row["file"]) for row in rows]
        assert list(dict.fromkeys(files)) == list(dict.fromkeys(wanted))  # every file, in order
        assert {row["label"] for row in rows if not row["error"]} <= {"Dog, \"barking\"\tloud"}
    spaceless = [r for r in records if " " not in r["file"]]  # the table's columns are split at spaces here
    table = _write("table", spaceless)
    assert "\udc80" not in table and all(ord(c) >= 0x20 or c == "\n" for c in table)
    if spaceless:  # names with spaces cannot be read back from the columns (the printable check above holds)
        shown = [line.split(" ")[0] for line in table.split("\n")[1:] if line and not line.startswith(" ")]
        assert [os.fsencode(_unprintable(s)) for s in shown] == [os.fsencode(r["file"]) for r in spaceless]


def test_printable_is_one_line_and_unambiguous():
    name = os.fsdecode(b"a\tb\nc\\d\x1b\xff\xc2\x85 e")
    assert printable(name) == "a\\tb\\nc\\\\d\\x1b\\xff\\u0085 e"
    assert _unprintable(printable(name)) == name


def test_json_never_carries_nan_or_infinity():
    text = to_json({"file": "x.wav", "tags": [{"score": float("nan")}, {"score": float("inf")}], "d": 1.5})
    assert _strict_json(text) == {"file": "x.wav", "tags": [{"score": None}, {"score": None}], "d": 1.5}


def test_non_utf8_name_survives_a_real_utf8_file(tmp_path):
    name = os.fsdecode(b"caf\xe9 \xff.wav")
    for fmt in FORMATS:
        target = tmp_path / f"out.{fmt}"
        with open(target, "w", encoding="utf-8", newline="") as stream:
            writer = make_writer(fmt, stream, [name])
            writer.write(_record(name, 0.5, 1))
            writer.close()
        data = target.read_bytes()
        if fmt in ("csv", "tsv"):
            assert b"caf\xe9 \xff.wav" in data  # the name's own bytes
        else:
            data.decode("utf-8")
            assert (b"caf\\udce9 \\udcff.wav" if fmt.startswith("json") else b"caf\\xe9 \\xff.wav") in data


def test_a_file_with_no_tag_above_the_threshold_still_has_a_row():
    record = {"file": "quiet.wav", "duration": 1.0, "tags": [], "error": None}
    rows = list(csv.DictReader(io.StringIO(_write("csv", [record]))))
    assert [(r["file"], r["label"], r["end"]) for r in rows] == [("quiet.wav", "", "1.000")]


def test_scope_tells_whole_file_rows_from_window_rows_and_every_file_keeps_one():
    tag = {"label": "Dog", "index": 1, "score": 0.5}
    records = [
        {"file": "a.wav", "duration": 4.0, "tags": [], "error": None,  # nothing kept overall, a window kept Dog
         "segments": [{"start": 0.0, "end": 3.0, "tags": [tag]}, {"start": 3.0, "end": 4.0, "tags": []}]},
        {"file": "b.wav", "duration": 2.0, "tags": [tag], "error": None,
         "segments": [{"start": 0.0, "end": 2.0, "tags": [tag]}]},
        {"file": "c.wav", "error": "corrupt or truncated audio"},
    ]
    for fmt, delimiter in (("csv", ","), ("tsv", "\t")):
        rows = list(csv.DictReader(io.StringIO(_write(fmt, records)), delimiter=delimiter))
        assert [(r["file"], r["scope"], r["start"], r["end"], r["label"], r["score"]) for r in rows] == [
            ("a.wav", "file", "0.000", "4.000", "", ""),
            ("a.wav", "window", "0.000", "3.000", "Dog", "0.500000"),
            ("b.wav", "file", "0.000", "2.000", "Dog", "0.500000"),
            ("b.wav", "window", "0.000", "2.000", "Dog", "0.500000"),
            ("c.wav", "file", "", "", "", ""),
        ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_markup_and_emoji_codes_in_names_are_literal(fmt):
    name = "[red]x[/red] :smile: -rf.wav"
    out = _write(fmt, [_record(name, 0.25, 1)])
    assert name in out


def test_output_paths_are_checked_before_anything_is_written(tmp_path):
    keep = tmp_path / "keep.csv"
    keep.write_text("precious\n")
    check_output(str(keep))  # an existing file may be replaced, but checking it touches nothing
    assert keep.read_text() == "precious\n"
    check_output("relative-name.csv")
    for path, problem in ((tmp_path / "missing_dir" / "x.csv", "no such directory"),
                          (tmp_path, "is a directory")):
        with pytest.raises(ParameterError) as caught:
            check_output(str(path))
        assert caught.value.parameter == "output" and problem in caught.value.problem


def test_table_messages_wrap_at_words_on_a_terminal_and_stay_whole_off_it():
    message = "not a recognised audio format (libsndfile: Format not recognised); try ffmpeg -i FILE out.wav"
    record = {"file": "recordings/field/broken.wav", "duration": None, "tags": [], "error": message}
    lines = []
    writer = make_writer("table", io.StringIO(), names=[record["file"]], labels=["Speech"], width=60,
                         emit=lines.append)
    writer.write(record)
    body = lines[1:]
    assert len(body) > 1 and all(len(line) <= 59 for line in body)
    words = " ".join(line.strip() for line in body).split()
    assert words[0] == record["file"] and " ".join(words[1:]) == "error: " + message  # no word cut in two
    stream = io.StringIO()
    make_writer("table", stream, names=[record["file"]]).write(record)
    assert stream.getvalue().splitlines()[1].endswith("error: " + message)
