"""fastfair: fair dataset distillation (FairDD, COBRA) at the cost of vanilla DM/DC.

The per-(class, group) statistics behind the fair objectives are computed in one
pass by custom ops (``fastfair.ops``); the distillation driver, datasets, networks
and evaluation live in the sub-modules and are imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from . import ops

__version__ = "0.1.0"

_SUBMODULES = {
    "augment", "data", "distill", "distributed", "evaluate", "metrics",
    "nets", "nn", "objectives", "pergroup", "cli",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `import fastfair` stays cheap and never pulls in torchvision,
    # scikit-learn or matplotlib unless the caller needs them.
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastfair' has no attribute {name!r}")


__all__ = ["ops", "__version__", *sorted(_SUBMODULES)]
