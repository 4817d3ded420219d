"""The embedded default and the synthetic dataset (no download)."""
from __future__ import annotations

import pytest
import torch

from fastfair import data


def test_cdigits_cells_full_and_biased():
    ds = data.load("cdigits-fg")
    tr, te = ds.train, ds.test
    assert tr.images.shape[1:] == (3, 32, 32) and tr.images.dtype == torch.float32
    assert ds.num_classes == 10 and ds.num_groups == 10
    # Every (class, colour) test cell is non-empty, the colours of a class equally often.
    cells = torch.bincount(te.labels * 10 + te.groups, minlength=100).view(10, 10)
    assert (cells > 0).all() and (cells == cells[:, :1]).all()
    # Training majority colour = class for ~90% of each class.
    frac = (tr.groups == tr.labels).float().mean().item()
    assert 0.85 <= frac <= 0.95
    # FG: a painted pixel carries its group's colour, background is black (-1 after norm).
    img = ds.denormalize(tr.images[:50])
    colours = torch.tensor(data.COLOURS, dtype=torch.float32)[tr.groups[:50]] / 255
    lit = img.amax(1) > 0
    assert lit.any(dim=(1, 2)).all()
    for i in range(50):
        px = img[i][:, lit[i]]
        assert torch.allclose(px, colours[i].view(3, 1).expand_as(px), atol=1e-6)


def test_cdigits_bg_paints_background():
    ds = data.load("cdigits-bg")
    img = ds.denormalize(ds.train.images[:5])
    assert (img[:, :, 0, 0].sum(1) > 0).all()  # the corner is background


def test_same_seed_same_data_and_other_seed_differs():
    a, b, c = data.load("cdigits-fg", seed=1), data.load("cdigits-fg", seed=1), data.load("cdigits-fg", seed=2)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.train.groups, b.train.groups)
    assert not torch.equal(a.train.groups, c.train.groups)


def test_synthetic_scales_and_skews():
    ds = data.load("synthetic", num_classes=100, num_groups=10, image_size=16, n_per_class=20)
    assert ds.train.images.shape == (2000, 3, 16, 16)
    assert ds.num_classes == 100 and ds.num_groups == 10
    major = (ds.train.groups == ds.train.labels % 10).float().mean().item()
    assert major == pytest.approx(0.9, abs=0.02)
    cells = torch.bincount(ds.test.labels * 10 + ds.test.groups, minlength=1000)
    assert (cells == cells[0]).all() and cells[0] > 0


def test_errors():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("mnist-colourful")
    with pytest.raises(ValueError, match="bias_ratio"):
        data.load("cdigits-fg", bias_ratio=1.5)
    assert "cdigits-fg" in data.names()
