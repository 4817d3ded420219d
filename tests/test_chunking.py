"""Real batches processed in chunks (``segment_gradients(chunk=)``,
``DistillConfig.real_chunk``) give the one-pass result: the per-segment sums
of the chunks add up before the division by the counts."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fastfair import data, distill
from fastfair.nets import get_network
from fastfair import pergroup
from fastfair.distill.context import build_context
from fastfair.pergroup import auto_chunk, segment_gradients


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    # The conv biases in front of instance norm get (numerically) zero
    # gradients, about 1e-16 in float64: a floor of 1e-4 (far below every
    # other parameter's gradient norm here) keeps their rounding noise out.
    return float((a - b).norm() / max(b.norm().item(), 1e-4))


@pytest.mark.parametrize("chunk", [1, 5, 16, 23, 1000])
def test_chunked_segment_gradients_equal_one_pass(chunk: int) -> None:
    torch.manual_seed(chunk)
    net = get_network("ConvNet", 3, 4, 16, width=6, depth=2).double()
    n, s = 23, 7
    x = torch.randn(n, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 4, (n,))
    ids = torch.randint(0, s - 1, (n,))  # segment s-1 stays empty
    ids[0] = 3
    full = segment_gradients(net, x, y, ids, s)
    part = segment_gradients(net, x, y, ids, s, chunk=chunk)
    for a, b in zip(part, full):
        assert a.shape == b.shape
        assert _rel(a, b) <= 1e-9
        assert torch.all(a[s - 1] == 0)
    # and both are the per-segment autograd gradients
    params = list(net.parameters())
    m = ids == 3
    ref = torch.autograd.grad(F.cross_entropy(net(x[m]), y[m]), params)
    for a, r in zip(part, ref):
        assert _rel(a[3], r) <= 1e-9


def test_auto_chunk_on_cpu_equals_one_pass() -> None:
    # 3 x 64 x 64 inputs: "auto" takes 10 rows per pass on a CPU, so 29 rows
    # with unsorted segment ids go in three passes over sorted rows.
    torch.manual_seed(0)
    net = get_network("ConvNet", 3, 4, 64, width=4, depth=2).double()
    n, s = 29, 9
    x = torch.randn(n, 3, 64, 64, dtype=torch.float64)
    y = torch.randint(0, 4, (n,))
    ids = torch.randint(1, s, (n,))  # segment 0 stays empty
    assert auto_chunk(net, x) == 10
    auto = segment_gradients(net, x, y, ids, s)  # the default is "auto"
    full = segment_gradients(net, x, y, ids, s, chunk=None)
    for a, b in zip(auto, full):
        assert _rel(a, b) <= 1e-9
        assert torch.all(a[0] == 0)


@pytest.mark.parametrize("present", [(0, 3, 7), (2, 5), (8,)])
def test_chunks_with_empty_segments_between_them(present: tuple[int, ...]) -> None:
    # Chunks of 2 sorted rows: empty segments lie before, between and after
    # the chunks' segment ranges, and a segment spans several chunks.
    torch.manual_seed(len(present))
    net = get_network("ConvNet", 3, 4, 16, width=4, depth=1).double()
    ids = torch.tensor(present).repeat(5)[torch.randperm(5 * len(present))]
    x = torch.randn(ids.numel(), 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 4, (ids.numel(),))
    full = segment_gradients(net, x, y, ids, 9, chunk=None)
    part = segment_gradients(net, x, y, ids, 9, chunk=2)
    absent = [k for k in range(9) if k not in present]
    for a, b in zip(part, full):
        assert _rel(a, b) <= 1e-9
        assert torch.all(a[absent] == 0)


def test_merge_rows_writes_every_row_once() -> None:
    # The accumulator starts uninitialised (NaN here): rows are copied,
    # added where chunks share a segment, and zeroed where none had one.
    total = torch.full((8, 2), float("nan"))
    pergroup._merge_rows(total, 0, 1, torch.ones(2, 2))      # segments 1, 2; 0 zeroed
    pergroup._merge_rows(total, 3, 2, torch.full((3, 2), 2.0))  # shares segment 2; 3, 4 new
    pergroup._merge_rows(total, 5, 6, torch.full((1, 2), 5.0))  # 5 zeroed, 6 new
    want = torch.tensor([0.0, 1.0, 3.0, 2.0, 2.0, 0.0, 5.0]).unsqueeze(1).expand(7, 2)
    torch.testing.assert_close(total[:7], want)
    assert total[7].isnan().all()  # rows past the last chunk: the caller zeroes them


def test_auto_chunk_keeps_coupled_batches_whole() -> None:
    x = torch.randn(50, 3, 64, 64)
    bn = get_network("ConvNet", 3, 4, 64, width=4, depth=1, norm="batchnorm")
    assert auto_chunk(bn.train(), x) == 50  # batch statistics would change with the chunk
    assert auto_chunk(bn.eval(), x) == 10
    assert auto_chunk(bn.eval(), x[:0]) == 1
    assert auto_chunk(bn.eval(), torch.randn(3000, 3, 4, 4)) == pergroup._CPU_AUTO_INPUT_ELEMS // 48
    assert auto_chunk(bn.eval(), torch.randn(7, 3, 4, 4)) == 7  # never more than the rows


def test_auto_chunk_on_an_accelerator_bounds_the_pass() -> None:
    # A meta tensor stands in for a GPU batch: auto_chunk only reads its
    # device type and shape. 25600 images at 64 px (an ImageNet subset's real
    # batch) go 1365 at a time; a small batch stays one pass.
    net = get_network("ConvNet", 3, 4, 64, width=4, depth=1)
    big = torch.empty(25600, 3, 64, 64, device="meta")
    assert auto_chunk(net, big) == (1 << 24) // (3 * 64 * 64) == 1365
    assert auto_chunk(net, torch.empty(2560, 3, 32, 32, device="meta")) == 2560
    assert auto_chunk(net.train(), torch.empty(0, 3, 64, 64, device="meta")) == 1


def test_embed_real_follows_the_chunk_rule() -> None:
    ds = data.load("synthetic", bias_ratio=0.8, **OPTS)
    cfg = distill.config.resolve(distill.DistillConfig(method="dm", ipc=1, iterations=1))
    ctx = build_context(cfg, ds, torch.device("cpu"))
    net = get_network("ConvNet", 3, 3, 8, width=4, depth=1)
    real = torch.randn(11, 3, 8, 8)
    calls: list[int] = []
    embed = net.embed
    net.embed = lambda t: (calls.append(t.shape[0]), embed(t))[1]  # type: ignore[method-assign]
    full = ctx.embed_real(net, real)
    assert calls == [11]  # 8x8 inputs: one auto block holds all 11 rows
    ctx.cfg = dataclasses.replace(cfg, real_chunk=4)
    calls.clear()
    torch.testing.assert_close(ctx.embed_real(net, real), full)
    assert calls == [4, 4, 3]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "all"])
def test_bad_chunk_is_refused(bad: object) -> None:
    net = get_network("ConvNet", 3, 4, 16, width=4, depth=1)
    x, y = torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="chunk"):
        segment_gradients(net, x, y, y, 1, chunk=bad)  # type: ignore[arg-type]


OPTS = {"num_classes": 3, "num_groups": 3, "image_size": 8, "n_per_class": 30}


@pytest.mark.parametrize("method", ["dm", "dc"])
def test_real_chunk_gives_the_one_pass_synthetic_set(method: str) -> None:
    ds = data.load("synthetic", bias_ratio=0.8, **OPTS)
    base = distill.DistillConfig(dataset="synthetic", method=method, objective="fairdd", ipc=2, width=8, depth=2,
                                 batch_real=12, outer_loop=2, inner_loop=1, iterations=2, log_every=1,
                                 extra={"data_options": OPTS})
    one = distill.run(base, ds, device="cpu", progress=False)
    chunked = distill.run(dataclasses.replace(base, real_chunk=5), ds, device="cpu", progress=False)
    torch.testing.assert_close(chunked.images, one.images, rtol=1e-5, atol=1e-5)


def test_real_chunk_must_be_positive() -> None:
    with pytest.raises(ValueError, match="real_chunk"):
        distill.config.resolve(distill.DistillConfig(real_chunk=0))


@pytest.mark.parametrize("chunk", [None, "auto", 3])
def test_empty_batch_gives_zero_segment_gradients(chunk: object) -> None:
    net = get_network("ConvNet", 3, 4, 8, width=4, depth=1)
    x, y = torch.randn(0, 3, 8, 8), torch.zeros(0, dtype=torch.long)
    grads = segment_gradients(net, x, y, y, 5, chunk=chunk)  # type: ignore[arg-type]
    params = [p for p in net.parameters() if p.requires_grad]
    assert len(grads) == len(params)
    for g, p in zip(grads, params):
        assert g.shape == (5, *p.shape) and torch.all(g == 0)


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("use_dsa", [True, False])
def test_embed_real_augmented_equals_embedding_the_augmented_batch(chunk: int, use_dsa: bool) -> None:
    ds = data.load("synthetic", bias_ratio=0.8, **OPTS)
    cfg = distill.config.resolve(distill.DistillConfig(method="dm", ipc=1, iterations=1, real_chunk=chunk,
                                                       dsa=use_dsa))
    ctx = build_context(cfg, ds, torch.device("cpu"))
    net = get_network("ConvNet", 3, 3, 8, width=4, depth=1)
    sizes = [5, 0, 6]  # an empty class; chunks straddle classes
    real = torch.randn(11, 3, 8, 8)
    offsets = [2, 0, 1]
    want = ctx.embed_real(net, ctx.augment_real(real, sizes, 4, 9, real_offsets=offsets))
    got = ctx.embed_real_augmented(net, real, sizes, 4, 9, real_offsets=offsets)
    assert torch.equal(got, want)
    aug, _ = ctx.siamese(real, sizes, torch.randn(3, 3, 8, 8), 4, 9, real_offsets=offsets)
    assert torch.equal(aug, ctx.augment_real(real, sizes, 4, 9, real_offsets=offsets))
    if use_dsa:  # a different iteration draws other transforms
        assert not torch.equal(got, ctx.embed_real_augmented(net, real, sizes, 5, 9, real_offsets=offsets))


def test_augmenting_a_block_of_classes_equals_those_rows_of_the_whole_batch() -> None:
    ds = data.load("synthetic", bias_ratio=0.8, **OPTS)
    # DC distils without DSA by default (the papers' protocol): ask for it.
    cfg = distill.config.resolve(distill.DistillConfig(method="dc", ipc=1, iterations=1, dsa=True))
    ctx = build_context(cfg, ds, torch.device("cpu"))
    sizes, offsets = [4, 3, 5], [0, 2, 1]
    real = torch.randn(12, 3, 8, 8)
    whole = ctx.augment_real(real, sizes, 3, 1, real_offsets=offsets)
    block = ctx.augment_real(real[4:], sizes[1:], 3, 1, real_offsets=offsets, first_class=1)
    assert torch.equal(block, whole[4:])
    assert not torch.equal(ctx.augment_real(real[4:], sizes[1:], 3, 1, real_offsets=offsets), whole[4:])
