"""Normalisation statistics fitted to a dataset, as the AST authors computed them for each new dataset: the mean
and standard deviation of every log-mel value (all frames and bins) of the training clips.

AST normalises features as ``(x - mean) / (2 * std)`` (:func:`astcli.features.normalize`); its published values
(AudioSet -4.27 / 4.57, ESC-50 -6.63 / 5.36, Speech Commands -6.85 / 5.57) were computed this way on each
dataset's training set. A new model trained on other data gets its statistics from that data; a pretrained model
keeps the statistics it was trained with.
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from astcli import files
from astcli.audio import load_audio
from astcli.errors import AudioError, DatasetError, ParameterError
from astcli.features import fbank

SAMPLE_CLIPS = 500  # clips read to estimate the statistics (all of them when there are fewer)


@dataclass(frozen=True)
class Statistics:
    """Mean and standard deviation of log-mel values, the clips and frames they were computed from."""

    mean: float
    std: float
    clips: int
    frames: int

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "clips": self.clips, "frames": self.frames}


def sample_indices(indices: list[int], count: int, seed: int) -> list[int]:
    """Up to ``count`` of ``indices`` drawn without replacement, reproducibly from ``seed``, in ascending order."""
    if len(indices) <= count:
        return sorted(indices)
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))[:count]
    return sorted(indices[int(k)] for k in order)


def fbank_statistics(paths: list[str], *, sample_rate: int = 16000, num_mel_bins: int = 128, hop_ms: float = 10.0,
                     threads: int = 2) -> Statistics:
    """Mean and standard deviation (ddof 0) over every log-mel value of the clips in ``paths``, accumulated in
    float64. Clips that cannot be decoded are left out; DatasetError when no clip gives a frame."""

    def moments(path: str) -> tuple[int, float, float]:
        try:
            wave = load_audio(path, sample_rate)
        except AudioError:
            return 0, 0.0, 0.0
        x = fbank(wave, sample_rate, num_mel_bins=num_mel_bins, frame_shift_ms=hop_ms).double()
        return len(x), float(x.sum()), float(x.square().sum())

    with ThreadPoolExecutor(max(1, threads)) as pool:
        found = list(pool.map(moments, paths))
    frames = sum(n for n, _, _ in found)
    if frames == 0:
        raise DatasetError("no readable clip long enough for one frame: cannot compute normalisation statistics")
    values = frames * num_mel_bins
    mean = sum(s for _, s, _ in found) / values
    variance = max(0.0, sum(q for _, _, q in found) / values - mean * mean)
    std = math.sqrt(variance)
    if not std > 0:
        raise DatasetError("the clips' log-mel values are all equal: cannot normalise by their spread")
    return Statistics(mean, std, sum(1 for n, _, _ in found if n), frames)


def dataset_statistics(paths: list[str], train_idx: list[int], *, sample_rate: int = 16000,
                       num_mel_bins: int = 128, hop_ms: float = 10.0, sample: int = SAMPLE_CLIPS,
                       seed: int = 0) -> Statistics:
    """:func:`fbank_statistics` of up to ``sample`` training clips (``paths[i]`` for ``i`` in ``train_idx``)."""
    if sample < 1:
        raise ParameterError("sample", f"must be at least 1 (got {sample})")
    chosen = sample_indices(list(train_idx), sample, seed)
    return fbank_statistics([paths[i] for i in chosen], sample_rate=sample_rate, num_mel_bins=num_mel_bins,
                            hop_ms=hop_ms)


def cached_statistics(cache: Path, paths: list[str], train_idx, *, sample_rate: int, num_mel_bins: int,
                      hop_ms: float, seed: int = 0) -> tuple[Statistics, dict]:
    """:func:`dataset_statistics` of ``train_idx``, read back from the JSON file ``cache`` when it was computed
    for the same clips and front end (so a resumed run normalises exactly as it started), computed otherwise;
    with the record that :func:`save_statistics` writes to ``cache``."""
    chosen = sample_indices(list(train_idx), SAMPLE_CLIPS, seed)
    front = {"sample_rate": sample_rate, "num_mel_bins": num_mel_bins, "hop_ms": hop_ms}
    key = hashlib.sha256(json.dumps([[paths[i] for i in chosen], front]).encode()).hexdigest()
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        if data["key"] == key:
            stats = Statistics(float(data["mean"]), float(data["std"]), int(data["clips"]), int(data["frames"]))
            return stats, data
    except (OSError, ValueError, KeyError, TypeError):
        pass
    stats = fbank_statistics([paths[i] for i in chosen], **front)
    return stats, {"key": key, **stats.to_dict()}


def save_statistics(cache: Path, record: dict) -> None:
    """Write a record of :func:`cached_statistics` to ``cache`` (atomically)."""
    files.write_text(cache, json.dumps(record) + "\n")
