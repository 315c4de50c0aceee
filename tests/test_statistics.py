"""Normalisation statistics fitted to a dataset's training clips."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from astcli.errors import DatasetError, ParameterError
from astcli.features import fbank
from astcli.train.statistics import dataset_statistics, fbank_statistics, sample_indices


def _clips(tmp_path, n=5):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        wave = (0.2 * rng.normal(size=int(16000 * rng.uniform(0.1, 0.6))) * rng.uniform(0.01, 1)).astype(np.float32)
        sf.write(tmp_path / f"{i}.wav", wave, 16000)
        paths.append(str(tmp_path / f"{i}.wav"))
    return paths


def test_statistics_are_the_mean_and_std_of_every_log_mel_value(tmp_path):
    paths = _clips(tmp_path)
    (tmp_path / "bad.wav").write_bytes(b"junk")
    every = np.concatenate([fbank(torch.from_numpy(sf.read(p, dtype="float32")[0])).double().numpy().ravel()
                            for p in paths])
    stats = fbank_statistics([*paths, str(tmp_path / "bad.wav")])
    assert stats.clips == 5 and stats.frames * 128 == every.size
    assert stats.mean == pytest.approx(every.mean(), rel=1e-9) and stats.std == pytest.approx(every.std(), rel=1e-9)
    subset = dataset_statistics(paths, [0, 2, 4], sample=2, seed=1)  # two of the three training clips
    chosen = sample_indices([0, 2, 4], 2, 1)
    assert subset == fbank_statistics([paths[i] for i in chosen]) and subset.clips == 2


def test_sampling_is_reproducible_and_takes_everything_when_there_is_little():
    assert sample_indices([9, 3, 5], 10, 0) == [3, 5, 9]
    picked = sample_indices(list(range(100)), 7, 3)
    assert picked == sample_indices(list(range(100)), 7, 3) and len(set(picked)) == 7 and picked == sorted(picked)
    assert picked != sample_indices(list(range(100)), 7, 4)


def test_statistics_need_readable_audio_and_a_sample(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="no readable clip"):
        fbank_statistics([str(tmp_path / "bad.wav")])
    with pytest.raises(ParameterError) as err:
        dataset_statistics(_clips(tmp_path, 1), [0], sample=0)
    assert err.value.parameter == "sample"
