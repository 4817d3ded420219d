"""Biased datasets: every split carries a class label and a protected group.

    >>> from fastfair import data
    >>> ds = data.load("cdigits-fg")          # embedded, no download
    >>> ds.train.images.shape, ds.num_groups
    (torch.Size([1258, 3, 32, 32]), 10)

Datasets (``names()``; recipes in docs/datasets.md):

=====================  ===================================  =====================
name                   classes / groups                     source under ``root``
=====================  ===================================  =====================
cmnist-fg, cmnist-bg   digit / 10 colours                   MNIST/raw/*-ubyte
cfmnist-fg, cfmnist-bg garment / 10 colours                 FashionMNIST/raw/*-ubyte
cifar10-s              object / {grayscale, colour}         cifar-10-batches-py/
celeba                 Attractive / Male (or Male,Young)    celeba/
utkface                age bucket / race (or race,gender)   UTKFace/
bffhq                  age / gender                         bffhq/{0.5pct,test}/
imagenet-subset-s      10 ImageNet classes / {gray, colour} imagenet/{train,val}/
tinyimagenet-s         200 classes / {grayscale, colour}    tiny-imagenet-200/
cdigits-fg, cdigits-bg digit / 10 colours                   none (scikit-learn's digits)
cmnist-fgbg            digit / fg colour x bg colour        MNIST/raw/*-ubyte
cfmnist-fgbg           garment / fg colour x bg colour      FashionMNIST/raw/*-ubyte
cdigits-fgbg           digit / fg colour x bg colour        none (scikit-learn's digits)
synthetic              any / any                            none (generated)
=====================  ===================================  =====================

Images are float32 [N, C, S, S] normalised with the dataset's ``mean`` /
``std`` (``BiasedDataset.denormalize`` maps them back to [0, 1]). Training
bias is drawn from ``seed`` with local generators (bitwise reproducible);
test sets are balanced over (class, group) cells and do not depend on the
seed. Datasets read from files are cached under root/fastfair_cache/.
The ``*-fgbg`` sets carry two protected attributes (``ds.attributes``;
fastfair.attributes): the group id is their mixed-radix intersection.
"""
from __future__ import annotations

from .bias import COLOUR_NAMES, COLOURS
from .core import BiasedDataset, Split
from .registry import load, names

__all__ = ["BiasedDataset", "COLOURS", "COLOUR_NAMES", "Split", "load", "names"]
