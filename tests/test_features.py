import functools
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from astcli.features import (
    KaldiFbank,
    StreamingFbank,
    fbank,
    fbank_batch,
    frames_for_samples,
    normalize,
    samples_for_frames,
)
from astcli.model.config import DEFAULT_STATS

AUDIOSET = DEFAULT_STATS["ast"]
KINDS = ["tones", "chirp", "bursts"]
LOG_FLOOR = math.log(torch.finfo(torch.float32).eps)


def assert_matches(ours: np.ndarray, expected: np.ndarray) -> None:
    """Raw log-mel `ours` (float32 maths) within 1e-3 of float64 `expected` after AudioSet normalisation.

    Energies within e x of the eps floor (over 100 dB under the frame's peak on a clean chirp) sit below
    float32 FFT roundoff, which torchaudio's float32 maths shares: there 5e-3 is allowed.
    """
    assert ours.shape == expected.shape
    error = np.abs(ours - expected) / (2 * AUDIOSET[1])
    assert error[expected > LOG_FLOOR + 1].max() <= 1e-3 and error.max() <= 5e-3


@functools.cache
def reference_filters(n_fft: int = 512) -> np.ndarray:
    """Kaldi's 128 triangular mel filters at 16 kHz [128, n_fft // 2 + 1], bin by bin in float64."""

    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    step = (mel(8000) - mel(20)) / 129
    filters = np.zeros((128, n_fft // 2 + 1))
    for m in range(128):
        left, center, right = (mel(20) + (m + i) * step for i in range(3))
        for k in range(n_fft // 2):
            v = mel(k * 16000 / n_fft)
            if left < v <= center:
                filters[m, k] = (v - left) / (center - left)
            elif center < v < right:
                filters[m, k] = (right - v) / (right - center)
    return filters


def reference_fbank(x: np.ndarray, frame_shift_ms: float) -> np.ndarray:
    """Kaldi fbank (AST arguments, 16 kHz) written frame by frame in float64, independent of the module."""
    length, shift, n_fft = 400, round(16 * frame_shift_ms), 512
    eps = float(np.finfo(np.float32).eps)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / (length - 1))
    rows = []
    for start in range(0, len(x) - length + 1, shift):
        frame = x[start : start + length].astype(np.float64)
        frame = frame - frame.mean()
        frame = np.concatenate([[frame[0] * (1 - 0.97)], frame[1:] - 0.97 * frame[:-1]]) * window
        power = np.abs(np.fft.rfft(frame, n_fft)) ** 2
        rows.append(np.log(np.maximum(reference_filters(n_fft) @ power, eps)))
    return np.array(rows).reshape(-1, 128)


@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")
@pytest.mark.parametrize("kind", KINDS)
def test_matches_transformers_ast_feature_extractor(signal, kind):
    import transformers

    x = signal(kind, seconds=5.0)
    ours = fbank(torch.from_numpy(x))
    # Without torchaudio the extractor takes its numpy Kaldi path; max_length = our frame count: no pad/cut.
    extractor = transformers.ASTFeatureExtractor(
        do_normalize=True, mean=AUDIOSET[0], std=AUDIOSET[1], max_length=len(ours)
    )
    oracle = extractor(x, sampling_rate=16000, return_tensors="np")["input_values"][0]
    assert len(ours) == frames_for_samples(len(x))
    assert np.abs(normalize(ours, *AUDIOSET).numpy() - oracle).max() <= 2e-3
    assert_matches(ours.numpy(), oracle * 2 * AUDIOSET[1] + AUDIOSET[0])
    exact = normalize(fbank(torch.from_numpy(x).double()), *AUDIOSET).numpy()
    assert np.abs(exact - oracle).max() <= 1e-5  # float64 maths: equal up to the oracle's float32 output


@pytest.mark.parametrize("frame_shift_ms", [10.0, 20.0, 30.0, 40.0])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_at_every_resolution(signal, kind, frame_shift_ms):
    x = signal(kind, seconds=3.0, seed=1)
    expected = reference_fbank(x, frame_shift_ms)
    ours = fbank(torch.from_numpy(x), frame_shift_ms=frame_shift_ms)
    assert ours.dtype == torch.float32
    assert_matches(ours.numpy(), expected)
    x64 = torch.from_numpy(x).double()
    exact = fbank(x64, frame_shift_ms=frame_shift_ms)
    assert exact.dtype == torch.float64 and np.abs(exact.numpy() - expected).max() <= 1e-9
    assert torch.equal(x64, torch.from_numpy(x).double())  # input left untouched


@pytest.mark.parametrize(
    ("num_samples", "frame_shift_ms", "expected"),
    [(0, 10, 0), (1, 10, 0), (399, 10, 0), (400, 10, 1), (401, 10, 1), (559, 10, 1), (560, 10, 2),
     (561, 10, 2), (16000, 10, 98), (16000, 20, 49), (16000, 30, 33), (16000, 40, 25)],
)  # fmt: skip
def test_frame_counts(num_samples, frame_shift_ms, expected):
    assert frames_for_samples(num_samples, frame_shift_ms) == expected
    features = fbank(torch.rand(num_samples) - 0.5, frame_shift_ms=frame_shift_ms)
    assert features.shape == (expected, 128) and features.dtype == torch.float32


def test_silence_is_floored_at_eps():
    features = fbank(torch.zeros(1000))
    assert torch.equal(features, torch.full((4, 128), math.log(torch.finfo(torch.float32).eps)))


def test_rejects_non_1d_waveform():
    with pytest.raises(ValueError, match="1-D"):
        fbank(torch.zeros(2, 1000))


@pytest.mark.parametrize("frame_shift_ms", [10.0, 40.0])
def test_batch_equals_per_clip(signal, frame_shift_ms):
    x = torch.from_numpy(signal("bursts", seconds=2.0))
    clips = [x, x[:399], x[:400], x[7:5000], torch.zeros(0), x[123:], x[:1234] * 0.5]
    batch = fbank_batch(clips, frame_shift_ms=frame_shift_ms)
    assert len(batch) == len(clips)
    for clip, features in zip(clips, batch, strict=True):
        single = fbank(clip, frame_shift_ms=frame_shift_ms)
        assert features.shape == single.shape
        torch.testing.assert_close(features, single, atol=1e-5, rtol=0)
    assert fbank_batch([]) == []


@settings(max_examples=30, deadline=None)
@example(num_samples=2000, cuts=[400, 700, 701, 1500], frame_shift_ms=40.0)  # hop longer than the frame
@given(
    num_samples=st.integers(0, 12000),
    cuts=st.lists(st.integers(0, 12000), max_size=8),
    frame_shift_ms=st.sampled_from([10.0, 20.0, 30.0, 40.0]),
)
def test_streaming_equals_whole(num_samples, cuts, frame_shift_ms):
    x = torch.rand(num_samples, generator=torch.Generator().manual_seed(num_samples)) - 0.5
    bounds = [0, *sorted(c for c in cuts if c <= num_samples), num_samples]
    stream = StreamingFbank(frame_shift_ms=frame_shift_ms)
    parts = [stream.push(x[a:b]) for a, b in itertools.pairwise(bounds)]
    streamed = torch.cat(parts)
    whole = fbank(x, frame_shift_ms=frame_shift_ms)
    assert streamed.shape == whole.shape and stream.num_frames == len(whole)
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hop_ms", [10.0, 40.0])
def test_traceable_twin_matches_fbank(hop_ms):
    """The traceable twin (the export graph's front end) runs in float64: it equals the library's float64 fbank
    to float32 rounding (the library's float32 path is itself ~1e-3 off in the log energy of near-empty bins)."""
    module = KaldiFbank(16000, 128, hop_ms)
    need = module.samples_for(7)
    assert need == samples_for_frames(7, hop_ms)
    assert (frames_for_samples(need, hop_ms), frames_for_samples(need - 1, hop_ms)) == (7, 6)
    for samples in (400, 560, 16000):
        wave = _signal(samples, seed=samples)
        got = module(wave.unsqueeze(0))[0]
        assert got.dtype == torch.float32
        assert (got - fbank(wave.double(), 16000, frame_shift_ms=hop_ms).float()).abs().max() < 1e-5
        assert (got - fbank(wave, 16000, frame_shift_ms=hop_ms)).abs().max() < 1e-2
    silence = torch.zeros(1, 4000)
    assert torch.equal(module(silence)[0], fbank(silence[0], 16000, frame_shift_ms=hop_ms))


def _signal(samples: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 16000
    tone = 0.3 * torch.sin(2 * torch.pi * (300 + 200 * seed) * t) + 0.2 * torch.sin(2 * torch.pi * 2500 * t * t)
    return (tone + 0.05 * torch.randn(t.shape, generator=gen)).float()


def test_normalize_presets():
    features = torch.tensor([[-4.2677393, 4.8702555]])
    torch.testing.assert_close(normalize(features, *AUDIOSET), torch.tensor([[0.0, 1.0]]))
