"""A synthetic ESC-50-like dataset: ten classes of generated sound events, 5-s clips, five folds.

    python benchmarks/esc_like.py DIR              # 10 classes x 5 folds x 8 clips = 400 clips
    python benchmarks/esc_like.py DIR --per-fold 2

Written in the ESC-50 layout (``DIR/meta/esc50.csv``, ``DIR/audio/<fold>-<id>-A-<class>.wav``), so
``ast train --dataset DIR`` reads it as ESC-50 (its published recipe, 5-fold cross-validation), and as a manifest
``DIR/esc_like.csv`` (``path,labels,fold``) that ``ast train --dataset DIR/esc_like.csv`` reads as a dataset of its
own (the recipe for new data, the same folds).
Each clip holds one to four events of its class at random times, with random pitch, length and level, over
background noise (white or brown) at 0-20 dB SNR; 16 kHz. The classes differ in spectral shape and in how
their energy moves over time, so a pooled-statistics baseline cannot solve every pair from averages alone.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000
SECONDS = 5.0
CLASSES = ("tone", "chirp_up", "chirp_down", "siren", "engine", "clicks", "drips", "hiss", "rumble", "birds")


def _event(kind: str, rng: np.random.Generator) -> np.ndarray:
    """One event of ``kind``, 0.2-1.5 s, peak about 1."""
    n = int(rng.uniform(0.2, 1.5) * SR)
    t = np.arange(n) / SR
    f = rng.uniform(300, 3000)
    if kind == "tone":
        x = np.sin(2 * np.pi * f * t)
    elif kind in ("chirp_up", "chirp_down"):
        lo, hi = f, f * rng.uniform(2, 3)
        f0, f1 = (lo, hi) if kind == "chirp_up" else (hi, lo)
        x = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1])))
    elif kind == "siren":
        x = np.sin(2 * np.pi * np.cumsum(f * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))) / SR)
    elif kind == "engine":
        base = rng.uniform(40, 120)
        x = sum(np.sin(2 * np.pi * base * k * t + rng.uniform(0, 6)) / k for k in range(1, 12))
    elif kind in ("clicks", "drips"):
        x = np.zeros(n)
        rate = rng.uniform(10, 30) if kind == "clicks" else rng.uniform(2, 6)
        starts = np.cumsum(rng.exponential(SR / rate, 64)).astype(int)
        for at in starts - starts[0]:  # the first one at the start: never an empty event
            if at >= n:
                break
            width = 40 if kind == "clicks" else 800
            tail = np.exp(-np.arange(min(width, n - at)) / (width / 6))
            tone = np.sin(2 * np.pi * rng.uniform(800, 2500) * np.arange(len(tail)) / SR) if kind == "drips" else 1
            x[at : at + len(tail)] += tail * tone * rng.choice([-1, 1])
    elif kind == "hiss":
        x = np.diff(rng.standard_normal(n + 1))  # high-pass noise
    elif kind == "rumble":
        x = np.cumsum(rng.standard_normal(n))
        x -= np.convolve(x, np.ones(400) / 400, mode="same")  # low-pass noise, drift removed
    else:  # birds: short fast downward sweeps
        x = np.zeros(n)
        for at in range(0, n - 1600, int(rng.uniform(0.1, 0.3) * SR)):
            tt = np.arange(1600) / SR
            fb = rng.uniform(2500, 5000)
            x[at : at + 1600] += np.sin(2 * np.pi * (fb * tt - 0.5 * fb * tt**2 / tt[-1])) * np.hanning(1600)
    envelope = np.minimum(1, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.02 * SR))
    x = x * envelope
    return x / (np.abs(x).max() + 1e-12)


def clip(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A 5-s clip: 1-4 events of ``kind`` over background noise at 0-20 dB SNR."""
    n = int(SECONDS * SR)
    x = np.zeros(n)
    for _ in range(rng.integers(1, 5)):
        event = _event(kind, rng)[:n] * rng.uniform(0.3, 1.0)
        at = rng.integers(0, n - len(event) + 1)
        x[at : at + len(event)] += event
    white = rng.standard_normal(n)
    background = white if rng.random() < 0.5 else np.cumsum(white) - np.convolve(np.cumsum(white), np.ones(800) / 800,
                                                                                   mode="same")
    power = np.mean(x**2)
    x = x + background / background.std() * np.sqrt(power / 10 ** (rng.uniform(0, 20) / 10))
    return (0.8 * x / np.abs(x).max()).astype(np.float32)


def build(root: str | Path, per_fold: int = 8, folds: int = 5, seed: int = 0) -> Path:
    """Write the dataset to ``root``; returns ``root``."""
    root = Path(root)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for fold in range(1, folds + 1):
        for target, kind in enumerate(CLASSES):
            for k in range(per_fold):
                source = f"{fold}{target:02d}{k:02d}"
                name = f"{fold}-{source}-A-{target}.wav"
                sf.write(root / "audio" / name, clip(kind, rng), SR, subtype="PCM_16")
                rows.append((name, fold, target, kind, source))
    with open(root / "meta" / "esc50.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        writer.writerows([name, fold, target, kind, "False", source, "A"] for name, fold, target, kind, source in rows)
    with open(root / "esc_like.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "fold"])
        writer.writerows([f"audio/{name}", kind, fold] for name, fold, _, kind, _ in rows)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--per-fold", type=int, default=8, help="clips per class and fold")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.root, args.per_fold, seed=args.seed)


if __name__ == "__main__":
    main()
