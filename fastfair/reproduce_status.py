"""``fastfair reproduce --status``: where each cell of a reproduce run stands,
read from the files the run leaves in ``--out``, without running, locking or
writing anything (safe beside the running processes).

A cell is *done* (its ``cell.json`` holds this command's settings),
*evaluating* (k of R evaluation runs finished), *distilling* (the last
iteration its ``log.jsonl`` reached), *not started*, or *stale* (a
``cell.json`` of other settings: the command would run the cell again); a
damaged state file is named rather than read. A cell whose folder another
fastfair process holds is marked with that process's pid.
"""
from __future__ import annotations

import json
import os
from typing import Any

from .distill.outdir import holder
from .reproduce import _eval_runs_done, _read_object, planned, settings_as_recorded
from .reproduce_tables import cell_name, cell_settings


def _progress(path: str) -> tuple[int, float | None] | None:
    """The last iteration ``log.jsonl`` recorded and the seconds per
    iteration over its last ten records (None: no log yet; rate None when
    the records carry no times)."""
    recs: list[tuple[int, Any]] = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    it = rec.get("iteration")
                except (ValueError, AttributeError):
                    continue  # a line cut by an interrupt, or not a record
                if isinstance(it, int) and "eval" not in rec:
                    recs.append((it, rec.get("seconds")))
    except OSError:
        return None
    if not recs:
        return None
    (i0, t0), (i1, t1) = recs[max(0, len(recs) - 11)], recs[-1]
    timed = isinstance(t0, (int, float)) and isinstance(t1, (int, float)) and i1 > i0 and t1 > t0
    return i1, (t1 - t0) / (i1 - i0) if timed else None


def _minutes(seconds: float) -> str:
    return f"~{seconds / 60:.0f} min" if seconds >= 60 else "<1 min"


def cell_status(cell_dir: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One cell's state: ``state`` (done, evaluating, distilling, starting,
    not started, stale, damaged), ``detail`` (one line), ``pid`` (the process
    holding the cell's folder, or None) and, when done, its record."""
    out: dict[str, Any] = {"pid": holder(cell_dir) if os.path.isdir(cell_dir) else None}
    try:
        rec = _read_object(os.path.join(cell_dir, "cell.json"), "a cell record")
        runs = _eval_runs_done(os.path.join(cell_dir, "eval_runs.jsonl"), settings)
    except ValueError as exc:
        return {**out, "state": "damaged", "detail": str(exc)}
    if rec is not None and settings_as_recorded(rec.get("settings")) == settings:
        std = rec.get("deo_m_std")
        deo = f"{rec['deo_m']:.2f}" + (f" +- {std:.2f}" if std is not None else "")
        return {**out, "state": "done", "record": rec,
                "detail": f"Acc {rec['acc']:.2f}, DEO_M {deo}, DEO_A {rec['deo_a']:.2f}"}
    total = settings["eval"]["runs"]
    if runs:
        timed = [r["seconds"] for r in runs if isinstance(r.get("seconds"), (int, float))]
        left = (f", {_minutes(sum(timed) / len(timed) * (total - len(runs)))} left at their pace"
                if timed and len(runs) < total else "")
        return {**out, "state": "evaluating", "runs_done": len(runs),
                "detail": f"{len(runs)} of {total} evaluation runs finished{left}"}
    iterations = settings["distill"].get("iterations")
    progress = _progress(os.path.join(cell_dir, "log.jsonl"))
    if progress is not None:
        last, rate = progress
        of = f" of {iterations}" if iterations else ""
        finished = iterations is not None and last >= iterations
        if finished:
            detail = f"distilled ({last}{of} iterations), evaluation not started"
        else:
            # The rate of the last records: a resumed or shared run's pace, not its average.
            left = f", {_minutes(rate * (iterations - last))} of distillation left at the last pace" \
                if rate is not None and iterations else ""
            detail = f"iteration {last}{of}{left}"
        return {**out, "state": "evaluating" if finished else "distilling", "runs_done": 0, "iteration": last,
                "detail": detail}
    if rec is not None:
        return {**out, "state": "stale", "detail": "a cell.json of other settings: this command runs the cell again"}
    # Held but nothing written yet: a process is loading the data or
    # building its first iterations.
    return {**out, "state": "starting" if out["pid"] else "not started", "detail": ""}


def status(table: str, budget: str, out: str, datasets: list[str] | None = None,
           cells: list[tuple[str, str]] | None = None, seed: int = 0) -> dict[str, Any]:
    """Every planned cell's :func:`cell_status` (with ``dataset``, ``cell``
    and ``dir``) and the count of finished ones."""
    t, b, dsets, plan = planned(table, budget, datasets, cells)
    rows = []
    for name in dsets:
        for method, objective in plan:
            cell_dir = os.path.join(out, name, cell_name(method, objective, t.ipc))
            settings = cell_settings(t, b, name, method, objective, seed)
            rows.append({"dataset": name, "cell": f"{method}:{objective}", "dir": cell_dir,
                         **cell_status(cell_dir, settings)})
    return {"table": table, "budget": budget, "out": out, "seed": seed, "cells": rows,
            "done": sum(r["state"] == "done" for r in rows)}


def text(s: dict[str, Any]) -> str:
    """The status as a table a terminal shows."""
    rows = s["cells"]
    lines = [f"{s['table']} at the {s['budget']} budget (seed {s['seed']}) in {s['out']}: "
             f"{s['done']} of {len(rows)} cells done"]
    wd = max([len(r["dataset"]) for r in rows] + [7])
    wc = max([len(r["cell"]) for r in rows] + [4])
    for r in rows:
        running = f"[running, pid {r['pid']}]" if r["pid"] else ""
        tail = " ".join(t for t in (r["detail"], running.strip()) if t)
        lines.append(f"  {r['dataset']:<{wd}}  {r['cell']:<{wc}}  {r['state']:<11}  {tail}".rstrip())
    return "\n".join(lines) + "\n"
