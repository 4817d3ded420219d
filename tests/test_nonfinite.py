"""A run whose loss or images stop being finite ends with one error and
writes nothing of the non-finite state (issue 13.6); eval refuses such sets
(13.7)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from fastfair import data, distill
from fastfair.distill import loop

OPTS = {"num_classes": 3, "num_groups": 2, "image_size": 8, "n_per_class": 20}
TINY = dict(dataset="synthetic", ipc=2, width=8, depth=2, batch_real=8,
            extra={"data_options": OPTS})


@pytest.fixture(scope="module")
def ds():
    return data.load("synthetic", **OPTS)


@pytest.mark.parametrize("what", ["images", "loss"])
def test_non_finite_step_stops_and_keeps_the_last_checkpoint(ds, tmp_path, monkeypatch, what):
    real = loop.dm_iteration

    def step(ctx, images, buf, it):
        new, b, loss = real(ctx, images, buf, it)
        if it == 2:  # the third iteration goes bad
            if what == "images":
                new = new.clone()
                new[0, 0, 0, 0] = float("nan")
            else:
                loss = loss * float("inf")
        return new, b, loss

    monkeypatch.setattr(loop, "dm_iteration", step)
    cfg = distill.DistillConfig(**TINY, iterations=6, checkpoint_every=2, log_every=4)
    with pytest.raises(loop.NonFiniteError, match="non-finite.*between iterations 2 and 4.*--lr-img"):
        distill.run(cfg, ds, out_dir=str(tmp_path), device="cpu", progress=False)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["iteration"] == 2 and torch.isfinite(ck["images"]).all()
    assert not (tmp_path / "synset.pt").exists() and not list(tmp_path.glob("*.tmp*"))
    assert (tmp_path / "log.jsonl").read_text() == ""  # the window of iterations 1-4 was never logged


def test_no_out_dir_still_refuses(ds, monkeypatch):
    cfg = distill.DistillConfig(**TINY, iterations=2, lr_img=float("inf"))
    with pytest.raises(loop.NonFiniteError):
        distill.run(cfg, ds, device="cpu", progress=False)


@pytest.mark.parametrize("lr", ["inf", "1e30"])
def test_cli_lr_img_blowup_exits_2(tmp_path, lr):
    r = subprocess.run([sys.executable, "-m", "fastfair", "distill", "--dataset", "cdigits-fg", "--ipc", "1",
                        "--iterations", "3", "--batch-real", "4", "--width", "8", "--depth", "1",
                        "--lr-img", lr, "--out", str(tmp_path), "--no-progress", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "non-finite" in lines[0], r.stderr
    assert not (tmp_path / "synset.pt").exists()
    for line in (tmp_path / "log.jsonl").read_text().splitlines():
        assert math.isfinite(json.loads(line)["loss"])
