"""--resume checks every field of checkpoint.pt and reads a damaged file as
one error (issue 13.8, 13.14): crafted fields were trusted (iteration -5 ran
25 iterations, images of the wrong shape wrote a wrong synset.pt)."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from fastfair import cli, data, distill
from fastfair.distill import checkpoint as ck

OPTS = {"num_classes": 3, "num_groups": 2, "image_size": 8, "n_per_class": 20}
CFG = dict(dataset="synthetic", ipc=2, width=8, depth=2, batch_real=8, log_every=1, outer_loop=1,
           inner_loop=1, dream_interval=2, dream_pool=10, extra={"data_options": OPTS})


@pytest.fixture(scope="module")
def ds():
    return data.load("synthetic", **OPTS)


@pytest.fixture(scope="module")
def good(ds, tmp_path_factory):
    """A genuine 2-iteration DREAM checkpoint (it has a non-empty source state)."""
    out = tmp_path_factory.mktemp("good")
    distill.run(distill.DistillConfig(**CFG, method="dream", iterations=2), ds, out_dir=str(out), device="cpu",
                progress=False)
    state = torch.load(out / ck.CHECKPOINT, weights_only=True)
    assert state["source"], "the DREAM checkpoint should carry a cached batch"
    return state


def _nan_images(s):
    s["images"] = s["images"].clone()
    s["images"][0, 0, 0, 0] = float("nan")


EDITS = {
    "iteration-negative": (lambda s: s.update(iteration=-5), "'iteration' must be a non-negative int"),
    "iteration-float": (lambda s: s.update(iteration=2.7), "'iteration' must be a non-negative int"),
    "iteration-bool": (lambda s: s.update(iteration=True), "'iteration' must be a non-negative int"),
    "iteration-too-many": (lambda s: s.update(iteration=99), "already has 99 iterations"),
    "images-shape": (lambda s: s.update(images=torch.zeros(6, 3, 4, 4)), "'images' must be a float32 tensor"),
    "images-dtype": (lambda s: s.update(images=s["images"].double()), "'images' must be a float32 tensor"),
    "images-list": (lambda s: s.update(images=[1, 2]), "'images' must be a float32 tensor"),
    "images-nan": (_nan_images, "'images' holds non-finite"),
    "buf-shape": (lambda s: s.update(buf=torch.zeros(3)), "'buf' must be a float32 tensor"),
    "labels": (lambda s: s.update(labels=torch.zeros(6, dtype=torch.long)), "'labels' differs"),
    "config-string": (lambda s: s.update(config="dm"), "'config' is missing or not a dict"),
    "config-missing": (lambda s: s.pop("config"), "'config' is missing or not a dict"),
    "log": (lambda s: s.update(log="x"), "'log' must be a list"),
    "log-future": (lambda s: s.update(log=[{"iteration": 7, "loss": 1.0}]), "'log' must be a list"),
    "seconds": (lambda s: s.update(seconds=float("nan")), "'seconds' must be a non-negative number"),
    "world-size": (lambda s: s.update(world_size=0), "'world_size' must be a positive int"),
    "source-type": (lambda s: s.update(source=[1]), "'source' must be a dict"),
    "source-indices": (lambda s: s["source"].update(indices=s["source"]["indices"] + 10 ** 6), "indices must be"),
    "source-sizes": (lambda s: s["source"].update(sizes=[1]), "sizes must be"),
    "loss-window": (lambda s: s.update(loss_window=(torch.tensor(float("inf")), 1)), "'loss_window'"),
    "missing-images": (lambda s: s.pop("images"), "'images' is missing"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_crafted_fields_are_refused(ds, good, tmp_path, edit):
    change, match = EDITS[edit]
    state = {k: (v.copy() if isinstance(v, dict) else v) for k, v in good.items()}
    change(state)
    torch.save(state, tmp_path / ck.CHECKPOINT)
    with pytest.raises(ValueError, match=match):
        distill.run(distill.DistillConfig(**CFG, method="dream", iterations=4), ds, out_dir=str(tmp_path),
                    device="cpu", progress=False, resume=True)
    assert not (tmp_path / ck.SYNSET).exists()


def test_the_genuine_checkpoint_resumes(ds, good, tmp_path):
    torch.save(good, tmp_path / ck.CHECKPOINT)
    res = distill.run(distill.DistillConfig(**CFG, method="dream", iterations=3), ds, out_dir=str(tmp_path),
                      device="cpu", progress=False, resume=True)
    assert res.log[-1]["iteration"] == 3


class Foreign:
    pass


def _damaged(kind: str, good_bytes: bytes) -> bytes:
    return {
        "truncated": good_bytes[: len(good_bytes) // 2],
        "random": os.urandom(4096),
        "empty": b"",
        "foreign-pickle": pickle.dumps(Foreign()),
        "list": None,
        "no-version": None,
    }[kind]


@pytest.mark.parametrize("kind,match", [
    ("truncated", "cannot read"), ("random", "cannot read"), ("empty", "cannot read"),
    ("foreign-pickle", "cannot read"), ("list", "not a fastfair checkpoint"), ("no-version", "version None"),
])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch's, about the foreign pickle
def test_damaged_files_are_one_line_exit_2(good, tmp_path, capsys, kind, match):
    out = tmp_path / "run"
    out.mkdir()
    path = out / ck.CHECKPOINT
    torch.save(good, path)
    blob = _damaged(kind, path.read_bytes())
    if kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "no-version":
        torch.save({k: v for k, v in good.items() if k != "version"}, path)
    else:
        path.write_bytes(blob)
    code = cli.main(["distill", "--dataset", "synthetic", "--method", "dream", "--ipc", "2", "--iterations", "3",
                     "--width", "8", "--depth", "2", "--batch-real", "8", "--no-progress", "--device", "cpu",
                     "--resume", "--out", str(out), *[f"--data-option={k}={v}" for k, v in OPTS.items()]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and match in err and "checkpoint.pt" in err, err
