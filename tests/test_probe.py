"""The linear probe: pooled log-mel features against numpy, the logistic regression against scikit-learn's,
and a probe fitted on audio files."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from sklearn.linear_model import LogisticRegression

from astcli.errors import DatasetError, ParameterError
from astcli.features import fbank
from astcli.train.datasets import load_dataset
from astcli.train.probe import clip_features, fit_probe, pooled_features, probe_split


def test_pooled_features_are_mean_std_and_three_time_thirds():
    x = torch.randn(13, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = x.numpy()
    thirds = [part.mean(0) for part in np.array_split(a, 3)]  # 5, 4 and 4 frames
    expected = np.concatenate([a.mean(0), a.std(0), *thirds])
    np.testing.assert_allclose(pooled_features(x).numpy(), expected, rtol=1e-12)
    two = pooled_features(x[:2]).numpy()  # the third third is empty: it repeats the mean
    np.testing.assert_allclose(two[16:], a[:2].mean(0), rtol=1e-12)
    assert pooled_features(x[:0]).tolist() == [0.0] * 20


def _problem(n=90, d=12, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1.0, (k, d))
    labels = rng.integers(0, k, n)
    x = centers[labels] + rng.normal(0, 1.5, (n, d)) + rng.normal(3, 2, d)  # not standardised
    return torch.from_numpy(x), labels


def test_softmax_probe_matches_scikit_learn():
    x, labels = _problem()
    l2 = 0.02
    targets = torch.nn.functional.one_hot(torch.from_numpy(labels), 3).double()
    probe = fit_probe(x, targets, multi_label=False, l2=l2)
    z = ((x - x.mean(0)) / x.std(0, correction=0)).numpy()
    oracle = LogisticRegression(C=1 / (len(x) * l2), tol=1e-10, max_iter=10_000).fit(z, labels)
    test, _ = _problem(seed=1)
    zt = ((test - x.mean(0)) / x.std(0, correction=0)).numpy()
    np.testing.assert_allclose(probe.scores(test).numpy(), oracle.predict_proba(zt), atol=2e-5)


def test_multi_label_probe_is_one_logistic_regression_per_class():
    x, labels = _problem(k=2, seed=2)
    rng = np.random.default_rng(3)
    targets = np.stack([labels == 1, (labels == 1) ^ (rng.random(len(labels)) < 0.2)], axis=1).astype(float)
    l2 = 0.05
    probe = fit_probe(x, torch.from_numpy(targets), multi_label=True, l2=l2)
    z = ((x - x.mean(0)) / x.std(0, correction=0)).numpy()
    for c in range(2):
        oracle = LogisticRegression(C=1 / (len(x) * l2), tol=1e-10, max_iter=10_000).fit(z, targets[:, c])
        np.testing.assert_allclose(probe.scores(x)[:, c].numpy(), oracle.predict_proba(z)[:, 1], atol=2e-5)


def test_probe_rejects_an_empty_training_set_and_a_non_positive_penalty():
    x, labels = _problem()
    targets = torch.nn.functional.one_hot(torch.from_numpy(labels), 3).double()
    with pytest.raises(DatasetError, match="at least one training clip"):
        fit_probe(x[:0], targets[:0], multi_label=False)
    with pytest.raises(ParameterError) as err:
        fit_probe(x, targets, multi_label=False, l2=0.0)
    assert err.value.parameter == "l2"


def test_probe_on_audio_files_tells_tones_from_noise(tmp_path):
    rng = np.random.default_rng(0)
    t = np.arange(8000) / 16000
    for kind in ("noise", "tone"):
        (tmp_path / kind).mkdir()
        for i in range(8):
            wave = 0.3 * np.sin(2 * np.pi * rng.uniform(400, 2000) * t) if kind == "tone" else 0.1 * rng.normal(
                size=len(t))
            sf.write(tmp_path / kind / f"{i}.wav", wave.astype(np.float32), 16000)
    (tmp_path / "tone" / "broken.wav").write_bytes(b"not audio")
    dataset = load_dataset(tmp_path)
    features, errors = clip_features([e.path for e in dataset.examples])
    broken = next(i for i, e in enumerate(dataset.examples) if e.path.endswith("broken.wav"))
    assert list(errors) == [broken] and "broken.wav" in errors[broken] and features[broken].abs().sum() == 0
    first = torch.from_numpy(sf.read(dataset.examples[0].path, dtype="float32")[0])
    torch.testing.assert_close(features[0], pooled_features(fbank(first)))
    usable = [i for i in range(len(dataset.examples)) if i != broken]
    result = probe_split(dataset, features, usable[::2], usable[1::2])
    assert result.metrics == {"top1": 1.0} and (result.train_clips, result.eval_clips) == (8, 8)
