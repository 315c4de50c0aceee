"""`ast tag --events` end to end: events from the pipeline equal an independent computation from the timeline's
window scores; paths, waveforms, blocks and ONNX agree; formats, pictures and errors."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_tag import jsonl, run_cli

from astcli.errors import AudioError, ParameterError
from astcli.events import EventOptions
from astcli.model import AudioTransformer, elastic_config
from astcli.model.checkpoints import save_checkpoint
from astcli.pipeline import TagOptions, find_events, tag_files
from astcli.tagger import load_model

LABELS = ["hum", "hiss", "click", "tone"]


@pytest.fixture(scope="module")
def elastic_dir(tmp_path_factory):
    """A small random ElasticAST in astcli's own format (4 classes, sigmoid scores)."""
    torch.manual_seed(3)
    config = elastic_config("tiny", dim=64, depth=2, heads=2, mlp_dim=128, max_frames=512, num_classes=4,
                            labels=tuple(LABELS), multi_label=True)
    model = AudioTransformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return str(save_checkpoint(tmp_path_factory.mktemp("elastic") / "model", config, model.state_dict()))


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """12 s: noise, a loud tone from 3 s to 7.5 s, clicks from 9 s; at 16 kHz."""
    rng = np.random.default_rng(0)
    t = np.arange(12 * 16000) / 16000
    x = 0.02 * rng.standard_normal(t.size)
    x[3 * 16000 : int(7.5 * 16000)] += 0.5 * np.sin(2 * np.pi * 1000 * t[3 * 16000 : int(7.5 * 16000)])
    x[9 * 16000 :: 1600] = 0.9
    path = tmp_path_factory.mktemp("scene") / "scene.wav"
    sf.write(path, x.astype(np.float32), 16000)
    return str(path)


def oracle_events(segments: list[dict], hop: float, duration: float, on: float, off: float,
                  activity: str = "mean") -> list[tuple]:
    """Events from timeline windows, computed plainly: per cell of ``hop`` seconds the mean of the windows
    holding its centre (``"centre"``: the one whose centre is nearest; cells after the last covered one: the
    last window), then a cell-by-cell hysteresis per class, onsets and offsets where the line between two
    cell centres crosses the threshold (an event on at the end ends with the last cell)."""
    cells = int(np.ceil(duration / hop - 1e-9))
    scores = np.zeros((len(segments), len(LABELS)))
    for i, seg in enumerate(segments):
        for tag in seg["tags"]:
            scores[i, tag["index"]] = tag["score"]
    out = []
    for cls in range(len(LABELS)):
        active, begin, track = False, 0, []
        for k in range(cells):
            centre = (k + 0.5) * hop
            covering = [i for i, s in enumerate(segments) if s["start"] <= centre < s["end"] + 1e-9]
            if activity == "centre" and covering:
                covering = [min(covering, key=lambda i: abs((segments[i]["start"] + segments[i]["end"]) / 2
                                                            - centre))]
            track.append(np.mean(scores[covering, cls]) if covering else None)
        covered = [k for k, a in enumerate(track) if a is not None]
        track = [a if a is not None else (scores[-1, cls] if k > covered[-1] else 0.0) for k, a in enumerate(track)]

        def crossing(k: int, threshold: float, track: list[float] = track) -> float:
            return 0.0 if k == 0 else (k - 0.5 + (threshold - track[k - 1]) / (track[k] - track[k - 1])) * hop

        for k, a in enumerate(track):
            if not active and a >= on:
                active, begin, onset = True, k, crossing(k, on)
            elif active and a < off:
                active = False
                out.append((cls, onset, min(crossing(k, off), duration), max(track[begin:k])))
        if active:
            out.append((cls, onset, min(cells * hop, duration), max(track[begin:])))
    return sorted(out, key=lambda e: (e[1], e[0]))


def thresholds_for(segments: list[dict]) -> tuple[float, float]:
    """An onset between the scores' quartiles so that the random model yields some events."""
    values = np.array([t["score"] for s in segments for t in s["tags"]])
    return round(float(np.quantile(values, 0.75)), 4), round(float(np.quantile(values, 0.5)), 4)


