"""`ast tag` as a person sees it: run in a pseudo-terminal of fixed size, the output replayed through a terminal
emulator (pyte) to get the screen; and with stderr in a pipe, as a log file or CI sees it."""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pyte
import pytest
import soundfile as sf
from conftest import make_signal
from helpers import make_hf_ast, save_hf_ast

from astcli import console

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["Speech", "Dog", "Livestock, farm animals, working animals", "Music", "Vehicle horn, car horn, honking"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color", "OMP_NUM_THREADS": "1"}
ENV.pop("COLUMNS", None)
ENV.pop("LINES", None)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """A tiny multi-label AST (3 s windows) with AudioSet-like labels, some longer than a narrow column."""
    directory = save_hf_ast(make_hf_ast(max_length=300, num_labels=len(LABELS),
                                        problem_type="multi_label_classification"),
                            tmp_path_factory.mktemp("model") / "ast")
    config = json.loads((directory / "config.json").read_text())
    config["id2label"] = dict(enumerate(LABELS))
    config["label2id"] = {name: i for i, name in enumerate(LABELS)}
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> list[str]:
    """Three files deep in a folder tree: paths far longer than an 80-column table allows."""
    folder = tmp_path_factory.mktemp("audio") / "field" / "recordings" / "2024" / "spring" / "meadow" / "north"
    folder.mkdir(parents=True)
    files = []
    for i, (kind, seconds) in enumerate([("tones", 2.0), ("chirp", 7.0), ("bursts", 4.0)]):
        files.append(str(folder / f"station_{i}_{kind}_recording.wav"))
        sf.write(files[-1], make_signal(kind, seconds, seed=i), 16000)
    return files


@pytest.fixture(scope="module")
def long_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("long") / "long.flac"
    sf.write(path, make_signal("bursts", 90.0, seed=4), 16000)
    return str(path)


def on_terminal(args: list[str], columns: int = 80, cwd: str | None = None) -> tuple[int, list[str], str]:
    """Run `ast ARGS` in a pseudo-terminal ``columns`` wide (stdout and stderr both on it). Returns the exit
    code, the final screen's non-empty lines (right-stripped) and the raw bytes written, as text."""
    child = pexpect.spawn(sys.executable, ["-m", "astcli", *args], env=ENV, cwd=cwd, dimensions=(400, columns),
                          encoding="utf-8", timeout=180)
    child.expect(pexpect.EOF)
    raw = child.before
    child.close()
    screen = pyte.Screen(columns, 400)
    pyte.Stream(screen).feed(raw.replace("\r\n", "\n").replace("\n", "\r\n"))
    return child.exitstatus, [line.rstrip() for line in screen.display if line.strip()], raw


@functools.cache
def _records(args: tuple[str, ...]) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "astcli", "tag", *args, "-f", "jsonl"],
                          capture_output=True, text=True, env=ENV, timeout=180, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]


def records(model: str, files: list[str], *extra: str) -> list[dict]:
    """The same run's JSONL records: the oracle for every number the table shows."""
    return _records(("-m", model, *files, *extra))


def table_rows(lines: list[str]) -> list[tuple[str, str, str, str]]:
    """(file, seconds, label, score) of each row that ends in a score, read from fixed columns."""
    header = lines[0]
    seconds_end = header.index("seconds") + len("seconds")
    label_at, score_end = header.index("label"), header.index("score") + len("score")
    return [(line[:seconds_end - 8].rstrip(), line[seconds_end - 8:seconds_end].strip(),
             line[label_at:score_end - 5].rstrip(), line[score_end - 5:score_end].strip())
            for line in lines[1:] if re.search(r"\d\.\d{3}$", line)]


def test_rows_print_cleanly_above_a_bar_that_disappears(model, deep):
    code, lines, raw = on_terminal(["tag", "-m", model, *deep, "-k", "3"])
    assert code == 0
    assert "tagging" in raw, "a live bar was drawn while tagging"
    assert not any("tagging" in line for line in lines), "the bar is gone at the end"
    assert lines[0].split() == ["file", "seconds", "label", "score"] and max(map(len, lines)) <= 80
    expected = records(model, deep, "-k", "3")
    rows = table_rows(lines)
    assert len(rows) == 9
    for i, record in enumerate(expected):
        name, seconds = rows[3 * i][:2]
        assert name.startswith("…") and record["file"].endswith(name[1:]) and len(name) >= 24
        assert name.endswith("_recording.wav") and seconds == f"{record['duration']:.3f}"
        for row, tag in zip(rows[3 * i:3 * i + 3], record["tags"], strict=True):
            assert row[3] == f"{tag['score']:.3f}" and tag["label"].startswith(row[2].split("  ")[0])


