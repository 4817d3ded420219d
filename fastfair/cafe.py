"""CAFE's loss (Wang et al., CVPR'22, "CAFE: Learning to Condense Dataset by
Aligning Features") with any objective, from per-(class, group) segment
statistics of every aligned layer.

CAFE matches, per class, the mean real and synthetic features at several
layers (squared L2 summed over the features: ``nn.MSELoss(reduction='sum')``
in both codes), and adds a *discrimination* loss: every real embedding is
classified by the synthetic class centres (logits = real_emb @ centres^T,
cross-entropy summed over the real rows) with weight ``inner_weight``.

The layers (:func:`fastfair.nets.layer_features`): each ConvNet block's
activation before its pooling, shallow to deep, then the embedding (the last
pooled map, flattened). CAFE's ConvNet returns five maps for depth 3, ``[f5,
f4, f3, f2, f1]`` (f5 the embedding, f4 the last pooled map, f3..f1 the block
activations); f4 and f5 hold the same numbers, so their two terms are one
term here with the two weights added. Weights are listed shallow to deep:
``(block 1, block 2, block 3, embedding)``.

What each objective matches (fastfair/docs/methods.md "CAFE"):

- ``vanilla``: CAFE as COBRA's train_cafe.py runs it (``--mode vanilla``):
  the class mean of every layer, weights first..fourth_weight = 1 plus the
  embedding's own term, so (1, 1, 1, 2); summed over classes; discrimination
  weight 0.01. (CAFE's own distill.py defaults differ: fourth/third 0.1,
  second/first 1; ``cafe_weights`` takes any.)
- ``cobra``: COBRA's train_cafe.py ``--mode cobra``: per class the uniform
  barycenter of the present groups' means at every layer, weight 1 on f5, f1,
  f2 and 0.1 on f3, f4, so (1, 1, 0.1, 1.1); each class term divided by the
  number of classes; NO discrimination loss (that mode computes none).
- ``fairdd`` (fastfair's, neither paper defines CAFE+FairDD): FairDD's rule
  applied to vanilla CAFE: every layer's class-mean term becomes the sum over
  the present groups of the group-mean term (the vanilla weights), and the
  discrimination loss becomes the sum over the present groups of the vanilla
  term computed as if the group's rows were the whole class batch (n_c x the
  group's mean cross-entropy). With one group it is vanilla CAFE exactly.
- the other objectives of :data:`fastfair.objectives.OBJECTIVES` (the FairDD
  ablations, ``fairdd-mean``) follow ``fairdd``'s layer and discrimination
  rule with their own group weights.

CAFE's layer distance is squared L2 for every objective (COBRA's DM uses L1
for ``cobra``; its CAFE does not).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .objectives import Objective, dm_matching_terms, get_objective, reduce_group_terms


@dataclass(frozen=True)
class CafeWeights:
    """The reference values of one objective: layer weights (shallow to deep,
    the embedding last, for a depth-3 ConvNet), the discrimination weight and
    whether each class term is divided by the number of classes."""

    layers: tuple[float, ...]
    inner_weight: float
    class_mean: bool


# COBRA's train_cafe.py (module docstring).
REFERENCE: dict[str, CafeWeights] = {
    "vanilla": CafeWeights((1.0, 1.0, 1.0, 2.0), 0.01, False),
    "cobra": CafeWeights((1.0, 1.0, 0.1, 1.1), 0.0, True),
}
FAIRDD_RULE = REFERENCE["vanilla"]  # fastfair's CAFE+FairDD keeps vanilla CAFE's weights
# CAFE's image learning-rate schedule (both codes): x0.5 at each of these iterations.
LR_MILESTONES = (1200, 1600, 1800)


def reference_weights(objective: str | Objective) -> CafeWeights:
    """The reference values for an objective (``FAIRDD_RULE`` for the per-group ones)."""
    return REFERENCE.get(get_objective(objective).name, FAIRDD_RULE)


def lr_at(lr_img: float, iteration: int) -> float:
    """CAFE's image learning rate at ``iteration`` (halved at each milestone)."""
    return lr_img * 0.5 ** sum(iteration >= m for m in LR_MILESTONES)


