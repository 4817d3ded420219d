from types import SimpleNamespace

import pytest
import torch

from fastfair.evaluate import baseline_set, evaluate_baseline, evaluate_synset

NET = {"width": 16, "depth": 2}  # tiny ConvNet keeps the tests fast


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny convs are far faster on one thread than on two contended ones
    # (OpenMP threads wait on each other when the cores are shared).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _split(n_per_cell, size, seed):
    """2 classes x 2 groups: class = stripe orientation (survives every DSA op),
    group = which colour channel is bright."""
    g = torch.Generator().manual_seed(seed)
    imgs, labels, groups = [], [], []
    stripes = (torch.arange(size) // 2 % 2).float() * 2 - 1
    for c in range(2):
        pattern = stripes.view(size, 1).expand(size, size) if c == 0 else stripes.view(1, size).expand(size, size)
        for a in range(2):
            x = pattern.expand(n_per_cell, 3, size, size).clone()
            x[:, a] *= 2.0
            imgs.append(x + 0.3 * torch.randn(x.shape, generator=g))
            labels += [c] * n_per_cell
            groups += [a] * n_per_cell
    return SimpleNamespace(images=torch.cat(imgs), labels=torch.tensor(labels), groups=torch.tensor(groups))


def _dataset(size=16):
    return SimpleNamespace(train=_split(10, size, 0), test=_split(8, size, 1), num_classes=2, num_groups=2,
                           channels=3, image_size=size)


def _check_schema(res, runs, epochs):
    for k in ("acc", "acc_std", "deo_m", "deo_m_std", "deo_a", "deo_a_std"):
        assert isinstance(res[k], float)
    assert res["model"] == "ConvNet" and res["epochs"] == epochs
    assert len(res["runs"]) == runs
    for r in res["runs"]:
        assert set(r) >= {"acc", "deo_m", "deo_a", "cell_acc"}
        assert len(r["cell_acc"]) == 2 and all(len(row) == 2 for row in r["cell_acc"])
    accs = torch.tensor([r["acc"] for r in res["runs"]], dtype=torch.float64)
    assert res["acc"] == pytest.approx(float(accs.mean()))
    assert res["acc_std"] == pytest.approx(float(accs.std(unbiased=False)))


@pytest.mark.parametrize("dsa", [False, True])
def test_learns_separable_task(dsa):
    ds = _dataset()
    tr = ds.train
    res = evaluate_synset(tr.images, tr.labels, ds, epochs=25, runs=2, batch_size=16, dsa=dsa, device="cpu",
                          progress=False, net_kwargs=NET)
    _check_schema(res, 2, 25)
    assert res["acc"] >= 90.0  # chance is 50%
    assert res["deo_m"] <= 25.0


def test_deterministic_in_seed():
    ds = _dataset(8)
    kw = dict(epochs=3, runs=1, batch_size=8, device="cpu", progress=False, net_kwargs=NET)
    a = evaluate_synset(ds.train.images, ds.train.labels, ds, seed=3, **kw)
    b = evaluate_synset(ds.train.images, ds.train.labels, ds, seed=3, **kw)
    assert a == b


def test_baselines():
    ds = _dataset(8)
    imgs, labels = baseline_set("random", ds, ipc=3, seed=1)
    assert imgs.shape == (6, 3, 8, 8) and labels.bincount().tolist() == [3, 3]
    # the chosen images are real training images of their class
    for x, y in zip(imgs, labels):
        match = (ds.train.images == x).flatten(1).all(1).nonzero().flatten()
        assert match.numel() == 1 and ds.train.labels[match].item() == y
    kw = dict(epochs=2, runs=1, batch_size=16, device="cpu", progress=False, net_kwargs=NET)
    r = evaluate_baseline("random", ds, ipc=3, **kw)
    _check_schema(r, 1, 2)
    assert r["kind"] == "random" and r["ipc"] == 3
    w = evaluate_baseline("whole", ds, **kw)
    _check_schema(w, 1, 2)
    assert w["kind"] == "whole"
    with pytest.raises(ValueError, match="kind"):
        evaluate_baseline("best", ds)


def test_input_validation():
    ds = _dataset(8)
    x, y = ds.train.images, ds.train.labels
    kw = dict(epochs=1, runs=1, device="cpu", progress=False)
    with pytest.raises(ValueError, match="labels"):
        evaluate_synset(x, y[:-1], ds, **kw)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        evaluate_synset(x, y + 1, ds, **kw)
    with pytest.raises(ValueError, match="match the dataset"):
        evaluate_synset(x[:, :1], y, ds, **kw)
    with pytest.raises(ValueError, match="match the dataset"):
        evaluate_synset(torch.zeros(len(y), 3, 16, 16), y, ds, **kw)
    with pytest.raises(ValueError, match="integer"):
        evaluate_synset(x, y.float(), ds, **kw)
    with pytest.raises(ValueError, match="empty"):
        evaluate_synset(x[:0], y[:0], ds, **kw)


def test_reference_schedule_epoch_plus_one_and_lr_drop(monkeypatch):
    # The reference trains Epoch + 1 passes and, after pass Epoch // 2 + 1,
    # multiplies the lr by 0.1 with a NEW optimizer (momentum restarts).
    import fastfair.evaluate as ev
    from fastfair.nets import get_network

    made, passes = [], []
    real_sgd = torch.optim.SGD

    def spy(params, lr, **kw):
        made.append((lr, len(passes)))
        return real_sgd(params, lr=lr, **kw)

    monkeypatch.setattr(torch.optim, "SGD", spy)
    net = get_network("ConvNet", 3, 2, 16, **NET)
    net.register_forward_hook(lambda *_: passes.append(1))
    ds = _dataset()
    for epochs in (1, 4, 7):
        made.clear(), passes.clear()
        ev.train_network(net, ds.train.images[:8], ds.train.labels[:8], epochs, 256, 0.01, False,
                         torch.Generator().manual_seed(0), torch.device("cpu"))
        assert len(passes) == epochs + 1  # one batch per pass
        drop = epochs // 2 + 1
        assert made[0] == (0.01, 0)
        if drop <= epochs:  # a drop after the last pass would change nothing
            assert len(made) == 2 and made[1][0] == pytest.approx(0.001) and made[1][1] == drop + 1
    assert ev.lr_drop_epoch(1000) == 501


def test_method_protocol_and_cell_outputs():
    from fastfair.evaluate import method_protocol

    assert method_protocol("dm") == (1000, True) and method_protocol("dsa") == (1000, True)
    assert method_protocol("dc") == (300, False) and method_protocol(None) == (1000, True)
    # The preset decides: COBRA evaluates DM 1500 epochs, DC 1000 without augmentation.
    assert method_protocol("dm", "cobra") == (1500, True) and method_protocol("dc", "cobra") == (1000, False)
    assert method_protocol("dc", "fairdd") == (300, False)
    with pytest.raises(ValueError, match="unknown preset"):
        method_protocol("dm", "kip")
    ds = _dataset()
    res = evaluate_synset(ds.train.images, ds.train.labels, ds, epochs=2, runs=2, progress=False,
                          net_kwargs=NET, method="dc")
    assert res["epochs"] == 2 and res["dsa"] is False
    assert len(res["cell_acc"]) == 2 and len(res["cell_acc"][0]) == 2 and len(res["cell_acc_std"]) == 2
    runs = res["runs"]
    for c in range(2):
        for a in range(2):
            assert res["cell_acc"][c][a] == pytest.approx(sum(r["cell_acc"][c][a] for r in runs) / 2)
    assert res["worst_group_acc"] == pytest.approx(sum(min(min(row) for row in r["cell_acc"]) for r in runs) / 2)
    assert res["worst_group_acc"] <= res["acc"] + 1e-9
    default = evaluate_synset(ds.train.images, ds.train.labels, ds, epochs=1, runs=1, progress=False,
                              net_kwargs=NET, method="dm")
    assert default["dsa"] is True


def test_preset_decides_the_number_of_runs():
    from fastfair.evaluate import preset_runs

    assert preset_runs() == preset_runs("fairdd") == 10 and preset_runs("cobra") == 5
    ds = _dataset()
    res = evaluate_synset(ds.train.images, ds.train.labels, ds, epochs=1, progress=False, net_kwargs=NET,
                          method="dc", preset="cobra")
    assert len(res["runs"]) == 5 and res["dsa"] is False
    for k in ("suf_m", "suf_a", "suf_m_std"):
        assert 0.0 <= res[k] <= 100.0
