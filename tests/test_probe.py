"""The black-box probe of issue 13 as a test table: bad inputs (CLI
invocations, crafted files, public Python calls into the ops and
segment_gradients), each run in a FRESH subprocess so that a crash, an
abort or a hang is seen as one, with the expected exit code and error.

CLI rows must end with exit code 2 and exactly one stderr line (no
traceback); Python rows with the expected exception class on the last
stderr line (exit code 1), never a signal. Rows of other helpers' items
(ops.py, the C++ boundary of 13.3) xfail while their fix is not merged.
Field-by-field variants live in the in-process tests (test_checkpoint_fields,
test_eval_inputs, ...); this table keeps one row per kind of bad input.

Cost: one tiny distillation to make a genuine checkpoint, then every row in
a small thread pool; the embedded cdigits dataset, 1-2 iterations, width-8
networks, so the file stays within two minutes on two cores.
"""
from __future__ import annotations

import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TIMEOUT = 240  # seconds per row: a hang fails the row, not the suite
TINY = ["--dataset", "cdigits-fg", "--ipc", "1", "--width", "8", "--depth", "1", "--batch-real", "4",
        "--no-progress", "--device", "cpu", "--log-every", "1"]
TINY_EVAL = ["--epochs", "1", "--runs", "1", "--width", "8", "--no-progress", "--device", "cpu"]


@dataclass
class Case:
    id: str
    argv: list[str] | None = None  # after `python -m fastfair`; {tmp} / {base} are replaced
    code: str | None = None  # `python -c` instead of the CLI
    rc: int = 2
    err: tuple[str, ...] = ()  # substrings of stderr
    exc: str | tuple[str, ...] | None = None  # Python rows: the exception class(es) on the last stderr line
    setup: Callable[[Path, Path], Callable[[], None] | None] | None = None  # (tmp, base) -> cleanup
    check: Callable[[Path], None] | None = None  # postconditions on tmp
    other: str | None = None  # another helper's item: xfail while its fix is not on main


# --------------------------------------------------------------------------- crafted files


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cifar_exploit(tmp: Path, base: Path) -> None:
    import numpy as np

    folder = tmp / "root" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    ok = pickle.dumps({"data": np.zeros((10, 3072), np.uint8), "labels": list(range(10))}, protocol=2)
    for name in [f"data_batch_{i}" for i in range(2, 6)] + ["test_batch"]:
        (folder / name).write_bytes(ok)
    evil = {"data": _Exploit(str(tmp / "pwned")), "labels": [0]}
    (folder / "data_batch_1").write_bytes(pickle.dumps(evil, protocol=2))


def _no_marker(tmp: Path) -> None:
    assert not (tmp / "pwned").exists(), "the crafted pickle ran code"


