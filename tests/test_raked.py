"""``fairdd-raked`` (fastfair's, for several protected attributes): FairDD's
per-group terms over the intersection, weighted so that every attribute's
marginal is uniform over its present values. The weights' defining property
is checked on masks where it is reachable; the losses against float64 loops
that apply the weights one (class, group) at a time."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastfair import data, distill
from fastfair.distill.context import build_context
from fastfair.distill.dm import dm_iteration
from fastfair.distill.synset import init_images as _init_images
from fastfair.objectives import (dc_matching_terms, dm_matching_loss, get_objective, group_weights,
                                 raking_weights)

RAKED = get_objective("fairdd-raked")


def _raked(sizes: tuple[int, ...]):  # noqa: ANN202
    return dataclasses.replace(RAKED, group_sizes=sizes)


def _permutation_union(num_classes: int, k: int, perms: int, gen: torch.Generator) -> torch.Tensor:
    """A [C, k*k] present mask that is a union of random permutation matrices:
    uniform weight on each permutation gives uniform marginals, so the
    raking can reach them exactly."""
    mask = torch.zeros(num_classes, k, k, dtype=torch.bool)
    for c in range(num_classes):
        for _ in range(perms):
            mask[c, torch.arange(k), torch.randperm(k, generator=gen)] = True
    return mask.view(num_classes, k * k)


@pytest.mark.parametrize("k, perms", [(3, 1), (5, 2), (10, 3)])
def test_raking_reaches_uniform_marginals_where_they_are_reachable(k: int, perms: int) -> None:
    gen = torch.Generator().manual_seed(k)
    present = _permutation_union(4, k, perms, gen)
    w = raking_weights(present, (k, k), torch.float64)
    assert torch.all(w[~present] == 0) and torch.all(w[present] > 0)
    torch.testing.assert_close(w.sum(1), present.sum(1).double())  # mean 1 over present cells
    cube = w.view(4, k, k)
    for marg in (cube.sum(2), cube.sum(1)):  # each attribute's marginal: uniform
        torch.testing.assert_close(marg, marg.mean(1, keepdim=True).expand_as(marg), rtol=1e-3, atol=1e-3)
    # The unweighted sum is NOT uniform on such masks when they are uneven:
    # what the raking changes.
    if perms > 1:
        counts = present.view(4, k, k).double().sum(2)
        assert (counts.max(1).values > counts.min(1).values).any()


def test_raking_three_attributes_and_full_presence() -> None:
    present = torch.ones(2, 24, dtype=torch.bool)
    torch.testing.assert_close(raking_weights(present, (2, 3, 4), torch.float64), torch.ones(2, 24, dtype=torch.float64))
    # The row and column of a class plus its diagonal-free rest missing (the
    # biased data's worst case) cannot carry uniform marginals: finite weights,
    # zero on absent cells, still mean 1.
    k = 4
    present = torch.zeros(1, k, k, dtype=torch.bool)
    present[0, 0, :] = present[0, :, 0] = True
    w = raking_weights(present.view(1, k * k), (k, k), torch.float64)
    assert torch.isfinite(w).all() and torch.all(w[~present.view(1, -1)] == 0)
    torch.testing.assert_close(w.sum(), torch.tensor(float(present.sum()), dtype=torch.float64))
    with pytest.raises(ValueError, match="do not multiply"):
        raking_weights(present.view(1, k * k), (k, k + 1))


def test_raked_without_sizes_or_with_one_attribute_is_fairdd() -> None:
    counts = torch.tensor([[3, 0, 1, 5], [0, 0, 2, 2]])
    uniform = group_weights(counts, get_objective("fairdd"))
    torch.testing.assert_close(group_weights(counts, RAKED), uniform)
    torch.testing.assert_close(group_weights(counts, _raked((4,))), uniform)  # one attribute: nothing to rake


def test_dm_loss_raked_equals_the_weighted_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    C, sizes, D = 3, (3, 4), 5
    G = 12
    counts = torch.randint(0, 3, (C * G,), generator=gen)
    counts[:G] = 0  # a class without real rows
    counts[G:G + 4] = 0  # absent groups
    real_sum = torch.randn(C * G, D, generator=gen, dtype=torch.float64) * counts.unsqueeze(1)
    syn = torch.randn(C, D, generator=gen, dtype=torch.float64, requires_grad=True)
    got = dm_matching_loss(real_sum, counts, syn, torch.full((C,), 2), G, _raked(sizes))
    w = raking_weights((counts > 0).view(C, G), sizes, torch.float64)
    want = torch.zeros((), dtype=torch.float64)
    for c in range(C):
        for g in range(G):
            n = int(counts[c * G + g])
            if n:
                want = want + w[c, g] * (real_sum[c * G + g] / n - syn[c]).pow(2).sum()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    (g1,), (g2,) = torch.autograd.grad(got, syn), torch.autograd.grad(want, syn)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)
    # Uneven presence: a different loss from FairDD's sum.
    plain = dm_matching_loss(real_sum, counts, syn, torch.full((C,), 2), G, "fairdd")
    assert not torch.allclose(plain, got)


def test_dc_terms_raked_are_the_weighted_group_terms() -> None:
    gen = torch.Generator().manual_seed(2)
    C, sizes = 2, (2, 3)
    G = 6
    counts = torch.tensor([2, 1, 0, 3, 0, 1, 1, 0, 0, 4, 2, 0])
    real = [torch.randn(C * G, 4, 3, generator=gen, dtype=torch.float64), torch.randn(C * G, 4, generator=gen,
                                                                                      dtype=torch.float64)]
    syn = [torch.randn(C, 4, 3, generator=gen, dtype=torch.float64), torch.randn(C, 4, generator=gen,
                                                                               dtype=torch.float64)]
    terms = dc_matching_terms(real, counts, syn, G, objective=_raked(sizes))
    w = raking_weights((counts > 0).view(C, G), sizes, torch.float64)
    torch.testing.assert_close(terms.per_class, (w * terms.per_group).sum(1), rtol=1e-12, atol=1e-12)


def test_the_driver_gives_raked_the_intersection_sizes_only() -> None:
    ds = data.load("cdigits-fgbg", fg_colours=3, bg_colours=2)

    def ctx(over: str, objective: str = "fairdd-raked"):  # noqa: ANN202
        cfg = distill.config.resolve(distill.DistillConfig(
            dataset="cdigits-fgbg", method="dm", objective=objective, ipc=2, width=8, depth=2, batch_real=12,
            iterations=1, fair_over=over))
        return build_context(cfg, ds, torch.device("cpu"))

    assert ctx("intersection").objective.group_sizes == (3, 2)
    assert ctx("marginal").objective.group_sizes is None and ctx("fg").objective.group_sizes is None
    assert ctx("intersection", "fairdd").objective.group_sizes is None
    losses = {}
    for obj in ("fairdd", "fairdd-raked"):
        c = ctx("intersection", obj)
        x = _init_images(c.sampler.class_pool, c.train_images, 2, "real", 1, torch.Generator().manual_seed(0))[0]
        _, _, losses[obj] = dm_iteration(c, x, None, 0)
    assert torch.isfinite(losses["fairdd-raked"])
    assert not torch.allclose(losses["fairdd"], losses["fairdd-raked"])  # a biased batch: uneven presence


def test_fair_dm_loss_module_rakes_over_the_intersection_only() -> None:
    from fastfair.attributes import Attributes
    from fastfair.nn import FairDMLoss

    attrs = Attributes(("fg", "bg"), (("r", "g", "b"), ("x", "y")))
    gen = torch.Generator().manual_seed(3)
    C, G, D = 2, 6, 4
    labels = torch.arange(C).repeat_interleave(9)
    groups = torch.tensor([0, 0, 0, 0, 1, 2, 3, 5, 5, 0, 1, 1, 1, 1, 4, 4, 2, 2])  # uneven presence
    real = torch.randn(18, D, generator=gen, dtype=torch.float64)
    syn = torch.randn(4, D, generator=gen, dtype=torch.float64)
    syn_labels = torch.arange(C).repeat_interleave(2)
    got = FairDMLoss(C, G, "fairdd-raked", attributes=attrs)(real, labels, groups, syn, syn_labels)
    counts = torch.bincount(labels * G + groups, minlength=C * G).view(C, G)
    w = raking_weights(counts > 0, (3, 2), torch.float64)
    want = torch.zeros((), dtype=torch.float64)
    for c in range(C):
        nu = syn[syn_labels == c].mean(0)
        for g in range(G):
            m = (labels == c) & (groups == g)
            if m.any():
                want = want + w[c, g] * (real[m].mean(0) - nu).pow(2).sum()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    over_fg = FairDMLoss(C, G, "fairdd-raked", attributes=attrs, fair_over="fg")(real, labels, groups, syn,
                                                                                syn_labels)
    plain_fg = FairDMLoss(C, G, "fairdd", attributes=attrs, fair_over="fg")(real, labels, groups, syn, syn_labels)
    torch.testing.assert_close(over_fg, plain_fg, rtol=0, atol=0)
