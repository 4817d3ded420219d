"""Plain-text tables of results rows (method, objective, Acc, DEO_M, DEO_A,
SUF_M: the max sufficiency gap, COBRA's second fairness metric).

Its own module because both the CLI (``fastfair eval``) and the demo print
them, and neither should import the other.
"""
from __future__ import annotations

from typing import Any


def _pm(mean: float, std: float) -> str:
    return f"{mean:6.2f} +- {std:5.2f}"


def format_table(rows: list[dict[str, Any]], title: str | None = None) -> str:
    """Plain-text table of results rows (method, objective, metrics, seconds)."""
    head = f"{'method':<8} {'objective':<16} {'Acc':>15} {'DEO_M':>15} {'DEO_A':>15} {'SUF_M':>15} {'seconds':>8}"
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in rows:
        secs = r.get("seconds")
        suf = _pm(r["suf_m"], r["suf_m_std"]) if "suf_m" in r else "-"
        lines.append(f"{r['method']:<8} {r['objective']:<16} {_pm(r['acc'], r['acc_std']):>15} "
                     f"{_pm(r['deo_m'], r['deo_m_std']):>15} {_pm(r['deo_a'], r['deo_a_std']):>15} {suf:>15} "
                     f"{(f'{secs:8.1f}' if secs is not None else '-'):>8}")
    return "\n".join(lines)


def floor_line(floor: dict[str, list[float]]) -> str:
    """One line for fastfair.metrics.deo_chance_floor's result."""
    m = floor["deo_m"]
    extra = "".join(f", {k[:-len('_deo_m')]} {v[0]:.1f}" for k, v in floor.items() if k.endswith("_deo_m"))
    return (f"chance floor (a group-blind model with these class accuracies, same test cells): DEO_M {m[0]:.1f} "
            f"(5-95%: {m[1]:.1f}-{m[2]:.1f}), DEO_A {floor['deo_a'][0]:.1f}{extra}")
