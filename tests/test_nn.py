"""fastfair.nn loss modules against the functional losses and float64
per-class, per-group loops (the reference code's shape)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastfair import objectives, ops
from fastfair.nn import FairDMLoss, FairGradientMatching
from fastfair.pergroup import class_gradients, segment_gradients

C, G = 4, 3


def dm_batch(seed: int = 0, n: int = 90, d: int = 6, index_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C - 1, (n,), generator=g)  # class C-1: no real rows
    groups = torch.multinomial(torch.tensor([6.0, 1.0, 0.0]), n, True, generator=g)  # group 2 absent
    groups[:3] = 2 * (labels[:3] == 0)  # ... except in class 0
    real = torch.randn(n, d, generator=g, dtype=torch.float64)
    syn_labels = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    syn = torch.randn(7, d, generator=g, dtype=torch.float64, requires_grad=True)
    return real, labels.to(index_dtype), groups.to(index_dtype), syn, syn_labels.to(index_dtype)


def dm_loop(real, labels, groups, syn, syn_labels, objective):
    """Per-class terms [C] and per-(class, group) squared-L2 / L1 distances [C, G]."""
    per_class, per_group = [], torch.zeros(C, G, dtype=torch.float64)
    dist = (lambda v: v.abs().sum()) if objective == "cobra" else (lambda v: v.pow(2).sum())  # noqa: E731
    for c in range(C):
        rc, sc = labels == c, syn_labels == c
        if not rc.any() or not sc.any():
            per_class.append(syn.sum() * 0)
            continue
        nu = syn[sc].mean(0)
        mus = {}
        for grp in range(G):
            m = rc & (groups == grp)
            if m.any():
                mus[grp] = real[m].mean(0)
                per_group[c, grp] = dist(mus[grp] - nu).detach()
        if objective == "vanilla":
            per_class.append(dist(real[rc].mean(0) - nu))
        elif objective == "cobra":
            per_class.append(dist(torch.stack(list(mus.values())).mean(0) - nu))
        else:
            per_class.append(sum(dist(mu - nu) for mu in mus.values()))
    return torch.stack(per_class), per_group


@pytest.mark.parametrize("objective", ["fairdd", "vanilla", "cobra"])
def test_dm_loss_matches_loop_and_functional(objective):
    real, labels, groups, syn, syn_labels = dm_batch()
    loss = FairDMLoss(C, G, objective, reduction="none")
    got = loss(real, labels, groups, syn, syn_labels)
    want, want_groups = dm_loop(real, labels, groups, syn, syn_labels, objective)
    assert got.shape == (C,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad(got.sum(), syn)
    (g_want,) = torch.autograd.grad(want.sum(), syn)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    terms = loss.last_terms
    torch.testing.assert_close(terms.per_group, want_groups, rtol=1e-12, atol=1e-12)
    assert not terms.per_class.requires_grad and not terms.per_group.requires_grad
    assert torch.equal(terms.counts, torch.stack([((labels == c) & (groups == k)).sum()
                                                 for c in range(C) for k in range(G)]).view(C, G))
    functional = ops.fair_dm_loss(real, labels, groups, syn, syn_labels, C, G, objective)
    torch.testing.assert_close(FairDMLoss(C, G, objective)(real, labels, groups, syn, syn_labels), functional,
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(FairDMLoss(C, G, objective, "mean")(real, labels, groups, syn, syn_labels),
                               functional / C, rtol=1e-12, atol=0)


@pytest.mark.parametrize("size", [np.int64(C), np.int32(C), torch.tensor(C), torch.tensor(C, dtype=torch.int32)])
def test_sizes_of_any_integer_type(size):
    real, labels, groups, syn, syn_labels = dm_batch(1)
    want = ops.fair_dm_loss(real, labels, groups, syn, syn_labels, C, G)
    assert torch.equal(ops.fair_dm_loss(real, labels, groups, syn, syn_labels, size, G), want)
    assert torch.equal(FairDMLoss(size, np.int64(G))(real, labels, groups, syn, syn_labels), want)
    assert torch.equal(ops.segment_sum(real, labels, size), ops.segment_sum(real, labels, C))


@pytest.mark.parametrize("size", [True, 4.0, np.float32(4), torch.tensor(4.0), torch.tensor(True), torch.tensor([4]),
                                  "4", None])
def test_sizes_refuse_non_integers(size):
    real, labels, groups, syn, syn_labels = dm_batch(1)
    with pytest.raises(TypeError, match="num_classes must be an integer"):
        ops.fair_dm_loss(real, labels, groups, syn, syn_labels, size, G)
    with pytest.raises(TypeError, match="num_segments must be an integer"):
        ops.segment_count(labels, size)


def test_sizes_out_of_range():
    real, labels, groups, syn, syn_labels = dm_batch(1)
    with pytest.raises(ValueError, match="num_segments = 9223372036854775808 does not fit in int64"):
        ops.segment_sum(real, labels, 2**63)
    with pytest.raises(ValueError, match="does not fit in int64"):
        ops.fair_dm_loss(real, labels, groups, syn, syn_labels, 2**62, 4)
    with pytest.raises(ValueError, match="num_groups must be positive"):
        FairDMLoss(C, 0)
    with pytest.raises(ValueError, match="reduction"):
        FairDMLoss(C, G, reduction="avg")
    with pytest.raises(ValueError, match="unknown objective"):
        FairDMLoss(C, G, objective="fair")


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("where,value,message", [
    ("real_labels", 2**30, "real_labels[7] = 1073741824 is outside [0, num_classes = 4)"),
    ("real_labels", -1, "real_labels[7] = -1 is outside [0, num_classes = 4)"),
    ("real_groups", 3, "real_groups[7] = 3 is outside [0, num_groups = 3)"),
    ("real_groups", -2**31, "real_groups[7] = -2147483648 is outside [0, num_groups = 3)"),
    ("syn_labels", 4, "syn_labels[5] = 4 is outside [0, num_classes = 4)"),
])
def test_errors_name_the_users_label_or_group(index_dtype, where, value, message):
    # An int32 label 2^30 with G = 3 (or 4) would wrap into a valid segment if
    # label * G + group were formed in int32.
    real, labels, groups, syn, syn_labels = dm_batch(2, index_dtype=index_dtype)
    args = {"real_labels": labels, "real_groups": groups, "syn_labels": syn_labels}
    args[where] = args[where].clone()
    args[where][5 if where == "syn_labels" else 7] = value
    call = (real, args["real_labels"], args["real_groups"], syn, args["syn_labels"])
    with pytest.raises(ValueError) as info:
        ops.fair_dm_loss(*call, C, G)
    assert str(info.value) == f"fair_dm_loss: {message}"
    with pytest.raises(ValueError, match=r"\[7\]|\[5\]"):
        FairDMLoss(C, G)(*call)


def test_int32_label_that_would_wrap_with_four_groups():
    real, labels, groups, syn, syn_labels = dm_batch(3, index_dtype=torch.int32)
    labels = labels.clone()
    labels[0] = 2**30  # 2^30 * 4 = 2^32 = 0 in int32: class 0, group 0
    with pytest.raises(ValueError, match=r"real_labels\[0\] = 1073741824 is outside \[0, num_classes = 4\)"):
        ops.fair_dm_loss(real, labels, groups, syn, syn_labels, C, 4)


def test_metadata_errors():
    real, labels, groups, syn, syn_labels = dm_batch(4)
    with pytest.raises(TypeError, match="real_groups must be a 1-D int32/int64 tensor"):
        ops.fair_dm_loss(real, labels, groups.float(), syn, syn_labels, C, G)
    with pytest.raises(ValueError, match="syn_labels must be a 1-D"):
        ops.fair_dm_loss(real, labels, groups, syn, syn_labels[:, None], C, G)
    with pytest.raises(ValueError, match="one row each"):
        ops.fair_dm_loss(real, labels[:-1], groups, syn, syn_labels, C, G)
    with pytest.raises(ValueError, match="syn_emb has 7 rows"):
        ops.fair_dm_loss(real, labels, groups, syn, syn_labels[:-1], C, G)
    with pytest.raises(ValueError, match="one device"):
        ops.fair_dm_loss(real, labels, groups, syn.detach().to("meta"), syn_labels, C, G)


def test_meta_tensors_give_fake_results():
    real, labels, groups, syn, syn_labels = dm_batch(5)
    meta = [t.detach().to("meta") for t in (real, labels, groups, syn, syn_labels)]
    out = ops.fair_dm_loss(*meta, C, G)
    assert out.device.type == "meta" and out.shape == ()
    assert ops.segment_mean(meta[0], meta[1], C).shape == (C, real.shape[1])
    assert ops.segment_count(meta[1], C).dtype == torch.int64
    with pytest.raises(ValueError, match="meta tensor"):
        ops.segment_count(labels, torch.tensor(C, device="meta"))


# ---------------------------------------------------------------------------
# DC


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(3, 3), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(3 * 3 * 3, C)).double()


def dc_batch(seed: int = 0, n: int = 40):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C - 1, (n,), generator=g)  # class C-1: no real rows
    groups = torch.multinomial(torch.tensor([5.0, 2.0, 1.0]), n, True, generator=g)
    groups[labels == 1] = groups[labels == 1].clamp(max=1)  # class 1: group 2 absent
    real = torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64)
    syn_labels = torch.tensor([0, 1, 1, 2, 3, 0])
    syn = torch.randn(6, 2, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    return real, labels, groups, syn, syn_labels


def match_loss(gr, gs, metric):
    """The DC family's match_loss, written out per parameter tensor."""
    if metric == "mse":
        return sum((r - s).pow(2).sum() for r, s in zip(gr, gs))
    if metric == "cos":
        r, s = torch.cat([t.flatten() for t in gr]), torch.cat([t.flatten() for t in gs])
        return 1 - (r * s).sum() / (r.norm() * s.norm() + 1e-6)
    total = 0
    for r, s in zip(gr, gs):
        if r.dim() == 1:  # biases and norm affine contribute 0
            continue
        r, s = r.reshape(r.shape[0], -1), s.reshape(s.shape[0], -1)
        total = total + (1 - (r * s).sum(1) / (r.norm(dim=1) * s.norm(dim=1) + 1e-6)).sum()
    return total


