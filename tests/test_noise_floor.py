"""benchmarks/deo_noise_floor.py: the chance DEO of a group-invariant model,
on the embedded two-attribute digits (no download)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "deo_noise_floor.py")


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, "--dataset", "cdigits-fgbg", "--trials", "200", *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)


def test_floor_falls_with_accuracy_and_vanishes_at_100(tmp_path):
    out = tmp_path / "floor.json"
    proc = _run(tmp_path, "--acc", "60", "90", "100", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["attributes"] == ["fg", "bg"]
    by_acc = {c["model"]: c for c in res["cases"]}
    lo, hi, perfect = by_acc["every class 60%"], by_acc["every class 90%"], by_acc["every class 100%"]
    # Binomial spread is largest near 50%: the floor of a 60% model exceeds a 90% model's.
    assert lo["deo_m"][0] > hi["deo_m"][0] > 0
    # Marginal groups pool several cells, so their floor is below the intersection's.
    assert hi["fg_deo_m"][0] < hi["deo_m"][0] and hi["bg_deo_m"][0] < hi["deo_m"][0]
    assert perfect["deo_m"] == [0.0, 0.0, 0.0] and perfect["deo_a"][0] == 0.0
    for case in res["cases"]:
        mean, p5, p95 = case["deo_m"]
        assert p5 <= mean <= p95


def test_metrics_of_another_shape_is_refused(tmp_path):
    bad = tmp_path / "metrics.json"
    bad.write_text(json.dumps({"acc": 50.0, "deo_m": 10.0, "cell_acc": [[50.0, 50.0]]}))
    proc = _run(tmp_path, "--metrics", str(bad), "--acc")
    assert proc.returncode != 0
    assert "cells" in proc.stderr and "cdigits-fgbg" in proc.stderr


@pytest.mark.parametrize("acc", ["-5", "101"])
def test_accuracy_outside_0_100_is_refused(tmp_path, acc):
    proc = _run(tmp_path, "--acc", acc)
    assert proc.returncode != 0
    assert "--acc" in proc.stderr
