"""Python face of fastfair's custom ops: dispatch, checks, autograd, fake kernels.

The kernels live in ``csrc/`` and are registered as ``torch.ops.fastfair.*``.
When the compiled extension is missing (or has no kernel for the tensor's
device) the same functions run on pure-PyTorch reference implementations, so
``import fastfair`` never fails; :func:`backend` says which path is active.

Contracts (docs/architecture.md): the caller passes ``num_segments``; ids are int32 or
int64 in any order; empty segments give zeros; half/bfloat16 accumulate in
float32; the kernels are deterministic (no atomics, fixed reduction order).
"""
from __future__ import annotations

import contextlib
import operator
import warnings
from typing import Iterator

import torch
from torch import Tensor

from ._extension import load as _load_extension

# Loads fastfair._C; an extension built for another torch warns once at import
# (how to rebuild it) and the reference ops run instead.
_LOADED, _LOAD_ERROR = _load_extension(__package__)

# A mismatched extension has said so at import already (its message starts
# with "fastfair:"); the first-use warning is for a missing one.
_warned = bool(_LOAD_ERROR and _LOAD_ERROR.startswith("fastfair:"))
_validate_ids = True

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
_INT64_MAX = (1 << 63) - 1


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
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


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


def _as_size(value: object, name: str, op: str) -> int | torch.SymInt:
    """A positive size from any integer type: int, numpy integer, 0-d integer
    tensor (read once, a host sync on GPUs), or a SymInt under dynamic shapes.
    bool and floats are refused: they are never meant as a count."""
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        size = value  # as is: operator.index would specialise a traced SymInt
    elif isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{op}: {name} must be an integer or a 0-d integer tensor, got a "
                            f"{value.dtype} tensor of shape {tuple(value.shape)}")
        if value.device.type == "meta":
            raise ValueError(f"{op}: {name} is a meta tensor, which holds no value; pass an int")
    elif isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an integer, got bool")
    if not isinstance(value, (int, torch.SymInt)):
        try:
            size = operator.index(value)
        except TypeError:
            raise TypeError(f"{op}: {name} must be an integer, got {type(value).__name__}") from None
    if size <= 0:
        raise ValueError(f"{op}: {name} must be positive, got {size}")
    if size > _INT64_MAX:
        raise ValueError(f"{op}: {name} = {size} does not fit in int64")
    return size


@contextlib.contextmanager
def validate_ids(enabled: bool) -> Iterator[None]:
    """Turn the immediate range check of ids on GPU tensors on or off.

    Every kernel detects ids outside ``[0, num_segments)`` (negative included).
    On CPU it raises ValueError at once, naming the row and the value. A CUDA
    kernel cannot raise: it skips such rows (never writes out of bounds) and
    records the first one on the device. With ``validate_ids(True)`` (the
    default) the op reads that record after the call (one small
    device-to-host copy) and raises the same ValueError. Hot loops whose ids
    are in range by construction (the distillation driver) switch it off: then
    nothing syncs, and a recorded error is raised by :func:`raise_pending_errors`
    (which the driver calls where it syncs anyway) or, at the latest, when the
    ``validate_ids(False)`` block exits normally.

    The record is one per device, not per stream: work on several streams
    shares it and the first error recorded wins (fastfair's own code runs on
    the current stream only). Its buffer is allocated by the first recording
    call on a device, so under CUDA-graph capture run one op on that device
    before capturing, or keep validation on outside the captured region.
    """
    global _validate_ids
    old, _validate_ids = _validate_ids, enabled
    ok = False
    try:
        yield
        ok = True
    finally:
        _validate_ids = old
        # An exception already on its way out is not replaced; the record
        # stays pending for the next check.
        if ok and not enabled:
            raise_pending_errors()


# Names of the op codes of csrc/cuda/id_check.cuh (IdOp).
_ID_ERROR_OPS = {1: "segment_sum", 2: "segment_mean", 3: "segment_count",
                 4: "segment_linear_weight_grad", 5: "segment_conv2d_weight_grad"}
# Ops whose CUDA kernels record out-of-range ids on the device
# (csrc/cuda/id_check.cuh); the others are checked in _check_args.
_CUDA_KERNELS_RECORDING_IDS = {"segment_sum", "segment_mean", "segment_count"}
# Devices with kernel calls whose id errors have not been read yet.
_unchecked_devices: set[torch.device] = set()


