"""The log after a resume equals the uninterrupted run's, also when the run
stopped inside a logging window (issue 13.13)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastfair import data, distill
from fastfair.distill import loop

OPTS = {"num_classes": 3, "num_groups": 2, "image_size": 8, "n_per_class": 20}
BASE = distill.DistillConfig(dataset="synthetic", ipc=2, width=8, depth=2, batch_real=8, log_every=3,
                             checkpoint_every=100, iterations=6, extra={"data_options": OPTS})


@pytest.fixture(scope="module")
def runs():
    ds = data.load("synthetic", **OPTS)
    return ds, distill.run(BASE, ds, device="cpu", progress=False)


def losses(log):
    return [(e["iteration"], e["loss"]) for e in log if "loss" in e]


def test_ctrl_c_inside_a_window(runs, tmp_path, monkeypatch):
    ds, full = runs
    real, calls = loop.dm_iteration, {"n": 0}

    def step(*a):
        calls["n"] += 1
        if calls["n"] == 5:  # iterations 1-4 finished: iteration 4 is inside the window 4-6
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(loop, "dm_iteration", step)
    with pytest.raises(KeyboardInterrupt):
        distill.run(BASE, ds, out_dir=str(tmp_path), device="cpu", progress=False)
    monkeypatch.setattr(loop, "dm_iteration", real)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["iteration"] == 4
    res = distill.run(BASE, ds, out_dir=str(tmp_path), device="cpu", progress=False, resume=True)
    assert torch.equal(res.images, full.images)
    assert losses(res.log) == losses(full.log)


def test_extending_a_finished_run(runs, tmp_path):
    ds, full = runs
    distill.run(dataclasses.replace(BASE, iterations=4), ds, out_dir=str(tmp_path), device="cpu", progress=False)
    res = distill.run(BASE, ds, out_dir=str(tmp_path), device="cpu", progress=False, resume=True)
    assert torch.equal(res.images, full.images)
    # the shorter run's closing line at 4 stays; every line of the longer run is the uninterrupted one
    assert [x for x in losses(res.log) if x[0] != 4] == losses(full.log)