@pytest.mark.parametrize("activity", ["mean", "centre"])
def test_events_match_an_independent_computation_from_window_scores(elastic_dir, scene, capsys, monkeypatch,
                                                                     activity):
    # the --events defaults for ElasticAST: 1 s windows every 1/3 s (33 frames of 10 ms)
    _, out, _ = run_cli(["tag", scene, "-m", elastic_dir, "--timeline", "-k", "0", "--window", "1", "--hop", "0.33",
                         "-f", "jsonl"], capsys, monkeypatch)
    timeline = jsonl(out)[0]
    on, off = thresholds_for(timeline["segments"])
    code, out, _ = run_cli(["tag", scene, "-m", elastic_dir, "--events", "--onset-threshold", str(on),
                            "--offset-threshold", str(off), "--activity", activity, "-f", "jsonl"], capsys,
                           monkeypatch)
    record = jsonl(out)[0]
    assert code == 0 and record["tags"] and record["events"]
    got = [(e["index"], e["start"], e["end"], e["score"]) for e in record["events"]]
    expected = oracle_events(timeline["segments"], 0.33, record["duration"], on, off, activity)
    # the timeline's scores are rounded to 6 decimals; interpolating between two of them can move a time by
    # more than that where the activity rises slowly
    assert [g[:3] for g in got] == [(c, pytest.approx(a, abs=1e-4), pytest.approx(b, abs=1e-4)) for c, a, b, _ in
                                    expected]
    assert [g[3] for g in got] == pytest.approx([e[3] for e in expected], abs=2e-6)
    assert all(e["label"] == LABELS[e["index"]] for e in record["events"])


def test_path_waveform_blocks_and_onnx_agree(elastic_dir, scene, tmp_path):
    from astcli.export import export_model

    tagger = load_model(elastic_dir, device="cpu")
    options = EventOptions(0.5, 0.4, min_duration=0.5, max_gap=0.25)
    by_path = find_events(tagger, scene, options=options)
    audio, rate = sf.read(scene, dtype="float32")
    assert find_events(tagger, torch.from_numpy(audio), options=options, sample_rate=rate) == by_path
    resampled = find_events(tagger, torch.from_numpy(audio[::2].copy()), options=options, sample_rate=8000)
    assert {e["label"] for e in resampled} <= set(LABELS)
    small_blocks = TagOptions(events=options, block_seconds=0.37)
    assert next(tag_files(tagger, [scene], small_blocks))["events"] == by_path
    onnx = export_model(elastic_dir, tmp_path / "m.onnx").path
    through_onnx = find_events(load_model(str(onnx)), scene, options=options)
    # the same events; onsets and offsets move with the scores (interpolated between cell centres)
    assert [e["index"] for e in through_onnx] == [e["index"] for e in by_path]
    for key in ("start", "end", "score"):
        assert [e[key] for e in through_onnx] == pytest.approx([e[key] for e in by_path], abs=1e-4)


@pytest.mark.parametrize("samples", [48000, 53920, 51203, 4000, 500])
@pytest.mark.parametrize("activity", ["mean", "centre"])
def test_events_end_with_the_audio_whatever_its_length(elastic_dir, samples, activity):
    """3 s; 3.37 s and 3.2 s (the audio ends less than half a cell into the last cell, so no window covers its
    centre); 0.25 s and 31 ms (less than one hop, or half of one). With thresholds under every score each
    class is one event from 0 to the end of the audio, as the record shows it."""
    tagger = load_model(elastic_dir, device="cpu")
    audio = torch.from_numpy(np.random.default_rng(samples).normal(0, 0.1, samples).astype(np.float32))
    options = EventOptions(1e-6, 1e-6, activity=activity)
    spans = {(e["start"], e["end"]) for e in find_events(tagger, audio, options=options)}
    assert spans == {(0.0, round(samples / 16000, 3))}