def _idx(shape: tuple[int, ...]) -> bytes:
    import struct

    n = 1
    for s in shape:
        n *= s
    return bytes([0, 0, 0x08, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + bytes(n)


def _mnist(tmp: Path, size: int = 28, damage: str | None = None) -> None:
    import gzip

    raw = tmp / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    files = {"train-images-idx3-ubyte": _idx((20, size, size)), "train-labels-idx1-ubyte": _idx((20,)),
             "t10k-images-idx3-ubyte": _idx((20, size, size)), "t10k-labels-idx1-ubyte": _idx((20,))}
    for name, blob in files.items():
        if name == "train-images-idx3-ubyte" and damage == "truncated":
            blob = blob[:100]
        if name == "train-images-idx3-ubyte" and damage == "gz":
            (raw / (name + ".gz")).write_bytes(gzip.compress(blob)[:40])
            continue
        (raw / name).write_bytes(blob)


def _copy_base(tmp: Path, base: Path) -> Path:
    out = tmp / "run"
    shutil.copytree(base, out)
    return out


def _damaged_checkpoint(how: str) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, base: Path) -> None:
        import torch

        path = _copy_base(tmp, base) / "checkpoint.pt"
        blob = path.read_bytes()
        state = torch.load(path, weights_only=True)
        if how == "truncated":
            path.write_bytes(blob[: len(blob) // 2])
        elif how == "empty":
            path.write_bytes(b"")
        elif how == "foreign":
            path.write_bytes(pickle.dumps(_Exploit(str(tmp / "pwned"))))
        elif how == "list":
            torch.save([1, 2, 3], path)
        else:  # a field edit
            if how == "no-config":
                del state["config"]
            elif how == "iteration-negative":
                state["iteration"] = -5
            elif how == "images-nan":
                state["images"][0, 0, 0, 0] = float("nan")
            elif how == "images-shape":
                state["images"] = state["images"][:, :, :14, :14].contiguous()
            torch.save(state, path)
    return setup


def _eval_synset(**over: object) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, base: Path) -> None:
        import torch

        syn = torch.load(base / "synset.pt", weights_only=True)
        for k, v in over.items():
            if k == "nan":
                syn["images"][0, 0, 0, 0] = float("nan")
            else:
                syn[k] = v
        (tmp / "syn").mkdir()
        torch.save(syn, tmp / "syn" / "synset.pt")
    return setup


def _hold_lock(tmp: Path, base: Path) -> Callable[[], None]:
    # Another run holding --out: the lock protocol of fastfair.distill.outdir
    # (flock on OUT/.fastfair.lock holding the pid), without importing torch.
    out = tmp / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys, time
            fd = os.open({str(out / '.fastfair.lock')!r}, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, str(os.getpid()).encode())
            print("locked", flush=True)
            time.sleep(600)""")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    (tmp / "holder.pid").write_text(str(holder.pid))

    def cleanup() -> None:
        holder.kill()
        holder.wait()
    return cleanup


def _stale_lock(tmp: Path, base: Path) -> None:
    # A lock file left by a run that died: no process holds the flock.
    out = _copy_base(tmp, base)
    (out / ".fastfair.lock").write_text("999999\n")


def _no_tmp_files(tmp: Path) -> None:
    left = [p.name for p in (tmp / "run").iterdir() if ".tmp" in p.name] if (tmp / "run").exists() else []
    assert not left, f"temporary files left behind: {left}"


# --------------------------------------------------------------------------- issue 25's crafted files


def _png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels, with (almost) no pixel data:
    a few hundred bytes, as an attacker would send."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def _utkface_with(bad_name: str, bad: bytes | None) -> Callable[[Path, Path], None]:
    """A UTKFace folder of tiny valid images (2 per cell) plus one bad file
    (``bad`` None: a FIFO) named like an image of a valid cell."""
    def setup(tmp: Path, base: Path) -> None:
        from PIL import Image

        folder = tmp / "root" / "UTKFace"
        folder.mkdir(parents=True)
        for age in (10, 30, 50):
            for race in range(4):
                for k in range(3):
                    Image.new("RGB", (8, 8), (40 * race, 9 * k, age)).save(folder / f"{age}_0_{race}_{k}.jpg")
        if bad is None:
            os.mkfifo(folder / bad_name)
        else:
            (folder / bad_name).write_bytes(bad)
    return setup


UTK = ["distill", "--dataset", "utkface", "--root", "{tmp}/root", "--data-option", "n_test_per_cell=1",
       "--data-option", "image_size=8", "--ipc", "1", "--width", "8", "--depth", "1", "--batch-real", "2",
       "--iterations", "1", "--no-progress", "--device", "cpu", "--out", "{tmp}/o"]


def _gzip_bomb(tmp: Path, base: Path) -> None:
    """train-images-idx3-ubyte.gz whose header claims 60000 x 28 x 28 but
    whose body decompresses to 4 GiB of zeros (streamed: the test itself
    never holds it)."""
    import gzip
    import struct

    _mnist(tmp)
    raw = tmp / "root" / "MNIST" / "raw"
    for f in raw.glob("train-images*"):
        f.unlink()
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(struct.pack(">HBB3I", 0, 8, 3, 5_000_000, 28, 28))  # 3.9 GB claimed: over the cap
        zeros = b"\x00" * (1 << 20)
        for _ in range(64):  # 64 MB written: enough to show nothing is decompressed in full
            f.write(zeros)


def _synset_with(**over: object) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, base: Path) -> None:
        import torch

        syn = torch.load(base / "synset.pt", weights_only=True)
        for k, v in over.items():
            if k == "model":
                syn["config"]["model"] = v
            else:
                syn[k] = v
        (tmp / "syn").mkdir()
        torch.save(syn, tmp / "syn" / "synset.pt")
    return setup


def _nothing_outside(tmp: Path) -> None:
    made = sorted(p.name for p in tmp.iterdir())
    assert made == ["exp", "syn"], f"written outside --out: {made}"
    assert [p.name for p in (tmp / "exp").iterdir()] and all(".." not in p.name for p in (tmp / "exp").iterdir())


def _reproduce_state(name: str, text: str) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, base: Path) -> None:
        cell = tmp / "rep" / "cdigits-fg" / "dm_vanilla_ipc10"
        cell.mkdir(parents=True)
        target = tmp / "rep" / name if name == "results.json" else cell / name
        target.write_text(text)
    return setup


REPRODUCE = ["reproduce", "--table", "cdigits", "--budget", "tiny", "--datasets", "cdigits-fg", "--cells",
             "dm:vanilla", "--out", "{tmp}/rep", "--device", "cpu"]

_TORCH_DISK_FULL = """
import sys, torch
real = torch.save
def save(obj, f, *a, **kw):
    if hasattr(f, "write"):
        f.write(b"x" * 4096)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4032")
    return real(obj, f, *a, **kw)
torch.save = save
from fastfair import cli
sys.exit(cli.main({argv!r}))
"""


# --------------------------------------------------------------------------- Python rows

_DISK_FULL = """
import errno, sys, torch
real = torch.save
def save(obj, f, *a, **kw):
    if hasattr(f, "write"):
        f.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(obj, f, *a, **kw)
torch.save = save
from fastfair import cli
sys.exit(cli.main({argv!r}))
"""

_READ_ONLY = """
import errno, sys, tempfile
def mkstemp(*a, **kw):
    raise OSError(errno.EROFS, "Read-only file system")
tempfile.mkstemp = mkstemp
from fastfair import cli
sys.exit(cli.main({argv!r}))
"""

_BN_NO_AFFINE = """
import torch
from torch import nn
from fastfair import pergroup
m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.Flatten(), nn.Linear(4 * 36, 3))
pergroup.segment_gradients(m, torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]), torch.arange(4), 4)
"""

_OUTSIDE_USE = """
import torch
import torch.nn.functional as F
from torch import nn
from fastfair import pergroup
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 3)
    def forward(self, x):
        h = self.a(x)
        return self.b(h + F.linear(h, self.a.weight))
