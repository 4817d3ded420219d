"""Per-segment weight gradients on a vendor grouped GEMM (docs/architecture.md, op 3).

For a layer with input A and output gradient B, segment s needs
sum_{i in s} B_i^T A_i (Linear) or the same over the im2col columns of every
output position (Conv2d). With the rows sorted by segment that is ONE grouped
GEMM whose reduction axis (rows x positions) is cut at the segment offsets:
PyTorch's ``torch._grouped_mm`` with 2-D x 2-D operands and ``offs``, the
kernel MoE layers use for their weight gradients (CUTLASS on sm90/sm100 for
bfloat16, with float32 accumulation and a bfloat16 result; other dtypes and
devices run torch's own per-group ``mm`` loop).

Why Python and not ``at::_grouped_mm`` from C++: the kernel is ATen's either
way (no launch of ours to save), the checks on its support differ between
torch versions (the GPU machine runs 2.11, CI 2.14) and are easier to guard at
run time here, and the same function then runs on CPU tensors, where torch's
grouped_mm also exists, so CI executes the GPU algorithm (tests/test_wgrad.py).
These functions are registered as the CUDA kernels of
``fastfair::segment_linear_weight_grad`` / ``segment_conv2d_weight_grad``
(:func:`register_cuda_kernels`); the CPU kernels stay the float64-exact C++
ones, and the hand-written CUDA kernel is kept as ``*_simt``.

Precision (:func:`set_weight_grad_precision`, or ``FASTFAIR_WGRAD_PRECISION``):
``"fp32"`` (default until a GPU run measures the choice: the exact-er one;
float32 operands, TF32 off for the call), ``"tf32"`` (float32 operands, TF32
on), ``"bf16"`` (bfloat16 operands on tensor cores, float32 accumulation
inside the GEMM, bfloat16 per-group results summed in float32), ``"cudnn"``
(no grouped GEMM: one cuDNN weight gradient / cuBLAS mm per non-empty
segment on its sorted slice of rows, the offsets read back once per call;
TF32 as torch.backends.cudnn says) and ``"simt"`` (the hand-written kernel). float64 input always takes the SIMT
kernel, which accumulates in float64.

Host syncs: none on the bf16 path (offsets, sort and splits are device
tensors). torch's grouped_mm has no float32 tensor-core kernel, so
``fp32``/``tf32`` run its fallback, which copies the offsets to the host once
per call (one sync per layer call) and launches one GEMM per group.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

PRECISIONS = ("fp32", "tf32", "bf16", "cudnn", "simt")
_ENV = "FASTFAIR_WGRAD_PRECISION"


def _initial_precision() -> str:
    value = os.environ.get(_ENV, "fp32")
    if value not in PRECISIONS:
        raise ValueError(f"{_ENV}={value!r}; choose one of {', '.join(PRECISIONS)}")
    return value


_precision = _initial_precision()


def set_weight_grad_precision(precision: str) -> None:
    """Choose how the CUDA weight-gradient ops compute: ``"fp32"``, ``"tf32"``,
    ``"bf16"`` (grouped GEMM), ``"cudnn"`` (per segment) or ``"simt"`` (the
    hand-written kernel)."""
    global _precision
    if precision not in PRECISIONS:
        raise ValueError(f"weight-gradient precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    _precision = precision


def get_weight_grad_precision() -> str:
    return _precision


@contextlib.contextmanager
def weight_grad_precision(precision: str) -> Iterator[None]:
    old = get_weight_grad_precision()
    set_weight_grad_precision(precision)
    try:
        yield
    finally:
        set_weight_grad_precision(old)


# ---------------------------------------------------------------------------
# Segment layout: row order and group ends, computed once and shared.


@dataclass(frozen=True)
class SegmentLayout:
    """Rows sorted by segment: ``ends[s]`` (int32, on the device) is the row
    where segment s ends; rows with ids outside [0, S) sort after every
    segment and are never reduced (elements past the last end are ignored)."""

    ids: Tensor
    num_segments: int
    ends: Tensor
    key: tuple
    lengths: Tensor | None = None  # rows per segment (int64), for sorted_segment_sum

    @staticmethod
    def of_sorted(ids: Tensor, num_segments: int) -> "SegmentLayout":
        """Layout of ids that are already in segment order (no sort)."""
        ends = _ends(_bucket(ids, num_segments), num_segments)
        e64 = ends.to(torch.int64)
        return SegmentLayout(ids, num_segments, ends, _key(ids, num_segments),
                             torch.diff(e64, prepend=e64.new_zeros(1)))


def _key(ids: Tensor, num_segments: int) -> tuple:
    return (ids.data_ptr(), tuple(ids.shape), ids.stride(), ids.dtype, ids.device, ids._version, num_segments)


def _bucket(ids: Tensor, num_segments: int) -> Tensor:
    # Out-of-range ids go to bucket S (past every segment) instead of
    # indexing out of bounds: no device assert can poison the context.
    valid = (ids >= 0) & (ids < num_segments)
    return torch.where(valid, ids.long(), torch.full_like(ids, num_segments, dtype=torch.long))


def _ends(sorted_bucket: Tensor, num_segments: int) -> Tensor:
    """End row of every segment in rows sorted by bucket: a binary search (no
    atomics, so deterministic mode is fine). cummax keeps the ends monotone
    (the grouped GEMM's contract) even if unchecked bad ids broke the order."""
    bounds = torch.arange(1, num_segments + 1, device=sorted_bucket.device)
    ends = torch.searchsorted(sorted_bucket, bounds)
    return ends.cummax(0).values.to(torch.int32)


_hint: SegmentLayout | None = None


@contextlib.contextmanager
def sorted_segments(layout: SegmentLayout) -> Iterator[None]:
    """Within this context, calls whose ids are ``layout.ids`` (same storage,
    shape and version) take the sorted fast path and share its offsets: no
    sort, no gather. fastfair.pergroup sorts the real batch once per
    segment_gradients call and enters this around all its layers."""
    global _hint
    old, _hint = _hint, layout
    try:
        yield
    finally:
        _hint = old


def _layout(ids: Tensor, num_segments: int) -> tuple[Tensor | None, Tensor]:
    """(perm or None when the rows are already in order, ends)."""
    h = _hint
    if h is not None and h.key == _key(ids, num_segments):
        return None, h.ends
    bucket = _bucket(ids, num_segments)
    perm = torch.argsort(bucket, stable=True)
    return perm, _ends(bucket[perm], num_segments)


def sorted_segment_sum(x: Tensor, ids: Tensor, num_segments: int) -> Tensor | None:
    """Per-segment sums [S, D] of rows already in segment order, from the
    layout that :func:`sorted_segments` shares (its ends give the segment
    lengths): one deterministic ``torch.segment_reduce`` over contiguous runs,
    no sort and no host sync. None when no shared layout covers ``ids``
    (then the caller's segment_sum sorts on its own)."""
    h = _hint
    if (h is None or h.lengths is None or h.key != _key(ids, num_segments)
            or x.dtype not in (torch.float32, torch.float64)):  # half / bf16: segment_sum accumulates in fp32
        return None
    # unsafe: no check that the lengths cover every row (a host sync); rows
    # past the last end (out-of-range ids, sorted last) are not reduced.
    return torch.segment_reduce(x, "sum", lengths=h.lengths, axis=0, unsafe=True)


# ---------------------------------------------------------------------------
# The grouped product.

_TARGET_CTAS = 264  # two waves of 128-wide output tiles on a 132-SM H100/H200
_MIN_SPLIT_STEPS = 4096  # reduction steps per split at the least
# The column buffer (im2col) of one chunk holds at most this many elements:
# 2 GB in bfloat16 (cdigits' widest layer, all 2560 rows, is 0.75 G).
_COLS_ELEMS = 1 << 30


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def _aligned_rows(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised [..., last] view whose row stride is a multiple of 16 bytes."""
    per = 16 // torch.empty((), dtype=dtype).element_size()
    *lead, last = shape
    return torch.empty((*lead, _round_up(max(last, 1), per)), dtype=dtype, device=device)[..., :last]


def _splits(num_segments: int, steps: int, out_rows: int, out_cols: int) -> int:
    """Sub-ranges per segment (split-K by construction): the grouped GEMM
    gives one group of output tiles per segment and does not split the
    reduction, so at G = 1 the 27-column first conv layer would run on 10
    CTAs. Depends only on the shapes (determinism)."""
    tiles = max(1, -(-out_rows // 128) * -(-out_cols // 128))
    want = -(-_TARGET_CTAS // (num_segments * tiles))
    cap = max(1, steps // max(1, num_segments * _MIN_SPLIT_STEPS))
    return max(1, min(want, cap, 64))


def _sub_ends(ends: Tensor, rows0: int, rows: int, positions: int, splits: int) -> Tensor:
    """Group ends along the (row, position) axis of rows [rows0, rows0 + rows),
    each segment cut into ``splits`` equal sub-ranges; int32, on the device."""
    e = (ends.long() - rows0).clamp(0, rows) * positions
    start = torch.cat([e.new_zeros(1), e[:-1]])
    j = torch.arange(1, splits + 1, device=ends.device)
    sub = start.unsqueeze(1) + (e - start).unsqueeze(1) * j // splits
    return sub.reshape(-1).to(torch.int32)


_warned_fallback = False


# torch._grouped_mm's CUDA kernel takes at most this many groups.
GROUPED_MM_MAX_GROUPS = 1024


def _fallback_cause(exc: RuntimeError, mat_a: Tensor, offs: Tensor) -> str | None:
    """Why torch._grouped_mm refused, when a per-group loop can do the work
    instead; None for errors a loop would not fix (out of memory, a sticky
    CUDA error), which propagate."""
    msg = str(exc)
    if isinstance(exc, torch.OutOfMemoryError) or "CUDA error" in msg or "out of memory" in msg:
        return None
    if offs.numel() > GROUPED_MM_MAX_GROUPS:
        return f"{offs.numel()} groups, above its limit of {GROUPED_MM_MAX_GROUPS}"
    return f"{mat_a.dtype} operands ({msg.splitlines()[0] if msg else type(exc).__name__})"


def _grouped(mat_a: Tensor, mat_b: Tensor, offs: Tensor) -> Tensor:
    """torch's grouped GEMM, [G, M, N]; where this torch version refuses the
    call (float32 on an older CUDA build, more groups than its kernel takes),
    the same per-group loop its own fallback runs, with a warning naming the
    cause. Other errors (out of memory, a failed kernel) propagate."""
    global _warned_fallback
    try:
        return torch._grouped_mm(mat_a, mat_b, offs=offs)
    except RuntimeError as exc:
        cause = _fallback_cause(exc, mat_a, offs)
        if cause is None:
            raise
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"fastfair: torch._grouped_mm refused {cause}; running one mm per group instead",
                          RuntimeWarning, stacklevel=3)
    ends = offs.tolist()  # one sync; only where torch has no kernel for the dtype
    out = mat_a.new_empty((len(ends), mat_a.shape[0], mat_b.shape[1]))
    start = 0
    for g, end in enumerate(ends):
        torch.mm(mat_a[:, start:end], mat_b[start:end], out=out[g])
        start = end
    return out


@contextlib.contextmanager
def _matmul_precision(precision: str) -> Iterator[None]:
    if precision not in ("fp32", "tf32"):
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _compute_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _reduce(mat_a: Tensor, mat_b: Tensor, ends: Tensor, rows0: int, rows: int, positions: int,
            num_segments: int, precision: str) -> Tensor:
    """[S, M, N] float32: each segment's product over its (row, position) steps."""
    m, n = mat_a.shape[0], mat_b.shape[1]
    splits = _splits(num_segments, rows * positions, m, n)
    offs = _sub_ends(ends, rows0, rows, positions, splits)
    with _matmul_precision(precision):
        out = _grouped(mat_a, mat_b, offs)
    out = out.float()
    return out.view(num_segments, splits, m, n).sum(1) if splits > 1 else out


def grouped_linear_weight_grad(grad_out: Tensor, inp: Tensor, ids: Tensor, num_segments: int,
                               precision: str = "fp32") -> Tensor:
    """[S, O, K] float32: out[s] = sum_{i in s} grad_out[i]^T inp[i], one grouped GEMM."""
    n, o, k = inp.shape[0], grad_out.shape[1], inp.shape[1]
    if n == 0 or o == 0 or k == 0:
        return inp.new_zeros((num_segments, o, k), dtype=torch.float32)
    perm, ends = _layout(ids, num_segments)
    if perm is not None:
        grad_out, inp = grad_out.index_select(0, perm), inp.index_select(0, perm)
    dt = _compute_dtype(precision)
    b = _aligned_rows((n, o), dt, inp.device)
    b.copy_(grad_out)
    a = _aligned_rows((n, k), dt, inp.device)
    a.copy_(inp)
    # mat_a = B^T as a column-major view (the MoE weight-gradient layout).
    return _reduce(b.t(), a, ends, 0, n, 1, num_segments, precision).contiguous()


def _cols_nhwc(a: Tensor, ks: Sequence[int], st: Sequence[int], pd: Sequence[int], dl: Sequence[int],
               oh: int, ow: int, dt: torch.dtype) -> Tensor:
    """im2col of a chunk of rows as [rows * OH * OW, I * kh * kw] (row-major,
    16-byte row stride), column order (i, u, v) like the weight's."""
    n, c = a.shape[:2]
    if pd[0] or pd[1]:
        a = F.pad(a, (pd[1], pd[1], pd[0], pd[0]))
    x = a.permute(0, 2, 3, 1)  # [n, H, W, I], a view
    span_h, span_w = dl[0] * (ks[0] - 1) + 1, dl[1] * (ks[1] - 1) + 1
    p = x.unfold(1, span_h, st[0]).unfold(2, span_w, st[1])  # [n, OH', OW', I, span_h, span_w]
    p = p[:, :oh, :ow, :, ::dl[0], ::dl[1]]
    kk = c * ks[0] * ks[1]
    cols = _aligned_rows((n * oh * ow, kk), dt, a.device)
    cols.view(n, oh, ow, c, ks[0], ks[1]).copy_(p)
    return cols


def grouped_conv2d_weight_grad(grad_out: Tensor, inp: Tensor, ids: Tensor, num_segments: int,
                               kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                               dilation: Sequence[int], precision: str = "fp32") -> Tensor:
    """[S, O, I, kh, kw] float32 per-segment conv weight gradients: im2col of a
    bounded chunk of rows at a time (channels-last, so B and the columns are
    the two 2-D operands without a transpose), one grouped GEMM per chunk."""
    n, ci = inp.shape[:2]
    o, oh, ow = grad_out.shape[1:]
    kh, kw = kernel_size
    kk = ci * kh * kw
    if n == 0 or o == 0 or ci == 0:
        return inp.new_zeros((num_segments, o, ci, kh, kw), dtype=torch.float32)
    perm, ends = _layout(ids, num_segments)
    dt = _compute_dtype(precision)
    positions = oh * ow
    rows = max(1, min(n, _COLS_ELEMS // max(1, positions * _round_up(kk, 8))))
    total = None
    for r0 in range(0, n, rows):
        m = min(rows, n - r0)
        if perm is None:
            b_rows, a_rows = grad_out[r0:r0 + m], inp[r0:r0 + m]
        else:
            take = perm[r0:r0 + m]
            b_rows, a_rows = grad_out.index_select(0, take), inp.index_select(0, take)
        b = _aligned_rows((m, oh, ow, o), dt, inp.device)
        b.copy_(b_rows.permute(0, 2, 3, 1))
        cols = _cols_nhwc(a_rows, kernel_size, stride, padding, dilation, oh, ow, dt)
        part = _reduce(b.reshape(m * positions, o).t(), cols, ends, r0, m, positions, num_segments, precision)
        # Chunks cannot know their segment range without a host read, so each
        # adds all S sums; at the driver's sizes there is one chunk per call.
        total = part if total is None else total.add_(part)
    return total.contiguous().view(num_segments, o, ci, kh, kw)


def per_segment_weight_grad(grad_out: Tensor, inp: Tensor, ids: Tensor, num_segments: int,
                            conv: tuple | None = None) -> Tensor:
    """float32 per-segment weight gradients by the vendor's dense kernels, one
    call per non-empty segment on its slice of the sorted rows (cuDNN's
    implicit GEMM for conv: no im2col). ``conv``: (kernel_size, stride,
    padding, dilation), None for Linear. Reads the offsets back once."""
    perm, ends = _layout(ids, num_segments)
    if perm is not None:
        grad_out, inp = grad_out.index_select(0, perm), inp.index_select(0, perm)
    shape = (grad_out.shape[1], inp.shape[1], *conv[0]) if conv else (grad_out.shape[1], inp.shape[1])
    out = inp.new_zeros((num_segments, *shape), dtype=torch.float32)
    if inp.shape[0] == 0:
        return out
    start = 0
    for k, end in enumerate(ends.tolist()):  # the one host read
        if end > start:
            a, b = inp[start:end], grad_out[start:end]
            if conv:
                out[k] = torch.nn.grad.conv2d_weight(a, shape, b, conv[1], conv[2], conv[3])
            else:
                out[k] = b.t() @ a
        start = end
    return out


# cuBLAS is deterministic only with one of these workspace settings, read when
# CUDA starts (torch's "Reproducibility" notes).
_CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


def _precision_for(op: str) -> str:
    """The weight-gradient precision, refused in one line where deterministic
    mode cannot hold: the cuBLAS paths without a deterministic workspace
    setting would otherwise raise deep inside torch after its warning."""
    precision = get_weight_grad_precision()
    if (precision in ("fp32", "tf32", "cudnn") and torch.are_deterministic_algorithms_enabled()
            and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in _CUBLAS_DETERMINISTIC):
        raise RuntimeError(
            f"{op}: deterministic mode and the {precision!r} weight-gradient path (cuBLAS) need "
            f"CUBLAS_WORKSPACE_CONFIG={_CUBLAS_DETERMINISTIC[0]} in the environment before CUDA starts; set it, or "
            f"use the deterministic 'simt' path ({_ENV}=simt or fastfair.ops.weight_grad_precision('simt'))")
    return precision
