"""DC gradient matching: dc_matching_loss against per-class, per-group loops,
and the whole one-pass DC step against the reference code's way (one backward
per group)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastfair import objectives, pergroup
from fastfair.nets import get_network

METRICS = ["ours", "mse", "cos"]


# One thread: see conftest.one_thread.
pytestmark = pytest.mark.usefixtures("one_thread")


def match(rs, ss, metric):  # noqa: ANN001
    """match_loss of the DC code family on two lists of gradients, written out."""
    if metric == "mse":
        return sum(((r - s) ** 2).sum() for r, s in zip(rs, ss))
    if metric == "cos":
        a = torch.cat([r.flatten() for r in rs])
        b = torch.cat([s.flatten() for s in ss])
        return 1 - (a * b).sum() / (a.norm() * b.norm() + 1e-6)
    tot = 0
    for r, s in zip(rs, ss):
        if r.dim() == 1:
            continue
        r2, s2 = r.reshape(r.shape[0], -1), s.reshape(s.shape[0], -1)
        tot = tot + (1 - (r2 * s2).sum(-1) / (r2.norm(dim=-1) * s2.norm(dim=-1) + 1e-6)).sum()
    return tot


def loop_dc_loss(real_grads, counts, syn_grads, C, G, objective, metric):  # noqa: ANN001
    total = 0
    for c in range(C):
        present = [g for g in range(G) if counts[c * G + g] > 0]
        if not present:
            continue
        syn = [s[c] for s in syn_grads]
        groups = [[r[c * G + g] for r in real_grads] for g in present]
        n = torch.tensor([float(counts[c * G + g]) for g in present], dtype=torch.float64)
        if objective == "vanilla":
            tgt = [sum(grp[i] * n[j] for j, grp in enumerate(groups)) / n.sum() for i in range(len(syn))]
            total = total + match(tgt, syn, metric)
        elif objective == "cobra":
            tgt = [sum(grp[i] for grp in groups) / len(groups) for i in range(len(syn))]
            total = total + match(tgt, syn, metric)
        else:
            terms = torch.stack([match(grp, syn, metric) for grp in groups])
            # (fairdd-raked without attribute sizes weighs as fairdd; tests/test_raked.py has it with them)
            w = {"fairdd": torch.ones_like(n), "fairdd-raked": torch.ones_like(n), "fairdd-mean": torch.ones_like(n) / len(present), "fairdd-iw": (1 / n) / (1 / n).mean(),
                 "fairdd-ldam": n ** -0.25 / (n ** -0.25).mean()}.get(objective)
            total = total + (terms.max() if objective == "fairdd-groupdro" else (w * terms).sum())
    return total


@pytest.mark.parametrize("objective", list(objectives.OBJECTIVES))
@pytest.mark.parametrize("metric", METRICS)
def test_dc_matching_loss_matches_loop(objective, metric):
    C, G = 3, 4
    g = torch.Generator().manual_seed(7)
    shapes = [(5, 3, 3, 3), (5,), (4, 20), (2, 3, 4)]
    real = [torch.randn(C * G, *sh, generator=g, dtype=torch.float64) for sh in shapes]
    counts = torch.tensor([5, 0, 2, 1, 0, 0, 0, 0, 7, 7, 0, 1])  # class 1 has no real rows
    for r in real:
        r[counts == 0] = 0  # empty segments are zeros, as segment_gradients gives them
    syn = [torch.randn(C, *sh, generator=g, dtype=torch.float64, requires_grad=True) for sh in shapes]
    got = objectives.dc_matching_loss(real, counts, syn, G, objective, metric)
    want = loop_dc_loss(real, counts, syn, C, G, objective, metric)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g_got = torch.autograd.grad(got, syn, allow_unused=True, materialize_grads=True)
    g_want = torch.autograd.grad(want, syn, allow_unused=True, materialize_grads=True)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_vanilla_target_is_the_class_gradient():
    # The count-weighted mean of the group gradients is the gradient of the
    # class's mean loss: matching it with 'mse' gives 0, FairDD does not.
    torch.manual_seed(0)
    C, G = 2, 3
    model = get_network("ConvNet", 3, C, 12, width=8, depth=2).double()
    x = torch.randn(20, 3, 12, 12, dtype=torch.float64)
    y = torch.arange(20) % C
    grp = torch.tensor([0, 0, 1, 2, 0, 0, 0, 1, 0, 0] * 2)
    real = pergroup.segment_gradients(model, x, y, y * G + grp, C * G)
    counts = torch.bincount(y * G + grp, minlength=C * G)
    cls = pergroup.segment_gradients(model, x, y, y, C)  # one segment per class
    assert objectives.dc_matching_loss(real, counts, cls, G, "vanilla", "mse").item() < 1e-20
    assert objectives.dc_matching_loss(real, counts, cls, G, "fairdd", "mse").item() > 1e-6


def reference_dc_step(model, real, labels, groups, syn, syn_labels, C, G, objective, metric):  # noqa: ANN001
    """The reference code's DC loss: per class, the synthetic gradient once with
    create_graph, then one backward per group present (FairDD), or the group
    gradients averaged (COBRA), or the class batch (vanilla)."""
    params = list(model.parameters())
    loss = 0
    for c in range(C):
        xs = syn[syn_labels == c]
        gs = torch.autograd.grad(F.cross_entropy(model(xs), syn_labels[syn_labels == c]), params, create_graph=True)
        rows = labels == c
        if objective == "vanilla":
            gr = torch.autograd.grad(F.cross_entropy(model(real[rows]), labels[rows]), params)
            loss = loss + match(gr, gs, metric)
            continue
        per_group = []
        for g in range(G):
            m = rows & (groups == g)
            if m.any():
                per_group.append(torch.autograd.grad(F.cross_entropy(model(real[m]), labels[m]), params))
        if objective == "cobra":
            bary = [sum(t[i] for t in per_group) / len(per_group) for i in range(len(params))]
            loss = loss + match(bary, gs, metric)
        else:
            loss = loss + sum(match(t, gs, metric) for t in per_group)
    return loss


@pytest.mark.parametrize("objective", ["vanilla", "fairdd", "cobra"])
@pytest.mark.parametrize("metric", METRICS)
def test_one_pass_dc_step_equals_reference(objective, metric):
    torch.manual_seed(1)
    C, G, ipc = 3, 3, 2
    model = get_network("ConvNet", 3, C, 12, width=8, depth=2).double()
    real = torch.randn(27, 3, 12, 12, dtype=torch.float64)
    labels = torch.arange(27) % C
    groups = torch.randint(0, G, (27,), generator=torch.Generator().manual_seed(2))
    groups[labels == 2] = 1  # class 2 has one group only
    syn = torch.randn(C * ipc, 3, 12, 12, dtype=torch.float64, requires_grad=True)
    syn_labels = torch.arange(C).repeat_interleave(ipc)

    seg = labels * G + groups
    real_grads = pergroup.segment_gradients(model, real, labels, seg, C * G)
    counts = torch.bincount(seg, minlength=C * G)
    syn_grads = pergroup.class_gradients(model, syn, syn_labels, C)
    got = objectives.dc_matching_loss(real_grads, counts, syn_grads, G, objective, metric)
    want = reference_dc_step(model, real, labels, groups, syn, syn_labels, C, G, objective, metric)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    (g_got,) = torch.autograd.grad(got, syn)
    (g_want,) = torch.autograd.grad(want, syn)
    torch.testing.assert_close(g_got, g_want, rtol=1e-7, atol=1e-12)


def test_ours_with_only_vectors_is_zero_and_differentiable():
    real = [torch.randn(4, 5, dtype=torch.float64)]
    syn = [torch.randn(2, 5, dtype=torch.float64, requires_grad=True)]
    loss = objectives.dc_matching_loss(real, torch.tensor([1, 2, 0, 3]), syn, 2, "fairdd", "ours")
    assert loss.item() == 0
    (g,) = torch.autograd.grad(loss, syn)
    assert (g == 0).all()


def test_errors():
    real = [torch.randn(6, 3, 2)]
    syn = [torch.randn(2, 3, 2)]
    counts = torch.ones(6, dtype=torch.long)
    with pytest.raises(ValueError, match="metric"):
        objectives.dc_matching_loss(real, counts, syn, 3, "fairdd", "l2")
    with pytest.raises(ValueError, match="objective"):
        objectives.dc_matching_loss(real, counts, syn, 3, "fairest", "ours")
    with pytest.raises(ValueError, match="same"):
        objectives.dc_matching_loss(real, counts, syn + syn, 3, "fairdd", "ours")
    with pytest.raises(ValueError, match="real_counts"):
        objectives.dc_matching_loss(real, counts[:5], syn, 3, "fairdd", "ours")
    with pytest.raises(ValueError, match="does not match"):
        objectives.dc_matching_loss(real, torch.ones(4, dtype=torch.long), syn, 2, "fairdd", "ours")