def _id_error_message(op: str, row: int, value: int, num_segments: int) -> str:
    return f"{op}: ids[{row}] = {value} is outside [0, num_segments = {num_segments})"


# Reads of a device's id-error record (each one a device-to-host copy); a
# test counts them to prove a path is sync-free.
id_error_reads = 0


def _take_id_error(device: torch.device) -> str | None:
    global id_error_reads
    id_error_reads += 1
    row, value, segs, code = torch.ops.fastfair.take_id_error(device)
    if row < 0:
        return None
    return _id_error_message(_ID_ERROR_OPS.get(code, f"op {code}"), row, value, segs)


def _after_kernel(device: torch.device, op: str) -> None:
    # CPU kernels have raised already; CUDA kernels left a record.
    if device.type != "cuda" or op not in _CUDA_KERNELS_RECORDING_IDS or torch.compiler.is_compiling():
        return
    if _validate_ids:
        msg = _take_id_error(device)
        if msg is not None:
            raise ValueError(msg)
    else:
        _unchecked_devices.add(device)


def raise_pending_errors() -> None:
    """Raise the ValueError of the first out-of-range id that a CUDA kernel
    recorded since the last check (see :func:`validate_ids`), if any. Syncs
    with each device used since then (one small copy each); a no-op on CPU."""
    if not _unchecked_devices:
        return
    devices = sorted(_unchecked_devices, key=str)
    _unchecked_devices.clear()
    first = None
    for dev in devices:
        msg = _take_id_error(dev)  # every device is read, so each is cleared
        first = first or msg
    if first is not None:
        raise ValueError(first)


def _check_args(x: Tensor | None, ids: Tensor, num_segments: int, op: str,
                check_range: bool = True) -> int | torch.SymInt:
    """Metadata checks (traceable: no tensor values are read); returns
    num_segments as a size. The CPU kernels range-check ids as they read them.
    ``check_range=False`` skips the masked range check of CUDA ids (callers
    whose ids a public wrapper has checked already) without touching the
    pending-error machinery, so it never syncs."""
    num_segments = _as_size(num_segments, "num_segments", op)
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
    # The range of the ids is checked by the kernels themselves (CPU: at once;
    # CUDA: recorded on the device and raised by _after_kernel), and by the
    # reference paths. CUDA kernels that do not record yet get the masked
    # check here (a sync per call while validation is on).
    if (check_range and op not in _CUDA_KERNELS_RECORDING_IDS and ids.device.type == "cuda" and _validate_ids
            and ids.numel() > 0 and not torch.compiler.is_compiling()):
        _reference_check_range(ids, num_segments, op)
    return num_segments


def _check_same_device(op: str, **tensors: Tensor) -> None:
    # For the fake (meta) kernels: the dispatcher sends a call with any meta
    # tensor to them, and a CPU result would be uninitialised memory.
    (first, t0), *rest = tensors.items()
    for name, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{op}: {first} is on {t0.device} but {name} is on {t.device} "
                             "(all tensors must be on one device)")


# ---------------------------------------------------------------------------
# Reference implementations (float64-exact building blocks of torch ops).


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _reference_check_range(ids: Tensor, num_segments: int, op: str) -> None:
    # On every device (a sync off the CPU: the reference paths are the slow
    # fallback), so index_add never sees a bad index (a device assert on CUDA).
    if ids.numel() and ids.device.type != "meta":
        bad = (ids < 0) | (ids >= num_segments)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(_id_error_message(op, first, int(ids[first]), num_segments))


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


# ---------------------------------------------------------------------------
# Public API.

# objectives holds no op code (it imports only torch): imported here, not
# inside fair_dm_loss, so that a traced call does not execute an import.
from . import objectives  # noqa: E402


def segment_sum(x: Tensor, ids: Tensor, num_segments: int) -> Tensor:
    """Row sums per segment: out[s] = sum of x[i] over i with ids[i] == s.

    x: [N, D] float32/float64/float16/bfloat16 (any strides); ids: [N] int32 or
    int64, any order. Returns [num_segments, D] in x's dtype. Differentiable in x.
    """
    num_segments = _check_args(x, ids, num_segments, "segment_sum")
    if _use_kernel("segment_sum", x, ids):
        out = torch.ops.fastfair.segment_sum(x, ids, num_segments)
        _after_kernel(x.device, "segment_sum")
        return out
    return _segment_sum_reference(x, ids, num_segments)