pergroup.segment_gradients(Net(), torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6) % 3, 3)
"""

_OPS = {
    "ids-out-of-range": "ops.segment_sum(torch.ones(2, 1), torch.tensor([0, 5]), 3)",
    "num-segments-2**63": "ops.segment_sum(torch.ones(2, 1), torch.zeros(2, dtype=torch.long), 2 ** 63)",
    "label-2**30-int32": ("ops.fair_dm_loss(torch.randn(4, 3), torch.tensor([0, 1, 2 ** 30, 0], dtype=torch.int32), "
                          "torch.zeros(4, dtype=torch.int32), torch.randn(2, 3), torch.tensor([0, 1]), 2, 4)"),
    "label-2**62-int64": ("ops.fair_dm_loss(torch.randn(4, 3), torch.tensor([0, 1, 2 ** 62, 0]), "
                          "torch.zeros(4, dtype=torch.long), torch.randn(2, 3), torch.tensor([0, 1]), 2, 4)"),
    "cpu-x-meta-ids": "ops.segment_sum(torch.ones(2, 1), torch.zeros(2, dtype=torch.long, device='meta'), 3)",
    "raw-op-cpu-x-meta-ids": ("torch.ops.fastfair.segment_sum(torch.ones(2, 1), "
                              "torch.zeros(2, dtype=torch.long, device='meta'), 3)"),
    "raw-op-dilation-2**63-1": ("torch.ops.fastfair.segment_conv2d_weight_grad(torch.ones(1, 1, 2, 2), "
                                "torch.ones(1, 1, 4, 4), torch.zeros(1, dtype=torch.long), 1, [2, 2], [1, 1], "
                                "[0, 0], [2 ** 63 - 1, 2 ** 63 - 1])"),
}


def _op(expr: str) -> str:
    return f"import torch\nfrom fastfair import ops\nops.backend()\nprint({expr})\n"


# --------------------------------------------------------------------------- the table

DISTILL = ["distill", *TINY, "--iterations", "2", "--out", "{tmp}/run"]
RESUME = ["distill", *TINY, "--iterations", "2", "--checkpoint-every", "1", "--resume", "--out", "{tmp}/run"]

CASES = [
    # 13.1: code execution from a data file
    Case("cifar-crafted-pickle", ["distill", "--dataset", "cifar10-s", "--root", "{tmp}/root", "--out", "{tmp}/o",
                                  "--iterations", "1", "--no-progress"],
         err=("data_batch_1", "refusing to unpickle"), setup=_cifar_exploit, check=_no_marker),
    # 13.6: non-finite runs
    Case("lr-img-inf", [*DISTILL, "--lr-img", "inf"], err=("non-finite", "--lr-img")),
    Case("lr-img-1e30", [*DISTILL, "--lr-img", "1e30"], err=("non-finite",)),
    # 13.7 / 13.8: eval of a bad synthetic set
    Case("eval-nan-synset", ["eval", "{tmp}/syn", *TINY_EVAL], err=("non-finite",), setup=_eval_synset(nan=True)),
    Case("eval-config-string", ["eval", "{tmp}/syn", *TINY_EVAL], err=("'config' must be a dict",),
         setup=_eval_synset(config="cdigits-fg")),
    Case("eval-not-a-synset", ["eval", "{tmp}/syn", *TINY_EVAL], err=("cannot read",),
         setup=lambda tmp, base: ((tmp / "syn").mkdir(), (tmp / "syn" / "synset.pt").write_bytes(b"\x80\x04junk"))),
    # 13.8 / 13.14: --resume of a damaged or crafted checkpoint
    *[Case(f"resume-{how}", RESUME, err=(match, "checkpoint.pt"), setup=_damaged_checkpoint(how),
           check=_no_marker if how == "foreign" else None)
      for how, match in [("truncated", "cannot read"), ("empty", "cannot read"),
                         ("foreign", "cannot read"), ("list", "not a fastfair checkpoint"),
                         ("no-config", "'config'"), ("iteration-negative", "'iteration'"),
                         ("images-nan", "'images' holds non-finite"),
                         ("images-shape", "'images' must be")]],
    # 13.9 / 13.14: IDX files
    Case("mnist-10x10", ["distill", "--dataset", "cmnist-fg", "--root", "{tmp}/root", "--out", "{tmp}/o",
                         "--iterations", "1", "--no-progress"], err=("28x28",),
         setup=lambda tmp, base: _mnist(tmp, size=10)),
    Case("mnist-truncated-idx", ["distill", "--dataset", "cmnist-fg", "--root", "{tmp}/root", "--out", "{tmp}/o",
                                 "--iterations", "1", "--no-progress"], err=("train-images-idx3-ubyte",),
         setup=lambda tmp, base: _mnist(tmp, damage="truncated")),
    Case("mnist-broken-gz", ["distill", "--dataset", "cmnist-fg", "--root", "{tmp}/root", "--out", "{tmp}/o",
                             "--iterations", "1", "--no-progress"], err=("train-images-idx3-ubyte.gz",),
         setup=lambda tmp, base: _mnist(tmp, damage="gz")),
    # 13.10: two runs into one --out; a dead run's lock
    Case("out-locked", DISTILL, err=("in use by another fastfair run", "pid "), setup=_hold_lock),
    Case("out-stale-lock", RESUME, rc=0, setup=_stale_lock),
    # 13.11 / 13.12 / 13.14: unwritable outputs
    Case("disk-full-checkpoint", code=_DISK_FULL.format(argv=[*DISTILL[:-2], "--checkpoint-every", "1", "--out",
                                                             "{tmp}/run"]),
         err=("No space left on device",), check=_no_tmp_files),
    Case("out-read-only", code=_READ_ONLY.format(argv=[*DISTILL[:-2], "--out", "{tmp}/run"]),
         err=("not writable", "Read-only file system")),
    Case("out-under-a-file", [*DISTILL[:-2], "--out", "{tmp}/f/run"], err=("not a directory",),
         setup=lambda tmp, base: (tmp / "f").write_text("x")),
    Case("eval-json-unwritable", ["eval", "--baseline", "random", "--dataset", "cdigits-fg", "--json",
                                  "{tmp}/f/m.json", *TINY_EVAL], err=("--json",),
         setup=lambda tmp, base: (tmp / "f").write_text("x")),
    # 13.4 / 13.5: segment_gradients refusals
    Case("pergroup-bn-affine-false-train", code=_BN_NO_AFFINE, rc=1, exc="ValueError", err=("training mode",)),
    Case("pergroup-parameter-outside-module", code=_OUTSIDE_USE, rc=1, exc="ValueError",
         err=("'a.weight' enters the loss 2 time(s)",)),
    # ops (13.2, 13.3, 13.14): the checks live in fastfair/ops/ and csrc/
    Case("op-ids-out-of-range", code=_op(_OPS["ids-out-of-range"]), rc=1, exc="ValueError", err=("ids[1] = 5",)),
    Case("op-num-segments-2**63", code=_op(_OPS["num-segments-2**63"]), rc=1, exc="ValueError",
         err=("num_segments",), other="ops (13.14)"),
    Case("op-label-2**30-int32", code=_op(_OPS["label-2**30-int32"]), rc=1, exc="ValueError",
         err=("1073741824",), other="ops (13.2)"),
    Case("op-label-2**62-int64", code=_op(_OPS["label-2**62-int64"]), rc=1, exc="ValueError",
         err=(str(2 ** 62),), other="ops (13.2)"),
    Case("op-cpu-x-meta-ids", code=_op(_OPS["cpu-x-meta-ids"]), rc=1, exc="ValueError", err=("meta",),
         other="ops (13.14)"),
    Case("raw-op-cpu-x-meta-ids", code=_op(_OPS["raw-op-cpu-x-meta-ids"]), rc=1, exc=("RuntimeError", "ValueError"),
         err=("meta",), other="kern (13.3)"),
    Case("raw-op-dilation-2**63-1", code=_op(_OPS["raw-op-dilation-2**63-1"]), rc=1,
         exc=("RuntimeError", "ValueError"), other="kern (13.3)"),
    # issue 25
    Case("export-path-traversal", ["export", "{tmp}/syn", "--out", "{tmp}/exp/"], rc=0,
         setup=_synset_with(model="/../../../../x/pwn"), check=_nothing_outside),
    Case("export-empty-set", ["export", "{tmp}/syn", "--out", "{tmp}/exp/"], err=("synset.pt",),
         setup=lambda tmp, base: _synset_empty(tmp, base)),
    Case("export-labels-1e12", ["export", "{tmp}/syn", "--out", "{tmp}/exp/"], err=("synset.pt",),
         setup=lambda tmp, base: _synset_labels(tmp, base, 10 ** 12)),
    Case("disk-full-torch-writer", code=_TORCH_DISK_FULL.format(argv=[*DISTILL[:-2], "--checkpoint-every", "1",
                                                                     "--out", "{tmp}/run"]),
         err=("cannot write", "checkpoint.pt", "disk full"), check=_no_tmp_files),
    Case("utkface-bomb-png", UTK, err=("10_0_0_9.jpg", "decompression bomb"),
         setup=_utkface_with("10_0_0_9.jpg", _png_header(20000, 20000))),
    Case("utkface-2e6x1-png", UTK, err=("10_0_0_9.jpg", "elongated"),
         setup=_utkface_with("10_0_0_9.jpg", _png_header(2_000_000, 1))),
    Case("utkface-fifo", UTK, rc=0, setup=_utkface_with("10_0_0_9.jpg", None)),
    Case("mnist-gzip-bomb", ["distill", "--dataset", "cmnist-fg", "--root", "{tmp}/root", "--out", "{tmp}/o",
                             "--iterations", "1", "--no-progress"], err=("train-images-idx3-ubyte.gz", "header says"),
         setup=_gzip_bomb),
    Case("celeba-attr-one-line", ["distill", "--dataset", "celeba", "--root", "{tmp}/root", "--out", "{tmp}/o",
                                  "--iterations", "1", "--no-progress"], err=("list_attr_celeba.txt", "line"),
         setup=lambda tmp, base: _celeba_attr(tmp, "3\n")),
    Case("celeba-attr-bad-int", ["distill", "--dataset", "celeba", "--root", "{tmp}/root", "--out", "{tmp}/o",
                                 "--iterations", "1", "--no-progress"], err=("list_attr_celeba.txt, line 3",),
         setup=lambda tmp, base: _celeba_attr(tmp, "1\nAttractive Male\n000001.jpg 1 x\n")),
    *[Case(f"reproduce-{name.split('.')[0]}-wrong-shape", REPRODUCE, err=(name, "move it away"),
           setup=_reproduce_state(name, text))
      for name, text in [("cell.json", "[1, 2]"), ("results.json", '{"results": [1]}'),
                         ("eval_runs.jsonl", "1\n")]],
    # (a read-only folder cannot be made here: the tests may run as root, whom no mode stops)
    Case("tensorboard-unwritable", [*DISTILL[:-2], "--out", "{tmp}/run", "--tensorboard", "{tmp}/f/tb"],
         err=("--tensorboard", "not a directory"), setup=lambda tmp, base: (tmp / "f").write_text("x")),
    Case("tensorboard-empty", [*DISTILL[:-2], "--out", "{tmp}/run", "--tensorboard", ""],
         err=("--tensorboard needs a directory",)),
    Case("width-200000", ["distill", "--dataset", "cdigits-fg", "--iterations", "1", "--width", "200000",
                          "--no-progress", "--out", "{tmp}/o"], err=("width 200000", "memory available")),
    *[Case(f"synthetic-{opt.split('=')[0]}-absurd", ["distill", "--dataset", "synthetic", "--data-option", opt,
                                                      "--iterations", "1", "--no-progress", "--out", "{tmp}/o"],
           err=("synthetic:", "memory available"))
      for opt in ("n_per_class=100000000", "num_classes=10000000", "image_size=100000")],
]


def _synset_empty(tmp: Path, base: Path) -> None:
    import torch

    _synset_with(images=torch.empty(0, 3, 32, 32), labels=torch.empty(0, dtype=torch.long))(tmp, base)


def _synset_labels(tmp: Path, base: Path, value: int) -> None:
    import torch

    syn = torch.load(base / "synset.pt", weights_only=True)
    labels = syn["labels"].clone()
    labels[-1] = value
    _synset_with(labels=labels)(tmp, base)


def _celeba_attr(tmp: Path, text: str) -> None:
    folder = tmp / "root" / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    (folder / "list_attr_celeba.txt").write_text(text)
    (folder / "list_eval_partition.txt").write_text("000001.jpg 0\n")



def _fill(obj: object, tmp: Path, base: Path) -> object:
    if isinstance(obj, str):
        return obj.replace("{tmp}", str(tmp)).replace("{base}", str(base))
    if isinstance(obj, list):
        return [_fill(x, tmp, base) for x in obj]
    return obj


@dataclass
class Result:
    rc: int | None
    stderr: str
    tmp: Path
    setup_error: str | None = None


def _run(case: Case, root: Path, base: Path) -> Result:
    tmp = root / case.id
    tmp.mkdir()
    cleanup = None
    try:
        if case.setup is not None:
            cleanup = case.setup(tmp, base)
    except Exception as exc:  # a broken row is reported by its test, not by the pool
        return Result(None, "", tmp, setup_error=f"{type(exc).__name__}: {exc}")
    if case.code is not None:
        cmd = [sys.executable, "-c", _fill(case.code, tmp, base)]
    else:
        cmd = [sys.executable, "-m", "fastfair", *_fill(case.argv, tmp, base)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=ENV, cwd=tmp)
        return Result(p.returncode, p.stderr, tmp)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return Result(None, err + f"\n<hang: no exit within {TIMEOUT} s>", tmp)
    finally:
        if callable(cleanup):
            cleanup()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Result]:
    root = tmp_path_factory.mktemp("probe")
    base = root / "_base"
    # One genuine run: the checkpoint / synset that the resume and eval rows damage.
    made = subprocess.run([sys.executable, "-m", "fastfair", "distill", *TINY, "--iterations", "1",
                           "--checkpoint-every", "1", "--out", str(base)],
                          capture_output=True, text=True, timeout=TIMEOUT, env=ENV)
    assert made.returncode == 0, made.stderr
    workers = max(2, min(4, 2 * (os.cpu_count() or 1)))
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with ThreadPoolExecutor(workers) as pool:
        futures = {c.id: pool.submit(_run, c, root, base) for c in CASES}
        out = {k: f.result() for k, f in futures.items()}
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"\nprobe: {len(CASES)} rows in {time.perf_counter() - t0:.0f} s wall, "
          f"{cpu.ru_utime + cpu.ru_stime - cpu0.ru_utime - cpu0.ru_stime:.0f} s CPU of the subprocesses")
    return out


def _verdict(case: Case, r: Result) -> str | None:
    """What is wrong with the row's outcome (None: as expected)."""
    if r.setup_error:
        return f"setup failed: {r.setup_error}"
    if r.rc is None:
        return f"hang: {r.stderr[-300:]}"
    if r.rc < 0 or r.rc in (128 + signal.SIGSEGV, 128 + signal.SIGABRT, 128 + signal.SIGBUS):
        return f"crash (rc {r.rc}): {r.stderr[-300:]}"
    if r.rc != case.rc:
        return f"exit code {r.rc}, expected {case.rc}: {r.stderr[-500:]}"
    lines = r.stderr.strip().splitlines()
    if case.exc is None and case.rc == 2:
        if len(lines) != 1 or "Traceback" in r.stderr:
            return f"not one stderr line: {r.stderr[-800:]}"
    classes = (case.exc,) if isinstance(case.exc, str) else case.exc
    if classes and not (lines and any(lines[-1].startswith(c + ":") for c in classes)):
        return f"expected {' or '.join(classes)}, got: {lines[-1] if lines else '(no stderr)'}"
    missing = [s for s in case.err if s not in r.stderr]
    if missing:
        return f"stderr lacks {missing}: {r.stderr[-500:]}"
    return None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_probe(results, case: Case) -> None:
    r = results[case.id]
    why = _verdict(case, r)
    if why is None and case.check is not None:
        try:
            case.check(r.tmp)
        except AssertionError as exc:
            why = str(exc)
    if why is not None and case.other:
        pytest.xfail(f"{case.other}'s fix is not merged here: {why}")
    assert why is None, f"{case.id}: {why}"
