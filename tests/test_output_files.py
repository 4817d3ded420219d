"""Outputs as a colleague and a full disk see them (issue 25): files get the
umask's mode like any other tool's, a real full filesystem during a
checkpoint is one line naming the file with the previous checkpoint kept, and
SIGTERM in the middle of a write leaves no temporary file behind."""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastfair.distill import outdir

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
TINY = ["--dataset", "cdigits-fg", "--ipc", "1", "--width", "8", "--depth", "1", "--batch-real", "4",
        "--no-progress", "--device", "cpu"]


def test_atomic_write_gives_the_umask_mode(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        outdir.atomic_write(str(tmp_path / "a.bin"), lambda f: f.write(b"x"))
        os.umask(0o077)
        outdir.atomic_write(str(tmp_path / "b.bin"), lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.bin").st_mode) == 0o644  # mkstemp alone gives 0600
    assert stat.S_IMODE(os.stat(tmp_path / "b.bin").st_mode) == 0o600


def test_torch_writer_error_becomes_one_output_error(tmp_path) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"previous")

    def write(f) -> None:  # noqa: ANN001 - what torch.save raises on ENOSPC
        f.write(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 100 vs 64")

    with pytest.raises(outdir.OutputError, match="cannot write .*checkpoint.pt.*disk full.*previous file is kept"):
        outdir.atomic_write(str(path), write)
    assert path.read_bytes() == b"previous" and sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]
    with pytest.raises(RuntimeError, match="something else"):  # other errors are not disguised
        outdir.atomic_write(str(path), lambda f: (_ for _ in ()).throw(RuntimeError("something else")))


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if not shutil.which("mount") or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_real_full_disk_during_checkpoint_is_one_line_and_keeps_the_previous(tmp_path) -> None:
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "2m"):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    try:
        out = disk / "run"
        # A first run fits; the wider network's checkpoint does not.
        first = subprocess.run([sys.executable, "-m", "fastfair", "distill", *TINY, "--iterations", "1",
                                "--checkpoint-every", "1", "--out", str(out)], capture_output=True, text=True,
                               env=ENV, timeout=300)
        assert first.returncode == 0, first.stderr
        before = (out / "checkpoint.pt").read_bytes()
        ballast = disk / "ballast"
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        ballast.write_bytes(b"\0" * max(0, free - 64 * 1024))  # leave 64 KB
        p = subprocess.run([sys.executable, "-m", "fastfair", "distill", *TINY, "--iterations", "3",
                            "--checkpoint-every", "1", "--resume", "--width", "8", "--out", str(out)],
                           capture_output=True, text=True, env=ENV, timeout=300)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert lines[-1].startswith("fastfair distill: error: cannot write") and "checkpoint.pt" in lines[-1]
        assert (out / "checkpoint.pt").read_bytes() == before
        assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_sigterm_during_reproduce_leaves_no_temporary(tmp_path) -> None:
    out = tmp_path / "rep"
    p = subprocess.Popen([sys.executable, "-m", "fastfair", "reproduce", "--table", "cdigits", "--budget", "tiny",
                          "--datasets", "cdigits-fg", "--out", str(out), "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "results.json").exists():  # killed mid-run, after a first write
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err
    left = [str(f) for f in out.rglob("*") if ".tmp" in f.name]
    assert not left, left


def test_ctrl_c_while_the_command_line_is_parsed_is_one_line(monkeypatch, capsys) -> None:
    from fastfair import cli

    def interrupted(*a, **k):  # noqa: ANN002, ANN003, ANN202 - where a Ctrl-C in the first 0.3 s lands
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["demo"]) == cli.EXIT_INTERRUPT
    assert capsys.readouterr().err.strip() == "fastfair: interrupted"
