"""Argument checks at the ops' boundary and the out-of-range id machinery
(validate_ids, the per-device error record of the CUDA kernels)."""
from __future__ import annotations

import contextlib
import operator
from typing import Iterator

import torch
from torch import Tensor

_INT64_MAX = (1 << 63) - 1
_validate_ids = True


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

def _reference_check_range(ids: Tensor, num_segments: int, op: str) -> None:
    # On every device (a sync off the CPU: the reference paths are the slow
    # fallback), so index_add never sees a bad index (a device assert on CUDA).
    if ids.numel() and ids.device.type != "meta":
        bad = (ids < 0) | (ids >= num_segments)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(_id_error_message(op, first, int(ids[first]), num_segments))

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
