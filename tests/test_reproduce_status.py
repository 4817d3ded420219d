"""`fastfair reproduce --status` and two processes on one --out: a cell
another process holds is left to it (never evaluated twice), and the status
says where every cell stands without taking a lock or writing a file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


from fastfair import reproduce, reproduce_status
from fastfair.cli import main
from fastfair.distill import outdir

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
BASE = ["reproduce", "--table", "cdigits", "--budget", "tiny", "--datasets", "cdigits-fg"]


class Holder:
    """Another process holding a cell folder's lock, as a running reproduce does."""

    def __init__(self, path: Path) -> None:
        code = (f"from fastfair.distill import outdir\nimport sys\nwith outdir.locked({str(path)!r}):\n"
                "    print('held', flush=True)\n    sys.stdin.read()\n")
        self.p = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "held"

    def release(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=60)


def _files(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}


def test_a_cell_held_by_another_process_is_left_to_it(tmp_path, capsys) -> None:
    out = tmp_path / "r"
    held = out / "cdigits-fg" / "dm_vanilla_ipc10"
    held.mkdir(parents=True)
    other = Holder(held)
    try:
        rc = main([*BASE, "--cells", "dm:vanilla,dc:vanilla", "--out", str(out), "--threads", "1"])
        assert holder_pid(held) == str(other.p.pid)
    finally:
        other.release()
    assert rc == 0
    captured = capsys.readouterr()
    assert f"dm+vanilla: being run by pid {other.p.pid}; left to it" in captured.err
    assert "1 cells were being run by another process" in captured.out
    # The other cell ran; the held one was not touched (no runs appended beside its owner's).
    assert (out / "cdigits-fg" / "dc_vanilla_ipc10" / "cell.json").is_file()
    assert sorted(os.listdir(held)) == [outdir.LOCK]
    res = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["objective"]) for r in res["results"]] == [("dc", "vanilla")]


def holder_pid(path: Path) -> str | None:
    return outdir.holder(str(path))


def test_holder_without_proc_locks_probes(tmp_path, monkeypatch) -> None:
    d = tmp_path / "d"
    d.mkdir()
    assert outdir.holder(str(d)) is None  # no lock file: nothing held, nothing created
    assert os.listdir(d) == []
    other = Holder(d)
    try:
        assert outdir.holder(str(d)) == str(other.p.pid)
        real_open = open
        monkeypatch.setattr("builtins.open", lambda f, *a, **k: (_ for _ in ()).throw(PermissionError(13, "no"))
                            if f == "/proc/locks" else real_open(f, *a, **k))
        assert outdir.holder(str(d)) == str(other.p.pid)
    finally:
        other.release()
    assert outdir.holder(str(d)) is None