def layer_objective(objective: str | Objective) -> Objective:
    """The objective with CAFE's distance (squared L2) on every layer."""
    return dataclasses.replace(get_objective(objective), dm_distance="l2sq")


@torch.no_grad()
def real_layer_sums(net: torch.nn.Module, real: Tensor, seg: Tensor, num_segments: int, rows: int,
                    keep_embedding: bool = False, class_sizes: Sequence[int] | None = None,
                    segments_per_class: int | None = None,
                    out: Sequence[Tensor] | None = None) -> tuple[list[Tensor], Tensor | None]:
    """Per-segment sums [num_segments, F_l] of every aligned map
    (fastfair.nets.layer_features) over the real rows, at most ``rows`` rows
    per forward (each chunk's maps are reduced and dropped before the next:
    the full batch's maps never exist at once, and on a CPU a chunk's maps
    stay in cache); and the embeddings [N, D] when asked (the discrimination
    loss needs each row). No graph: the real side is a constant.

    ``class_sizes`` (host ints: the rows of each class, class-major, as the
    sampler draws them) and ``segments_per_class`` (G): chunks then never
    cross a class, and each chunk's segment sum covers only its class's G
    segments, added in place, so the work per chunk does not grow with the
    number of classes (without them every chunk writes a full
    [num_segments, F] output, which dominates at C x G = 1000).

    ``out``: the sums of an earlier call, overwritten when their shapes,
    dtypes and device match (the driver passes the previous step's): the
    first map's sums are C x G x F floats (65 MB at G = 100 for a width-16
    ConvNet at 32 px), and a fresh buffer that size is fresh pages from the
    kernel on every step. Each segment range is written by its first chunk
    and added to by the rest, so nothing is zeroed first."""
    from .nets import layer_features

    step = max(1, rows)
    if class_sizes is None or segments_per_class is None:
        blocks = [(start, min(start + step, real.shape[0]), 0, num_segments)
                  for start in range(0, real.shape[0], step)]
    else:
        g = int(segments_per_class)
        if g * len(class_sizes) != num_segments or sum(class_sizes) != real.shape[0]:
            raise ValueError(f"real_layer_sums: {len(class_sizes)} classes x {g} segments and "
                             f"{sum(class_sizes)} rows do not match {num_segments} segments and "
                             f"{real.shape[0]} rows")
        blocks, start = [], 0
        for c, n in enumerate(class_sizes):
            blocks += [(a, min(a + step, start + n), c * g, g) for a in range(start, start + n, step)]
            start += n
    sums: list[Tensor] | None = None
    embs: list[Tensor] = []
    written: set[int] = set()
    for a, b, first, width in blocks:
        taps = layer_features(net, real[a:b])
        if sums is None:
            sums = _sum_buffers(out, taps, num_segments)
        ids = seg[a:b] - first if first else seg[a:b]
        fresh = first not in written
        written.add(first)
        for total, t in zip(sums, taps):
            part = ops.segment_sum(t, ids, width)
            if fresh:
                total[first:first + width].copy_(part)
            else:
                total[first:first + width] += part
        if keep_embedding:
            embs.append(taps[-1])
    if sums is None:
        raise ValueError("real_layer_sums needs at least one real row")
    if class_sizes is not None and segments_per_class is not None:
        g = int(segments_per_class)
        for c, n in enumerate(class_sizes):
            if n == 0:  # no chunk wrote this class's segments
                for total in sums:
                    total[c * g:(c + 1) * g].zero_()
    return sums, (torch.cat(embs) if keep_embedding else None)


def _sum_buffers(out: Sequence[Tensor] | None, taps: Sequence[Tensor], num_segments: int) -> list[Tensor]:
    """``out`` when it fits the maps (one [num_segments, F_l] buffer per map,
    same dtype and device), else new uninitialised buffers."""
    if out is not None and len(out) == len(taps) and all(
            o.shape == (num_segments, t.shape[1]) and o.dtype == t.dtype and o.device == t.device
            and o.is_contiguous() for o, t in zip(out, taps)):
        return list(out)
    return [t.new_empty(num_segments, t.shape[1]) for t in taps]


