"""Datasets that need no download.

``cdigits-fg`` / ``cdigits-bg``: the 1797 handwritten 8x8 digits that ship
inside scikit-learn, upscaled to 28x28, padded to 32x32 as the reference pads
MNIST (4 px top and left) and coloured with the C-MNIST colours at bias ratio
BR. Its train colours use the EVEN recipe (the nine minority colours share the
rest, counts differing by at most one), not the reference's ceil-sized chunks:
a class has only ~125 training digits, so the chunks (2 each) would leave two
minority colours of every class without a single training image. Every test
digit is rendered in all ten colours, so every (class, colour) test cell is
full (the reference's BR = 0.1 test recipe would leave cells of one or two
digits).

``synthetic``: class x group prototype images plus noise, any number of
classes and groups, generated in a few vectorised calls (benchmarks, scale
tests).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .bias import colourise, generator, skewed_groups
from .core import Raw
from .mnist import coloured, pad32

# The train/test split of cdigits is fixed (not drawn from the user's seed).
SPLIT_SEED = 0
TRAIN_FRACTION = 0.7


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] in 0..16, labels [1797]). Read from the CSV file
    inside the scikit-learn package: ``import sklearn.datasets`` alone costs
    over a second, the file takes a fraction of that."""
    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz") if spec else ""
    if spec and os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # the file moved: the public API

    d = load_digits()
    return d.images, d.target.astype(np.int64)


def _stratified_split(labels: Tensor, fraction: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    train, test = [], []
    for c in range(int(labels.max()) + 1):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        k = int(round(fraction * idx.numel()))
        train.append(idx[:k])
        test.append(idx[k:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(test)).values


def _cdigits_gray() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits upscaled to 28x28 and padded to 32x32 as the reference pads
    MNIST (uint8 [N, 32, 32]), their labels, and the fixed train / test rows."""
    images, target = _digits()
    img = torch.tensor(images, dtype=torch.float32) * (255.0 / 16.0)
    img = F.interpolate(img.unsqueeze(1), size=(28, 28), mode="bilinear", align_corners=False).squeeze(1)
    gray = pad32(img.round().clamp(0, 255).to(torch.uint8), "reference")
    labels = torch.from_numpy(target)
    tr, te = _stratified_split(labels, TRAIN_FRACTION, generator(SPLIT_SEED, "cdigits-split"))
    return gray, labels, tr, te


def load_cdigits(background: bool, bias_ratio: float, seed: int) -> Raw:
    gray, labels, tr, te = _cdigits_gray()
    mode = "bg" if background else "fg"
    raw = coloured(gray[tr], labels[tr], gray[te], labels[te], mode, bias_ratio, seed,
                   [str(i) for i in range(10)], recipe="even")
    # Every test digit in every colour: test N = 10 x the number of test digits.
    colours = torch.arange(10).repeat(te.numel())
    raw.test_images = colourise(gray[te].repeat_interleave(10, 0), colours, mode)
    raw.test_labels = labels[te].repeat_interleave(10)
    raw.test_groups = colours
    return raw


def load_synthetic(bias_ratio: float, seed: int, num_classes: int, num_groups: int, image_size: int,
                   channels: int, n_per_class: int, n_test_per_cell: int) -> Raw:
    """Image = class pattern + 0.7 x group pattern + 0.3 x N(0, 1) noise; the
    patterns are smooth (bilinear upsampling of a coarse Gaussian grid), so
    both class and group are learnable by a small ConvNet. Train: class c's
    majority group is c mod G for a fraction BR of its ``n_per_class`` rows.
    Test: ``n_test_per_cell`` images of every (class, group) cell."""
    for key, value, low in (("num_classes", num_classes, 1), ("num_groups", num_groups, 1),
                            ("image_size", image_size, 1), ("channels", channels, 1),
                            ("n_per_class", n_per_class, 1), ("n_test_per_cell", n_test_per_cell, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"synthetic: {key} must be an integer >= {low}, got {value!r}")
    from ..sizes import check_fits

    rows = num_classes * (n_per_class + num_groups * n_test_per_cell)
    check_fits(4.0 * rows * channels * image_size ** 2,
               f"synthetic: {rows} images of {channels}x{image_size}x{image_size} (num_classes={num_classes}, "
               f"n_per_class={n_per_class}, image_size={image_size})")
    gen = generator(seed, "synthetic")
    coarse = max(4, image_size // 8)

    def smooth(n: int) -> Tensor:
        z = torch.randn(n, channels, coarse, coarse, generator=gen)
        return F.interpolate(z, size=(image_size, image_size), mode="bilinear", align_corners=False)

    class_patterns, group_patterns = smooth(num_classes), smooth(num_groups)

    def render(labels: Tensor, groups: Tensor) -> Tensor:
        out = torch.randn(labels.numel(), channels, image_size, image_size, generator=gen).mul_(0.3)
        out.add_(class_patterns.index_select(0, labels))
        return out.add_(group_patterns.index_select(0, groups), alpha=0.7)

    tr_labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    tr_groups = skewed_groups(tr_labels, torch.arange(num_classes) % num_groups, num_groups, bias_ratio, gen)
    te_labels = torch.arange(num_classes).repeat_interleave(num_groups * n_test_per_cell)
    te_groups = torch.arange(num_groups).repeat_interleave(n_test_per_cell).repeat(num_classes)
    return Raw(
        render(tr_labels, tr_groups), tr_labels, tr_groups,
        render(te_labels, te_groups), te_labels, te_groups,
        class_names=[f"class{i}" for i in range(num_classes)],
        group_names=[f"group{i}" for i in range(num_groups)],
        mean=(0.0,) * channels, std=(1.0,) * channels, normalised=True,
    )


def load_cdigits_fgbg(bias_ratio: float, seed: int, fg_colours: int = 4, bg_colours: int = 4,
                      fg_bias: float | None = None, bg_bias: float | None = None,
                      min_test_per_cell: int = 20) -> Raw:
    """cdigits with digit colour AND background colour (mnist.fgbg; the even
    recipe, as cdigits: a class has ~125 training digits). 4 x 4 colours by
    default (10 x 10 would render 54 000 test images for 20 per cell)."""
    from .mnist import fgbg

    gray, labels, tr, te = _cdigits_gray()
    return fgbg(gray[tr], labels[tr], gray[te], labels[te], False, fg_colours, bg_colours,
                bias_ratio if fg_bias is None else float(fg_bias), bias_ratio if bg_bias is None else float(bg_bias),
                seed, [str(i) for i in range(10)], recipe="even", min_test_per_cell=min_test_per_cell)
