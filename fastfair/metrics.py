"""Accuracy and fairness (difference of equal opportunity) of predictions.

For class y and group a, r[a, y] is the accuracy on the test samples of class y
and group a. gap[y] = max_a r[a, y] - min_a r[a, y] over all groups, where a
cell without test samples counts as 0% accuracy, as the FairDD reference code
counts it. DEO_M = max_y gap[y] * 100, DEO_A = mean_y gap[y] * 100 (FairDD,
Zhou et al. NeurIPS'25; lower is fairer). The worst-group accuracy is the
lowest r[a, y] over the cells that have test samples.

COBRA's code (Moslemi et al., ICML'26) calls DEO_M / DEO_A the max / mean
"Equalized Odds" (the same per-(class, group) true-positive rates) and also
reports the sufficiency gap: for class c and group a, the precision
p[a, c] = P(y = c | prediction c, group a); suf[c] = max_a p[a, c] -
min_a p[a, c]; SUF_M = max_c suf[c] * 100, SUF_A = mean_c suf[c] * 100. A
group in which class c is never predicted counts as precision 0, the same
rule as an empty DEO cell (fastfair's choice: COBRA's code was not
available to check it). :data:`COBRA_NAMES` maps COBRA's names to these keys.

DEO is a max over groups of test-cell accuracies, so binomial sampling alone
puts it above 0: :func:`deo_chance_floor` says what a model whose accuracy
does not depend on the group (fastfair's reading aid; no paper reports it)
would score on the same test cells, so that a DEO over many small cells
(100 intersectional groups of ~60 images: ~23 at 90% accuracy) is read
against that and not against 0.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


# COBRA's metric names -> fastfair's keys (the same numbers).
COBRA_NAMES = {"max_equalized_odds": "deo_m", "mean_equalized_odds": "deo_a",
               "max_sufficiency_gap": "suf_m", "mean_sufficiency_gap": "suf_a"}


def _as_long_1d(v: Any, what: str) -> Tensor:
    t = torch.as_tensor(v).detach().cpu()
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{what} must be integer ids, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {tuple(t.shape)}")
    return t.long()


def fairness_report(pred: Any, labels: Any, groups: Any, num_classes: int, num_groups: int) -> dict[str, Any]:
    """Accuracy and DEO of predictions against labels, per (class, group) cell.

    ``pred`` is [N] predicted class ids or [N, num_classes] scores (argmax is
    taken); ``labels`` and ``groups`` are [N] integer ids (tensors or arrays).

    Returns a dict:
      ``acc``         overall top-1 accuracy in percent;
      ``deo_m``       max over classes of the per-class gap, in percent;
      ``deo_a``       mean over ALL ``num_classes`` classes of the gap, in percent;
      ``suf_m`` / ``suf_a`` max / mean over classes of the sufficiency gap
                      (module docstring), in percent;
      ``worst_group_acc`` the lowest non-empty cell accuracy, in percent;
      ``cell_acc``    [num_classes][num_groups] nested list of r[a, y] in percent,
                      None for a cell without test samples;
      ``empty_cells`` list of (class, group) pairs without test samples.

    An empty cell counts as 0% in its class's gap (the reference's rule), so a
    class with an empty cell and a non-empty one has the gap of its best cell.
    A class without any test samples has gap 0 and still counts in the DEO_A
    mean. With one group the gap is 0.
    """
    if num_classes < 1 or num_groups < 1:
        raise ValueError(f"num_classes and num_groups must be >= 1, got {num_classes}, {num_groups}")
    p = torch.as_tensor(pred).detach().cpu()
    if p.dim() == 2:
        if p.shape[1] != num_classes:
            raise ValueError(f"pred scores must be [N, {num_classes}], got shape {tuple(p.shape)}")
        p = p.argmax(dim=1)
    p = _as_long_1d(p, "pred")
    y = _as_long_1d(labels, "labels")
    g = _as_long_1d(groups, "groups")
    n = y.numel()
    if n == 0:
        raise ValueError("fairness_report needs at least one sample")
    if p.numel() != n or g.numel() != n:
        raise ValueError(f"pred, labels and groups must have the same length, got {p.numel()}, {n}, {g.numel()}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    if int(g.min()) < 0 or int(g.max()) >= num_groups:
        raise ValueError(f"groups must lie in [0, {num_groups}), got range [{int(g.min())}, {int(g.max())}]")

    correct = p == y
    cell = y * num_groups + g
    size = num_classes * num_groups
    count = torch.bincount(cell, minlength=size).view(num_classes, num_groups)
    hits = torch.bincount(cell, weights=correct.double(), minlength=size).view(num_classes, num_groups)
    present = count > 0
    rate = hits / count.clamp(min=1).double()  # [C, G], 0 in empty cells (masked below)

    # Empty cells hold rate 0 already (hits 0 over a clamped count of 1).
    gap = rate.max(dim=1).values - rate.min(dim=1).values
    worst = torch.where(present, rate, torch.full_like(rate, np.inf)).min()

    # Sufficiency: precision of each predicted class within each group.
    pcell = p * num_groups + g
    predicted = torch.bincount(pcell, minlength=size).view(num_classes, num_groups)
    prec = hits / predicted.clamp(min=1).double()  # hits of (c, a) are exactly the correct predictions of c in a
    suf = prec.max(dim=1).values - prec.min(dim=1).values

    rate_pct = (rate * 100.0).tolist()
    pres = present.tolist()
    cell_acc = [[rate_pct[c][a] if pres[c][a] else None for a in range(num_groups)] for c in range(num_classes)]
    empty = [tuple(ca) for ca in (~present).nonzero().tolist()]
    return {
        "acc": float(correct.double().mean()) * 100.0,
        "deo_m": float(gap.max()) * 100.0,
        "deo_a": float(gap.mean()) * 100.0,
        "suf_m": float(suf.max()) * 100.0,
        "suf_a": float(suf.mean()) * 100.0,
        "worst_group_acc": float(worst) * 100.0,
        "cell_acc": cell_acc,
        "empty_cells": empty,
    }


def attribute_reports(pred: Any, labels: Any, groups: Any, num_classes: int, attributes: Any) -> dict[str, dict]:
    """Several protected attributes (fastfair.attributes): the fairness of the
    same predictions over each attribute's marginal groups, keyed by the
    attribute's name (acc, deo_m, deo_a, suf_m, suf_a, worst_group_acc,
    cell_acc); {} for a dataset of one attribute, whose report is the
    intersectional one."""
    if attributes is None or len(attributes.names) < 2:
        return {}
    g = torch.as_tensor(groups).detach().cpu().long()
    out = {}
    for k, name in enumerate(attributes.names):
        rep = fairness_report(pred, labels, attributes.marginal(g, k), num_classes, attributes.sizes[k])
        out[name] = {key: rep[key] for key in ("deo_m", "deo_a", "suf_m", "suf_a", "worst_group_acc", "cell_acc")}
    return out


def class_accuracy(cell_acc: Any, cell_counts: Any) -> np.ndarray:
    """Per-class accuracy (fraction) from a [C][G] cell-accuracy matrix in
    percent (None for an empty cell) and the [C, G] test counts: each cell
    weighted by its test samples. A class without test samples gets 0."""
    acc = np.array([[np.nan if v is None else v for v in row] for row in cell_acc], dtype=np.float64) / 100.0
    n = np.asarray(cell_counts, dtype=np.float64)
    if acc.shape != n.shape:
        raise ValueError(f"cell_acc is {acc.shape} but the test counts are {n.shape}")
    hits = np.where(n > 0, np.nan_to_num(acc), 0.0) * n
    return hits.sum(1) / np.maximum(n.sum(1), 1.0)


def deo_chance_floor(cell_counts: Any, class_acc: Any, attributes: Any = None, trials: int = 1000,
                     seed: int = 0) -> dict[str, list[float]]:
    """What DEO a group-blind model would score on these test cells.

    ``cell_counts``: [C, G] test samples per (class, group); ``class_acc``:
    [C] accuracies in [0, 1]. Each trial draws every cell's hits from
    Binomial(n_cg, class_acc[c]) and computes DEO_M / DEO_A as
    :func:`fairness_report` does (an empty cell counts as 0%); with several
    ``attributes`` (fastfair.attributes.Attributes, mixed-radix group ids) also
    each attribute's marginal DEO_M as ``NAME_deo_m``. Returns, per key,
    [mean, 5th percentile, 95th percentile] over ``trials``, in percent.
    Seeded: the same inputs give the same floor."""
    n = np.asarray(cell_counts, dtype=np.int64)
    p = np.asarray(class_acc, dtype=np.float64)
    if n.ndim != 2 or p.shape != (n.shape[0],):
        raise ValueError(f"cell_counts must be [C, G] and class_acc [C]; got {n.shape} and {p.shape}")
    if (n < 0).any() or not ((p >= 0) & (p <= 1)).all():
        raise ValueError("cell_counts must be >= 0 and class_acc within [0, 1]")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    C, G = n.shape
    several = attributes is not None and len(attributes.names) > 1
    if several and int(np.prod(attributes.sizes)) != G:
        raise ValueError(f"the attributes have {int(np.prod(attributes.sizes))} intersectional groups, "
                         f"the counts {G}")

    def gaps(h: np.ndarray, cnt: np.ndarray) -> np.ndarray:  # [T, C] per-class gap; empty cells 0%
        rate = h / np.maximum(cnt, 1)
        return rate.max(-1) - rate.min(-1)

    rng = np.random.default_rng(seed)
    stats: dict[str, list[np.ndarray]] = {}
    step = max(1, _FLOOR_DRAWS_AT_ONCE // (C * G))  # trials per block: memory stays bounded at any C x G
    for t0 in range(0, trials, step):
        hits = rng.binomial(n, p[:, None], size=(min(step, trials - t0), C, G))  # [T, C, G]
        g = gaps(hits, n)
        stats.setdefault("deo_m", []).append(g.max(-1))
        stats.setdefault("deo_a", []).append(g.mean(-1))
        if several:
            h, cnt = hits.reshape(len(hits), C, *attributes.sizes), n.reshape(C, *attributes.sizes)
            for k, name in enumerate(attributes.names):
                other = tuple(i for i in range(len(attributes.sizes)) if i != k)
                stats.setdefault(f"{name}_deo_m", []).append(
                    gaps(h.sum(tuple(i + 2 for i in other)), cnt.sum(tuple(i + 1 for i in other))).max(-1))
    out = {}
    for k, parts in stats.items():
        v = np.concatenate(parts)
        out[k] = [float(v.mean() * 100), float(np.percentile(v, 5) * 100), float(np.percentile(v, 95) * 100)]
    return out


# Binomial draws held at once by deo_chance_floor (8 bytes each: 32 MB).
_FLOOR_DRAWS_AT_ONCE = 1 << 22
