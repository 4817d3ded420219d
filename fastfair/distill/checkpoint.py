"""Checkpoints and the JSON-lines log of a run, both safe against a kill.

A checkpoint holds the state after ``iteration`` FINISHED iterations: the
stored synthetic images, their momentum buffer, the real-batch source's state
(DREAM's cached batch), the log so far, the elapsed seconds and the config.
Everything else an iteration needs is re-derived from (seed, iteration).
"""
from __future__ import annotations

import errno
import json
import os
from typing import Any

import torch

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
    """The checkpoint in ``out_dir``, or None when there is none."""
    path = os.path.join(out_dir, CHECKPOINT)
    if not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != VERSION:
        raise ValueError(f"{path} has checkpoint version {state.get('version')!r}, expected {VERSION}")
    return state


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
