"""The dataset registry: names, their options, and ``load``.

Every loader module is imported lazily, inside its builder, so that
``import fastfair.data`` costs no more than torch (no torchvision, PIL or
scikit-learn until a dataset that needs them is loaded).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import cache
from .core import BiasedDataset, Raw, finish

DEFAULT_ROOT_ENV = "FASTFAIR_DATA"


@dataclass(frozen=True)
class Spec:
    build: Callable[..., Raw]  # keyword arguments: root, bias_ratio, seed, download, **options
    options: dict[str, Any] = field(default_factory=dict)  # accepted options and their defaults
    uses_bias: bool = True  # bias_ratio / seed change the output (part of the cache key)
    files: bool = True  # reads files under root, cached there


def _cmnist(source: str, background: bool) -> Spec:
    def build(root: str, bias_ratio: float, seed: int, download: bool, recipe: str = "reference") -> Raw:
        from .mnist import load_coloured

        return load_coloured(source, background, root, bias_ratio, seed, download, recipe)

    # recipe: "reference" (FairDD's colour_mnist.py) or "even" (fastfair's former one); data/mnist.py
    return Spec(build, options={"recipe": "reference"})


_FGBG_OPTIONS = {"fg_colours": 10, "bg_colours": 10, "fg_bias": None, "bg_bias": None, "min_test_per_cell": 50}


def _fgbg(source: str) -> Spec:
    def build(root: str, bias_ratio: float, seed: int, download: bool, **o: Any) -> Raw:
        from .mnist import load_fgbg

        return load_fgbg(source, root, bias_ratio, seed, download, **o)

    # Two protected attributes (digit / garment colour and background colour); data/mnist.py fgbg.
    return Spec(build, options=dict(_FGBG_OPTIONS))


def _cdigits_fgbg(root: str | None, bias_ratio: float, seed: int, download: bool, **o: Any) -> Raw:
    from .embedded import load_cdigits_fgbg

    return load_cdigits_fgbg(bias_ratio, seed, **o)


def _cifar10_s(root: str, bias_ratio: float, seed: int, download: bool) -> Raw:
    from .cifar import load_cifar10_s

    return load_cifar10_s(root, bias_ratio, seed, download)


def _celeba(root: str, bias_ratio: float, seed: int, download: bool, **o: Any) -> Raw:
    from .faces import load_celeba

    return load_celeba(root, download, **o)


def _utkface(root: str, bias_ratio: float, seed: int, download: bool, **o: Any) -> Raw:
    from .faces import load_utkface

    return load_utkface(root, **o)


def _bffhq(root: str, bias_ratio: float, seed: int, download: bool, **o: Any) -> Raw:
    from .faces import load_bffhq

    return load_bffhq(root, **o)


def _imagenet_subset(root: str, bias_ratio: float, seed: int, download: bool, **o: Any) -> Raw:
    from .imagenet import load_imagenet_subset

    return load_imagenet_subset(root, bias_ratio=bias_ratio, seed=seed, **o)


def _tinyimagenet(root: str, bias_ratio: float, seed: int, download: bool) -> Raw:
    from .imagenet import load_tinyimagenet_s

    return load_tinyimagenet_s(root, bias_ratio, seed)


def _cdigits(background: bool) -> Spec:
    def build(root: str | None, bias_ratio: float, seed: int, download: bool) -> Raw:
        from .embedded import load_cdigits

        return load_cdigits(background, bias_ratio, seed)

    return Spec(build, files=False)


def _synthetic(root: str | None, bias_ratio: float, seed: int, download: bool, **o: Any) -> Raw:
    from .embedded import load_synthetic

    return load_synthetic(bias_ratio, seed, **o)


SPECS: dict[str, Spec] = {
    "cmnist-fg": _cmnist("mnist", False),
    "cmnist-bg": _cmnist("mnist", True),
    "cfmnist-fg": _cmnist("fmnist", False),
    "cfmnist-bg": _cmnist("fmnist", True),
    "cifar10-s": Spec(_cifar10_s),
    "celeba": Spec(_celeba, {"target_attr": "Attractive", "group_attr": "Male", "image_size": 64}, uses_bias=False),
    "utkface": Spec(_utkface, {"n_test_per_cell": 100, "image_size": 64, "group_attr": "race"}, uses_bias=False),
    "bffhq": Spec(_bffhq, {"image_size": 64}, uses_bias=False),
    "imagenet-subset-s": Spec(_imagenet_subset, {"subset": "nette", "resolution": 64, "imagenet_dir": None}),
    "tinyimagenet-s": Spec(_tinyimagenet),
    "cmnist-fgbg": _fgbg("mnist"),
    "cfmnist-fgbg": _fgbg("fmnist"),
    "cdigits-fgbg": Spec(_cdigits_fgbg, {**_FGBG_OPTIONS, "fg_colours": 4, "bg_colours": 4,
                                         "min_test_per_cell": 20}, files=False),
    "cdigits-fg": _cdigits(False),
    "cdigits-bg": _cdigits(True),
    "synthetic": Spec(_synthetic, {"num_classes": 10, "num_groups": 10, "image_size": 32, "channels": 3,
                                   "n_per_class": 100, "n_test_per_cell": 5}, files=False),
}


# The DC/DM code family's dataset names (as FairDD's and COBRA's scripts spell
# them), so that their command lines work unchanged. Case-sensitive, like
# theirs: a near miss ("celeba" vs "CelebA") is a canonical name or an error,
# never a guess.
ALIASES: dict[str, str] = {
    "Colored_MNIST_foreground": "cmnist-fg",
    "Colored_MNIST_background": "cmnist-bg",
    "Colored_FashionMNIST_foreground": "cfmnist-fg",
    "Colored_FashionMNIST_background": "cfmnist-bg",
    "CIFAR10_S_90": "cifar10-s",
    "CelebA": "celeba",
    "UTKface": "utkface",
    "BFFHQ": "bffhq",
}


def names() -> list[str]:
    """Every dataset ``load`` knows, by its canonical name (``ALIASES`` lists
    the other spellings it accepts)."""
    return sorted(SPECS)


def canonical_name(name: str) -> str:
    """The canonical name of an alias; any other string unchanged."""
    return ALIASES.get(name, name)


def default_root() -> str:
    return os.environ.get(DEFAULT_ROOT_ENV) or "data"


def load(name: str, root: str | None = None, bias_ratio: float = 0.9, download: bool = False,
         seed: int = 0, **options: Any) -> BiasedDataset:
    """Load a biased dataset (see the package docstring for the list).

    root: folder holding the source files in torchvision's layout (None:
        $FASTFAIR_DATA, else ./data; unused by cdigits-* and synthetic).
        Processed tensors are cached in root/fastfair_cache/.
    bias_ratio: fraction of a class's training images in its majority group
        (ignored by celeba, utkface and bffhq, whose bias is the data's own).
    download: let torchvision fetch missing MNIST, FashionMNIST, CIFAR10 or CelebA.
    seed: draws the training bias; the same seed gives bitwise the same
        dataset. Test sets do not depend on it.
    options: per-dataset options (a ValueError lists them); ``cache=False``
        bypasses the cache for any dataset.
    """
    name = canonical_name(name)
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(names())} "
                         f"(or the DC/DM family's names {', '.join(ALIASES)})")
    spec = SPECS[name]
    if isinstance(bias_ratio, bool) or not isinstance(bias_ratio, (int, float)) or not 0.0 <= bias_ratio <= 1.0:
        raise ValueError(f"bias_ratio must be a number in [0, 1], got {bias_ratio!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    use_cache = options.pop("cache", True)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        accepted = ", ".join(sorted(spec.options)) or "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {name!r}; accepted: {accepted} (and cache)")
    opts = {**spec.options, **options}
    bias_ratio = float(bias_ratio)
    if not spec.files:
        return finish(name, spec.build(root=root, bias_ratio=bias_ratio, seed=seed, download=download, **opts))

    root = os.fspath(root) if root is not None else default_root()
    key: dict[str, Any] = {"options": opts}
    if spec.uses_bias:
        key.update(bias_ratio=bias_ratio, seed=seed)
    path = cache.cache_path(root, name, key)
    raw = cache.read(path) if use_cache else None
    if raw is None:
        raw = spec.build(root=root, bias_ratio=bias_ratio, seed=seed, download=download, **opts)
        if use_cache:
            cache.write(path, raw)
    return finish(name, raw)
