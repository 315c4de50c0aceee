"""Decode any audio file libsndfile reads into mono float32 at a target sample rate.

Inputs are opened once, by descriptor, and handed to libsndfile before a byte is read, so pipes
(``<(cat a.wav)``, ``/dev/stdin``, named pipes) decode as streams wherever libsndfile can stream the format
(WAV, AIFF, AU, CAF, OGG, ...); formats it can only read with seeking (FLAC, MP3) are refused from a pipe in
one line. A named pipe that no writer feeds within ``PIPE_WAIT_SECONDS`` is an error, never a hang.

What is accepted (docs/tagging.md): finite samples within +-``MAX_SAMPLE`` (full scale is +-1). A file that
ends before its header says, or whose decoding stops early, is decoded as far as it goes and carries a
notice (``AudioStream.notice``; ``load_audio`` raises an ``AudioWarning`` with it).
"""

from __future__ import annotations

import os
import re
import select
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr
import torch

from astcli.errors import AudioError, AudioWarning, UsageError
from astcli.features import FRAME_LENGTH_MS, frame_length_samples

# fmt: off
AUDIO_EXTENSIONS = frozenset({
    ".aif", ".aifc", ".aiff", ".au", ".avr", ".caf", ".flac", ".htk", ".ircam", ".mat", ".mp1", ".mp2",
    ".mp3", ".nist", ".oga", ".ogg", ".opus", ".paf", ".pvf", ".rf64", ".sd2", ".sf", ".snd", ".sph",
    ".svx", ".voc", ".w64", ".wav", ".wave", ".wve", ".xi",
})
# fmt: on

MAX_SAMPLE = 1000.0  # largest accepted |sample|: 60 dB above full scale; beyond it the data is not audio
PIPE_WAIT_SECONDS = 30.0  # how long a pipe may stay silent before its first byte

_OS_REASONS = {
    FileNotFoundError: "no such file",
    IsADirectoryError: "is a directory",
    PermissionError: "permission denied",
}
_SF_ERRORS = (sf.SoundFileError, RuntimeError, OSError)
_UNRECOGNISED_FORMAT = 1  # libsndfile's SF_ERR_UNRECOGNISED_FORMAT
_READ_FRAMES = 1 << 16  # frames per libsndfile call
_SMALL_READ = 1024  # frames per call after a decoder error: the audio before the damage is kept
_PIPE_REASON = "cannot be decoded from a pipe (libsndfile streams WAV, AIFF, AU, CAF and OGG; save it to a file)"
# libsndfile's log line for a data chunk whose declared size exceeds the file: "data : 64000 (should be 21304)"
_DATA_CHUNK = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_SEEKING_FORMATS = ("FLAC", "MP3")  # libsndfile needs to seek to decode these
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # what streaming writers (ffmpeg to a pipe) put in a WAV/AIFF size field
_UNKNOWN_FRAMES = 0x7FFFFFFF  # libsndfile's frame count for such a header read from a pipe
_MP3_SLACK = 2 * 1152  # an MP3's header length can be an estimate: two MPEG frames of tolerance


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


def require_frame(num_samples: int, sample_rate: int, name: str) -> None:
    """Raise AudioError unless ``num_samples`` (at ``sample_rate`` Hz) hold one 25 ms analysis frame.

    Shorter audio gives no feature frame at all: scores for it would describe padding, not the audio.
    """
    needed = frame_length_samples(sample_rate)  # one analysis frame: the least audio that can be tagged
    if num_samples < needed:
        raise _error(name, f"too short: {num_samples} samples ({1000 * num_samples / sample_rate:.3g} ms) at "
                           f"{sample_rate} Hz; at least one {FRAME_LENGTH_MS:g} ms frame ({needed} samples) is needed")


def check_samples(x: np.ndarray | torch.Tensor, name: str) -> None:
    """Raise AudioError unless every sample is finite and within +-MAX_SAMPLE."""
    if x.size == 0 if isinstance(x, np.ndarray) else x.numel() == 0:
        return
    peak = float(np.abs(x).max()) if isinstance(x, np.ndarray) else float(x.detach().abs().max())
    if peak != peak or peak == float("inf"):  # max propagates NaN
        raise _error(name, "audio contains NaN or Inf samples")
    if peak > MAX_SAMPLE:
        raise _error(name, f"samples reach {peak:.3g}, outside the accepted range +-{MAX_SAMPLE:g} "
                           "(full scale is +-1): not audio")