def segment_mean(x: Tensor, ids: Tensor, num_segments: int) -> Tensor:
    """Row means per segment; an empty segment gives a zero row (never NaN)."""
    num_segments = _check_args(x, ids, num_segments, "segment_mean")
    if _use_kernel("segment_mean", x, ids):
        out = torch.ops.fastfair.segment_mean(x, ids, num_segments)
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


def _first_out_of_range(op: str, checks: list[tuple[str, Tensor, int, str]]) -> str | None:
    """The error message for the first value outside [0, bound) among
    ``checks`` = [(argument name, tensor, bound, bound's name)], or None.
    Reads the values back: for error paths only."""
    for name, t, bound, what in checks:
        if t.numel() == 0 or t.device.type == "meta":
            continue
        t64 = t.long()
        bad = (t64 < 0) | (t64 >= bound)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            return f"{op}: {name}[{i}] = {int(t64[i])} is outside [0, {what} = {bound})"
    return None


def _naming_bad_rows(op: str, checks: list[tuple[str, Tensor, int, str]], fn, *args):  # noqa: ANN001, ANN201
    """``fn(*args)``; when it fails with the ops' range error, re-raise it as a
    ValueError that names the caller's label or group (eager only: a traced
    graph raises the kernels' own message)."""
    if torch.compiler.is_compiling():
        return fn(*args)
    try:
        return fn(*args)
    except ValueError as err:
        if "is outside [0, num_segments" not in str(err):
            raise
        msg = _first_out_of_range(op, checks)
        if msg is None:
            raise
        raise ValueError(msg) from None


