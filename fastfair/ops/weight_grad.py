"""Segmented weight gradients (one-pass per-group DC; docs/architecture.md op 3).

segment_linear_weight_grad / segment_conv2d_weight_grad: out[s] is the SUM
over the rows i of segment s of the weight gradient of row i alone, given the
layer's input A and the gradient B at its output from one backward of the
summed per-sample losses. fastfair.pergroup divides by segment counts. Their
autograd and fake kernels, and their CUDA kernels (a vendor grouped GEMM
through fastfair.wgrad, registered here: fastfair.wgrad knows nothing of the
ops)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import wgrad
from ..wgrad import get_weight_grad_precision, set_weight_grad_precision, weight_grad_precision  # noqa: F401
from ._checks import _after_kernel, _check_conv_geometry, _check_same_device, _check_weight_grad_args, _pair
from ._dispatch import _KERNEL_DEVICES, _LOADED, _kernel_devices, _use_kernel

from ._reference import _segment_conv2d_weight_grad_reference, _segment_linear_weight_grad_reference

def _linear_wgrad_backward_terms(g: Tensor, grad_out: Tensor, inp: Tensor, ids: Tensor,
                                 need_b: bool, need_a: bool) -> tuple[Tensor | None, Tensor | None]:
    # out[s] = sum_{i in s} b_i a_i^T is bilinear: row i sees its segment's
    # incoming gradient G[s_i] (built with differentiable ops, so double
    # backward works too).
    gi = g.index_select(0, ids.long())  # [N, O, K]
    db = torch.einsum("nok,nk->no", gi, inp) if need_b else None
    da = torch.einsum("nok,no->nk", gi, grad_out) if need_a else None
    return db, da

def _conv_wgrad_backward_terms(g: Tensor, grad_out: Tensor, inp: Tensor, ids: Tensor, geom: tuple,
                               need_b: bool, need_a: bool) -> tuple[Tensor | None, Tensor | None]:
    st, pd, dl = geom
    n, ci, h, w = inp.shape
    o = grad_out.shape[1]
    if n == 0:
        return (torch.zeros_like(grad_out) if need_b else None, torch.zeros_like(inp) if need_a else None)
    # Sample i is convolved with its own segment's weight G[s_i]: one grouped
    # convolution with N groups does every sample at once.
    gi = g.index_select(0, ids.long()).reshape(n * o, ci, *g.shape[3:])
    db = da = None
    if need_b:  # d out / d B_i = the forward conv of A_i with G[s_i]
        db = F.conv2d(inp.reshape(1, n * ci, h, w), gi, None, st, pd, dl, groups=n).reshape(grad_out.shape)
    if need_a:  # d out / d A_i = the input gradient of that conv at B_i
        da = torch.nn.grad.conv2d_input(
            (1, n * ci, h, w), gi, grad_out.reshape(1, n * o, *grad_out.shape[2:]), st, pd, dl, groups=n
        ).reshape(inp.shape)
    return db, da

def _check(grad_out: Tensor, inp: Tensor, ids: Tensor, num_segments: int, op: str, dims: int,
           geometry: tuple | None = None) -> None:
    # The same argument errors as the CPU kernel, for callers of
    # torch.ops.fastfair.* directly. The id range is left to the public
    # wrappers (one check per call, switched off in hot loops), and nothing
    # here reads a device's error record: this runs once per layer on the
    # bf16 DC path, which must not sync.
    _check_weight_grad_args(grad_out, inp, ids, num_segments, op, dims, check_range=False)
    if geometry is not None:
        _check_conv_geometry(grad_out, inp, *geometry, op)

def _cuda_linear(grad_out: Tensor, inp: Tensor, ids: Tensor, num_segments: int) -> Tensor:
    _check(grad_out, inp, ids, num_segments, "segment_linear_weight_grad", 2)
    precision = wgrad._precision_for("segment_linear_weight_grad")
    if precision == "simt" or inp.dtype == torch.float64:
        return torch.ops.fastfair.segment_linear_weight_grad_simt(grad_out, inp, ids, num_segments)
    if precision == "cudnn":
        return wgrad.per_segment_weight_grad(grad_out, inp, ids, num_segments).to(inp.dtype)
    return wgrad.grouped_linear_weight_grad(grad_out, inp, ids, num_segments, precision).to(inp.dtype)

def _cuda_conv2d(grad_out: Tensor, inp: Tensor, ids: Tensor, num_segments: int, kernel_size: Sequence[int],
                 stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    geometry = tuple(tuple(int(v) for v in t) for t in (kernel_size, stride, padding, dilation))
    _check(grad_out, inp, ids, num_segments, "segment_conv2d_weight_grad", 4, geometry)
    precision = wgrad._precision_for("segment_conv2d_weight_grad")
    if precision == "simt" or inp.dtype == torch.float64:
        return torch.ops.fastfair.segment_conv2d_weight_grad_simt(
            grad_out, inp, ids, num_segments, kernel_size, stride, padding, dilation)
    if precision == "cudnn":
        return wgrad.per_segment_weight_grad(grad_out, inp, ids, num_segments, geometry).to(inp.dtype)
    return wgrad.grouped_conv2d_weight_grad(grad_out, inp, ids, num_segments, kernel_size, stride, padding,
                                      dilation, precision).to(inp.dtype)

_lib: torch.library.Library | None = None

def register_cuda_kernels(has_kernel) -> None:  # noqa: ANN001
    """Make the functions above the CUDA kernels of the two ops (once; skipped
    where a compiled CUDA kernel of the same name exists, e.g. an extension
    built before the SIMT kernel moved to ``*_simt``)."""
    global _lib
    if _lib is not None or not has_kernel("segment_linear_weight_grad_simt", "CUDA"):
        return
    _lib = torch.library.Library("fastfair", "IMPL")  # noqa: TOR901 - kept alive for the process
    if not has_kernel("segment_linear_weight_grad", "CUDA"):
        _lib.impl("segment_linear_weight_grad", _cuda_linear, "CUDA")
    if not has_kernel("segment_conv2d_weight_grad", "CUDA"):
        _lib.impl("segment_conv2d_weight_grad", _cuda_conv2d, "CUDA")

if _LOADED:

    @torch.library.register_fake("fastfair::segment_linear_weight_grad")
    def _segment_linear_weight_grad_fake(grad_out: Tensor, inp: Tensor, ids: Tensor, num_segments: int) -> Tensor:
        _check_same_device("segment_linear_weight_grad", grad_out=grad_out, input=inp, ids=ids)
        return inp.new_empty((num_segments, grad_out.shape[1], inp.shape[1]))

    @torch.library.register_fake("fastfair::segment_conv2d_weight_grad")
    def _segment_conv2d_weight_grad_fake(grad_out: Tensor, inp: Tensor, ids: Tensor, num_segments: int,
                                         kernel_size, stride, padding, dilation) -> Tensor:  # noqa: ANN001
        _check_same_device("segment_conv2d_weight_grad", grad_out=grad_out, input=inp, ids=ids)
        return inp.new_empty((num_segments, grad_out.shape[1], inp.shape[1], kernel_size[0], kernel_size[1]))

    def _setup_weight_grad(ctx, inputs, output) -> None:  # noqa: ANN001
        grad_out, inp, ids, num_segments = inputs[:4]
        ctx.save_for_backward(grad_out, inp, ids)
        ctx.geom = tuple(inputs[5:8])  # stride, padding, dilation (conv only)

    def _segment_linear_weight_grad_backward(ctx, g: Tensor):  # noqa: ANN001
        grad_out, inp, ids = ctx.saved_tensors
        db, da = _linear_wgrad_backward_terms(g, grad_out, inp, ids, *ctx.needs_input_grad[:2])
        return db, da, None, None

    def _segment_conv2d_weight_grad_backward(ctx, g: Tensor):  # noqa: ANN001
        grad_out, inp, ids = ctx.saved_tensors
        db, da = _conv_wgrad_backward_terms(g, grad_out, inp, ids, ctx.geom, *ctx.needs_input_grad[:2])
        return db, da, None, None, None, None, None, None

    torch.library.register_autograd(
        "fastfair::segment_linear_weight_grad", _segment_linear_weight_grad_backward,
        setup_context=_setup_weight_grad,
    )
    torch.library.register_autograd(
        "fastfair::segment_conv2d_weight_grad", _segment_conv2d_weight_grad_backward,
        setup_context=_setup_weight_grad,
    )

    # On CUDA the two ops run a vendor grouped GEMM (fastfair.wgrad).
    register_cuda_kernels(lambda op, key: torch._C._dispatch_has_kernel_for_dispatch_key(f"fastfair::{op}", key))
    # The registration above adds CUDA kernels: resolve those ops' devices again (still once, at import).
    _KERNEL_DEVICES.update({op: _kernel_devices(op) for op in ("segment_linear_weight_grad",
                                                              "segment_conv2d_weight_grad")})

def segment_linear_weight_grad(grad_out: Tensor, input: Tensor, ids: Tensor, num_segments: int) -> Tensor:  # noqa: A002
    """Per-segment sums of Linear weight gradients: out[s] = sum_{i: ids[i] = s} grad_out[i]^T input[i].

    grad_out: [N, O] gradient at the layer's output, input: [N, K] the layer's
    input (same float dtype and device); ids: [N] int32/int64 in any order.
    Returns [num_segments, O, K] in input's dtype (float32 accumulation for
    half/bfloat16); empty segments are zero. Differentiable in grad_out and input.
    """
    op = "segment_linear_weight_grad"
    num_segments = _check_weight_grad_args(grad_out, input, ids, num_segments, op, 2)
    if _use_kernel(op, input, grad_out, ids):
        out = torch.ops.fastfair.segment_linear_weight_grad(grad_out, input, ids, num_segments)
        _after_kernel(input.device, op)
        return out
    return _segment_linear_weight_grad_reference(grad_out, input, ids, num_segments)

def segment_conv2d_weight_grad(
    grad_out: Tensor,
    input: Tensor,  # noqa: A002
    ids: Tensor,
    num_segments: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """Per-segment sums of Conv2d weight gradients (groups=1, zero padding).

    grad_out: [N, O, H', W'] gradient at the conv's output, input: [N, I, H, W]
    its input; out[s] = sum over the rows of segment s of the weight gradient of
    that row alone. Returns [num_segments, O, I, kh, kw] in input's dtype
    (float32 accumulation for half/bfloat16). The unfolded input of the whole
    batch is never materialised. Differentiable in grad_out and input.
    """
    op = "segment_conv2d_weight_grad"
    ks, st = _pair(kernel_size, "kernel_size", op), _pair(stride, "stride", op)
    pd, dl = _pair(padding, "padding", op), _pair(dilation, "dilation", op)
    num_segments = _check_weight_grad_args(grad_out, input, ids, num_segments, op, 4)
    _check_conv_geometry(grad_out, input, ks, st, pd, dl, op)
    if _use_kernel(op, input, grad_out, ids):
        out = torch.ops.fastfair.segment_conv2d_weight_grad(
            grad_out, input, ids, num_segments, list(ks), list(st), list(pd), list(dl)
        )
        _after_kernel(input.device, op)
        return out
    return _segment_conv2d_weight_grad_reference(grad_out, input, ids, num_segments, ks, st, pd, dl)