def _open_descriptor(name: str) -> tuple[int, bool]:
    """Open ``name`` without reading from it; returns (descriptor, seekable). Pipes are waited for."""
    try:  # O_NONBLOCK: opening a named pipe must not wait for a writer
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise _error(name, _OS_REASONS.get(type(err)) or (err.strerror or "cannot read").lower()) from err
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise _error(name, "is a directory")
        if stat.S_ISREG(info.st_mode):
            if info.st_size == 0:
                raise _error(name, "empty audio")
        elif stat.S_ISFIFO(info.st_mode) or stat.S_ISSOCK(info.st_mode):
            if not select.select([fd], [], [], PIPE_WAIT_SECONDS)[0]:
                raise _error(name, f"no data from the pipe within {PIPE_WAIT_SECONDS:g} s")
        else:
            raise _error(name, "not a file or pipe (a device or terminal?)")
        os.set_blocking(fd, True)
        return fd, stat.S_ISREG(info.st_mode)
    except BaseException:
        os.close(fd)
        raise


def _open(name: str) -> tuple[sf.SoundFile, int, bool]:
    """(SoundFile, its descriptor, seekable) for ``name``, or AudioError saying why it holds no usable audio.
    The caller closes both."""
    fd, seekable = _open_descriptor(name)
    try:
        file = sf.SoundFile(fd, closefd=False)
    except sf.LibsndfileError as err:
        os.close(fd)
        if err.code == _UNRECOGNISED_FORMAT:
            raise _error(name, "not a recognised audio format") from err
        raise _error(name, "corrupt or truncated audio" if seekable else _PIPE_REASON) from err
    except _SF_ERRORS as exc:
        os.close(fd)
        raise _error(name, "corrupt or truncated audio") from exc
    if not seekable and file.format in _SEEKING_FORMATS:
        file.close()
        os.close(fd)
        raise _error(name, _PIPE_REASON)
    if file.samplerate <= 0 or (seekable and file.frames <= 0):
        file.close()
        os.close(fd)
        raise _error(name, "empty audio")
    return file, fd, seekable


def _declared_frames(file: sf.SoundFile, seekable: bool) -> int | None:
    """Frames the header promises, or None where it does not say (streamed WAV, OGG from a pipe)."""
    claim = _DATA_CHUNK.search(file.extra_info)
    if claim:  # libsndfile clamps a seekable WAV/AIFF to the bytes present and logs the declared size
        declared, present = int(claim.group(1)), int(claim.group(2))
        if declared in _UNKNOWN_SIZES or present == 0:
            return None
        return file.frames * declared // present
    if not seekable and not 0 < file.frames < _UNKNOWN_FRAMES:
        return None
    return file.frames


class AudioStream:
    """One file decoded block by block in bounded memory; iterate once.

    Yields non-empty 1-D float32 mono tensors at ``sample_rate`` (the file's own rate when None) whose
    concatenation equals ``load_audio(path, sample_rate)``. Opening errors raise in the constructor, bad
    samples (NaN, Inf, beyond +-MAX_SAMPLE) and unreadable data while iterating. After iteration,
    ``decoded_frames`` counts the frames decoded (at the file's rate), ``samples`` those yielded, ``notice``
    says what, if anything, is doubtful about the file (it ended before its header said, or decoding stopped
    early), and ``finish()`` checks that the audio holds one analysis frame.
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int | None = 16000, block_seconds: float = 30.0):
        self.name = os.fsdecode(path)
        self._file, self._fd, self.seekable = _open(self.name)
        self.source_rate = self._file.samplerate
        self.sample_rate = sample_rate or self.source_rate
        self.declared_frames = _declared_frames(self._file, self.seekable)
        self.decoded_frames = 0  # at the file's rate
        self.samples = 0  # yielded, at sample_rate
        self.stopped: str | None = None  # why decoding ended before the end of the data
        self._block = max(1, round(block_seconds * self.source_rate))
        self._step = _READ_FRAMES
        self._blocks = self._decode()

    @property
    def format(self) -> str:
        return self._file.format

    def info(self) -> AudioInfo:
        """The header's description of the file."""
        f = self._file
        return AudioInfo(self.name, f.frames / f.samplerate, f.samplerate, f.channels, f.frames, f.format, f.subtype)

    @property
    def notice(self) -> str | None:
        """A one-line note when less audio was decoded than the file promised (after iteration), else None."""
        rate, decoded = self.source_rate, self.decoded_frames
        declared = self.declared_frames
        if self.stopped:
            of = f" of the {declared / rate:.3f} s the header declares" if declared is not None else ""
            return f"decoding stopped after {decoded / rate:.3f} s{of} ({self.stopped})"
        slack = _MP3_SLACK + declared // 1000 if declared is not None and self.format == "MP3" else 0
        if declared is not None and decoded < declared - slack:
            return f"truncated: the header declares {declared / rate:.3f} s, the file holds {decoded / rate:.3f} s"
        return None

    def finish(self) -> str | None:
        """After iteration: raise AudioError when the audio (at ``sample_rate``) holds less than one analysis
        frame, saying also why when the file was cut short; else return ``notice``."""
        try:
            require_frame(self.samples, self.sample_rate, self.name)
        except AudioError as exc:
            raise AudioError(f"{exc} ({self.notice})" if self.notice else str(exc)) from exc
        return self.notice

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            os.close(self._fd)

    def __iter__(self) -> AudioStream:
        return self

    def __next__(self) -> torch.Tensor:
        return next(self._blocks)

    def _decode(self) -> Iterator[torch.Tensor]:
        try:
            resampler = None
            if self.sample_rate != self.source_rate:
                resampler = soxr.ResampleStream(self.source_rate, self.sample_rate, 1, dtype="float32", quality="HQ")
            while True:
                x = self._read(self._block)
                end = x.size == 0
                if resampler is not None:
                    x = resampler.resample_chunk(x, last=end)
                if x.size:
                    self.samples += x.size
                    yield torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
                if end:
                    return
        finally:
            self.close()

    def _read(self, frames: int) -> np.ndarray:
        """Up to ``frames`` checked mono float32 frames (empty at the end). A decoder error is retried from the
        same place in small reads (seekable files), so the audio before it is kept; a decoder error after
        some audio ends the stream with ``stopped`` set, before any audio it is an AudioError."""
        parts, got = [], 0
        while got < frames and not self.stopped:
            try:
                x = self._file.read(min(self._step, frames - got), dtype="float32", always_2d=True)
            except _SF_ERRORS as exc:
                if not self._retry_small(self.decoded_frames + got, exc):
                    break
                continue
            if len(x) == 0:
                break
            check_samples(x, self.name)
            parts.append(x[:, 0] if x.shape[1] == 1 else x.mean(axis=1))
            got += len(x)
        self.decoded_frames += got
        return np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else np.zeros(0, np.float32))

    def _retry_small(self, position: int, cause: Exception) -> bool:
        """After a decoder error at frame ``position``: whether to read on from there in small steps; else the
        stream stops (``stopped`` set) or, with no audio decoded yet, fails with AudioError."""
        if self.seekable and self._step > _SMALL_READ:
            try:
                self._file.seek(position)
                self._step = _SMALL_READ
                return True
            except _SF_ERRORS:
                pass
        if position == 0:
            raise _error(self.name, "corrupt or truncated audio" if self.seekable else _PIPE_REASON) from cause
        self.stopped = "corrupt or truncated data"
        return False