def _check_rows_1d(op: str, name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a 1-D int32/int64 tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: {name} must be a 1-D int32/int64 tensor, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{op}: {name} must be a 1-D int32/int64 tensor, got shape {tuple(t.shape)}")


def _check_dm_args(real_emb: Tensor, real_labels: Tensor, real_groups: Tensor, syn_emb: Tensor,
                   syn_labels: Tensor, num_classes: object, num_groups: object, op: str) -> tuple:
    """Metadata checks of the DM loss's inputs; returns (C, G) as sizes."""
    num_classes = _as_size(num_classes, "num_classes", op)
    num_groups = _as_size(num_groups, "num_groups", op)
    if not isinstance(num_classes, torch.SymInt) and not isinstance(num_groups, torch.SymInt) \
            and num_classes * num_groups > _INT64_MAX:
        raise ValueError(f"{op}: num_classes * num_groups = {num_classes} * {num_groups} does not fit in int64")
    for name, t in (("real_labels", real_labels), ("real_groups", real_groups), ("syn_labels", syn_labels)):
        _check_rows_1d(op, name, t)
    for name, t in (("real_emb", real_emb), ("syn_emb", syn_emb)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor")
    if real_emb.dim() != 2 or syn_emb.dim() != 2 or real_emb.shape[1] != syn_emb.shape[1]:
        raise ValueError(
            f"{op}: embeddings must be [N, D] with the same D, got "
            f"{tuple(real_emb.shape)} and {tuple(syn_emb.shape)}"
        )
    if not (real_labels.shape[0] == real_groups.shape[0] == real_emb.shape[0]):
        raise ValueError(
            f"{op}: real_emb, real_labels and real_groups need one row each, got "
            f"{real_emb.shape[0]}, {real_labels.shape[0]} and {real_groups.shape[0]}"
        )
    if syn_labels.shape[0] != syn_emb.shape[0]:
        raise ValueError(f"{op}: syn_emb has {syn_emb.shape[0]} rows but syn_labels has {syn_labels.shape[0]}")
    devices = {t.device for t in (real_emb, real_labels, real_groups, syn_emb, syn_labels)}
    if len(devices) > 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted(map(str, devices))}")
    return num_classes, num_groups


def fair_dm_terms(
    real_emb: Tensor,
    real_labels: Tensor,
    real_groups: Tensor,
    syn_emb: Tensor,
    syn_labels: Tensor,
    num_classes: int,
    num_groups: int,
    objective: str = "fairdd",
    group_terms: bool = False,
) -> objectives.MatchTerms:
    """:func:`fair_dm_loss` before the sum over classes:
    :class:`fastfair.objectives.MatchTerms` (per-class terms [C], per-(class,
    group) distances [C, G] for per-group objectives or with ``group_terms``,
    real rows per segment [C, G])."""
    op = "fair_dm_loss"
    obj = objectives.get_objective(objective)
    C, G = _check_dm_args(real_emb, real_labels, real_groups, syn_emb, syn_labels, num_classes, num_groups, op)
    checks = [("real_labels", real_labels, C, "num_classes"), ("real_groups", real_groups, G, "num_groups"),
              ("syn_labels", syn_labels, C, "num_classes")]
    return _naming_bad_rows(op, checks, _fair_dm_terms, real_emb, real_labels, real_groups, syn_emb, syn_labels,
                           C, G, obj, group_terms)


def _fair_dm_terms(real_emb: Tensor, real_labels: Tensor, real_groups: Tensor, syn_emb: Tensor,
                   syn_labels: Tensor, C: int, G: int, obj: objectives.Objective,
                   group_terms: bool) -> objectives.MatchTerms:
    num_segments = C * G
    seg = segment_ids(real_labels, real_groups, C, G)
    real = real_emb.detach()
    real_sum = segment_sum(real, seg, num_segments)
    real_count = segment_count(seg, num_segments)
    syn_mean = segment_mean(syn_emb, syn_labels, C)
    syn_count = segment_count(syn_labels, C)
    return objectives.dm_matching_terms(real_sum, real_count, syn_mean, syn_count, G, obj, group_terms)


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
    ``syn_emb``. Objectives: ``vanilla``, ``fairdd``, ``fairdd-mean``, ``cobra``,
    ``fairdd-iw``, ``fairdd-ldam``, ``fairdd-groupdro`` (see
    :mod:`fastfair.objectives`). Returns a scalar: the sum over classes.

    num_classes / num_groups: any integer type (int, numpy integer, 0-d
    integer tensor). A label outside [0, num_classes) or a group outside
    [0, num_groups) raises ValueError naming it (``real_labels[7] = 9 is
    outside [0, num_classes = 8)``); under torch.compile the ops' own range
    error is raised instead, still before any result is returned.
    """
    return fair_dm_terms(real_emb, real_labels, real_groups, syn_emb, syn_labels, num_classes, num_groups,
                         objective).per_class.sum()


# ===========================================================================
# Segmented weight gradients (one-pass per-group DC; docs/architecture.md op 3).
# segment_linear_weight_grad / segment_conv2d_weight_grad: out[s] is the SUM
# over the rows i of segment s of the weight gradient of row i alone, given
# the layer's input A and the gradient B at its output from one backward of
# the summed per-sample losses. fastfair.pergroup divides by segment counts.

# Rows per chunk of the reference paths are capped so that the per-sample
# products of one chunk stay below this many elements.
_REF_CHUNK_ELEMS = 1 << 24


def _pair(v: object, name: str, op: str) -> tuple[int, int]:
    def one(e: object) -> int:
        if isinstance(e, bool):
            raise TypeError
        out = e if isinstance(e, (int, torch.SymInt)) else operator.index(e)
        if abs(out) > _INT64_MAX:
            raise ValueError(f"{op}: {name} = {v!r} does not fit in int64")
        return out

    try:
        if isinstance(v, (tuple, list)) and len(v) == 2:
            return (one(v[0]), one(v[1]))
        if not isinstance(v, (tuple, list)):
            e = one(v)
            return (e, e)
    except TypeError:
        pass
    raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")


def _check_weight_grad_args(grad_out: Tensor, inp: Tensor, ids: Tensor, num_segments: int, op: str,
                            dims: int, check_range: bool = True) -> int | torch.SymInt:
    shape = "[N, O]" if dims == 2 else "[N, O, H', W']"
    ishape = "[N, K]" if dims == 2 else "[N, I, H, W]"
    if grad_out.dim() != dims:
        raise ValueError(f"{op}: grad_out must be {dims}-D {shape}, got shape {tuple(grad_out.shape)}")
    if inp.dim() != dims:
        raise ValueError(f"{op}: input must be {dims}-D {ishape}, got shape {tuple(inp.shape)}")
    if grad_out.shape[0] != inp.shape[0]:
        raise ValueError(f"{op}: grad_out has {grad_out.shape[0]} rows but input has {inp.shape[0]}")
    if inp.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: input must be a floating tensor (float32/64, float16, bfloat16), got {inp.dtype}")
    if grad_out.dtype != inp.dtype:
        raise TypeError(f"{op}: grad_out ({grad_out.dtype}) and input ({inp.dtype}) must have the same dtype")
    if not (grad_out.device == inp.device == ids.device):
        raise ValueError(
            f"{op}: grad_out, input and ids must be on one device, got {grad_out.device}, {inp.device}, {ids.device}"
        )
    if ids.dim() == 1 and inp.shape[0] != ids.shape[0]:
        raise ValueError(f"{op}: input has {inp.shape[0]} rows but ids has {ids.shape[0]} entries")
    return _check_args(None, ids, num_segments, op, check_range)


def _conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    span = d * (k - 1) + 1
    return (size + 2 * p - span) // s + 1 if size + 2 * p >= span else 0


def _check_conv_geometry(grad_out: Tensor, inp: Tensor, ks, st, pd, dl, op: str) -> None:  # noqa: ANN001
    if min(ks + st + dl) <= 0 or min(pd) < 0:
        raise ValueError(f"{op}: need kernel_size, stride, dilation > 0 and padding >= 0, got "
                         f"{ks}, {st}, {dl}, {pd}")
    want = tuple(_conv_out_size(inp.shape[2 + d], ks[d], st[d], pd[d], dl[d]) for d in range(2))
    if min(want) <= 0 or tuple(grad_out.shape[2:]) != want:
        raise ValueError(
            f"{op}: grad_out spatial size {tuple(grad_out.shape[2:])} does not match a convolution of input "
            f"size {tuple(inp.shape[2:])} with kernel_size {ks}, stride {st}, padding {pd}, dilation {dl} "
            f"(expected {want})"
        )


def _segment_linear_weight_grad_reference(grad_out: Tensor, inp: Tensor, ids: Tensor, num_segments: int) -> Tensor:
    _reference_check_range(ids, num_segments, "segment_linear_weight_grad")
    acc = _acc_dtype(inp.dtype)
    n, o, k = inp.shape[0], grad_out.shape[1], inp.shape[1]
    out = torch.zeros(num_segments, o * k, dtype=acc, device=inp.device)
    rows = max(1, _REF_CHUNK_ELEMS // max(1, o * k))
    for r0 in range(0, n, rows):
        outer = torch.einsum("no,nk->nok", grad_out[r0:r0 + rows].to(acc), inp[r0:r0 + rows].to(acc))
        out = out.index_add(0, ids[r0:r0 + rows].long(), outer.reshape(outer.shape[0], -1))
    return out.view(num_segments, o, k).to(inp.dtype)


def _segment_conv2d_weight_grad_reference(grad_out: Tensor, inp: Tensor, ids: Tensor, num_segments: int,
                                          ks, st, pd, dl) -> Tensor:  # noqa: ANN001
    _reference_check_range(ids, num_segments, "segment_conv2d_weight_grad")
    import torch.nn.functional as F

    acc = _acc_dtype(inp.dtype)
    n, o, i = inp.shape[0], grad_out.shape[1], inp.shape[1]
    kk = i * ks[0] * ks[1]
    out = torch.zeros(num_segments, o * kk, dtype=acc, device=inp.device)
    # Unfold a bounded chunk of rows at a time: the whole batch's unfolded
    # input would be N * K * H'W' elements.
    per_row = kk * (grad_out.shape[2] * grad_out.shape[3] + o)
    rows = max(1, _REF_CHUNK_ELEMS // max(1, per_row))
    for r0 in range(0, n, rows):
        cols = F.unfold(inp[r0:r0 + rows].to(acc), ks, dl, pd, st)  # [n, K, L]
        b = grad_out[r0:r0 + rows].to(acc).flatten(2)  # [n, O, L]
        per = torch.bmm(b, cols.transpose(1, 2))  # [n, O, K]
        out = out.index_add(0, ids[r0:r0 + rows].long(), per.reshape(per.shape[0], -1))
    return out.view(num_segments, o, i, ks[0], ks[1]).to(inp.dtype)


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
    import torch.nn.functional as F

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

    # On CUDA the two ops run a vendor grouped GEMM (fastfair/wgrad.py).
    from .wgrad import register_cuda_kernels as _register_wgrad

    _register_wgrad(lambda op, key: torch._C._dispatch_has_kernel_for_dispatch_key(f"fastfair::{op}", key))
    # The registration above adds CUDA kernels: resolve those ops' devices again (still once, at import).
    _KERNEL_DEVICES.update({op: _kernel_devices(op) for op in ("segment_linear_weight_grad",
                                                              "segment_conv2d_weight_grad")})

from .wgrad import get_weight_grad_precision, set_weight_grad_precision, weight_grad_precision  # noqa: E402,F401


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
