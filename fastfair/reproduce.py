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
``results.png``, rewritten after every cell.

This module imports torch only inside the functions that run cells, so the
CLI's parser can read its tables without paying for torch.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------- published numbers

# (dataset, ipc, method, objective) -> (DEO_M, DEO_A, Acc, source); None where
# the source does not report the metric.
PAPER: dict[tuple[str, int, str, str], tuple[float | None, float | None, float | None, str]] = {}


def _fairdd_rows() -> None:
    src = "FairDD Tables 1-2"
    rows = {
        "cmnist-fg": ((100.0, 99.96, 25.01), (17.04, 7.95, 94.61), (99.85, 65.61, 71.41), (26.75, 11.96, 90.62),
                      (10.10, 5.89, 97.71)),
        "cmnist-bg": ((100.0, 99.97, 23.40), (13.42, 6.77, 94.88), (100.0, 73.60, 65.91), (20.66, 9.94, 90.84),
                      (9.70, 5.78, 97.80)),
        "cfmnist-bg": ((100.0, 99.68, 22.26), (33.05, 19.72, 71.10), (100.0, 92.91, 47.32), (61.75, 34.88, 68.51),
                       (91.40, 51.68, 77.97)),
        "cfmnist-fg": ((100.0, 99.05, 33.35), (26.87, 16.38, 77.09), (99.40, 78.96, 60.77), (46.80, 24.01, 76.01),
                       (79.20, 41.72, 82.94)),
        "cifar10-s": ((59.20, 39.31, 37.88), (31.75, 8.73, 45.17), (42.23, 27.35, 37.88), (22.08, 8.22, 41.82),
                      (49.72, 33.17, 69.78)),
        "celeba": ((30.01, 28.85, 61.79), (9.37, 5.71, 64.37), (15.48, 14.16, 57.19), (6.64, 5.29, 57.63),
                   (24.85, 24.16, 74.09)),
    }
    cells = (("dm", "vanilla"), ("dm", "fairdd"), ("dc", "vanilla"), ("dc", "fairdd"), ("whole", "-"))
    for ds, vals in rows.items():
        for (m, o), (dm, da, acc) in zip(cells, vals):
            PAPER[(ds, 10, m, o)] = (dm, da, acc, src)
    # IDC and DREAM at IPC 10 (the same tables; vanilla | +FairDD).
    more = {
        "cmnist-fg": ((100.0, 91.45, 53.06), (12.24, 6.64, 95.67), (98.99, 78.71, 75.04), (11.88, 7.21, 94.04)),
        "cmnist-bg": ((100.0, 88.30, 62.00), (18.61, 7.50, 94.84), (100.0, 52.06, 79.81), (15.31, 6.83, 93.54)),
        "cfmnist-fg": ((100.0, 97.27, 44.08), (32.33, 16.80, 79.66), (100.0, 95.17, 49.72), (42.00, 20.87, 77.24)),
        "cfmnist-bg": ((100.0, 99.40, 37.59), (42.00, 23.80, 72.67), (100.0, 94.70, 45.30), (36.00, 23.50, 71.56)),
    }
    cells = (("idc", "vanilla"), ("idc", "fairdd"), ("dream", "vanilla"), ("dream", "fairdd"))
    for ds, vals in more.items():
        for (m, o), (dm, da, acc) in zip(cells, vals):
            PAPER[(ds, 10, m, o)] = (dm, da, acc, src)


def _cobra_rows() -> None:
    # COBRA reports "EOD" (shown in the DEO_M column) and Acc, as summarised in docs/methods.md.
    src = "COBRA (EOD as DEO_M)"
    for o, (eod, acc) in {"vanilla": (82.87, 45.4), "fairdd": (25.17, 61.2), "cobra": (9.37, 62.4)}.items():
        PAPER[("cifar10-s", 100, "dm", o)] = (eod, None, acc, src)
    PAPER[("cmnist-bg", 50, "dm", "cobra")] = (7.46, None, 96.8, src)


_fairdd_rows()
_cobra_rows()

# The preset (protocol) under which each source's numbers were measured: a
# published number is shown only beside a cell run under the same protocol.
# COBRA's `--mode fairdd` is FairDD's sum for DM but fairdd-mean for DC and
# IDC, and COBRA evaluates on its own schedule, so FairDD's Table 1-2 numbers
# do not describe the `cobra` table's cells (not even its vanilla ones).
SOURCE_PRESET = {"FairDD Tables 1-2": "fairdd", "COBRA (EOD as DEO_M)": "cobra"}


