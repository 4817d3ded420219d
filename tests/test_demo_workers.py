"""The demo with worker processes when things go wrong (issue 25): a worker
killed (SIGKILL, the OOM killer) or a Ctrl-C ends the demo promptly, in one
line naming the unfinished cells, with every finished cell written to
results.json."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _workers(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"spawn_main" in open(f"/proc/{d}/cmdline", "rb").read():
                kids.append(int(d))
        except (OSError, ValueError, IndexError):
            pass
    return kids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers through /proc")
@pytest.mark.parametrize("how", ["kill-worker", "ctrl-c"])
def test_demo_stops_promptly_and_keeps_the_finished_cells(tmp_path, how: str) -> None:
    out = tmp_path / "demo"
    # The child gets Ctrl-C's default action: a test run started in the background (`pytest &`
    # from a script) ignores SIGINT, the child would inherit that, and Python then installs no
    # KeyboardInterrupt handler, so the interrupt below would never arrive.
    p = subprocess.Popen([sys.executable, "-m", "fastfair", "demo", "--tiny", "--jobs", "2", "--out", str(out),
                          "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in p.stdout:  # until the first cell has finished
            if ": acc " in line:
                break
        workers = _workers(p.pid)
        assert workers, "no worker processes"
        t0 = time.time()
        if how == "kill-worker":
            os.kill(workers[0], signal.SIGKILL)
        else:
            os.kill(p.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the parent; workers ignore it
        _, err = p.communicate(timeout=60)
        took = time.time() - t0
    finally:
        if p.poll() is None:
            p.kill()
    assert took < 30 and "Traceback" not in err, err
    assert not [w for w in workers if os.path.exists(f"/proc/{w}") and
                open(f"/proc/{w}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"], "workers left running"
    res = json.load(open(out / "results.json"))
    assert len(res["results"]) >= 1 and res["unfinished"]
    assert len(res["results"]) + len(res["unfinished"]) == 5
    if how == "kill-worker":
        assert p.returncode == 1
        line = err.strip().splitlines()[-1]
        assert line.startswith("fastfair demo: error: a worker process died") and "unfinished cells:" in line
    else:
        assert p.returncode == 130 and "interrupted" in err


def test_demo_with_workers_shows_each_cells_iterations(tmp_path) -> None:
    p = subprocess.run([sys.executable, "-m", "fastfair", "demo", "--tiny", "--jobs", "2", "--out",
                        str(tmp_path / "demo")], capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    shown = p.stderr.replace("\r", "\n")
    for cell in ("dm+vanilla", "dm+fairdd", "dm+cobra", "dc+vanilla", "dc+fairdd"):
        assert f"{cell}: " in shown and "it/s" in shown, cell  # a bar per cell, not only a cell count
