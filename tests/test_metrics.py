import itertools

import numpy as np
import pytest
import torch

from fastfair.metrics import fairness_report


def _loop_reference(pred, labels, groups, C, G):
    """Straightforward per-cell loops, independent of the vectorised code."""
    cell = {}
    for c, a in itertools.product(range(C), range(G)):
        idx = [i for i in range(len(labels)) if labels[i] == c and groups[i] == a]
        cell[c, a] = None if not idx else sum(pred[i] == labels[i] for i in idx) / len(idx)
    gaps = []
    for c in range(C):
        rs = [0.0 if cell[c, a] is None else cell[c, a] for a in range(G)]  # the reference: empty = 0%
        gaps.append(max(rs) - min(rs))
    acc = sum(p == y for p, y in zip(pred, labels)) / len(labels)
    return acc * 100, max(gaps) * 100, sum(gaps) / C * 100, cell


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference_random(seed):
    rng = np.random.default_rng(seed)
    C, G = int(rng.integers(2, 6)), int(rng.integers(1, 5))
    n = int(rng.integers(5, 120))
    labels = rng.integers(0, C, n)
    groups = rng.integers(0, G, n)
    if seed % 2:  # force some empty cells
        groups[labels == 0] = 0
    pred = np.where(rng.random(n) < 0.6, labels, rng.integers(0, C, n))
    rep = fairness_report(torch.tensor(pred), torch.tensor(labels), torch.tensor(groups), C, G)
    acc, deo_m, deo_a, cell = _loop_reference(pred.tolist(), labels.tolist(), groups.tolist(), C, G)
    assert rep["acc"] == pytest.approx(acc)
    assert rep["deo_m"] == pytest.approx(deo_m)
    assert rep["deo_a"] == pytest.approx(deo_a)
    assert rep["worst_group_acc"] == pytest.approx(min(v for v in cell.values() if v is not None) * 100)
    for c, a in itertools.product(range(C), range(G)):
        if cell[c, a] is None:
            assert rep["cell_acc"][c][a] is None and (c, a) in rep["empty_cells"]
        else:
            assert rep["cell_acc"][c][a] == pytest.approx(cell[c, a] * 100)
            assert (c, a) not in rep["empty_cells"]
    assert len(rep["empty_cells"]) == sum(v is None for v in cell.values())


def test_hand_worked_example():
    # class 0: group 0 -> 2/2 right, group 1 -> 1/2 right          gap 0.5
    # class 1: group 0 -> 0/1 right, group 1 -> no samples (empty = 0%) gap 0
    # class 2: group 0 -> 1/1, group 1 -> 0/1                       gap 1.0
    labels = [0, 0, 0, 0, 1, 2, 2]
    groups = [0, 0, 1, 1, 0, 0, 1]
    pred = [0, 0, 0, 2, 0, 2, 1]
    rep = fairness_report(torch.tensor(pred), torch.tensor(labels), torch.tensor(groups), 3, 2)
    assert rep["acc"] == pytest.approx(4 / 7 * 100)
    assert rep["deo_m"] == pytest.approx(100.0)
    assert rep["deo_a"] == pytest.approx((0.5 + 0.0 + 1.0) / 3 * 100)
    assert rep["cell_acc"] == [[100.0, 50.0], [0.0, None], [100.0, 0.0]]
    assert rep["empty_cells"] == [(1, 1)]
    assert rep["worst_group_acc"] == 0.0


def test_empty_cell_counts_as_zero():
    # every non-empty cell is perfect, but a missing cell is 0% (the FairDD
    # reference's rule): full gap in both classes; a class with no test
    # samples at all has gap 0.
    labels = torch.tensor([0, 0, 1, 1])
    groups = torch.tensor([0, 1, 0, 0])
    rep = fairness_report(labels.clone(), labels, groups, 3, 3)
    assert rep["deo_m"] == 100.0 and rep["deo_a"] == pytest.approx(200 / 3) and rep["acc"] == 100.0
    assert rep["worst_group_acc"] == 100.0
    assert sorted(rep["empty_cells"]) == [(0, 2), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]