def published(table: str, dataset: str, ipc: int, method: str, objective: str,
              ) -> tuple[float | None, float | None, float | None, str] | None:
    """The published (DEO_M, DEO_A, Acc, source) of a cell of ``table``, or
    None where no source measured that cell under the table's preset."""
    p = PAPER.get((dataset, ipc, method, objective))
    if p is None or SOURCE_PRESET[p[3]] != TABLES[table].preset:
        return None
    return p


@dataclass(frozen=True)
class Table:
    """The cells of a published table: every dataset x (method, objective) at ``ipc``."""

    name: str
    datasets: tuple[str, ...]
    ipc: int
    cells: tuple[tuple[str, str], ...]
    preset: str
    description: str


_CMNIST_CELLS = (("dm", "vanilla"), ("dm", "fairdd"), ("dm", "cobra"), ("dc", "vanilla"), ("dc", "fairdd"),
                 ("dc", "cobra"), ("idc", "vanilla"), ("idc", "fairdd"), ("dream", "vanilla"), ("dream", "fairdd"))
_CAFE_CELLS = (("cafe", "vanilla"), ("cafe", "fairdd"), ("cafe", "cobra"))
_COBRA_CELLS = (*((m, o) for m in ("dm", "dc", "idc") for o in ("vanilla", "fairdd", "cobra")),
                ("cafe", "vanilla"), ("cafe", "cobra"))
_INTERSECTIONAL_CELLS = tuple((m, o) for m in ("dm", "dc") for o in (
    "vanilla", "fairdd@fg", "fairdd@bg", "fairdd@marginal", "fairdd@intersection", "cobra@intersection"))
TABLES: dict[str, Table] = {t.name: t for t in (
    Table("fairdd-cmnist", ("cmnist-fg", "cmnist-bg"), 10, _CMNIST_CELLS, "fairdd",
          "FairDD Tables 1-2, C-MNIST FG and BG rows at IPC 10 (DM, DC, IDC, DREAM, each vanilla and +FairDD), "
          "plus DM+COBRA and DC+COBRA"),
    Table("fairdd-cfmnist", ("cfmnist-fg", "cfmnist-bg"), 10, _CMNIST_CELLS, "fairdd",
          "FairDD Tables 1-2, C-FMNIST FG and BG rows at IPC 10 (DM, DC, IDC, DREAM, each vanilla and +FairDD), "
          "plus DM+COBRA and DC+COBRA"),
    Table("fairdd", ("cmnist-fg", "cmnist-bg", "cfmnist-fg", "cfmnist-bg", "cifar10-s", "celeba"), 10,
          _CMNIST_CELLS, "fairdd", "FairDD Tables 1-2, every dataset row at IPC 10"),
    Table("cobra-cifar10s", ("cifar10-s",), 100, (("dm", "vanilla"), ("dm", "fairdd"), ("dm", "cobra")), "cobra",
          "COBRA, CIFAR10-S DM at IPC 100 (COBRA's protocol)"),
    Table("cobra-cmnist", ("cmnist-bg",), 50, (("dm", "vanilla"), ("dm", "fairdd"), ("dm", "cobra")), "cobra",
          "COBRA, C-MNIST (BG) DM at IPC 50 (COBRA's protocol)"),
    Table("intersectional", ("cmnist-fgbg", "cfmnist-fgbg"), 10, _INTERSECTIONAL_CELLS, "fairdd",
          "fastfair's two-attribute C-MNIST / C-FMNIST (digit colour x background colour, 10 x 10 groups) at IPC "
          "10: vanilla, FairDD over fg only, over bg only, over the marginals, over the intersection, COBRA over "
          "the intersection (no published numbers: no paper defines these sets)"),
    Table("cdigits-intersectional", ("cdigits-fgbg",), 10, _INTERSECTIONAL_CELLS, "fairdd",
          "the intersectional cells on the embedded cdigits-fgbg (4 x 4 groups; needs no download)"),
    Table("cobra", ("cmnist-fg", "cmnist-bg", "cfmnist-fg", "cfmnist-bg"), 10, _COBRA_CELLS, "cobra",
          "COBRA's table as COBRA's code runs it, at IPC 10 on C-MNIST and C-FMNIST FG and BG: DM, DC, IDC x "
          "vanilla / FairDD (its --mode fairdd: FairDD's sum for DM, fairdd-mean for DC and IDC) / COBRA, and "
          "CAFE vanilla / COBRA, under COBRA's preset and evaluation (no published numbers are available to "
          "us)"),
    Table("cobra-cafe", ("cmnist-fg", "cmnist-bg", "cfmnist-fg", "cfmnist-bg"), 10, _CAFE_CELLS, "cobra",
          "COBRA's CAFE backbone (train_cafe.py, run_cafe.sh) at IPC 10 on C-MNIST and C-FMNIST FG and BG: "
          "vanilla CAFE, fastfair's CAFE+FairDD, CAFE+COBRA, under COBRA's protocol (no published numbers "
          "are available to us)"),
    Table("cdigits-cafe", ("cdigits-fg",), 10, _CAFE_CELLS, "cobra",
          "the CAFE cells on the embedded cdigits-fg (needs no download)"),
    Table("cdigits", ("cdigits-fg", "cdigits-bg"), 10, _CMNIST_CELLS, "fairdd",
          "the C-MNIST cells on the embedded cdigits datasets (no published numbers; needs no download)"),
)}


