"""torch.distributed helpers: process groups and exact GLOBAL segment statistics.

fastfair scales past one GPU with PyTorch's own engine (``torchrun`` +
``torch.distributed``: NCCL on GPUs, gloo on CPUs); there is no custom
communication layer. Every helper here is a no-op in a single process (or in a
group of one), so the driver calls them unconditionally.

Exact statistics. Each rank holds a shard of the real batch. A segment mean is
not the mean of the per-rank means (the shards have different group sizes: a
minority group may sit entirely on one rank), so the ranks all-reduce the
segment SUMS and the segment COUNTS and divide afterwards. The result is the
mean over the union of the shards, bit-for-bit the same on every rank.

Gradients. :func:`segment_sum` and :func:`segment_mean` are differentiable
w.r.t. the LOCAL rows ``x``. The convention (the one DDP uses for replicated
losses) is that every rank computes the SAME scalar loss L from the global
statistics. Then the gradient of L w.r.t. this rank's rows is
``dL/dmean[ids] / global_count[ids]`` (``dL/dsum[ids]`` for the sum): the
all-reduce's backward is the identity on the local contribution, not another
all-reduce (which would count the replicated loss ``world_size`` times). Rows
never leave their rank, so each rank gets exactly its rows' share of the
global gradient; parameters shared by all ranks (a network, a synthetic set)
still need their gradients summed with :func:`all_reduce_sum_` as DDP does.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops

__all__ = [
    "init_from_env", "process_group", "is_initialized", "rank", "world_size", "local_rank", "is_main",
    "barrier", "run_on_main", "MAIN_ALONE_TIMEOUT", "all_reduce_sum_", "broadcast_", "shard", "cleanup",
    "segment_sum", "segment_count", "segment_mean", "segment_sum_count",
]

# ---------------------------------------------------------------------------
# Process group.


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def is_initialized() -> bool:
    """True when torch.distributed has a default process group."""
    return dist.is_available() and dist.is_initialized()


def _active(group: dist.ProcessGroup | None = None) -> bool:
    return is_initialized() and dist.get_world_size(group) > 1


def init_from_env(
    backend: str | None = None,
    device: str | torch.device | None = None,
    timeout: datetime.timedelta | None = None,
) -> bool:
    """Join the process group that ``torchrun`` describes in the environment.

    Does nothing (and returns False) unless WORLD_SIZE is set and > 1; returns
    True when this process is part of an initialised multi-process group
    (already initialised counts). ``backend`` defaults to ``nccl`` when the
    work runs on CUDA (``device`` is cuda, or None and CUDA is available) and
    ``gloo`` otherwise. On CUDA the current device becomes ``cuda:LOCAL_RANK``.
    """
    if is_initialized():
        return dist.get_world_size() > 1
    size = _env_int("WORLD_SIZE")
    if size is None or size <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={size} but this PyTorch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={size} but {', '.join(missing)} not set: launch with "
            "`torchrun --nproc_per_node N ...` (or set the env:// variables yourself)"
        )
    dev_type = torch.device(device).type if device is not None else (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    if backend is None:
        backend = "nccl" if dev_type == "cuda" and torch.cuda.is_available() else "gloo"
    kwargs: dict = {}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if dev_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("init_from_env: device is cuda but CUDA is not available")
        lr = local_rank()
        if lr >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={lr} but only {torch.cuda.device_count()} CUDA devices are visible: "
                "use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(lr)
        if backend == "nccl":
            # Binds the communicator to this rank's GPU (no guessing in barrier()).
            kwargs["device_id"] = torch.device("cuda", lr)
    dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    return dist.get_world_size() > 1


@contextmanager
def process_group(
    backend: str | None = None,
    device: str | torch.device | None = None,
    timeout: datetime.timedelta | None = None,
) -> Iterator[bool]:
    """:func:`init_from_env` for the duration of a ``with`` block; yields its result.

    The group is destroyed on the way out, however the block ends (an
    exception, Ctrl-C), so a failing rank does not leave NCCL communicators
    behind. A group that already existed when the block started belongs to the
    caller and is left alone: ``fastfair.cli.main(["distill", ...])`` called
    from a script that set up its own group does not tear it down.

    Once per process: a second default group created in the same torchrun
    worker after the first was destroyed can hang on torchrun's store (the
    test suite saw it); scripts that run several jobs set the group up once.
    """
    owned = not is_initialized()
    try:
        yield init_from_env(backend=backend, device=device, timeout=timeout)
    finally:
        if owned:
            cleanup()


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank(group) if is_initialized() else 0


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size(group) if is_initialized() else 1


def local_rank() -> int:
    """Rank on this node (torchrun's LOCAL_RANK; 0 when unset)."""
    return _env_int("LOCAL_RANK") or 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and saves."""
    return rank() == 0


def _is_nccl(group: dist.ProcessGroup | None) -> bool:
    return dist.get_backend(group) == "nccl"


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank (no-op when not distributed)."""
    if _active(group):
        dist.barrier(group=group)


def _collective_tensor(tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """The tensor itself when a collective can work on it in place, else a
    contiguous copy on the backend's device (copied back by the caller)."""
    # NCCL only moves CUDA tensors; small CPU tensors (a logged loss, a step
    # counter) travel through the current device instead of failing.
    if tensor.device.type == "cpu" and _is_nccl(group):
        return tensor.to(torch.device("cuda", torch.cuda.current_device()), memory_format=torch.contiguous_format)
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def all_reduce_sum_(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum ``tensor`` over the ranks IN PLACE and return it (identity when not
    distributed). Integer tensors (counts) are reduced exactly in their dtype.
    Every rank must call it with a tensor of the same shape and dtype."""
    if not _active(group):
        return tensor
    work = _collective_tensor(tensor, group)
    dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def broadcast_(tensor: Tensor, src: int = 0, group: dist.ProcessGroup | None = None) -> Tensor:
    """Overwrite ``tensor`` with rank ``src``'s copy IN PLACE and return it."""
    if not _active(group):
        return tensor
    work = _collective_tensor(tensor, group)
    dist.broadcast(work, src=src, group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def shard(indices: Tensor, rank: int | None = None, world_size: int | None = None) -> Tensor:
    """This rank's share of a batch of indices.

    Contiguous, near-equal chunks in rank order (sizes differ by at most one,
    as ``torch.tensor_split``): concatenating the shards of ranks 0..W-1 gives
    back ``indices`` exactly, so a W-process run sees the same global batch as
    one process that samples ``indices``. Every rank must pass the same
    ``indices`` (sample them from a generator seeded identically on all ranks).
    """
    r = _current_rank() if rank is None else rank
    w = _current_world_size() if world_size is None else world_size
    if indices.dim() != 1:
        raise ValueError(f"shard: indices must be 1-D, got shape {tuple(indices.shape)}")
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"shard: need 0 <= rank < world_size, got rank={r}, world_size={w}")
    if w == 1:
        return indices
    return torch.tensor_split(indices, w)[r]


_current_rank, _current_world_size = rank, world_size  # shard()'s parameters shadow the names


def cleanup() -> None:
    """Leave the process group (no-op when not initialised)."""
    _WAIT_GROUPS.clear()
    if is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------
# Work that rank 0 does alone.

# How long the other ranks wait for rank 0's solo work (an evaluation during a
# run: ``eval_runs`` networks trained for up to 1000 epochs each, which can take
# hours at 128x128). Why a separate wait: left alone, those ranks would sit in
# the next iteration's all-reduce, and NCCL's watchdog aborts a collective
# after the group's timeout (10 minutes by default; gloo: 30), killing the job.
# Raising the whole group's timeout instead would also make a REAL hang in the
# distillation collectives go unnoticed for hours. So the group keeps its
# default, and the wait runs on a small gloo group (CPU: the idle GPUs do not
# spin) whose own timeout is this long one.
MAIN_ALONE_TIMEOUT = datetime.timedelta(hours=24)

_WAIT_GROUPS: dict[tuple[int, datetime.timedelta], dist.ProcessGroup] = {}
_T = TypeVar("_T")


def _wait_group(timeout: datetime.timedelta) -> dist.ProcessGroup:
    # new_group is collective: every rank reaches this at the same call of
    # run_on_main (the first one with this timeout), so the creation lines up.
    key = (id(dist.group.WORLD), timeout)
    if key not in _WAIT_GROUPS:
        _WAIT_GROUPS[key] = dist.new_group(backend="gloo", timeout=timeout)
    return _WAIT_GROUPS[key]


def run_on_main(fn: Callable[[], _T], timeout: datetime.timedelta = MAIN_ALONE_TIMEOUT) -> _T | None:
    """Call ``fn()`` on rank 0 alone while the other ranks wait for it, up to
    ``timeout`` (see :data:`MAIN_ALONE_TIMEOUT`); returns its result on rank 0
    and None elsewhere. Every rank must call it at the same point. In a single
    process it is just ``fn()``.

    If ``fn`` raises, rank 0 raises at once without joining the wait (torchrun
    then ends the other ranks); the wait never hides a failure.
    """
    if not _active():
        return fn()
    group = _wait_group(timeout)
    out = fn() if is_main() else None
    dist.barrier(group=group)
    return out


# ---------------------------------------------------------------------------
# Global segment statistics.


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision partial sums are reduced in float32, as the local ops accumulate.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is the identity.

    Identity, not another all-reduce: under the replicated-loss convention the
    upstream gradient is already the same on every rank and equals dL/d(global
    sum), which is also dL/d(this rank's partial sum).
    """

    @staticmethod
    def forward(ctx, local: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # noqa: ANN001
        out = local.clone(memory_format=torch.contiguous_format)
        return all_reduce_sum_(out, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        return grad, None


def segment_sum(
    x: Tensor, ids: Tensor, num_segments: int, group: dist.ProcessGroup | None = None
) -> Tensor:
    """Segment sums over the rows of ALL ranks: [num_segments, D] in x's dtype.

    Same contract as :func:`fastfair.ops.segment_sum` (which runs locally
    first); differentiable w.r.t. the local ``x`` (see the module docstring).
    """
    local = ops.segment_sum(x, ids, num_segments)
    if not _active(group):
        return local
    return _SumOverRanks.apply(local.to(_acc_dtype(x.dtype)), group).to(x.dtype)


def segment_count(ids: Tensor, num_segments: int, group: dist.ProcessGroup | None = None) -> Tensor:
    """Rows per segment over ALL ranks, int64 [num_segments] (reduced exactly)."""
    return all_reduce_sum_(ops.segment_count(ids, num_segments), group)


def segment_sum_count(
    x: Tensor, ids: Tensor, num_segments: int, group: dist.ProcessGroup | None = None
) -> tuple[Tensor, Tensor]:
    """Global sums (accumulation dtype: float32 for half inputs) and int64 counts.

    What :func:`fastfair.objectives.dm_matching_loss` takes as ``real_sum`` and
    ``real_count``; keeping the sum in the accumulation dtype avoids rounding
    half-precision sums twice.
    """
    local = ops.segment_sum(x, ids, num_segments).to(_acc_dtype(x.dtype))
    total = _SumOverRanks.apply(local, group) if _active(group) else local
    return total, segment_count(ids, num_segments, group)


def segment_mean(
    x: Tensor, ids: Tensor, num_segments: int, group: dist.ProcessGroup | None = None
) -> Tensor:
    """Segment means over the rows of ALL ranks: global sum / global count.

    A segment empty on every rank gives a zero row (never NaN); one empty on
    some ranks only is the mean of the rows the others hold. Differentiable
    w.r.t. the local ``x``: d mean[s] / d x_i = 1 / global_count[s] for the
    local rows i of segment s.
    """
    if not _active(group):
        return ops.segment_mean(x, ids, num_segments)
    total, count = segment_sum_count(x, ids, num_segments, group)
    mean = total / count.clamp(min=1).to(total.dtype).unsqueeze(1)
    return mean.to(x.dtype)
