"""``fastfair demo``: vanilla vs FairDD vs COBRA on the embedded dataset.

The paper protocol (20000 DM iterations, width-128 ConvNets, 1000 evaluation
epochs x 5 runs) takes GPU hours; the demo uses a reduced QUICK protocol,
recorded in the JSON "protocol" field and printed in the header, that finishes
in a few minutes on 2 CPU cores. The objectives are the papers'; only the
budgets and the network width are cut.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any

import torch

from ..figures import pyplot, save_png
from ..interrupts import holds_interrupts
from .config import DistillConfig
from .loop import run
from .synset import save_grid

DATASET = "cdigits-fg"
IPC = 10
DM_RUNS = (("dm", "vanilla"), ("dm", "fairdd"), ("dm", "cobra"))
DC_RUNS = (("dc", "vanilla"), ("dc", "fairdd"))


def quick_protocol(image_size: int, tiny: bool = False) -> dict[str, Any]:
    """The demo's reduced protocol (``tiny``: a seconds-long one for tests).

    Fewer iterations than the papers (DM 500 instead of 20000, DC 10 outer
    iterations of 5 matching steps instead of 1000 of 10) are compensated by a
    larger image learning rate (10 for both, the DM paper's IPC-100 value;
    applied equally to every objective); the distillation networks are
    width-16 ConvNets. The real batch keeps the paper's 256 per class, i.e.
    every training image of a class (about 125), so that the rare colours
    (1 or 2 images each) are in every batch.

    Where the budget went (DM+FairDD, 1 thread, measured on the 2-core VM,
    benchmarks/NOTES.md "demo protocol"): DM iterations buy fairness (200 ->
    600 iterations: DEO_M 35 -> 26, DEO_A 11.9 -> 9.9, Acc flat); a width-32
    evaluation network and longer evaluation buy accuracy (150 -> 500 epochs:
    Acc 88.8 -> 90.4); a larger image lr does not replace iterations (400 at
    lr 20: DEO_M 35). With 400 evaluation epochs instead of 500 the same
    synthetic set measured Acc 89.81 against 90.25.
    """
    depth = 3 if image_size >= 16 else 2
    if tiny:
        return {"name": "tiny (testing only)", "dm_iterations": 2, "dc_iterations": 1, "outer_loop": 1,
                "inner_loop": 1, "lr_img": 10.0, "batch_real": 16, "width": 8, "depth": depth,
                "cobra_warmup_epochs": 1, "eval_epochs": 2, "eval_runs": 1, "eval_width": 8}
    return {"name": "quick", "dm_iterations": 500, "dc_iterations": 10, "outer_loop": 5, "inner_loop": 5,
            "lr_img": 10.0, "batch_real": 256, "width": 16, "depth": depth, "cobra_warmup_epochs": 10,
            "eval_epochs": 500, "eval_runs": 2, "eval_width": 32}


def describe(p: dict[str, Any]) -> str:
    return (f"{p['name']} protocol: ConvNet width {p['width']} depth {p['depth']} (distil); "
            f"DM {p['dm_iterations']} iterations, DC {p['dc_iterations']} outer iterations "
            f"(loops {p['outer_loop']}/{p['inner_loop']}), image lr {p['lr_img']:g}, "
            f"real batch {p['batch_real']}/class, "
            f"COBRA warm-up {p['cobra_warmup_epochs']} epochs; eval {p['eval_runs']} runs x "
            f"{p['eval_epochs']} epochs, width {p['eval_width']} (DM sets with DSA, DC sets without, as the reference "
            f"evaluates them). (Paper: DM 20000 it at lr 1, DC 1000 at lr 0.1, width 128, eval 1000 epochs.)")


def _config(method: str, objective: str, p: dict[str, Any], seed: int) -> DistillConfig:
    dm = method == "dm"
    return DistillConfig(
        dataset=DATASET, method=method, objective=objective, ipc=IPC,
        iterations=p["dm_iterations"] if dm else p["dc_iterations"], lr_img=p["lr_img"],
        batch_real=p["batch_real"], width=p["width"], depth=p["depth"],
        outer_loop=None if dm else p["outer_loop"], inner_loop=None if dm else p["inner_loop"],
        cobra_warmup_epochs=p["cobra_warmup_epochs"] if (dm and objective == "cobra") else None,
        seed=seed, log_every=max(1, (p["dm_iterations"] if dm else p["dc_iterations"]) // 10),
    )


@holds_interrupts
def bar_chart(rows: list[dict[str, Any]], path: str, title: str) -> None:
    plt = pyplot()

    names = [f"{r['method']}\n{r['objective']}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.3 * len(rows) * 1.5, 3.6))
    for ax, (key, label) in zip(axes, (("acc", "Acc (%) higher is better"), ("deo_m", "DEO_M (%) lower is fairer"),
                                       ("deo_a", "DEO_A (%) lower is fairer"))):
        ax.bar(range(len(rows)), [r[key] for r in rows], yerr=[r[f"{key}_std"] for r in rows], capsize=3,
               color=["#8c8c8c" if r["objective"] == "vanilla" else "#1f77b4" if r["objective"] == "fairdd"
                      else "#d62728" for r in rows])
        ax.set_xticks(range(len(rows)), names, fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, 100)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path)


def _run_cell(method: str, objective: str, p: dict[str, Any], seed: int, device: str, out_dir: str,
              progress: bool, threads: int | None, ds: Any = None, report: Any = None) -> dict[str, Any]:
    """Distil and evaluate one (method, objective) cell and save its grid; the
    row of the results table. Top level so that a worker process can run it
    (``ds`` None: load the dataset here); its result depends only on its
    arguments (not on the process or the order of the cells), so ``jobs``
    never changes the numbers."""
    from .. import data
    from ..evaluate import evaluate_synset

    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    if ds is None:
        ds = data.load(DATASET)
    cfg = _config(method, objective, p, seed)
    t0 = time.perf_counter()
    def to_parent(entry: dict[str, Any]) -> None:  # a worker's iterations go to the parent's per-cell bars
        if "iteration" in entry:
            report.put((f"{method}+{objective}", int(entry["iteration"]), cfg.iterations))

    res = run(cfg, ds, device=dev, progress=progress, on_log=None if report is None else to_parent)
    t_distil = time.perf_counter() - t0
    # method=: DM sets are evaluated with DSA, DC sets without (the reference's evaluation).
    ev = evaluate_synset(res.images, res.labels, ds, epochs=p["eval_epochs"], runs=p["eval_runs"], seed=seed,
                         device=dev, progress=progress, method=method,
                         net_kwargs={"width": p["eval_width"], "depth": p["depth"]})
    t_eval = time.perf_counter() - t0 - t_distil
    save_grid(res.images, res.labels, ds.num_classes, ds.denormalize,
              os.path.join(out_dir, f"grid_{method}_{objective}.png"))
    return {"method": method, "objective": objective,
            **{k: ev[k] for k in ("acc", "acc_std", "deo_m", "deo_m_std", "deo_a", "deo_a_std", "suf_m",
                                  "suf_m_std", "suf_a", "suf_a_std")},
            "seconds": round(t_distil, 2), "eval_seconds": round(t_eval, 2)}


def default_jobs(device: torch.device, cells: int) -> int:
    """Worker processes for the cells: one per core on a CPU (the cells are
    independent, and two 1-thread processes beat one 2-thread process on
    these small convolutions: about 1.75x against 1.28x the speed of one
    thread, measured on the 2-core VM; benchmarks/NOTES.md),
    one on a GPU (a cell keeps it busy)."""
    if device.type != "cpu":
        return 1
    return max(1, min(cells, os.cpu_count() or 1))


def _print_row(row: dict[str, Any]) -> None:
    print(f"  {row['method']}+{row['objective']}: acc {row['acc']:.2f}  DEO_M {row['deo_m']:.2f}  "
          f"DEO_A {row['deo_a']:.2f}  (distil {row['seconds']:.1f} s, eval {row['eval_seconds']:.1f} s)",
          flush=True)


def _run_cells(plan: list[tuple[str, str]], p: dict[str, Any], seed: int, dev: torch.device, out_dir: str,
               progress: bool, threads: int | None, jobs: int, ds: Any) -> list[dict[str, Any]]:
    """The rows of ``plan`` in plan order: in this process (``jobs`` 1, on
    ``ds``) or in ``jobs`` spawned workers of ``threads`` threads each."""
    if jobs <= 1:
        done: list[dict[str, Any]] = []
        try:
            for method, objective in plan:
                done.append(_run_cell(method, objective, p, seed, str(dev), out_dir, progress, threads, ds))
                _print_row(done[-1])
        except KeyboardInterrupt:
            raise CellsStopped(done, [f"{m}+{o}" for m, o in plan[len(done):]], "interrupted") from None
        return done
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    # spawn, not fork: a forked child of a process with OpenMP threads can hang.
    rows: dict[int, dict[str, Any]] = {}
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_ignore_sigint)
    # Per-cell progress: the workers put (cell, iteration, total) on a queue
    # that a thread here turns into one bar per running cell.
    cell_bars = _CellBars(ctx, file=sys.stderr) if progress else None
    report = cell_bars.queue if cell_bars else None
    # Longest first (DM+COBRA, whose warm-up doubles a DM step, then DM, then DC), so that no
    # worker is left with a long cell at the end.
    order = sorted(range(len(plan)), key=lambda i: (plan[i] != ("dm", "cobra"), plan[i][0] != "dm", i))
    futures = {pool.submit(_run_cell, *plan[i], p, seed, str(dev), out_dir, False, threads, None, report): i
               for i in order}
    bar = tqdm(total=len(plan), desc=f"demo cells ({jobs} processes)", unit="cell", disable=not progress,
               file=sys.stderr)

    def unfinished() -> list[str]:
        return [f"{m}+{o}" for i, (m, o) in enumerate(plan) if i not in rows]

    try:
        for fut in as_completed(futures):
            rows[futures[fut]] = fut.result()
            bar.update(1)
            _print_row(rows[futures[fut]])
    except BrokenProcessPool:
        _stop_workers(pool)
        raise CellsStopped([rows[i] for i in sorted(rows)], unfinished(),
                           "a worker process died (killed, or out of memory)") from None
    except BaseException as exc:  # Ctrl-C, SIGTERM: stop every worker now, keep what finished
        _stop_workers(pool)
        if isinstance(exc, KeyboardInterrupt):
            raise CellsStopped([rows[i] for i in sorted(rows)], unfinished(), "interrupted") from exc
        raise
    finally:
        bar.close()
        if cell_bars is not None:
            cell_bars.close()
    pool.shutdown()
    return [rows[i] for i in range(len(plan))]


class _CellBars:
    """One tqdm bar per cell, fed by the workers through a manager queue
    (spawned workers cannot share a plain one) and drawn by a thread here."""

    def __init__(self, ctx: Any, file: Any) -> None:
        import threading

        self._manager = ctx.Manager()
        self.queue = self._manager.Queue()
        self._file = file
        self._bars: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        from tqdm import tqdm

        while True:
            try:
                item = self.queue.get()
            except (EOFError, OSError):  # the manager is gone
                return
            if item is None:
                return
            name, it, total = item
            bar = self._bars.get(name)
            if bar is None:
                bar = self._bars[name] = tqdm(total=total, desc=name, unit="it", position=len(self._bars) + 1,
                                              leave=False, file=self._file)
            bar.update(max(0, it - bar.n))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.queue.put(None)
            self._thread.join(timeout=5)
        for bar in self._bars.values():
            bar.close()
        with contextlib.suppress(Exception):
            self._manager.shutdown()


class CellsStopped(Exception):
    """The demo ended before every cell finished: ``rows`` are the finished
    cells, ``unfinished`` the others' names, ``reason`` why."""

    def __init__(self, rows: list[dict[str, Any]], unfinished: list[str], reason: str) -> None:
        super().__init__(f"{reason}; unfinished cells: {', '.join(unfinished)}")
        self.rows, self.unfinished, self.reason = rows, unfinished, reason


