"""How much a reproduce cell moves with the distillation seed.

A cell's ``+-`` (results.md) is the spread over its evaluation networks, all
trained on ONE synthetic set. The set itself depends on the distillation
seed (initial real images, real batches, DSA draws), and on C-FMNIST two
equally valid sets of the same cell read DEO_M 43 and 59
(docs/reproduction.md). ``fastfair spread`` reads several ``reproduce``
output directories that ran the same cells with different ``--seed`` and
reports, per cell, every seed's result, the mean over seeds and the standard
deviation over seeds beside the mean evaluation spread within a seed.

Standard deviations are population ones (ddof = 0), as the evaluation's
``+-`` (``np.std`` in the DC/DM code family). Cells are matched by their
settings with the seeds taken out; a cell whose other settings differ
between directories is an error, not a silent average.
"""
from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

from .figures import pyplot, save_png
from .interrupts import holds_interrupts
from .reproduce import settings_as_recorded
from .reproduce_outputs import _write_json, _write_text

METRICS = ("acc", "deo_m", "deo_a", "suf_m")


def _without_seeds(settings: dict[str, Any]) -> str:
    s = json.loads(json.dumps(settings_as_recorded(settings)))
    for part in ("distill", "eval"):
        if isinstance(s.get(part), dict):
            s[part].pop("seed", None)
    return json.dumps(s, sort_keys=True)


def _seed(settings: dict[str, Any], where: str) -> int:
    seed = settings.get("distill", {}).get("seed") if isinstance(settings.get("distill"), dict) else None
    if not isinstance(seed, int):
        raise ValueError(f"{where}: a cell's settings carry no distillation seed (not a reproduce results file?)")
    return seed


def _results(path: str) -> list[dict[str, Any]]:
    file = os.path.join(path, "results.json")
    try:
        with open(file) as f:
            payload = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no results.json (not a fastfair reproduce output directory)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not JSON ({exc.msg} at line {exc.lineno})") from None
    rows = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("settings"), dict)
                                             for r in rows):
        raise ValueError(f"{file} is not a reproduce results file (no list of cells with settings)")
    return rows


def _differences(a: str, b: str) -> str:
    """The first setting that differs between two seedless settings keys."""
    def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(obj, dict):
            out: dict[str, Any] = {}
            for k, v in obj.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: obj}

    fa, fb = flat(json.loads(a)), flat(json.loads(b))
    for k in sorted(set(fa) | set(fb)):
        if fa.get(k) != fb.get(k):
            return f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}"
    return "none"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values)


def spread(dirs: Sequence[str]) -> dict[str, Any]:
    """Match the cells of several reproduce directories by their settings
    (seeds aside) and summarise each over its distillation seeds."""
    if len(dirs) < 2:
        raise ValueError(f"give at least two reproduce output directories (several --seed runs), got {len(dirs)}")
    # (dataset, method, objective, ipc) -> seedless settings -> where it came from
    by_cell: dict[tuple, dict[str, Any]] = {}
    for d in dirs:
        for r in _results(d):
            key = (r.get("dataset"), r.get("method"), r.get("objective"), r.get("ipc"))
            settings = _without_seeds(r["settings"])
            entry = by_cell.setdefault(key, {"settings": settings, "first": d, "per_seed": []})
            if entry["settings"] != settings:
                raise ValueError(f"cell {key[1]}:{key[2]} on {key[0]}: {entry['first']} and {d} ran it with "
                                 f"different settings beyond the seed ({_differences(entry['settings'], settings)})")
            seed = _seed(r["settings"], os.path.join(d, "results.json"))
            twice = [p["dir"] for p in entry["per_seed"] if p["seed"] == seed]
            if twice:
                raise ValueError(f"cell {key[1]}:{key[2]} on {key[0]}: seed {seed} appears twice "
                                 f"({twice[0]} and {d}); each directory should hold another --seed")
            row = {"seed": seed, "dir": d, **{m: r.get(m) for m in METRICS},
                   **{f"{m}_eval_std": r.get(f"{m}_std") for m in METRICS}, "eval_runs": r.get("eval_runs")}
            entry["per_seed"].append(row)
    cells = []
    for (dataset, method, objective, ipc), entry in by_cell.items():
        per_seed = sorted(entry["per_seed"], key=lambda p: p["seed"])
        cell: dict[str, Any] = {"dataset": dataset, "method": method, "objective": objective, "ipc": ipc,
                                "seeds": [p["seed"] for p in per_seed], "per_seed": per_seed,
                                "settings": json.loads(entry["settings"])}
        for m in METRICS:
            vals = [p[m] for p in per_seed if isinstance(p[m], (int, float))]
            if vals:
                cell[m], std = _mean_std(vals)
                # One seed has no spread to report (a 0 would read as "no spread").
                cell[f"{m}_seed_std"] = std if len(vals) > 1 else None
            within = [p[f"{m}_eval_std"] for p in per_seed if isinstance(p[f"{m}_eval_std"], (int, float))]
            if within:
                cell[f"{m}_eval_std"] = sum(within) / len(within)
        cells.append(cell)
    return {"dirs": list(dirs), "cells": cells}


