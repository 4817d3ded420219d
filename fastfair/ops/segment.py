"""segment_sum / segment_mean / segment_count / segment_ids: per-segment
reductions of rows (docs/ops.md), with their autograd and fake kernels."""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import _after_kernel, _check_args, _check_same_device
from ._dispatch import _LOADED, _use_kernel
from ._reference import _segment_count_reference, _segment_mean_reference, _segment_sum_reference


def _gather_segment_rows(grad: Tensor, ids: Tensor, num_segments: int, *, ids_checked: bool | None = None) -> Tensor:
    """grad[ids] (each row receives its segment's gradient), where a row with
    an id outside [0, num_segments) receives zeros.

    index_select keeps this differentiable for double backward. Off the CPU an
    out-of-range id (possible under validate_ids(False): the forward skipped
    the row and recorded the error) must not reach index_select, whose device
    assert would poison the CUDA context: such rows read an appended zero row.
    CPU forwards have raised already (``ids_checked`` defaults to that).
    """
    if ids_checked is None:
        ids_checked = ids.device.type == "cpu"
    if ids_checked:
        return grad.index_select(0, ids)
    safe = torch.where((ids >= 0) & (ids < num_segments), ids, num_segments)
    padded = torch.cat([grad, grad.new_zeros((1,) + tuple(grad.shape[1:]))])
    return padded.index_select(0, safe)


if _LOADED:

    @torch.library.register_fake("fastfair::segment_sum")
    def _segment_sum_fake(x: Tensor, ids: Tensor, num_segments: int) -> Tensor:
        _check_same_device("segment_sum", x=x, ids=ids)
        return x.new_empty((num_segments, x.shape[1]))

    @torch.library.register_fake("fastfair::segment_mean")
    def _segment_mean_fake(x: Tensor, ids: Tensor, num_segments: int) -> Tensor:
        _check_same_device("segment_mean", x=x, ids=ids)
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
        return _gather_segment_rows(grad_out, ids, ctx.num_segments), None, None

    def _segment_mean_backward(ctx, grad_out: Tensor):  # noqa: ANN001
        (ids,) = ctx.saved_tensors
        count = torch.ops.fastfair.segment_count(ids, ctx.num_segments)
        scale = count.clamp(min=1).to(grad_out.dtype).unsqueeze(1)
        return _gather_segment_rows(grad_out / scale, ids, ctx.num_segments), None, None

    torch.library.register_autograd(
        "fastfair::segment_sum", _segment_sum_backward, setup_context=_setup_segment
    )
    torch.library.register_autograd(
        "fastfair::segment_mean", _segment_mean_backward, setup_context=_setup_segment
    )


def _call_kernel(op, x: Tensor, ids: Tensor, num_segments) -> Tensor:  # noqa: ANN001
    """op(x, ids, num_segments), below autograd when no gradient is recorded:
    register_autograd routes every call through a Python autograd kernel
    (~3 us), which at the DC bias shapes (2560 x 128, a 45 us call) was the
    difference to scatter_reduce_ (benchmarks/NOTES.md "CPU segment ops, v4").
    Python dispatch modes and tensor subclasses still see the call (only the
    autograd keys are skipped); a traced graph keeps the plain call."""
    if torch.is_grad_enabled() and x.requires_grad or torch.compiler.is_compiling():
        return op(x, ids, num_segments)
    with torch._C._AutoDispatchBelowAutograd():
        return op(x, ids, num_segments)


# ---------------------------------------------------------------------------
# Public API.

def segment_sum(x: Tensor, ids: Tensor, num_segments: int) -> Tensor:
    """Row sums per segment: out[s] = sum of x[i] over i with ids[i] == s.

    x: [N, D] float32/float64/float16/bfloat16 (any strides); ids: [N] int32 or
    int64, any order. Returns [num_segments, D] in x's dtype. Differentiable in x.
    """
    num_segments = _check_args(x, ids, num_segments, "segment_sum")
    if _use_kernel("segment_sum", x, ids):
        out = _call_kernel(torch.ops.fastfair.segment_sum, x, ids, num_segments)
        _after_kernel(x.device, "segment_sum")
        return out
    return _segment_sum_reference(x, ids, num_segments)


def segment_mean(x: Tensor, ids: Tensor, num_segments: int) -> Tensor:
    """Row means per segment; an empty segment gives a zero row (never NaN)."""
    num_segments = _check_args(x, ids, num_segments, "segment_mean")
    if _use_kernel("segment_mean", x, ids):
        out = _call_kernel(torch.ops.fastfair.segment_mean, x, ids, num_segments)
        _after_kernel(x.device, "segment_mean")
        return out
    return _segment_mean_reference(x, ids, num_segments)


def segment_count(ids: Tensor, num_segments: int) -> Tensor:
    """Number of rows per segment, int64 [num_segments]."""
    num_segments = _check_args(None, ids, num_segments, "segment_count")
    if _use_kernel("segment_count", ids):
        out = torch.ops.fastfair.segment_count(ids, num_segments)
        _after_kernel(ids.device, "segment_count")
        return out
    return _segment_count_reference(ids, num_segments)


def segment_ids(labels: Tensor, groups: Tensor, num_classes: int, num_groups: int) -> Tensor:
    """``label * num_groups + group`` as int64, and -1 wherever the label or
    the group is out of range, so that the ops' own range check refuses the
    row (on every device, without a host sync here). Computed in int64 after
    the range test, so no label wraps into a valid segment (an int32 label
    2^30 with 4 groups would be 0 in int32)."""
    lab, grp = labels.long(), groups.long()
    ok = (lab >= 0) & (lab < num_classes) & (grp >= 0) & (grp < num_groups)
    return torch.where(ok, lab * num_groups + grp, torch.full_like(lab, -1))
