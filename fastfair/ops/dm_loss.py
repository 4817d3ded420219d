"""The DM matching loss of every class and group from one segment
reduction of each batch (fair_dm_loss, fair_dm_terms)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import objectives
from ..attributes import Attributes, check_loss_attributes, regroup
from ._checks import _INT64_MAX, _as_size, _check_rows_1d, _naming_bad_rows
from .segment import segment_count, segment_ids, segment_mean, segment_sum


def _check_dm_args(real_emb: Tensor, real_labels: Tensor, real_groups: Tensor, syn_emb: Tensor,
                   syn_labels: Tensor, num_classes: object, num_groups: object, op: str) -> tuple:
    """Metadata checks of the DM loss's inputs; returns (C, G) as sizes."""
    num_classes = _as_size(num_classes, "num_classes", op)
    num_groups = _as_size(num_groups, "num_groups", op)
    if not isinstance(num_classes, torch.SymInt) and not isinstance(num_groups, torch.SymInt) \
            and num_classes * num_groups > _INT64_MAX:
        raise ValueError(f"{op}: num_classes * num_groups = {num_classes} * {num_groups} does not fit in int64")
    for name, t in (("real_labels", real_labels), ("real_groups", real_groups), ("syn_labels", syn_labels)):
        _check_rows_1d(op, name, t)
    for name, t in (("real_emb", real_emb), ("syn_emb", syn_emb)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor")
    if real_emb.dim() != 2 or syn_emb.dim() != 2 or real_emb.shape[1] != syn_emb.shape[1]:
        raise ValueError(
            f"{op}: embeddings must be [N, D] with the same D, got "
            f"{tuple(real_emb.shape)} and {tuple(syn_emb.shape)}"
        )
    if not (real_labels.shape[0] == real_groups.shape[0] == real_emb.shape[0]):
        raise ValueError(
            f"{op}: real_emb, real_labels and real_groups need one row each, got "
            f"{real_emb.shape[0]}, {real_labels.shape[0]} and {real_groups.shape[0]}"
        )
    if syn_labels.shape[0] != syn_emb.shape[0]:
        raise ValueError(f"{op}: syn_emb has {syn_emb.shape[0]} rows but syn_labels has {syn_labels.shape[0]}")
    devices = {t.device for t in (real_emb, real_labels, real_groups, syn_emb, syn_labels)}
    if len(devices) > 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted(map(str, devices))}")
    return num_classes, num_groups


def fair_dm_terms(
    real_emb: Tensor,
    real_labels: Tensor,
    real_groups: Tensor,
    syn_emb: Tensor,
    syn_labels: Tensor,
    num_classes: int,
    num_groups: int,
    objective: str = "fairdd",
    group_terms: bool = False,
    attributes: Attributes | None = None,
    fair_over: str = "intersection",
) -> objectives.MatchTerms:
    """:func:`fair_dm_loss` before the sum over classes:
    :class:`fastfair.objectives.MatchTerms` (per-class terms [C], per-(class,
    group) distances [C, G'] for per-group objectives or with ``group_terms``,
    real rows per segment [C, G'], G' the groups the loss is fair over)."""
    op = "fair_dm_loss"
    obj = objectives.with_group_layout(objective, attributes, fair_over)
    C, G = _check_dm_args(real_emb, real_labels, real_groups, syn_emb, syn_labels, num_classes, num_groups, op)
    check_loss_attributes(op, attributes, fair_over, G)
    checks = [("real_labels", real_labels, C, "num_classes"), ("real_groups", real_groups, G, "num_groups"),
              ("syn_labels", syn_labels, C, "num_classes")]
    return _naming_bad_rows(op, checks, _fair_dm_terms, real_emb, real_labels, real_groups, syn_emb, syn_labels,
                           C, G, obj, group_terms, attributes, fair_over)


def _fair_dm_terms(real_emb: Tensor, real_labels: Tensor, real_groups: Tensor, syn_emb: Tensor,
                   syn_labels: Tensor, C: int, G: int, obj: objectives.Objective,
                   group_terms: bool, attributes: Attributes | None = None,
                   fair_over: str = "intersection") -> objectives.MatchTerms:
    num_segments = C * G
    seg = segment_ids(real_labels, real_groups, C, G)
    real = real_emb.detach()
    real_sum = segment_sum(real, seg, num_segments)
    real_count = segment_count(seg, num_segments)
    if attributes is not None:
        # Several attributes: the groups the loss is fair over, as sums of the
        # intersectional segment sums (no second pass).
        real_sum, real_count, G = regroup(real_sum, real_count, C, attributes, fair_over)
    syn_mean = segment_mean(syn_emb, syn_labels, C)
    syn_count = segment_count(syn_labels, C)
    return objectives.dm_matching_terms(real_sum, real_count, syn_mean, syn_count, G, obj, group_terms)


def fair_dm_loss(
    real_emb: Tensor,
    real_labels: Tensor,
    real_groups: Tensor,
    syn_emb: Tensor,
    syn_labels: Tensor,
    num_classes: int,
    num_groups: int,
    objective: str = "fairdd",
    attributes: Attributes | None = None,
    fair_over: str = "intersection",
) -> Tensor:
    """The DM matching loss of every class and group at once.

    Replaces the reference code's per-class, per-group masked means with one
    segment reduction of the real batch (all classes, all groups) and one of
    the synthetic batch. The real side is a constant; the gradient flows to
    ``syn_emb``. Objectives: ``vanilla``, ``fairdd``, ``fairdd-mean``, ``cobra``,
    ``fairdd-iw``, ``fairdd-ldam``, ``fairdd-groupdro`` (see
    :mod:`fastfair.objectives`). Returns a scalar: the sum over classes.

    num_classes / num_groups: any integer type (int, numpy integer, 0-d
    integer tensor). A label outside [0, num_classes) or a group outside
    [0, num_groups) raises ValueError naming it (``real_labels[7] = 9 is
    outside [0, num_classes = 8)``); under torch.compile the ops' own range
    error is raised instead, still before any result is returned.

    Several protected attributes (fastfair's extension): give each row its
    intersectional group id, the mixed-radix index of its attribute values
    (:meth:`fastfair.attributes.Attributes.group`: ``g = fg * K_bg + bg`` for
    two attributes, the last varying fastest; ``num_groups`` = the product of
    the attributes' sizes) and pass ``attributes``; ``fair_over`` is
    ``"intersection"`` (every intersectional group), ``"marginal"`` (the sum
    over attributes of each attribute's terms) or one attribute's name.
    """
    return fair_dm_terms(real_emb, real_labels, real_groups, syn_emb, syn_labels, num_classes, num_groups,
                         objective, attributes=attributes, fair_over=fair_over).per_class.sum()


# ===========================================================================
# Segmented weight gradients (one-pass per-group DC; docs/architecture.md op 3).
# segment_linear_weight_grad / segment_conv2d_weight_grad: out[s] is the SUM
# over the rows i of segment s of the weight gradient of row i alone, given
# the layer's input A and the gradient B at its output from one backward of
# the summed per-sample losses. fastfair.pergroup divides by segment counts.
