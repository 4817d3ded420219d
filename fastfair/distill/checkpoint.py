"""Checkpoints and the JSON-lines log of a run, both safe against a kill.

A checkpoint holds the state after ``iteration`` FINISHED iterations: the
stored synthetic images, their momentum buffer, the real-batch source's state
(DREAM's cached batch), the log so far, the elapsed seconds and the config.
Everything else an iteration needs is re-derived from (seed, iteration).
"""
from __future__ import annotations

import errno
import json
import math
import os
from typing import Any

import torch
from torch import Tensor

from .outdir import OutputError, atomic_write
from .synset import atomic_save

CHECKPOINT = "checkpoint.pt"
SYNSET = "synset.pt"
GRID = "grid.png"
LOG = "log.jsonl"
VERSION = 1


def save_checkpoint(out_dir: str, state: dict[str, Any]) -> str:
    path = os.path.join(out_dir, CHECKPOINT)
    atomic_save({"version": VERSION, **state}, path)
    return path


def load_checkpoint(out_dir: str) -> dict[str, Any] | None:
    """The checkpoint in ``out_dir``, or None when there is none. A file that
    is not a readable checkpoint dict of this version is a ValueError in one
    line (fields are checked against the run by :func:`check_fields`)."""
    path = os.path.join(out_dir, CHECKPOINT)
    if not os.path.exists(path):
        return None
    fix = "move it away to start afresh, or run without --resume (which overwrites it)"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, random bytes, empty, a foreign pickle: torch raises many types
        raise ValueError(f"cannot read {path} as a checkpoint ({type(exc).__name__}: it is damaged or not "
                         f"written by fastfair distill); {fix}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a fastfair checkpoint (it holds a {type(state).__name__}); {fix}")
    if state.get("version") != VERSION:
        raise ValueError(f"{path} has checkpoint version {state.get('version')!r}, expected {VERSION}; {fix}")
    return state


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_fields(state: dict[str, Any], path: str, *, iterations: int, images_shape: tuple[int, ...],
                 labels: Tensor, num_train: int, num_classes: int) -> None:
    """Every field of a loaded checkpoint, against the run that resumes it:
    a crafted or damaged field is a ValueError naming it, before anything
    of it is used."""
    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"{path}: field {field!r} {why}; the checkpoint is damaged or was not written by "
                          "this run (move it away to start afresh)")

    missing = sorted({"iteration", "images", "buf", "labels", "source", "log", "seconds", "config"} - set(state))
    if missing:
        raise bad(missing[0], "is missing")
    if not isinstance(state["config"], dict):
        raise bad("config", f"must be a dict, got {type(state['config']).__name__}")
    it = state["iteration"]
    if not _is_int(it) or it < 0:
        raise bad("iteration", f"must be a non-negative int, got {it!r}")
    if it > iterations:
        raise ValueError(f"the checkpoint {path} already has {it} iterations, more than the {iterations} requested")
    for field in ("images", "buf"):
        t = state[field]
        if t is None and field == "buf":
            continue
        if not isinstance(t, Tensor) or t.dtype != torch.float32 or tuple(t.shape) != tuple(images_shape):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise bad(field, f"must be a float32 tensor {tuple(images_shape)}, got {got}")
        if not bool(torch.isfinite(t).all()):
            raise bad(field, "holds non-finite values")
    lab = state["labels"]
    if not isinstance(lab, Tensor) or not torch.equal(lab.cpu(), labels.cpu()):
        raise bad("labels", "differs from the synthetic labels of this run")
    secs = state["seconds"]
    if isinstance(secs, bool) or not isinstance(secs, (int, float)) or not math.isfinite(secs) or secs < 0:
        raise bad("seconds", f"must be a non-negative number, got {secs!r}")
    log = state["log"]
    if not isinstance(log, list) or not all(isinstance(e, dict) and _is_int(e.get("iteration"))
                                            and 0 < e["iteration"] <= it for e in log):
        raise bad("log", f"must be a list of entries of iterations 1..{it}")
    ws = state.get("world_size", 1)
    if not _is_int(ws) or ws < 1:
        raise bad("world_size", f"must be a positive int, got {ws!r}")
    window = state.get("loss_window")
    if window is not None and not (
            isinstance(window, (tuple, list)) and len(window) == 2 and isinstance(window[0], Tensor)
            and window[0].dim() == 0 and window[0].is_floating_point() and bool(torch.isfinite(window[0]))
            and _is_int(window[1]) and window[1] >= 1):
        raise bad("loss_window", "must be (a finite 0-d float tensor, a positive int) or None")
    _check_source(state["source"], bad, num_train, num_classes)


def _check_source(src: Any, bad: Any, num_train: int, num_classes: int) -> None:
    """The real-batch source's state: {} or DREAM's cached batch."""
    if not isinstance(src, dict):
        raise bad("source", f"must be a dict, got {type(src).__name__}")
    if not src:
        return
    idx, sizes, offsets = src.get("indices"), src.get("sizes"), src.get("offsets")
    if (not isinstance(idx, Tensor) or idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64)
            or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_train))):
        raise bad("source", f"indices must be an int tensor [n] of rows in [0, {num_train})")
    if (not isinstance(sizes, list) or len(sizes) != num_classes
            or not all(_is_int(v) and v >= 0 for v in sizes) or sum(sizes) != idx.numel()):
        raise bad("source", f"sizes must be {num_classes} non-negative ints summing to the {idx.numel()} indices")
    if offsets is not None and (not isinstance(offsets, list) or len(offsets) != num_classes
                                or not all(_is_int(v) and v >= 0 for v in offsets)):
        raise bad("source", f"offsets must be None or {num_classes} non-negative ints")


def append_log(out_dir: str, entry: dict[str, Any]) -> None:
    path = os.path.join(out_dir, LOG)
    try:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")
    except OSError as exc:
        raise OutputError(exc.errno or errno.EIO, f"cannot append to {path}: {exc.strerror or exc}") from exc


def rewrite_log(out_dir: str, entries: list[dict[str, Any]]) -> None:
    """Replace log.jsonl with ``entries`` (on resume: drop the lines of
    iterations that the checkpoint does not contain)."""
    text = "".join(json.dumps(e) + "\n" for e in entries).encode()
    atomic_write(os.path.join(out_dir, LOG), lambda f: f.write(text))
