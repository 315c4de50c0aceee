"""Decode any audio file libsndfile reads into mono float32 at a target sample rate."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr
import torch

from astcli.errors import AudioError

# fmt: off
AUDIO_EXTENSIONS = frozenset({
    ".aif", ".aifc", ".aiff", ".au", ".avr", ".caf", ".flac", ".htk", ".ircam", ".mat", ".mp1", ".mp2",
    ".mp3", ".nist", ".oga", ".ogg", ".opus", ".paf", ".pvf", ".rf64", ".sd2", ".sf", ".snd", ".sph",
    ".svx", ".voc", ".w64", ".wav", ".wave", ".wve", ".xi",
})
# fmt: on

_OS_REASONS = {
    FileNotFoundError: "no such file",
    IsADirectoryError: "is a directory",
    PermissionError: "permission denied",
}
_SF_ERRORS = (sf.SoundFileError, RuntimeError, OSError)
_UNRECOGNISED_FORMAT = 1  # libsndfile's SF_ERR_UNRECOGNISED_FORMAT


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says about its audio."""

    path: str
    duration: float  # seconds
    sample_rate: int
    channels: int
    frames: int
    format: str  # e.g. "WAV"
    subtype: str  # e.g. "PCM_16"


def _error(name: str, reason: str) -> AudioError:
    return AudioError(f"{name}: {reason}".replace("\n", "\\n"))


def _open(path: str | os.PathLike) -> sf.SoundFile:
    """Open `path` for decoding, or raise AudioError saying why it holds no usable audio."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            empty = not handle.read(1)
    except OSError as err:
        raise _error(name, _OS_REASONS.get(type(err)) or (err.strerror or "cannot read").lower()) from err
    if empty:
        raise _error(name, "empty audio")
    try:
        file = sf.SoundFile(name)
    except sf.LibsndfileError as err:
        unrecognised = err.code == _UNRECOGNISED_FORMAT
        reason = "not a recognised audio format" if unrecognised else "corrupt or truncated audio"
        raise _error(name, reason) from err
    except _SF_ERRORS as exc:
        raise _error(name, "corrupt or truncated audio") from exc
    if file.frames <= 0 or file.samplerate <= 0:
        file.close()
        raise _error(name, "empty audio")
    return file


def _read_mono(file: sf.SoundFile, name: str, frames: int) -> np.ndarray:
    """Read up to `frames` frames as finite mono float32 (empty at end of file)."""
    try:
        x = file.read(frames, dtype="float32", always_2d=True)
    except _SF_ERRORS as exc:
        raise _error(name, "corrupt or truncated audio") from exc
    if not np.isfinite(x).all():
        raise _error(name, "audio contains NaN or Inf samples")
    return x[:, 0] if x.shape[1] == 1 else x.mean(axis=1)


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Describe an audio file from its header, without decoding it."""
    with _open(path) as f:
        return AudioInfo(
            os.fspath(path), f.frames / f.samplerate, f.samplerate, f.channels, f.frames, f.format, f.subtype
        )


def load_audio(path: str | os.PathLike, sample_rate: int = 16000) -> torch.Tensor:
    """Decode a whole file to a 1-D float32 mono tensor at `sample_rate` (soxr HQ resampling)."""
    name = os.fspath(path)
    with _open(name) as f:
        x = _read_mono(f, name, -1)
        rate = f.samplerate
    if x.size == 0:
        raise _error(name, "empty audio")
    return resample(torch.from_numpy(x), rate, sample_rate)


def resample(waveform: torch.Tensor, in_rate: int, out_rate: int) -> torch.Tensor:
    """Resample a 1-D waveform with soxr HQ, as `load_audio` does; returns contiguous float32."""
    x = waveform.detach().cpu().numpy().astype(np.float32, copy=False)
    if in_rate != out_rate:
        x = soxr.resample(x, in_rate, out_rate, quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(x))


def stream_audio(
    path: str | os.PathLike, sample_rate: int = 16000, block_seconds: float = 30.0
) -> Iterator[torch.Tensor]:
    """Decode a file block by block in bounded memory: yields non-empty 1-D float32 mono tensors at
    `sample_rate` whose concatenation equals `load_audio(path, sample_rate)`. Opening errors raise here."""
    file = _open(path)
    return _stream(file, os.fspath(path), sample_rate, max(1, round(block_seconds * file.samplerate)))


def _stream(file: sf.SoundFile, name: str, sample_rate: int, block_frames: int) -> Iterator[torch.Tensor]:
    with file:
        resampler = None
        if file.samplerate != sample_rate:
            resampler = soxr.ResampleStream(file.samplerate, sample_rate, 1, dtype="float32", quality="HQ")
        while True:
            x = _read_mono(file, name, block_frames)
            end = x.size == 0
            if resampler is not None:
                x = resampler.resample_chunk(x, last=end)
            if x.size:
                yield torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            if end:
                return
