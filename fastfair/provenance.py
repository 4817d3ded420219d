"""Where and on what code a result was measured, recorded beside it.

Committed results outlive the code that made them: a kernel change can move
a cell's numbers at rounding level (the CPU segment ops' v6 summation order
did), and a timing means nothing without the machine and its load. So every
``reproduce`` cell records :func:`build` and every summary :func:`machine`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
from typing import Any


def machine() -> dict[str, Any]:
    """The machine, torch and thread count, and the load at the moment of asking."""
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": sys.version.split()[0]}
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def _git_commit(path: str) -> str | None:
    """The checkout's commit, ``+dirty`` when tracked files differ from it; None
    outside a git checkout (an installed wheel, an archive) or without git."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", path, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return commit + ("+dirty" if dirty else "")


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def build() -> dict[str, Any]:
    """The fastfair code that ran: its version, the source checkout's commit
    (None when not run from one), which ops ran (``ops.backend()``: compiled
    ``cpu`` / ``cuda`` kernels or the pure-PyTorch ``reference``) and the
    compiled extension's file hash, which names the kernel build even where no
    commit is known."""
    from . import __version__, ops

    pkg = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.find_spec("fastfair._C")
    ext = spec.origin if spec is not None and spec.origin and os.path.isfile(spec.origin) else None
    backend = ops.backend()
    return {"fastfair": __version__, "commit": _git_commit(os.path.dirname(pkg)), "backend": backend,
            "extension_sha256": _file_sha256(ext) if ext and backend != "reference" else None}
