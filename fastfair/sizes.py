"""Size estimates checked before allocating: an absurd option (a width of
200000, 10^8 images per class) is one clear error naming it, not an
allocator traceback or the OOM killer."""
from __future__ import annotations


def available_bytes() -> int:
    """Memory a new allocation can take now: MemAvailable on Linux, else the
    physical memory, else 2^40 (no limit known)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def check_fits(nbytes: float, what: str, fraction: float = 0.9) -> None:
    """ValueError when ``nbytes`` exceed ``fraction`` of the memory available."""
    free = available_bytes()
    if nbytes > fraction * free:
        raise ValueError(f"{what} needs about {_gib(nbytes)}, more than the {_gib(free)} of memory available")
