"""The files ``fastfair reproduce`` writes beside its cells: results.json,
results.md (measured beside published) and results.png, each written whole
(an interrupt leaves the old file or the new one, never half)."""
from __future__ import annotations

import json
import os
import time
from typing import Any

from .figures import pyplot, save_png
from .interrupts import holds_interrupts
from .provenance import machine
from .reproduce_tables import BUDGETS, PAPER, TABLES, published, split_cell_objective


def _write_text(path: str, text: str) -> None:
    """Through outdir.atomic_write: the old file or the new one, never half, and
    no temporary left behind on any exit (Ctrl-C and SIGTERM included)."""
    from .distill.outdir import atomic_write

    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def _write_json(path: str, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2) + "\n")


def _fmt(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} +- {std:.2f}"


def _attr(r: dict[str, Any], attr: str) -> str:
    a = r.get("per_attribute", {}).get(attr)
    return "-" if a is None else f"{_fmt(a.get('deo_m'))} / {_fmt(a.get('deo_a'))}"


def in_table_order(table: str, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cells in the table's order (its datasets, then its cells), not the order they finished in."""
    t = TABLES[table]
    order = {c: i for i, c in enumerate(t.cells)}
    return sorted(results, key=lambda r: (t.datasets.index(r["dataset"]) if r["dataset"] in t.datasets else 99,
                                          order.get((r["method"], r["objective"]), 99)))


def _machine_text(mach: dict[str, Any], note: str | None) -> str:
    return (f"{mach.get('cpu', mach.get('processor', '?'))}, {mach.get('cpu_count', '?')} cores"
            + (f", GPU {mach['gpu']}" if mach.get("gpu") else "")
            + f", torch {mach.get('torch', '?')}, {mach.get('threads', '?')} threads" + (f"; {note}" if note else ""))


def machines_line(results: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """Where the cells ran: each cell's own machine and note (a table is
    often filled over several sessions, on different machines); cells
    recorded without one fall back to the table's."""
    seen: dict[str, int] = {}
    for r in results:
        own = r if isinstance(r.get("machine"), dict) else info
        text = _machine_text(own.get("machine", {}), own.get("note"))
        seen[text] = seen.get(text, 0) + 1
    if len(seen) <= 1:
        text = next(iter(seen), _machine_text(info.get("machine", {}), info.get("note")))
        return f"Machine: {text}."
    return "Machines: " + "; ".join(f"{text} ({n} cell{'s' if n > 1 else ''})" for text, n in seen.items()) + "."


def markdown(table: str, budget: str, results: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """The measured numbers beside the published ones, one row per cell."""
    t, b = TABLES[table], BUDGETS[budget]
    lines = [f"# `fastfair reproduce --table {table} --budget {budget}`", "",
             f"{t.description}. Measured: mean +- std (population) over the evaluation runs; "
             f"paper: the published mean. SUF_M / SUF_A: COBRA's max / mean sufficiency gap ('-': runs "
             f"recorded before fastfair reported it). Budget `{budget}`: {b.summary}.", ""]
    lines += [machines_line(results, info), ""]
    lines += ["| dataset | IPC | method | objective | DEO_M | DEO_A | Acc | SUF_M | SUF_A | worst cell "
              "| paper DEO_M / DEO_A / Acc | source | minutes |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    # Several protected attributes: each attribute's marginal DEO_M / DEO_A beside the intersectional ones.
    attrs = list(dict.fromkeys(a for r in results for a in r.get("per_attribute", {})))
    if attrs:
        lines[-2] = lines[-2].replace(" | worst cell |", " | " + " | ".join(f"{a} DEO_M / DEO_A" for a in attrs)
                                      + " | worst cell |")
        lines[-1] = lines[-1] + "---|" * len(attrs)
    # Cells evaluated since fastfair reports it: the DEO_M a group-blind model would score by chance.
    floors = any("deo_floor" in r for r in results)
    if floors:
        lines[-2] = lines[-2].replace(" | worst cell |", " | worst cell | chance DEO_M |")
        lines[-1] = lines[-1] + "---|"
    rows = in_table_order(table, results)
    for r in rows:
        p = published(table, r["dataset"], r["ipc"], r["method"], r["objective"])
        paper = " / ".join(_fmt(v) for v in p[:3]) if p else "-"
        mins = (r.get("distill_seconds", 0) + r.get("eval_seconds", 0)) / 60
        lines.append(f"| {r['dataset']} | {r['ipc']} | {r['method']} | {r['objective']} | "
                     f"{_fmt(r['deo_m'], r['deo_m_std'])} | {_fmt(r['deo_a'], r['deo_a_std'])} | "
                     f"{_fmt(r['acc'], r['acc_std'])} | {_fmt(r.get('suf_m'), r.get('suf_m_std'))} | "
                     f"{_fmt(r.get('suf_a'), r.get('suf_a_std'))} | "
                     + "".join(f"{_attr(r, a)} | " for a in attrs)
                     + f"{_fmt(r['worst_group_acc'])} | "
                     + (f"{_fmt(r['deo_floor']['deo_m'][0]) if 'deo_floor' in r else '-'} | " if floors else "")
                     + f"{paper} | "
                     f"{p[3] if p else '-'} | {mins:.1f} |")
    cells = sorted({(r["dataset"], r["test_cells"]) for r in rows if r.get("per_attribute") and "test_cells" in r})
    if cells:
        lines += ["", "DEO over the intersectional groups (DEO_M / DEO_A columns) and over each attribute's "
                  "values (the attribute columns); test cells used, (class, intersectional group) cells with "
                  "test images: " + "; ".join(f"{d} {n}" for d, n in cells) + "."]
    if floors:
        lines += ["", "chance DEO_M: what a model whose accuracy does not depend on the group would score on "
                  "the same test cells with the cell's per-class accuracies (mean of 1000 binomial draws; "
                  "docs/methods.md); '-': a cell evaluated before fastfair reported it."]
    whole = [(d, published(table, d, t.ipc, "whole", "-")) for d in t.datasets]
    whole = [(d, p) for d, p in whole if p]
    if whole:
        lines += ["", "Whole training set (paper, not run here): "
                  + "; ".join(f"{d} {' / '.join(_fmt(v) for v in p[:3])}" for d, p in whole) + "."]
    return "\n".join(lines) + "\n"


def bar_chart(table: str, results: list[dict[str, Any]], path: str, title: str) -> None:
    """Measured (bars with std) and published (black ticks) DEO_M, DEO_A, Acc per cell.

    The three metrics are stacked, one row each over the same cells, so that a
    table of 40+ cells stays readable (side by side it was an 80-inch strip)."""
    plt = pyplot()
    from matplotlib.patches import Patch

    if not results:
        return
    results = in_table_order(table, results)
    names = [f"{r['dataset']}\n{r['method']}+{r['objective']}" for r in results]
    n = len(results)
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 2.0 + 0.4 * n), 9.0), sharex=True)
    palette = {"vanilla": "#8c8c8c", "fairdd": "#1f77b4", "cobra": "#d62728"}

    def colour(objective: str) -> str:
        # "fairdd@fg", "cobra@intersection+balanced": the objective's colour, whatever it is fair over.
        return palette.get(split_cell_objective(objective)[0], "#2ca02c")

    xs = range(n)
    drew_paper = False
    for ax, (key, label, idx) in zip(axes, (("deo_m", "DEO_M (%), lower is fairer", 0),
                                            ("deo_a", "DEO_A (%), lower is fairer", 1),
                                            ("acc", "Acc (%), higher is better", 2))):
        ax.bar(xs, [r[key] for r in results], yerr=[r[f"{key}_std"] for r in results], capsize=3,
               color=[colour(r["objective"]) for r in results])
        for x, r in zip(xs, results):
            p = published(table, r["dataset"], r["ipc"], r["method"], r["objective"])
            if p and p[idx] is not None:
                ax.plot([x - 0.4, x + 0.4], [p[idx]] * 2, color="black", lw=2)
                drew_paper = True
        ax.set_ylabel(label, fontsize=8)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(list(xs), names, fontsize=7, rotation=90)
    # One legend entry per colour: the objectives without a colour of their own share green.
    by_colour: dict[str, list[str]] = {}
    for o in dict.fromkeys(split_cell_objective(r["objective"])[0] for r in results):
        by_colour.setdefault(colour(o), []).append(o)
    handles = [Patch(color=c, label=", ".join(os_)) for c, os_ in by_colour.items()]
    if drew_paper:
        handles.append(Patch(color="black", label="paper"))
    # Above the plots: a legend inside the top row would cover the 100% bars.
    fig.legend(handles=handles, fontsize=7, ncol=len(handles), loc="upper right")
    fig.suptitle(title, fontsize=9, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    save_png(fig, path)


@holds_interrupts  # a Ctrl-C / SIGTERM lands after the three files, never inside matplotlib
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
