"""Evaluation metrics: AP/mAP, ROC AUC/mAUC, d-prime (as reported by AST) and top-k accuracy.

Inputs may be numpy arrays or torch tensors. Targets are 0/1; values above 0.5 count as positive.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def _array(x, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def average_precision(scores, targets) -> float:
    """Sum over distinct score thresholds of (R_n - R_{n-1}) * P_n, as sklearn's average_precision_score.

    NaN when there is no positive.
    """
    scores, positive = _array(scores), _array(targets) > 0.5
    if not positive.any():
        return math.nan
    order = np.argsort(-scores, kind="stable")
    hits = positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores[order])), len(scores) - 1]
    tp = np.cumsum(hits)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def roc_auc(scores, targets) -> float:
    """Area under the ROC curve as the Mann–Whitney U statistic (ties get average ranks).

    NaN unless there is at least one positive and one negative.
    """
    scores, positive = _array(scores), _array(targets) > 0.5
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(
        (starts + ends + 1) / 2.0, ends - starts
    )  # 1-based average rank of each tie group
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def mean_average_precision(scores, targets) -> float:
    """Mean AP over the classes (columns) that have at least one positive."""
    scores, targets = _array(scores), _array(targets)
    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    return _nanmean(aps)


def mean_auc(scores, targets) -> float:
    """Mean ROC AUC over the classes (columns) that have both positives and negatives."""
    scores, targets = _array(scores), _array(targets)
    aucs = [roc_auc(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    return _nanmean(aucs)


def d_prime(auc: float) -> float:
    """AST's d-prime: sqrt(2) * Phi^-1(auc) (infinite at auc 0 or 1)."""
    if math.isnan(auc):
        return math.nan
    if auc <= 0.0 or auc >= 1.0:
        return math.copysign(math.inf, auc - 0.5)
    return math.sqrt(2.0) * NormalDist().inv_cdf(auc)


def top_k_accuracy(scores, labels, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores."""
    scores, labels = _array(scores), _array(labels, np.int64)
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be in [1, {scores.shape[1]}], got {k}")
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def evaluate(scores, targets, multi_label: bool) -> dict[str, float]:
    """Multi-label: {"mAP", "mAUC", "d_prime"}; single-label: {"top1", "top5"} (top5 when C >= 5).

    Single-label targets may be class indices [N] or one-hot rows [N, C].
    """
    scores = _array(scores)
    if multi_label:
        auc = mean_auc(scores, targets)
        return {"mAP": mean_average_precision(scores, targets), "mAUC": auc, "d_prime": d_prime(auc)}
    targets = _array(targets)
    labels = targets.argmax(axis=1) if targets.ndim == 2 else targets
    result = {"top1": top_k_accuracy(scores, labels, 1)}
    if scores.shape[1] >= 5:
        result["top5"] = top_k_accuracy(scores, labels, 5)
    return result
