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
