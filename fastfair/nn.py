"""Loss modules for your own distillation loop.

:class:`FairDMLoss` and :class:`FairGradientMatching` take the tensors the DM /
DC family's scripts already hold (real rows with their labels and protected
groups, synthetic rows with their labels) and return the matching loss of
every class and group in one call. They add nothing to the math: the DM loss
is :func:`fastfair.ops.fair_dm_terms`, the DC loss is
:func:`fastfair.pergroup.segment_gradients` for the real side,
:func:`fastfair.pergroup.class_gradients` for the synthetic side and
:func:`fastfair.objectives.dc_matching_terms`, as the ``fastfair distill``
driver (``fastfair.distill.dm`` / ``dc``) uses them.

``reduction``: ``"sum"`` (the papers' loss: the sum over classes), ``"mean"``
(over the num_classes per-class terms) or ``"none"`` (the [C] per-class terms;
a class without real or without synthetic rows contributes 0). After each
call ``last_terms`` holds the detached :class:`fastfair.objectives.MatchTerms`
(per-class terms, per-(class, group) distances, real rows per segment) for
logging; inside a torch.compile'd graph it is not updated (a compiled graph
keeps no Python side effects): call ``terms(...)`` there instead.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from . import objectives, ops
from .attributes import Attributes, check_loss_attributes, partitions, regroup

Reduction = Literal["sum", "mean", "none"]


def _reduce(per_class: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return per_class.sum()
    if reduction == "mean":
        return per_class.mean()
    return per_class


def _check_reduction(reduction: str) -> str:
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    return reduction


def _detached(terms: objectives.MatchTerms) -> objectives.MatchTerms:
    return objectives.MatchTerms(*(None if t is None else t.detach() for t in terms))


class FairDMLoss(nn.Module):
    """Distribution matching (DM) with a fair objective over all classes at once.

    ``forward(real_emb [N, D], real_labels [N], real_groups [N], syn_emb [M, D],
    syn_labels [M])``: embeddings of the real and synthetic batches (every
    class in one batch, rows in any order), int32/int64 labels and groups.
    Per class c the synthetic mean embedding is matched against the real
    (class, group) means as the objective says (``fairdd``: one term per
    group present; ``vanilla``: the class mean; ``cobra``: the barycenter of
    the group means, L1; the ablations of :data:`fastfair.objectives.OBJECTIVES`).
    The real side is a constant; gradients flow to ``syn_emb``.

    num_classes / num_groups: any integer type. A label or group out of range
    raises ValueError naming it (``real_labels[7] = 9 is outside [0,
    num_classes = 8)``).

    Several protected attributes (fastfair's extension): pass ``attributes``
    (a :class:`fastfair.attributes.Attributes`, e.g. ``dataset.attributes``)
    and give each row its intersectional group id, the mixed-radix index of
    its values (``Attributes.group``: ``g = fg * K_bg + bg`` for two); then
    ``fair_over`` chooses the groups the objective is fair over:
    ``"intersection"`` (the default), ``"marginal"`` (the sum over attributes
    of each attribute's terms) or an attribute's name. ``last_terms`` then
    holds the per-(class, chosen group) distances.
    """

    def __init__(self, num_classes: int, num_groups: int, objective: str = "fairdd",
                 reduction: Reduction = "sum", attributes: Attributes | None = None,
                 fair_over: str = "intersection") -> None:
        super().__init__()
        self.num_classes = ops._as_size(num_classes, "num_classes", "FairDMLoss")
        self.num_groups = ops._as_size(num_groups, "num_groups", "FairDMLoss")
        self.objective = objectives.with_group_layout(objective, attributes, fair_over)
        self.reduction = _check_reduction(reduction)
        check_loss_attributes("FairDMLoss", attributes, fair_over, self.num_groups)
        self.attributes, self.fair_over = attributes, fair_over
        self.last_terms: objectives.MatchTerms | None = None

    def terms(self, real_emb: Tensor, real_labels: Tensor, real_groups: Tensor, syn_emb: Tensor,
              syn_labels: Tensor) -> objectives.MatchTerms:
        """The loss's terms (carrying autograd), without storing them."""
        return ops.fair_dm_terms(real_emb, real_labels, real_groups, syn_emb, syn_labels, self.num_classes,
                                 self.num_groups, self.objective, group_terms=True, attributes=self.attributes,
                                 fair_over=self.fair_over)

    def forward(self, real_emb: Tensor, real_labels: Tensor, real_groups: Tensor, syn_emb: Tensor,
                syn_labels: Tensor) -> Tensor:
        terms = self.terms(real_emb, real_labels, real_groups, syn_emb, syn_labels)
        if not torch.compiler.is_compiling():  # a traced graph keeps no Python side effects
            self.last_terms = _detached(terms)
        return _reduce(terms.per_class, self.reduction)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_groups={self.num_groups}, "
                f"objective={self.objective.name!r}, reduction={self.reduction!r}"
                + (f", fair_over={self.fair_over!r}" if self.attributes is not None else ""))


class FairGradientMatching(nn.Module):
    """Gradient matching (DC) with a fair objective over all classes at once.

    ``forward(real_images, real_labels, real_groups, syn_images, syn_labels)``
    (already augmented, e.g. by DSA, as the family's scripts do before their
    forward passes): the real side's gradient of every (class, group)
    segment's mean cross-entropy comes from ONE forward and ONE backward of
    ``model`` over the whole real batch
    (:func:`fastfair.pergroup.segment_gradients`); the synthetic side's
    per-class gradients from one forward and backward per class with
    ``create_graph=True`` (:func:`fastfair.pergroup.class_gradients`, the
    family's way); then the objective's matching loss with ``metric``
    (``ours``, ``mse``, ``cos``: the family's ``match_loss``). ``vanilla``
    matches the class gradient, so its real side has one segment per class
    and ``last_terms.per_group`` is None.

    The gradient flows to ``syn_images`` (and, through the synthetic graph,
    to the model's parameters, as in the family's code). ``model`` must be
    decomposable per sample (no BatchNorm in training mode: ValueError naming
    the layer); pass another network per call with ``model=`` (the family
    draws a fresh one every outer iteration). ``chunk``: rows per real
    forward pass (see ``segment_gradients``). Under ``torchrun`` the real
    segment gradients are averaged over all ranks exactly (sums and counts
    all-reduced, as the driver does). ``attributes`` / ``fair_over``: several
    protected attributes, as in :class:`FairDMLoss` (the per-(class,
    intersectional group) gradients from the one pass, regrouped). In one
    process and over the intersection, only the segments present in the
    batch get a gradient (as the driver's DC: at 100 groups most of the
    C x G cells of a batch are empty); the terms equal the dense layout's.
    """

    def __init__(self, model: nn.Module | None, num_classes: int, num_groups: int,
                 objective: str = "fairdd", metric: objectives.Metric = "ours",
                 reduction: Reduction = "sum", chunk: int | str | None = "auto",
                 attributes: Attributes | None = None, fair_over: str = "intersection") -> None:
        super().__init__()
        op = "FairGradientMatching"
        self.model = model
        self.num_classes = ops._as_size(num_classes, "num_classes", op)
        self.num_groups = ops._as_size(num_groups, "num_groups", op)
        self.objective = objectives.with_group_layout(objective, attributes, fair_over)
        if metric not in ("ours", "mse", "cos"):
            raise ValueError(f"unknown metric {metric!r}; choose 'ours', 'mse' or 'cos'")
        self.metric = metric
        self.reduction = _check_reduction(reduction)
        self.chunk = chunk
        check_loss_attributes(op, attributes, fair_over, self.num_groups)
        self.attributes, self.fair_over = attributes, fair_over
        self.last_terms: objectives.MatchTerms | None = None

    def terms(self, real_images: Tensor, real_labels: Tensor, real_groups: Tensor, syn_images: Tensor,
              syn_labels: Tensor, model: nn.Module | None = None) -> objectives.MatchTerms:
        """The loss's terms (carrying autograd), without storing them."""
        from .distill import dc
        from .pergroup import class_gradients, segment_gradients

        op = "FairGradientMatching"
        net = model if model is not None else self.model
        if not isinstance(net, nn.Module):
            raise TypeError(f"{op}: no model: pass one to the constructor or as model=")
        C, G = self.num_classes, self.num_groups
        for name, t in (("real_labels", real_labels), ("real_groups", real_groups), ("syn_labels", syn_labels)):
            ops._check_rows_1d(op, name, t)
        if not (real_images.shape[0] == real_labels.shape[0] == real_groups.shape[0]):
            raise ValueError(f"{op}: real_images, real_labels and real_groups need one row each, got "
                             f"{real_images.shape[0]}, {real_labels.shape[0]} and {real_groups.shape[0]}")
        if syn_images.shape[0] != syn_labels.shape[0]:
            raise ValueError(f"{op}: syn_images has {syn_images.shape[0]} rows but syn_labels has "
                             f"{syn_labels.shape[0]}")
        checks = [("real_labels", real_labels, C, "num_classes"), ("real_groups", real_groups, G, "num_groups"),
                  ("syn_labels", syn_labels, C, "num_classes")]
        # The pooled target (vanilla) is the class gradient: one segment per
        # class, as the driver does (fastfair.distill.dc). The groups are
        # still range-checked: -1 marks a bad label or group either way.
        per_group = self.objective.target != "pooled"
        seg = ops.segment_ids(real_labels, real_groups, C, G)
        if not per_group:
            seg = torch.where(seg >= 0, torch.div(seg, G, rounding_mode="floor"), seg)
        width = C * G if per_group else C

        # Only the segments present, as the driver's DC (fastfair.distill.dc):
        # one process, fair over the intersection.
        compact = per_group and dc.compact_layout(G, self.fair_over)
        present = None

        def real_side() -> tuple[tuple[Tensor, ...], Tensor]:
            nonlocal present
            ops.segment_count(syn_labels, C)  # class_gradients' masks would skip a bad label silently
            if compact:
                counts = ops.segment_count(seg, width)  # the id check, before unique() could take a -1
                grads, present = dc.present_segment_gradients(net, real_images, real_labels.long(), seg,
                                                              self.chunk)
                return grads, counts
            grads = segment_gradients(net, real_images, real_labels.long(), seg, width, chunk=self.chunk)
            return dc._global_segment_means(tuple(g.detach() for g in grads), seg, width)

        grads, counts = ops._naming_bad_rows(op, checks, real_side)
        groups_out = G if per_group else 1
        if present is not None:
            syn_grads = class_gradients(net, syn_images, syn_labels.long(), C, create_graph=True)
            return objectives.dc_matching_terms(grads, counts, syn_grads, G, self.objective, self.metric,
                                                group_terms=True, segments=present)
        if per_group and self.attributes is not None:
            # The groups the loss is fair over: segment means back to sums,
            # summed over the intersectional groups each covers, divided again.
            fair = []
            for g in grads:
                shape = (-1,) + (1,) * (g.dim() - 1)
                sums, new_counts, groups_out = regroup(g * counts.to(g.dtype).view(shape), counts, C,
                                                       self.attributes, self.fair_over)
                fair.append(sums / new_counts.clamp(min=1).to(g.dtype).view(shape))
            grads, counts = tuple(fair), new_counts
        syn_grads = class_gradients(net, syn_images, syn_labels.long(), C, create_graph=True)
        return objectives.dc_matching_terms(grads, counts, syn_grads, groups_out, self.objective,
                                            self.metric, group_terms=per_group)

    def forward(self, real_images: Tensor, real_labels: Tensor, real_groups: Tensor, syn_images: Tensor,
                syn_labels: Tensor, model: nn.Module | None = None) -> Tensor:
        terms = self.terms(real_images, real_labels, real_groups, syn_images, syn_labels, model)
        self.last_terms = _detached(terms)
        return _reduce(terms.per_class, self.reduction)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_groups={self.num_groups}, "
                f"objective={self.objective.name!r}, metric={self.metric!r}, reduction={self.reduction!r}")