# --------------------------------------------------------------------------- budgets

@dataclass(frozen=True)
class Budget:
    """How much of the protocol a run spends. ``distill[method]``: DistillConfig
    overrides (empty: the preset's paper values); ``eval_epochs[method]``: None
    takes the method's reference protocol; ``width``: None is the ConvNet's 128."""

    name: str
    summary: str
    distill: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_epochs: dict[str, int | None] = field(default_factory=dict)
    eval_runs: int = 5
    # preset -> family -> epochs, where a preset's reference evaluates for
    # another length than FairDD's (COBRA: DM 1500, DC 1000 against 1000 / 300).
    preset_eval_epochs: dict[str, dict[str, int]] = field(default_factory=dict)
    width: int | None = None


# The cpu budgets' DM image lr: 150 iterations instead of 20000 need a larger step; on real
# C-MNIST FG, DM+FairDD at the cpu-short budget measured DEO_M / DEO_A / Acc 46.7 / 20.1 / 80.2 at lr 10
# and 51.4 / 22.7 / 78.1 at lr 50 (2 eval runs each).
LR_DM = 10.0
LR_CAFE = 1.0
CAFE_CPU_ITERATIONS = 200
# The first two cpu budgets distil DC alike (they differ in DM and in the evaluation).
_DC_CPU_20 = {"iterations": 20, "outer_loop": 5, "inner_loop": 5, "lr_img": 10.0, "batch_real": 64, "width": 16}


def _real_batch(n: int) -> str:
    return "the paper's real batch of 256 per class" if n == 256 else f"a real batch of {n} per class (paper 256)"


def _cpu_budget(name: str, intro: str, dm: dict[str, Any], dc: dict[str, Any], eval_epochs: dict[str, int],
                eval_runs: int, width: int, cafe: dict[str, Any] | None = None,
                cobra_eval: dict[str, int] | None = None) -> Budget:
    """A reduced budget whose summary is written from its settings (so the
    two cannot drift apart), each beside the paper's value."""
    nets = (f"width-{dm['width']} ConvNets (distil and eval)" if width == dm["width"] else
            f"width-{dm['width']} ConvNets for distillation, width-{width} for evaluation")
    ev = (f"{eval_epochs['dm']} epochs (DM with DSA, DC without, as the reference)"
          if eval_epochs["dm"] == eval_epochs["dc"] else
          f"DM {eval_epochs['dm']} epochs with DSA, DC {eval_epochs['dc']} without")
    summary = (f"{intro}: {nets}; DM {dm['iterations']} iterations at image lr {dm['lr_img']:g} (paper 20000 at "
               f"1) with {_real_batch(dm['batch_real'])}, COBRA's warm-up rule kept (10 epochs at IPC 10); "
               f"DC {dc['iterations']} outer iterations of {dc['outer_loop']} matching steps with "
               f"{dc['inner_loop']} inner epochs (paper 1000 of 10 with 50) at image lr {dc['lr_img']:g} (paper "
               f"0.1) with {_real_batch(dc['batch_real'])}; evaluation {ev} x {eval_runs} runs (paper 1000 / 300 "
               f"x 5)")
    distill = {"dm": dm, "dc": dc}
    if cafe is not None:
        distill["cafe"] = cafe
        summary += (f"; CAFE {cafe['iterations']} iterations of {cafe['outer_loop']} matching steps with "
                    f"{cafe['inner_loop']} inner epochs (COBRA's code 2000 of 10 with 50) at image lr "
                    f"{cafe['lr_img']:g} (0.1) with {_real_batch(cafe['batch_real'])}, evaluated "
                    f"{eval_epochs['cafe']} epochs without augmentation (1000)")
    preset_eval = {}
    if cobra_eval is not None:
        preset_eval["cobra"] = cobra_eval
        summary += (f"; under the cobra preset the evaluation keeps COBRA's proportions: DM {cobra_eval['dm']} "
                    f"epochs with DSA, DC and IDC {cobra_eval['dc']} without (COBRA's code 1500 / 1000)")
    return Budget(name, summary, distill=distill, eval_epochs=eval_epochs, eval_runs=eval_runs, width=width,
                  preset_eval_epochs=preset_eval)