def _ignore_sigint() -> None:
    # Workers leave Ctrl-C to the parent, which stops them (no traceback per worker).
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_workers(pool: Any) -> None:
    """Cancel the queued cells and terminate the running ones at once (a
    shutdown would wait for them)."""
    procs = list(getattr(pool, "_processes", {}).values())  # no public handle on the workers
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.terminate()
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.join(timeout=10)


def _write_results(path: str, obj: dict[str, Any]) -> None:
    from .outdir import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = (json.dumps(obj, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(text))


def run_demo(out_dir: str = ".", json_path: str | None = None, device: str | None = None, seed: int = 0,
             tiny: bool = False, with_dc: bool = True, progress: bool = True,
             threads: int | None = None, jobs: int | None = None) -> dict[str, Any]:
    """Run the demo, print the table, write the JSON, grids and bar chart; return the JSON object.

    ``jobs``: worker processes for the cells (default :func:`default_jobs`);
    the numbers do not depend on it."""
    from .. import data
    from ..report import format_table

    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(out_dir, exist_ok=True)
    ds = data.load(DATASET)
    p = quick_protocol(ds.image_size, tiny)
    plan = list(DM_RUNS) + (list(DC_RUNS) if with_dc else [])
    jobs = default_jobs(dev, len(plan)) if jobs is None else max(1, min(jobs, len(plan)))
    if jobs > 1 and threads is None:
        threads = max(1, (os.cpu_count() or 1) // jobs)  # each worker its share of the cores
    n_threads = threads if threads is not None else torch.get_num_threads()
    header = (f"fastfair demo: {DATASET} (C={ds.num_classes} classes x G={ds.num_groups} groups, "
              f"{ds.image_size}px), IPC {IPC}, device {dev}, {jobs} process(es) x {n_threads} CPU threads\n"
              f"{describe(p)}")
    print(header, flush=True)
    t_all = time.perf_counter()
    path = json_path or os.path.join(out_dir, "results.json")
    try:
        rows = _run_cells(plan, p, seed, dev, out_dir, progress, threads, jobs, ds)
    except CellsStopped as stop:
        # The finished cells are not lost: written with the unfinished ones named.
        _write_results(path, {"dataset": DATASET, "ipc": IPC, "protocol": {"summary": describe(p), **p},
                              "device": str(dev), "jobs": jobs, "threads": n_threads, "seed": seed,
                              "results": stop.rows, "unfinished": stop.unfinished, "stopped": stop.reason})
        if stop.reason == "interrupted":
            print(f"fastfair demo: interrupted; {len(stop.rows)} finished cell(s) in {path}", file=sys.stderr)
            raise KeyboardInterrupt from None
        raise
    total = time.perf_counter() - t_all
    print()
    print(format_table(rows, title=f"{DATASET}, IPC {IPC}, {p['name']} protocol (mean +- std over "
                                   f"{p['eval_runs']} runs; seconds = distillation time)"))
    print(f"total {total:.1f} s")
    out = {"dataset": DATASET, "ipc": IPC, "protocol": {"summary": describe(p), **p}, "device": str(dev),
           "jobs": jobs, "threads": n_threads,
           "seed": seed, "total_seconds": round(total, 2), "results": rows}
    _write_results(path, out)
    bar_chart(rows, os.path.join(out_dir, "metrics.png"), f"{DATASET}, IPC {IPC}, {p['name']} protocol")
    print(f"results in {path}; grids and metrics.png in {os.path.abspath(out_dir)}", file=sys.stderr)
    return out
