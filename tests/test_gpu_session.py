"""benchmarks/gpu_session.sh, proven on the CPU before GPU minutes are spent
on it: its --dry-run runs every stage at tiny sizes and writes the same
files, and a stage cut off mid-way (the script's own SIGTERM at a stage's
time limit) keeps every finished point's JSON."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_session.sh")


def _env(out: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "OUT": out, "PYTHON": sys.executable, **extra}


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def test_dry_run_writes_every_stage_file(tmp_path) -> None:
    out = str(tmp_path / "out")
    proc = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=_env(out), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = open(os.path.join(out, "session.log")).read()
    for stage in ("versions", "tests", "dc", "step", "segment", "wgrad", "error", "cafe"):
        assert f"== {stage}: rc 0" in log, (stage, log[-3000:])
    names = {"dc_step", "step_dc_one_block", "step_dc_per_class", "step_dm", "segment_emb", "segment_scaling",
             "wgrad", "wgrad_error", "cafe_step"}
    assert {f[:-5] for f in os.listdir(out) if f.endswith(".json")} == names
    for name in names:
        payload = _read(os.path.join(out, name + ".json"))
        assert payload.get("rows") or payload.get("results") or payload, name
    dc = _read(os.path.join(out, "dc_step.json"))
    assert dc["complete"] is True and {r["groups"] for r in dc["rows"]} == {1, 4}
    one = _read(os.path.join(out, "step_dc_one_block.json"))
    assert one["settings"]["dc_block_classes"] == 10 and one["complete"] is True
    assert os.path.getsize(os.path.join(out, "versions.txt")) > 0


def _child(pattern: str, deadline: float) -> tuple[int, str]:
    """pid and --json path of the process whose command line holds ``pattern``."""
    while time.time() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    args = f.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if pattern in args and "--json" in args:
                return int(pid), args[args.index("--json") + 1]
        time.sleep(0.1)
    raise AssertionError(f"no process running {pattern}")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the stage's process")
def test_a_stage_cut_off_mid_way_keeps_every_finished_point(tmp_path) -> None:
    out = str(tmp_path / "out")
    groups = ",".join(str(g) for g in range(1, 200))  # far more points than the stage will finish
    proc = subprocess.Popen(["bash", SCRIPT, "--dry-run", "dc"], cwd=ROOT,
                            env=_env(out, DRY_DC_GROUPS=groups), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 240
        pid, path = _child("fastfair.bench.dc_step", deadline)
        while time.time() < deadline:  # until two points are written
            try:
                if len({r["groups"] for r in _read(path)["rows"]}) >= 2:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        os.kill(pid, signal.SIGTERM)  # what `timeout` sends at the stage's limit
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout
    log = open(os.path.join(out, "session.log")).read()
    assert "== dc: rc 130" in log and "Traceback" not in log, log[-3000:]
    assert "stopped; the points finished so far are in" in log
    payload = _read(os.path.join(out, "dc_step.json"))
    assert payload["complete"] is False
    done = sorted({r["groups"] for r in payload["rows"]})
    assert len(done) >= 2 and done == list(range(1, len(done) + 1))
    for g in done:  # whole points only: every implementation of a finished G
        assert len([r for r in payload["rows"] if r["groups"] == g]) == 4
        assert str(g) in payload["check_max_rel_err"]
