"""CIFAR10-S: CIFAR-10 with a grayscale / colour skew (FairDD paper;
docs/datasets.md).

Source files: torchvision's layout, root/cifar-10-batches-py/{data_batch_1..5,
test_batch, batches.meta} (Python pickles of {'data': uint8 [N, 3072] as R,
G, B planes of 32x32, 'labels': [N]}). Classes 0-4 are grayscale for a
fraction BR of their training images, classes 5-9 in colour for a fraction
BR; the test set holds every test image twice, grayscale and in colour.
Groups: 0 grayscale, 1 colour. Grayscale images stay 3-channel.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from .bias import GRAY_GROUPS, grayscale_skew
from .core import Raw, missing_files, torchvision_for_download
from .safe_pickle import load_batch

FOLDER = "cifar-10-batches-py"
TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
TEST = ["test_batch"]
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# CIFAR-10 statistics used by the DC / DM code family.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)


def _read_batches(folder: str, names: list[str]) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for name in names:
        path = os.path.join(folder, name)
        entry = load_batch(path)
        if not isinstance(entry, dict) or "data" not in entry or not ({"labels", "fine_labels"} & set(entry)):
            raise ValueError(f"{path}: not a CIFAR batch (expected a dict with 'data' and 'labels')")
        data, labs = entry["data"], entry.get("labels", entry.get("fine_labels"))
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{path}: 'data' must be a uint8 array [N, 3072], got "
                             f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
        try:
            labs = np.asarray(labs, dtype=np.int64)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: 'labels' must be a list of ints") from None
        if labs.shape != (data.shape[0],):
            raise ValueError(f"{path}: {data.shape[0]} images but labels of shape {labs.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(labs)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_cifar10_s(root: str, bias_ratio: float, seed: int, download: bool) -> Raw:
    folder = os.path.join(root, FOLDER)
    expected = [os.path.join(folder, n) for n in TRAIN + TEST]
    if not all(os.path.isfile(p) for p in expected) and download:
        torchvision = torchvision_for_download()

        torchvision.datasets.CIFAR10(root, train=True, download=True)
    missing = [p for p in expected if not os.path.isfile(p)]
    if missing:
        raise missing_files("CIFAR10", missing, f"Pass download=True to fetch CIFAR-10 with torchvision into {root}.")
    tr_img, tr_lab = _read_batches(folder, TRAIN)
    te_img, te_lab = _read_batches(folder, TEST)
    if tr_lab.numel() and (tr_lab.min() < 0 or tr_lab.max() > 9):
        raise ValueError(f"{folder}: CIFAR-10 labels must be 0..9")
    class_names = CLASS_NAMES
    meta = os.path.join(folder, "batches.meta")
    if os.path.isfile(meta):
        entry = load_batch(meta)
        names = entry.get("label_names", CLASS_NAMES) if isinstance(entry, dict) else None
        if not isinstance(names, list) or len(names) != 10 or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{meta}: 'label_names' must be a list of 10 strings")
        class_names = names
    parts = grayscale_skew(tr_img, tr_lab, te_img, te_lab, 10, bias_ratio, seed)
    return Raw(*parts, class_names=class_names, group_names=list(GRAY_GROUPS), mean=MEAN, std=STD)
