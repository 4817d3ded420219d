"""Which implementation an op runs: the compiled kernels (fastfair._C) or
the pure-PyTorch references, decided once at import per op and device."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .._extension import load as _load_extension


# Loads fastfair._C; an extension built for another torch warns once at import
# (how to rebuild it) and the reference ops run instead.
_LOADED, _LOAD_ERROR = _load_extension("fastfair")

# A mismatched extension has said so at import already (its message starts
# with "fastfair:"); the first-use warning is for a missing one.
_warned = bool(_LOAD_ERROR and _LOAD_ERROR.startswith("fastfair:"))

_OPS = ("segment_sum", "segment_mean", "segment_count", "segment_linear_weight_grad",
        "segment_conv2d_weight_grad")


def _kernel_devices(op: str) -> frozenset[str]:
    """Device types with a compiled kernel for ``op``, resolved once at import:
    the dispatcher query is not traceable, so torch.compile must never see it."""
    if not _LOADED:
        return frozenset()
    keys = {"cpu": "CPU", "cuda": "CUDA"}
    found = {d for d, k in keys.items() if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastfair::{op}", k)}
    # The fake kernels registered below also serve meta tensors.
    return frozenset(found | {"meta"})


_KERNEL_DEVICES: dict[str, frozenset[str]] = {op: _kernel_devices(op) for op in _OPS}

def backend() -> str:
    """``"cuda"`` (compiled CPU and CUDA kernels), ``"cpu"`` (compiled CPU
    kernels only) or ``"reference"`` (pure PyTorch; the extension is missing)."""
    if not _LOADED:
        return "reference"
    return "cuda" if "cuda" in _KERNEL_DEVICES["segment_sum"] else "cpu"


def _under_func_transform(*tensors: Tensor) -> bool:
    """True inside torch.func.grad / jacrev / jvp / vmap: torch's generated
    autograd for a custom op (torch.library.register_autograd) has no
    functorch support, so the ops then run their pure-PyTorch reference (the
    same math, with torch's own derivative and batching rules)."""
    if torch.compiler.is_compiling():  # a traced graph sees plain (fake) tensors
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    for t in tensors:  # a loop, not any(<generator>): this runs on every op call
        if wrapped(t):
            return True
    return False


def _use_kernel(op: str, t: Tensor, *others: Tensor) -> bool:
    global _warned
    if _under_func_transform(t, *others):
        return False
    if t.device.type in _KERNEL_DEVICES[op]:
        return True
    if not _warned:
        _warned = True
        why = _LOAD_ERROR if not _LOADED else f"no compiled kernel for {t.device.type}"
        warnings.warn(
            f"fastfair: using the pure-PyTorch reference ops ({why}); "
            "build the extension with `pip install .` for the fast kernels",
            RuntimeWarning,
            stacklevel=3,
        )
    return False
