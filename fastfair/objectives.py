"""Matching objectives: vanilla, FairDD, COBRA and FairDD's ablation weightings.

An objective is data, not a copy of the matching loop: it names what the
synthetic statistic of class c is matched against and how the per-group terms
are weighted. Both families use it: DM matches mean embeddings
(:func:`dm_matching_loss`), DC matches mean gradients
(:func:`dc_matching_loss`).

Every function here takes *segment statistics* (sums and counts per
(class, group) segment, ``segment = class * num_groups + group``), so the
same code serves one process and a distributed run whose sums and counts were
all-reduced first.

References: FairDD (Zhou et al., NeurIPS'25, arXiv 2411.19623) eq. for
synchronized matching and App. H / Table 7 for the ablations; COBRA (Moslemi
et al., ICML'26, arXiv 2605.00185) for the barycenter target and for
``fairdd-mean``, the FairDD DC baseline as COBRA's code re-implements it
(each group term divided by the number of groups present; FairDD's own
main_DC.py sums them, ``fairdd``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

Target = Literal["pooled", "groups", "barycenter"]
Weighting = Literal["uniform", "mean", "inverse", "ldam", "max"]


@dataclass(frozen=True)
class Objective:
    """What the synthetic class statistic is matched against.

    target:
      ``pooled``     the class statistic over all its real rows (vanilla);
      ``groups``     every present group's statistic, one term each (FairDD);
      ``barycenter`` the unweighted mean of the present group statistics (COBRA).
    weighting (``groups`` only): ``uniform`` (FairDD), ``mean`` (each term
      divided by the number of groups present in the class: COBRA's
      re-implementation of the FairDD DC baseline), ``inverse`` (1/n_cg,
      FairDD's DF/IW ablation), ``ldam`` (n_cg^(-1/4)), ``max`` (GroupDRO: only
      the largest group term). ``inverse`` and ``ldam`` weights are
      normalised to mean 1 over the groups present in the class.
    dm_distance: DM's distance; COBRA's DM uses L1, the others squared L2.
    """

    name: str
    target: Target
    weighting: Weighting = "uniform"
    dm_distance: Literal["l2sq", "l1"] = "l2sq"


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("vanilla", "pooled"),
        Objective("fairdd", "groups"),
        Objective("fairdd-mean", "groups", "mean"),
        Objective("cobra", "barycenter", dm_distance="l1"),
        Objective("fairdd-iw", "groups", "inverse"),
        Objective("fairdd-ldam", "groups", "ldam"),
        Objective("fairdd-groupdro", "groups", "max"),
    )
}


def get_objective(name: str | Objective) -> Objective:
    if isinstance(name, Objective):
        return name
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(
            f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}"
        ) from None


def group_weights(counts: Tensor, objective: Objective, dtype: torch.dtype = torch.float32) -> Tensor:
    """[C, G] weights of the per-group terms; 0 for absent groups.

    For ``max`` the weights are the present mask; the max is taken by
    :func:`reduce_group_terms`.
    """
    present = counts > 0
    c = counts.to(dtype)
    if objective.weighting in ("uniform", "max"):
        return present.to(c.dtype)
    if objective.weighting == "mean":
        return present.to(c.dtype) / present.sum(1, keepdim=True).clamp(min=1).to(c.dtype)
    if objective.weighting == "inverse":
        raw = torch.where(present, 1.0 / c.clamp(min=1), torch.zeros_like(c))
    elif objective.weighting == "ldam":
        raw = torch.where(present, c.clamp(min=1).pow(-0.25), torch.zeros_like(c))
    else:  # pragma: no cover - Objective is validated by construction
        raise ValueError(f"unknown weighting {objective.weighting!r}")
    n_present = present.sum(1, keepdim=True).clamp(min=1)
    return raw * n_present / raw.sum(1, keepdim=True).clamp(min=torch.finfo(c.dtype).tiny)


def reduce_group_terms(terms: Tensor, counts: Tensor, objective: Objective) -> Tensor:
    """Combine per-(class, group) match terms [C, G] into per-class terms [C]."""
    present = counts > 0
    if objective.weighting == "max":
        masked = terms.masked_fill(~present, float("-inf"))
        best = masked.max(dim=1).values
        return torch.where(present.any(1), best, torch.zeros_like(best))
    w = group_weights(counts, objective, terms.dtype)
    # where() rather than a product so that a non-finite term of an absent
    # group (0/0 of an empty segment) cannot leak into the sum.
    return torch.where(present, w * terms, torch.zeros_like(terms)).sum(1)


def class_target(seg_sum: Tensor, counts: Tensor, objective: Objective) -> Tensor:
    """The per-class target of ``pooled`` / ``barycenter`` objectives.

    seg_sum: [C, G, *F] segment sums; counts: [C, G]. Returns [C, *F].
    """
    extra = (1,) * (seg_sum.dim() - 2)
    cnt = counts.to(seg_sum.dtype).view(*counts.shape, *extra)
    if objective.target == "pooled":
        return seg_sum.sum(1) / cnt.sum(1).clamp(min=1)
    if objective.target == "barycenter":
        means = seg_sum / cnt.clamp(min=1)
        n_present = (counts > 0).sum(1).to(seg_sum.dtype).view(-1, *extra)
        return means.sum(1) / n_present.clamp(min=1)
    raise ValueError(f"objective {objective.name!r} has per-group targets")


def _dm_distance(diff: Tensor, objective: Objective) -> Tensor:
    if objective.dm_distance == "l1":
        return diff.abs().sum(-1)
    return diff.pow(2).sum(-1)


def dm_matching_loss(
    real_sum: Tensor,
    real_count: Tensor,
    syn_mean: Tensor,
    syn_count: Tensor,
    num_groups: int,
    objective: str | Objective = "fairdd",
) -> Tensor:
    """DM loss from segment statistics.

    real_sum [C*G, D] and real_count [C*G]: segment sums and sizes of the real
    embeddings (constants); syn_mean [C, D] and syn_count [C]: class means and
    sizes of the synthetic embeddings (carrying autograd). Classes with no real
    or no synthetic rows, and groups absent from the batch, are skipped.
    Returns the SUM over classes (and groups), as the papers do.
    """
    obj = get_objective(objective)
    num_classes = syn_mean.shape[0]
    if real_sum.shape[0] != num_classes * num_groups:
        raise ValueError(
            f"real_sum has {real_sum.shape[0]} segments, expected "
            f"num_classes * num_groups = {num_classes} * {num_groups}"
        )
    d = real_sum.shape[-1]
    seg_sum = real_sum.view(num_classes, num_groups, d).to(syn_mean.dtype)
    counts = real_count.view(num_classes, num_groups)
    class_ok = (counts.sum(1) > 0) & (syn_count > 0)
    if obj.target == "groups":
        means = seg_sum / counts.to(seg_sum.dtype).clamp(min=1).unsqueeze(-1)
        terms = _dm_distance(means - syn_mean.unsqueeze(1), obj)
        per_class = reduce_group_terms(terms, counts, obj)
    else:
        target = class_target(seg_sum, counts, obj)
        per_class = _dm_distance(target - syn_mean, obj)
    return torch.where(class_ok, per_class, torch.zeros_like(per_class)).sum()


# ---------------------------------------------------------------------------
# DC: gradient matching (match_loss of the DC code family, REFERENCE.md).

Metric = Literal["ours", "mse", "cos"]


def dc_matching_loss(
    real_grads: Sequence[Tensor],
    real_counts: Tensor,
    syn_grads: Sequence[Tensor],
    num_groups: int,
    objective: str | Objective = "fairdd",
    metric: Metric = "ours",
) -> Tensor:
    """DC loss from per-segment real gradients and per-class synthetic gradients.

    real_grads: per parameter [C*G, *shape] (segment mean gradients, constants);
    real_counts: [C*G] segment sizes; syn_grads: per parameter [C, *shape]
    carrying autograd. Per class over the present groups: ``vanilla`` matches
    the count-weighted mean of the group gradients (the class gradient),
    ``fairdd`` sums the match against each group gradient (weighted by the
    ablations), ``cobra`` matches the unweighted mean of the group gradients.
    metric (match_loss of the DC code family, REFERENCE.md), summed over
    parameter tensors:
      'ours': per parameter with more than one dimension, the gradient is
        reshaped to (out_units, -1) (out_units = its first dimension) and the
        terms 1 - <g_r, g_s> / (||g_r|| * ||g_s|| + 1e-6) are summed over
        units; 1-D parameters (biases, norm affine) contribute 0;
      'mse': the sum of squared differences over all parameters;
      'cos': 1 - <g_r, g_s> / (||g_r|| * ||g_s|| + 1e-6) of the gradients of
        ALL parameters (1-D ones included) concatenated into one vector each.
    Per-group objectives apply the metric to each (class, group) pair, then
    weight the groups (group_weights / reduce_group_terms); pooled and
    barycenter objectives apply it once per class to class_target. Classes
    without real rows are skipped, absent groups too. Returns the sum over
    classes. Vectorised over classes and groups ([C, G, ...] tensors); the only
    loop is over parameter tensors.
    """
    obj = get_objective(objective)
    if metric not in ("ours", "mse", "cos"):
        raise ValueError(f"unknown metric {metric!r}; choose 'ours', 'mse' or 'cos'")
    if len(real_grads) != len(syn_grads) or not syn_grads:
        raise ValueError("real_grads and syn_grads must list the same (non-empty) parameters")
    num_classes = syn_grads[0].shape[0]
    if real_counts.shape != (num_classes * num_groups,):
        raise ValueError(
            f"real_counts must have num_classes * num_groups = {num_classes} * {num_groups} entries, "
            f"got shape {tuple(real_counts.shape)}"
        )
    counts = real_counts.view(num_classes, num_groups)
    per_group = obj.target == "groups"
    dot = nr = ns = None
    dist = None
    for r, s in zip(real_grads, syn_grads):
        if r.shape[0] != num_classes * num_groups or r.shape[1:] != s.shape[1:]:
            raise ValueError(
                f"real gradient {tuple(r.shape)} does not match synthetic {tuple(s.shape)} "
                f"with {num_classes} classes x {num_groups} groups"
            )
        r = r.detach().to(s.dtype).reshape(num_classes, num_groups, *s.shape[1:])
        if per_group:
            target, syn = r, s.unsqueeze(1)  # [C, G, ...] against [C, 1, ...]
        else:
            seg_sum = r * counts.to(r.dtype).view(num_classes, num_groups, *([1] * (r.dim() - 2)))
            target, syn = class_target(seg_sum, counts, obj), s  # [C, ...] against [C, ...]
        lead = target.dim() - (s.dim() - 1)
        if metric == "ours":
            if s.dim() - 1 <= 1:
                continue
            units = s.shape[1]
            t = target.reshape(*target.shape[:lead], units, -1)
            y = syn.reshape(*syn.shape[:lead], units, -1)
            cos = (t * y).sum(-1) / (t.norm(dim=-1) * y.norm(dim=-1) + 1e-6)
            term = (1 - cos).sum(-1)
            dist = term if dist is None else dist + term
        elif metric == "mse":
            term = (target - syn).pow(2).reshape(*target.shape[:lead], -1).sum(-1)
            dist = term if dist is None else dist + term
        else:
            t = target.reshape(*target.shape[:lead], -1)
            y = syn.reshape(*syn.shape[:lead], -1)
            d_, a_, b_ = (t * y).sum(-1), t.pow(2).sum(-1), y.pow(2).sum(-1)
            dot = d_ if dot is None else dot + d_
            nr = a_ if nr is None else nr + a_
            ns = b_ if ns is None else ns + b_
    if metric == "cos":
        dist = 1 - dot / (nr.sqrt() * ns.sqrt() + 1e-6)
    if dist is None:  # only 1-D parameters under 'ours'
        return syn_grads[0].sum() * 0
    per_class = reduce_group_terms(dist, counts, obj) if per_group else dist
    class_ok = counts.sum(1) > 0
    return torch.where(class_ok, per_class, torch.zeros_like(per_class)).sum()
