"""The generated corpus through `ast tag` in one invocation: every input gets its own true record, in order, in
every output format; a good file's scores do not depend on the broken files around it."""

from __future__ import annotations

import csv
import io
import json
import math
import os

import pytest
from corpus import build_corpus, start_writers
from helpers import make_hf_ast, save_hf_ast
from test_tag import run_cli

import astcli.audio
from astcli.writers import printable

FRAMES = 300  # the tiny AST's window: 3 s


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = make_hf_ast(max_length=FRAMES, num_labels=6, problem_type="multi_label_classification")
    return str(save_hf_ast(model, tmp_path_factory.mktemp("model") / "ast"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON number {token}")

    return json.loads(text, parse_constant=refuse)


def _tag(corpus, model_dir, capsys, monkeypatch, fmt: str, *extra: str):
    monkeypatch.setattr(astcli.audio, "PIPE_WAIT_SECONDS", 0.5)
    writers = start_writers(corpus)
    result = run_cli(["tag", "-m", model_dir, "-f", fmt, "-k", "0", *extra, "--", *[c.arg for c in corpus]],
                     capsys, monkeypatch)
    for thread in writers:
        thread.join(timeout=10)
    return result


def _check_record(case, record: dict) -> None:
    assert os.fsencode(record["file"]) == os.fsencode(case.arg), case.kind
    if case.good:
        assert record["error"] is None, (case.kind, record)
        if case.duration is not None:
            assert record["duration"] == pytest.approx(case.duration, abs=2e-3), case.kind
        scores = [t["score"] for t in record["tags"]]
        assert len(scores) == 6 and all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores), case.kind
    else:
        assert case.error in (record["error"] or ""), (case.kind, record)
        assert "tags" not in record, case.kind
    if case.warning is None:
        assert "warning" not in record, (case.kind, record)
    else:
        assert case.warning in record["warning"], (case.kind, record)


def test_every_input_gets_its_true_record(corpus, model_dir, capsys, monkeypatch):
    assert len({c.kind for c in corpus}) >= 40
    code, out, err = _tag(corpus, model_dir, capsys, monkeypatch, "jsonl", "--timeline")
    records = [_strict(line) for line in out.splitlines()]
    assert code == 1 and len(records) == len(corpus)
    for case, record in zip(corpus, records, strict=True):
        _check_record(case, record)
        for segment in record.get("segments", []):
            assert 0.0 <= segment["start"] < segment["end"] <= record["duration"] + 1e-3
    # stderr: one line per failed input and one per warning, each naming its input on that one line
    lines = err.splitlines()
    failed = [c for c in corpus if not c.good]
    warned = [c for c in corpus if c.warning]
    assert len(lines) == len(failed) + len(warned) and "Traceback" not in err
    for case in warned:
        assert any(case.warning in line and "warning" in line for line in lines), case.kind


def test_good_scores_do_not_depend_on_their_neighbours(corpus, model_dir, capsys, monkeypatch):
    _, out, _ = _tag(corpus, model_dir, capsys, monkeypatch, "jsonl")
    together = {os.fsencode(r["file"]): r for r in map(_strict, out.splitlines())}
    for case in corpus:
        if case.good and case.feed is None:
            _, alone, _ = run_cli(["tag", "-m", model_dir, "-f", "jsonl", "-k", "0", "--", case.arg], capsys,
                                  monkeypatch)
            mixed = {t["index"]: t["score"] for t in together[os.fsencode(case.arg)]["tags"]}
            single = {t["index"]: t["score"] for t in _strict(alone)["tags"]}
            assert max(abs(mixed[i] - single[i]) for i in single) <= 1e-6 + 1e-12, case.kind


@pytest.mark.parametrize("fmt", ["json", "csv", "tsv", "table"])
def test_every_format_carries_every_record(corpus, model_dir, capsys, monkeypatch, tmp_path, fmt):
    target = tmp_path / f"records.{fmt}"  # a real file: CSV/TSV carry names that are not UTF-8 as their bytes
    code, out, _ = _tag(corpus, model_dir, capsys, monkeypatch, fmt, "-o", str(target))
    assert code == 1 and out == ""
    out = target.read_bytes().decode("utf-8", "surrogateescape")
    if fmt == "json":
        records = _strict(out)
        assert len(records) == len(corpus)
        for case, record in zip(corpus, records, strict=True):
            _check_record(case, record)
    elif fmt in ("csv", "tsv"):
        rows = list(csv.DictReader(io.StringIO(out, newline=""), delimiter="," if fmt == "csv" else "\t"))
        files = list(dict.fromkeys(os.fsencode(r["file"]) for r in rows))
        assert files == list(dict.fromkeys(os.fsencode(c.arg) for c in corpus))
        by_file = {}
        for row in rows:
            by_file.setdefault(os.fsencode(row["file"]), []).append(row)
        for case in corpus:
            mine = by_file[os.fsencode(case.arg)]
            if case.good:
                assert all(r["error"] == "" and math.isfinite(float(r["score"])) for r in mine), case.kind
            else:
                assert len(mine) == 1 and case.error in mine[0]["error"], case.kind
            assert all((case.warning or "") in r["warning"] for r in mine) and (case.warning or not mine[0]["warning"])
    else:  # the table wraps long messages in its label column: compare word sequences
        words = " ".join(out.split())
        for case in corpus:
            assert printable(case.arg).split()[0] in words, case.kind
            for said in (case.warning, case.error):
                assert " ".join((said or "").split()) in words, case.kind