_AUDIO_MAGIC = (b"RIFF", b"RF64", b"FORM", b"fLaC", b"OggS", b"ID3", b".snd", b"caff", b"\xff\xfb", b"\xff\xf3")


def read_path_list(data: bytes) -> list[str]:
    """The paths in a path list (``find ... | ast tag -``): one per line, LF or CRLF line ends, a UTF-8
    byte-order mark ignored, blank lines skipped; bytes that are not UTF-8 kept (``os.fsdecode``).

    Raises UsageError when ``data`` is audio or other binary data rather than a list of paths."""
    if data.startswith(_AUDIO_MAGIC) or b"\0" in data:
        raise UsageError("standard input holds audio or binary data, not a list of paths (one per line); "
                         "to tag audio piped in, name it as the file: /dev/stdin")
    data = data.removeprefix(b"\xef\xbb\xbf")
    return [os.fsdecode(line) for line in data.replace(b"\r\n", b"\n").split(b"\n") if line.strip()]


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Describe an audio file from its header, without decoding it."""
    stream = AudioStream(path, None)
    try:
        return stream.info()
    finally:
        stream.close()


def load_audio(path: str | os.PathLike, sample_rate: int = 16000) -> torch.Tensor:
    """Decode a whole file to a 1-D float32 mono tensor at ``sample_rate`` (soxr HQ resampling).

    Raises AudioError for unusable files; a file that holds less than its header says is returned as far as
    it goes, with an ``AudioWarning`` carrying the stream's notice.
    """
    stream = AudioStream(path, None, block_seconds=60.0)
    blocks = list(stream)
    if not blocks:
        raise _error(stream.name, "empty audio")
    if stream.notice:
        warnings.warn(f"{stream.name}: {stream.notice}", AudioWarning, stacklevel=2)
    return resample(torch.cat(blocks) if len(blocks) > 1 else blocks[0], stream.source_rate, sample_rate)


def resample(waveform: torch.Tensor, in_rate: int, out_rate: int) -> torch.Tensor:
    """Resample a 1-D waveform with soxr HQ, as `load_audio` does; returns contiguous float32."""
    x = waveform.detach().cpu().numpy().astype(np.float32, copy=False)
    if in_rate != out_rate:
        x = soxr.resample(x, in_rate, out_rate, quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(x))


def stream_audio(path: str | os.PathLike, sample_rate: int = 16000, block_seconds: float = 30.0) -> AudioStream:
    """An ``AudioStream`` of ``path``: decode block by block in bounded memory; opening errors raise here."""
    return AudioStream(path, sample_rate, block_seconds)
