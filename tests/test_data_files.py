"""Damaged source files and a full cache disk (issue 13.9, 13.12, 13.14):
IDX geometry is the dataset's, a truncated / garbage IDX or .gz is one
ValueError naming the file, and a cache that cannot be written loads the
dataset uncached with a warning."""
from __future__ import annotations

import errno
import gzip
import os
import struct

import numpy as np
import pytest
import torch

from fastfair import cli, data
from fastfair.data import cache

RAW = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def make_mnist(root, size=28, n=20, gz=False) -> str:
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    for stem, arr in zip(RAW, (images, labels, images, labels)):
        blob = idx(arr)
        if gz:
            with gzip.open(os.path.join(raw, stem + ".gz"), "wb") as f:
                f.write(blob)
        else:
            with open(os.path.join(raw, stem), "wb") as f:
                f.write(blob)
    return raw


def test_wrong_geometry_is_refused(tmp_path):
    make_mnist(tmp_path, size=10)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: MNIST images are 28x28, this file holds 10x10"):
        data.load("cmnist-fg", root=str(tmp_path), cache=False)


def test_genuine_files_load(tmp_path):
    make_mnist(tmp_path, gz=True)
    ds = data.load("cmnist-fg", root=str(tmp_path), cache=False)
    assert len(ds.train) == 20


def _damage(path: str, how: str) -> None:
    blob = open(path, "rb").read()
    out = {"truncated": blob[: len(blob) // 2], "header": blob[:6], "garbage": os.urandom(300), "empty": b"",
           "labels-as-images": idx(np.zeros(20, np.uint8))}[how]
    with open(path, "wb") as f:
        f.write(out)


@pytest.mark.parametrize("how,match", [
    ("truncated", "truncated or damaged"), ("header", "truncated IDX header"), ("garbage", "not an unsigned-byte IDX"),
    ("empty", "too short"), ("labels-as-images", "1 dimensions, expected 3"),
])
def test_damaged_idx(tmp_path, how, match):
    raw = make_mnist(tmp_path)
    _damage(os.path.join(raw, RAW[0]), how)
    with pytest.raises(ValueError, match=match):
        data.load("cmnist-fg", root=str(tmp_path), cache=False)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_damaged_gz_is_one_line_exit_2(tmp_path, capsys, how):
    raw = make_mnist(tmp_path, gz=True)
    path = os.path.join(raw, RAW[0] + ".gz")
    if how == "garbage":  # a gzip magic, then junk
        open(path, "wb").write(b"\x1f\x8b\x08\x00" + os.urandom(200))
    else:
        _damage(path, how)
    code = cli.main(["distill", "--dataset", "cmnist-fg", "--root", str(tmp_path), "--out", str(tmp_path / "o"),
                     "--iterations", "1", "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and RAW[0] + ".gz" in err, err
    assert "Traceback" not in err


def test_full_disk_cache_loads_uncached(tmp_path, monkeypatch):
    make_mnist(tmp_path)
    real = torch.save

    def full(obj, f, *a, **kw):
        if hasattr(f, "write"):
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full)
    with pytest.warns(UserWarning, match="cannot write the dataset cache.*No space left.*uncached"):
        ds = data.load("cmnist-fg", root=str(tmp_path))
    assert len(ds.train) == 20
    folder = tmp_path / cache.CACHE_DIR
    assert not folder.exists() or not list(folder.iterdir())  # no partial file left