BUDGETS: dict[str, Budget] = {b.name: b for b in (
    Budget("paper", "the full protocol: the preset's distillation settings, width-128 ConvNets, the method's "
                    "reference evaluation (DM 1000 epochs with DSA, DC 300 without), 5 evaluation runs",
           eval_runs=5),
    # Measured on real C-MNIST FG before it was chosen (benchmarks/NOTES.md): DM+FairDD at 1000
    # iterations 89.87 / 26.60 / 11.01 (Acc / DEO_M / DEO_A) evaluated for 300 epochs, 90.64 / 22.90 /
    # 10.61 for 500; DC+FairDD 20 / 80 / 160 iterations at 64 real images 78.3 / 81.4 / 83.0 Acc with
    # DEO_M 68 / 56 / 55, at 256 real images 80 iterations 83.2 Acc, DEO_M 24.8.
    # CAFE measured on real C-MNIST FG before it was chosen (benchmarks/NOTES.md "CAFE"): 100
    # iterations of 5 x 5 at lr 0.1: vanilla 19.1 / 100, FairDD 88.1 / 32.5, COBRA 81.9 / 73.5
    # (Acc / DEO_M; COBRA's class terms are divided by C, so its step is 10x smaller); COBRA at lr 1
    # 87.6 / 34.1.
    _cpu_budget("cpu", "reduced for a 2-core CPU (about 50 min for the DM and DC cells of a C-MNIST dataset, "
                       "1 thread; 40-60 min for each IDC or DREAM cell)",
                dm={"iterations": 1000, "lr_img": LR_DM, "batch_real": 256, "width": 16},
                dc={**_DC_CPU_20, "iterations": 80, "batch_real": 256},
                eval_epochs={"dm": 500, "dc": 300, "cafe": 300}, eval_runs=5, width=32,
                cafe={"iterations": CAFE_CPU_ITERATIONS, "outer_loop": 5, "inner_loop": 5, "lr_img": LR_CAFE,
                      "batch_real": 256, "width": 16},
                # FairDD's DM evaluation halved (1000 -> 500) and its DC one kept whole: COBRA's the same way.
                cobra_eval={"dm": 750, "dc": 1000}),
    _cpu_budget("cpu-20min", "the second cpu budget (about 20 min per C-MNIST dataset, 1 thread)",
                dm={"iterations": 400, "lr_img": LR_DM, "batch_real": 256, "width": 16}, dc=_DC_CPU_20,
                eval_epochs={"dm": 300, "dc": 300}, eval_runs=2, width=32),
    _cpu_budget("cpu-short", "the first cpu budget (about 15 min per C-MNIST dataset)",
                dm={"iterations": 150, "lr_img": LR_DM, "batch_real": 128, "width": 16}, dc=_DC_CPU_20,
                eval_epochs={"dm": 200, "dc": 200}, eval_runs=2, width=16),
    Budget("tiny", "seconds-long, for tests only",
           distill={"dm": {"iterations": 2, "batch_real": 8, "width": 8, "depth": 2, "cobra_warmup_epochs": 1},
                    "dc": {"iterations": 1, "outer_loop": 1, "inner_loop": 1, "batch_real": 8, "width": 8,
                           "depth": 2},
                    "cafe": {"iterations": 1, "outer_loop": 2, "inner_loop": 1, "batch_real": 8, "width": 8}},
           eval_epochs={"dm": 1, "dc": 1, "cafe": 1}, eval_runs=2, width=8),
)}


