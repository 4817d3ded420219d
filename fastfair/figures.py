"""What every PNG writer of fastfair shares: a headless pyplot (runs on a
server without a display) and a save that never leaves half a file."""
from __future__ import annotations

import os
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, imported on first use: importing
    fastfair never pays for matplotlib, and no display is ever needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str, dpi: int = 110) -> str:
    """``fig`` as a PNG at ``path`` (its folder made) through
    fastfair.distill.outdir.atomic_write, so a reader never sees half a file
    and a failed write names ``path``; the figure is closed either way.
    Returns ``path``."""
    from .distill.outdir import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format="png"))
    finally:
        pyplot().close(fig)
    return path
