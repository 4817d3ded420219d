"""Injecting the spurious correlation: which group each image gets, and how
the group is drawn into the pixels (colour, grayscale).

All randomness comes from local generators derived from the user's seed and a
named stream, never from the global RNG, so a load is reproducible bitwise and
independent of whatever else the process has drawn.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

# C-MNIST colour map (RGB), index = colour = majority colour of that class
# (FairDD paper, Sec. 5; docs/datasets.md).
COLOURS = [
    (255, 0, 0), (255, 128, 0), (255, 255, 0), (255, 255, 128), (0, 255, 0),
    (0, 255, 255), (0, 0, 255), (128, 0, 255), (255, 0, 255), (255, 255, 255),
]
COLOUR_NAMES = ["red", "orange", "yellow", "light yellow", "green", "cyan", "blue",
                "violet", "magenta", "white"]

# Test sets do not depend on the user's seed, so metrics of runs with
# different seeds are measured on the same images.
TEST_SEED = 0


def generator(seed: int, stream: str) -> torch.Generator:
    """A torch generator for one named purpose; distinct streams of one seed
    are independent (the seed and the name are hashed together)."""
    digest = hashlib.sha256(f"{int(seed)}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _class_ranks(labels: Tensor, num_classes: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Shuffle the rows within each class: returns (order, rank, counts) where
    ``order`` lists row indices sorted by class (random within a class) and
    ``rank[i]`` is the position of ``order[i]`` inside its class."""
    n = labels.numel()
    perm = torch.randperm(n, generator=gen)
    order = perm[torch.argsort(labels[perm], stable=True)]
    counts = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[labels[order]]
    return order, rank, counts


def skewed_groups(labels: Tensor, majority: Tensor, num_groups: int, bias_ratio: float,
                  gen: torch.Generator) -> Tensor:
    """The even bias-ratio recipe: in class c a fraction ``bias_ratio`` of
    the rows (rounded) gets group ``majority[c]``; the rest are spread evenly
    over the other groups (counts differ by at most one, the groups that get
    the extra rows chosen at random). Vectorised over classes. C-MNIST's
    default is :func:`reference_groups` (the reference's floor / ceil
    chunks); this one keeps every minority group present in a small class
    (cdigits, the synthetic dataset, CIFAR10-S's two groups).
    """
    labels = labels.to(torch.int64)
    majority = majority.to(torch.int64)
    if labels.numel() == 0:
        return labels.clone()
    order, rank, counts = _class_ranks(labels, majority.numel(), gen)
    cls = labels[order]
    n_major = torch.floor(counts.to(torch.float64) * bias_ratio + 0.5).to(torch.int64)
    major = majority[cls]
    if num_groups == 1:
        sorted_groups = major
    else:
        shift = torch.randint(0, num_groups - 1, (majority.numel(),), generator=gen)
        offset = (rank - n_major[cls] + shift[cls]) % (num_groups - 1)
        minority = (major + 1 + offset) % num_groups
        sorted_groups = torch.where(rank < n_major[cls], major, minority)
    groups = torch.empty_like(labels)
    groups[order] = sorted_groups
    return groups


def reference_groups(labels: Tensor, majority: Tensor, num_groups: int, bias_ratio: float,
                     gen: torch.Generator) -> Tensor:
    """The C-MNIST recipe of the FairDD reference (colour_mnist.py;
    docs/datasets.md): in class c, ``floor(bias_ratio * n)`` rows (in
    a random order) get group ``majority[c]``; the other groups, in a shuffled
    order, take the rest in chunks of ``ceil(rest / (num_groups - 1))`` rows,
    so the last groups of the order may get fewer rows or none. The test set
    uses the same recipe with ``bias_ratio`` 0.1.
    """
    labels = labels.to(torch.int64)
    groups = torch.empty_like(labels)
    for c in range(majority.numel()):
        rows = (labels == c).nonzero().flatten()
        rows = rows[torch.randperm(rows.numel(), generator=gen)]
        n = rows.numel()
        major = int(majority[c])
        k = int(math.floor(n * bias_ratio + 1e-9))  # the reference's int(n * ratio), robust to 0.9 * 10
        groups[rows[:k]] = major
        others = torch.tensor([g for g in range(num_groups) if g != major], dtype=torch.int64)
        if others.numel() == 0:
            groups[rows[k:]] = major
            continue
        others = others[torch.randperm(others.numel(), generator=gen)]
        chunk = math.ceil((n - k) / others.numel())
        for j, g in enumerate(others.tolist()):
            groups[rows[k + j * chunk:k + (j + 1) * chunk]] = g
    return groups


