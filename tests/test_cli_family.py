"""The DC/DM code family's conventions: flag spellings and dataset names as
aliases, ``--dsa-strategy`` / ``--dc-metric``, ``fastfair export --format dc``
(their ``res_*.pt`` layout), the mean / std in ``synset.pt``, and
``--tensorboard``.
"""
from __future__ import annotations

import json
import os
from unittest import mock

import pytest
import torch

from fastfair import cli, tboard
from fastfair.data import registry

# A seconds-long DC run on a small synthetic dataset.
SMALL = ["--data-option=num_classes=3", "--data-option=num_groups=2", "--data-option=image_size=8",
         "--data-option=channels=1", "--data-option=n_per_class=20", "--data-option=n_test_per_cell=2"]
TINY = ["--dataset", "synthetic", *SMALL, "--ipc", "2", "--depth", "1", "--width", "8", "--batch-real", "8",
        "--log-every", "1", "--no-progress", "--device", "cpu"]
TINY_EVAL = ["--epochs", "1", "--runs", "2", "--width", "8", "--no-progress", "--device", "cpu"]


def run_cli(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def parse(argv: list[str]) -> dict:
    return vars(cli.build_parser().parse_args(argv))


# family flag, value, fastfair flag: the same option
DISTILL_ALIASES = [
    ("--lr_img", "0.3", "--lr-img"), ("--batch_real", "64", "--batch-real"), ("--Iteration", "7", "--iterations"),
    ("--num_eval", "4", "--eval-runs"), ("--epoch_eval_train", "30", "--eval-epochs"),
    ("--save_path", "somewhere", "--out"), ("--data_path", "/data/x", "--root"),
    ("--dsa_strategy", "color_crop", "--dsa-strategy"), ("--dis_metric", "mse", "--dc-metric"),
    ("--init", "noise", "--init"),
]
EVAL_ALIASES = [("--num_eval", "4", "--runs"), ("--epoch_eval_train", "30", "--epochs"),
                ("--data_path", "/data/x", "--root")]


@pytest.mark.parametrize("family, value, ours", DISTILL_ALIASES)
def test_distill_family_flags_are_aliases(family, value, ours):
    base = ["distill", "--dataset", "cdigits-fg"] + ([] if ours == "--out" else ["--out", "o"])
    got, want = parse([*base, family, value]), parse([*base, ours, value])
    assert got == want
    assert str(want[ours.lstrip("-").replace("-", "_")]) == value


@pytest.mark.parametrize("family, value, ours", EVAL_ALIASES)
def test_eval_family_flags_are_aliases(family, value, ours):
    assert parse(["eval", "p", family, value]) == parse(["eval", "p", ours, value])


@pytest.mark.parametrize("family, ours", [("DC", "dc"), ("DSA", "dsa"), ("DM", "dm"), ("Dream", "dream")])
def test_method_names_are_case_insensitive(family, ours):
    base = ["distill", "--dataset", "cdigits-fg", "--out", "o"]
    assert parse([*base, "--method", family])["method"] == ours


def test_unknown_method_is_still_a_usage_error(capsys):
    assert run_cli(["distill", "--dataset", "cdigits-fg", "--out", "o", "--method", "MTT"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_aliases_are_documented_in_help(capsys):
    for command, table in (("distill", DISTILL_ALIASES), ("eval", EVAL_ALIASES)):
        assert run_cli([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "DC/DM code family" in text
        for family, _, ours in table:
            if family != ours:
                assert f"[alias {family}" in text, (command, family)


def test_dataset_aliases_are_exact_and_case_sensitive(tmp_path):
    assert registry.canonical_name("Colored_MNIST_foreground") == "cmnist-fg"
    assert registry.canonical_name("Colored_FashionMNIST_background") == "cfmnist-bg"
    assert registry.canonical_name("CIFAR10_S_90") == "cifar10-s"
    assert set(registry.ALIASES.values()) <= set(registry.names())
    assert len(registry.ALIASES) == 8
    # An alias loads what its canonical name loads: here, both miss the same files.
    errors = []
    for name in ("BFFHQ", "bffhq"):
        with pytest.raises(FileNotFoundError) as exc:
            registry.load(name, root=str(tmp_path))
        errors.append(str(exc.value))
    assert errors[0] == errors[1]
    with pytest.raises(ValueError, match="unknown dataset 'celebA'.*CelebA"):
        registry.load("celebA", root=str(tmp_path))


def test_dc_run_with_family_flags_then_export(tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = ["distill", *TINY, "--method", "dc", "--objective", "fairdd", "--Iteration", "2", "--lr_img", "0.05",
            "--dsa_strategy", "None", "--dis_metric", "mse", "--save_path", out]
    assert run_cli(argv) == 0, capsys.readouterr().err
    syn = torch.load(os.path.join(out, "synset.pt"), map_location="cpu", weights_only=True)
    cfg = syn["config"]
    assert (cfg["iterations"], cfg["lr_img"], cfg["dsa"], cfg["dc_metric"]) == (2, 0.05, False, "mse")
    ds = registry.load("synthetic", num_classes=3, num_groups=2, image_size=8, channels=1, n_per_class=20,
                       n_test_per_cell=2)
    assert syn["mean"] == list(ds.mean) and syn["std"] == list(ds.std)

    assert run_cli(["eval", out, *TINY_EVAL]) == 0
    capsys.readouterr()
    assert run_cli(["export", out, "--format", "dc"]) == 0
    path = os.path.join(out, "res_DC_synthetic_ConvNet_2ipc.pt")  # DSA off: the family's "DC"
    assert path in capsys.readouterr().out
    res = torch.load(path, map_location="cpu", weights_only=True)
    assert len(res["data"]) == 1 and len(res["data"][0]) == 2
    images, labels = res["data"][0]
    assert torch.equal(images, syn["images"]) and images.dtype == torch.float32
    assert torch.equal(labels, syn["labels"]) and labels.dtype == torch.int64
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert res["accs_all_exps"] == {"ConvNet": [r["acc"] / 100 for r in metrics["per_run"]]}
    assert len(res["accs_all_exps"]["ConvNet"]) == 2
    assert res["mean"] == syn["mean"] and res["std"] == syn["std"] and res["dataset"] == "synthetic"

    # --out: a directory gets the family's name, anything else is the file name.
    os.makedirs(tmp_path / "elsewhere")
    assert run_cli(["export", os.path.join(out, "synset.pt"), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "res_DC_synthetic_ConvNet_2ipc.pt").is_file()
    assert run_cli(["export", out, "--out", str(tmp_path / "mine.pt")]) == 0
    assert torch.equal(torch.load(tmp_path / "mine.pt", weights_only=True)["data"][0][0], images)

    # A write that fails (here torch.save itself) is one line naming the file; the previous
    # export is kept and no temporary file is left beside it.
    capsys.readouterr()
    before = sorted(os.listdir(tmp_path))
    with mock.patch("torch.save", side_effect=OSError(28, "No space left on device")):
        assert run_cli(["export", out, "--out", str(tmp_path / "mine.pt")]) != 0
    err = capsys.readouterr().err
    assert "mine.pt" in err and "No space left" in err and "previous file is kept" in err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == before
    assert torch.equal(torch.load(tmp_path / "mine.pt", weights_only=True)["data"][0][0], images)


def test_family_names_in_export_file_name():
    from fastfair.export import dc_filename

    assert dc_filename({"method": "dm", "dataset": "cmnist-fg", "model": "ConvNet"}, 10) == \
        "res_DM_Colored_MNIST_foreground_ConvNet_10ipc.pt"
    assert dc_filename({"method": "dc", "dsa": True, "dataset": "celeba", "model": "ConvNet"}, 1) == \
        "res_DSA_CelebA_ConvNet_1ipc.pt"


@pytest.mark.parametrize("argv, needle", [
    (["export", "{tmp}/nothing"], "no synthetic set"),
    (["export", "{tmp}/bad.pt"], "cannot read"),
    (["export", "{tmp}", "--format", "mtt"], "'mtt'"),
    (["distill", *TINY, "--dsa-strategy", "color_wobble", "--out", "{tmp}/o"], "wobble"),
])
def test_usage_errors(argv, needle, tmp_path, capsys):
    (tmp_path / "bad.pt").write_text("not a tensor file")
    assert run_cli([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_tensorboard_missing_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    def missing():
        raise tboard.TensorBoardMissing("--tensorboard needs the tensorboard package, which is not installed")

    monkeypatch.setattr(tboard, "summary_writer_class", missing)
    argv = ["distill", *TINY, "--iterations", "1", "--out", str(tmp_path / "o"), "--tensorboard", str(tmp_path / "tb")]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tensorboard" in err
    assert not (tmp_path / "o").exists()


class FakeWriter:
    instances: list["FakeWriter"] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir, self.scalars, self.texts, self.closed = log_dir, [], [], False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.texts.append(tag)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_tensorboard_receives_loss_and_evaluations(tmp_path, capsys, monkeypatch):
    FakeWriter.instances.clear()
    monkeypatch.setattr(tboard, "summary_writer_class", lambda: FakeWriter)
    out, tb = str(tmp_path / "o"), str(tmp_path / "tb")
    argv = ["distill", *TINY, "--method", "dm", "--iterations", "2", "--eval-every", "2", "--eval-epochs", "1",
            "--out", out, "--tensorboard", tb]
    assert run_cli(argv) == 0, capsys.readouterr().err
    (w,) = FakeWriter.instances
    assert w.log_dir == tb and w.closed and w.texts == ["config"]
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    losses = [(e["iteration"], e["loss"]) for e in log if "loss" in e]
    assert [(s, v) for t, v, s in w.scalars if t == "distill/loss"] == losses
    ev = next(e for e in log if "eval" in e)
    assert ("eval/acc", ev["eval"]["acc"], 2) in w.scalars
    assert ("eval/deo_m", ev["eval"]["deo_m"], 2) in w.scalars


def test_real_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    logger = tboard.TensorBoardLogger(str(tmp_path), {"method": "dm"})
    logger({"iteration": 1, "loss": 0.5, "seconds": 0.1})
    logger.close()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))


# The authors' script lines, as data. FairDD's scripts/main_DM.sh and
# main_DC.sh (zqhang/FairDD), with their shell variables filled in as the
# scripts set them (dataset, save path and data path are the user's):
FAIRDD_DM = ("--dataset {ds} --ipc 10 --batch_real 256 --num_exp 1 --model ConvNet --save_path {out} "
             "--num_eval 10 --lr_img 1 --Iteration {it}")
FAIRDD_DC = "--dataset {ds} --ipc 10 --batch_real 256 --num_exp 1 --model ConvNet --save_path {out} --num_eval 10"
# COBRA's switch and protocol as docs/methods.md records them (train_dm.py: DM
# batch_real 600, 2600 iterations; --mode vanilla | fairdd | cobra).
COBRA_DM = "--dataset {ds} --ipc 10 --batch_real 600 --Iteration {it} --mode {mode} --save_path {out}"


def _line(template: str, tmp_path, extra: str = "", **kw) -> list[str]:
    return ["distill", "--method", "DM" if "Iteration" in template else "DC",
            *template.format(ds="cdigits-fg", out=str(tmp_path / "o"), **kw).split(), *extra.split()]


@pytest.mark.parametrize("line, flag, objective, preset", [
    (FAIRDD_DM, "", "vanilla", None), (FAIRDD_DM, "--FairDD", "fairdd", None),
    (FAIRDD_DC, "", "vanilla", None), (FAIRDD_DC, "--FairDD", "fairdd", None),
    (COBRA_DM, "", "vanilla", "cobra"), (COBRA_DM, "", "cobra", "cobra"), (COBRA_DM, "", "fairdd", "cobra"),
])
def test_authors_script_lines_select_the_objective_they_name(tmp_path, capsys, line, flag, objective,
                                                             preset) -> None:
    mode = objective if line is COBRA_DM else None
    argv = _line(line, tmp_path, flag, it=20000, mode=mode)
    a = cli.build_parser().parse_args(argv)
    a.family_line = True
    assert cli._family_objective(a) == (objective, preset)
    if objective == "vanilla" and line is not COBRA_DM:  # the silent change of meaning is said
        assert "objective vanilla, as in FairDD's code" in capsys.readouterr().err


def test_a_fairdd_script_line_runs_unchanged(tmp_path) -> None:
    # Their line, only the iterations cut for the test, and fastfair's size knobs appended.
    argv = _line(FAIRDD_DM, tmp_path, "--FairDD --width 8 --depth 1 --no-progress --device cpu", it=1)
    assert run_cli(argv) == 0
    saved = torch.load(tmp_path / "o" / "synset.pt", weights_only=True)
    assert saved["config"]["objective"] == "fairdd" and saved["config"]["batch_real"] == 256


@pytest.mark.parametrize("extra, message", [
    ("--num_exp 5", "--num_exp 5"), ("--eval_mode M", "--eval_mode M"),
    ("--objective cobra --FairDD", "ask for different objectives"),
])
def test_family_flags_fastfair_cannot_honour_stop_in_one_line(tmp_path, capsys, extra, message) -> None:
    argv = _line(FAIRDD_DM, tmp_path, extra + " --width 8 --depth 1 --no-progress --device cpu", it=1)
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_fastfair_spelling_keeps_fairdd_as_the_default(tmp_path) -> None:
    a = cli.build_parser().parse_args(["distill", "--dataset", "cdigits-fg", "--out", str(tmp_path)])
    a.family_line = False
    assert cli._family_objective(a) == ("fairdd", None)


def test_version(capsys) -> None:
    import fastfair

    assert run_cli(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastfair {fastfair.__version__}"
