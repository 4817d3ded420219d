"""C-MNIST and C-FMNIST (FG / BG): MNIST or Fashion-MNIST coloured with a
class-correlated colour (FairDD paper, Sec. 5; docs/datasets.md).

Source files: torchvision's on-disk layout, root/MNIST/raw/*-ubyte and
root/FashionMNIST/raw/*-ubyte (plain or .gz), read directly as IDX files.
The default ``recipe="reference"`` builds the sets as the FairDD reference
(colour_mnist.py) does: train: class c gets colour c for floor(BR n) of its
n images, the other nine colours take the rest in ceil-sized chunks in a
shuffled colour order (drawn from ``seed``); test: the same recipe with
BR = 0.1 (nearly balanced; a fixed draw, the same for every seed). 28x28 is
padded to 32x32 with 4 px at the top and left and none at the bottom and
right (digit centre at (18, 18), as the reference pads). ``recipe="even"``
is the former fastfair recipe: the minority colours spread evenly (counts
differ by at most one), every colour exactly equally often in each test
class, and 2 px padding on every side. 3 channels, mean = std = 0.5.

C-FMNIST's colouring under ``recipe="reference"`` is FairDD's
FashionMNIST.py byte for byte (bias._fmnist_reference): FG scales the colour
by the intensity and truncates; BG paints the background and leaves the
garment a wrapped, colour-dependent texture (the reference's blend starts
from 255 where 1 was meant). ``recipe="even"`` keeps fastfair's former
C-FMNIST: rounded scaled FG, thresholded BG (background < 128 painted, the
garment black).
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .bias import COLOUR_NAMES, TEST_SEED, balanced_groups, colourise, generator, reference_groups, skewed_groups
from .core import Raw, missing_files, torchvision_for_download

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FOLDERS = {"mnist": "MNIST", "fmnist": "FashionMNIST"}
IMAGE_SHAPE = (28, 28)  # both datasets
CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fmnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot"],
}


# The largest IDX body read (MNIST's train images are 47 MB): the header's
# claim is checked against it before a byte of the body is decompressed, so a
# gzip bomb cannot fill the memory.
MAX_IDX_BYTES = 1 << 30


def read_idx(path: str, ndim: int | None = None) -> np.ndarray:
    """An IDX file (the MNIST format): a big-endian header, magic 0x0000TTNN
    with TT = 0x08 for unsigned bytes and NN the number of dimensions, NN
    uint32 sizes, then the data. Plain or gzip. A damaged file (truncated,
    garbage, a broken .gz, ``ndim`` dimensions expected but others found, a
    body larger than its header says or than MAX_IDX_BYTES) is a ValueError
    naming it. Reads at most the header's size plus one byte."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise ValueError(f"{path}: not an IDX file (too short)")
            zero, dtype, nd = struct.unpack(">HBB", head)
            if zero != 0 or dtype != 0x08:
                raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {head.hex()})")
            if ndim is not None and nd != ndim:
                raise ValueError(f"{path}: an IDX file of {nd} dimensions, expected {ndim}")
            sizes = f.read(4 * nd)
            if len(sizes) < 4 * nd:
                raise ValueError(f"{path}: truncated IDX header ({4 + len(sizes)} bytes for {nd} dimensions)")
            dims = struct.unpack(f">{nd}I", sizes)
            want = math.prod(dims)
            if want > MAX_IDX_BYTES:
                raise ValueError(f"{path}: header says {dims} ({want} bytes), more than the {MAX_IDX_BYTES} "
                                 "an MNIST-family file holds")
            data = f.read(want + 1)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read ({type(exc).__name__}: {exc}); the file is damaged, "
                         "delete it and fetch it again") from None
    if len(data) != want:
        raise ValueError(f"{path}: header says {dims} but holds {'more than ' if len(data) > want else ''}"
                         f"{min(len(data), want)} bytes (truncated or damaged)")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _find(raw_dir: str, stem: str) -> str | None:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(raw_dir, candidate)
        if os.path.isfile(path):
            return path
    return None


def _download(root: str, source: str) -> None:
    torchvision = torchvision_for_download()

    cls = torchvision.datasets.MNIST if source == "mnist" else torchvision.datasets.FashionMNIST
    cls(root, train=True, download=True)
    cls(root, train=False, download=True)


def read_split(root: str, source: str, split: str, download: bool) -> tuple[Tensor, Tensor]:
    """uint8 images [N, 28, 28] and int64 labels [N] of one split."""
    raw_dir = os.path.join(root, FOLDERS[source], "raw")
    stems = FILES[split]
    paths = [_find(raw_dir, s) for s in stems]
    if None in paths and download:
        _download(root, source)
        paths = [_find(raw_dir, s) for s in stems]
    if None in paths:
        raise missing_files(
            f"{FOLDERS[source]} ({split})", [os.path.join(raw_dir, s) + "[.gz]" for s in stems],
            f"Pass download=True to fetch {FOLDERS[source]} with torchvision into {root}.")
    images, labels = read_idx(paths[0], ndim=3), read_idx(paths[1], ndim=1)
    if images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"{paths[0]}: {FOLDERS[source]} images are {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}, this file "
                         f"holds {images.shape[1]}x{images.shape[2]}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{paths[0]}: {images.shape[0]} images but {paths[1]} holds {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{paths[1]}: labels must be 0..9")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


RECIPES = ("reference", "even")
# The reference's test colours: its train recipe at this bias ratio.
TEST_BIAS_RATIO = 0.1


def pad32(gray: Tensor, recipe: str = "reference") -> Tensor:
    """28x28 -> 32x32 with black (background) padding: 4 px top and left, 0
    bottom and right (the reference) or 2 px on every side (``"even"``)."""
    if recipe == "reference":
        return F.pad(gray, (4, 0, 4, 0))  # (left, right, top, bottom)
    if recipe == "even":
        return F.pad(gray, (2, 2, 2, 2))
    raise ValueError(f"unknown C-MNIST recipe {recipe!r}; choose one of {', '.join(RECIPES)}")


