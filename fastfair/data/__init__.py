"""Biased datasets: every split carries a class label and a protected group.

The embedded default (``cdigits-fg`` / ``cdigits-bg``) needs no download: the
handwritten digits that ship inside scikit-learn, coloured with the C-MNIST
recipe (FairDD paper, Sec. 5; REFERENCE.md). ``synthetic`` builds any number of
classes x groups for scale tests and benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

# C-MNIST colour map (RGB), index = colour = majority colour of that class.
COLOURS = [
    (255, 0, 0), (255, 128, 0), (255, 255, 0), (255, 255, 128), (0, 255, 0),
    (0, 255, 255), (0, 0, 255), (128, 0, 255), (255, 0, 255), (255, 255, 255),
]
COLOUR_NAMES = ["red", "orange", "yellow", "light yellow", "green", "cyan", "blue",
                "violet", "magenta", "white"]


@dataclass
class Split:
    images: Tensor  # [N, C, H, W] float32, normalised
    labels: Tensor  # [N] int64
    groups: Tensor  # [N] int64


@dataclass
class BiasedDataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    num_groups: int
    channels: int
    image_size: int
    class_names: list[str]
    group_names: list[str]
    mean: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))
    std: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))

    def denormalize(self, images: Tensor) -> Tensor:
        m = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        s = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return (images * s + m).clamp(0, 1)


def biased_groups(labels: Tensor, num_groups: int, bias_ratio: float, gen: torch.Generator) -> Tensor:
    """Class c's majority group is c mod G for a fraction BR of its rows; the
    rest are spread evenly over the other groups."""
    groups = torch.empty_like(labels)
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_major = int(round(bias_ratio * idx.numel()))
        major = c % num_groups
        others = [g for g in range(num_groups) if g != major] or [major]
        rest = torch.tensor(others).repeat(idx.numel() // len(others) + 1)[: idx.numel() - n_major]
        groups[idx[:n_major]] = major
        groups[idx[n_major:]] = rest[torch.randperm(rest.numel(), generator=gen)]
    return groups


def colourise(gray: Tensor, colours: Tensor, background: bool) -> Tensor:
    """gray [N, H, W] in 0..255, colours [N] -> [N, 3, H, W] in [0, 1]."""
    rgb = torch.tensor(COLOURS, dtype=torch.float32)[colours] / 255.0  # [N, 3]
    fg = (gray >= 128).unsqueeze(1).float()
    mask = 1.0 - fg if background else fg
    return mask * rgb.view(-1, 3, 1, 1)


def _cdigits(background: bool, bias_ratio: float, seed: int) -> BiasedDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    img = torch.tensor(d.images, dtype=torch.float32) * (255.0 / 16.0)
    img = F.interpolate(img.unsqueeze(1), size=(28, 28), mode="bilinear", align_corners=False).squeeze(1)
    img = F.pad(img, (2, 2, 2, 2))
    labels = torch.tensor(d.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    # Stratified 70/30 split with a fixed seed.
    train_idx, test_idx = [], []
    for c in range(10):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        k = int(round(0.7 * idx.numel()))
        train_idx.append(idx[:k])
        test_idx.append(idx[k:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    tr_groups = biased_groups(labels[tr], 10, bias_ratio, gen)
    tr_img = colourise(img[tr], tr_groups, background)
    # Every test digit in every colour: each (class, colour) cell is full.
    te_colours = torch.arange(10).repeat(te.numel())
    te_img = colourise(img[te].repeat_interleave(10, 0), te_colours, background)
    norm = lambda x: (x - 0.5) / 0.5  # noqa: E731
    return BiasedDataset(
        name=f"cdigits-{'bg' if background else 'fg'}",
        train=Split(norm(tr_img), labels[tr], tr_groups),
        test=Split(norm(te_img), labels[te].repeat_interleave(10), te_colours),
        num_classes=10, num_groups=10, channels=3, image_size=32,
        class_names=[str(i) for i in range(10)], group_names=list(COLOUR_NAMES),
    )


def _synthetic(bias_ratio: float, seed: int, num_classes: int = 10, num_groups: int = 10,
               image_size: int = 32, channels: int = 3, n_per_class: int = 100,
               n_test_per_cell: int = 5) -> BiasedDataset:
    gen = torch.Generator().manual_seed(seed)
    low = max(4, image_size // 8)
    def smooth(n: int) -> Tensor:
        z = torch.randn(n, channels, low, low, generator=gen)
        return F.interpolate(z, size=(image_size, image_size), mode="bilinear", align_corners=False)
    cls_p, grp_p = smooth(num_classes), smooth(num_groups)
    def make(labels: Tensor, groups: Tensor) -> Tensor:
        noise = 0.3 * torch.randn(labels.numel(), channels, image_size, image_size, generator=gen)
        return cls_p[labels] + 0.7 * grp_p[groups] + noise
    tr_labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    tr_groups = biased_groups(tr_labels, num_groups, bias_ratio, gen)
    te_labels = torch.arange(num_classes).repeat_interleave(num_groups * n_test_per_cell)
    te_groups = torch.arange(num_groups).repeat_interleave(n_test_per_cell).repeat(num_classes)
    c = channels
    return BiasedDataset(
        name="synthetic",
        train=Split(make(tr_labels, tr_groups), tr_labels, tr_groups),
        test=Split(make(te_labels, te_groups), te_labels, te_groups),
        num_classes=num_classes, num_groups=num_groups, channels=c, image_size=image_size,
        class_names=[f"class{i}" for i in range(num_classes)],
        group_names=[f"group{i}" for i in range(num_groups)],
        mean=(0.0,) * c, std=(1.0,) * c,
    )


_LOADERS = {
    "cdigits-fg": lambda br, seed, **o: _cdigits(False, br, seed, **o),
    "cdigits-bg": lambda br, seed, **o: _cdigits(True, br, seed, **o),
    "synthetic": lambda br, seed, **o: _synthetic(br, seed, **o),
}


def names() -> list[str]:
    return sorted(_LOADERS)


def load(name: str, root: str | None = None, bias_ratio: float = 0.9, download: bool = False,
         seed: int = 0, **options) -> BiasedDataset:
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(names())}")
    if not 0.0 <= bias_ratio <= 1.0:
        raise ValueError(f"bias_ratio must lie in [0, 1], got {bias_ratio}")
    try:
        return _LOADERS[name](bias_ratio, seed, **options)
    except TypeError as exc:
        raise ValueError(f"bad options for {name!r}: {exc}") from None
