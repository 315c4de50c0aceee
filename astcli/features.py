"""Kaldi-compatible log-mel filterbank features, as AST computes them, in plain torch.

Matches ``torchaudio.compliance.kaldi.fbank(wave, htk_compat=True, sample_frequency=16000, use_energy=False,
window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)``: 25 ms frames (snip_edges), per-frame
DC removal, pre-emphasis 0.97, symmetric Hann window, zero padding to a power of two, power spectrum,
triangular mel filters on Kaldi's mel scale from 20 Hz to Nyquist, natural log floored at float32 eps.
ElasticAST's "resolution" q is the hop: ``frame_shift_ms = 10 * q``.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

FRAME_LENGTH_MS = 25.0  # Kaldi's (and AST's) analysis frame
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
_EPS = torch.finfo(torch.float32).eps
_CHUNK_FRAMES = 1024  # frames per pass: fits in cache, few sync points between threads


def frame_sizes(sample_rate: int, frame_shift_ms: float, frame_length_ms: float = FRAME_LENGTH_MS) -> tuple[int, int]:
    """Frame length and hop in samples, rounded down as Kaldi does (400 and 160 at 16 kHz, 25 / 10 ms).

    Raises ValueError when the frame is under 2 samples or the hop under 1."""
    length = frame_length_samples(sample_rate, frame_length_ms)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    if length < 2 or shift < 1:
        raise ValueError(f"frame length {frame_length_ms} ms / shift {frame_shift_ms} ms too short")
    return length, shift


def frame_length_samples(sample_rate: int, frame_length_ms: float = FRAME_LENGTH_MS) -> int:
    """Samples in one analysis frame (Kaldi's rounding): the least audio that yields a feature frame."""
    return int(sample_rate * frame_length_ms * 0.001)


def frames_for_samples(
    num_samples: int, frame_shift_ms: float = 10.0, sample_rate: int = 16000, frame_length_ms: float = FRAME_LENGTH_MS
) -> int:
    """Number of fbank frames for `num_samples` samples (snip_edges: only whole frames)."""
    length, shift = frame_sizes(sample_rate, frame_shift_ms, frame_length_ms)
    return 1 + (num_samples - length) // shift if num_samples >= length else 0


def samples_for_frames(
    frames: int, frame_shift_ms: float = 10.0, sample_rate: int = 16000, frame_length_ms: float = FRAME_LENGTH_MS
) -> int:
    """Fewest samples that make ``frames`` whole frames (the inverse of ``frames_for_samples``)."""
    length, shift = frame_sizes(sample_rate, frame_shift_ms, frame_length_ms)
    return (frames - 1) * shift + length if frames > 0 else 0


def mel_filters(sample_rate: int, n_fft: int, num_mel_bins: int) -> torch.Tensor:
    """Kaldi's triangular mel filters ``[n_fft // 2, num_mel_bins]`` (float64) from 20 Hz to Nyquist, on the
    mel scale 1127 ln(1 + f / 700); the Nyquist bin, always weighted zero, is left out."""

    def mel(freq):
        return 1127.0 * torch.log1p(torch.as_tensor(freq, dtype=torch.float64) / 700.0)

    edges = torch.linspace(mel(LOW_FREQ), mel(sample_rate / 2), num_mel_bins + 2, dtype=torch.float64)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bin_mels = mel(torch.arange(n_fft // 2, dtype=torch.float64) * (sample_rate / n_fft))
    rising = (bin_mels - left) / (center - left)
    falling = (right - bin_mels) / (right - center)
    return torch.minimum(rising, falling).clamp_min(0.0).T.contiguous()


@functools.lru_cache(maxsize=32)
def _constants(length: int, sample_rate: int, num_mel_bins: int, device: torch.device, dtype: torch.dtype):
    """Hann window [length] and the mel matrix [n_fft // 2, num_mel_bins] (the Nyquist bin, always weighted
    zero, is left out) cut into bands: (first_row, last_row + 1, weights) per 16 mel bins, their rows
    limited to the FFT bins those filters touch, so the matmul skips the zeros of the band matrix."""
    n_fft = 1 << (length - 1).bit_length()
    window = torch.hann_window(length, periodic=False, dtype=torch.float64)
    filters = mel_filters(sample_rate, n_fft, num_mel_bins).to(device, dtype)
    bands = []
    for band in filters.split(16, dim=1):
        rows = band.any(dim=1).nonzero()
        first, stop = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 1)
        bands.append((first, stop, band[first:stop].contiguous()))
    return window.to(device, dtype), bands


def _fbank_frames(frames: torch.Tensor, sample_rate: int, num_mel_bins: int) -> torch.Tensor:
    """Log-mel energies [num_frames, num_mel_bins] of a [num_frames, frame_length] matrix of raw frames.

    Kaldi's first pre-emphasised sample meets window[0] == 0, so it is dropped: that shifts the frame by
    one sample, which leaves the power spectrum unchanged.
    """
    num_frames, length = frames.shape
    window, bands = _constants(length, sample_rate, num_mel_bins, frames.device, frames.dtype)
    out = frames.new_empty((num_frames, num_mel_bins))
    padded = frames.new_zeros((min(num_frames, _CHUNK_FRAMES), 1 << (length - 1).bit_length()))
    for start in range(0, num_frames, _CHUNK_FRAMES):
        chunk = frames[start : start + _CHUNK_FRAMES]
        x = chunk - chunk.mean(dim=1, keepdim=True)
        y = padded[: len(chunk), : length - 1]
        torch.sub(x[:, 1:], x[:, :-1], alpha=PREEMPHASIS, out=y).mul_(window[1:])
        spectrum = torch.fft.rfft(padded[: len(chunk)])
        power = spectrum.real.square().addcmul_(spectrum.imag, spectrum.imag)
        out[start : start + _CHUNK_FRAMES] = torch.cat([power[:, a:b] @ w for a, b, w in bands], dim=1)
    return out.clamp_min_(_EPS).log_()


def _frame(waveform: torch.Tensor, length: int, shift: int) -> torch.Tensor:
    """[num_frames, length] view of a 1-D waveform, as float32 (float64 stays float64)."""
    if waveform.dim() != 1:
        raise ValueError(f"expected a 1-D waveform, got shape {tuple(waveform.shape)}")
    if waveform.dtype != torch.float64:
        waveform = waveform.float()
    if waveform.numel() < length:
        return waveform.new_empty((0, length))
    return waveform.unfold(0, length, shift)


def fbank(
    waveform: torch.Tensor,
    sample_rate: int = 16000,
    *,
    num_mel_bins: int = 128,
    frame_shift_ms: float = 10.0,
    frame_length_ms: float = FRAME_LENGTH_MS,
) -> torch.Tensor:
    """Kaldi log-mel fbank [num_frames, num_mel_bins] of a 1-D waveform in [-1, 1].

    Computed in float32, as torchaudio does; a float64 waveform gets exact float64 maths (about 2x slower).
    """
    length, shift = frame_sizes(sample_rate, frame_shift_ms, frame_length_ms)
    return _fbank_frames(_frame(waveform, length, shift), sample_rate, num_mel_bins)


def fbank_batch(
    waveforms: list[torch.Tensor],
    sample_rate: int = 16000,
    *,
    num_mel_bins: int = 128,
    frame_shift_ms: float = 10.0,
    frame_length_ms: float = FRAME_LENGTH_MS,
) -> list[torch.Tensor]:
    """`fbank` of many clips, their frames pooled into shared FFT and matmul passes."""
    length, shift = frame_sizes(sample_rate, frame_shift_ms, frame_length_ms)
    frames = [_frame(w, length, shift) for w in waveforms]
    results: list[torch.Tensor] = []
    start = 0
    while start < len(frames):  # pool whole clips up to a chunk of frames (or one longer clip)
        stop, pooled = start + 1, len(frames[start])
        while stop < len(frames) and pooled + len(frames[stop]) <= _CHUNK_FRAMES:
            pooled += len(frames[stop])
            stop += 1
        pool = frames[start:stop]
        out = _fbank_frames(torch.cat(pool) if len(pool) > 1 else pool[0], sample_rate, num_mel_bins)
        results += out.split([len(f) for f in pool])
        start = stop
    return results


class KaldiFbank(nn.Module):
    """The traceable twin of ``fbank`` (for ONNX export): equal-length waveforms ``[clips, samples]`` ->
    ``[clips, frames, mel]``, in ops every ONNX runtime has.

    Pre-emphasis and the Hann window are linear maps of a frame, so they fold with the real DFT into one
    ``[frame_length, 2 * bins]`` matrix: framing (a gather), DC removal, one matmul, power, mel matmul, log.
    It runs in float64, so that it matches Kaldi's fbank to float32 rounding (in float32 the log energy of
    near-empty bins is ~1e-3 off); its cost is small next to the transformer's. The output is float32.
    """

    def __init__(self, sample_rate: int, num_mel_bins: int, hop_ms: float):
        super().__init__()
        self.sample_rate, self.hop_ms = sample_rate, hop_ms
        self.length, self.shift = frame_sizes(sample_rate, hop_ms)
        n_fft = 1 << (self.length - 1).bit_length()
        bins = n_fft // 2  # the Nyquist bin carries no mel weight
        f64 = dict(dtype=torch.float64)
        window = torch.hann_window(self.length, periodic=False, **f64)
        eye = torch.eye(self.length, **f64)
        emphasis = eye - PREEMPHASIS * torch.diag(torch.ones(self.length - 1, **f64), 1)
        emphasis[0, 0] = 1.0 - PREEMPHASIS
        angle = 2 * math.pi * torch.outer(torch.arange(self.length, **f64), torch.arange(bins, **f64)) / n_fft
        dft = torch.cat([angle.cos(), angle.sin()], 1)
        self.register_buffer("frontend", emphasis @ torch.diag(window) @ dft)
        self.register_buffer("filters", mel_filters(sample_rate, n_fft, num_mel_bins))
        self.eps = torch.finfo(torch.float32).eps

    def samples_for(self, frames: int) -> int:
        """Samples that make ``frames`` whole frames."""
        return samples_for_frames(frames, self.hop_ms, self.sample_rate)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        count = (waveform.shape[1] - self.length) // self.shift + 1
        index = torch.arange(count).unsqueeze(1) * self.shift + torch.arange(self.length)
        frames = waveform.double()[:, index]  # [clips, frames, frame_length]
        spectrum = (frames - frames.mean(-1, keepdim=True)) @ self.frontend  # [clips, frames, 2 * bins]
        real, imag = spectrum.chunk(2, dim=-1)
        power = real * real + imag * imag
        return (power @ self.filters).clamp_min(self.eps).log().float()


class StreamingFbank:
    """Incremental `fbank` of a long signal fed as consecutive blocks (e.g. from `stream_audio`).

    Each `push` returns the frames completed so far; the concatenated outputs equal `fbank` of the
    concatenated blocks. Only the samples of the next, incomplete frame are carried between pushes.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        *,
        num_mel_bins: int = 128,
        frame_shift_ms: float = 10.0,
        frame_length_ms: float = FRAME_LENGTH_MS,
    ):
        self.sample_rate = sample_rate
        self.num_mel_bins = num_mel_bins
        self.length, self.shift = frame_sizes(sample_rate, frame_shift_ms, frame_length_ms)
        self.num_frames = 0  # frames returned so far
        self._pending = torch.empty(0)  # samples from the start of the next frame on
        self._skip = 0  # samples still to drop before the next frame (hop longer than the frame)

    def push(self, block: torch.Tensor) -> torch.Tensor:
        """Append a 1-D block; return the new frames [new_frames, num_mel_bins]."""
        skip = min(self._skip, len(block))
        block, self._skip = block[skip:], self._skip - skip
        samples = torch.cat([self._pending, block]) if len(self._pending) else block
        frames = _frame(samples, self.length, self.shift)
        next_start = len(frames) * self.shift
        self._pending = samples[next_start:].clone()
        self._skip += max(0, next_start - len(samples))
        self.num_frames += len(frames)
        return _fbank_frames(frames, self.sample_rate, self.num_mel_bins)


def normalize(features: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """AST normalisation: (features - mean) / (2 * std) (Gong et al. 2021's released code).

    The statistics belong to a model: ``ModelConfig.mean`` / ``std`` (per-family defaults in
    ``astcli.model.config.DEFAULT_STATS``)."""
    return (features - mean) / (2 * std)
