"""DC matches a block of classes at a time (``DistillConfig.dc_block_classes``):
the loss and the image gradient equal those of matching all classes at once,
and by default a block holds as many classes as the free memory allows (one
block when all segment gradients fit)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastfair import data, distill, pergroup
from fastfair.distill import dc
from fastfair.distill.context import build_context
from fastfair.nets import get_network
from fastfair.objectives import dc_matching_loss, dc_matching_terms
from fastfair.pergroup import class_gradients, segment_gradients

OPTS = {"num_classes": 3, "num_groups": 3, "image_size": 8, "n_per_class": 30}


def _context(objective: str, metric: str, block: int | None) -> distill.context.RunContext:
    ds = data.load("synthetic", bias_ratio=0.8, **OPTS)
    cfg = distill.config.resolve(distill.DistillConfig(
        dataset="synthetic", method="dc", objective=objective, ipc=2, iterations=1, dc_metric=metric,
        dc_block_classes=block, extra={"data_options": OPTS}))
    return build_context(cfg, ds, torch.device("cpu"))


@pytest.mark.parametrize("objective,metric", [("fairdd", "ours"), ("cobra", "ours"), ("vanilla", "ours"),
                                              ("fairdd", "cos"), ("fairdd", "mse"), ("fairdd-groupdro", "ours")])
@pytest.mark.parametrize("block", [1, 2, None])
def test_blocked_matching_equals_all_classes_at_once(objective: str, metric: str, block: int | None) -> None:
    torch.manual_seed(7)
    ctx = _context(objective, metric, block)
    C, G = ctx.num_classes, ctx.num_groups
    net = get_network("ConvNet", 3, C, 8, width=5, depth=2).double()
    # Class 1 has no real rows; class 0 lacks group 2; odd class sizes.
    sizes = [7, 0, 5]
    labels = torch.tensor([0] * 7 + [2] * 5)
    groups = torch.tensor([0, 1, 0, 1, 1, 0, 1] + [2, 0, 1, 2, 2])
    real = torch.randn(12, 3, 8, 8, dtype=torch.float64)
    seg = labels * G + groups
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    syn_labels = torch.arange(C).repeat_interleave(2)

    syn_grads = class_gradients(net, x * 1.5, syn_labels, C, create_graph=True)
    loss, grad = dc._blocked_matching(ctx, net, real, labels, seg, G, sizes, syn_grads, x)

    real_grads = segment_gradients(net, real, labels, seg, C * G)
    counts = torch.bincount(seg, minlength=C * G)
    syn_ref = class_gradients(net, x * 1.5, syn_labels, C, create_graph=True)
    want = dc_matching_loss(real_grads, counts, syn_ref, G, objective=objective, metric=metric)
    (want_grad,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)
    assert grad.abs().sum() > 0


def _spy_widths(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    # The dense layout: every block's width is classes x groups (the compact
    # one passes only the segments present: test_compact_layout_*).
    monkeypatch.setattr(dc, "COMPACT_SEGMENTS", False)
    widths: list[int] = []
    real_fn = pergroup.segment_gradients

    def spy(model, inputs, labels, ids, num_segments, **kw):  # type: ignore[no-untyped-def]
        widths.append(num_segments)
        return real_fn(model, inputs, labels, ids, num_segments, **kw)

    monkeypatch.setattr(pergroup, "segment_gradients", spy)
    return widths


def _blocking_config() -> tuple[distill.DistillConfig, object]:
    opts = {"num_classes": 4, "num_groups": 2, "image_size": 8, "n_per_class": 24}
    ds = data.load("synthetic", bias_ratio=0.8, **opts)
    cfg = distill.DistillConfig(dataset="synthetic", method="dc", objective="fairdd", ipc=1, width=4, depth=1,
                                batch_real=6, outer_loop=1, inner_loop=1, iterations=1,
                                extra={"data_options": opts})
    return cfg, ds


def test_default_blocking_is_one_block_when_the_segment_gradients_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    widths = _spy_widths(monkeypatch)
    cfg, ds = _blocking_config()
    distill.run(cfg, ds, device="cpu", progress=False)
    assert widths == [8]  # 4 classes x 2 groups in one block: a few KB fit anywhere
    widths.clear()
    distill.run(dataclasses.replace(cfg, dc_block_classes=2), ds, device="cpu", progress=False)
    assert widths == [4, 4]  # --dc-block-classes still decides when given
    widths.clear()
    distill.run(dataclasses.replace(cfg, objective="vanilla"), ds, device="cpu", progress=False)
    assert widths == [4]  # vanilla matches the class gradient: one segment per class


def test_default_blocking_follows_the_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    widths = _spy_widths(monkeypatch)
    cfg, ds = _blocking_config()
    net_bytes = 4 * sum(p.numel() for p in get_network("ConvNet", 3, 4, 8, width=4, depth=1).parameters())
    # Free memory for exactly one class's 2 segment gradients (x LIVE_COPIES, in MEMORY_SHARE).
    one_class = 2 * net_bytes * dc.LIVE_COPIES / dc.MEMORY_SHARE
    monkeypatch.setattr(dc, "free_memory_bytes", lambda device: int(one_class) + 1)
    distill.run(cfg, ds, device="cpu", progress=False)
    assert widths == [2, 2, 2, 2]


def test_block_classes_rule() -> None:
    mb = 1 << 20
    # C = G = 10, width-128 ConvNet (1.3 MB of float32 parameters): 100 segments x 4 copies = 0.5 GB.
    assert dc.block_classes(None, 10, 10, int(1.3 * mb), 141 << 30) == 10  # an H200: one block
    assert dc.block_classes(None, 10, 10, int(1.3 * mb), 8 << 30) == 10    # a laptop: one block
    # C = 100, G = 100 (intersectional): 10^4 segments x 1.3 MB x 4 = 52 GB.
    assert dc.block_classes(None, 100, 100, int(1.3 * mb), 24 << 30) == 11
    assert dc.block_classes(None, 100, 100, int(1.3 * mb), 141 << 30) == 69
    assert dc.block_classes(None, 10, 1000, int(1.3 * mb), 1 << 30) == 1   # never fewer than one class
    assert dc.block_classes(3, 10, 100, int(1.3 * mb), 141 << 30) == 3     # an explicit size wins


@pytest.mark.parametrize("method", ["dc", "idc", "dream"])
def test_block_size_does_not_change_the_synthetic_set(method: str) -> None:
    ds = data.load("synthetic", bias_ratio=0.8, **OPTS)
    base = distill.DistillConfig(dataset="synthetic", method=method, objective="fairdd", ipc=2, width=8, depth=2,
                                 batch_real=12, outer_loop=2, inner_loop=1, iterations=2, log_every=1,
                                 dream_pool=24, dream_interval=1, extra={"data_options": OPTS})
    whole = distill.run(dataclasses.replace(base, dc_block_classes=3), ds, device="cpu", progress=False)
    blocked = distill.run(dataclasses.replace(base, dc_block_classes=2), ds, device="cpu", progress=False)
    torch.testing.assert_close(blocked.images, whole.images, rtol=1e-5, atol=1e-5)


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="dc_block_classes"):
        distill.config.resolve(distill.DistillConfig(dc_block_classes=0))


def test_vanilla_class_segments_equal_pooled_group_segments() -> None:
    # The driver matches vanilla DC with one segment per class; the pooled
    # target of C x G segments (what it did before) is the same gradient.
    torch.manual_seed(3)
    ctx = _context("vanilla", "ours", None)
    C, G = ctx.num_classes, ctx.num_groups
    net = get_network("ConvNet", 3, C, 8, width=5, depth=2).double()
    sizes = [6, 4, 5]
    labels = torch.arange(C).repeat_interleave(torch.tensor(sizes))
    groups = torch.randint(0, G, (15,))
    real = torch.randn(15, 3, 8, 8, dtype=torch.float64)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    syn_labels = torch.arange(C).repeat_interleave(2)
    out = []
    for seg, g in ((labels * G + groups, G), (labels, 1)):
        syn_grads = class_gradients(net, x * 1.5, syn_labels, C, create_graph=True)
        out.append(dc._blocked_matching(ctx, net, real, labels, seg, g, sizes, syn_grads, x))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("objective", ["fairdd", "fairdd-mean", "fairdd-iw", "fairdd-ldam", "fairdd-groupdro",
                                       "cobra", "vanilla"])
@pytest.mark.parametrize("metric", ["ours", "mse", "cos"])
def test_compact_layout_equals_the_dense_one(objective: str, metric: str) -> None:
    """dc_matching_terms over only the listed segments = over all C x G with
    the others' gradients zero: loss, per-group terms and image gradient."""
    torch.manual_seed(3)
    C, G = 4, 5
    counts = torch.randint(0, 4, (C * G,))
    counts[5:10] = 0  # class 1 has no real row
    counts[12] = 0
    present = torch.nonzero(counts).flatten()
    shapes = [(3, 2, 3, 3), (3,), (4, 6)]
    rows = [torch.randn(len(present), *s, dtype=torch.float64) for s in shapes]
    dense = [torch.zeros(C * G, *s, dtype=torch.float64).index_copy(0, present, r) for r, s in zip(rows, shapes)]
    syn = [torch.randn(C, *s, dtype=torch.float64, requires_grad=True) for s in shapes]
    want = dc_matching_terms(dense, counts, syn, G, objective, metric, group_terms=True)
    got = dc_matching_terms(rows, counts, syn, G, objective, metric, group_terms=True, segments=present)
    torch.testing.assert_close(got.per_class, want.per_class, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.per_group, want.per_group, rtol=1e-12, atol=1e-12)
    g_want = torch.autograd.grad(want.per_class.sum(), syn, allow_unused=True, materialize_grads=True)
    g_got = torch.autograd.grad(got.per_class.sum(), syn, allow_unused=True, materialize_grads=True)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    assert float(got.per_class.detach().abs().sum()) > 0