class FairCAFELoss(nn.Module):
    """CAFE's loss (layer-wise feature alignment plus the discrimination loss;
    :mod:`fastfair.cafe`) with a fair objective over all classes at once.

    ``forward(real_features, real_labels [N], real_groups [N], syn_features,
    syn_labels [M])``: the feature maps of the real and synthetic batches, one
    list entry per aligned layer ([N, ...] each, flattened here), as a CAFE
    network returns them (CAFE's ConvNet: ``out, feats = net(x)``; fastfair's:
    :func:`fastfair.nets.layer_features`). ``weights``: one per list entry, in
    the same order (None: the objective's reference for fastfair's order:
    block 1, block 2, block 3, embedding); ``embedding``: the index of the
    embedding, which the discrimination loss classifies by the synthetic class
    centres, with weight ``inner_weight`` (None: the objective's reference:
    0.01, COBRA's mode 0). ``class_mean``: divide each class term by C (None:
    COBRA's mode only). Per layer, every (class, group) segment's real mean
    comes from one segment reduction over all rows; the real side is a
    constant and gradients flow to the synthetic features.

    ``attributes`` / ``fair_over``: several protected attributes, as in
    :class:`FairDMLoss`. ``reduction`` as there.
    """

    def __init__(self, num_classes: int, num_groups: int, objective: str = "fairdd",
                 weights: list[float] | None = None, inner_weight: float | None = None,
                 class_mean: bool | None = None, embedding: int = -1, reduction: Reduction = "sum",
                 attributes: Attributes | None = None, fair_over: str = "intersection") -> None:
        super().__init__()
        from . import cafe

        op = "FairCAFELoss"
        self.num_classes = ops._as_size(num_classes, "num_classes", op)
        self.num_groups = ops._as_size(num_groups, "num_groups", op)
        self.objective = objectives.with_group_layout(objective, attributes, fair_over)
        ref = cafe.reference_weights(self.objective)
        self.weights = [float(w) for w in (ref.layers if weights is None else weights)]
        self.inner_weight = float(ref.inner_weight if inner_weight is None else inner_weight)
        self.class_mean = bool(ref.class_mean if class_mean is None else class_mean)
        self.embedding = int(embedding)
        self.reduction = _check_reduction(reduction)
        check_loss_attributes(op, attributes, fair_over, self.num_groups)
        self.attributes, self.fair_over = attributes, fair_over
        self.last_per_class: Tensor | None = None

    def per_class(self, real_features: list[Tensor], real_labels: Tensor, real_groups: Tensor,
                  syn_features: list[Tensor], syn_labels: Tensor) -> Tensor:
        """The [C] per-class terms (carrying autograd)."""
        from . import cafe

        op = "FairCAFELoss"
        C, G = self.num_classes, self.num_groups
        n_layers = len(self.weights)
        if len(real_features) != n_layers or len(syn_features) != n_layers:
            raise ValueError(f"{op}: {n_layers} layer weights but {len(real_features)} real and "
                             f"{len(syn_features)} synthetic feature maps; give one weight per map")
        if not -n_layers <= self.embedding < n_layers:
            raise ValueError(f"{op}: embedding index {self.embedding} is outside the {n_layers} feature maps")
        for name, t in (("real_labels", real_labels), ("real_groups", real_groups), ("syn_labels", syn_labels)):
            ops._check_rows_1d(op, name, t)
        for r, s in zip(real_features, syn_features):
            if r.shape[0] != real_labels.shape[0] or s.shape[0] != syn_labels.shape[0] or r.shape[1:] != s.shape[1:]:
                raise ValueError(f"{op}: a real map {tuple(r.shape)} and a synthetic map {tuple(s.shape)} do not "
                                 f"match {real_labels.shape[0]} real and {syn_labels.shape[0]} synthetic rows")
        real = [r.detach().flatten(1) for r in real_features]
        syn = [s.flatten(1) for s in syn_features]
        per_group = self.objective.target != "pooled"
        seg = ops.segment_ids(real_labels, real_groups, C, G)
        if not per_group:
            seg = torch.where(seg >= 0, torch.div(seg, G, rounding_mode="floor"), seg)
        S = C * G if per_group else C
        checks = [("real_labels", real_labels, C, "num_classes"), ("real_groups", real_groups, G, "num_groups"),
                  ("syn_labels", syn_labels, C, "num_classes")]

        def real_side() -> tuple[list[Tensor], Tensor]:
            ops.segment_count(syn_labels, C)
            return [ops.segment_sum(r, seg, S) for r in real], ops.segment_count(seg, S)

        sums, counts = ops._naming_bad_rows(op, checks, real_side)
        fg = 1
        if per_group:
            fg = G
            if self.attributes is not None:
                parts = [regroup(s, counts, C, self.attributes, self.fair_over) for s in sums]
                sums, counts, fg = [p[0] for p in parts], parts[0][1], parts[0][2]
        syn_means = [ops.segment_mean(s, syn_labels, C) for s in syn]
        syn_count = ops.segment_count(syn_labels, C)
        terms = cafe.cafe_layer_terms(sums, counts, syn_means, syn_count, fg, self.objective, self.weights,
                                      self.class_mean)
        if self.inner_weight > 0:
            parts = partitions(real_groups.long(), G, self.attributes, self.fair_over) if per_group else ()
            terms = terms + self.inner_weight * cafe.discrimination_terms(
                real[self.embedding], real_labels, syn_means[self.embedding], C, self.objective, parts)
        return terms

    def forward(self, real_features: list[Tensor], real_labels: Tensor, real_groups: Tensor,
                syn_features: list[Tensor], syn_labels: Tensor) -> Tensor:
        terms = self.per_class(real_features, real_labels, real_groups, syn_features, syn_labels)
        if not torch.compiler.is_compiling():
            self.last_per_class = terms.detach()
        return _reduce(terms, self.reduction)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_groups={self.num_groups}, "
                f"objective={self.objective.name!r}, weights={self.weights}, inner_weight={self.inner_weight}, "
                f"class_mean={self.class_mean}, reduction={self.reduction!r}")
