"""``fastfair --help``, ``fastfair COMMAND --help`` and argument errors answer
without importing torch (seconds, tens of seconds on a loaded machine).

Each case runs in a fresh interpreter, so modules imported by other tests
cannot hide an import that the CLI does at module level.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastfair import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs cli.main(argv) and reports its exit code, stdout/stderr sizes and
# whether torch (or a torch-importing fastfair module) got imported.
PROBE = r"""
import contextlib, io, json, sys
import fastfair.cli
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        code = fastfair.cli.main(json.loads(sys.argv[1]))
    except SystemExit as exc:
        code = exc.code
heavy = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.") or m == "numpy")
print(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue(), "heavy": heavy[:5]}))
"""


def probe(argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _commands() -> list[str]:
    sub = next(a for a in cli.build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


def test_every_command_is_probed():
    # New subcommands are covered automatically; this guards the discovery.
    assert {"demo", "distill", "eval", "bench"} <= set(_commands())


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in _commands()]],
                         ids=lambda a: " ".join(a))
def test_help_does_not_import_torch(argv):
    r = probe(argv)
    assert r["code"] == 0, r
    assert "usage: fastfair" in r["out"]
    assert r["heavy"] == [], f"{' '.join(argv)} imported {r['heavy']}"


@pytest.mark.parametrize("argv, needle", [
    (["distill", "--dataset", "cdigits-fg", "--out", "o", "--objective", "fairest"], "'fairest'"),
    (["distill", "--dataset", "cdigits-fg", "--out", "o", "--ipc", "ten"], "'ten'"),
    (["eval", "--model", "LeNet"], "'LeNet'"),
    (["bench", "nothing"], "'nothing'"),
    (["no-such-command"], "'no-such-command'"),
])
def test_argument_errors_do_not_import_torch(argv, needle):
    r = probe(argv)
    assert r["code"] == 2, r
    assert r["err"].count("\n") == 1 and needle in r["err"], r["err"]
    assert r["heavy"] == [], f"{' '.join(argv)} imported {r['heavy']}"


def test_the_probe_sees_torch_when_it_is_imported():
    # The probe must be able to fail: a command that runs imports torch.
    r = probe(["distill", "--dataset", "no-such-set", "--out", "o"])  # found inside the command
    assert r["code"] == 2 and "'no-such-set'" in r["err"], r
    assert "torch" in r["heavy"]


def test_choice_lists_match_the_modules_that_own_them():
    from fastfair import augment, choices, evaluate, nets, objectives
    from fastfair.distill import config

    assert choices.OBJECTIVES == tuple(objectives.OBJECTIVES)
    assert choices.METHODS == config.METHODS
    assert choices.INITS == config.INITS
    assert choices.BASELINES == evaluate.BASELINES
    assert choices.GROUP_SOURCES == config.GROUP_SOURCES
    assert choices.NETWORKS == nets.NETWORKS
    assert choices.DSA_STRATEGY == augment.DEFAULT_STRATEGY
    for metric in choices.DC_METRICS:
        config.resolve(config.DistillConfig(method="dc", dc_metric=metric))
    with pytest.raises(ValueError, match="dc_metric"):
        config.resolve(config.DistillConfig(method="dc", dc_metric="l2"))
