"""The chance floor of DEO: what a group-blind model scores on the same
test cells, checked against the metric itself on simulated predictions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastfair.attributes import Attributes
from fastfair.metrics import attribute_reports, class_accuracy, deo_chance_floor, fairness_report


def _blind_predictions(labels: np.ndarray, p: np.ndarray, C: int, rng: np.random.Generator) -> np.ndarray:
    """Each test sample right with its class's probability, whatever its group."""
    right = rng.random(labels.size) < p[labels]
    wrong = (labels + rng.integers(1, C, labels.size)) % C
    return np.where(right, labels, wrong)


@pytest.mark.parametrize("seed", range(3))
def test_floor_is_the_metric_of_a_group_blind_model(seed):
    """Monte Carlo through fairness_report / attribute_reports (an independent
    path: real predictions, the metric's own code) against the floor's
    binomial draws, on random cell sizes with an empty cell."""
    rng = np.random.default_rng(seed)
    C, attrs = 4, Attributes.from_list([("a", "xyz"), ("b", "uv")])
    G = attrs.num_groups
    counts = rng.integers(5, 40, size=(C, G))
    counts[1, 4] = 0  # an empty cell counts as 0%, in the metric and in the floor
    labels = np.repeat(np.arange(C * G) // G, counts.ravel())
    groups = np.repeat(np.arange(C * G) % G, counts.ravel())
    p = rng.uniform(0.6, 0.95, C)
    sims = {"deo_m": [], "deo_a": [], "a_deo_m": [], "b_deo_m": []}
    for _ in range(400):
        pred = _blind_predictions(labels, p, C, rng)
        rep = fairness_report(pred, labels, groups, C, G)
        sims["deo_m"].append(rep["deo_m"])
        sims["deo_a"].append(rep["deo_a"])
        for name, r in attribute_reports(pred, labels, groups, C, attrs).items():
            sims[f"{name}_deo_m"].append(r["deo_m"])
    floor = deo_chance_floor(counts, p, attrs, trials=2000, seed=seed)
    assert set(floor) == set(sims)
    for key, vals in sims.items():
        mean, p5, p95 = floor[key]
        assert p5 <= mean <= p95
        # Two estimates of the same mean: 400 and 2000 draws, spreads of a few points.
        assert abs(np.mean(vals) - mean) < 0.15 * np.std(vals) + 1.0, (key, np.mean(vals), mean)


def test_perfect_model_floor_is_the_metric_of_perfect_predictions():
    counts = np.array([[3, 5, 0], [4, 4, 4]])
    labels = np.repeat(np.arange(6) // 3, counts.ravel())
    groups = np.repeat(np.arange(6) % 3, counts.ravel())
    rep = fairness_report(labels, labels, groups, 2, 3)
    floor = deo_chance_floor(counts, np.ones(2), trials=10)
    assert floor["deo_m"] == [rep["deo_m"]] * 3 == [100.0] * 3  # class 0's empty cell
    assert floor["deo_a"][0] == pytest.approx(rep["deo_a"]) == 50.0
    assert deo_chance_floor(counts[1:], np.ones(1), trials=10)["deo_m"] == [0.0, 0.0, 0.0]


def test_floor_falls_with_accuracy_and_with_cell_size():
    small, large = np.full((10, 100), 60), np.full((10, 100), 1000)
    at = {a: deo_chance_floor(small, np.full(10, a), trials=300)["deo_m"][0] for a in (0.6, 0.9)}
    assert at[0.6] > at[0.9] > 0
    assert deo_chance_floor(large, np.full(10, 0.9), trials=300)["deo_m"][0] < at[0.9] / 2


def test_floor_is_seeded():
    counts = np.full((3, 4), 20)
    a = deo_chance_floor(counts, np.full(3, 0.8), seed=5, trials=50)
    assert a == deo_chance_floor(counts, np.full(3, 0.8), seed=5, trials=50)
    assert a != deo_chance_floor(counts, np.full(3, 0.8), seed=6, trials=50)


@pytest.mark.parametrize("counts, acc, match", [
    (np.full((2, 3), 5), np.full(3, 0.5), "class_acc"),
    (np.full(6, 5), np.full(2, 0.5), "cell_counts"),
    (np.full((2, 3), 5), np.array([0.5, 1.5]), "within"),
    (np.full((2, 3), -1), np.full(2, 0.5), ">= 0"),
])
def test_bad_inputs_are_refused(counts, acc, match):
    with pytest.raises(ValueError, match=match):
        deo_chance_floor(counts, acc)


def test_attributes_must_match_the_groups():
    with pytest.raises(ValueError, match="6 intersectional groups"):
        deo_chance_floor(np.full((2, 4), 5), np.full(2, 0.5), Attributes.from_list([("a", "xy"), ("b", "uvw")]))


def test_class_accuracy_weights_cells_by_their_test_samples():
    cell_acc = [[100.0, 0.0, None], [50.0, 50.0, 50.0]]
    counts = [[30, 10, 0], [1, 2, 3]]
    np.testing.assert_allclose(class_accuracy(cell_acc, counts), [0.75, 0.5])
    with pytest.raises(ValueError, match="test counts"):
        class_accuracy(cell_acc, [[1, 2]])


def test_every_evaluation_reports_the_floor():
    from fastfair import data
    from fastfair.evaluate import cell_test_counts, evaluate_synset

    ds = data.load("cdigits-fgbg", fg_colours=2, bg_colours=2)
    n = 2 * ds.num_classes
    res = evaluate_synset(ds.train.images[:n], ds.train.labels[:n], ds, epochs=1, runs=1, progress=False,
                          device="cpu", net_kwargs={"width": 8})
    assert set(res["deo_floor"]) == {"deo_m", "deo_a", "fg_deo_m", "bg_deo_m"}
    counts = cell_test_counts(ds)
    assert counts.sum() == ds.test.labels.numel()
    want = deo_chance_floor(counts, class_accuracy(res["cell_acc"], counts), ds.attributes)
    assert res["deo_floor"] == want
    assert torch.isfinite(torch.tensor(res["deo_floor"]["deo_m"])).all()


def test_reproduce_tables_show_the_floor_where_a_cell_has_it():
    from fastfair.reproduce_outputs import markdown

    base = {"dataset": "cmnist-fg", "ipc": 10, "method": "dm", "objective": "fairdd", "deo_m": 20.0,
            "deo_m_std": 1.0, "deo_a": 10.0, "deo_a_std": 1.0, "acc": 90.0, "acc_std": 0.5,
            "worst_group_acc": 70.0}
    old = markdown("fairdd", "cpu", [base], {})
    assert "chance DEO_M" not in old
    new = markdown("fairdd", "cpu", [base, {**base, "method": "dc", "deo_floor": {"deo_m": [14.25, 12.0, 17.0]}}],
                   {})
    header = next(line for line in new.splitlines() if line.startswith("| dataset"))
    col = header.split(" | ").index("chance DEO_M")
    rows = [line.split(" | ") for line in new.splitlines() if line.startswith("| cmnist-fg")]
    assert sorted(r[col] for r in rows) == ["-", "14.25"]
    assert all(len(r) == len(header.split(" | ")) for r in rows)


def test_many_cells_are_drawn_in_blocks(monkeypatch):
    """Many classes x groups: the draws go in blocks (bounded memory), and
    the floor is the same statistic as in one block."""
    import fastfair.metrics as m

    counts, p = np.full((6, 50), 30), np.linspace(0.6, 0.95, 6)
    one = m.deo_chance_floor(counts, p, trials=400, seed=1)
    monkeypatch.setattr(m, "_FLOOR_DRAWS_AT_ONCE", 6 * 50 * 7)  # blocks of 7 trials, the last one short
    blocks = m.deo_chance_floor(counts, p, trials=400, seed=1)
    for k in one:
        assert blocks[k] == pytest.approx(one[k], abs=2.0)
    monkeypatch.setattr(m, "_FLOOR_DRAWS_AT_ONCE", 1)  # one trial per block
    assert len(m.deo_chance_floor(counts, p, trials=3, seed=1)["deo_m"]) == 3
