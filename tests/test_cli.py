"""The ``fastfair`` command line: one-line usage errors with exit code 2,
``--help`` that states every default, and the files that ``demo``,
``distill`` and ``eval`` write (on tiny settings, in-process, CPU).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastfair import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A few-second distillation: width-8 ConvNet, small real batch, no DSA cost to speak of.
TINY_DISTILL = ["--width", "8", "--batch-real", "16", "--log-every", "1", "--no-progress", "--device", "cpu"]
TINY_EVAL = ["--epochs", "1", "--runs", "1", "--width", "8", "--no-progress", "--device", "cpu"]
DEMO_SCHEMA_ROW = {"method", "objective", "acc", "acc_std", "deo_m", "deo_m_std", "deo_a", "deo_a_std", "seconds"}


def run_cli(argv: list[str]) -> int:
    """cli.main, with argparse's SystemExit turned into its exit code."""
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse: bad choices, --help
        return int(exc.code or 0)


def assert_usage_error(argv: list[str], capsys: pytest.CaptureFixture, *names: str) -> str:
    """argv must end with exit code 2 and ONE stderr line naming ``names``."""
    code = run_cli(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert "error" in err
    for n in names:
        assert n in err, f"{n!r} not in {err!r}"
    return err


def _png(path: str) -> None:
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("argv, names", [
    (["distill", "--dataset", "no-such-set", "--out", "{tmp}/o"], ["'no-such-set'", "cdigits-fg"]),
    (["distill", "--dataset", "cdigits-fg", "--objective", "fairest", "--out", "{tmp}/o"], ["'fairest'", "cobra"]),
    (["distill", "--dataset", "cdigits-fg", "--method", "kip", "--out", "{tmp}/o"], ["'kip'", "dream"]),
    (["distill", "--dataset", "cdigits-fg", "--ipc", "500", "--iterations", "1", "--out", "{tmp}/o"],
     ["ipc 500", "larger than class"]),
    (["distill", "--dataset", "cdigits-fg", "--ipc", "0", "--out", "{tmp}/o"], ["ipc", "0"]),
    (["distill", "--dataset", "cdigits-fg", "--eval-model", "LeNet", "--eval-every", "1", "--iterations", "1",
      "--out", "{tmp}/o", *TINY_DISTILL], ["'LeNet'", "--eval-model"]),
    (["distill", "--dataset", "cdigits-fg", "--eval-width", "0", "--out", "{tmp}/o"], ["eval_width", "0"]),
    (["distill", "--dataset", "cdigits-fg", "--device", "toaster", "--out", "{tmp}/o"], ["'toaster'"]),
    (["distill", "--dataset", "cdigits-fg", "--out", "{tmp}/a_file"], ["a_file", "not a directory"]),
    (["distill", "--dataset", "cdigits-fg", "--bias-ratio", "1.5", "--out", "{tmp}/o"], ["bias_ratio", "1.5"]),
    (["eval", "--model", "LeNet", "{tmp}/o"], ["'LeNet'", "ResNet18"]),
    (["eval", "{tmp}/missing_run"], ["missing_run", "synset.pt"]),
    (["eval", "{tmp}/a_file"], ["a_file", "synthetic set"]),
    (["eval", "--baseline", "random", "--dataset", "cdigits-fg", "--ipc", "500", *TINY_EVAL],
     ["ipc 500", "larger than class"]),
    (["eval", "--baseline", "random-balanced", "--dataset", "cdigits-fg", "--ipc", "500", *TINY_EVAL],
     ["ipc 500", "larger than class"]),
    (["eval", "--baseline", "random"], ["--dataset"]),
    (["eval", "--baseline", "whole", "--dataset", "no-such-set"], ["'no-such-set'"]),
    (["demo", "--threads", "0"], ["--threads", "0"]),
    (["demo", "--jobs", "0"], ["--jobs", "0"]),
    ([], ["COMMAND"]),
])
def test_usage_errors_are_one_line_exit_2(argv, names, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a torch file\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert_usage_error(argv, capsys, *names)
    assert not (tmp_path / "o").exists()  # nothing ran


def test_missing_root_and_root_without_files(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "nowhere")
    assert_usage_error(["distill", "--dataset", "cmnist-fg", "--root", missing, "--out", str(tmp_path / "o")],
                       capsys, missing, "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    # The loader's message names every file it looked for, and the CLI flag that fetches them.
    err = assert_usage_error(["distill", "--dataset", "cifar10-s", "--root", str(empty), "--out",
                              str(tmp_path / "o")], capsys, str(empty), "cifar-10-batches-py", "--download")
    assert "download=True" not in err
    # No --root: the default root ($FASTFAIR_DATA) is searched, and the message says so.
    monkeypatch.setenv("FASTFAIR_DATA", str(empty))
    assert_usage_error(["distill", "--dataset", "cmnist-fg", "--out", str(tmp_path / "o")], capsys,
                       os.path.join(str(empty), "MNIST", "raw"), "no --root given")
    assert_usage_error(["eval", "--baseline", "whole", "--dataset", "utkface", "--root", str(empty)], capsys,
                       "UTKFace", str(empty))


def test_dataset_options_reach_the_loader(tmp_path, capsys):
    out = str(tmp_path / "o")
    # Malformed and unknown keys: the error lists what the dataset accepts.
    assert_usage_error(["distill", "--dataset", "cdigits-fg", "--data-option", "image_size", "--out", out],
                       capsys, "KEY=VALUE", "'image_size'")
    assert_usage_error(["distill", "--dataset", "synthetic", "--data-option", "colours=3", "--out", out],
                       capsys, "colours", "num_groups")
    assert_usage_error(["eval", "--baseline", "whole", "--dataset", "imagenet-subset-s", "--data-option", "res=64"],
                       capsys, "res", "subset")
    # A known key with a bad value is refused by the loader itself: so the value got there.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_usage_error(["distill", "--dataset", "imagenet-subset-s", "--root", str(empty), "--data-option",
                        "subset=woofwoof", "--out", out], capsys, "'woofwoof'", "nette")


# --------------------------------------------------------------------------- help


def _subparser(name: str):  # noqa: ANN202
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[name]


@pytest.mark.parametrize("command", ["demo", "distill", "eval"])
def test_help_states_every_default(command, capsys):
    assert run_cli([command, "--help"]) == 0
    text = capsys.readouterr().out
    # Split the help into entries: one per option, continuation lines indented deeper.
    entries: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            key = line.split()[0].rstrip(",")
            entries[key] = line
        elif key is not None and line.startswith("   "):
            entries[key] += " " + line.strip()
        else:
            key = None
    checked = 0
    for action in _subparser(command)._actions:
        if action.help == "==SUPPRESS==" or action.dest == "help" or action.required:
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        entry = " ".join(entries[name].split())
        assert "default" in entry.lower(), f"{command} {name}: no default in {entry!r}"
        if action.default not in (None, []):
            assert str(action.default) in entry, f"{command} {name}: default {action.default!r} not in {entry!r}"
        checked += 1
    assert checked >= (5 if command == "demo" else 10)


def test_resume_behaviour_is_documented():
    resume = next(a for a in _subparser("distill")._actions if a.dest == "resume")
    assert "no checkpoint" in resume.help and "iteration 0" in resume.help


# --------------------------------------------------------------------------- commands


def test_demo_tiny_writes_schema_grids_and_chart(tmp_path, capsys):
    out = tmp_path / "demo"
    jpath = out / "r.json"
    assert run_cli(["demo", "--tiny", "--out", str(out), "--json", str(jpath), "--no-progress",
                    "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    with open(jpath) as f:
        res = json.load(f)
    assert {"dataset", "ipc", "protocol", "results"} <= res.keys()
    assert res["dataset"] == "cdigits-fg" and res["ipc"] == 10
    assert "tiny" in json.dumps(res["protocol"])  # the reduced protocol is labelled
    runs = [(r["method"], r["objective"]) for r in res["results"]]
    assert runs == [("dm", "vanilla"), ("dm", "fairdd"), ("dm", "cobra"), ("dc", "vanilla"), ("dc", "fairdd")]
    for r in res["results"]:
        assert DEMO_SCHEMA_ROW <= r.keys()
        for k in DEMO_SCHEMA_ROW - {"method", "objective"}:
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (k, r[k])
        # Metrics are percentages, as in the papers' tables.
        for k in ("acc", "deo_m", "deo_a"):
            assert 0.0 <= r[k] <= 100.0 and r[f"{k}_std"] >= 0.0
        assert r["seconds"] > 0
        _png(str(out / f"grid_{r['method']}_{r['objective']}.png"))
    _png(str(out / "metrics.png"))
    # The printed table: its header and one line per run.
    header = next(line for line in stdout.splitlines() if line.startswith("method"))
    assert header.split() == ["method", "objective", "Acc", "DEO_M", "DEO_A", "SUF_M", "seconds"]
    for method, objective in runs:
        assert any(line.split()[:2] == [method, objective] and "+-" in line for line in stdout.splitlines())


def test_evaluation_options_without_evaluations_are_said(tmp_path, capsys):
    base = ["distill", "--dataset", "cdigits-fg", "--method", "dm", "--ipc", "1", "--iterations", "1", *TINY_DISTILL]
    assert run_cli([*base, "--out", str(tmp_path / "a"), "--eval-runs", "5", "--eval-width", "16"]) == 0
    err = capsys.readouterr().err
    assert "note: --eval-runs, --eval-width set but --eval-every is 0" in err and "fastfair eval" in err
    assert not os.path.exists(tmp_path / "a" / "metrics.json")  # indeed nothing was evaluated
    # With --eval-every, or without evaluation options, no note.
    assert run_cli([*base, "--out", str(tmp_path / "b"), "--eval-runs", "1", "--eval-epochs", "1", "--eval-width", "8",
                    "--eval-every", "1"]) == 0
    assert "--eval-every is 0" not in capsys.readouterr().err
    assert run_cli([*base, "--out", str(tmp_path / "c")]) == 0
    assert "--eval-every is 0" not in capsys.readouterr().err


def test_distill_resume_then_eval(tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["distill", "--dataset", "cdigits-fg", "--method", "dm", "--objective", "fairdd", "--ipc", "2",
            "--out", out, *TINY_DISTILL]
    # --resume with no checkpoint: a fresh start, said in one notice line.
    assert run_cli([*base, "--iterations", "2", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "no checkpoint.pt" in err and "iteration 0" in err
    # --resume with one: continue to 3 iterations, no notice, the log keeps the first two.
    assert run_cli([*base, "--iterations", "3", "--resume"]) == 0
    assert "iteration 0" not in capsys.readouterr().err
    syn = torch.load(os.path.join(out, "synset.pt"), map_location="cpu", weights_only=True)
    assert syn["images"].shape == (20, 3, 32, 32) and syn["labels"].tolist() == sorted(list(range(10)) * 2)
    assert syn["config"]["dataset"] == "cdigits-fg" and syn["iterations"] == 3
    assert torch.isfinite(syn["images"]).all()
    _png(os.path.join(out, "grid.png"))
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert [e["iteration"] for e in log] == [1, 2, 3]
    assert all(math.isfinite(e["loss"]) and e["seconds"] >= 0 for e in log)

    assert run_cli(["eval", out, *TINY_EVAL]) == 0
    stdout = capsys.readouterr().out
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert (m["method"], m["objective"], m["dataset"], m["runs"], m["epochs"]) == ("dm", "fairdd", "cdigits-fg", 1, 1)
    for k in ("acc", "acc_std", "deo_m", "deo_m_std", "deo_a", "deo_a_std"):
        assert math.isfinite(m[k])
    assert 0.0 <= m["acc"] <= 100.0 and len(m["per_run"]) == 1
    assert "metrics.json" in stdout and "DEO_M" in stdout

    # Without --resume an existing checkpoint is overwritten, with a notice.
    assert run_cli([*base, "--iterations", "1"]) == 0
    assert "--resume" in capsys.readouterr().err
    with open(os.path.join(out, "log.jsonl")) as f:
        assert [json.loads(line)["iteration"] for line in f] == [1]


def test_data_options_are_recorded_and_reused_by_eval(tmp_path, capsys):
    out = str(tmp_path / "syn")
    opts = {"num_classes": 3, "num_groups": 2, "image_size": 8, "channels": 1, "n_per_class": 20,
            "n_test_per_cell": 2}
    argv = ["distill", "--dataset", "synthetic", "--ipc", "2", "--iterations", "1", "--depth", "1", "--out", out,
            *TINY_DISTILL]
    argv += [f"--data-option={k}={v}" for k, v in opts.items()]
    assert run_cli(argv) == 0
    syn = torch.load(os.path.join(out, "synset.pt"), map_location="cpu", weights_only=True)
    assert syn["images"].shape == (6, 1, 8, 8)  # the options shaped the dataset
    assert syn["config"]["extra"]["data_options"] == opts
    # eval reloads the dataset with the recorded options (a default synthetic set would not fit).
    assert run_cli(["eval", os.path.join(out, "synset.pt"), *TINY_EVAL]) == 0
    capsys.readouterr()
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["dataset"] == "synthetic"


def test_module_and_console_entry_points(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "fastfair", "--help"], capture_output=True, text=True, env=env,
                       cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    for command in ("demo", "distill", "eval"):
        assert command in r.stdout
    script = shutil.which("fastfair")
    cmd = [script] if script else [sys.executable, "-m", "fastfair"]
    r = subprocess.run([*cmd, "distill", "--dataset", "no-such-set", "--out", "o"], capture_output=True,
                       text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "'no-such-set'" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_demo_cells_in_worker_processes_equal_one_process(tmp_path, capsys):
    # The cells are independent and seeded by their config: the worker
    # processes (the CPU default) must reproduce the one-process numbers
    # exactly, in plan order, whatever order the workers finish in.
    rows = {}
    for jobs in (1, 2):
        out = tmp_path / f"j{jobs}"
        assert run_cli(["demo", "--tiny", "--out", str(out), "--no-progress", "--device", "cpu",
                        "--jobs", str(jobs), "--threads", "1"]) == 0
        with open(out / "results.json") as f:
            res = json.load(f)
        assert res["jobs"] == jobs
        rows[jobs] = [{k: v for k, v in r.items() if k not in ("seconds", "eval_seconds")} for r in res["results"]]
        _png(str(out / "grid_dc_fairdd.png"))
    capsys.readouterr()
    assert rows[1] == rows[2]
    assert [(r["method"], r["objective"]) for r in rows[2]] == [
        ("dm", "vanilla"), ("dm", "fairdd"), ("dm", "cobra"), ("dc", "vanilla"), ("dc", "fairdd")]
