"""Peak memory of one step, and the out-of-memory guards of the step-time
benchmark (:mod:`fastfair.bench.step_time`, whose docstring, "Peak memory",
says what each number counts)."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Callable

import torch


def _proc_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMeter:
    """Peak memory a call adds (fastfair.bench.step_time's docstring, "Peak memory")."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.reason: str | None = None
        self._trim = None
        if self.cuda:
            self.method = "cuda max_memory_allocated - memory_allocated at step start"
            return
        self.method = "cpu VmHWM after step - VmRSS before (clear_refs 5, malloc_trim)"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _proc_kb("VmHWM")
        except OSError as e:
            self.reason = f"no resettable resident-set high-water mark here ({e})"
        libc = ctypes.util.find_library("c")
        try:
            self._trim = ctypes.CDLL(libc).malloc_trim if libc else None
        except (OSError, AttributeError):
            self._trim = None

    def measure(self, fn: Callable[[], object]) -> tuple[float | None, float | None]:
        """(peak_mb, base_mb) of one call of ``fn``."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            out = fn()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - base
            del out
            return peak / 2**20, base / 2**20
        if self.reason is not None:
            fn()
            return None, None
        if self._trim is not None:
            self._trim(0)  # hand free heap back, so the step's pages show as a rise
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_kb("VmRSS")
        out = fn()
        peak = _proc_kb("VmHWM") - base
        del out
        return peak / 1024, base / 1024


def cpu_too_big(rows: int, width: int, size: int) -> str | None:
    """Refusal text when two first-layer activations of ``rows`` images cannot fit."""
    need = 2 * rows * width * size * size * 4
    avail = _mem_available_bytes()
    if avail is not None and need > avail:
        return (f"skipped: needs at least {need / 2**30:.1f} GiB (two first-layer activations of "
                f"{rows} images) and {avail / 2**30:.1f} GiB is available")
    return None


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e))


def free_cache(device: torch.device) -> None:
    # CUDA only: a full collection costs ~0.2 s once torch._dynamo is imported,
    # and on CPU freed tensors go back to the allocator without it.
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
