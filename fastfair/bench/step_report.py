"""Target ratios, their one-line summary and the plots of the step-time
benchmark's rows (:mod:`fastfair.bench.step_time`)."""
from __future__ import annotations

from ..figures import pyplot, save_png
from ..interrupts import holds_interrupts

# Issue #6 targets for fastfair FairDD / vanilla, and the FairDD paper's own code at G = 10.
TIME_TARGETS = {("dm", 10): 1.05, ("dm", 100): 1.1, ("dc", 10): 1.3, ("dc", 100): 1.5}
PAPER_CODE_AT_10 = {"dm": 1.41, "dc": 3.0}
MEMORY_TARGET_DC = 1.1


def label(row: dict) -> str:
    return row["impl"] if row["impl"] == row["objective"] else f"{row['impl']} {row['objective']}"



def _find(rows: list[dict], dataset: str, method: str, groups: int, impl: str, objective: str) -> dict | None:
    for r in rows:
        if (r["dataset"], r["method"], r["groups"], r["impl"], r["objective"]) == (dataset, method, groups, impl,
                                                                                   objective):
            return r
    return None


def _ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if a is None or b is None or a.get(key) is None or not b.get(key):
        return None
    return a[key] / b[key]


def ratios(rows: list[dict]) -> dict[str, dict]:
    """The ratios issue #6 targets (and the loop's, beside the FairDD paper's
    own code), keyed by a readable name: {"ratio", "target"} (target None:
    for information)."""
    out: dict[str, dict] = {}
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows if r["dataset"] == dataset):
            for g in (10, 100, 1000):
                van = _find(rows, dataset, method, g, "vanilla", "vanilla")
                fair = _find(rows, dataset, method, g, "fastfair", "fairdd")
                loop = _find(rows, dataset, method, g, "loop", "fairdd")
                head = f"{dataset} {method.upper()} G={g}"
                items = [(f"{head} time fastfair fairdd / vanilla", _ratio(fair, van, "ms"),
                          TIME_TARGETS.get((method, g))),
                         (f"{head} time loop fairdd / vanilla", _ratio(loop, van, "ms"), None),
                         (f"{head} time loop fairdd / fastfair fairdd", _ratio(loop, fair, "ms"), None)]
                if loop is not None and loop.get("extrapolated_ms") is not None:
                    # The loop was not run at this G (--loop-max-seconds): its time is an extrapolation.
                    items.append((f"{head} time loop fairdd (extrapolated) / fastfair fairdd",
                                  _ratio({"ms": loop["extrapolated_ms"]}, fair, "ms"), None))
                if method == "dc":
                    items.append((f"{head} peak memory fastfair fairdd / vanilla", _ratio(fair, van, "peak_mb"),
                                  MEMORY_TARGET_DC))
                for name, value, target in items:
                    if value is not None:
                        out[name] = {"ratio": value, "target": target}
    return out


def summary(rows: list[dict]) -> list[str]:
    """:func:`ratios`, one line each, saying whether each target is met."""
    lines = []
    for name, r in ratios(rows).items():
        line = f"{name}: {r['ratio']:.2f}"
        if r["target"] is not None:
            line += f" ({'meets' if r['ratio'] <= r['target'] else 'misses'} <= {r['target']})"
        elif "loop fairdd / vanilla" in name and "G=10 " in name:
            method = "dm" if " DM " in name else "dc"
            line += f" (the FairDD paper's own code: {PAPER_CODE_AT_10[method]})"
        lines.append(line)
    return lines


@holds_interrupts
def plot(rows: list[dict], dataset: str, method: str, title: str, path: str) -> None:
    """ms and peak_mb against G (log-x; log-y where the values span a decade),
    one line per implementation."""
    plt = pyplot()

    sub = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (("ms", "step time (ms)"), ("peak_mb", "peak memory added by the step (MB)"))
    for ax, (key, unit) in zip(axes, panels):
        values = []
        for name in dict.fromkeys(label(r) for r in sub):
            pts = sorted((r["groups"], r[key]) for r in sub if label(r) == name and r.get(key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
                values += [p[1] for p in pts]
        if not values:  # e.g. --memory-only: no times
            ax.text(0.5, 0.5, f"no {unit.split(' (')[0]} measured", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_axis_off()
            continue
        # log-log where the values span a decade or more (the reference loop
        # grows with G and would flatten the other lines on a linear axis);
        # within one decade a log axis would have no labelled tick.
        ax.set_xscale("log")
        if min(values) > 0 and max(values) >= 10 * min(values):
            ax.set_yscale("log")
        gs = sorted({r["groups"] for r in sub})
        ax.set_xticks(gs, [str(g) for g in gs])
        ax.minorticks_off()
        ax.set_xlabel("groups G")
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=120)
