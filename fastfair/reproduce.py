"""``fastfair reproduce``: run the cells of a paper table and put the measured
numbers beside the published ones.

A *table* names datasets, an IPC and the (method, objective) cells of a
published table (FairDD Tables 1-2, COBRA's reported numbers; docs/methods.md
"Headline results"). A *budget* says how much of the protocol is run:

- ``paper``: the full protocol (the preset's distillation settings, width-128
  ConvNets, the method's reference evaluation, 5 evaluation runs); GPU hours.
- ``cpu``: a stated reduced protocol that fits a quiet 2-core machine in about
  an hour per dataset for the five C-MNIST cells (see :data:`BUDGETS`: fewer
  iterations at a larger image lr, narrower networks, fewer evaluation
  epochs and runs). Its numbers are not the paper's protocol and say so.
- ``tiny``: seconds; for tests only.

Resumable at two levels: a finished cell (``cell.json`` with the same
settings) is skipped; an unfinished one continues its distillation from its
checkpoint and keeps the evaluation runs it already finished
(``eval_runs.jsonl``). Outputs in ``--out``: one folder per cell, and
``results.json``, ``results.md`` (measured mean +- std beside the paper) and
``results.png``, rewritten after every cell. A process holds a cell's folder
(an flock) while it distils and evaluates it; another process planning the
same cell leaves it to the holder and goes on, so two processes on one
command share its cells (:mod:`fastfair.reproduce_status` reads where each
stands).

This module imports torch only inside the functions that run cells, so the
CLI's parser can read its tables without paying for torch. The tables and
budgets live in :mod:`fastfair.reproduce_tables`, the summary files in
:mod:`fastfair.reproduce_outputs`; this module runs the cells and keeps the
state that makes a run resumable.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from .eval_protocol import method_protocol
from .provenance import build, machine
from .reproduce_outputs import _write_json, markdown, write_outputs
from .reproduce_tables import (BUDGETS, PAPER, SOURCE_PRESET, TABLES, Budget, Table, cell_name, cell_settings,
                               published)

# The tables, budgets and outputs are this module's face too (fastfair.reproduce.TABLES, ...).
__all__ = ["BUDGETS", "PAPER", "SOURCE_PRESET", "TABLES", "Budget", "Table", "build", "cell_name", "cell_settings",
           "machine", "markdown", "published", "reproduce", "run_cell", "write_outputs"]

# --------------------------------------------------------------------------- running

def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _bad_state(path: str, what: str) -> ValueError:
    return ValueError(f"{path} is not {what} that fastfair reproduce wrote; move it away (or delete it) and run "
                      "the same command again to redo that part")


def _read_object(path: str, what: str) -> dict[str, Any] | None:
    """A state file that must hold a JSON object: None when absent or
    unreadable (redone), ValueError naming it when it holds something else."""
    obj = _read_json(path)
    if obj is not None and not isinstance(obj, dict):
        raise _bad_state(path, what)
    return obj


def _previous_results(path: str, prev: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The cell records of a results file (``prev``: the file already read)."""
    if prev is None:
        prev = _read_object(path, "a results file") or {}
    rows = prev.get("results", [])
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"dataset", "method", "objective"} <= r.keys()
                                             for r in rows):
        raise _bad_state(path, "a results file")
    return rows


def settings_as_recorded(settings: Any) -> Any:
    """A cell's settings as they read today. Records written before the
    evaluation's DSA was part of the settings were evaluated with FairDD's
    protocol for the method (reproduce did not pass the preset then), so
    that is what their missing ``dsa`` means: equal to today's wherever the
    presets agree, and a different result where they do not (COBRA's IDC),
    which is then evaluated again."""
    if not isinstance(settings, dict) or not isinstance(settings.get("eval"), dict) or "dsa" in settings["eval"]:
        return settings
    method = settings.get("distill", {}).get("method") if isinstance(settings.get("distill"), dict) else None
    return {**settings, "eval": {**settings["eval"], "dsa": method_protocol(method)[1]}}