def test_a_waveform_the_model_cannot_score_raises_as_a_file_does(elastic_dir, tmp_path):
    tagger = load_model(elastic_dir, device="cpu")
    audio = np.random.default_rng(0).normal(0, 0.1, 32000).astype(np.float32)
    audio[100:110] = np.nan
    with pytest.raises(AudioError, match="non-finite"):
        find_events(tagger, torch.from_numpy(audio))
    with pytest.raises(ParameterError, match="sample_rate"):
        find_events(tagger, torch.from_numpy(audio), sample_rate=0)


def test_a_given_window_keeps_three_windows_per_moment(elastic_dir, scene, capsys, monkeypatch):
    # ElasticAST's event windows are 1 s every 1/3 s; a 0.6 s window is scored every 0.2 s
    code, out, _ = run_cli(["tag", scene, "-m", elastic_dir, "--events", "--timeline", "--window", "0.6",
                            "-f", "jsonl"], capsys, monkeypatch)
    starts = [s["start"] for s in jsonl(out)[0]["segments"]]
    assert code == 0 and starts[:4] == [0.0, 0.2, 0.4, 0.6]


def test_an_event_spanning_blocks_of_a_long_file_is_one_event(elastic_dir, tmp_path):
    """Three minutes in 1-s blocks; with the onset under every score, each class is one event over the file."""
    path = tmp_path / "long.wav"
    rng = np.random.default_rng(1)
    with sf.SoundFile(path, "w", 16000, 1, "PCM_16") as f:
        for _ in range(3):
            f.write((0.05 * rng.standard_normal(16000 * 60)).astype(np.float32))
    tagger = load_model(elastic_dir, device="cpu")
    record = next(tag_files(tagger, [str(path)], TagOptions(events=EventOptions(1e-6, 0.0), block_seconds=1.0)))
    assert [(e["index"], e["start"], e["end"]) for e in record["events"]] == [(i, 0.0, 180.0) for i in range(4)]


def test_memory_does_not_grow_with_the_file(elastic_dir, tmp_path):
    """Events over an hour peak at about the memory of ten seconds (separate processes, VmHWM; 4 s windows
    every 2 s keep the test quick)."""
    rng = np.random.default_rng(2)
    long_file, short_file = tmp_path / "hour.wav", tmp_path / "ten.wav"
    with sf.SoundFile(long_file, "w", 16000, 1, "PCM_16") as f:
        for _ in range(60):
            f.write((0.05 * rng.standard_normal(16000 * 60)).astype(np.float32))
    sf.write(short_file, (0.05 * rng.standard_normal(16000 * 10)).astype(np.float32), 16000)
    probe = ("import sys, json; from astcli.pipeline import TagOptions, tag_files;"
             "from astcli.events import EventOptions; from astcli.tagger import load_model;"
             "o = TagOptions(window_seconds=4, hop_seconds=2, events=EventOptions(0.5));"
             "r = next(tag_files(load_model(sys.argv[1]), [sys.argv[2]], o));"
             "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0];"
             "print(json.dumps([r['duration'], hwm]))")
    peaks = {}
    for name, path in (("hour", long_file), ("ten", short_file)):
        done = subprocess.run([sys.executable, "-c", probe, elastic_dir, str(path)], capture_output=True, text=True,
                              check=True, timeout=600)
        duration, peaks[name] = json.loads(done.stdout)
    assert duration == pytest.approx(10.0)
    assert peaks["hour"] <= 1.3 * peaks["ten"], peaks