def test_scores_and_numpy_input():
    labels = np.array([0, 1, 1, 0])
    groups = np.array([0, 0, 1, 1])
    scores = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.5, 0.1]])
    rep = fairness_report(scores, labels, groups, 2, 2)
    ref = fairness_report(scores.argmax(1), torch.tensor(labels), torch.tensor(groups), 2, 2)
    assert rep == ref and rep["acc"] == 75.0 and rep["deo_m"] == 100.0


def test_errors():
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="same length"):
        fairness_report(torch.tensor([0]), y, y, 2, 2)
    with pytest.raises(ValueError, match="labels"):
        fairness_report(y, torch.tensor([0, 5]), y, 2, 2)
    with pytest.raises(ValueError, match="groups"):
        fairness_report(y, y, torch.tensor([0, 2]), 2, 2)
    with pytest.raises(ValueError, match="at least one"):
        fairness_report(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long),
                        torch.tensor([], dtype=torch.long), 2, 2)
    with pytest.raises(ValueError, match="integer"):
        fairness_report(torch.tensor([0.0, 1.0]), y, y, 2, 2)


def _sufficiency_loop(pred, labels, groups, C, G):
    """Per class c and group a: correct predictions of c over all predictions
    of c in a (0 where c is never predicted in a); spread over groups."""
    gaps = []
    for c in range(C):
        precs = []
        for a in range(G):
            said = [i for i in range(len(pred)) if pred[i] == c and groups[i] == a]
            precs.append(0.0 if not said else sum(labels[i] == c for i in said) / len(said))
        gaps.append(max(precs) - min(precs))
    return max(gaps) * 100, sum(gaps) / C * 100


@pytest.mark.parametrize("seed", range(6))
def test_sufficiency_gap_matches_loop_reference(seed):
    rng = np.random.default_rng(100 + seed)
    C, G = int(rng.integers(2, 6)), int(rng.integers(1, 5))
    n = int(rng.integers(5, 150))
    labels, groups = rng.integers(0, C, n), rng.integers(0, G, n)
    if seed % 2:  # a class never predicted in some groups
        labels[groups == 0] = np.minimum(labels[groups == 0], 1)
    pred = np.where(rng.random(n) < 0.5, labels, rng.integers(0, C, n))
    if seed % 2:
        pred[groups == 0] = 0
    rep = fairness_report(torch.tensor(pred), torch.tensor(labels), torch.tensor(groups), C, G)
    suf_m, suf_a = _sufficiency_loop(pred.tolist(), labels.tolist(), groups.tolist(), C, G)
    assert rep["suf_m"] == pytest.approx(suf_m) and rep["suf_a"] == pytest.approx(suf_a)


def test_sufficiency_hand_worked_example_and_cobra_names():
    from fastfair.metrics import COBRA_NAMES

    # group 0: predictions of 0 are rows 0, 1, 2 (labels 0, 0, 1): precision 2/3; of 1: row 3 (label 1): 1
    # group 1: predictions of 0: row 4 (label 0): 1; of 1: rows 5, 6 (labels 0, 1): 1/2
    labels = [0, 0, 1, 1, 0, 0, 1]
    groups = [0, 0, 0, 0, 1, 1, 1]
    pred = [0, 0, 0, 1, 0, 1, 1]
    rep = fairness_report(torch.tensor(pred), torch.tensor(labels), torch.tensor(groups), 2, 2)
    assert rep["suf_m"] == pytest.approx(50.0)  # class 1: 1 - 1/2
    assert rep["suf_a"] == pytest.approx(((1 - 2 / 3) + 0.5) / 2 * 100)
    assert set(COBRA_NAMES.values()) <= rep.keys()
