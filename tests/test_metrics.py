import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from astcli.train.metrics import (
    average_precision,
    d_prime,
    evaluate,
    mean_auc,
    mean_average_precision,
    roc_auc,
    top_k_accuracy,
)


def _pairwise_auc(scores, targets) -> float:
    """Probability that a random positive outranks a random negative, ties counting one half."""
    pos = [s for s, t in zip(scores, targets, strict=True) if t]
    neg = [s for s, t in zip(scores, targets, strict=True) if not t]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _threshold_ap(scores, targets) -> float:
    """AP from its definition: for each distinct threshold (high to low), (R_n - R_{n-1}) * P_n."""
    total, ap, prev_recall = sum(targets), 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        predicted = [t for s, t in zip(scores, targets, strict=True) if s >= threshold]
        recall = sum(predicted) / total
        ap += (recall - prev_recall) * sum(predicted) / len(predicted)
        prev_recall = recall
    return ap


def _random_cases(count: int):
    rng = np.random.default_rng(0)
    for i in range(count):
        n = int(rng.integers(2, 30))
        scores = rng.integers(0, 4, n) / 3 if i % 2 else rng.random(n)  # odd cases have many ties
        targets = rng.integers(0, 2, n)
        if 0 < targets.sum() < n:
            yield scores, targets


def test_average_precision_by_hand():
    # ranks: + - + -  ->  P@1 = 1 at R = 0.5, P@3 = 2/3 at R = 1
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # a tie at the top counts as one threshold: P = 1/2 at R = 1/2, then P = 2/3 at R = 1
    assert average_precision([0.5, 0.5, 0.2], [1, 0, 1]) == pytest.approx(0.25 + 1 / 3)
    assert average_precision([0.1, 0.2], [1, 1]) == pytest.approx(1.0)
    assert math.isnan(average_precision([0.1, 0.2], [0, 0]))


def test_roc_auc_by_hand():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5, 0.5], [1, 0, 0]) == pytest.approx(0.5)
    assert roc_auc([0.9, 0.1], [0, 1]) == 0.0
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_metrics_match_brute_force():
    for scores, targets in _random_cases(200):
        assert roc_auc(scores, targets) == pytest.approx(_pairwise_auc(scores, targets), abs=1e-12)
        assert average_precision(scores, targets) == pytest.approx(_threshold_ap(scores, targets), abs=1e-12)


def test_metrics_match_sklearn():
    from sklearn import metrics as sk

    for scores, targets in _random_cases(200):
        assert roc_auc(scores, targets) == pytest.approx(sk.roc_auc_score(targets, scores), abs=1e-12)
        ap = sk.average_precision_score(targets, scores)
        assert average_precision(scores, targets) == pytest.approx(ap, abs=1e-12)
    rng = np.random.default_rng(1)
    scores, targets = rng.random((40, 6)), rng.integers(0, 2, (40, 6))
    labels = rng.integers(0, 6, 40)
    assert mean_average_precision(scores, targets) == pytest.approx(
        sk.average_precision_score(targets, scores, average="macro")
    )
    assert mean_auc(scores, targets) == pytest.approx(sk.roc_auc_score(targets, scores, average="macro"))
    assert top_k_accuracy(scores, labels, 3) == pytest.approx(sk.top_k_accuracy_score(labels, scores, k=3))


def test_means_skip_classes_without_positives():
    scores = np.array([[0.9, 0.2, 0.5], [0.1, 0.8, 0.4], [0.4, 0.3, 0.6]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])  # class 2 has no positive
    ap0 = average_precision(scores[:, 0], targets[:, 0])
    ap1 = average_precision(scores[:, 1], targets[:, 1])
    assert mean_average_precision(scores, targets) == pytest.approx((ap0 + ap1) / 2)
    auc0, auc1 = roc_auc(scores[:, 0], targets[:, 0]), roc_auc(scores[:, 1], targets[:, 1])
    assert mean_auc(scores, targets) == pytest.approx((auc0 + auc1) / 2)
    assert math.isnan(mean_average_precision(scores, np.zeros_like(targets)))


def test_d_prime():
    assert d_prime(0.5) == pytest.approx(0.0)
    assert d_prime(NormalDist().cdf(1.0)) == pytest.approx(math.sqrt(2))
    assert d_prime(0.9) == pytest.approx(-d_prime(0.1))
    assert d_prime(1.0) == math.inf and d_prime(0.0) == -math.inf
    assert math.isnan(d_prime(math.nan))


def test_top_k_accuracy_by_hand():
    scores = np.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.3, 0.3, 0.4]])
    labels = [2, 0, 1]
    assert top_k_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(scores, labels, 3) == 1.0
    with pytest.raises(ValueError, match="k must be"):
        top_k_accuracy(scores, labels, 4)


def test_evaluate_single_and_multi_label_with_torch_inputs():
    scores = torch.tensor([[0.1, 0.5, 0.4, 0.0, 0.0], [0.7, 0.2, 0.1, 0.0, 0.0]])
    result = evaluate(scores, torch.tensor([1, 2]), multi_label=False)
    assert result == {"top1": 0.5, "top5": 1.0}
    one_hot = torch.nn.functional.one_hot(torch.tensor([1, 2]), 5)
    assert evaluate(scores, one_hot, multi_label=False) == result
    assert set(evaluate(scores[:, :3], torch.tensor([1, 2]), multi_label=False)) == {"top1"}

    scores = torch.tensor([[0.9, 0.2], [0.1, 0.8], [0.4, 0.3]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    result = evaluate(scores, targets, multi_label=True)
    assert set(result) == {"mAP", "mAUC", "d_prime"}
    assert result["mAUC"] == pytest.approx(mean_auc(scores.detach().numpy(), targets.numpy()))
    assert result["d_prime"] == pytest.approx(d_prime(result["mAUC"]))
