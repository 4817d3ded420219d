"""What ``fastfair reproduce`` runs: the published numbers, the tables (which
datasets and cells), the budgets (how much of the protocol), and the settings
that define one cell's result. No torch: the CLI's parser reads these.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .eval_protocol import method_protocol

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
# "+balanced": each class batch drawn equally from its groups (--sample-per-group). Over two correlated
# attributes the groups present in a plain class batch are the class's own row and column of the grid, so
# the fair objectives need it to see the other intersections at all (benchmarks/NOTES.md, "Intersectional
# C-MNIST"); the plain cells stay as the reference's sampling.
_INTERSECTIONAL_CELLS = (*((m, o) for m in ("dm", "dc") for o in (
    "vanilla", "fairdd@fg", "fairdd@bg", "fairdd@marginal", "fairdd@intersection", "cobra@intersection")),
    ("dm", "fairdd@intersection+balanced"), ("dm", "cobra@intersection+balanced"),
    ("dc", "fairdd@intersection+balanced"), ("dm", "fairdd-raked@intersection+balanced"),
    ("dm", "fairdd@intersection+balanced-init"))
# "+balanced-init": "+balanced" and the initial real images spread over the class's groups and colours
# (--init real-balanced): the reference's real init starts ~8 of a class's 10 images in its own colours.
SAMPLINGS = {"balanced": {"sample_per_group": True}}
SAMPLINGS["balanced-init"] = {**SAMPLINGS["balanced"], "init": "real-balanced"}
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
          "the intersection, and FairDD / COBRA / fastfair's raked FairDD over the intersection with every group "
          "sampled (+balanced), FairDD so and started from colour-balanced real images (+balanced-init) (no "
          "published numbers: no paper defines these sets)"),
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
    """How much of the protocol a run spends. ``distill[key]``: DistillConfig
    overrides (empty: the preset's paper values), keyed by a method family
    (``dm``, ``dc``, ``cafe``) or by a method of the DC family (``idc``,
    ``dream``), which then replaces its family's entry; ``eval_epochs[key]``
    (the same keys): None
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
                cobra_eval: dict[str, int] | None = None, idc_dream_iterations: int | None = None) -> Budget:
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
    if idc_dream_iterations is not None:
        distill["idc"] = distill["dream"] = {**dc, "iterations": idc_dream_iterations}
        # The reference evaluates IDC and DREAM sets as it evaluates DM's (1000 epochs with DSA).
        eval_epochs = {**eval_epochs, "idc": eval_epochs["dm"], "dream": eval_epochs["dm"]}
        summary += (f"; IDC and DREAM {idc_dream_iterations} outer iterations (DC {dc['iterations']}), the rest "
                    f"as DC, evaluated as DM ({eval_epochs['dm']} epochs with DSA; the reference evaluates them "
                    "as DM)")
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


# The cpu budget's settings but DM's iterations, shared with cpu-long.
_CPU_DM = {"lr_img": LR_DM, "batch_real": 256, "width": 16}
_CPU_REST: dict[str, Any] = dict(
    dc={**_DC_CPU_20, "iterations": 80, "batch_real": 256},
    eval_epochs={"dm": 500, "dc": 300, "cafe": 300}, eval_runs=5, width=32,
    cafe={"iterations": CAFE_CPU_ITERATIONS, "outer_loop": 5, "inner_loop": 5, "lr_img": LR_CAFE,
          "batch_real": 256, "width": 16},
    # FairDD's DM evaluation halved (1000 -> 500) and its DC one kept whole: COBRA's the same way.
    cobra_eval={"dm": 750, "dc": 1000})
