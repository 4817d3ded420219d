"""fair_dm_loss against a straightforward per-class, per-group loop."""
from __future__ import annotations

import pytest
import torch

from fastfair import objectives, ops

OBJECTIVES = list(objectives.OBJECTIVES)


def loop_loss(real, labels, groups, syn, syn_labels, C, G, objective):
    """The reference code's shape: masked means, one class and group at a time."""
    total = syn.new_zeros(())
    for c in range(C):
        rc = labels == c
        sc = syn_labels == c
        if not rc.any() or not sc.any():
            continue
        nu = syn[sc].mean(0)
        mus, ns = [], []
        for g in range(G):
            m = rc & (groups == g)
            if m.any():
                mus.append(real[m].mean(0))
                ns.append(float(m.sum()))
        if objective == "vanilla":
            total = total + (real[rc].mean(0) - nu).pow(2).sum()
        elif objective == "cobra":
            b = torch.stack(mus).mean(0)
            total = total + (b - nu).abs().sum()
        else:
            terms = torch.stack([(mu - nu).pow(2).sum() for mu in mus])
            n = torch.tensor(ns, dtype=real.dtype)
            if objective in ("fairdd", "fairdd-raked"):  # raked without attribute sizes: FairDD's weights
                w = torch.ones_like(n)
            elif objective == "fairdd-mean":  # COBRA's FairDD baseline: a mean over the present groups
                w = torch.ones_like(n) / len(ns)
            elif objective == "fairdd-iw":
                w = (1 / n) / (1 / n).mean()
            elif objective == "fairdd-ldam":
                w = n.pow(-0.25) / n.pow(-0.25).mean()
            elif objective == "fairdd-groupdro":
                total = total + terms.max()
                continue
            total = total + (w * terms).sum()
    return total


def batch(C=5, G=4, D=9, n=120, ipc=3, seed=0, drop_class=True):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n,), generator=g)
    # Skewed groups: group 0 dominates, group G-1 is absent from the batch.
    groups = torch.multinomial(torch.tensor([8.0] + [1.0] * (G - 2) + [0.0]), n, True, generator=g)
    if drop_class:  # class C-1 has no real rows
        keep = labels != C - 1
        labels, groups = labels[keep], groups[keep]
    real = torch.randn(labels.shape[0], D, generator=g, dtype=torch.float64)
    syn_labels = torch.arange(C - 1).repeat_interleave(ipc)  # class C-2 .. have syn, class C-1 none
    syn = torch.randn(syn_labels.shape[0], D, generator=g, dtype=torch.float64, requires_grad=True)
    return real, labels, groups, syn, syn_labels


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_matches_loop_value_and_gradient(objective):
    C, G = 5, 4
    real, labels, groups, syn, syn_labels = batch(C, G)
    got = ops.fair_dm_loss(real, labels, groups, syn, syn_labels, C, G, objective)
    (g_got,) = torch.autograd.grad(got, syn)
    want = loop_loss(real, labels, groups, syn, syn_labels, C, G, objective)
    (g_want,) = torch.autograd.grad(want, syn)
    assert got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("objective", ["fairdd", "cobra", "vanilla"])
def test_random_layouts(objective):
    for seed in range(5):
        g = torch.Generator().manual_seed(100 + seed)
        C, G = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        n = int(torch.randint(1, 60, (1,), generator=g))
        labels = torch.randint(0, C, (n,), generator=g)
        groups = torch.randint(0, G, (n,), generator=g)
        real = torch.randn(n, 3, generator=g, dtype=torch.float64)
        syn_labels = torch.randint(0, C, (7,), generator=g)
        syn = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
        got = ops.fair_dm_loss(real, labels, groups, syn, syn_labels, C, G, objective)
        want = loop_loss(real, labels, groups, syn, syn_labels, C, G, objective)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_real_side_is_constant():
    real, labels, groups, syn, syn_labels = batch()
    real.requires_grad_(True)
    loss = ops.fair_dm_loss(real, labels, groups, syn, syn_labels, 5, 4)
    loss.backward()
    assert real.grad is None and syn.grad is not None


def test_fairdd_is_group_count_times_barycenter_gradient():
    # docs/methods.md: sum_a ||mu_a - s||^2 = |A| ||b - s||^2 + const.
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(60) % 2
    groups = (torch.arange(60) // 2) % 3  # every group present in each class
    real = torch.randn(60, 4, generator=g, dtype=torch.float64)
    syn = torch.randn(8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    syn_labels = torch.tensor([0] * 4 + [1] * 4)
    f = ops.fair_dm_loss(real, labels, groups, syn, syn_labels, 2, 3, "fairdd")
    (gf,) = torch.autograd.grad(f, syn)
    b = ops.segment_mean(real, labels * 3 + groups, 6).view(2, 3, -1).mean(1)
    nu = ops.segment_mean(syn, syn_labels, 2)
    (gb,) = torch.autograd.grad(3 * (b - nu).pow(2).sum(), syn)
    torch.testing.assert_close(gf, gb)


def test_errors():
    real, labels, groups, syn, syn_labels = batch()
    with pytest.raises(ValueError, match="unknown objective"):
        ops.fair_dm_loss(real, labels, groups, syn, syn_labels, 5, 4, "fairness")
    with pytest.raises(ValueError, match="same D"):
        ops.fair_dm_loss(real[:, :3], labels, groups, syn, syn_labels, 5, 4)
    with pytest.raises(ValueError, match="real_groups"):
        ops.fair_dm_loss(real, labels, groups + 10, syn, syn_labels, 5, 4)
    with pytest.raises(ValueError, match="outside"):
        ops.fair_dm_loss(real, labels + 5, groups, syn, syn_labels, 5, 4)


@pytest.mark.parametrize("objective", ["fairdd", "fairdd-mean", "fairdd-iw", "fairdd-groupdro"])
def test_class_blocks_of_the_squared_terms(objective, monkeypatch):
    # The no-graph part of the per-group squared-L2 terms runs a block of
    # classes at a time (objectives._TERMS_BLOCK_BYTES); blocks of one class
    # (and of two, leaving a remainder) must give the loop's value and gradient.
    C, G = 5, 4
    real, labels, groups, syn, syn_labels = batch(C, G, D=11)
    want = loop_loss(real, labels, groups, syn, syn_labels, C, G, objective)
    (g_want,) = torch.autograd.grad(want, syn)
    for block_bytes in (1, 2 * G * 11 * 8):
        monkeypatch.setattr(objectives, "_TERMS_BLOCK_BYTES", block_bytes)
        got = ops.fair_dm_loss(real, labels, groups, syn, syn_labels, C, G, objective)
        (g_got,) = torch.autograd.grad(got, syn)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
