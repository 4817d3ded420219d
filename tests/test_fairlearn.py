"""fastfair's Acc / DEO_M / DEO_A against fairlearn's MetricFrame, an
independent implementation (optional: ``pip install .[crosscheck]``).

DEO per class y is the spread over groups of the accuracy on class y's test
samples (the true-positive rate of y): fairlearn's MetricFrame over the rows
of class y, grouped by the protected attribute, ``difference()``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastfair.metrics import fairness_report

fairlearn_metrics = pytest.importorskip("fairlearn.metrics", reason="the optional fairlearn cross-check")


def _fairlearn_deo(pred: np.ndarray, labels: np.ndarray, groups: np.ndarray, C: int) -> tuple[float, float]:
    from sklearn.metrics import accuracy_score

    gaps = []
    for y in range(C):
        m = labels == y
        frame = fairlearn_metrics.MetricFrame(metrics=accuracy_score, y_true=labels[m], y_pred=pred[m],
                                              sensitive_features=groups[m])
        gaps.append(float(frame.difference()))
    return 100 * max(gaps), 100 * float(np.mean(gaps))


@pytest.mark.parametrize("C,G,seed", [(10, 10, 0), (4, 3, 1), (7, 20, 2)])
def test_deo_and_accuracy_equal_fairlearn(C: int, G: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = C * G * 30  # every (class, group) cell present, as in fastfair's balanced test sets
    labels = np.repeat(np.arange(C), G * 30)
    groups = np.tile(np.repeat(np.arange(G), 30), C)
    skill = rng.uniform(0.2, 0.95, size=(C, G))  # a different accuracy per cell
    right = rng.random(n) < skill[labels, groups]
    pred = np.where(right, labels, (labels + rng.integers(1, C, n)) % C)
    rep = fairness_report(torch.from_numpy(pred), torch.from_numpy(labels), torch.from_numpy(groups), C, G)
    deo_m, deo_a = _fairlearn_deo(pred, labels, groups, C)
    assert rep["deo_m"] == pytest.approx(deo_m, abs=1e-9)
    assert rep["deo_a"] == pytest.approx(deo_a, abs=1e-9)
    assert rep["acc"] == pytest.approx(100 * float((pred == labels).mean()), abs=1e-9)
