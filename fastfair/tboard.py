"""TensorBoard logging of a distillation run (``fastfair distill --tensorboard DIR``).

Optional: needs the ``tensorboard`` package (``pip install tensorboard`` or
``pip install "fastfair[tensorboard]"``); without it the CLI stops with one
line that says so, before any data are loaded.
"""
from __future__ import annotations

import json
from typing import Any, Callable

# Scalars taken from an evaluation entry of the log, when present.
EVAL_KEYS = ("acc", "acc_std", "deo_m", "deo_m_std", "deo_a", "deo_a_std")


class TensorBoardMissing(ImportError):
    """tensorboard is not installed."""


def summary_writer_class() -> Callable[..., Any]:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TensorBoardMissing("--tensorboard needs the tensorboard package, which is not installed "
                                 "(pip install tensorboard)") from None
    return SummaryWriter


class TensorBoardLogger:
    """Receives the entries of a run's log (``fastfair.distill.run(on_log=...)``)
    and writes them as scalars: ``distill/loss`` at each logged iteration and
    ``eval/<metric>`` at each evaluation; the resolved config as text."""

    def __init__(self, log_dir: str, config: dict[str, Any] | None = None,
                 writer_class: Callable[..., Any] | None = None) -> None:
        self.writer = (writer_class or summary_writer_class())(log_dir)
        if config:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def __call__(self, entry: dict[str, Any]) -> None:
        step = int(entry["iteration"])
        if "loss" in entry:
            self.writer.add_scalar("distill/loss", float(entry["loss"]), step)
        for key in EVAL_KEYS:
            value = entry.get("eval", {}).get(key)
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"eval/{key}", float(value), step)
        if "seconds" in entry:
            self.writer.add_scalar("distill/seconds", float(entry["seconds"]), step)
        self.writer.flush()  # a run may be killed at any time; what was logged stays readable

    def close(self) -> None:
        self.writer.close()