def balanced_groups(labels: Tensor, num_classes: int, num_groups: int, gen: torch.Generator) -> Tensor:
    """Every group equally often within each class (counts differ by at most
    one when the class size is not a multiple of the number of groups)."""
    labels = labels.to(torch.int64)
    if labels.numel() == 0:
        return labels.clone()
    order, rank, _ = _class_ranks(labels, num_classes, gen)
    shift = torch.randint(0, num_groups, (num_classes,), generator=gen)
    groups = torch.empty_like(labels)
    groups[order] = (rank + shift[labels[order]]) % num_groups
    return groups


def colourise(gray: Tensor, colours: Tensor, mode: str) -> Tensor:
    """Paint grayscale images with one colour each.

    gray: uint8 [N, H, W]; colours: [N] indices into COLOURS.
    mode 'fg': pixels >= 128 get the colour, the rest black;
         'bg': pixels < 128 get the colour, the rest (the object) black;
         'fg-scaled': every pixel is the colour scaled by its intensity,
                      rounded (fastfair's former C-FMNIST FG, recipe "even");
         'fmnist-fg', 'fmnist-bg': the FairDD reference's C-FMNIST
                      colourings (:func:`_fmnist_reference`).
    Returns uint8 [N, 3, H, W].
    """
    if mode in ("fmnist-fg", "fmnist-bg"):
        return _fmnist_reference(gray, colours, background=mode == "fmnist-bg")
    rgb = torch.tensor(COLOURS, dtype=torch.int32)[colours.to(torch.int64)].view(-1, 3, 1, 1)
    g = gray.to(torch.int32).unsqueeze(1)
    if mode == "fg":
        out = (g >= 128).to(torch.int32) * rgb
    elif mode == "bg":
        out = (g < 128).to(torch.int32) * rgb
    elif mode == "fg-scaled":
        out = (rgb * g + 127) // 255  # round(colour * gray / 255) in integers
    else:
        raise ValueError(f"unknown colouring mode {mode!r}")
    return out.to(torch.uint8)


def _fmnist_reference(gray: Tensor, colours: Tensor, background: bool) -> Tensor:
    """C-FMNIST as FairDD's data_handler/FashionMNIST.py builds it, float32
    operation for operation so the bytes are equal.

    A pixel of intensity g in colour c is a blend ``start + t * (end - start)``
    times 255, truncated to a byte:
    FG: start = 0, end = c / 255, t = g / 255, i.e. the colour scaled by the
    intensity and truncated (not rounded).
    BG: end = c / 255, t = (255 - g) / 255, and start = 255 (not 1: the
    reference's start colour is left in 0..255 while the end colour is in
    0..1). The background (g = 0) gets the colour; an object pixel gets
    255 * g + t * c, far outside a byte, which the reference's ``.byte()``
    wraps modulo 256 (a float-to-uint8 cast of an out-of-range value: x86
    CPUs, where the reference builds its data, truncate then keep the low
    byte). The garment therefore carries a wrapped, colour-dependent texture
    rather than a black silhouette; the wrap is written out here so the
    result does not depend on the platform's cast.
    """
    g = gray.to(torch.float32).unsqueeze(1)  # [N, 1, H, W]
    end = torch.tensor(COLOURS, dtype=torch.float32)[colours.to(torch.int64)].view(-1, 3, 1, 1) / 255.0
    if background:
        t = (255.0 - g) / 255.0
        start = torch.tensor(255.0, dtype=torch.float32)
    else:
        t = g / 255.0
        start = torch.tensor(0.0, dtype=torch.float32)
    blend = start + t * (end - start)
    return torch.remainder((blend * 255).to(torch.int64), 256).to(torch.uint8)