DM_LONG_ITERATIONS = 6000
IDC_DREAM_LONG_ITERATIONS = 160

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
                dm={"iterations": 1000, **_CPU_DM}, **_CPU_REST),
    # Measured before it was chosen (benchmarks/NOTES.md, "C-FMNIST: the recipe, then the budget"):
    # C-FMNIST BG DM+FairDD at the cpu budget's settings, 3 evaluation runs, Acc / DEO_M at 1000 to
    # 6000 iterations: 63.5 / 58.3, 63.8 / 53.7, 65.5 / 53.3, 65.5 / 50.0, 65.6 / 38.7, 66.0 / 41.0.
    # IDC and DREAM measured before (NOTES, "C-MNIST FG IDC+FairDD and DREAM+FairDD at twice the outer
    # iterations"): C-MNIST FG IDC+FairDD at 80 outer iterations 88.30 / 26.50 / 12.27 (Acc / DEO_M /
    # DEO_A, 5 runs), at 160 89.73 / 20.03 / 10.66. Their evaluation length (500, DM's) was set after
    # the 160-iteration DREAM+FairDD set read 87.15 / 22.62 at 300 epochs and 88.12 / 21.65 at 500: the
    # reference evaluates IDC and DREAM as DM, so the cpu budget's 300 (its DC family's) was the outlier.
    _cpu_budget("cpu-long", f"the cpu budget with DM run {DM_LONG_ITERATIONS // 1000}x as long and IDC and "
                            "DREAM twice as long, where the iteration curves say the budget buys fairness "
                            "(C-FMNIST DM, C-MNIST IDC; about 35 min for a DM+FairDD cell, 1 thread, 30-45 min for "
                            "an IDC or DREAM cell; DC and CAFE as the cpu budget)",
                dm={"iterations": DM_LONG_ITERATIONS, **_CPU_DM}, idc_dream_iterations=IDC_DREAM_LONG_ITERATIONS,
                **_CPU_REST),
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
    return f"{method}_{objective.replace('@', '_over_').replace('+', '_')}_ipc{ipc}"


def split_cell_objective(name: str) -> tuple[str, str, str]:
    """A cell's objective name as (objective, fair_over, sampling):
    "fairdd@fg" is the objective fair over one attribute (or "marginal"), as
    the several-attribute tables name their cells; "+balanced" is how the
    class batches are drawn and the set starts (SAMPLINGS); either may be absent ("")."""
    rest, _, sampling = name.partition("+")
    objective, _, over = rest.partition("@")
    return objective, over, sampling


def cell_settings(table: Table, budget: Budget, dataset: str, method: str, objective: str,
                  seed: int) -> dict[str, Any]:
    """Everything that defines a cell's result (a finished cell is reused
    only when these are equal)."""
    fam = _family(method)
    obj, over, sampling = split_cell_objective(objective)
    if sampling and sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r} in cell {method}:{objective}; "
                         f"choose {', '.join(SAMPLINGS)}")
    distill = {"dataset": dataset, "method": method, "objective": obj, "ipc": table.ipc,
               "preset": table.preset, "seed": seed, **budget.distill.get(method, budget.distill.get(fam, {}))}
    if over:
        distill["fair_over"] = over
    distill.update(SAMPLINGS.get(sampling, {}))
    if table.preset == "cobra" and method == "idc" and "inner_loop" in distill:
        # A protocol feature, not a size: COBRA's train_idc.py trains no
        # network between its matching steps, whatever the budget.
        distill["inner_loop"] = 0
    net = {"width": budget.width} if budget.width is not None else {}
    if "depth" in distill:
        net["depth"] = distill["depth"]
    epochs = budget.preset_eval_epochs.get(table.preset, {}).get(
        fam, budget.eval_epochs.get(method, budget.eval_epochs.get(fam)))
    # Augmentation is the preset's protocol, never the budget's: COBRA's
    # train_idc.py evaluates IDC without DSA where FairDD's code uses it.
    dsa = method_protocol(method, table.preset)[1]
    return {"distill": distill, "eval": {"epochs": epochs, "runs": budget.eval_runs,
                                         "net_kwargs": net, "seed": seed, "dsa": dsa}, "budget": budget.name}
