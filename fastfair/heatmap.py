"""The per-(class, group) test accuracy matrix as a heatmap PNG: where a user
sees which group of which class a synthetic set fails."""
from __future__ import annotations

import os
from typing import Any, Sequence


def cell_heatmap(cell_acc: Sequence[Sequence[float | None]], path: str, title: str = "",
                 class_names: Sequence[str] | None = None, group_names: Sequence[str] | None = None) -> str:
    """Draw ``cell_acc`` ([C][G] accuracy in percent, None for a cell without
    test samples, drawn grey and marked "-") to ``path``; returns the path.
    Written to a temporary file and renamed, so a reader never sees half a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


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