def test_compact_layout_refuses_unsorted_or_outside_segments() -> None:
    syn = [torch.randn(2, 3, 4)]
    counts = torch.ones(6, dtype=torch.long)
    for bad in ([2, 1], [0, 0], [0, 6], [-1, 2]):
        with pytest.raises(ValueError, match="strictly increasing"):
            dc_matching_terms([torch.randn(2, 3, 4)], counts, syn, 3, segments=torch.tensor(bad))
    with pytest.raises(ValueError, match="does not match 3 segments"):
        dc_matching_terms([torch.randn(2, 3, 4)], counts, syn, 3, segments=torch.tensor([0, 1, 4]))


def test_compact_layout_passes_only_the_segments_present(monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's DC computes gradients of the present segments only, and
    its images equal those of the dense layout."""
    widths: list[int] = []
    used: list[int] = []
    real_fn = pergroup.segment_gradients

    def spy(model, inputs, labels, ids, num_segments, **kw):  # type: ignore[no-untyped-def]
        widths.append(num_segments)
        used.append(torch.unique(ids).numel())
        return real_fn(model, inputs, labels, ids, num_segments, **kw)

    monkeypatch.setattr(pergroup, "segment_gradients", spy)
    opts = {"num_classes": 4, "num_groups": 6, "image_size": 8, "n_per_class": 24}
    ds = data.load("synthetic", bias_ratio=0.9, **opts)
    cfg = distill.DistillConfig(dataset="synthetic", method="dc", objective="fairdd", ipc=1, width=4, depth=1,
                                batch_real=4, outer_loop=2, inner_loop=1, iterations=2,
                                extra={"data_options": opts})
    compact = distill.run(cfg, ds, device="cpu", progress=False)
    assert widths and all(w < 4 * 6 for w in widths)  # 4 rows per class cannot fill 6 groups
    assert used == widths  # every segment passed holds rows
    monkeypatch.setattr(dc, "COMPACT_SEGMENTS", False)
    widths.clear()
    dense = distill.run(cfg, ds, device="cpu", progress=False)
    assert widths == [4 * 6] * len(widths)
    torch.testing.assert_close(compact.images, dense.images, rtol=1e-5, atol=1e-6)


def test_compact_blocking_counts_at_most_one_segment_per_real_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """With 50 groups and 4 real rows a class, a class holds <= 4 present
    segments: the memory that fits 4 segments of every class makes one block
    (the dense layout, 50 segments a class, needs one block per class)."""
    opts = {"num_classes": 4, "num_groups": 50, "image_size": 8, "n_per_class": 24}
    ds = data.load("synthetic", bias_ratio=0.5, **opts)
    cfg = distill.config.resolve(distill.DistillConfig(
        dataset="synthetic", method="dc", objective="fairdd", ipc=1, width=4, depth=1, batch_real=4,
        extra={"data_options": opts}))
    ctx = build_context(cfg, ds, torch.device("cpu"))
    net = get_network("ConvNet", 3, 4, 8, width=4, depth=1)
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    fits = int(4 * 4 * param_bytes * dc.LIVE_COPIES / dc.MEMORY_SHARE)  # 4 classes x 4 segments
    monkeypatch.setattr(dc, "free_memory_bytes", lambda device: fits)
    assert dc.auto_block_classes(ctx, net, 50) == 4
    ctx.cache.clear()
    monkeypatch.setattr(dc, "COMPACT_SEGMENTS", False)
    assert dc.auto_block_classes(ctx, net, 50) == 1
