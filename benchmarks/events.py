"""Sound event detection quality and speed of `ast tag --events`, against the plain fixed-window timeline.

    python benchmarks/events.py [--work DIR] [--per-class 400] [--files 20] [--speed-minutes 60]

1. A labelled event set built here: 8 classes (5 synthetic: beep, chirp, knock, siren, buzz; 3 espeak-ng
   words: "stop", "seven", "hello") plus background. Training clips are 1 s of coloured noise (the default
   `--events` window), labelled by the event at the clip's centre; background clips hold noise, or an event
   that ends before the centre or starts after it; the words are 60 takes each (8 voices, random speed and
   pitch), the test scenes use 12 others. A tiny ElasticAST (12 blocks) is trained on them from
   scratch with the default recipe and sigmoid outputs: `ast train --arch elastic --size tiny --init none
   --loss bce`. Test files are 60 s of noise whose level drifts, with events (0.4-3 s, words at their spoken
   length) mixed in at known onsets, 5-20 dB above the background.
2. Detection is scored with sed_eval: event-based F1 (200 ms onset collar, offsets not evaluated) and
   segment-based F1 on 1 s segments, both micro-averaged over classes, for `--events --activity centre`
   (the rule that matches how the model was taught), with the default `--activity mean`, and for events
   read off the fixed-window timeline (`--timeline`: every window whose score passes 0.5 is an event over
   that window, touching windows merged), at 1 s windows and at the model's longest window.
3. Speed: `ast tag --events --activity centre` with the trained model on one file of ``--speed-minutes``
   (2 torch threads), as x real time, wall time of the whole command (start-up included).

Training and tagging run through the CLI in subprocesses; the script prints the load average beside the
numbers, so a run on a busy machine can be told from a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 16000
SYNTHETIC = ("beep", "chirp", "knock", "siren", "buzz")
WORDS = ("stop", "seven", "hello")
CLASSES = SYNTHETIC + WORDS
EVENTS = ("--events", "--activity", "centre")  # the activity rule for a model taught by the clip's centre
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us+f3", "en-gb+f2", "en-us+m4")


def noise(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Coloured noise (white through a random one-pole low-pass) whose level drifts slowly (x0.5-1.5)."""
    from scipy.signal import lfilter

    n = int(seconds * RATE)
    pole = rng.uniform(0.0, 0.95)
    coloured = lfilter([1.0], [1.0, -pole], rng.standard_normal(n))
    knots = max(2, int(seconds / 5) + 2)
    drift = np.interp(np.arange(n), np.linspace(0, n, knots), rng.uniform(0.5, 1.5, knots))
    return 0.02 * coloured / coloured.std() * drift


def synthetic(rng: np.random.Generator, kind: str, seconds: float) -> np.ndarray:
    """One synthetic event of ``seconds`` with 10 ms fades, peak amplitude 1."""
    t = np.arange(int(seconds * RATE)) / RATE
    if kind == "beep":
        x = np.sin(2 * np.pi * rng.uniform(800, 1200) * t)
    elif kind == "chirp":
        f0, f1 = rng.uniform(400, 700), rng.uniform(2500, 3500)
        x = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * seconds)))
    elif kind == "knock":
        x = np.zeros_like(t)
        period = int(RATE / rng.uniform(5, 9))
        decay = np.exp(-np.arange(period) / (0.004 * RATE)) * rng.standard_normal(period)
        for start in range(0, len(t), period):
            x[start : start + period] += decay[: len(t) - start]
    elif kind == "siren":
        rate, carrier = rng.uniform(1.5, 3.0), rng.uniform(600, 900)
        x = np.sin(2 * np.pi * carrier * t + (250 / rate) * np.sin(2 * np.pi * rate * t))
    else:  # buzz: a sawtooth at 100-200 Hz
        f = rng.uniform(100, 200)
        x = 2 * ((f * t) % 1.0) - 1
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.01)
    return x * fade / (np.abs(x).max() + 1e-12)


def spoken(word: str, voice: str, speed: int, pitch: int, scratch: Path) -> np.ndarray:
    """``word`` from espeak-ng at 16 kHz, silence trimmed, peak amplitude 1."""
    import soxr

    path = scratch / "word.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), word],
                   check=True, capture_output=True)
    x, rate = sf.read(path, dtype="float64")
    x = soxr.resample(x, rate, RATE)
    loud = np.flatnonzero(np.abs(x) > 0.02 * np.abs(x).max())
    x = x[loud[0] : loud[-1] + 1]
    return x / (np.abs(x).max() + 1e-12)


def event(rng: np.random.Generator, kind: str, words: dict[str, list[np.ndarray]], seconds: float) -> np.ndarray:
    if kind in WORDS:
        bank = words[kind]
        return bank[rng.integers(len(bank))]
    return synthetic(rng, kind, seconds)