@pytest.mark.parametrize("columns", [60, 100])
def test_scores_are_never_cut_and_columns_fit_the_content(model, deep, columns):
    code, lines, _ = on_terminal(["tag", "-m", model, *deep, "-k", "0"], columns=columns)
    assert code == 0 and max(map(len, lines)) <= columns
    scores = [row[3] for row in table_rows(lines)]
    expected = [f"{t['score']:.3f}" for r in records(model, deep, "-k", "0") for t in r["tags"]]
    assert scores == expected
    label_width = lines[0].index("score") - lines[0].index("label")
    assert label_width <= len(max(LABELS, key=len)) + 2 + 3  # sized from the labels, not a fixed pad
    wrapped = "Livestock, farm animals, working animals"
    assert any(wrapped in line for line in lines) == (columns == 100)  # wraps only where it must


def test_short_names_and_labels_make_narrow_columns(model, tmp_path):
    sf.write(tmp_path / "a.wav", make_signal("tones", 1.0), 16000)
    code, lines, _ = on_terminal(["tag", "-m", model, "a.wav", "-k", "1"], cwd=str(tmp_path))
    assert code == 0 and lines[1].startswith("a.wav ") and len(lines[0]) < 80


def test_timeline_shows_every_window_in_the_table(model, deep):
    code, lines, _ = on_terminal(["tag", "-m", model, deep[1], "--timeline", "-k", "2"])
    expected = records(model, [deep[1]], "--timeline", "-k", "2")[0]
    rows = table_rows(lines)
    spans = [row[0].strip() for row in rows if row[0].startswith("  ")]
    assert code == 0 and spans == [f"{s['start']:.3f}-{s['end']:.3f}" for s in expected["segments"]]
    assert spans[0] == "0.000-3.000" and spans[-1] == "6.000-7.000"
    segment_scores = [row[3] for row in rows[2:]]
    assert segment_scores == [f"{t['score']:.3f}" for s in expected["segments"] for t in s["tags"]]


def test_one_long_file_shows_seconds_of_audio_and_an_eta(model, long_file):
    code, lines, raw = on_terminal(["tag", "-m", model, long_file])
    assert code == 0
    assert re.search(r"tagging .* \d+/90 s ", raw), "progress counts seconds of audio out of the header's 90"
    assert "ETA" in raw and not any("ETA" in line for line in lines)


def test_output_file_on_a_terminal_says_where_the_records_went(model, deep, tmp_path):
    code, lines, _ = on_terminal(["tag", "-m", model, *deep, "-o", "tags.csv"], cwd=str(tmp_path))
    assert code == 0 and lines == ["ast: 3 records written to tags.csv (csv)"]
    assert (tmp_path / "tags.csv").read_text().startswith("file,")


def test_forced_progress_in_a_pipe_prints_plain_lines(model, long_file, deep, tmp_path):
    """Also: an output file whose extension names no format gets JSON lines, and stderr says so."""
    done = subprocess.run([sys.executable, "-m", "astcli", "tag", "-m", model, long_file, deep[0], "--progress",
                           "-o", "tags.txt"], capture_output=True, text=True, env=ENV, timeout=180, cwd=tmp_path)
    lines = done.stderr.splitlines()
    assert done.returncode == 0 and "\x1b" not in done.stderr and "\r" not in done.stderr
    assert lines.pop(0) == "ast: warning: tags.txt: its extension names no format: writing JSON lines (--format " \
        "chooses)"
    assert [json.loads(line)["file"] for line in (tmp_path / "tags.txt").read_text().splitlines()] == [long_file,
                                                                                                      deep[0]]
    assert lines[0] == "ast: tagging: 0/92 s (0%), 0/2 files, 0:00:00"
    assert re.fullmatch(r"ast: tagging: 92/92 s \(100%\), 2/2 files, [\d.]+x real time, \d:\d\d:\d\d", lines[-1])
    assert all(line.startswith("ast: tagging: ") for line in lines)


