"""Dataset distillation: DM, DC, IDC, DREAM and CAFE with the vanilla, FairDD
and COBRA objectives (and FairDD's ablation weightings).

Modules, one job each: ``config`` (settings and paper defaults), ``rng``
(every random number from (seed, iteration)), ``sampler`` (per-class real
batches), ``groups`` (noisy and DBSCAN pseudo groups), ``synset`` (init, IDC
multi-formation, image update, output files), ``context`` (per-run setup and
shared step pieces), ``dm`` / ``dc`` / ``dream`` / ``cafe`` (the matching steps),
``checkpoint`` (checkpoints and the log), ``loop`` (:func:`run`).

    >>> from fastfair import data, distill
    >>> ds = data.load("cdigits-fg")
    >>> res = distill.run(distill.DistillConfig(method="dm", objective="fairdd", ipc=10), ds, out_dir="out")
"""
from __future__ import annotations

from .config import METHODS, DistillConfig, dc_loops, resolve
from .loop import DistillResult, load_dataset, run
from .synset import decode

__all__ = ["METHODS", "DistillConfig", "DistillResult", "dc_loops", "decode", "load_dataset", "resolve", "run"]