def test_event_formats_through_the_cli(elastic_dir, scene, tmp_path, capsys, monkeypatch):
    base = ["tag", "-m", elastic_dir, "--onset-threshold", "0.5", "--offset-threshold", "0.4"]
    args = [*base, scene]
    _, out, _ = run_cli([*args, "--events", "-f", "jsonl"], capsys, monkeypatch)
    events = jsonl(out)[0]["events"]
    assert events
    code, out, _ = run_cli([*args, "-f", "audacity"], capsys, monkeypatch)
    assert code == 0 and [line.split("\t") for line in out.splitlines()] == [
        [f"{e['start']:.6f}", f"{e['end']:.6f}", e["label"]] for e in events]
    code, out, _ = run_cli([*args, "--events", "-f", "csv"], capsys, monkeypatch)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["label"], float(r["start"]), float(r["end"])) for r in rows if r["scope"] == "event"] == [
        (e["label"], round(e["start"], 3), round(e["end"], 3)) for e in events]
    assert {r["scope"] for r in rows} == {"file", "event"}
    second = tmp_path / "again.wav"
    second.write_bytes(Path(scene).read_bytes())
    code, _, _ = run_cli([*base, "-f", "vtt", "-o", str(tmp_path / "tracks"), scene, str(second)], capsys,
                         monkeypatch)
    assert code == 0 and sorted(p.name for p in (tmp_path / "tracks").iterdir()) == ["again.vtt", "scene.vtt"]
    assert (tmp_path / "tracks" / "scene.vtt").read_text(encoding="utf-8").startswith("WEBVTT\n\n1\n")
    code, out, _ = run_cli([*args, "-o", str(tmp_path / "one.srt")], capsys, monkeypatch)
    assert code == 0 and (tmp_path / "one.srt").read_text(encoding="utf-8").startswith("1\n00:00:")


def test_plots_one_picture_per_file(elastic_dir, scene, tmp_path, capsys, monkeypatch):
    import matplotlib.image

    code, out, _ = run_cli(["tag", scene, scene, "-m", elastic_dir, "--plot", str(tmp_path / "pics"), "-f", "jsonl"],
                           capsys, monkeypatch)
    assert code == 0 and all("events" in r for r in jsonl(out))
    pictures = sorted((tmp_path / "pics").iterdir())
    assert [p.name for p in pictures] == ["scene-2.png", "scene.png"]
    assert matplotlib.image.imread(pictures[0]).shape[1] == 1200


@pytest.mark.parametrize(("extra", "message"), [
    (["--events", "--onset-threshold", "1.5"], "--onset-threshold must lie in (0, 1]"),
    (["--events", "--offset-threshold", "0.9"], "--offset-threshold must lie in [0, onset_threshold]"),
    (["--events", "--min-duration", "-1"], "--min-duration must be a number of seconds >= 0"),
    (["--events", "--class-thresholds", "missing.csv"], "--class-thresholds cannot read missing.csv"),
    (["--events", "--hop", "2"], "--hop 2 is longer than the window (1 s)"),  # cells no window covers
    (["--events", "--activity", "median"], "'median' is not one of 'mean', 'centre'"),
    (["-f", "srt", "SECOND"], "--format srt writes one track per input: give -o FOLDER for 2 inputs"),
])
def test_event_usage_errors_exit_2_before_any_output(extra, message, elastic_dir, scene, tmp_path, capsys,
                                                     monkeypatch):
    out_file = tmp_path / "keep.jsonl"
    out_file.write_text("old\n", encoding="utf-8")
    extra = [scene if a == "SECOND" else a for a in extra]
    code, out, err = run_cli(["tag", scene, "-m", elastic_dir, *extra, *(["-o", str(out_file)] if "-f" not in extra
                                                                         else [])], capsys, monkeypatch)
    assert code == 2 and out == "" and message in err and "Traceback" not in err
    assert out_file.read_text(encoding="utf-8") == "old\n"


@pytest.mark.parametrize("target", ["file", "under-file"])
def test_track_folder_checked_before_the_model_loads(target, scene, tmp_path, capsys, monkeypatch):
    """-o for one track per input must be a folder that can be made; a bad one is refused before the model
    loads (the model here does not exist, so a later check would report the model instead)."""
    blocker = tmp_path / "taken.txt"
    blocker.write_text("keep\n", encoding="utf-8")
    output = blocker if target == "file" else blocker / "tracks"
    code, out, err = run_cli(["tag", scene, scene, "-m", str(tmp_path / "no-model"), "-f", "vtt", "-o", str(output)],
                             capsys, monkeypatch)
    assert code == 2 and out == "" and "is a file, not a folder" in err and "no-model" not in err
    assert blocker.read_text(encoding="utf-8") == "keep\n"
