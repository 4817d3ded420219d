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

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Sequence

import torch
from torch import Tensor

Target = Literal["pooled", "groups", "barycenter"]
Weighting = Literal["uniform", "mean", "inverse", "ldam", "max", "raked"]

# Iterations of the raking (iterative proportional fitting) of ``raked``: a
# [C, K_1, ..., K_A] mask of at most a few thousand cells, so the cost is
# nothing beside a step's forward; 50 sweeps bring every attribute's marginal
# to uniform within 1e-3 wherever that is reachable (tests/test_raked.py).
RAKE_ITERATIONS = 50


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
      ``raked`` (fastfair's, for several protected attributes): the present
      intersectional groups weighted so that every attribute's marginal is
      uniform over its values present in the class (raking: iterative
      proportional fitting of the present mask), normalised to mean 1; the
      sum over present groups gives each value of each attribute the same
      total weight, where the uniform sum gives it its number of present
      cells. Needs ``group_sizes``; without it (one attribute, or groups that
      are not an intersection) it is ``uniform``, which is also what raking
      one attribute gives.
    dm_distance: DM's distance; COBRA's DM uses L1, the others squared L2.
    group_sizes: the attribute sizes (K_1, ..., K_A) whose mixed-radix
      product the group ids index (fastfair.attributes), set by the driver
      for ``raked``; None elsewhere.
    """

    name: str
    target: Target
    weighting: Weighting = "uniform"
    dm_distance: Literal["l2sq", "l1"] = "l2sq"
    group_sizes: tuple[int, ...] | None = None


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
        Objective("fairdd-raked", "groups", "raked"),
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


def with_group_layout(objective: str | Objective, attributes: Any, fair_over: str = "intersection") -> Objective:
    """The objective resolved against the data's group layout
    (``attributes``: a :class:`fastfair.attributes.Attributes` or None):
    ``raked`` weighting learns the attribute sizes of the intersectional
    groups it weighs; over a marginal or one attribute (or without
    attributes) it has none and weighs as FairDD does. Other objectives are
    returned as they are."""
    obj = get_objective(objective)
    if obj.weighting != "raked":
        return obj
    sizes = tuple(getattr(attributes, "sizes", None) or ())
    # One attribute has nothing to rake: its raking is the present mask.
    return dataclasses.replace(obj, group_sizes=sizes if len(sizes) > 1 and fair_over == "intersection" else None)


def group_weights(counts: Tensor, objective: Objective, dtype: torch.dtype = torch.float32) -> Tensor:
    """[C, G] weights of the per-group terms; 0 for absent groups.

    For ``max`` the weights are the present mask; the max is taken by
    :func:`reduce_group_terms`.
    """
    present = counts > 0
    c = counts.to(dtype)
    if objective.weighting == "raked" and objective.group_sizes is not None:
        return raking_weights(present, objective.group_sizes, c.dtype)
    if objective.weighting in ("uniform", "max", "raked"):
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


def raking_weights(present: Tensor, sizes: Sequence[int], dtype: torch.dtype = torch.float32,
                   iterations: int = RAKE_ITERATIONS) -> Tensor:
    """[C, G] weights of the present cells of each class (G = prod(sizes),
    mixed-radix ids) whose every attribute marginal is uniform over the
    values present in the class: iterative proportional fitting from the
    present mask, one attribute after the other. Absent cells weigh 0; each
    class's weights are normalised to mean 1 over its present cells. Where
    the present cells cannot carry uniform marginals, the fitting stops at
    ``iterations`` sweeps, as close as it came."""
    num_classes, num_groups = present.shape
    if math.prod(sizes) != num_groups:
        raise ValueError(f"group_sizes {tuple(sizes)} do not multiply to the {num_groups} groups")
    # On the host: the fitting is ~10^3 tiny ops on a few thousand cells, which
    # on a GPU would be as many kernel launches (milliseconds, a DM step's
    # order); one copy each way costs one synchronisation instead.
    device = present.device
    mask = present.to("cpu", torch.float64).reshape(num_classes, *sizes)
    w = mask.clone()
    axes = tuple(range(1, 1 + len(sizes)))
    # Per attribute k, fixed by the mask: the other axes, which of its values
    # are present in the class, and how many.
    fits = []
    for k in axes:
        other = tuple(a for a in axes if a != k)
        here = mask.sum(dim=other, keepdim=True) > 0
        fits.append((k, other, here, here.sum(dim=k, keepdim=True).clamp(min=1)))
    for _ in range(iterations):
        for k, other, here, n_here in fits:
            marg = w.sum(dim=other, keepdim=True)
            target = marg.sum(dim=k, keepdim=True) / n_here
            w = w * torch.where(here, target / marg.clamp(min=1e-300), torch.zeros_like(marg))
    w = w.reshape(num_classes, num_groups)
    n_present = mask.reshape(num_classes, num_groups).sum(1, keepdim=True).clamp(min=1)
    w = w * n_present / w.sum(1, keepdim=True).clamp(min=1e-300)
    return w.to(device=device, dtype=dtype)


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
        # sum_g S_g / (n_g * present groups) as one batched matrix product: no
        # [C, G, *F] temporary of the group means (65 MB at CAFE's first map
        # and G = 100, fresh pages on every call). Empty groups have S_g = 0.
        present = (counts > 0).sum(1, keepdim=True).to(seg_sum.dtype).clamp(min=1)
        w = 1.0 / (counts.to(seg_sum.dtype).clamp(min=1) * present)
        num_classes = seg_sum.shape[0]
        out = torch.bmm(w.unsqueeze(1), seg_sum.reshape(num_classes, seg_sum.shape[1], -1))
        return out.view(num_classes, *seg_sum.shape[2:])
    raise ValueError(f"objective {objective.name!r} has per-group targets")


def _dm_distance(diff: Tensor, objective: Objective) -> Tensor:
    if objective.dm_distance == "l1":
        return diff.abs().sum(-1)
    return diff.pow(2).sum(-1)


class MatchTerms(NamedTuple):
    """The parts of a matching loss, for ``reduction="none"`` and logging.

    per_class: [C], each class's term (0 for a class without real or without
      synthetic rows); ``per_class.sum()`` is the loss.
    per_group: [C, G], the distance of each (class, group) segment's real
      statistic from the class's synthetic statistic (0 for empty segments
      and skipped classes), before the objective's group weighting; ``None``
      where it was not asked for or the real side holds no per-group
      statistics (vanilla DC matches class gradients).
    counts: [C, G] real rows per segment ([C, 1] without per-group statistics).
    """

    per_class: Tensor
    per_group: Tensor | None
    counts: Tensor


# Temporaries of the no-graph part of _sum_of_squares_terms are made per block
# of classes of at most this many bytes: glibc serves a request above 32 MB
# (its largest mmap threshold) with fresh pages from the kernel on every call,
# so one [C, G, D] temporary of CAFE's first map at G = 100 (65 MB) cost ~10 ms
# of page faults per op, four ops per map (benchmarks/NOTES.md "CAFE", v4);
# blocks of a few MB are reused from the heap and stay in the last-level cache.
_TERMS_BLOCK_BYTES = 8 << 20


def _sum_of_squares_terms(seg_sum: Tensor, counts: Tensor, syn_mean: Tensor, obj: Objective
                          ) -> tuple[Tensor, Tensor]:
    """Per-group squared-L2 terms without a [C, G, D] graph: (per-class loss
    [C] carrying autograd, per-group distances [C, G] without it).

    sum_g w_g ||m_g - s||^2 has the gradient 2 (W s - M) in s, with W = sum_g
    w_g and M = sum_g w_g m_g ([C, D]); the exact per-group values are
    computed without a graph and the loss carries the gradient through a
    quadratic surrogate of the same derivatives (value + (q - q.detach())).
    The [C, G, D] differences exist only a block of classes at a time
    (_TERMS_BLOCK_BYTES), without autograd's saved copies: at CAFE's maps
    (D ~ 1e4-1e5) and 100 groups that is hundreds of MB less and most of the
    loss's time (benchmarks/NOTES.md, "CAFE")."""
    num_classes, num_groups, d = seg_sum.shape
    per_class_bytes = max(1, num_groups * d * seg_sum.element_size())
    step = max(1, _TERMS_BLOCK_BYTES // per_class_bytes)
    with torch.no_grad():
        syn = syn_mean.detach()
        present = counts > 0
        inv_n = 1.0 / counts.to(seg_sum.dtype).clamp(min=1)
        # Out of place and concatenated, not written into a preallocated
        # tensor: under torch.func.vmap syn is batched and the real sums are not.
        blocks = []
        for c0 in range(0, num_classes, step):
            c1 = min(num_classes, c0 + step)
            diff = seg_sum[c0:c1] * inv_n[c0:c1].unsqueeze(-1) - syn[c0:c1].unsqueeze(1)
            blocks.append(diff.pow_(2).sum(-1))
        terms = torch.cat(blocks) if blocks else seg_sum.new_zeros(0, num_groups)
        if obj.weighting == "max":
            masked = terms.masked_fill(~present, float("-inf"))
            w = torch.zeros_like(terms).scatter_(1, masked.argmax(1, keepdim=True), 1.0) * present
        else:
            w = torch.where(present, group_weights(counts, obj, terms.dtype), torch.zeros_like(terms))
        value = (w * terms).sum(1)
        big_w = w.sum(1)
        # M = sum_g w_g S_g / n_g: one batched matrix product, no [C, G, D] temporary.
        big_m = torch.bmm((w * inv_n).unsqueeze(1), seg_sum).squeeze(1)
    q = big_w * syn_mean.pow(2).sum(-1) - 2 * (syn_mean * big_m).sum(-1)
    return value + (q - q.detach()), terms


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
    return dm_matching_terms(real_sum, real_count, syn_mean, syn_count, num_groups, objective).per_class.sum()


def dm_matching_terms(
    real_sum: Tensor,
    real_count: Tensor,
    syn_mean: Tensor,
    syn_count: Tensor,
    num_groups: int,
    objective: str | Objective = "fairdd",
    group_terms: bool = False,
) -> MatchTerms:
    """:func:`dm_matching_loss` before the sum over classes. ``group_terms``
    also computes the per-(class, group) distances for objectives whose
    target is one statistic per class (per-group objectives have them anyway)."""
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
    terms = None
    if obj.target == "groups" and obj.dm_distance == "l2sq":
        per_class, terms = _sum_of_squares_terms(seg_sum, counts, syn_mean, obj)
    elif obj.target == "groups" or group_terms:
        means = seg_sum / counts.to(seg_sum.dtype).clamp(min=1).unsqueeze(-1)
        terms = _dm_distance(means - syn_mean.unsqueeze(1), obj)
    if obj.target == "groups":
        if obj.dm_distance != "l2sq":
            per_class = reduce_group_terms(terms, counts, obj)
    else:
        target = class_target(seg_sum, counts, obj)
        per_class = _dm_distance(target - syn_mean, obj)
    per_class = torch.where(class_ok, per_class, torch.zeros_like(per_class))
    if terms is not None:
        keep = class_ok.unsqueeze(1) & (counts > 0)
        terms = torch.where(keep, terms, torch.zeros_like(terms))
    return MatchTerms(per_class, terms, counts)


# ---------------------------------------------------------------------------
# DC: gradient matching (match_loss of the DC code family, docs/methods.md).

Metric = Literal["ours", "mse", "cos"]


class _MetricSum:
    """The DC metric of target against synthetic gradients, summed over
    parameter tensors; the leading dimensions (classes, or classes x groups)
    are the shape of the terms."""

    def __init__(self, metric: Metric) -> None:
        self.metric = metric
        self.dist: Tensor | None = None
        self.dot = self.nr = self.ns = None

    def add(self, target: Tensor, syn: Tensor, param_dims: int) -> None:
        lead = target.dim() - param_dims
        if self.metric == "ours":
            if param_dims <= 1:
                return
            units = target.shape[lead]
            t = target.reshape(*target.shape[:lead], units, -1)
            y = syn.reshape(*syn.shape[:lead], units, -1)
            cos = (t * y).sum(-1) / (t.norm(dim=-1) * y.norm(dim=-1) + 1e-6)
            self._add_dist((1 - cos).sum(-1))
        elif self.metric == "mse":
            self._add_dist((target - syn).pow(2).reshape(*target.shape[:lead], -1).sum(-1))
        else:
            t = target.reshape(*target.shape[:lead], -1)
            y = syn.reshape(*syn.shape[:lead], -1)
            d_, a_, b_ = (t * y).sum(-1), t.pow(2).sum(-1), y.pow(2).sum(-1)
            self.dot = d_ if self.dot is None else self.dot + d_
            self.nr = a_ if self.nr is None else self.nr + a_
            self.ns = b_ if self.ns is None else self.ns + b_

    def _add_dist(self, term: Tensor) -> None:
        self.dist = term if self.dist is None else self.dist + term

    def value(self) -> Tensor | None:
        if self.metric == "cos" and self.dot is not None:
            return 1 - self.dot / (self.nr.sqrt() * self.ns.sqrt() + 1e-6)
        return self.dist


def dc_matching_loss(
    real_grads: Sequence[Tensor],
    real_counts: Tensor,
    syn_grads: Sequence[Tensor],
    num_groups: int,
    objective: str | Objective = "fairdd",
    metric: Metric = "ours",
    segments: Tensor | None = None,
) -> Tensor:
    """DC loss from per-segment real gradients and per-class synthetic gradients.

    real_grads: per parameter [C*G, *shape] (segment mean gradients, constants);
    real_counts: [C*G] segment sizes; syn_grads: per parameter [C, *shape]
    carrying autograd. Per class over the present groups: ``vanilla`` matches
    the count-weighted mean of the group gradients (the class gradient),
    ``fairdd`` sums the match against each group gradient (weighted by the
    ablations), ``cobra`` matches the unweighted mean of the group gradients.
    metric (match_loss of the DC code family, docs/methods.md), summed over
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

    segments: None (the rows of ``real_grads`` are all C*G segments, as
    above) or the segment ids of the rows, [P] strictly increasing: then
    ``real_grads`` holds only those P segments (typically the ones present in
    the batch: at 100 intersectional groups a real batch of 2560 holds ~200
    of 1000, and the other 800 gradients are zeros nobody needs to write or
    read), ``real_counts`` stays [C*G], and the terms are computed a class at
    a time over the class's rows (each class's temporaries are its own rows'
    size). Same loss as the dense layout with the absent segments filled in,
    up to the order of floating-point additions.
    """
    return dc_matching_terms(real_grads, real_counts, syn_grads, num_groups, objective, metric,
                             segments=segments).per_class.sum()


def dc_matching_terms(
    real_grads: Sequence[Tensor],
    real_counts: Tensor,
    syn_grads: Sequence[Tensor],
    num_groups: int,
    objective: str | Objective = "fairdd",
    metric: Metric = "ours",
    group_terms: bool = False,
    segments: Tensor | None = None,
) -> MatchTerms:
    """:func:`dc_matching_loss` before the sum over classes. ``group_terms``
    also computes the metric of each (class, group) gradient against the
    class's synthetic gradient for objectives whose target is one gradient
    per class (per-group objectives have these terms anyway); with
    ``num_groups = 1`` they are the class terms. ``segments``: the rows'
    segment ids when ``real_grads`` holds only some segments
    (:func:`dc_matching_loss`)."""
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
    if segments is not None:
        return _dc_terms_of_rows(real_grads, counts, syn_grads, segments, obj, metric, group_terms)
    main = _MetricSum(metric)
    groups = _MetricSum(metric) if group_terms and not per_group else None
    for r, s in zip(real_grads, syn_grads):
        if r.shape[0] != num_classes * num_groups or r.shape[1:] != s.shape[1:]:
            raise ValueError(
                f"real gradient {tuple(r.shape)} does not match synthetic {tuple(s.shape)} "
                f"with {num_classes} classes x {num_groups} groups"
            )
        r = r.detach().to(s.dtype).reshape(num_classes, num_groups, *s.shape[1:])
        dims = s.dim() - 1
        if per_group:
            main.add(r, s.unsqueeze(1), dims)  # [C, G, ...] against [C, 1, ...]
            continue
        seg_sum = r * counts.to(r.dtype).view(num_classes, num_groups, *([1] * (r.dim() - 2)))
        main.add(class_target(seg_sum, counts, obj), s, dims)  # [C, ...] against [C, ...]
        if groups is not None:
            groups.add(r, s.unsqueeze(1), dims)
    dist = main.value()
    group_dist = dist if per_group else (groups.value() if groups is not None else None)
    zero = syn_grads[0].reshape(num_classes, -1).sum(1) * 0  # only 1-D parameters under 'ours'
    class_ok = counts.sum(1) > 0
    if dist is None:
        per_class = zero
    else:
        per_class = reduce_group_terms(dist, counts, obj) if per_group else dist
        per_class = torch.where(class_ok, per_class, torch.zeros_like(per_class))
    if group_dist is None and (per_group or groups is not None):
        group_dist = zero.unsqueeze(1).expand(num_classes, num_groups)
    if group_dist is not None:
        keep = class_ok.unsqueeze(1) & (counts > 0)
        group_dist = torch.where(keep, group_dist, torch.zeros_like(group_dist))
    return MatchTerms(per_class, group_dist, counts)


def _dc_terms_of_rows(real_grads: Sequence[Tensor], counts: Tensor, syn_grads: Sequence[Tensor], segments: Tensor,
                      obj: Objective, metric: Metric, group_terms: bool) -> MatchTerms:
    """dc_matching_terms over the P segments listed in ``segments`` (the
    other segments' gradients are not given): the per-segment distances a
    class at a time, placed into [C, G] terms and weighted and masked exactly
    as the dense layout is; the targets of pooled / barycenter objectives for
    all classes at once."""
    num_classes, num_groups = counts.shape
    if segments.dim() != 1 or segments.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"segments must be a 1-D integer tensor, got {segments.dtype} of shape "
                         f"{tuple(segments.shape)}")
    num_rows = segments.shape[0]
    segments = segments.long()
    # One host read for the checks and the class offsets together (a sync on GPUs).
    bounds = torch.arange(num_classes + 1, device=segments.device) * num_groups
    bad = ((segments[1:] <= segments[:-1]).any() | (segments[:1] < 0).any()
           | (segments[-1:] >= num_classes * num_groups).any())
    read = torch.cat([bad.long().view(1), torch.searchsorted(segments, bounds)]).tolist()
    if read[0]:
        raise ValueError(f"segments must be strictly increasing ids in [0, {num_classes * num_groups})")
    offsets = read[1:]
    for r, s in zip(real_grads, syn_grads):
        if r.shape[0] != num_rows or r.shape[1:] != s.shape[1:]:
            raise ValueError(f"real gradient {tuple(r.shape)} does not match {num_rows} segments x synthetic "
                             f"{tuple(s.shape[1:])}")
    per_group = obj.target == "groups"
    row_dist: list[Tensor] = []
    if per_group or group_terms:
        # A class at a time: its rows against its one synthetic gradient,
        # never a [P, |W|] copy of the synthetic gradients.
        for c in range(num_classes):
            lo, hi = offsets[c], offsets[c + 1]
            if hi == lo:  # no real row of this class: skipped (class_ok below)
                continue
            each = _MetricSum(metric)
            for r, s in zip(real_grads, syn_grads):
                each.add(r[lo:hi].detach().to(s.dtype), s[c].unsqueeze(0), s.dim() - 1)
            d = each.value()
            row_dist.append(d if d is not None else syn_grads[0].new_zeros(hi - lo))
    main = None
    if not per_group:
        # The class targets of pooled / barycenter objectives at once: weights
        # W [C, P] (class_target's rule on the rows given), one product per
        # parameter, then the metric against the synthetic gradients as the
        # dense layout applies it.
        dt = syn_grads[0].dtype
        n = counts.reshape(-1).index_select(0, segments).to(dt)
        row_class = torch.div(segments, num_groups, rounding_mode="floor")
        if obj.target == "pooled":
            w = n / counts.sum(1).to(dt).clamp(min=1).index_select(0, row_class)
        else:  # barycenter: the unweighted mean of the present groups' gradients
            w = (n > 0).to(dt) / (counts > 0).sum(1).to(dt).clamp(min=1).index_select(0, row_class)
        weights = w.new_zeros(num_classes, num_rows)
        weights[row_class, torch.arange(num_rows, device=w.device)] = w
        main = _MetricSum(metric)
        for r, s in zip(real_grads, syn_grads):
            target = (weights @ r.detach().to(s.dtype).reshape(num_rows, s.shape[1:].numel())).view(s.shape)
            main.add(target, s, s.dim() - 1)
    zero = syn_grads[0].reshape(num_classes, -1).sum(1) * 0  # keeps the graph for 1-D-only 'ours'
    class_ok = counts.sum(1) > 0
    group_dist = None
    if per_group or group_terms:
        flat = torch.cat(row_dist) if row_dist else zero.new_zeros(0)
        group_dist = (zero.unsqueeze(1).expand(num_classes, num_groups).reshape(-1)
                      .index_copy(0, segments, flat).view(num_classes, num_groups))
        keep = class_ok.unsqueeze(1) & (counts > 0)
        group_dist = torch.where(keep, group_dist, torch.zeros_like(group_dist))
    if per_group:
        per_class = reduce_group_terms(group_dist, counts, obj)
    else:
        d = main.value()
        per_class = zero if d is None else d
    per_class = torch.where(class_ok, per_class, torch.zeros_like(per_class))
    return MatchTerms(per_class, group_dist, counts)
