"""The per-(class, group) test accuracy matrix as a heatmap PNG: where a user
sees which group of which class a synthetic set fails."""
from __future__ import annotations

import os
from typing import Any, Sequence

from .figures import pyplot, save_png
from .interrupts import holds_interrupts


@holds_interrupts
def cell_heatmap(cell_acc: Sequence[Sequence[float | None]], path: str, title: str = "",
                 class_names: Sequence[str] | None = None, group_names: Sequence[str] | None = None) -> str:
    """Draw ``cell_acc`` ([C][G] accuracy in percent, None for a cell without
    test samples, drawn grey and marked "-") to ``path``; returns the path.
    Written to a temporary file and renamed, so a reader never sees half a PNG."""
    plt = pyplot()
    import matplotlib
    import numpy as np

    m = np.array([[np.nan if v is None else float(v) for v in row] for row in cell_acc], dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"cell_acc must be a non-empty [classes][groups] matrix, got shape {m.shape}")
    C, G = m.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.55 * G, 1.2 + 0.42 * C))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d0d0d0")
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for c in range(C):
        for a in range(G):
            v = m[c, a]
            ax.text(a, c, "-" if np.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="black" if (np.isnan(v) or v > 60) else "white")
    ax.set_xticks(range(G), list(group_names) if group_names else [str(a) for a in range(G)], rotation=45,
                  ha="right", fontsize=7)
    ax.set_yticks(range(C), list(class_names) if class_names else [str(c) for c in range(C)], fontsize=7)
    ax.set_xlabel("group")
    ax.set_ylabel("class")
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, label="test accuracy (%)", fraction=0.05)
    fig.tight_layout()
    return save_png(fig, path)


@holds_interrupts
def worst_cells_plot(cell_acc: Sequence[Sequence[float | None]], path: str, title: str = "",
                     class_names: Sequence[str] | None = None, group_names: Sequence[str] | None = None,
                     k: int = 20) -> str:
    """The ``k`` (class, group) cells of lowest test accuracy as horizontal
    bars, worst at the top: with 100 intersectional groups the full heatmap
    is too dense to read, and these are the cells a fair set must lift."""
    plt = pyplot()

    cells = [(float(v), c, a) for c, row in enumerate(cell_acc) for a, v in enumerate(row) if v is not None]
    if not cells:
        raise ValueError("cell_acc has no cell with test samples")
    worst = sorted(cells)[:k]
    cn = list(class_names) if class_names else None
    gn = list(group_names) if group_names else None
    labels = [f"{cn[c] if cn else c} / {gn[a] if gn else a}" for _, c, a in worst]
    fig, ax = plt.subplots(figsize=(6.0, 0.9 + 0.26 * len(worst)))
    ax.barh(range(len(worst)), [v for v, _, _ in worst], color="#4a6fa5")
    ax.set_yticks(range(len(worst)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("test accuracy (%)")
    ax.set_title(title or f"the {len(worst)} worst (class, group) cells", fontsize=8)
    for i, (v, _, _) in enumerate(worst):
        ax.text(min(v + 1, 92), i, f"{v:.0f}", va="center", fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)


def attribute_plots(per_attribute_cells: dict[str, Sequence[Sequence[float | None]]], dataset: Any, stem: str,
                    title: str) -> list[str]:
    """Several protected attributes: one heatmap per attribute over its
    marginal groups (``<stem>_<attribute>.png``) and the worst intersectional
    cells are drawn by the caller from the intersectional matrix. Returns the
    paths written ([] for a dataset of one attribute)."""
    attrs = getattr(dataset, "attributes", None)
    if attrs is None or not per_attribute_cells:
        return []
    out = []
    for name, cells in per_attribute_cells.items():
        values = attrs.values[attrs.index(name)]
        out.append(cell_heatmap(cells, f"{stem}_{name}.png", title=f"{title}: over {name} (marginal groups)",
                                class_names=getattr(dataset, "class_names", None), group_names=values))
    return out


def heatmap_path(json_path: str) -> str:
    """Where ``fastfair eval`` draws the heatmap of a metrics JSON: beside it."""
    stem, _ = os.path.splitext(json_path)
    return stem + "_cells.png"


def cells_payload(res: dict[str, Any], dataset: Any) -> dict[str, Any]:
    """The metrics.json fields of the per-cell matrix (see evaluate_synset)."""
    return {
        "worst_group_acc": res["worst_group_acc"], "worst_group_acc_std": res["worst_group_acc_std"],
        "cell_acc": res["cell_acc"], "cell_acc_std": res["cell_acc_std"],
        "class_names": list(getattr(dataset, "class_names", []) or []),
        "group_names": list(getattr(dataset, "group_names", []) or []),
    }