def _fmt(mean: Any, std: Any = None) -> str:
    if not isinstance(mean, (int, float)):
        return "-"
    return f"{mean:.2f}" if not isinstance(std, (int, float)) else f"{mean:.2f} +- {std:.2f}"


def markdown(s: dict[str, Any]) -> str:
    lines = ["# Cells over distillation seeds", "",
             "Mean +- standard deviation over the distillation seeds (population, ddof = 0); 'eval +-' is the "
             "mean over seeds of each set's own spread over its evaluation networks. Sources: "
             + ", ".join(f"`{d}`" for d in s["dirs"]) + ".", "",
             "| dataset | cell | seeds | Acc | DEO_M | DEO_M eval +- | DEO_A | each seed's Acc / DEO_M |",
             "|---|---|---|---|---|---|---|---|"]
    for c in s["cells"]:
        each = "; ".join(f"{p['seed']}: {_fmt(p['acc'])} / {_fmt(p['deo_m'])}" for p in c["per_seed"])
        lines.append(f"| {c['dataset']} | {c['method']}+{c['objective']} | {len(c['seeds'])} | "
                     f"{_fmt(c.get('acc'), c.get('acc_seed_std'))} | {_fmt(c.get('deo_m'), c.get('deo_m_seed_std'))} | "
                     f"{_fmt(c.get('deo_m_eval_std'))} | {_fmt(c.get('deo_a'), c.get('deo_a_seed_std'))} | {each} |")
    return "\n".join(lines) + "\n"


def plot(s: dict[str, Any], path: str) -> None:
    """Each seed's DEO_M with its evaluation spread, per cell, and the mean over seeds."""
    plt = pyplot()

    cells = s["cells"]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(cells) + 1.5), 3.6))
    for i, c in enumerate(cells):
        pts = [p for p in c["per_seed"] if isinstance(p["deo_m"], (int, float))]
        n = max(1, len(pts))
        for j, p in enumerate(pts):
            x = i + (j - (n - 1) / 2) * 0.12
            err = p["deo_m_eval_std"] if isinstance(p["deo_m_eval_std"], (int, float)) else 0.0
            ax.errorbar(x, p["deo_m"], yerr=err, fmt="o", color="C0", ms=4, capsize=2)
            ax.annotate(str(p["seed"]), (x, p["deo_m"]), textcoords="offset points", xytext=(3, 3), fontsize=6)
        if isinstance(c.get("deo_m"), (int, float)):
            ax.hlines(c["deo_m"], i - 0.3, i + 0.3, color="C3", label="mean over seeds" if i == 0 else None)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([f"{c['dataset']}\n{c['method']}+{c['objective']}" for c in cells], fontsize=7)
    ax.set_ylabel("DEO_M (each seed, +- its evaluation runs)")
    ax.set_title("reproduce cells over distillation seeds", fontsize=9)
    if cells:
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=120)


@holds_interrupts  # a Ctrl-C / SIGTERM lands after the three files, never inside matplotlib
def write(s: dict[str, Any], out: str) -> list[str]:
    """OUT/spread.json, spread.md and spread.png; returns their paths."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, n) for n in ("spread.json", "spread.md", "spread.png")]
    _write_json(paths[0], s)
    _write_text(paths[1], markdown(s))
    plot(s, paths[2])
    return paths
