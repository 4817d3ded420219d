"""Python face of fastfair's custom ops: dispatch, checks, autograd, fake kernels.

The kernels live in ``csrc/`` and are registered as ``torch.ops.fastfair.*``.
When the compiled extension is missing (or has no kernel for the tensor's
device) the same functions run on pure-PyTorch reference implementations, so
``import fastfair`` never fails; :func:`backend` says which path is active.

Contracts (DESIGN.md): the caller passes ``num_segments``; ids are int32 or
int64 in any order; empty segments give zeros; half/bfloat16 accumulate in
float32; the kernels are deterministic (no atomics, fixed reduction order).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
from torch import Tensor

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)

    _LOADED = True
    _LOAD_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _LOADED = False
    _LOAD_ERROR = str(exc)

_warned = False
_validate_ids = True


def _has_kernel(op: str, key: str) -> bool:
    return _LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastfair::{op}", key)


def backend() -> str:
    """``"cuda"`` (compiled CPU and CUDA kernels), ``"cpu"`` (compiled CPU
    kernels only) or ``"reference"`` (pure PyTorch; the extension is missing)."""
    if not _LOADED:
        return "reference"
    return "cuda" if _has_kernel("segment_sum", "CUDA") else "cpu"


def _use_kernel(op: str, t: Tensor) -> bool:
    global _warned
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(t.device.type)
    if key is not None and _has_kernel(op, key):
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


@contextlib.contextmanager
def validate_ids(enabled: bool) -> Iterator[None]:
    """Turn the range check of ids on GPU tensors on or off.

    On CPU the kernels check ids as they read them, for free. On CUDA the check
    costs one device-to-host sync per call, so hot loops whose ids are in range
    by construction (the distillation driver) switch it off; the CUDA kernels
    skip out-of-range rows rather than write out of bounds either way.
    """
    global _validate_ids
    old, _validate_ids = _validate_ids, enabled
    try:
        yield
    finally:
        _validate_ids = old


def _check_args(x: Tensor | None, ids: Tensor, num_segments: int, op: str) -> None:
    if not isinstance(num_segments, int) or isinstance(num_segments, bool):
        raise TypeError(f"{op}: num_segments must be an int, got {type(num_segments).__name__}")
    if num_segments <= 0:
        raise ValueError(f"{op}: num_segments must be positive, got {num_segments}")
    if ids.dim() != 1:
        raise ValueError(f"{op}: ids must be 1-D, got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: ids must be int32 or int64, got {ids.dtype}")
    if x is not None:
        if x.dim() != 2:
            raise ValueError(f"{op}: x must be 2-D [N, D], got shape {tuple(x.shape)}")
        if x.shape[0] != ids.shape[0]:
            raise ValueError(f"{op}: x has {x.shape[0]} rows but ids has {ids.shape[0]} entries")
        if x.device != ids.device:
            raise ValueError(f"{op}: x is on {x.device} but ids is on {ids.device}")
        if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise TypeError(f"{op}: x must be a floating tensor (float32/64, float16, bfloat16), got {x.dtype}")
    # CPU kernels check the range themselves; other devices pay a sync here.
    if ids.device.type != "cpu" and _validate_ids and ids.numel() > 0:
        bad = (ids < 0) | (ids >= num_segments)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{op}: ids[{first}] = {int(ids[first])} is outside [0, num_segments = {num_segments})"
            )


# ---------------------------------------------------------------------------
# Reference implementations (float64-exact building blocks of torch ops).


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _reference_check_range(ids: Tensor, num_segments: int, op: str) -> None:
    if ids.numel() and ids.device.type == "cpu":
        bad = (ids < 0) | (ids >= num_segments)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{op}: ids[{first}] = {int(ids[first])} is outside [0, num_segments = {num_segments})"
            )


def _segment_sum_reference(x: Tensor, ids: Tensor, num_segments: int) -> Tensor:
    _reference_check_range(ids, num_segments, "segment_sum")
    acc = _acc_dtype(x.dtype)
    out = torch.zeros(num_segments, x.shape[1], dtype=acc, device=x.device)
    return out.index_add(0, ids.long(), x.to(acc)).to(x.dtype)


def _segment_count_reference(ids: Tensor, num_segments: int) -> Tensor:
    _reference_check_range(ids, num_segments, "segment_count")
    out = torch.zeros(num_segments, dtype=torch.int64, device=ids.device)
    return out.index_add(0, ids.long(), torch.ones_like(ids, dtype=torch.int64))


def _segment_mean_reference(x: Tensor, ids: Tensor, num_segments: int) -> Tensor:
    _reference_check_range(ids, num_segments, "segment_mean")
    acc = _acc_dtype(x.dtype)
    total = torch.zeros(num_segments, x.shape[1], dtype=acc, device=x.device)
    total = total.index_add(0, ids.long(), x.to(acc))
    count = _segment_count_reference(ids, num_segments).clamp(min=1).to(acc)
    return (total / count.unsqueeze(1)).to(x.dtype)


# ---------------------------------------------------------------------------
# Autograd and fake kernels of the compiled ops.

if _LOADED:

    @torch.library.register_fake("fastfair::segment_sum")
    def _segment_sum_fake(x: Tensor, ids: Tensor, num_segments: int) -> Tensor:
        return x.new_empty((num_segments, x.shape[1]))

    @torch.library.register_fake("fastfair::segment_mean")
    def _segment_mean_fake(x: Tensor, ids: Tensor, num_segments: int) -> Tensor:
        return x.new_empty((num_segments, x.shape[1]))

    @torch.library.register_fake("fastfair::segment_count")
    def _segment_count_fake(ids: Tensor, num_segments: int) -> Tensor:
        return ids.new_empty((num_segments,), dtype=torch.int64)

    def _setup_segment(ctx, inputs, output) -> None:  # noqa: ANN001
        _, ids, num_segments = inputs
        ctx.save_for_backward(ids)
        ctx.num_segments = num_segments

    def _segment_sum_backward(ctx, grad_out: Tensor):  # noqa: ANN001
        (ids,) = ctx.saved_tensors
        # Each row receives its segment's gradient; index_select keeps this
        # differentiable for double backward.
        return grad_out.index_select(0, ids), None, None

    def _segment_mean_backward(ctx, grad_out: Tensor):  # noqa: ANN001
        (ids,) = ctx.saved_tensors
        count = torch.ops.fastfair.segment_count(ids, ctx.num_segments)
        scale = count.clamp(min=1).to(grad_out.dtype).unsqueeze(1)
        return (grad_out / scale).index_select(0, ids), None, None

    torch.library.register_autograd(
        "fastfair::segment_sum", _segment_sum_backward, setup_context=_setup_segment
    )
    torch.library.register_autograd(
        "fastfair::segment_mean", _segment_mean_backward, setup_context=_setup_segment
    )


# ---------------------------------------------------------------------------
# Public API.


def segment_sum(x: Tensor, ids: Tensor, num_segments: int) -> Tensor:
    """Row sums per segment: out[s] = sum of x[i] over i with ids[i] == s.

    x: [N, D] float32/float64/float16/bfloat16 (any strides); ids: [N] int32 or
    int64, any order. Returns [num_segments, D] in x's dtype. Differentiable in x.
    """
    _check_args(x, ids, num_segments, "segment_sum")
    if _use_kernel("segment_sum", x):
        return torch.ops.fastfair.segment_sum(x, ids, num_segments)
    return _segment_sum_reference(x, ids, num_segments)


def segment_mean(x: Tensor, ids: Tensor, num_segments: int) -> Tensor:
    """Row means per segment; an empty segment gives a zero row (never NaN)."""
    _check_args(x, ids, num_segments, "segment_mean")
    if _use_kernel("segment_mean", x):
        return torch.ops.fastfair.segment_mean(x, ids, num_segments)
    return _segment_mean_reference(x, ids, num_segments)


def segment_count(ids: Tensor, num_segments: int) -> Tensor:
    """Number of rows per segment, int64 [num_segments]."""
    _check_args(None, ids, num_segments, "segment_count")
    if _use_kernel("segment_count", ids):
        return torch.ops.fastfair.segment_count(ids, num_segments)
    return _segment_count_reference(ids, num_segments)


def fair_dm_loss(
    real_emb: Tensor,
    real_labels: Tensor,
    real_groups: Tensor,
    syn_emb: Tensor,
    syn_labels: Tensor,
    num_classes: int,
    num_groups: int,
    objective: str = "fairdd",
) -> Tensor:
    """The DM matching loss of every class and group at once.

    Replaces the reference code's per-class, per-group masked means with one
    segment reduction of the real batch (all classes, all groups) and one of
    the synthetic batch. The real side is a constant; the gradient flows to
    ``syn_emb``. Objectives: ``vanilla``, ``fairdd``, ``cobra``,
    ``fairdd-iw``, ``fairdd-ldam``, ``fairdd-groupdro`` (see
    :mod:`fastfair.objectives`). Returns a scalar: the sum over classes.
    """
    from . import objectives  # objectives holds no op code; imported late to keep `import fastfair` light

    obj = objectives.get_objective(objective)
    for name, t in (("real_labels", real_labels), ("real_groups", real_groups), ("syn_labels", syn_labels)):
        if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"fair_dm_loss: {name} must be a 1-D int32/int64 tensor")
    if real_labels.shape != real_groups.shape:
        raise ValueError("fair_dm_loss: real_labels and real_groups must have the same length")
    if real_emb.dim() != 2 or syn_emb.dim() != 2 or real_emb.shape[1] != syn_emb.shape[1]:
        raise ValueError(
            f"fair_dm_loss: embeddings must be [N, D] with the same D, got "
            f"{tuple(real_emb.shape)} and {tuple(syn_emb.shape)}"
        )
    if num_classes <= 0 or num_groups <= 0:
        raise ValueError("fair_dm_loss: num_classes and num_groups must be positive")
    if real_groups.device.type == "cpu" and real_groups.numel() and bool(
        ((real_groups < 0) | (real_groups >= num_groups)).any()
    ):
        raise ValueError(f"fair_dm_loss: real_groups must lie in [0, {num_groups})")
    num_segments = num_classes * num_groups
    seg = real_labels * num_groups + real_groups
    real = real_emb.detach()
    real_sum = segment_sum(real, seg, num_segments)
    real_count = segment_count(seg, num_segments)
    syn_mean = segment_mean(syn_emb, syn_labels, num_classes)
    syn_count = segment_count(syn_labels, num_classes)
    return objectives.dm_matching_loss(real_sum, real_count, syn_mean, syn_count, num_groups, obj)