def _eval_runs_done(path: str, settings: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Finished evaluation runs of this cell's settings, in run order
    (``settings`` None: only check the file's shape)."""
    return _read_eval_runs(path, settings)[0]


def _read_eval_runs(path: str, settings: dict[str, Any] | None) -> tuple[list[dict[str, Any]], int]:
    """:func:`_eval_runs_done` and the bytes of the lines they were read from:
    what follows (a line cut by an interrupt, another settings' runs) is not
    kept."""
    done: list[dict[str, Any]] = []
    end = 0
    if not os.path.isfile(path):
        return done, end
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):  # a record is written with its newline in one write
                break
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by an interrupt: that run is redone
                break
            if not isinstance(rec, dict) or not isinstance(rec.get("result"), dict):
                raise _bad_state(path, "an evaluation-runs file")
            if settings_as_recorded(rec.get("settings")) != settings or rec.get("run") != len(done):
                break
            done.append(rec["result"])
            end += len(line)
    return done, end


def _check_state(out: str, table: Table, datasets: list[str], plan: list[tuple[str, str]]) -> None:
    """Every state file the run would read holds what reproduce writes
    (ValueError naming the first that does not), checked before any work."""
    _previous_results(os.path.join(out, "results.json"))
    for name in datasets:
        for method, objective in plan:
            cell_dir = os.path.join(out, name, cell_name(method, objective, table.ipc))
            _read_object(os.path.join(cell_dir, "cell.json"), "a cell record")
            _eval_runs_done(os.path.join(cell_dir, "eval_runs.jsonl"), None)


def run_cell(ds: Any, table: Table, budget: Budget, dataset: str, method: str, objective: str, out_dir: str,
             seed: int = 0, device: str | None = None, progress: bool = False, log: Any = None,
             root: str | None = None, note: str | None = None) -> dict[str, Any]:
    """Distil (resuming a checkpoint) and evaluate (keeping finished runs) one
    cell; returns its record (also written to ``out_dir/cell.json``). The
    cell's folder is locked for all of it, evaluation included, so a second
    process on the same cell gets outdir.DirectoryInUse at once instead of
    appending the same evaluation runs beside the first."""
    from .distill import outdir

    os.makedirs(out_dir, exist_ok=True)
    with outdir.locked(out_dir):
        return _run_cell(ds, table, budget, dataset, method, objective, out_dir, seed, device, progress, log, root,
                         note)


def _run_cell(ds: Any, table: Table, budget: Budget, dataset: str, method: str, objective: str, out_dir: str,
              seed: int, device: str | None, progress: bool, log: Any, root: str | None,
              note: str | None) -> dict[str, Any]:
    import numpy as np

    from . import distill
    from .evaluate import chance_floor, evaluate_synset
    from .heatmap import cell_heatmap

    settings = cell_settings(table, budget, dataset, method, objective, seed)
    done = _read_object(os.path.join(out_dir, "cell.json"), "a cell record")
    if done is not None and settings_as_recorded(done.get("settings")) == settings:
        return done
    # root is recorded so that `fastfair eval CELL_DIR` finds the data again.
    cfg = distill.DistillConfig(**settings["distill"], root=root, log_every=10, checkpoint_every=10)
    t0 = time.perf_counter()
    res = distill.run(cfg, ds, out_dir=out_dir, device=device, resume=True, progress=progress)
    t_distil = res.seconds
    runs_path = os.path.join(out_dir, "eval_runs.jsonl")
    ev = settings["eval"]
    runs, end = _read_eval_runs(runs_path, settings)
    if os.path.isfile(runs_path) and os.path.getsize(runs_path) > end:
        # Lines after the kept runs would stand between them and the runs
        # appended next, and the next resume would stop reading there.
        os.truncate(runs_path, end)
    t1 = time.perf_counter()
    for r in range(len(runs), ev["runs"]):
        t_run = time.perf_counter()
        one = evaluate_synset(res.images, res.labels, ds, epochs=ev["epochs"], runs=1, seed=ev["seed"] + r,
                              dsa=ev["dsa"], device=device, progress=progress, net_kwargs=ev["net_kwargs"],
                              method=method)
        rec = {k: one[k] for k in ("acc", "deo_m", "deo_a", "suf_m", "suf_a", "worst_group_acc", "cell_acc",
                                   "epochs", "dsa", "test_cells")}
        if one["per_attribute"]:  # several protected attributes: each one's marginal DEO / SUF
            rec["per_attribute"] = {n: {k: v[0] for k, v in m.items()} for n, m in one["per_attribute"].items()}
            rec["per_attribute_cells"] = one["per_attribute_cells"]
        rec["seconds"] = round(time.perf_counter() - t_run, 1)  # the run's wall time (`--status` reads the pace)
        with open(runs_path, "a") as f:
            f.write(json.dumps({"settings": settings, "run": r, "result": rec}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        runs.append(rec)
        if log:
            log(f"    eval run {r + 1}/{ev['runs']}: acc {rec['acc']:.2f} DEO_M {rec['deo_m']:.2f} "
                f"DEO_A {rec['deo_a']:.2f}")
    t_eval = time.perf_counter() - t1
    out: dict[str, Any] = {"dataset": dataset, "ipc": table.ipc, "method": method, "objective": objective,
                           "settings": settings, "config": res.config.to_dict()}
    for k in ("acc", "deo_m", "deo_a", "suf_m", "suf_a", "worst_group_acc"):
        if any(k not in r for r in runs):  # runs recorded before the sufficiency gaps were
            continue
        vals = np.array([r[k] for r in runs], dtype=np.float64)
        out[k], out[f"{k}_std"] = float(vals.mean()), float(vals.std())
    if all("per_attribute" in r for r in runs):
        out["per_attribute"] = {n: {k: float(np.mean([r["per_attribute"][n][k] for r in runs]))
                                    for k in runs[0]["per_attribute"][n]} for n in runs[0]["per_attribute"]}
    if all("test_cells" in r for r in runs):
        out["test_cells"] = runs[0]["test_cells"]
    cells = np.array([[[np.nan if v is None else v for v in row] for row in r["cell_acc"]] for r in runs])
    out["cell_acc"] = [[None if np.isnan(v) else float(v) for v in row] for row in cells.mean(0)]
    out["deo_floor"] = chance_floor(out["cell_acc"], ds)
    out.update(eval_epochs=runs[0]["epochs"], eval_dsa=runs[0]["dsa"], eval_runs=len(runs),
               distill_seconds=round(t_distil, 1), eval_seconds=round(t_eval, 1),
               wall_seconds=round(time.perf_counter() - t0, 1), build=build(), machine=machine(), note=note)
    title = f"{dataset} {method}+{objective} IPC {table.ipc} ({budget.name} budget)"
    cell_heatmap(out["cell_acc"], os.path.join(out_dir, "cells.png"), class_names=ds.class_names,
                 group_names=ds.group_names, title=title)
    if all("per_attribute_cells" in r for r in runs):
        # Several attributes: a heatmap per attribute, and the worst intersections.
        from .evaluate import _mean_cells
        from .heatmap import attribute_plots, worst_cells_plot

        out["per_attribute_cells"] = {n: _mean_cells([r["per_attribute_cells"][n] for r in runs])
                                      for n in runs[0]["per_attribute_cells"]}
        attribute_plots(out["per_attribute_cells"], ds, os.path.join(out_dir, "cells"), title)
        worst_cells_plot(out["cell_acc"], os.path.join(out_dir, "cells_worst.png"), class_names=ds.class_names,
                         group_names=ds.group_names, title=f"{title}: the 20 worst (class, intersection) cells")
    _write_json(os.path.join(out_dir, "cell.json"), out)
    return out


def planned(table: str, budget: str, datasets: list[str] | None = None,
            cells: list[tuple[str, str]] | None = None) -> tuple[Table, Budget, list[str], list[tuple[str, str]]]:
    """The table, the budget, the datasets and the (method, objective) cells
    a run covers (all of the table's by default); ValueError naming any
    unknown one."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}")
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    t, b = TABLES[table], BUDGETS[budget]
    dsets = list(datasets) if datasets else list(t.datasets)
    bad = [d for d in dsets if d not in t.datasets]
    if bad:
        raise ValueError(f"table {table!r} has no dataset {', '.join(bad)}; it has {', '.join(t.datasets)}")
    plan = list(cells) if cells else list(t.cells)
    bad_cells = [f"{m}:{o}" for m, o in plan if (m, o) not in t.cells]
    if bad_cells:
        raise ValueError(f"table {table!r} has no cell {', '.join(bad_cells)}; it has "
                         f"{', '.join(f'{m}:{o}' for m, o in t.cells)}")
    return t, b, dsets, plan


def reproduce(table: str, budget: str, out: str, root: str | None = None, datasets: list[str] | None = None,
              cells: list[tuple[str, str]] | None = None, seed: int = 0, device: str | None = None,
              progress: bool = False, threads: int | None = None, note: str | None = None) -> dict[str, Any]:
    """Run (or resume) every cell of ``table`` at ``budget`` and write the
    results (module docstring). ``datasets`` / ``cells`` restrict the table."""
    import torch

    from . import data
    from .distill.outdir import DirectoryInUse

    t, b, dsets, plan = planned(table, budget, datasets, cells)
    if threads is not None:
        torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    _check_state(out, t, dsets, plan)  # a damaged state file stops the run before any work
    records: list[dict[str, Any]] = []
    elsewhere: list[str] = []  # cells another process was running
    # What an earlier run left for the cells this run does not plan; re-read
    # at every write (_merge_results), so that two runs into one --out (two
    # datasets or cells at once, a common way to use both cores) keep each
    # other's finished cells instead of the last writer's view winning.
    for name in dsets:
        log(f"[reproduce] {table} / {name} at the {budget} budget")
        ds = data.load(name, root=root, cache=False)  # no cache: the data root may be read-only
        for method, objective in plan:
            cell_dir = os.path.join(out, name, cell_name(method, objective, t.ipc))
            log(f"  {method}+{objective} -> {cell_dir}")
            try:
                rec = run_cell(ds, t, b, name, method, objective, cell_dir, seed=seed, device=device,
                               progress=progress, log=log, root=root, note=note)
            except DirectoryInUse as exc:
                # The same cell in another process (the same command started
                # twice shares the cells this way): left to it; the results
                # files gain it when that process finishes it.
                log(f"  {method}+{objective}: being run by pid {exc.pid}; left to it")
                elsewhere.append(f"{name}/{cell_name(method, objective, t.ipc)} (pid {exc.pid})")
                continue
            log(f"  {method}+{objective}: acc {rec['acc']:.2f} DEO_M {rec['deo_m']:.2f} DEO_A {rec['deo_a']:.2f} "
                f"(distil {rec['distill_seconds']:.0f} s, eval {rec['eval_seconds']:.0f} s)")
            records.append({k: v for k, v in rec.items() if k not in ("config",)})
            with _results_lock(out):
                write_outputs(out, table, budget, _merge_results(out, records), started, note)
    with _results_lock(out):
        info = write_outputs(out, table, budget, _merge_results(out, records), started, note)
    return {**info, "elsewhere": elsewhere}


# Next to results.json: held while the top-level outputs are re-read and written.
RESULTS_LOCK = ".fastfair-results.lock"


def _key(r: dict[str, Any]) -> tuple:
    return (r["dataset"], r.get("ipc"), r["method"], r["objective"])


def _merge_results(out: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This run's records, plus every record on disk now that is not one of
    them: other runs' cells (also those finished since this run started),
    and the old record of a planned cell this run has not reached yet (it is
    replaced when the cell finishes)."""
    mine = {_key(r) for r in records}
    path = os.path.join(out, "results.json")
    prev = _read_object(path, "a results file") or {}
    disk = [r for r in _previous_results(path, prev) if _key(r) not in mine]
    merged = disk + _finished_cells(out, mine | {_key(r) for r in disk}) + records
    # Cells recorded before each cell kept its machine ran where the table
    # said they ran when they were written: keep that, not the machine of
    # whichever run writes the table next.
    for r in merged:
        if "machine" not in r and isinstance(prev.get("machine"), dict):
            r["machine"] = prev["machine"]
            r.setdefault("note", prev.get("note"))
    return merged


def _finished_cells(out: str, known: set[tuple]) -> list[dict[str, Any]]:
    """Records of finished cells (``out/DATASET/CELL/cell.json``) that no
    results.json lists: the cell folders are the ground truth, so a summary
    written from a stale results.json (one restored from git while a run was
    writing, say) loses no finished cell at the next write. A damaged
    cell.json is left out here; a run that plans its cell reports it."""
    found = []
    for ds in sorted(os.listdir(out)):
        ds_dir = os.path.join(out, ds)
        if not os.path.isdir(ds_dir):
            continue
        for cell in sorted(os.listdir(ds_dir)):
            try:
                rec = _read_object(os.path.join(ds_dir, cell, "cell.json"), "a cell record")
            except ValueError:
                continue
            if rec is None or not {"dataset", "method", "objective", "acc", "deo_m"} <= rec.keys():
                continue
            if _key(rec) not in known:
                known.add(_key(rec))
                found.append({k: v for k, v in rec.items() if k != "config"})
    return found


@contextlib.contextmanager
def _results_lock(out: str) -> Iterator[None]:
    """A blocking flock around the read-merge-write of the top-level outputs
    (short: no cell holds it while it runs)."""
    import fcntl

    fd = os.open(os.path.join(out, RESULTS_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
