"""Data augmentation (SpecAugment, mixup, noise, ElasticAST hop sampling) and resumable samplers.

All randomness comes from an explicit ``torch.Generator`` (samplers derive one from (seed, epoch)), so a
training run is reproducible and can be resumed exactly.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from astcli.train.seeds import seeded_generator


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=generator))


def spec_augment(
    features: torch.Tensor,
    freq_mask: int,
    time_mask: int,
    generator: torch.Generator,
    reference_frames: int = 1024,
) -> torch.Tensor:
    """AST-style SpecAugment of normalised ``features[frames, mel]``: one frequency and one time mask of 0s.

    The frequency mask is uniform in [0, freq_mask) bins wide. ``time_mask`` is meant for clips of
    ``reference_frames`` frames (AST recipes: 1024 AudioSet, 512 ESC-50, 128 Speech Commands) and is scaled
    to this clip's own length: the time mask is uniform in [0, max(1, round(time_mask * frames /
    reference_frames))). Neither mask ever covers more than half of the bins or frames (the widest AST recipe
    masks at most 48 of 128 frames), so a short clip keeps most of itself.
    """
    frames, mels = features.shape
    out = features.clone()
    if freq_mask > 0:
        width = _randint(generator, 0, min(freq_mask, mels // 2 + 1))
        start = _randint(generator, 0, mels - width + 1)
        out[:, start : start + width] = 0
    if time_mask > 0:
        scaled = max(1, round(time_mask * frames / reference_frames))
        width = _randint(generator, 0, min(scaled, frames // 2 + 1))
        start = _randint(generator, 0, frames - width + 1)
        out[start : start + width] = 0
    return out


def mixup(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    labels_a: torch.Tensor,
    labels_b: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix clip b into clip a at a's length (b cropped or zero-padded along dim 0, time).

    Works on features ``[frames, mel]`` or waveforms ``[samples]``; labels are one-hot or multi-hot float
    vectors. Returns ``(lam * a + (1 - lam) * b, lam * labels_a + (1 - lam) * labels_b)``.
    """
    length = features_a.shape[0]
    b = features_b[:length]
    if b.shape[0] < length:
        b = torch.cat([b, b.new_zeros((length - b.shape[0], *b.shape[1:]))])
    return lam * features_a + (1 - lam) * b, lam * labels_a + (1 - lam) * labels_b


def sample_mixup_lambda(generator: torch.Generator, alpha: float = 10.0) -> float:
    """A mixing weight drawn from Beta(alpha, alpha) (AST used Beta(10, 10))."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def add_noise(
    waveform: torch.Tensor, noise: torch.Tensor, snr_db: float, generator: torch.Generator
) -> torch.Tensor:
    """Add a random crop of background noise (tiled if shorter) to a 1-D waveform at ``snr_db`` dB SNR."""
    length = len(waveform)
    if len(noise) < length:
        noise = noise.repeat(math.ceil(length / len(noise)))
    start = _randint(generator, 0, len(noise) - length + 1)
    crop = noise[start : start + length]
    noise_power = crop.pow(2).mean()
    if noise_power == 0:
        return waveform.clone()
    scale = torch.sqrt(waveform.pow(2).mean() / (noise_power * 10 ** (snr_db / 10)))
    return waveform + scale * crop


def feature_noise(features: torch.Tensor, generator: torch.Generator, reference_frames: int = 128) -> torch.Tensor:
    """AST's feature noise: add uniform noise scaled by rand/10, then roll along time by up to 10 frames at
    ``reference_frames`` frames (AST's Speech Commands clips: 128), scaled to this clip's length."""
    level = torch.rand((), generator=generator, dtype=features.dtype) / 10
    noisy = features + torch.rand(features.shape, generator=generator, dtype=features.dtype) * level
    shift = round(10 * len(features) / reference_frames)
    return torch.roll(noisy, _randint(generator, -shift, shift + 1), dims=0)


def random_hop_ms(generator: torch.Generator, choices: Sequence[float] = (10.0, 20.0, 30.0, 40.0)) -> float:
    """A frame shift for ElasticAST's resolution augmentation, uniform over ``choices``."""
    return float(choices[_randint(generator, 0, len(choices))])


class _EpochSampler:
    """Indices per epoch as a pure function of (seed, epoch): resuming at an epoch repeats its sequence."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def _generator(self, epoch: int) -> torch.Generator:
        return seeded_generator(self.seed, epoch)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n"] != self.n:
            raise ValueError(f"sampler state is for {state['n']} examples, this sampler has {self.n}")
        self.seed = int(state["seed"])


class ShuffleSampler(_EpochSampler):
    """A permutation of range(n) per epoch."""

    def indices(self, epoch: int) -> list[int]:
        return torch.randperm(self.n, generator=self._generator(epoch)).tolist()


class BalancedSampler(_EpochSampler):
    """AST's class-balanced sampling: ``len(weights)`` draws with replacement, proportional to weights."""

    def __init__(self, weights: Sequence[float] | torch.Tensor, seed: int = 0):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        if self.weights.ndim != 1 or not bool((self.weights >= 0).all()) or float(self.weights.sum()) <= 0:
            raise ValueError("sampler weights must be a non-negative 1-D sequence with a positive sum")
        super().__init__(len(self.weights), seed)

    @classmethod
    def from_labels(cls, labels: Sequence[Sequence[int]], seed: int = 0) -> BalancedSampler:
        """Weight each example by the sum over its labels of 1 / (examples carrying that label)."""
        counts = Counter(c for example in labels for c in set(example))
        return cls([sum(1.0 / counts[c] for c in set(example)) for example in labels], seed)

    def indices(self, epoch: int) -> list[int]:
        return torch.multinomial(
            self.weights, self.n, replacement=True, generator=self._generator(epoch)
        ).tolist()