def coloured(train_gray: Tensor, train_labels: Tensor, test_gray: Tensor, test_labels: Tensor,
             mode: str, bias_ratio: float, seed: int, class_names: list[str], recipe: str = "reference") -> Raw:
    """The C-MNIST colouring on padded uint8 grayscale images (shared with
    cdigits): colour assignment by ``recipe`` (module docstring)."""
    if recipe == "reference":
        train_groups = reference_groups(train_labels, torch.arange(10), 10, bias_ratio, generator(seed, "colour"))
        test_groups = reference_groups(test_labels, torch.arange(10), 10, TEST_BIAS_RATIO,
                                       generator(TEST_SEED, "test-colour"))
    elif recipe == "even":
        train_groups = skewed_groups(train_labels, torch.arange(10), 10, bias_ratio, generator(seed, "colour"))
        test_groups = balanced_groups(test_labels, 10, 10, generator(TEST_SEED, "test-colour"))
    else:
        raise ValueError(f"unknown C-MNIST recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return Raw(
        colourise(train_gray, train_groups, mode), train_labels, train_groups,
        colourise(test_gray, test_groups, mode), test_labels, test_groups,
        class_names=class_names, group_names=list(COLOUR_NAMES),
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    )


def load_coloured(source: str, background: bool, root: str, bias_ratio: float, seed: int,
                  download: bool, recipe: str = "reference") -> Raw:
    tr_img, tr_lab = read_split(root, source, "train", download)
    te_img, te_lab = read_split(root, source, "test", download)
    if source == "fmnist" and recipe == "reference":
        # FairDD's FashionMNIST.py: FG scales the colour by the intensity, BG
        # blends with its start-colour slip (bias._fmnist_reference).
        mode = "fmnist-bg" if background else "fmnist-fg"
    elif source == "fmnist":
        # fastfair's former C-FMNIST: rounded scaled FG, thresholded BG.
        mode = "bg" if background else "fg-scaled"
    else:
        mode = "bg" if background else "fg"
    return coloured(pad32(tr_img, recipe), tr_lab, pad32(te_img, recipe), te_lab, mode, bias_ratio, seed,
                    CLASS_NAMES[source], recipe)


# --------------------------------------------------------------------------- two protected attributes

def fgbg(train_gray: Tensor, train_labels: Tensor, test_gray: Tensor, test_labels: Tensor, blend: bool,
         fg_colours: int, bg_colours: int, fg_bias: float, bg_bias: float, seed: int, class_names: list[str],
         recipe: str = "reference", min_test_per_cell: int = 50) -> Raw:
    """Object colour AND background colour, each biased toward a class value
    (class c: colour c mod K of each attribute), drawn independently, so the
    class's majority intersection holds about fg_bias x bg_bias of it
    (fastfair's sets; no paper defines them). Groups: g = fg * K_bg + bg.
    Test: every test image rendered in enough (fg, bg) combinations that each
    (class, intersectional group) cell holds at least ``min_test_per_cell``
    images where the class has them (bias.combination_test)."""
    from .bias import colourise_fgbg, combination_test

    for what, k in (("fg_colours", fg_colours), ("bg_colours", bg_colours)):
        if not isinstance(k, int) or not 1 <= k <= len(COLOUR_NAMES):
            raise ValueError(f"{what} must be an integer in [1, {len(COLOUR_NAMES)}], got {k!r}")
    for what, r in (("fg_bias", fg_bias), ("bg_bias", bg_bias)):
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"{what} must be in [0, 1], got {r!r}")
    C = len(class_names)
    draw = reference_groups if recipe == "reference" else skewed_groups
    fg = draw(train_labels, torch.arange(C) % fg_colours, fg_colours, fg_bias, generator(seed, "fg-colour"))
    bg = draw(train_labels, torch.arange(C) % bg_colours, bg_colours, bg_bias, generator(seed, "bg-colour"))
    G = fg_colours * bg_colours
    smallest = int(torch.bincount(test_labels, minlength=C).min())
    renders = min(G, max(1, math.ceil(min_test_per_cell * G / max(1, smallest))))
    rows, tfg, tbg = combination_test(test_labels, (fg_colours, bg_colours), renders)
    shade = [f"dark {n}" for n in COLOUR_NAMES]
    return Raw(
        colourise_fgbg(train_gray, fg, bg, blend), train_labels, fg * bg_colours + bg,
        colourise_fgbg(test_gray[rows], tfg, tbg, blend), test_labels[rows], tfg * bg_colours + tbg,
        class_names=class_names,
        group_names=[f"{a}/{b}" for a in COLOUR_NAMES[:fg_colours] for b in shade[:bg_colours]],
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        attributes=[("fg", list(COLOUR_NAMES[:fg_colours])), ("bg", shade[:bg_colours])],
    )


def load_fgbg(source: str, root: str, bias_ratio: float, seed: int, download: bool, fg_colours: int = 10,
              bg_colours: int = 10, fg_bias: float | None = None, bg_bias: float | None = None,
              min_test_per_cell: int = 50) -> Raw:
    tr_img, tr_lab = read_split(root, source, "train", download)
    te_img, te_lab = read_split(root, source, "test", download)
    return fgbg(pad32(tr_img), tr_lab, pad32(te_img), te_lab, source == "fmnist", fg_colours, bg_colours,
                bias_ratio if fg_bias is None else float(fg_bias), bias_ratio if bg_bias is None else float(bg_bias),
                seed, CLASS_NAMES[source], min_test_per_cell=min_test_per_cell)
