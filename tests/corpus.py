"""A generated corpus of good, odd and broken inputs, each with the record `ast tag` must give it.

``build_corpus(folder)`` writes every input (nothing binary is committed) and returns ``Case``s: the argument
to pass on the command line, and what its record must say: tagged (``error`` None, the duration, an optional
warning) or failed (a substring of the error). Named pipes get a writer thread (``start_writers``).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 16000


@dataclass
class Case:
    """One input and its expected record."""

    kind: str
    arg: str  # the command-line argument (a path, possibly not UTF-8: surrogateescape)
    error: str | None = None  # substring of the record's error; None: tagged
    duration: float | None = None  # seconds the record must report (tagged inputs)
    warning: str | None = None  # substring of the record's warning; None: no warning
    feed: bytes | None = field(default=None, repr=False)  # a named pipe's content (written by a thread)

    @property
    def good(self) -> bool:
        return self.error is None


def _tone(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * (300 + 200 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _write(folder: Path, name: str | bytes, data: np.ndarray, rate: int = RATE, **kwargs) -> str:
    path = os.path.join(os.fsencode(folder), os.fsencode(name))
    sf.write(path, data, rate, **kwargs)
    return os.fsdecode(path)


def _bytes(folder: Path, name: str, data: bytes) -> str:
    path = folder / name
    path.write_bytes(data)
    return str(path)


def _cut(path: str, keep_bytes: int | None = None, keep: float | None = None) -> bytes:
    data = Path(path).read_bytes()
    return data[: keep_bytes if keep_bytes is not None else int(len(data) * keep)]


def _float_wav(folder: Path, name: str, peak_value: float, seconds: float = 1.0) -> str:
    x = _tone(seconds)
    x[len(x) // 2] = peak_value
    return _write(folder, name, x, subtype="FLOAT")


def _flac_bytes(folder: Path) -> bytes:
    return Path(_write(folder, "x.flac", _tone(1.0))).read_bytes()


def _good_files(folder: Path) -> list[Case]:
    stereo = np.stack([_tone(2.5, 44100, 1), _tone(2.5, 44100, 2)], axis=1)
    cases = [
        Case("wav pcm16", _write(folder, "pcm16.wav", _tone(2.0), subtype="PCM_16"), duration=2.0),
        Case("wav stereo float 44.1k", _write(folder, "stereo.wav", stereo, 44100, subtype="FLOAT"), duration=2.5),
        Case("flac", _write(folder, "clip.flac", _tone(1.5, seed=3)), duration=1.5),
        Case("ogg vorbis 48k", _write(folder, "clip.ogg", _tone(1.0, 48000, 4), 48000, subtype="VORBIS"),
             duration=1.0),
        Case("mp3", _write(folder, "clip.mp3", _tone(2.0, seed=5), format="MP3"), duration=2.0),
        Case("aiff", _write(folder, "clip.aiff", _tone(1.0, seed=6), subtype="PCM_24"), duration=1.0),
        Case("au", _write(folder, "clip.au", _tone(1.0, seed=7), subtype="PCM_16"), duration=1.0),
        Case("caf", _write(folder, "clip.caf", _tone(1.0, seed=8), subtype="PCM_16"), duration=1.0),
        Case("w64 float", _write(folder, "clip.w64", _tone(1.0, seed=9), subtype="FLOAT"), duration=1.0),
        Case("wav u8", _write(folder, "u8.wav", _tone(1.0, seed=10), subtype="PCM_U8"), duration=1.0),
        Case("8 kHz short", _write(folder, "8k.wav", _tone(0.3, 8000, 11), 8000), duration=0.3),
        Case("one frame", _write(folder, "frame.wav", _tone(0.025, seed=12)), duration=0.025),
        Case("one patch", _write(folder, "patch.wav", _tone(0.175, seed=13)), duration=0.175),
        Case("silence", _write(folder, "silence.wav", np.zeros(RATE, np.float32)), duration=1.0),
        Case("full-scale square", _write(folder, "square.wav", np.sign(_tone(1.0, seed=14)), subtype="PCM_16"),
             duration=1.0),
        Case("hot float (peak 1.5)", _float_wav(folder, "hot.wav", 1.5), duration=1.0),
        Case("long (several windows)", _write(folder, "long.flac", _tone(7.3, seed=15)), duration=7.3),
        Case("flac named .wav", _bytes(folder, "flac_inside.wav", _flac_bytes(folder)), duration=1.0),
        Case("upper-case extension", _write(folder, "LOUD.WAV", _tone(1.0, seed=16)), duration=1.0),
    ]
    link = folder / "link.wav"
    link.symlink_to(cases[0].arg)
    cases.append(Case("symlink", str(link), duration=2.0))
    return cases


def _names(folder: Path) -> list[Case]:
    """Good audio under names that are hard to carry: not UTF-8, control characters, quotes, dashes."""
    names = [("not UTF-8", b"caf\xe9 \xff\xfe.wav"), ("newline and tab", "line\nbreak\ttab.wav"),
             ("quotes and comma", "it's \"quoted\", ok.wav"), ("leading dash", "-rf --help.wav"),
             ("unicode", "日本 🎵 Ωmega.wav"), ("markup and backslash", "[red]x[bold] back\\slash :smile:.wav"),
             ("carriage return", "cr\rname.wav")]
    return [Case(f"name: {kind}", _write(folder, name, _tone(1.0, seed=20 + i)), duration=1.0)
            for i, (kind, name) in enumerate(names)]


def _broken(folder: Path) -> list[Case]:
    wav = _write(folder, "source.wav", _tone(2.0, seed=30), subtype="PCM_16")
    flac = _write(folder, "source.flac", _tone(2.0, seed=31))
    mp3 = _write(folder, "source.mp3", _tone(2.0, seed=32), format="MP3")
    streamed = bytearray(Path(wav).read_bytes())
    streamed[4:8] = streamed[40:44] = b"\xff\xff\xff\xff"  # sizes a streaming writer leaves unknown
    empty_dir = folder / "empty_folder"
    empty_dir.mkdir()
    (folder / "dangling.wav").symlink_to(folder / "nowhere.wav")
    noise = np.random.default_rng(33)
    return [
        Case("200 samples of noise", _write(folder, "n200.wav", (0.3 * noise.standard_normal(200)).astype(np.float32)),
             error="too short: 200 samples (12.5 ms) at 16000 Hz; at least one 25 ms frame (400 samples)"),
        Case("1 sample at 44.1 kHz", _write(folder, "one44.wav", np.array([0.5], np.float32), 44100),
             error="too short: 0 samples"),
        Case("1 sample at 16 kHz", _write(folder, "one16.wav", np.array([0.5], np.float32)),
             error="too short: 1 sample"),
        Case("header only", _write(folder, "header.wav", np.zeros(0, np.float32)), error="empty audio"),
        Case("zero bytes", _bytes(folder, "zero.wav", b""), error="empty audio"),
        Case("random bytes", _bytes(folder, "random.wav", noise.bytes(5000)), error="not a recognised audio format"),
        Case("text file", _bytes(folder, "notes.txt", b"not audio\n" * 50), error="not a recognised audio format"),
        Case("cut in the header", _bytes(folder, "cuthead.wav", _cut(wav, keep_bytes=30)), error="corrupt"),
        Case("truncated wav", _bytes(folder, "trunc.wav", _cut(wav, keep=1 / 3)), duration=0.666,
             warning="truncated: the header declares 2.000 s, the file holds 0.666 s"),
        Case("truncated flac", _bytes(folder, "trunc.flac", _cut(flac, keep=1 / 2)), duration=None,
             warning="s of the 2.000 s the header declares (corrupt or truncated data)"),
        Case("truncated mp3", _bytes(folder, "trunc.mp3", _cut(mp3, keep=1 / 2)), duration=None,
             warning="truncated: the header declares 2.000 s"),
        Case("truncated to a sliver", _bytes(folder, "sliver.wav", _cut(wav, keep_bytes=44 + 200)),
             error="too short: 100 samples"),
        Case("streamed wav (unknown length)", _bytes(folder, "streamed.wav", bytes(streamed)), duration=2.0),
        Case("NaN samples", _float_wav(folder, "nan.wav", np.nan), error="NaN or Inf"),
        Case("Inf samples", _float_wav(folder, "inf.wav", -np.inf), error="NaN or Inf"),
        Case("samples of 1e19", _float_wav(folder, "e19.wav", 1e19), error="samples reach 1e+19"),
        Case("samples of 1e30", _float_wav(folder, "e30.wav", -1e30), error="samples reach 1e+30"),
        Case("random float bit patterns", _bytes(folder, "bits.wav", _random_float_wav(folder)), error=""),
        Case("missing file", str(folder / "missing.wav"), error="no such file"),
        Case("dangling symlink", str(folder / "dangling.wav"), error="no such file"),
        Case("folder without audio", str(empty_dir), error="is a directory"),
        Case("device", "/dev/null", error="not a file or pipe"),
    ]


def _random_float_wav(folder: Path) -> bytes:
    """A float WAV whose samples are random bit patterns (finite ones reach 1e38)."""
    path = _write(folder, "bits_source.wav", np.zeros(8000, np.float32), subtype="FLOAT")
    data = bytearray(Path(path).read_bytes())
    data[-32000:] = np.random.default_rng(34).bytes(32000)
    return bytes(data)


def _pipes(folder: Path) -> list[Case]:
    fed, silent = folder / "fed.pipe", folder / "silent.pipe"
    os.mkfifo(fed)
    os.mkfifo(silent)
    audio = Path(_write(folder, "pipe_source.wav", _tone(1.2, seed=40), subtype="PCM_16")).read_bytes()
    return [Case("named pipe with a writer", str(fed), duration=1.2, feed=audio),
            Case("named pipe without a writer", str(silent), error="no data from the pipe within")]


def build_corpus(folder: Path) -> list[Case]:
    """Every case, good and bad interleaved (so that bad inputs sit between good ones)."""
    good = _good_files(folder) + _names(folder)
    bad = _broken(folder) + _pipes(folder)
    mixed = []
    for i in range(max(len(good), len(bad))):
        mixed += good[i : i + 1] + bad[i : i + 1]
    return mixed


def start_writers(cases: list[Case]) -> list[threading.Thread]:
    """One daemon thread per fed named pipe, writing its content once a reader opens it."""
    threads = []
    for case in cases:
        if case.feed is not None:
            def feed(path=case.arg, data=case.feed):
                with open(path, "wb") as pipe:
                    pipe.write(data)

            threads.append(threading.Thread(target=feed, daemon=True))
            threads[-1].start()
    return threads
