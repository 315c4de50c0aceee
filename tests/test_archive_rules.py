"""The rules for real archives in the CLI and the Python API: usage errors before anything happens, clips too short
or absurd, audio on stdin, spans only over scored audio, the score convention; plus property tests of `tag_files`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from corpus import build_corpus
from helpers import hf_to_original_ast, make_elastic_state, make_hf_ast, save_hf_ast
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_tag import run_cli

from astcli.errors import AudioError, ParameterError
from astcli.pipeline import TagOptions, tag_files
from astcli.tagger import load_model
from astcli.writers import to_json

FRAMES = 300  # the tiny AST's window: 3 s
SAME = 1e-6 + 1e-12  # records round scores to 6 decimals: one unit in the last place, as a float
TONE = (0.3 * np.sin(2 * np.pi * 440 * np.arange(80000) / 16000)).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rules")
    model = make_hf_ast(max_length=FRAMES, num_labels=6, problem_type="multi_label_classification")
    ast_dir = save_hf_ast(model, root / "ast")
    pth = root / "ast.pth"  # the same weights as a bare original checkpoint (6 classes: softmax by default)
    torch.save(hf_to_original_ast(load_file(ast_dir / "model.safetensors")), pth)
    elastic = root / "elastic.pth"  # 24 time patches: a 3.84 s time table
    torch.save(make_elastic_state(dim=64, depth=1, num_classes=4, time_patches=24), elastic)
    sf.write(root / "five.wav", TONE, 16000)
    keep = root / "keep.csv"
    return {"root": root, "ast": str(ast_dir), "pth": str(pth), "elastic": str(elastic), "wav": str(root / "five.wav"),
            "keep": keep}


# -- usage errors: one line, exit 2, before the model loads and before -o is opened ----------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["--window", "0"], "--window must be positive"),
    (["--window", "-1"], "--window must be positive"),
    (["--window", "nan"], "--window must be a finite number"),
    (["--hop", "inf"], "--hop must be a finite number"),
    (["--batch-tokens", "0"], "--batch-tokens must be positive"),
    (["--workers", "0"], "--workers must be positive"),
    (["--top-k", "-1"], "--top-k must be at least 0"),
    (["-o", "missing_dir/x.csv"], "--output missing_dir/x.csv: no such directory missing_dir"),
    (["--device", "gpu"], "gpu"),
    (["--scores", "both"], "both"),
])
def test_usage_errors_come_before_the_model(args, message, files, capsys, monkeypatch):
    code, out, err = run_cli(["tag", "-m", str(files["root"] / "no-such-model.pth"), *args, files["wav"]], capsys,
                             monkeypatch)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert message in err and "no-such-model" not in err


@pytest.mark.parametrize(("model", "args", "message"), [
    ("ast", ["--window", "20"], "--window 20 is longer than this model's trained window: 3 s"),
    ("ast", ["--window", "0.001"], "--window 0.001 is shorter than one patch (0.16 s)"),
    ("ast", ["--hop", "0.001"], "--hop 0.001 is shorter than one feature frame (0.01 s)"),
    ("elastic", ["--window", "20"], "--window 20 is longer than this model's time table (the longest audio it "
                                    "scores): 3.84 s"),
])
def test_model_limits_are_usage_errors_that_leave_the_output_alone(model, args, message, files, capsys, monkeypatch):
    files["keep"].write_text("precious\n")
    code, out, err = run_cli(["tag", "-m", files[model], *args, "-o", str(files["keep"]), files["wav"]], capsys,
                             monkeypatch)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1, err
    assert files["keep"].read_text() == "precious\n"


def _ast_cli(files, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "astcli", "tag", "-m", files["ast"], "-f", "jsonl", *args],
                          input=stdin, capture_output=True, timeout=300)


def test_audio_piped_to_dash_is_one_line_and_exit_2(files):
    done = _ast_cli(files, "-", stdin=Path(files["wav"]).read_bytes())
    assert done.returncode == 2 and done.stdout == b""
    assert done.stderr.decode().strip().count("\n") == 0 and b"/dev/stdin" in done.stderr


def test_audio_piped_to_dev_stdin_is_tagged(files):
    piped = _ast_cli(files, "-k", "0", "/dev/stdin", stdin=Path(files["wav"]).read_bytes())
    direct = _ast_cli(files, "-k", "0", files["wav"])
    assert piped.returncode == 0, piped.stderr
    (record,), (reference,) = (map(json.loads, d.stdout.decode().splitlines()) for d in (piped, direct))
    assert record["file"] == "/dev/stdin" and record["tags"] == reference["tags"]


def test_a_bare_checkpoint_says_once_that_its_classes_are_numbered(files, capsys, monkeypatch):
    code, out, err = run_cli(["tag", "-m", files["elastic"], files["wav"], files["wav"], files["wav"]], capsys,
                             monkeypatch)
    assert code == 0 and len(out.splitlines()) == 3
    assert err.count("--labels") == 1 and "numbered 0..3" in err
    assert {t["label"] for t in json.loads(out.splitlines()[0])["tags"]} <= {"0", "1", "2", "3"}


# -- the Python API: predict follows the rules of tag -------------------------------------------------------------

@pytest.mark.parametrize(("waves", "rate", "message"), [
    ([torch.zeros(0)], 16000, "clip 0: too short: 0 samples"),
    ([torch.from_numpy(TONE), torch.randn(200) * 0.1], 16000, "clip 1: too short: 200 samples (12.5 ms)"),
    ([torch.tensor([0.5])], 44100, "clip 0: too short: 0 samples"),
    ([torch.from_numpy(TONE), torch.tensor([0.0, float("nan")] * 400)], 16000, "clip 1: audio contains NaN"),
    ([torch.full((800,), 1e19)], 16000, "clip 0: samples reach 1e+19"),
])
def test_predict_raises_what_tag_records(files, waves, rate, message):
    tagger = load_model(files["ast"])
    with pytest.raises(AudioError) as caught:
        tagger.predict(waves, sample_rate=rate)
    assert message in str(caught.value)


def test_clips_of_one_frame_still_depend_on_their_audio(files):
    tagger = load_model(files["ast"])
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(400, generator=gen) * 0.3 for _ in range(2))
    scores = tagger.predict([a, b])
    assert (scores[0] - scores[1]).abs().max() > 1e-4


# -- spans and score conventions -----------------------------------------------------------------------------------

def test_elastic_spans_end_where_the_scored_audio_ends(files):
    tagger = load_model(files["elastic"])
    (record,) = tag_files(tagger, [files["wav"]], TagOptions(timeline=True, top_k=0))
    # 5 s = 498 frames: windows of 384 and 114 frames; the model sees 112 of the last (whole patches)
    assert [(s["start"], s["end"]) for s in record["segments"]] == [(0.0, 3.84), (3.84, 4.975)]


def test_score_convention_is_chosen_stored_and_exported(files, tmp_path):
    softmax = load_model(files["pth"])
    sigmoid = load_model(files["pth"], scores="multi-label")
    assert not softmax.config.multi_label and sigmoid.config.multi_label
    wave = [torch.from_numpy(TONE[:32000])]
    logits = softmax.logits([softmax.clip(softmax.clip_features(wave)[0])])
    assert torch.allclose(sigmoid.predict(wave), logits.sigmoid(), atol=1e-6)
    assert torch.allclose(softmax.predict(wave), logits.softmax(-1), atol=1e-6)
    assert json.loads((sigmoid.save(tmp_path / "own") / "config.json").read_text())["multi_label"] is True
    assert load_model(tmp_path / "own").config.multi_label
    with pytest.raises(ParameterError) as caught:
        load_model(files["pth"], scores="sigmoid")
    assert caught.value.parameter == "scores"


def test_score_convention_travels_in_onnx_metadata(files, tmp_path):
    from astcli.export import export_model

    report = export_model(files["pth"], tmp_path / "multi.onnx", scores="multi-label")
    onnx = load_model(report.path)
    assert onnx.config.multi_label
    wave = [torch.from_numpy(TONE[:32000])]
    assert torch.allclose(onnx.predict(wave), load_model(files["pth"], scores="multi-label").predict(wave), atol=1e-4)
    assert not load_model(report.path, scores="single-label").config.multi_label


# -- properties of tag_files over mixes of good and broken inputs ------------------------------------------------

@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    cases = [c for c in build_corpus(tmp_path_factory.mktemp("mix")) if c.feed is None and "pipe" not in c.kind]
    good = [c for c in cases if c.good][:8]
    bad = [c for c in cases if not c.good][:10]
    return good + bad


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_tag_files_properties(files, mix, data):
    picks = data.draw(st.lists(st.sampled_from(mix), min_size=1, max_size=8))
    window = data.draw(st.none() | st.floats(0.2, 3.0))
    options = TagOptions(window_seconds=window, hop_seconds=data.draw(st.none() | st.floats(0.05, 3.0)), top_k=0,
                         timeline=True, workers=data.draw(st.integers(1, 3)),
                         batch_tokens=data.draw(st.integers(200, 3000)))
    tagger = load_model(files["ast"])
    records = list(tag_files(tagger, [c.arg for c in picks], options))
    assert [r["file"] for r in records] == [c.arg for c in picks]  # one record per input, in order
    longest = (window or 3.0) + 0.011  # a span never holds more audio than one window the model scored
    for case, record in zip(picks, records, strict=True):
        json.loads(to_json(record), parse_constant=lambda token: pytest.fail(f"non-strict JSON {token}"))
        assert (record["error"] is None) == case.good, (case.kind, record)
        for span in [{"start": 0.0, "end": record.get("duration", 0.0), "tags": record.get("tags", [])},
                     *record.get("segments", [])]:
            assert all(math.isfinite(t["score"]) and 0.0 <= t["score"] <= 1.0 for t in span["tags"])
        for segment in record.get("segments", []):
            assert 0.0 <= segment["start"] < segment["end"] <= record["duration"] + 1e-6
            assert segment["end"] - segment["start"] <= longest
    for case, record in zip(picks, records, strict=True):
        if case.good:
            (alone,) = tag_files(tagger, [case.arg], options)
            mixed = {t["index"]: t["score"] for t in record["tags"]}
            assert all(abs(mixed[t["index"]] - t["score"]) <= SAME for t in alone["tags"]), case.kind