def mix(background: np.ndarray, sound: np.ndarray, at: int, rng: np.random.Generator) -> None:
    """Add ``sound`` at sample ``at``, 5-20 dB above the background's RMS there."""
    part = background[at : at + len(sound)]
    snr = rng.uniform(5, 20)
    rms = np.sqrt(np.mean(part**2)) + 1e-9
    gain = rms * 10 ** (snr / 20) / (np.sqrt(np.mean(sound[: len(part)] ** 2)) + 1e-9)
    part += gain * sound[: len(part)]


def word_bank(rng: np.random.Generator, scratch: Path, count: int) -> dict[str, list[np.ndarray]]:
    """``count`` takes of every word (voices in turn, random speed and pitch); the scratch file is removed."""
    bank = {w: [spoken(w, VOICES[i % len(VOICES)], int(rng.integers(120, 200)), int(rng.integers(25, 75)),
                       scratch) for i in range(count)] for w in WORDS}
    (scratch / "word.wav").unlink(missing_ok=True)
    return bank


def training_set(folder: Path, per_class: int, seed: int = 0) -> Path:
    """Class folders of 1-s clips (the default `--events` window) of noise, labelled by the event at the clip's
    centre: a clip of a class has an event of that class covering its centre (however little else of the
    clip it covers), which makes the mean of overlapping windows cross 0.5 where an event starts
    (docs/events.md). ``background`` (twice as many clips) holds noise only (a quarter) or noise with an event
    that ends before the centre or starts after it (up to 0.48 s of it inside the clip)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    words = word_bank(rng, folder, 60)
    for kind in (*CLASSES, "background"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class * (2 if kind == "background" else 1)):
            if kind == "background" and i % 4 == 0:
                clip = noise(rng, 1.0)
            else:
                sound = event(rng, kind if kind != "background" else CLASSES[i % len(CLASSES)], words,
                              rng.uniform(0.3, 2.0))
                length = len(sound) / RATE
                canvas = noise(rng, 2.0 + length)  # the event lies at [1 s, 1 s + length]
                mix(canvas, sound, RATE, rng)
                if kind == "background":  # the event starts after the centre, or ends before it
                    at = rng.uniform(0.52, 0.98) if i % 2 == 1 else rng.uniform(0.02, 0.48) - length
                else:  # the event covers the centre: onset at `at` seconds into the clip
                    at = rng.uniform(0.5 - length, 0.5)
                first = round((1.0 - at) * RATE)
                clip = canvas[first : first + RATE]
            peak = max(1.0, float(np.abs(clip).max()))
            sf.write(folder / kind / f"{kind}{i:04d}.wav", (clip / peak).astype(np.float32), RATE)
    return folder


def test_set(folder: Path, files: int, seconds: float = 60.0, seed: int = 1) -> list[dict]:
    """``files`` noise recordings of ``seconds`` with events at known onsets (one at a time, 1-4 s apart);
    returns the reference events ``{"file", "label", "onset", "offset"}``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    words = word_bank(rng, folder, 12)
    reference = []
    for i in range(files):
        path = folder / f"scene{i:02d}.wav"
        audio = noise(rng, seconds)
        at = rng.uniform(0.5, 3.0)
        while True:
            kind = CLASSES[rng.integers(len(CLASSES))]
            sound = event(rng, kind, words, rng.uniform(0.4, 3.0))
            if at + len(sound) / RATE > seconds - 0.5:
                break
            mix(audio, sound, int(at * RATE), rng)
            reference.append({"file": str(path), "label": kind, "onset": round(at, 4),
                              "offset": round(at + len(sound) / RATE, 4)})
            at += len(sound) / RATE + rng.uniform(1.0, 4.0)
        sf.write(path, (audio / max(1.0, np.abs(audio).max())).astype(np.float32), RATE)
    return reference