def dc_loop(net, real, labels, groups, syn, syn_labels, objective, metric):
    """Per-class terms and per-(class, group) terms, one backward per group."""
    params = list(net.parameters())

    def grads(x, y, graph=False):
        return torch.autograd.grad(F.cross_entropy(net(x), y), params, create_graph=graph)

    per_class, per_group = [], torch.zeros(C, G, dtype=torch.float64)
    for c in range(C):
        rc, sc = labels == c, syn_labels == c
        if not rc.any():
            per_class.append(syn.sum() * 0)
            continue
        gs = grads(syn[sc], syn_labels[sc], graph=True)
        group_grads = {}
        for k in range(G):
            m = rc & (groups == k)
            if m.any():
                group_grads[k] = grads(real[m], labels[m])
                per_group[c, k] = match_loss(group_grads[k], gs, metric).detach()
        if objective == "vanilla":
            per_class.append(match_loss(grads(real[rc], labels[rc]), gs, metric))
        elif objective == "cobra":
            bary = [torch.stack(t).mean(0) for t in zip(*group_grads.values())]
            per_class.append(match_loss(bary, gs, metric))
        else:
            per_class.append(sum(match_loss(gr, gs, metric) for gr in group_grads.values()))
    return torch.stack(per_class), per_group


@pytest.mark.parametrize("objective,metric", [("fairdd", "ours"), ("fairdd", "mse"), ("fairdd", "cos"),
                                              ("vanilla", "ours"), ("cobra", "ours"), ("cobra", "cos")])
