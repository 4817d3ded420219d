"""What a result records about the code and machine that made it."""
from __future__ import annotations

import shutil
import subprocess

import pytest

import fastfair
from fastfair import ops, provenance


def test_build_names_the_ops_that_ran():
    b = provenance.build()
    assert b["fastfair"] == fastfair.__version__ and b["backend"] == ops.backend()
    # The extension's hash is there exactly when compiled kernels ran.
    assert (b["extension_sha256"] is None) == (ops.backend() == "reference")
    if b["extension_sha256"] is not None:
        assert len(b["extension_sha256"]) == 16 and int(b["extension_sha256"], 16) >= 0


def test_git_commit_outside_a_checkout_is_none(tmp_path):
    assert provenance._git_commit(str(tmp_path)) is None


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_marks_changed_tracked_files(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = git("rev-parse", "--short=12", "HEAD")
    (tmp_path / "untracked.txt").write_text("not part of the build\n")
    assert provenance._git_commit(str(tmp_path)) == head
    (tmp_path / "a.txt").write_text("two\n")
    assert provenance._git_commit(str(tmp_path)) == head + "+dirty"


def test_machine_reports_torch_and_threads():
    import torch

    m = provenance.machine()
    assert m["torch"] == torch.__version__ and m["threads"] == torch.get_num_threads()


def test_parser_and_tables_stay_torch_free():
    # `fastfair --help` and reproduce's table listing must not pay for importing torch.
    import subprocess
    import sys

    code = ("import sys, fastfair.cli_parser, fastfair.reproduce_tables; "
            "fastfair.cli_parser.build_parser(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