def tag(model: Path, paths: list[str], *options: str) -> list[dict]:
    """Records of `ast tag` (JSON lines) over ``paths`` with ``options``, with 2 threads."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-m", "astcli", "tag", *paths, "-m", str(model),
                          "-f", "jsonl", *options], check=True, capture_output=True, text=True, env=env).stdout
    return [json.loads(line) for line in out.splitlines()]


def event_rows(records: list[dict]) -> list[dict]:
    """Estimated events of `--events` records, background class left out."""
    return [{"file": r["file"], "label": e["label"], "onset": e["start"], "offset": e["end"]}
            for r in records for e in r["events"] if e["label"] in CLASSES]


def timeline_rows(records: list[dict], threshold: float = 0.5) -> list[dict]:
    """Events read off `--timeline` records: a window whose score for a class passes ``threshold`` is an event
    over the window; touching windows of a class merge."""
    rows = []
    for record in records:
        open_: dict[str, dict] = {}
        for segment in record["segments"]:
            for tag_ in segment["tags"]:
                if tag_["label"] not in CLASSES or tag_["score"] < threshold:
                    continue
                last = open_.get(tag_["label"])
                if last is not None and last["offset"] >= segment["start"] - 1e-6:
                    last["offset"] = segment["end"]
                else:
                    last = {"file": record["file"], "label": tag_["label"], "onset": segment["start"],
                            "offset": segment["end"]}
                    open_[tag_["label"]] = last
                    rows.append(last)
    return rows


def score(reference: list[dict], estimated: list[dict], files: list[str]) -> dict[str, float]:
    """sed_eval micro-averaged F1: event-based (200 ms onset collar, offsets ignored), segment-based (1 s)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import dcase_util
        import sed_eval

    def container(rows: list[dict], file: str):
        return dcase_util.containers.MetaDataContainer(
            [{"filename": file, "event_label": r["label"], "onset": r["onset"], "offset": r["offset"]}
             for r in rows if r["file"] == file])

    events = sed_eval.sound_event.EventBasedMetrics(event_label_list=list(CLASSES), t_collar=0.2,
                                                    evaluate_onset=True, evaluate_offset=False)
    segments = sed_eval.sound_event.SegmentBasedMetrics(event_label_list=list(CLASSES), time_resolution=1.0)
    for file in files:
        ref, est = container(reference, file), container(estimated, file)
        events.evaluate(reference_event_list=ref, estimated_event_list=est)
        segments.evaluate(reference_event_list=ref, estimated_event_list=est)
    return {"event_f1": events.results_overall_metrics()["f_measure"]["f_measure"],
            "segment_f1": segments.results_overall_metrics()["f_measure"]["f_measure"]}


def speed(model: Path, folder: Path, minutes: float) -> dict[str, float]:
    """x real time of `ast tag --events` on one file of ``minutes`` of noise with events (2 threads)."""
    rng = np.random.default_rng(5)
    path = folder / "long.wav"
    with sf.SoundFile(path, "w", RATE, 1, "PCM_16") as f:
        for _ in range(int(minutes)):
            f.write((noise(rng, 60.0) * 5).astype(np.float32))
    start = time.perf_counter()
    record = tag(model, [str(path)], *EVENTS)[0]
    seconds = time.perf_counter() - start
    return {"audio_s": record["duration"], "wall_s": seconds, "x_real_time": record["duration"] / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("evbench"), help="working folder (kept between runs)")
    parser.add_argument("--per-class", type=int, default=400, help="training clips per class")
    parser.add_argument("--files", type=int, default=20, help="60-second test files")
    parser.add_argument("--train-args", default="", help="extra `ast train` options (default: the recipe's)")
    parser.add_argument("--speed-minutes", type=float, default=60.0)
    args = parser.parse_args()
    work = args.work.resolve()
    if not (work / "train").is_dir():
        training_set(work / "train", args.per_class)
    model = work / "run" / "model"
    if not model.is_dir():
        subprocess.run([sys.executable, "-m", "astcli", "train", "--arch", "elastic", "--size",
                        "tiny", "--init", "none", "--loss", "bce", "--dataset", str(work / "train"), "--output",
                        str(work / "run"), *args.train_args.split()], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    reference_file = work / "test" / "reference.json"
    if not reference_file.is_file():
        reference = test_set(work / "test", args.files)
        reference_file.write_text(json.dumps(reference), encoding="utf-8")
    reference = json.loads(reference_file.read_text(encoding="utf-8"))
    files = sorted({r["file"] for r in reference})
    runs = {
        " ".join(EVENTS): event_rows(tag(model, files, *EVENTS)),
        "--events (default --activity mean)": event_rows(tag(model, files, "--events")),
        " ".join(EVENTS) + " --min-duration 0.25": event_rows(tag(model, files, *EVENTS, "--min-duration", "0.25")),
        "--timeline --window 1 (1 s, no overlap)": timeline_rows(tag(model, files, "--timeline", "--window", "1",
                                                                     "-k", "0")),
        "--timeline (model window, 10.24 s)": timeline_rows(tag(model, files, "--timeline", "-k", "0")),
    }
    print(f"{len(reference)} reference events in {len(files)} files of 60 s; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'method (1 s windows, 1/3 s hop)':48} {'event F1':>9} {'segment F1':>11}")
    results = {name: score(reference, rows, files) for name, rows in runs.items()}
    for name, r in results.items():
        print(f"{name:48} {r['event_f1']:9.3f} {r['segment_f1']:11.3f}")
    best_timeline = max(results[k]["event_f1"] for k in results if k.startswith("--timeline"))
    ratio = results[next(iter(results))]["event_f1"] / max(best_timeline, 1e-9)
    print(f"event F1, --events / the best timeline: {ratio:.2f}x")
    s = speed(model, work, args.speed_minutes)
    print(f"speed, ElasticAST-tiny (12 blocks), {' '.join(EVENTS)}: {s['audio_s']:.0f} s of audio in "
          f"{s['wall_s']:.1f} s = {s['x_real_time']:.0f}x real time (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
