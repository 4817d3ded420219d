"""The CPU kernels' inner loops are compiled once per vector instruction set
(csrc/cpu/cpu_isa.h); every set must give the same bits, and
FASTFAIR_CPU_ISA must cap the choice or refuse a bad value."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastfair import ops

pytestmark = pytest.mark.skipif(ops.backend() == "reference", reason="extension not built")

# One shape per strategy of csrc/cpu/segment_reduce.cpp (tests/test_ops.py
# STRATEGY_SHAPES says which is which), with row lengths that leave a vector
# remainder (odd D) and a strided input.
_SCRIPT = r"""
import sys, torch
from fastfair import ops
torch.manual_seed(0)
shapes = [(3000, 20, 500), (50000, 3, 7), (9000, 300, 20), (2500, 512, 4), (9000, 40, 4000),
          (2500, 517, 16), (400, 600, 1), (250, 1030, 3), (9000, 301, 500)]
out = {"isa": torch.ops.fastfair.cpu_isa()}
for n, d, g in shapes:
    ids = torch.randint(0, g, (n,))
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        x = torch.randn(n, d + 3).to(dtype)[:, 1:d + 1]
        out[(n, d, g, str(dtype))] = (ops.segment_sum(x, ids, g), ops.segment_mean(x, ids, g))
torch.save(out, sys.argv[1])
"""


def _run(tmp_path, isa: str | None) -> dict:
    env = dict(os.environ)
    env.pop("FASTFAIR_CPU_ISA", None)
    if isa is not None:
        env["FASTFAIR_CPU_ISA"] = isa
    path = tmp_path / f"{isa}.pt"
    subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], env=env, check=True, timeout=300)
    return torch.load(path)


def test_every_instruction_set_gives_the_same_bits(tmp_path):
    best = _run(tmp_path, None)
    assert best["isa"] in ("baseline", "avx2", "avx512")
    seen = {best["isa"]}
    for isa in ("baseline", "avx2"):
        got = _run(tmp_path, isa)
        # A cap never raises the set above what the CPU has.
        assert got["isa"] == isa or (isa == "avx2" and best["isa"] == "baseline"), (isa, got["isa"])
        seen.add(got["isa"])
        for key, value in best.items():
            if key != "isa":
                assert torch.equal(got[key][0], value[0]) and torch.equal(got[key][1], value[1]), (isa, key)
    if len(seen) == 1:
        pytest.skip(f"this CPU has only the {best['isa']} set: nothing to compare")


def test_bad_value_is_refused():
    env = dict(os.environ, FASTFAIR_CPU_ISA="avx9000")
    code = ("import torch\nfrom fastfair import ops\n"
            "try:\n    ops.segment_sum(torch.ones(3, 40), torch.zeros(3, dtype=torch.long), 2)\n"
            "except ValueError as e:\n    print('refused:', e)\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "refused: FASTFAIR_CPU_ISA=avx9000 is not one of baseline, avx2, avx512" in res.stdout
