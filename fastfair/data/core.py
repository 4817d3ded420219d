"""The dataset containers and the step from stored pixels to normalised tensors.

Loaders build a :class:`Raw` (uint8 pixels, or float pixels for the
generated ``synthetic`` set); :func:`finish` turns it into the public
:class:`BiasedDataset`. The cache stores ``Raw`` as is, so a cached dataset
costs a quarter of the float32 size on disk.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..attributes import Attributes


@dataclass
class Split:
    images: Tensor  # [N, C, H, W] float32, normalised with the dataset's mean / std
    labels: Tensor  # [N] int64 class
    groups: Tensor  # [N] int64 protected-attribute group

    def __len__(self) -> int:
        return int(self.labels.numel())


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
    # The protected attributes whose intersection the groups are
    # (fastfair.attributes); None: one attribute, "group", whose values are
    # the group names.
    attributes: Attributes | None = None

    def __post_init__(self) -> None:
        if self.attributes is None or (len(self.attributes.names) == 1
                                       and self.attributes.num_groups != self.num_groups):
            # One attribute: its values are the group names (also after a
            # dataclasses.replace that regroups the data).
            self.attributes = Attributes.single(self.group_names)
        if self.attributes.num_groups != self.num_groups:
            raise ValueError(f"{self.name}: the attributes' {self.attributes.num_groups} intersectional groups "
                             f"do not match num_groups = {self.num_groups}")

    def denormalize(self, images: Tensor) -> Tensor:
        """Normalised images back to [0, 1] (for saving grids)."""
        m = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        s = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return (images * s + m).clamp(0, 1)


@dataclass
class Raw:
    """What a loader produces and the cache stores.

    ``*_images`` are uint8 [N, C, H, W] in 0..255, or float32 already
    normalised (``normalised=True``, the generated datasets).
    """

    train_images: Tensor
    train_labels: Tensor
    train_groups: Tensor
    test_images: Tensor
    test_labels: Tensor
    test_groups: Tensor
    class_names: list[str]
    group_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalised: bool = False
    # [(attribute name, [value names]), ...] when the groups are the
    # intersection of several attributes (fastfair.attributes); None: one.
    attributes: list | None = None

    _OPTIONAL = ("normalised", "attributes")

    def to_state(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if not k.startswith("_")}

    @classmethod
    def from_state(cls, state: dict) -> "Raw":
        fields = [k for k in cls.__dataclass_fields__ if not k.startswith("_")]
        missing = set(fields) - set(state) - set(cls._OPTIONAL)
        if missing:
            raise KeyError(f"cached dataset lacks {sorted(missing)}")
        return cls(**{k: state[k] for k in fields if k in state})


def _to_float(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...], normalised: bool) -> Tensor:
    if normalised:
        return images.to(torch.float32)
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {images.dtype}")
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.to(torch.float32) / 255.0 - m) / s


def finish(name: str, raw: Raw) -> BiasedDataset:
    """Check a loader's output and normalise it into a BiasedDataset."""
    for split in ("train", "test"):
        img, lab, grp = (getattr(raw, f"{split}_{k}") for k in ("images", "labels", "groups"))
        if img.dim() != 4 or img.shape[2] != img.shape[3]:
            raise ValueError(f"{name}: {split} images must be [N, C, S, S], got {tuple(img.shape)}")
        if not (img.shape[0] == lab.numel() == grp.numel()):
            raise ValueError(f"{name}: {split} images / labels / groups lengths differ")
    channels, size = int(raw.train_images.shape[1]), int(raw.train_images.shape[2])
    if len(raw.mean) != channels or len(raw.std) != channels:
        raise ValueError(f"{name}: mean / std need {channels} entries")

    def split(prefix: str) -> Split:
        return Split(
            _to_float(getattr(raw, f"{prefix}_images"), raw.mean, raw.std, raw.normalised),
            getattr(raw, f"{prefix}_labels").to(torch.int64),
            getattr(raw, f"{prefix}_groups").to(torch.int64),
        )

    return BiasedDataset(
        name=name, train=split("train"), test=split("test"),
        num_classes=len(raw.class_names), num_groups=len(raw.group_names),
        channels=channels, image_size=size,
        class_names=list(raw.class_names), group_names=list(raw.group_names),
        mean=tuple(float(v) for v in raw.mean), std=tuple(float(v) for v in raw.std),
        attributes=Attributes.from_list(raw.attributes) if raw.attributes else None,
    )


def missing_files(dataset: str, expected: list[str], hint: str) -> FileNotFoundError:
    """The error for absent source files: what was looked for, where, and how
    to get it."""
    lines = "\n  ".join(expected)
    return FileNotFoundError(f"{dataset}: expected files not found:\n  {lines}\n{hint}")


def torchvision_for_download() -> object:
    """torchvision, which only ``download=True`` needs (the ``download`` extra)."""
    try:
        import torchvision
    except ImportError as exc:
        raise ValueError(f"downloading a dataset needs torchvision, which does not import here ({exc}); "
                         "pip install 'fastfair[download]', or place the files by hand") from None
    return torchvision