def _family(method: str) -> str:
    return method if method in ("dm", "cafe") else "dc"


def cell_name(method: str, objective: str, ipc: int) -> str:
    return f"{method}_{objective.replace('@', '_over_')}_ipc{ipc}"


def cell_settings(table: Table, budget: Budget, dataset: str, method: str, objective: str,
                  seed: int) -> dict[str, Any]:
    """Everything that defines a cell's result (a finished cell is reused
    only when these are equal)."""
    fam = _family(method)
    # "fairdd@fg": the objective fair over one attribute (or "marginal"); the
    # several-attribute tables name their cells so.
    obj, _, over = objective.partition("@")
    distill = {"dataset": dataset, "method": method, "objective": obj, "ipc": table.ipc,
               "preset": table.preset, "seed": seed, **budget.distill.get(fam, {})}
    if over:
        distill["fair_over"] = over
    if table.preset == "cobra" and method == "idc" and "inner_loop" in distill:
        # A protocol feature, not a size: COBRA's train_idc.py trains no
        # network between its matching steps, whatever the budget.
        distill["inner_loop"] = 0
    net = {"width": budget.width} if budget.width is not None else {}
    if "depth" in distill:
        net["depth"] = distill["depth"]
    epochs = budget.preset_eval_epochs.get(table.preset, {}).get(fam, budget.eval_epochs.get(fam))
    return {"distill": distill, "eval": {"epochs": epochs, "runs": budget.eval_runs,
                                         "net_kwargs": net, "seed": seed}, "budget": budget.name}


# --------------------------------------------------------------------------- running

def _write_text(path: str, text: str) -> None:
    """Through outdir.atomic_write: the old file or the new one, never half, and
    no temporary left behind on any exit (Ctrl-C and SIGTERM included)."""
    from .distill.outdir import atomic_write

    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def _write_json(path: str, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2) + "\n")


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


def _previous_results(path: str) -> list[dict[str, Any]]:
    prev = _read_object(path, "a results file") or {}
    rows = prev.get("results", [])
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"dataset", "method", "objective"} <= r.keys()
                                             for r in rows):
        raise _bad_state(path, "a results file")
    return rows


