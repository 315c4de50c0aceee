"""The linear probe: the trivial baseline a trained model is reported beside.

Every clip becomes one vector of pooled log-mel statistics: astcli's own fbank ``[frames, mel]``
(:func:`astcli.features.fbank`) reduced to its mean and standard deviation over time and the means of its three
time-thirds, ``5 * mel`` values. A logistic regression on those vectors (softmax over the classes for
single-label data, one sigmoid per class for multi-label data), with the features standardised by the training
set's mean and standard deviation and an L2 penalty on the weights, is fitted by full-batch L-BFGS in float64.
It takes seconds, needs no GPU and no extra dependency, and on clean short-clip tasks it is hard to beat: a model
that scores below it has not learnt what the data offers.

The objective is ``mean_i loss_i + l2 / 2 * ||W||^2`` (bias not penalised), where ``loss_i`` is the cross-entropy
of clip ``i`` (multi-label: the sum over classes of the binary cross-entropies); it equals scikit-learn's
``LogisticRegression(C=1 / (n * l2))`` (one-vs-rest per class for multi-label data).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from astcli.audio import load_audio
from astcli.errors import AudioError, DatasetError, ParameterError
from astcli.features import fbank
from astcli.train.datasets import Dataset
from astcli.train.metrics import evaluate

L2 = 1e-3  # penalty per example on the standardised features (scikit-learn C = 1 / (n * L2))
POOLS = 5  # mean, std, three time-thirds
PROBE_CLIPS = 20_000  # most clips a run fits (and scores) the probe on: a sample of larger sets


def pooled_features(features: torch.Tensor) -> torch.Tensor:
    """``[frames, mel]`` log-mel energies -> ``[5 * mel]``: mean, std (ddof 0) and the three time-thirds' means.

    A clip with fewer than three frames repeats its mean for the empty thirds; one with no frame is all zeros.
    """
    frames, mels = features.shape
    if frames == 0:
        return features.new_zeros(POOLS * mels)
    mean = features.mean(0)
    thirds = [part.mean(0) if len(part) else mean for part in torch.tensor_split(features, 3)]
    return torch.cat([mean, features.std(0, correction=0), *thirds])


def clip_features(paths: list[str], *, sample_rate: int = 16000, num_mel_bins: int = 128, hop_ms: float = 10.0,
                  threads: int = 2) -> tuple[torch.Tensor, dict[int, str]]:
    """Pooled features ``[len(paths), 5 * num_mel_bins]`` of audio files, and ``{index: reason}`` for files that
    cannot be decoded (their rows are zeros)."""

    def one(path: str) -> torch.Tensor | str:
        try:
            wave = load_audio(path, sample_rate)
        except AudioError as exc:
            return str(exc)
        return pooled_features(fbank(wave, sample_rate, num_mel_bins=num_mel_bins, frame_shift_ms=hop_ms))

    with ThreadPoolExecutor(max(1, threads)) as pool:
        found = list(pool.map(one, paths))
    out = torch.zeros(len(paths), POOLS * num_mel_bins)
    errors = {}
    for i, item in enumerate(found):
        if isinstance(item, str):
            errors[i] = item
        else:
            out[i] = item
    return out, errors


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe: ``scores(x) = act(((x - center) / scale) @ weight.T + bias)``, act = softmax or sigmoid."""

    center: torch.Tensor  # [features]
    scale: torch.Tensor  # [features]
    weight: torch.Tensor  # [classes, features]
    bias: torch.Tensor  # [classes]
    multi_label: bool

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, classes]`` logits of ``[n, features]`` pooled features (float64)."""
        return ((x.double() - self.center) / self.scale) @ self.weight.T + self.bias

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, classes]`` probabilities: softmax rows (single-label) or independent sigmoids (multi-label)."""
        logits = self.logits(x)
        return logits.sigmoid() if self.multi_label else logits.softmax(-1)


def _objective(x: torch.Tensor, targets: torch.Tensor, weight, bias, multi_label: bool, l2: float) -> torch.Tensor:
    logits = x @ weight.T + bias
    if multi_label:
        data = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(x)
    else:
        data = F.cross_entropy(logits, targets)
    return data + 0.5 * l2 * weight.square().sum()


def fit_probe(x: torch.Tensor, targets: torch.Tensor, *, multi_label: bool, l2: float = L2,
              max_iter: int = 300) -> LinearProbe:
    """Fit the logistic regression on ``x [n, features]`` and ``targets [n, classes]`` (0/1 rows; single-label
    rows are one-hot). Raises DatasetError for an empty training set, ParameterError for ``l2 <= 0``."""
    if len(x) == 0:
        raise DatasetError("the linear probe needs at least one training clip")
    if not l2 > 0:
        raise ParameterError("l2", f"must be positive (got {l2:g})")
    x = x.double()
    center, spread = x.mean(0), x.std(0, correction=0)
    scale = torch.where(spread > 1e-8, spread, torch.ones_like(spread))  # a constant feature stays unscaled
    z = (x - center) / scale
    targets = targets.double()
    labels = targets if multi_label else targets.argmax(1)
    weight = torch.zeros(targets.shape[1], x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(targets.shape[1], dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-6,
                               tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        solver.zero_grad()
        loss = _objective(z, labels, weight, bias, multi_label, l2)
        loss.backward()
        return loss

    solver.step(closure)
    return LinearProbe(center, scale, weight.detach(), bias.detach(), multi_label)


@dataclass(frozen=True)
class ProbeResult:
    """The probe's metrics on the evaluation clips (same names as the model's: top1/top5 or mAP/mAUC/d_prime),
    how many clips it was fitted and evaluated on, and the seconds it took (features included)."""

    metrics: dict
    train_clips: int
    eval_clips: int
    seconds: float

    def to_dict(self) -> dict:
        return {"metrics": dict(self.metrics), "train_clips": self.train_clips, "eval_clips": self.eval_clips,
                "seconds": round(self.seconds, 3)}


def probe_split(dataset: Dataset, features, train_idx: list[int], eval_idx: list[int], *,
                l2: float = L2) -> ProbeResult:
    """Fit the probe on the rows ``features[i]`` of the examples ``train_idx`` and score it on ``eval_idx``
    (``features``: a tensor with one row per dataset example from :func:`clip_features`, or a dict from example
    index to row). Empty ``eval_idx``: empty metrics."""
    start = time.perf_counter()

    def rows(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([features[i] for i in indices]) if indices else torch.zeros(0, 1)
        targets = torch.zeros(len(indices), len(dataset.classes))
        for row, i in enumerate(indices):
            targets[row, dataset.examples[i].labels] = 1.0
        return x, targets

    probe = fit_probe(*rows(list(train_idx)), multi_label=dataset.multi_label, l2=l2)
    metrics = {}
    if eval_idx:
        x, targets = rows(list(eval_idx))
        metrics = evaluate(probe.scores(x).numpy(), targets.numpy(), dataset.multi_label)
    return ProbeResult(metrics, len(train_idx), len(eval_idx), time.perf_counter() - start)