# Background colours of the two-attribute sets: the C-MNIST colours at 40%
# brightness, so a digit (full colour) stays visible on any background,
# its own hue included (fastfair's choice; no paper defines these sets).
BG_SHADE = 0.4


def bg_palette() -> list[tuple[int, int, int]]:
    return [tuple(int(round(BG_SHADE * v)) for v in c) for c in COLOURS]


def colourise_fgbg(gray: Tensor, fg: Tensor, bg: Tensor, blend: bool) -> Tensor:
    """Paint the object in colour ``fg`` AND the background in the dark
    colour ``bg`` (indices into COLOURS and :func:`bg_palette`).

    blend False (C-MNIST): pixels >= 128 are the object, the rest background;
    blend True (C-FMNIST, whose garments carry texture): every pixel mixes
    the two by its intensity, (g fg + (255 - g) bg) / 255, rounded.
    gray uint8 [N, H, W] -> uint8 [N, 3, H, W].
    """
    f = torch.tensor(COLOURS, dtype=torch.int32)[fg.to(torch.int64)].view(-1, 3, 1, 1)
    b = torch.tensor(bg_palette(), dtype=torch.int32)[bg.to(torch.int64)].view(-1, 3, 1, 1)
    g = gray.to(torch.int32).unsqueeze(1)
    if blend:
        out = (g * f + (255 - g) * b + 127) // 255
    else:
        out = torch.where(g >= 128, f, b)
    return out.to(torch.uint8)


def combination_test(labels: Tensor, sizes: tuple[int, int], renders: int) -> tuple[Tensor, Tensor, Tensor]:
    """A test set over every (class, fg, bg) cell: test image j of a class is
    rendered ``renders`` times, in combinations ``(j * renders + t) mod G``
    (G = K_fg x K_bg), so each cell of a class gets within one image of
    ``n_class * renders / G`` images. Returns (source row, fg, bg) per
    rendered image."""
    labels = labels.to(torch.int64)
    G = sizes[0] * sizes[1]
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(labels.numel()) - starts[labels[order]]
    rows = torch.arange(labels.numel()).repeat_interleave(renders)
    combo = (rank.repeat_interleave(renders) * renders + torch.arange(renders).repeat(labels.numel())) % G
    return rows, torch.div(combo, sizes[1], rounding_mode="floor"), combo % sizes[1]


def to_grayscale(images: Tensor) -> Tensor:
    """uint8 RGB [N, 3, H, W] -> uint8 gray kept 3-channel, with ITU-R 601-2
    luma in the same fixed-point arithmetic as PIL's ``convert('L')``."""
    x = images.to(torch.int32)
    lum = (x[:, 0] * 19595 + x[:, 1] * 38470 + x[:, 2] * 7471 + 0x8000) >> 16
    return lum.to(torch.uint8).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


GRAY_GROUPS = ["grayscale", "colour"]


def grayscale_skew(train_images: Tensor, train_labels: Tensor, test_images: Tensor,
                   test_labels: Tensor, num_classes: int, bias_ratio: float, seed: int
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The CIFAR10-S recipe (FairDD paper; docs/methods.md): the first half of
    the classes is grayscale for a fraction BR of its training images, the
    second half in colour for a fraction BR; every test image appears twice,
    grayscale (group 0) and in colour (group 1).
    Returns train (images, labels, groups) and test (images, labels, groups).
    """
    majority = (torch.arange(num_classes) >= num_classes // 2).to(torch.int64)
    groups = skewed_groups(train_labels, majority, 2, bias_ratio, generator(seed, "grayscale-skew"))
    gray = groups == 0
    train = train_images.clone()
    if gray.any():
        train[gray] = to_grayscale(train_images[gray])
    n = test_labels.numel()
    test = torch.cat([to_grayscale(test_images), test_images])
    test_groups = torch.cat([torch.zeros(n, dtype=torch.int64), torch.ones(n, dtype=torch.int64)])
    return train, train_labels, groups, test, test_labels.repeat(2), test_groups
