"""Output files on a failing disk: no temporary file left, one line, exit 2,
the previous checkpoint still loadable (issue 13.11); the lock on --out
(13.10); output paths checked before any work (13.12, 13.14)."""
from __future__ import annotations

import errno
import os

import pytest
import torch

from fastfair import cli, data, distill
from fastfair.distill import checkpoint as ck
from fastfair.distill import outdir, synset

OPTS = {"num_classes": 3, "num_groups": 2, "image_size": 8, "n_per_class": 20}
CFG = dict(dataset="synthetic", ipc=2, width=8, depth=2, batch_real=8, log_every=1, extra={"data_options": OPTS})


def _enospc_after(monkeypatch, nbytes: int):
    """Every torch.save writes ``nbytes`` and then hits a full disk."""
    real = torch.save

    def save(obj, f, *a, **kw):
        if isinstance(f, (str, os.PathLike)):
            return real(obj, f, *a, **kw)
        f.write(b"x" * nbytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)


def test_atomic_save_cleans_up_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    synset.atomic_save({"v": 1}, str(path))
    _enospc_after(monkeypatch, 1000)
    with pytest.raises(outdir.OutputError, match=r"cannot write .*checkpoint\.pt: No space left on device "
                                                 r"\(the previous file is kept\)") as err:
        synset.atomic_save({"v": 2}, str(path))
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"v": 1}


def test_interrupt_during_a_write_leaves_no_temporary_file(tmp_path):
    def write(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        outdir.atomic_write(str(tmp_path / "x"), write)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_a_run_checkpoint(tmp_path, monkeypatch):
    ds = data.load("synthetic", **OPTS)
    cfg = distill.DistillConfig(**CFG, iterations=2, checkpoint_every=1)
    distill.run(cfg, ds, out_dir=str(tmp_path), device="cpu", progress=False)
    before = torch.load(tmp_path / ck.CHECKPOINT, weights_only=True)
    _enospc_after(monkeypatch, 4096)
    with pytest.raises(OSError, match="No space left"):
        distill.run(distill.DistillConfig(**CFG, iterations=4, checkpoint_every=1), ds, out_dir=str(tmp_path),
                    device="cpu", progress=False, resume=True)
    monkeypatch.undo()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
    after = torch.load(tmp_path / ck.CHECKPOINT, weights_only=True)
    assert after["iteration"] == before["iteration"] == 2 and torch.equal(after["images"], before["images"])


def test_cli_disk_full_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    _enospc_after(monkeypatch, 10)
    code = cli.main(["distill", "--dataset", "synthetic", "--ipc", "2", "--iterations", "2", "--width", "8",
                     "--depth", "1", "--batch-real", "8", "--no-progress", "--device", "cpu", "--out",
                     str(tmp_path), *[f"--data-option={k}={v}" for k, v in OPTS.items()]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err, err
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


TINY_ARGS = ["--dataset", "synthetic", "--ipc", "2", "--iterations", "1", "--width", "8", "--depth", "1",
             "--batch-real", "8", "--no-progress", "--device", "cpu",
             *[f"--data-option={k}={v}" for k, v in OPTS.items()]]


def test_second_run_into_a_locked_out_fails_at_once_and_stale_locks_do_not_block(tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fastfair.distill import outdir\n"
         f"with outdir.locked({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = cli.main(["distill", *TINY_ARGS, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert f"pid {holder.pid}" in err and "in use by another fastfair run" in err
        assert not (out / "synset.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock file stays behind but does not block
    assert (out / outdir.LOCK).exists()
    assert cli.main(["distill", *TINY_ARGS, "--out", str(out)]) == 0
    assert (out / "synset.pt").exists()


def test_lock_is_reentrant_and_released(tmp_path):
    with outdir.locked(str(tmp_path)):
        with outdir.locked(str(tmp_path)):
            pass
        assert os.path.realpath(tmp_path) in outdir._HELD
    assert not outdir._HELD
    with outdir.locked(str(tmp_path)):  # released: lockable again
        pass


def test_read_only_out_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import tempfile

    def read_only(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    loaded = []
    monkeypatch.setattr(outdir.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(data, "load", lambda *a, **kw: loaded.append(1))
    code = cli.main(["distill", *TINY_ARGS, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not writable: Read-only file system" in err, err
    assert not loaded  # refused before the data were loaded
    monkeypatch.setattr(outdir.tempfile, "mkstemp", tempfile.mkstemp)


@pytest.mark.parametrize("argv_of", [
    lambda t: ["eval", "--baseline", "random", "--dataset", "cdigits-fg", "--json", str(t / "nodir" / "m.json")],
    lambda t: ["eval", "--baseline", "random", "--dataset", "cdigits-fg", "--json", str(t)],
    lambda t: ["demo", "--tiny", "--out", str(t / "d"), "--json", str(t / "nodir" / "r.json")],
])
def test_eval_and_demo_check_output_paths_before_any_work(tmp_path, capsys, monkeypatch, argv_of):
    (tmp_path / "nodir").write_text("a file where a directory is needed\n")
    monkeypatch.setattr(data, "load", lambda *a, **kw: pytest.fail("loaded data before checking the output"))
    code = cli.main([*argv_of(tmp_path), "--epochs", "1", "--runs", "1", "--no-progress", "--device", "cpu"]
                    if argv_of(tmp_path)[0] == "eval" else [*argv_of(tmp_path), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--json" in err, err