def test_plain_progress_speaks_every_interval_with_an_eta(capsys, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    bar = console.Progress(True, unit="seconds", interval=5.0, clock=lambda: now[0])
    bar.start("tagging", 100, status="0/1 files")
    for t, done in ((1, 10), (4, 20), (6, 30), (8, 40), (11, 50), (12, 50)):
        now[0] = t
        bar.update(done)
    bar.log("a summary")
    bar.close()
    assert capsys.readouterr().err.splitlines() == [
        "ast: tagging: 0/100 s (0%), 0/1 files, 0:00:00",
        "ast: tagging: 30/100 s (30%), 0/1 files, 0:00:06, ETA 0:00:14",
        "ast: tagging: 50/100 s (50%), 0/1 files, 0:00:11, ETA 0:00:11",
        "a summary",
    ]


# -- training runs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for kind in ("tones", "chirp"):
        (root / kind).mkdir()
        for i in range(4):
            sf.write(root / kind / f"{i}.wav", make_signal(kind, 1.0, seed=i), 16000)
    return root


def test_a_failed_start_leaves_the_run_folder_reusable(model, folder_dataset, tmp_path):
    from typer.testing import CliRunner

    from astcli.cli import app
    from astcli.errors import ParameterError

    out = tmp_path / "run"
    first = CliRunner().invoke(app, ["finetune", "-m", model, "--dataset", str(folder_dataset), "-o", str(out),
                                     "--folds", "9", "--epochs", "1"])
    assert isinstance(first.exception, ParameterError) and first.exception.parameter == "folds"
    assert not (out / "run.json").exists()
    resumed = CliRunner().invoke(app, ["finetune", "--resume", str(out)])
    assert "no run.json, so nothing to resume" in str(resumed.exception)
    fixed = CliRunner().invoke(app, ["finetune", "-m", model, "--dataset", str(folder_dataset), "-o", str(out),
                                     "--epochs", "1", "--num-workers", "0", "--progress"])
    assert fixed.exit_code == 0, fixed.output
    progress = [line for line in fixed.stderr.splitlines() if line.startswith("ast: epoch")]
    assert re.fullmatch(r"ast: epoch 1/1: 0/\d+ \(0%\), .*", progress[0])  # the first epoch speaks at its start
    saved = json.loads((out / "run.json").read_text())
    assert saved["source_model"] == {"path": model} and saved["model"] == model
    assert not {"arch", "size", "init", "model_options"} & set(saved)  # a finetune is not a from-scratch run


@pytest.mark.parametrize(("extra", "flags"), [(["--epochs", "5"], "--epochs"),
                                              (["-d", "elsewhere", "--seed", "3"], "--dataset, --seed")])
def test_resume_refuses_options_that_would_change_the_run(extra, flags, tmp_path):
    from typer.testing import CliRunner

    from astcli.cli import app
    from astcli.errors import UsageError

    result = CliRunner().invoke(app, ["finetune", "--resume", str(tmp_path), *extra, "--device", "cpu"])
    assert isinstance(result.exception, UsageError)
    assert str(result.exception).startswith(f"--resume continues the run as saved in its run.json, so {flags} "
                                            "cannot change it; only --device, --num-workers and --progress can")


def test_durations_have_the_same_precision_in_every_format(model, tmp_path):
    from typer.testing import CliRunner

    from astcli.cli import app

    path = tmp_path / "odd.wav"
    sf.write(path, make_signal("tones", 19753 / 16000), 16000)  # 1.2345625 s
    out = {fmt: CliRunner().invoke(app, ["tag", "-m", model, str(path), "-f", fmt, "--timeline"]).output
           for fmt in ("jsonl", "csv", "table")}
    record = json.loads(out["jsonl"])
    assert record["duration"] == 1.235 and record["segments"][-1]["end"] == 1.235
    assert [row["end"] for row in csv.DictReader(io.StringIO(out["csv"]))][:2] == ["1.235", "1.235"]
    assert out["table"].splitlines()[1].split()[1] == "1.235"


@pytest.mark.parametrize("command", ["tag", "finetune", "train", "export"])
def test_help_shows_placeholders_not_python_types(command):
    from typer.testing import CliRunner

    from astcli.cli import app

    text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "100"}).output
    assert not re.search(r"<(list\[|(str|int|float|bool)>)", text), text
    if command == "tag":
        assert "Usage: ast tag [OPTIONS] [FILES]..." in text
        assert re.search(r"-m, --model MODEL +Model to use", text) and re.search(r"--window SECONDS +Window", text)


def test_progress_reads_no_header_from_a_fifo(tmp_path):
    """The progress total skips pipes and FIFOs: opening one would block or eat the bytes the decoder needs."""
    fifo = tmp_path / "stream.wav"
    os.mkfifo(fifo)
    script = f"from astcli.cli import _header_seconds; print(_header_seconds({str(fifo)!r}))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0.0"