def _eval_runs_done(path: str, settings: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Finished evaluation runs of this cell's settings, in run order
    (``settings`` None: only check the file's shape)."""
    done: list[dict[str, Any]] = []
    if not os.path.isfile(path):
        return done
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by an interrupt: that run is redone
                break
            if not isinstance(rec, dict) or not isinstance(rec.get("result"), dict):
                raise _bad_state(path, "an evaluation-runs file")
            if rec.get("settings") != settings or rec.get("run") != len(done):
                break
            done.append(rec["result"])
    return done


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
             root: str | None = None) -> dict[str, Any]:
    """Distil (resuming a checkpoint) and evaluate (keeping finished runs) one
    cell; returns its record (also written to ``out_dir/cell.json``)."""
    import numpy as np

    from . import distill
    from .evaluate import evaluate_synset
    from .heatmap import cell_heatmap

    settings = cell_settings(table, budget, dataset, method, objective, seed)
    os.makedirs(out_dir, exist_ok=True)
    done = _read_object(os.path.join(out_dir, "cell.json"), "a cell record")
    if done is not None and done.get("settings") == settings:
        return done
    # root is recorded so that `fastfair eval CELL_DIR` finds the data again.
    cfg = distill.DistillConfig(**settings["distill"], root=root, log_every=10, checkpoint_every=10)
    t0 = time.perf_counter()
    res = distill.run(cfg, ds, out_dir=out_dir, device=device, resume=True, progress=progress)
    t_distil = res.seconds
    runs_path = os.path.join(out_dir, "eval_runs.jsonl")
    ev = settings["eval"]
    runs = _eval_runs_done(runs_path, settings)
    if not runs and os.path.exists(runs_path):
        os.unlink(runs_path)  # another settings' runs: start the file over
    t1 = time.perf_counter()
    for r in range(len(runs), ev["runs"]):
        one = evaluate_synset(res.images, res.labels, ds, epochs=ev["epochs"], runs=1, seed=ev["seed"] + r,
                              device=device, progress=progress, net_kwargs=ev["net_kwargs"], method=method)
        rec = {k: one[k] for k in ("acc", "deo_m", "deo_a", "suf_m", "suf_a", "worst_group_acc", "cell_acc",
                                   "epochs", "dsa", "test_cells")}
        if one["per_attribute"]:  # several protected attributes: each one's marginal DEO / SUF
            rec["per_attribute"] = {n: {k: v[0] for k, v in m.items()} for n, m in one["per_attribute"].items()}
            rec["per_attribute_cells"] = one["per_attribute_cells"]
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
    out.update(eval_epochs=runs[0]["epochs"], eval_dsa=runs[0]["dsa"], eval_runs=len(runs),
               distill_seconds=round(t_distil, 1), eval_seconds=round(t_eval, 1),
               wall_seconds=round(time.perf_counter() - t0, 1))
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


def machine() -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": sys.version.split()[0]}
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def reproduce(table: str, budget: str, out: str, root: str | None = None, datasets: list[str] | None = None,
              cells: list[tuple[str, str]] | None = None, seed: int = 0, device: str | None = None,
              progress: bool = False, threads: int | None = None, note: str | None = None) -> dict[str, Any]:
    """Run (or resume) every cell of ``table`` at ``budget`` and write the
    results (module docstring). ``datasets`` / ``cells`` restrict the table."""
    import torch

    from . import data

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
    if threads is not None:
        torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    _check_state(out, t, dsets, plan)  # a damaged state file stops the run before any work
    records: list[dict[str, Any]] = []
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
            rec = run_cell(ds, t, b, name, method, objective, cell_dir, seed=seed, device=device,
                           progress=progress, log=log, root=root)
            log(f"  {method}+{objective}: acc {rec['acc']:.2f} DEO_M {rec['deo_m']:.2f} DEO_A {rec['deo_a']:.2f} "
                f"(distil {rec['distill_seconds']:.0f} s, eval {rec['eval_seconds']:.0f} s)")
            records.append({k: v for k, v in rec.items() if k not in ("config",)})
            with _results_lock(out):
                write_outputs(out, table, budget, _merge_results(out, records), started, note)
    with _results_lock(out):
        return write_outputs(out, table, budget, _merge_results(out, records), started, note)


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
    disk = [r for r in _previous_results(os.path.join(out, "results.json")) if _key(r) not in mine]
    return disk + _finished_cells(out, mine | {_key(r) for r in disk}) + records


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


# --------------------------------------------------------------------------- outputs

def _fmt(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} +- {std:.2f}"


def _attr(r: dict[str, Any], attr: str) -> str:
    a = r.get("per_attribute", {}).get(attr)
    return "-" if a is None else f"{_fmt(a.get('deo_m'))} / {_fmt(a.get('deo_a'))}"


def markdown(table: str, budget: str, results: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """The measured numbers beside the published ones, one row per cell."""
    t, b = TABLES[table], BUDGETS[budget]
    lines = [f"# `fastfair reproduce --table {table} --budget {budget}`", "",
             f"{t.description}. Measured: mean +- std (population) over the evaluation runs; "
             f"paper: the published mean. SUF_M / SUF_A: COBRA's max / mean sufficiency gap ('-': runs "
             f"recorded before fastfair reported it). Budget `{budget}`: {b.summary}.", ""]
    mach = info.get("machine", {})
    lines += [f"Machine: {mach.get('cpu', mach.get('processor', '?'))}, {mach.get('cpu_count', '?')} cores, "
              f"torch {mach.get('torch', '?')}, {mach.get('threads', '?')} threads"
              + (f"; {info['note']}" if info.get("note") else "") + ".", ""]
    lines += ["| dataset | IPC | method | objective | DEO_M | DEO_A | Acc | SUF_M | SUF_A | worst cell "
              "| paper DEO_M / DEO_A / Acc | source | minutes |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    # Several protected attributes: each attribute's marginal DEO_M / DEO_A beside the intersectional ones.
    attrs = list(dict.fromkeys(a for r in results for a in r.get("per_attribute", {})))
    if attrs:
        lines[-2] = lines[-2].replace(" | worst cell |", " | " + " | ".join(f"{a} DEO_M / DEO_A" for a in attrs)
                                      + " | worst cell |")
        lines[-1] = lines[-1] + "---|" * len(attrs)
    order = {c: i for i, c in enumerate(t.cells)}
    rows = sorted(results, key=lambda r: (t.datasets.index(r["dataset"]) if r["dataset"] in t.datasets else 99,
                                          order.get((r["method"], r["objective"]), 99)))
    for r in rows:
        p = published(table, r["dataset"], r["ipc"], r["method"], r["objective"])
        paper = " / ".join(_fmt(v) for v in p[:3]) if p else "-"
        mins = (r.get("distill_seconds", 0) + r.get("eval_seconds", 0)) / 60
        lines.append(f"| {r['dataset']} | {r['ipc']} | {r['method']} | {r['objective']} | "
                     f"{_fmt(r['deo_m'], r['deo_m_std'])} | {_fmt(r['deo_a'], r['deo_a_std'])} | "
                     f"{_fmt(r['acc'], r['acc_std'])} | {_fmt(r.get('suf_m'), r.get('suf_m_std'))} | "
                     f"{_fmt(r.get('suf_a'), r.get('suf_a_std'))} | "
                     + "".join(f"{_attr(r, a)} | " for a in attrs)
                     + f"{_fmt(r['worst_group_acc'])} | {paper} | "
                     f"{p[3] if p else '-'} | {mins:.1f} |")
    cells = sorted({(r["dataset"], r["test_cells"]) for r in rows if r.get("per_attribute") and "test_cells" in r})
    if cells:
        lines += ["", "DEO over the intersectional groups (DEO_M / DEO_A columns) and over each attribute's "
                  "values (the attribute columns); test cells used, (class, intersectional group) cells with "
                  "test images: " + "; ".join(f"{d} {n}" for d, n in cells) + "."]
    whole = [(d, published(table, d, t.ipc, "whole", "-")) for d in t.datasets]
    whole = [(d, p) for d, p in whole if p]
    if whole:
        lines += ["", "Whole training set (paper, not run here): "
                  + "; ".join(f"{d} {' / '.join(_fmt(v) for v in p[:3])}" for d, p in whole) + "."]
    return "\n".join(lines) + "\n"


def bar_chart(table: str, results: list[dict[str, Any]], path: str, title: str) -> None:
    """Measured (bars with std) and published (black ticks) DEO_M, DEO_A, Acc per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        return
    names = [f"{r['dataset']}\n{r['method']}+{r['objective']}" for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.1 * len(results) * 1.5, 3.8))
    colour = {"vanilla": "#8c8c8c", "fairdd": "#1f77b4", "cobra": "#d62728"}
    for ax, (key, label, idx) in zip(axes, (("deo_m", "DEO_M (%) lower is fairer", 0),
                                            ("deo_a", "DEO_A (%) lower is fairer", 1),
                                            ("acc", "Acc (%) higher is better", 2))):
        xs = range(len(results))
        ax.bar(xs, [r[key] for r in results], yerr=[r[f"{key}_std"] for r in results], capsize=3,
               color=[colour.get(r["objective"], "#2ca02c") for r in results])
        for x, r in zip(xs, results):
            p = published(table, r["dataset"], r["ipc"], r["method"], r["objective"])
            if p and p[idx] is not None:
                ax.plot([x - 0.4, x + 0.4], [p[idx]] * 2, color="black", lw=2)
        ax.set_xticks(list(xs), names, fontsize=6, rotation=90)
        ax.set_title(label + "\n(black: paper)", fontsize=8)
        ax.set_ylim(0, 105)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    from .distill.outdir import atomic_write

    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    finally:
        plt.close(fig)


def write_outputs(out: str, table: str, budget: str, results: list[dict[str, Any]], started: str,
                  note: str | None) -> dict[str, Any]:
    info = {"table": table, "budget": budget, "budget_summary": BUDGETS[budget].summary,
            "description": TABLES[table].description, "started": started,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), "note": note}
    obj = {**info, "results": results,
           "paper": [{"dataset": d, "ipc": i, "method": m, "objective": o, "deo_m": v[0], "deo_a": v[1],
                      "acc": v[2], "source": v[3]} for (d, i, m, o), v in PAPER.items()
                     if d in TABLES[table].datasets and i == TABLES[table].ipc and published(table, d, i, m, o)]}
    _write_json(os.path.join(out, "results.json"), obj)
    _write_text(os.path.join(out, "results.md"), markdown(table, budget, results, info))
    bar_chart(table, results, os.path.join(out, "results.png"), f"fastfair reproduce {table}, {budget} budget")
    return obj
