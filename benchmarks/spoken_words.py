"""A spoken-digit dataset synthesised with espeak-ng, comparable to the public Free Spoken Digit Dataset.

    python benchmarks/spoken_words.py DIR                 # 6 speakers x 10 words x 50 takes = 3,000 clips
    python benchmarks/spoken_words.py DIR --takes 4       # 240 clips, for a quick look

The ten words "zero" ... "nine", spoken by six espeak-ng speakers (a voice and a variant each, every speaker
with its own base speed and pitch). Every take draws its own speed (x0.75-1.3), pitch (+-12 around the
speaker's), amplitude, a first-order tilt filter (a different microphone), 0-0.4 s of silence before and after,
and background noise (white or brown) at 5-30 dB SNR; 8 kHz, 16-bit, 0.2-2 s long (most 0.4-1 s), like the
public recordings.

Layout (both read by ``ast train --dataset``):

* ``DIR/<word>/<speaker>_<take>.wav``: one folder per class, so ``--dataset DIR`` trains with a random held-out
  validation share;
* ``DIR/spoken_words.csv``: a manifest ``path,labels,fold`` with ``fold = take // 5 + 1`` (10 folds of 300 clips
  at 50 takes). Fold 1 holds takes 0-4 of every speaker and word: the public set's usual speaker-balanced test
  split of 300 clips, so ``--dataset DIR/spoken_words.csv --folds 1`` trains on 2,700 clips and tests on 300.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# (name, espeak-ng voice+variant, base speed in words per minute, base pitch 0-99)
SPEAKERS = (
    ("us_m3", "en-us+m3", 150, 40),
    ("gb_f2", "en-gb+f2", 165, 60),
    ("scot_m1", "en-gb-scotland+m1", 140, 35),
    ("carib_f4", "en-029+f4", 175, 55),
    ("nyc_m7", "en-us-nyc+m7", 160, 45),
    ("rp_f1", "en-gb-x-rp+f1", 145, 65),
)
SAMPLE_RATE = 8000
TAKES_PER_FOLD = 5


def speak(word: str, voice: str, speed: int, pitch: int, amplitude: int) -> tuple[np.ndarray, int]:
    """espeak-ng's waveform (float32 in [-1, 1]) and its sample rate."""
    command = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-a", str(amplitude), "--stdout", word]
    wav = subprocess.run(command, check=True, capture_output=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return audio, rate


def trim(audio: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    """Drop the leading and trailing samples quieter than ``threshold`` of the peak."""
    loud = np.flatnonzero(np.abs(audio) > threshold * np.abs(audio).max())
    return audio[loud[0] : loud[-1] + 1] if len(loud) else audio


def noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """White or brown (integrated white, leaky) noise of unit power."""
    white = rng.standard_normal(n)
    if rng.random() < 0.5:
        return white
    brown = np.zeros(n)
    level = 0.0
    for i, x in enumerate(white):
        level = 0.98 * level + x
        brown[i] = level
    return brown / (brown.std() + 1e-12)


def take(word: str, speaker: tuple, seed: int) -> np.ndarray:
    """One recording of ``word`` by ``speaker``, 8 kHz float32, 0.2-2 s."""
    _, voice, speed, pitch = speaker
    rng = np.random.default_rng(seed)
    audio, rate = speak(word, voice, int(speed * rng.uniform(0.75, 1.3)),
                        int(np.clip(pitch + rng.uniform(-12, 12), 0, 99)), int(rng.uniform(80, 160)))
    audio = soxr.resample(trim(audio), rate, SAMPLE_RATE).astype(np.float64)
    tilt = rng.uniform(-0.6, 0.6)  # y[n] = x[n] - tilt * x[n-1]: brighter (> 0) or duller (< 0)
    audio = audio - tilt * np.concatenate([[0.0], audio[:-1]])
    pad = rng.uniform(0, 0.4, 2)
    audio = np.concatenate([np.zeros(int(pad[0] * SAMPLE_RATE)), audio, np.zeros(int(pad[1] * SAMPLE_RATE))])
    audio = audio[: 2 * SAMPLE_RATE]
    if len(audio) < SAMPLE_RATE // 5:
        audio = np.pad(audio, (0, SAMPLE_RATE // 5 - len(audio)))
    speech_power = np.mean(audio**2)
    snr_db = rng.uniform(5, 30)
    audio = audio + noise(rng, len(audio)) * np.sqrt(speech_power / 10 ** (snr_db / 10))
    return (0.7 * rng.uniform(0.3, 1.0) * audio / np.abs(audio).max()).astype(np.float32)


def build(root: str | Path, takes: int = 50, speakers: int = len(SPEAKERS), seed: int = 0,
          threads: int = 2) -> Path:
    """Write the dataset to ``root`` (replacing its class folders and manifest); returns the manifest's path."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    root = Path(root)
    jobs = [(word, sp, t) for sp in SPEAKERS[:speakers] for word in WORDS for t in range(takes)]
    for word in WORDS:
        if (root / word).is_dir():
            shutil.rmtree(root / word)
        (root / word).mkdir(parents=True)

    def write(job) -> list:
        word, speaker, t = job
        name = f"{word}/{speaker[0]}_{t:02d}.wav"
        sf.write(root / name, take(word, speaker, _seed(seed, word, speaker[0], t)), SAMPLE_RATE, subtype="PCM_16")
        return [name, word, t // TAKES_PER_FOLD + 1]

    with ThreadPoolExecutor(threads) as pool:
        rows = list(pool.map(write, jobs))
    manifest = root / "spoken_words.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "fold"])
        writer.writerows(rows)
    return manifest


def _seed(*parts) -> int:
    """A seed that depends only on ``parts`` (Python's ``hash`` of strings changes between runs)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="output folder")
    parser.add_argument("--takes", type=int, default=50, help="takes per speaker and word (5 per fold)")
    parser.add_argument("--speakers", type=int, default=len(SPEAKERS), choices=range(1, len(SPEAKERS) + 1))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    manifest = build(args.root, args.takes, args.speakers, args.seed)
    lengths = [sf.info(str(p)).duration for p in Path(args.root).glob("*/*.wav")]
    print(f"{len(lengths)} clips in {manifest.parent}: {min(lengths):.2f}-{max(lengths):.2f} s, "
          f"median {np.median(lengths):.2f} s; manifest {manifest}", file=sys.stderr)


if __name__ == "__main__":
    main()
