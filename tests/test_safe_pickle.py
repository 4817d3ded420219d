"""CIFAR batches are read with an allow-list unpickler: genuine batches (in
the published Python 2 layout and as Python 3 re-saves) load, a crafted one
never runs code and ends with one error naming the file."""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

from fastfair.data.safe_pickle import load_batch


def py2_batch(labels: list[int], data: np.ndarray) -> bytes:
    """A CIFAR batch as the published files hold it: a protocol-2 pickle
    written by Python 2 (byte strings as SHORT_BINSTRING / BINSTRING, the
    array through numpy.core.multiarray._reconstruct), opcode by opcode."""
    def s(text: bytes) -> bytes:  # SHORT_BINSTRING
        return b"U" + bytes([len(text)]) + text

    n = data.shape[0]
    dtype = (b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85" + s(b"b")
             + b"\x87R" + b"(K\x01" + b"K" + bytes([n]) + b"M\x00\x0c\x86" + dtype + b"\x89"
             + b"T" + struct.pack("<i", data.nbytes) + data.tobytes() + b"tb")
    labs = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return (b"\x80\x02}(" + s(b"batch_label") + s(b"testing batch 1 of 1") + s(b"labels") + labs
            + s(b"data") + array + b"u.")


def test_genuine_python2_batch_loads(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    path = tmp_path / "data_batch_1"
    path.write_bytes(py2_batch([3, 7, 1], data))
    entry = load_batch(str(path))
    assert entry["labels"] == [3, 7, 1] and entry["batch_label"] == "testing batch 1 of 1"
    assert entry["data"].dtype == np.uint8 and np.array_equal(entry["data"], data)
    # the same file through the stock unpickler (the reference reading)
    with open(path, "rb") as f:
        ref = pickle.load(f, encoding="latin1")
    assert np.array_equal(ref["data"], entry["data"])


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_python3_resaved_batch_loads(tmp_path, protocol):
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    obj = {"data": data, "labels": list(np.array([1, 2])), "filenames": [b"a.png", "b.png"]}
    path = tmp_path / "b"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    entry = load_batch(str(path))
    assert np.array_equal(entry["data"], data) and [int(v) for v in entry["labels"]] == [1, 2]
    assert entry["filenames"] == [b"a.png", "b.png"]


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cifar_root(tmp_path, payload: bytes) -> str:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    ok = pickle.dumps({"data": np.zeros((10, 3072), np.uint8), "labels": list(range(10))}, protocol=2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(ok)
    (folder / "data_batch_1").write_bytes(payload)
    return str(tmp_path)


def test_crafted_batch_does_not_run_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"data": _Exploit(str(marker)), "labels": [0]}, protocol=2)
    root = _cifar_root(tmp_path, payload)
    path = os.path.join(root, "cifar-10-batches-py", "data_batch_1")
    with pytest.raises(ValueError, match=f"{path}: refusing to unpickle.*posix.system"):
        load_batch(path)
    assert not marker.exists()
    # through the CLI, in a fresh process: one line, exit 2, no marker
    r = subprocess.run([sys.executable, "-m", "fastfair", "distill", "--dataset", "cifar10-s", "--root", root,
                        "--out", str(tmp_path / "o"), "--iterations", "1", "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and not marker.exists(), r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "data_batch_1" in lines[0] and "refusing to unpickle" in lines[0], r.stderr


@pytest.mark.parametrize("blob,match", [
    (pickle.dumps(np.array([object()], dtype=object), protocol=2), "object dtype"),
    (b"garbage, not a pickle", "not a CIFAR batch pickle"),
    (pickle.dumps({"data": 1}, protocol=2)[:-3], "not a CIFAR batch pickle"),
    (b"", "not a CIFAR batch pickle"),
    (pickle.dumps(np.ma.masked_array([1, 2]), protocol=2), "refusing to unpickle"),
])
def test_refused_blobs(tmp_path, blob, match):
    path = tmp_path / "x"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=match):
        load_batch(str(path))


def test_loader_checks_batch_contents(tmp_path):
    from fastfair import data

    bad = pickle.dumps({"data": np.zeros((10, 100), np.uint8), "labels": list(range(10))}, protocol=2)
    root = _cifar_root(tmp_path, bad)
    with pytest.raises(ValueError, match=r"data_batch_1: 'data' must be a uint8 array \[N, 3072\]"):
        data.load("cifar10-s", root=root)