def test_gradient_matching_matches_loop(objective, metric):
    net = tiny_net()
    real, labels, groups, syn, syn_labels = dc_batch()
    matcher = FairGradientMatching(net, C, G, objective, metric, reduction="none", chunk=7)
    got = matcher(real, labels, groups, syn, syn_labels)
    want, want_groups = dc_loop(net, real, labels, groups, syn, syn_labels, objective, metric)
    assert got.shape == (C,) and got[C - 1] == 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    (g_got,) = torch.autograd.grad(got.sum(), syn)
    (g_want,) = torch.autograd.grad(want.sum(), syn)
    torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-10)
    if objective == "vanilla":
        assert matcher.last_terms.per_group is None
    else:
        torch.testing.assert_close(matcher.last_terms.per_group, want_groups, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("objective", ["fairdd", "vanilla"])
def test_gradient_matching_equals_functional(objective):
    net = tiny_net(1)
    real, labels, groups, syn, syn_labels = dc_batch(1)
    got = FairGradientMatching(None, C, G, objective)(real, labels, groups, syn, syn_labels, model=net)
    width = 1 if objective == "vanilla" else G
    seg = labels * width + (groups if width > 1 else 0)
    real_grads = segment_gradients(net, real, labels, seg, C * width)
    syn_grads = class_gradients(net, syn, syn_labels, C, create_graph=True)
    want = objectives.dc_matching_loss(real_grads, ops.segment_count(seg, C * width), syn_grads, width, objective)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # 'mean' is over the num_classes per-class terms.
    mean = FairGradientMatching(net, C, G, objective, reduction="mean")(real, labels, groups, syn, syn_labels)
    torch.testing.assert_close(mean, want / C, rtol=1e-12, atol=1e-12)


def test_gradient_matching_errors():
    net = tiny_net(2)
    real, labels, groups, syn, syn_labels = dc_batch(2)
    bad = labels.clone()
    bad[4] = C
    with pytest.raises(ValueError, match=r"FairGradientMatching: real_labels\[4\] = 4 is outside \[0, num_classes = 4\)"):
        FairGradientMatching(net, C, G)(real, bad, groups, syn, syn_labels)
    bad = groups.clone()
    bad[9] = -1
    for objective in ("fairdd", "vanilla"):  # vanilla ignores groups but still refuses bad ones
        with pytest.raises(ValueError, match=r"real_groups\[9\] = -1 is outside \[0, num_groups = 3\)"):
            FairGradientMatching(net, C, G, objective)(real, labels, bad, syn, syn_labels)
    bad = syn_labels.clone()
    bad[2] = 7
    with pytest.raises(ValueError, match=r"syn_labels\[2\] = 7 is outside \[0, num_classes = 4\)"):
        FairGradientMatching(net, C, G)(real, labels, groups, syn, bad)
    with pytest.raises(TypeError, match="no model"):
        FairGradientMatching(None, C, G)(real, labels, groups, syn, syn_labels)
    with pytest.raises(ValueError, match="metric"):
        FairGradientMatching(net, C, G, metric="l2")
    bn = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, C)).double()
    with pytest.raises(ValueError, match="BatchNorm"):
        FairGradientMatching(bn, C, G)(real, labels, groups, syn, syn_labels)


@pytest.mark.parametrize("objective", ["fairdd", "cobra", "fairdd-groupdro"])
def test_gradient_matching_compact_equals_dense(objective, monkeypatch):
    """Only the segments present (the default) = every C x G segment."""
    from fastfair.distill import dc

    net = tiny_net(2)
    real, labels, groups, syn, syn_labels = dc_batch(2)
    matcher = FairGradientMatching(net, C, G, objective, reduction="none")
    compact = matcher(real, labels, groups, syn, syn_labels)
    compact_groups = matcher.last_terms.per_group
    monkeypatch.setattr(dc, "COMPACT_SEGMENTS", False)
    dense = matcher(real, labels, groups, syn, syn_labels)
    torch.testing.assert_close(compact, dense, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(compact_groups, matcher.last_terms.per_group, rtol=1e-11, atol=1e-12)
    g_c = torch.autograd.grad(compact.sum(), syn)[0]
    g_d = torch.autograd.grad(dense.sum(), syn)[0]
    torch.testing.assert_close(g_c, g_d, rtol=1e-10, atol=1e-12)