def test_status_says_where_each_cell_stands(tmp_path, capsys) -> None:
    out = tmp_path / "r"
    t, b = reproduce.TABLES["cdigits"], reproduce.BUDGETS["cpu"]

    def settings(cell: str, seed: int = 0) -> dict:
        return reproduce.cell_settings(t, b, "cdigits-fg", *cell.split(":"), seed)

    def cell_dir(cell: str) -> Path:
        d = out / "cdigits-fg" / reproduce.cell_name(*cell.split(":"), t.ipc)
        d.mkdir(parents=True, exist_ok=True)
        return d

    # dm:vanilla done; dc:vanilla half distilled (its log's last line cut by
    # a kill); dm:fairdd distilled with one evaluation run in; dm:cobra
    # finished under other settings (a stale cell.json); dc:fairdd damaged.
    (cell_dir("dm:vanilla") / "cell.json").write_text(json.dumps(
        {"settings": settings("dm:vanilla"), "acc": 21.5, "deo_m": 100.0, "deo_m_std": 0.0, "deo_a": 99.1}))
    (cell_dir("dc:vanilla") / "log.jsonl").write_text(
        '{"iteration": 10, "loss": 2.0, "seconds": 5.0}\n{"iteration": 20, "loss": 1.5, "seconds": 35.0}\n'
        '{"iteration": 20, "eval": {}, "seconds": 99.0}\n{"iteration": 30, "lo')
    (cell_dir("dm:fairdd") / "eval_runs.jsonl").write_text(
        json.dumps({"settings": settings("dm:fairdd"), "run": 0, "result": {"acc": 50.0, "seconds": 150.0}}) + "\n")
    # an older runs file (no times): no estimate
    (cell_dir("idc:fairdd") / "eval_runs.jsonl").write_text(
        json.dumps({"settings": settings("idc:fairdd"), "run": 0, "result": {"acc": 50.0}}) + "\n")
    (cell_dir("dm:cobra") / "cell.json").write_text(json.dumps({"settings": settings("dm:cobra", 7), "acc": 1.0}))
    (cell_dir("dc:fairdd") / "eval_runs.jsonl").write_text("[1, 2]\n")
    before = _files(out)
    other = Holder(cell_dir("dc:vanilla"))
    starting = Holder(cell_dir("idc:vanilla"))  # held, nothing written yet
    try:
        s = reproduce_status.status("cdigits", "cpu", str(out), datasets=["cdigits-fg"])
        assert main(["reproduce", "--table", "cdigits", "--budget", "cpu", "--datasets", "cdigits-fg",
                     "--out", str(out), "--status"]) == 0
    finally:
        other.release()
        starting.release()
    after = _files(out)
    for cell in ("dc_vanilla_ipc10", "idc_vanilla_ipc10"):
        after.pop(str(Path("cdigits-fg", cell, outdir.LOCK)))  # the holders' own lock files
    assert after == before  # the status wrote nothing and made no lock file
    by = {r["cell"]: r for r in s["cells"]}
    assert by["dm:vanilla"]["state"] == "done" and by["dm:vanilla"]["detail"].startswith("Acc 21.50, DEO_M 100.00")
    iterations = settings("dc:vanilla")["distill"]["iterations"]
    assert iterations > 10
    assert by["dc:vanilla"]["state"] == "distilling" and by["dc:vanilla"]["iteration"] == 20
    assert by["dc:vanilla"]["pid"] == str(other.p.pid) and by["dm:vanilla"]["pid"] is None
    assert by["dm:fairdd"]["state"] == "evaluating" and by["dm:fairdd"]["runs_done"] == 1
    assert by["dm:cobra"]["state"] == "stale"
    assert by["dc:fairdd"]["state"] == "damaged" and "eval_runs.jsonl" in by["dc:fairdd"]["detail"]
    assert by["dc:cobra"]["state"] == "not started"
    assert by["idc:vanilla"]["state"] == "starting" and by["idc:vanilla"]["pid"] == str(starting.p.pid)
    assert s["done"] == 1 and len(s["cells"]) == len(t.cells)
    text = capsys.readouterr().out
    assert text.splitlines()[0].endswith(f"1 of {len(t.cells)} cells done")
    # 3 s per iteration over the log's timed records (an evaluation record is not one)
    left = (iterations - 20) * 3.0
    eta = f"~{left / 60:.0f} min" if left >= 60 else "<1 min"
    assert f"iteration 20 of {iterations}, {eta} of distillation left at the last pace " \
           f"[running, pid {other.p.pid}]" in text
    assert f"starting     [running, pid {starting.p.pid}]" in text
    assert by["idc:fairdd"]["state"] == "evaluating" and "left" not in by["idc:fairdd"]["detail"]
    eta = f"~{150.0 * (b.eval_runs - 1) / 60:.0f} min"
    assert f"1 of {b.eval_runs} evaluation runs finished, {eta} left at their pace" in text


def test_status_of_a_missing_out_is_one_line(tmp_path, capsys) -> None:
    assert main([*BASE, "--out", str(tmp_path / "nope"), "--status"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert not (tmp_path / "nope").exists()
