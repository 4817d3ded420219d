"""On-disk cache of processed datasets: root/fastfair_cache/<name>-<key>.pt.

The key hashes everything that changes the tensors (name, resolved options,
bias ratio and seed where the loader uses them, and a format version), so a
different option never reads a stale file. Writes go to a temporary file in
the same folder first and are renamed into place (os.replace is atomic on
POSIX), so a crash or a concurrent writer never leaves a half-written cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from typing import Any

import torch

from .core import Raw

# Bump when a loader's output changes for the same key, to invalidate old files.
FORMAT_VERSION = 3  # 2: C-MNIST reference recipe (padding, floor/ceil colour counts); 3: C-FMNIST reference colouring
CACHE_DIR = "fastfair_cache"


def cache_key(name: str, params: dict[str, Any]) -> str:
    blob = json.dumps({"name": name, "version": FORMAT_VERSION, **params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(root: str, name: str, params: dict[str, Any]) -> str:
    return os.path.join(root, CACHE_DIR, f"{name}-{cache_key(name, params)}.pt")


def read(path: str) -> Raw | None:
    """The cached dataset, or None if absent or unreadable (then rebuilt)."""
    if not os.path.isfile(path):
        return None
    try:
        return Raw.from_state(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # a corrupt or foreign file: rebuild rather than fail
        warnings.warn(f"ignoring unreadable dataset cache {path}: {exc}", stacklevel=3)
        return None


def write(path: str, raw: Raw) -> None:
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except OSError as exc:  # a read-only data root still loads, just uncached
        warnings.warn(f"cannot write the dataset cache in {folder}: {exc}", stacklevel=3)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(raw.to_state(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        # A full disk (torch's zip writer reports a failed write as a
        # RuntimeError): the dataset is in memory, so load it uncached like
        # a read-only root.
        _unlink(tmp)
        warnings.warn(f"cannot write the dataset cache {path}: {' '.join(str(exc).split())[:200]}; "
                      "loading uncached", stacklevel=3)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
