"""Sizes, datasets and distillation configs of the step-time benchmark
(:mod:`fastfair.bench.step_time`): what is timed, not how."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import BiasedDataset, Split
from ..distill.config import DistillConfig, resolve

DATASETS = ("cdigits-fg", "synthetic", "cmnist-fgbg", "cdigits-fgbg")
# What --dataset both runs (cmnist-fgbg needs the real MNIST files: --root).
DEFAULT_DATASETS = ("cdigits-fg", "synthetic")
METHODS = ("dm", "dc")
# (impl, objective) in plotting order.
IMPLS = (("vanilla", "vanilla"), ("loop", "fairdd"), ("fastfair", "fairdd"), ("fastfair", "cobra"))


@dataclass(frozen=True)
class Scale:
    classes: int       # synthetic only (cdigits has 10)
    batch: int         # real images per class per step
    image_size: int    # synthetic only (cdigits is 32 px)
    width: int
    ipc: int
    real_chunk: int | None = None  # rows per network pass over the real batch (fastfair rows)
    dc_block_classes: int | None = None  # DC: classes matched per block (fastfair rows); None: the driver's


def depth_for(image_size: int) -> int:
    """ConvNet depth that pools the image down to 4x4 (3 at 32 px, 4 at 64 px)."""
    return max(1, round(math.log2(image_size)) - 2)


def base_dataset(name: str, scale: Scale, device: torch.device, root: str | None = None) -> BiasedDataset:
    if name in ("cdigits-fg", "cdigits-fgbg", "cmnist-fgbg"):
        from .. import data

        ds = data.load(name, root=root)  # cmnist-fgbg reads the real MNIST there; the others are embedded
        tr = ds.train
        return dataclasses.replace(ds, train=Split(tr.images.to(device), tr.labels, tr.groups))
    if name == "synthetic":
        c, b, s = scale.classes, scale.batch, scale.image_size
        gen = torch.Generator(device=device).manual_seed(0)
        # Generated where it is used: no 1.3 GB host copy at full scale.
        images = torch.randn(c * b, 3, s, s, generator=gen, device=device)
        labels = torch.arange(c).repeat_interleave(b)
        split = Split(images, labels, torch.zeros_like(labels))
        return BiasedDataset(name="synthetic", train=split, test=split, num_classes=c, num_groups=1, channels=3,
                             image_size=s, class_names=[str(i) for i in range(c)], group_names=["0"])
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def natural_groups(base: BiasedDataset) -> dict[int, tuple[Tensor, str]]:
    """The group labels a dataset has of itself, by group count, with how
    they were made. One attribute: its values. Several (cmnist-fgbg: digit
    colour x background colour, 10 x 10): the first attribute alone, the
    intersection, and the intersection x a uniformly random 10-valued extra
    attribute (no real set here has 1000 groups; the extra attribute is only
    there to give the kernels 10^4 segments of real images)."""
    g = base.train.groups
    attrs = base.attributes
    if attrs is None or len(attrs.names) == 1:
        return {base.num_groups: (g, "the dataset's groups")} if base.num_groups > 1 else {}
    rest = base.num_groups // attrs.sizes[0]  # ids are mixed radix, the first attribute most significant
    names = " x ".join(attrs.names)
    rand = torch.randint(0, 10, (len(g),), generator=torch.Generator().manual_seed(1000))
    return {attrs.sizes[0]: (g // rest, f"{attrs.names[0]} alone"),
            base.num_groups: (g, names),
            base.num_groups * 10: (g * 10 + rand, f"{names} x a random 10-valued attribute")}


def with_groups(base: BiasedDataset, groups: int, natural: dict[int, tuple[Tensor, str]] | None = None
                ) -> tuple[BiasedDataset, str]:
    """``base`` with ``groups`` groups, and where they come from: the
    dataset's own (:func:`natural_groups`) where it has that many, else
    uniformly random labels (seeded)."""
    tr = base.train
    if groups == 1:
        g, how = torch.zeros_like(tr.labels), "one group"
    elif natural and groups in natural:
        g, how = natural[groups]
    else:
        g = torch.randint(0, groups, (len(tr),), generator=torch.Generator().manual_seed(groups))
        how = "uniformly random"
    # One flat attribute of `groups` values (the FairDD objective over all of them).
    ds = dataclasses.replace(base, train=Split(tr.images, tr.labels, g), num_groups=groups,
                             group_names=[str(i) for i in range(groups)], attributes=None)
    return ds, how


def make_config(dataset: str, method: str, objective: str, scale: Scale, image_size: int,
            cobra_warmup: int) -> DistillConfig:
    warm = cobra_warmup if (method == "dm" and objective == "cobra") else None
    return resolve(DistillConfig(dataset=dataset, method=method, objective=objective, ipc=scale.ipc,
                                 batch_real=scale.batch, width=scale.width, depth=depth_for(image_size),
                                 outer_loop=1, inner_loop=1, cobra_warmup_epochs=warm, seed=0,
                                 real_chunk=scale.real_chunk, dc_block_classes=scale.dc_block_classes))
