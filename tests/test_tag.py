"""`ast tag` end to end: parity with transformers, formats, order, inputs, timeline, ensembles, errors."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import hf_to_original_ast, make_hf_ast, save_hf_ast, write_labels_csv
from safetensors.torch import load_file

from astcli.cli import main
from astcli.pipeline import TagOptions, _Windows, expand_inputs, tag_files
from astcli.tagger import load_model

MAX_FRAMES = 300  # the tiny AST's trained window: 3 s


def run_cli(args: list[str], capsys, monkeypatch, stdin: str | None = None) -> tuple[int, str, str]:
    """Run `ast ARGS` in-process through the real entry point; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["ast", *args])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


MULTI = {"problem_type": "multi_label_classification"}  # sigmoid scores, like the AudioSet taggers


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_ast(max_length=MAX_FRAMES, num_labels=6, **MULTI)


@pytest.fixture(scope="module")
def model_dir(hf_model, tmp_path_factory):
    return str(save_hf_ast(hf_model, tmp_path_factory.mktemp("model") / "ast"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Audio files of several lengths, rates and formats (shorter, equal to and longer than a window)."""
    from conftest import make_signal

    folder = tmp_path_factory.mktemp("clips")
    files = []
    for i, (kind, seconds, rate, ext) in enumerate([("tones", 1.2, 16000, "wav"), ("chirp", 3.0, 44100, "flac"),
                                                     ("bursts", 7.5, 16000, "wav"), ("tones", 0.3, 8000, "ogg")]):
        path = folder / f"{i}_{kind}.{ext}"
        sf.write(path, make_signal(kind, seconds, rate, seed=i), rate)
        files.append(str(path))
    return files


def reference_scores(hf_model, path: str) -> list[np.ndarray]:
    """transformers' own pipeline pieces: ASTFeatureExtractor (numpy fbank) + ASTForAudioClassification,
    window by window (3 s windows, the last zero-padded), sigmoid of the logits."""
    from transformers import ASTFeatureExtractor

    from astcli.audio import load_audio

    extractor = ASTFeatureExtractor(max_length=MAX_FRAMES, do_normalize=True)
    wave = load_audio(path).numpy()
    step = MAX_FRAMES * 160
    out = []
    for start in range(0, max(len(wave), 1), step):
        features = extractor(wave[start : start + step], sampling_rate=16000, return_tensors="pt").input_values
        with torch.inference_mode():
            out.append(hf_model(input_values=features).logits.sigmoid()[0].numpy())
    return out


def test_scores_match_transformers_alone_and_together(hf_model, model_dir, clips, capsys, monkeypatch):
    code, out, err = run_cli(["tag", "-m", model_dir, "--top-k", "0", "-f", "jsonl", "--timeline", *clips],
                             capsys, monkeypatch)
    assert code == 0, err
    together = jsonl(out)
    assert [r["file"] for r in together] == clips
    for record in together:
        reference = reference_scores(hf_model, record["file"])
        assert len(record["segments"]) == len(reference)
        for segment, ref in zip(record["segments"], reference, strict=True):
            ours = np.zeros(6)
            for tag in segment["tags"]:
                ours[tag["index"]] = tag["score"]
            assert np.abs(ours - ref).max() <= 1e-4
        alone = jsonl(run_cli(["tag", "-m", model_dir, "-k", "0", "-f", "jsonl", "--timeline", record["file"]],
                              capsys, monkeypatch)[1])[0]
        assert alone == record


def test_original_ast_pth_gives_the_same_records(clips, tmp_path, capsys, monkeypatch):
    # A bare .pth carries no config: heads = dim / 64 (1 here), LayerNorm eps 1e-6 as the released ones, and
    # softmax scores unless the head has AudioSet's 527 classes; the transformers twin says the same.
    # Its window is inferred from the position table; released models use 1024, 512 (ESC-50) or 128 frames.
    hf1 = make_hf_ast(max_length=512, num_labels=6, num_attention_heads=1, layer_norm_eps=1e-6)
    twin = save_hf_ast(hf1, tmp_path / "twin")
    pth = tmp_path / "ast1.pth"
    torch.save(hf_to_original_ast(load_file(twin / "model.safetensors")), pth)
    labels = write_labels_csv(tmp_path / "labels.csv", 6)
    _, from_hf, _ = run_cli(["tag", "-m", str(twin), "-k", "0", *clips], capsys, monkeypatch)
    code, from_pth, err = run_cli(["tag", "-m", str(pth), "--labels", str(tmp_path / "labels.csv"), "-k", "0",
                                   *clips], capsys, monkeypatch)
    assert code == 0, err
    for a, b in zip(jsonl(from_hf), jsonl(from_pth), strict=True):
        scores_a = {t["index"]: t["score"] for t in a["tags"]}
        scores_b = {t["index"]: t["score"] for t in b["tags"]}
        assert max(abs(scores_a[i] - scores_b[i]) for i in range(6)) <= 1e-5
        assert {t["label"] for t in b["tags"]} == set(labels)
    assert load_model(pth).config.max_frames == 512


@pytest.mark.parametrize("fmt", ["json", "csv", "tsv", "jsonl"])
def test_formats_parse(fmt, model_dir, clips, capsys, monkeypatch):
    code, out, _ = run_cli(["tag", "-m", model_dir, "-f", fmt, "-k", "2", "--timeline", *clips[:2], "missing.wav"],
                           capsys, monkeypatch)
    assert code == 1
    if fmt == "json":
        records = json.loads(out)
        assert [r["file"] for r in records] == [*clips[:2], "missing.wav"]
    elif fmt == "jsonl":
        assert len(jsonl(out)) == 3
    else:
        rows = list(csv.DictReader(io.StringIO(out), delimiter="," if fmt == "csv" else "\t"))
        assert set(rows[0]) == {"file", "scope", "start", "end", "label", "score", "error", "warning"}
        assert {r["file"] for r in rows} == {*clips[:2], "missing.wav"}
        assert [r["error"] for r in rows if r["file"] == "missing.wav"] == ["no such file"]
        first = [r for r in rows if r["file"] == clips[0]]
        assert float(first[0]["end"]) == pytest.approx(1.2)
        assert all(0.0 <= float(r["score"]) <= 1.0 for r in first)


def test_output_file_and_format_from_extension(model_dir, clips, tmp_path, capsys, monkeypatch):
    target = tmp_path / "tags.csv"
    code, out, _ = run_cli(["tag", "-m", model_dir, "-o", str(target), clips[0]], capsys, monkeypatch)
    assert code == 0 and out == ""
    assert target.read_text().startswith("file,scope,start,end,label,score,error,warning\n")


def test_input_order_with_workers_stdin_and_directories(model_dir, clips, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "dir"
    (folder / "sub").mkdir(parents=True)
    data, rate = sf.read(clips[0])
    for name in ("b.wav", "a.wav", "sub/c.wav"):
        sf.write(folder / name, data, rate)
    (folder / "notes.txt").write_text("not audio")
    order = [clips[2], clips[0], clips[3], clips[1]] * 3
    code, out, _ = run_cli(["tag", "-m", model_dir, "--workers", "3", "--batch-tokens", "500", *order],
                           capsys, monkeypatch)
    assert code == 0 and [r["file"] for r in jsonl(out)] == order
    listing = f"{clips[3]}\n\n{clips[0]}\n"
    _, out, _ = run_cli(["tag", "-m", model_dir, "-", clips[1]], capsys, monkeypatch, stdin=listing)
    assert [r["file"] for r in jsonl(out)] == [clips[3], clips[0], clips[1]]
    assert expand_inputs([str(folder)]) == [str(folder / "a.wav"), str(folder / "b.wav")]
    assert expand_inputs([str(folder)], recursive=True) == [str(folder / n) for n in ("a.wav", "b.wav", "sub/c.wav")]


def test_timeline_windows_cover_the_file(model_dir, clips, capsys, monkeypatch):
    code, out, _ = run_cli(["tag", "-m", model_dir, "--timeline", "--hop", "2", clips[2]], capsys, monkeypatch)
    record = jsonl(out)[0]
    segments = record["segments"]
    assert code == 0 and record["duration"] == pytest.approx(7.5)
    assert [s["start"] for s in segments] == [0.0, 2.0, 4.0, 6.0]
    assert segments[-1]["end"] == pytest.approx(7.5)
    assert all(b["start"] <= a["end"] for a, b in itertools.pairwise(segments))


@pytest.mark.parametrize(("size", "hop", "total", "starts"), [
    (100, 100, 250, [(0, 100), (100, 100), (200, 50)]),
    (100, 100, 200, [(0, 100), (100, 100)]),
    (100, 50, 180, [(0, 100), (50, 100), (100, 80)]),
    (100, 200, 250, [(0, 100), (200, 50)]),
    (100, 200, 150, [(0, 100)]),
    (100, 100, 40, [(0, 40)]),
    (100, 100, 0, [(0, 0)]),
])
def test_windows_cut_every_frame_once(size, hop, total, starts):
    frames = torch.arange(total, dtype=torch.float32).unsqueeze(1)
    windows = _Windows(size, hop, 1)
    got = []
    for chunk in frames.split(37):
        got.extend(windows.push(chunk))
    got.extend(windows.finish(total))
    assert [(s, len(w)) for s, w in got] == starts
    for s, w in got:
        assert torch.equal(w[:, 0], torch.arange(s, s + len(w), dtype=torch.float32))


def test_ensemble_averages_probabilities(model_dir, clips, tmp_path, capsys, monkeypatch):
    other = str(save_hf_ast(make_hf_ast(max_length=MAX_FRAMES, num_labels=6, seed=7, **MULTI), tmp_path / "other"))
    runs = [jsonl(run_cli(["tag", *m, "-k", "0", *clips[:2]], capsys, monkeypatch)[1])
            for m in (["-m", model_dir], ["-m", other], ["-m", model_dir, "-m", other])]
    for a, b, both in zip(*runs, strict=True):
        sa, sb = ({t["index"]: t["score"] for t in r["tags"]} for r in (a, b))
        for tag in both["tags"]:
            assert tag["score"] == pytest.approx((sa[tag["index"]] + sb[tag["index"]]) / 2, abs=2e-6)


def test_top_k_threshold_and_aggregate(model_dir, clips):
    tagger = load_model(model_dir)

    def tag_one(**options) -> dict:
        (record,) = tag_files(tagger, clips[2:3], TagOptions(**options))
        return record

    base = tag_one(top_k=0, timeline=True)
    windows = np.array([[t["score"] for t in sorted(s["tags"], key=lambda t: t["index"])] for s in base["segments"]])
    top = tag_one(top_k=3)["tags"]
    assert [t["index"] for t in top] == list(np.argsort(-windows.max(0))[:3])
    mean = tag_one(top_k=0, aggregate="mean")["tags"]
    assert {t["index"]: t["score"] for t in mean} == pytest.approx(dict(enumerate(windows.mean(0))), abs=2e-6)
    cut = float(np.sort(windows.max(0))[-2]) - 5e-6  # records round scores to 6 decimals
    kept = tag_one(top_k=0, threshold=cut)["tags"]
    assert len(kept) == 2 and all(t["score"] >= cut for t in kept)


def test_bad_inputs_give_one_record_each_and_exit_1(model_dir, clips, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.wav").write_bytes(os.urandom(2000))
    (tmp_path / "notes.txt").write_text("hello")
    sf.write(tmp_path / "header_only.wav", np.zeros(0, dtype=np.float32), 16000)
    (tmp_path / "emptydir").mkdir()
    bad = [str(tmp_path / n) for n in ("empty.wav", "junk.wav", "notes.txt", "header_only.wav", "emptydir")]
    inputs = [clips[0], *bad, "nope/missing.flac", clips[1]]
    code, out, err = run_cli(["tag", "-m", model_dir, *inputs], capsys, monkeypatch)
    records = jsonl(out)
    assert code == 1
    assert [r["file"] for r in records] == inputs
    assert records[0]["error"] is None and records[-1]["error"] is None
    for record in records[1:-1]:
        assert set(record) == {"file", "error"} and record["error"] and "\n" not in record["error"]
    assert len(err.strip().splitlines()) == len(inputs) - 2
    assert "Traceback" not in err


@pytest.mark.parametrize(("args", "message"), [
    (["-m", "no/such-model-here"], "no/such-model-here"),
    (["-m", "not-a-preset"], "not-a-preset"),
    (["--format", "xml"], "--format"),
    (["--top-k", "-1"], "--top-k"),
    (["--aggregate", "median"], "--aggregate"),
    (["--window", "60"], "--window"),
    (["--hop-ms", "20"], "hop"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--dtype", "int3"], "cuda"),
])
def test_usage_and_model_errors_exit_2(args, message, model_dir, clips, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    full = ["tag", *(["-m", model_dir] if "-m" not in args else []), *args, clips[0]]
    code, out, err = run_cli(full, capsys, monkeypatch)
    assert code == 2 and out == ""
    assert err.startswith("ast: error:") and message.split()[0].lower() in err.lower()
    assert len(err.strip().splitlines()) == 1


def test_list_models_shows_presets(capsys, monkeypatch):
    code, out, _ = run_cli(["tag", "--list-models"], capsys, monkeypatch)
    assert code == 0
    assert "ast-audioset " in out and "audioset-ensemble-m" in out and "ast-speechcommands" in out


def test_broken_pipe_ends_quietly(model_dir, clips):
    process = subprocess.Popen([sys.executable, "-m", "astcli", "tag", "-m", model_dir, "-f", "jsonl", *clips * 3],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = process.stdout.readline()
    process.stdout.close()
    _, err = process.communicate(timeout=120)
    assert json.loads(first)["file"] == clips[0]
    assert err == b"" and process.returncode == 141


def test_hour_long_file_in_bounded_memory(model_dir, tmp_path):
    """An hour of audio is streamed: peak memory stays close to that of a 10-second file."""
    long_file, short_file = tmp_path / "hour.wav", tmp_path / "ten.wav"
    rng = np.random.default_rng(0)
    with sf.SoundFile(long_file, "w", 16000, 1, "PCM_16") as f:
        for _ in range(60):
            f.write((0.1 * rng.standard_normal(16000 * 60)).astype(np.float32))
    sf.write(short_file, (0.1 * rng.standard_normal(16000 * 10)).astype(np.float32), 16000)
    probe = (
        "import sys, json, astcli; astcli.keep_freed_memory();"
        "from astcli.pipeline import tag_files; from astcli.tagger import load_model;"
        "r = list(tag_files(load_model(sys.argv[1]), [sys.argv[2]]));"
        # VmHWM: this process's own peak (ru_maxrss would carry over the parent's after fork + exec)
        "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0];"
        "print(json.dumps([r[0]['duration'], hwm]))"
    )
    peaks = {}
    for name, path in (("hour", long_file), ("ten", short_file)):
        done = subprocess.run([sys.executable, "-c", probe, model_dir, str(path)], capture_output=True, text=True,
                              check=True, timeout=300)
        duration, peaks[name] = json.loads(done.stdout)
        assert duration == pytest.approx(3600.0 if name == "hour" else 10.0)
    assert Path(long_file).stat().st_size > 100e6
    assert peaks["hour"] <= 1.3 * peaks["ten"], peaks


def test_table_format_for_people(model_dir, clips, capsys, monkeypatch):
    code, out, _ = run_cli(["tag", "-m", model_dir, "-f", "table", "-k", "2", clips[0], "missing.wav", clips[1]],
                           capsys, monkeypatch)
    lines = out.splitlines()
    assert code == 1 and lines[0].split() == ["file", "seconds", "label", "score"]
    assert lines[1].startswith(clips[0]) and "1.20" in lines[1]
    assert "missing.wav" in out and "error: no such file" in out
    # every score column ends at the same place, whichever file the row belongs to
    score_rows = [line.rstrip() for line in lines[1:] if line.rstrip()[-5:].replace(".", "").isdigit()]
    assert len(score_rows) == 4 and len({len(row) for row in score_rows}) == 1
