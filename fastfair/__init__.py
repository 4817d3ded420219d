"""fastfair: fair dataset distillation (FairDD, COBRA) at the cost of vanilla DM/DC.

The per-(class, group) statistics behind the fair objectives are computed in one
pass by custom ops (``fastfair.ops``); the distillation driver, datasets, networks
and evaluation live in the sub-modules and are imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "ops", "augment", "data", "distill", "distributed", "evaluate", "metrics",
    "nets", "nn", "objectives", "pergroup", "cli", "choices", "report",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `import fastfair` stays cheap: no torch until a module that
    # needs it is touched (the CLI parses arguments and prints --help without
    # it), and no torchvision, scikit-learn or matplotlib unless the caller
    # needs them.
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastfair' has no attribute {name!r}")


__all__ = ["__version__", *sorted(_SUBMODULES)]