def cafe_layer_terms(real_sums: Sequence[Tensor], real_count: Tensor, syn_means: Sequence[Tensor],
                     syn_count: Tensor, num_groups: int, objective: str | Objective,
                     weights: Sequence[float], class_mean: bool = False) -> Tensor:
    """The feature-alignment part of CAFE's loss, per class [C].

    real_sums: per layer [C*G, F_l] segment sums of the real features
    (constants, flattened); real_count [C*G]; syn_means: per layer [C, F_l]
    class means of the synthetic features (carrying autograd); syn_count [C].
    Each layer's per-class term is :func:`fastfair.objectives.dm_matching_terms`
    with the squared L2 distance; weighted by ``weights`` and summed over the
    layers; divided by C when ``class_mean``.
    """
    if len(real_sums) != len(syn_means) or len(weights) != len(syn_means) or not syn_means:
        raise ValueError(f"CAFE needs one real sum, one synthetic mean and one weight per layer, got "
                         f"{len(real_sums)}, {len(syn_means)} and {len(weights)}")
    obj = layer_objective(objective)
    total: Tensor | None = None
    for r, s, w in zip(real_sums, syn_means, weights):
        if w == 0:
            continue
        t = dm_matching_terms(r, real_count, s, syn_count, num_groups, obj).per_class * w
        total = t if total is None else total + t
    if total is None:
        total = syn_means[0].reshape(syn_means[0].shape[0], -1).sum(1) * 0
    return total / syn_count.shape[0] if class_mean else total


def discrimination_terms(real_emb: Tensor, labels: Tensor, syn_centres: Tensor, num_classes: int,
                         objective: str | Objective = "vanilla",
                         partitions: Sequence[tuple[Tensor, int]] = (),
                         segment_sum: Callable[[Tensor, Tensor, int], Tensor] = ops.segment_sum,
                         segment_count: Callable[[Tensor, int], Tensor] = ops.segment_count) -> Tensor:
    """CAFE's discrimination loss per class [C]: every real embedding [N, D]
    (a constant) classified by the synthetic class centres [C, D] (carrying
    autograd), logits = emb @ centres^T, cross-entropy summed over the rows.

    ``vanilla``: the sum over the class's rows. A per-group objective: for
    each partition of the rows into groups (``partitions``: per row its group
    id [N] and the number of groups P; several for ``fair_over='marginal'``),
    the term of group g of class c is the vanilla term computed as if the
    group's rows were the whole class batch, n_c x (mean CE over the group's
    rows), and the objective combines the groups present as it combines its
    layer terms (fastfair.objectives.reduce_group_terms: FairDD sums them,
    GroupDRO takes the largest, ...); a barycenter (COBRA) weighs the present
    groups equally (their mean). ``segment_sum`` / ``segment_count``: global
    ones (fastfair.distributed) when the rows are one rank's share."""
    obj = get_objective(objective)
    labels = labels.long()
    logits = real_emb.detach().to(syn_centres.dtype) @ syn_centres.t()
    ce = F.cross_entropy(logits, labels, reduction="none").unsqueeze(1)
    if obj.target == "pooled" or not partitions:
        return segment_sum(ce, labels, num_classes).squeeze(1)
    if obj.target == "barycenter":
        obj = get_objective("fairdd-mean")
    n_c = segment_count(labels, num_classes)
    total: Tensor | None = None
    for ids, p in partitions:
        seg = labels * p + ids.long()
        sums = segment_sum(ce, seg, num_classes * p).squeeze(1)
        n = segment_count(seg, num_classes * p)
        terms = n_c.repeat_interleave(p).to(sums.dtype) * sums / n.clamp(min=1).to(sums.dtype)
        part = reduce_group_terms(terms.view(num_classes, p), n.view(num_classes, p), obj)
        total = part if total is None else total + part
    assert total is not None
    return total
