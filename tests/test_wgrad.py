"""The grouped-GEMM weight gradients (fastfair/wgrad.py, the CUDA kernels of
the two ops) run here on CPU, where torch's grouped_mm exists too, against
float64 references; the one sort per segment_gradients call; the sync-free
synthetic class loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastfair import ops, pergroup, wgrad
from fastfair.nets import get_network

compiled = pytest.mark.skipif(ops.backend() == "reference", reason="extension not built")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Relative to the largest entry: float32 products summed over <= 3000 steps,
# and bfloat16 operands (8 bits of mantissa) with a bfloat16 result.
REL = {"fp32": 2e-6, "tf32": 2e-6, "bf16": 2e-2}


# One thread: see conftest.one_thread.
pytestmark = pytest.mark.usefixtures("one_thread")


def ids_with_gaps(n: int, s: int, seed: int) -> torch.Tensor:
    """Unsorted ids in [0, s): segments 1 and s-1 empty, segment s-2 a singleton."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, s - 2, (n,), generator=g)
    ids[ids == 1] = 0
    if n > 2:
        ids[n // 2] = s - 2
    return ids


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = max(want.abs().max().item(), 1e-30)
    return (got.double().cpu() - want).abs().max().item() / scale


def conv_case(n, ci, co, h, w, ks, st, pd, dl, seed):  # noqa: ANN001, ANN201
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, ci, h, w, generator=g, dtype=torch.float64)
    oh = (h + 2 * pd[0] - dl[0] * (ks[0] - 1) - 1) // st[0] + 1
    ow = (w + 2 * pd[1] - dl[1] * (ks[1] - 1) - 1) // st[1] + 1
    return a, torch.randn(n, co, oh, ow, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("n,o,k,s", [(1, 1, 1, 3), (29, 5, 7, 9), (70, 33, 65, 6), (150, 4, 3, 200)])
def test_grouped_linear_matches_float64(precision, n, o, k, s):
    g = torch.Generator().manual_seed(n * o)
    b = torch.randn(n, o, generator=g, dtype=torch.float64)
    a = torch.randn(n, k, generator=g, dtype=torch.float64)
    ids = ids_with_gaps(n, s, seed=n)
    want = ops._segment_linear_weight_grad_reference(b, a, ids, s)
    got = wgrad.grouped_linear_weight_grad(b.float(), a.float(), ids, s, precision)
    assert got.shape == (s, o, k) and got.dtype == torch.float32 and got.is_contiguous()
    assert rel_err(got, want) <= REL[precision]
    empty = torch.bincount(ids, minlength=s) == 0
    assert (got[empty] == 0).all()


CONV = [  # kernel, stride, padding, dilation, H, W
    ((3, 3), (1, 1), (1, 1), (1, 1), 8, 8),
    ((3, 2), (2, 1), (1, 0), (1, 2), 9, 7),
    ((1, 1), (2, 2), (0, 0), (1, 1), 5, 6),
    ((5, 3), (1, 3), (2, 4), (2, 1), 11, 10),
]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("case", CONV)
def test_grouped_conv_matches_float64(precision, case):
    ks, st, pd, dl, h, w = case
    n, ci, co, s = 23, 3, 5, 8
    a, b = conv_case(n, ci, co, h, w, ks, st, pd, dl, seed=h * w)
    ids = ids_with_gaps(n, s, seed=h)
    want = ops._segment_conv2d_weight_grad_reference(b, a, ids, s, ks, st, pd, dl)
    got = wgrad.grouped_conv2d_weight_grad(b.float(), a.float(), ids, s, ks, st, pd, dl, precision)
    assert got.shape == (s, co, ci, *ks) and got.is_contiguous()
    assert rel_err(got, want) <= REL[precision]
    assert (got[1] == 0).all() and (got[-1] == 0).all()


@pytest.mark.parametrize("op", ["linear", "conv"])
def test_per_segment_vendor_path_matches_float64(op):
    s = 9
    ids = ids_with_gaps(31, s, seed=6)
    if op == "linear":
        b, a = torch.randn(31, 5, dtype=torch.float64), torch.randn(31, 8, dtype=torch.float64)
        want = ops._segment_linear_weight_grad_reference(b, a, ids, s)
        got = wgrad.per_segment_weight_grad(b.float(), a.float(), ids, s)
    else:
        geo = ((3, 2), (2, 1), (1, 0), (1, 2))
        a, b = conv_case(31, 3, 4, 9, 7, *geo, seed=8)
        want = ops._segment_conv2d_weight_grad_reference(b, a, ids, s, *geo)
        got = wgrad.per_segment_weight_grad(b.float(), a.float(), ids, s, geo)
    assert got.shape == want.shape and rel_err(got, want) <= REL["fp32"]
    assert (got[1] == 0).all() and (got[-1] == 0).all()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_grouped_conv_many_segments_chunks_and_splits(monkeypatch, precision):
    # Tiny budgets force several row chunks (each adding all S sums) and
    # several sub-ranges per segment (the split-K of small G).
    ks, st, pd, dl = (3, 3), (1, 1), (1, 1), (1, 1)
    a, b = conv_case(61, 4, 6, 7, 7, ks, st, pd, dl, seed=3)
    for s, ids in ((40, ids_with_gaps(61, 40, seed=4)), (2, torch.zeros(61, dtype=torch.long))):
        want = ops._segment_conv2d_weight_grad_reference(b, a, ids, s, ks, st, pd, dl)
        monkeypatch.setattr(wgrad, "_COLS_ELEMS", 49 * 40 * 7)  # 7 rows per chunk
        monkeypatch.setattr(wgrad, "_MIN_SPLIT_STEPS", 16)
        assert (wgrad._splits(s, 7 * 49, 6, 36) > 1) == (s == 2)
        got = wgrad.grouped_conv2d_weight_grad(b.float(), a.float(), ids, s, ks, st, pd, dl, precision)
        assert rel_err(got, want) <= REL[precision]
        monkeypatch.undo()


def test_sub_ends_cut_each_segment_evenly():
    ends = torch.tensor([3, 3, 10], dtype=torch.int32)
    # rows [2, 8) of a chunk, 2 positions per row, 2 splits per segment
    got = wgrad._sub_ends(ends, 2, 6, 2, 2).tolist()
    assert got == [1, 2, 2, 2, 7, 12]


@pytest.mark.parametrize("op", ["linear", "conv"])
def test_sorted_layout_fast_path_equals_sorting(op, monkeypatch):
    # Inside sorted_segments the call skips its sort and uses the shared ends;
    # the result equals the unsorted call's.
    s = 7
    ids = ids_with_gaps(40, s, seed=9)
    order = torch.argsort(ids, stable=True)
    if op == "linear":
        b, a = torch.randn(40, 6), torch.randn(40, 10)
        run = lambda b, a, i: wgrad.grouped_linear_weight_grad(b, a, i, s)  # noqa: E731
    else:
        a, b = (t.float() for t in conv_case(40, 3, 4, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), seed=2))
        run = lambda b, a, i: wgrad.grouped_conv2d_weight_grad(b, a, i, s, (3, 3), (1, 1), (1, 1), (1, 1))  # noqa: E731
    unsorted = run(b, a, ids)
    sids = ids[order]
    seen = []
    real_layout = wgrad._layout
    monkeypatch.setattr(wgrad, "_layout", lambda i, n: seen.append(real_layout(i, n)[0] is None) or real_layout(i, n))
    with wgrad.sorted_segments(wgrad.SegmentLayout.of_sorted(sids, s)):
        fast = run(b[order], a[order], sids)
        other = run(b[order], a[order], sids.clone())  # another tensor: no hint, sorts itself
    assert seen == [True, False]
    torch.testing.assert_close(fast, unsorted, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(other, fast, rtol=0, atol=0)


def test_out_of_range_ids_are_skipped_not_fatal():
    b, a = torch.randn(12, 3), torch.randn(12, 5)
    ids = torch.tensor([0, 1, 7, 1, -1, 0, 2, 2, 9, 0, 1, 2])
    ok = (ids >= 0) & (ids < 3)
    want = ops._segment_linear_weight_grad_reference(b[ok].double(), a[ok].double(), ids[ok], 3)
    got = wgrad.grouped_linear_weight_grad(b, a, ids, 3)
    assert rel_err(got, want) <= REL["fp32"]


def test_precision_setting():
    assert wgrad.get_weight_grad_precision() in wgrad.PRECISIONS
    with ops.weight_grad_precision("bf16"):
        assert ops.get_weight_grad_precision() == "bf16"
    with pytest.raises(ValueError, match="precision"):
        ops.set_weight_grad_precision("fp8")


# ---------------------------------------------------------------------------
# pergroup: one sort per call; class loop without per-class host reads.


@pytest.mark.parametrize("chunk", [None, 7])
def test_segment_gradients_independent_of_row_order(device, chunk):
    torch.manual_seed(0)
    model = get_network("ConvNet", 3, 4, 16, width=8, depth=2).double().to(device)
    x = torch.randn(33, 3, 16, 16, dtype=torch.float64, device=device)
    y = torch.randint(0, 4, (33,), device=device)
    ids = (y * 3 + torch.randint(0, 3, (33,), device=device)).clamp(max=10)
    perm = torch.randperm(33, device=device)
    one = pergroup.segment_gradients(model, x, y, ids, 12, chunk=chunk)
    two = pergroup.segment_gradients(model, x[perm], y[perm], ids[perm], 12, chunk=chunk)
    for p, q in zip(one, two):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_class_gradients_class_sizes_equal_label_loop():
    torch.manual_seed(1)
    model = get_network("ConvNet", 3, 4, 16, width=8, depth=2).double()
    x = torch.randn(12, 3, 16, 16, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 2, 2, 2, 2, 3, 3, 3, 3, 3])  # class 1 empty
    sized = pergroup.class_gradients(model, x, labels, 4, create_graph=False, class_sizes=[3, 0, 4, 5])
    perm = torch.randperm(12)
    shuffled = pergroup.class_gradients(model, x[perm], labels[perm], 4, create_graph=False)
    params = list(model.parameters())
    for c in range(4):
        m = labels == c
        want = ([torch.zeros_like(p) for p in params] if not m.any() else
                torch.autograd.grad(F.cross_entropy(model(x[m]), labels[m]), params))
        for k, w in enumerate(want):
            torch.testing.assert_close(sized[k][c], w, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(shuffled[k][c], w, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="class_sizes"):
        pergroup.class_gradients(model, x, labels, 4, class_sizes=[3, 4, 5])
    with pytest.raises(ValueError, match="class_sizes"):
        pergroup.class_gradients(model, x, labels, 4, class_sizes=[3, 1, 4, 5])


# ---------------------------------------------------------------------------
# CUDA: the registered kernels, the SIMT kernel by name, no host syncs.


@cuda
@compiled
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "cudnn", "simt"])
def test_cuda_ops_per_precision(precision):
    ks, st, pd, dl = (3, 3), (1, 1), (1, 1), (1, 1)
    a, b = conv_case(45, 8, 16, 12, 12, ks, st, pd, dl, seed=1)
    ids = ids_with_gaps(45, 9, seed=2)
    want = ops._segment_conv2d_weight_grad_reference(b, a, ids, 9, ks, st, pd, dl)
    want_lin = ops._segment_linear_weight_grad_reference(b.flatten(1), a.flatten(1)[:, :100], ids, 9)
    # cudnn follows torch.backends.cudnn.allow_tf32 (on by default): TF32's error.
    rel = {"fp32": 1e-5, "tf32": 5e-3, "bf16": 2e-2, "cudnn": 5e-3, "simt": 1e-5}[precision]
    with ops.weight_grad_precision(precision):
        for dtype in (torch.float32, torch.bfloat16):
            got = ops.segment_conv2d_weight_grad(b.cuda().to(dtype), a.cuda().to(dtype), ids.cuda(), 9, ks, st, pd, dl)
            assert got.dtype == dtype and got.is_contiguous()
            assert rel_err(got, want) <= max(rel, 2e-2 if dtype == torch.bfloat16 else 0)
            assert (got[1] == 0).all() and (got[-1] == 0).all()
        got = ops.segment_linear_weight_grad(b.flatten(1).cuda().float(), a.flatten(1)[:, :100].cuda().float(),
                                             ids.cuda(), 9)
        assert rel_err(got, want_lin) <= rel
        got64 = ops.segment_conv2d_weight_grad(b.cuda(), a.cuda(), ids.cuda(), 9, ks, st, pd, dl)
        assert rel_err(got64, want) <= 1e-12  # float64 takes the SIMT kernel


@cuda
@compiled
def test_cuda_bf16_sorted_path_has_no_host_sync():
    ks, st, pd, dl = (3, 3), (1, 1), (1, 1), (1, 1)
    a, b = (t.float().cuda() for t in conv_case(64, 8, 16, 8, 8, ks, st, pd, dl, seed=4))
    ids = torch.arange(64, device="cuda") // 7  # sorted, 10 segments
    layout = wgrad.SegmentLayout.of_sorted(ids, 10)
    with wgrad.sorted_segments(layout), ops.weight_grad_precision("bf16"), ops.validate_ids(False):
        # A recording op first, as segment_gradients runs one: its id-error
        # record is now pending, and nothing below may read it.
        ops.segment_sum(b.flatten(1), ids, 10)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ops.segment_conv2d_weight_grad(b, a, ids, 10, ks, st, pd, dl)
            ops.segment_linear_weight_grad(b.flatten(1), a.flatten(1), ids, 10)
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_weight_grad_argument_checks_read_no_device_error_record(monkeypatch):
    # The CPU twin of the test above: a CUDA kernel's id-error record is
    # pending (a recording op ran under validate_ids(False)); the per-layer
    # checks of the weight-gradient kernels must not read it (each read is a
    # device-to-host sync on a GPU).
    reads = []
    monkeypatch.setattr(ops._checks, "_take_id_error", lambda dev: reads.append(dev))
    pending = torch.device("cuda", 0)
    monkeypatch.setattr(ops._checks, "_unchecked_devices", {pending})
    b, a = torch.randn(30, 4), torch.randn(30, 6)
    ids = ids_with_gaps(30, 6, seed=2)
    ops.weight_grad._check(b, a, ids, 6, "segment_linear_weight_grad", 2)
    ks = (3, 3)
    a4, b4 = conv_case(12, 2, 3, 5, 5, ks, (1, 1), (1, 1), (1, 1), seed=5)
    ops.weight_grad._check(b4.float(), a4.float(), torch.arange(12) % 4, 4, "segment_conv2d_weight_grad", 4,
                 (ks, (1, 1), (1, 1), (1, 1)))
    assert reads == [] and ops._checks._unchecked_devices == {pending}
    ops.raise_pending_errors()  # where the driver syncs anyway: read once
    assert reads == [pending]


def test_fallback_when_grouped_mm_refuses(monkeypatch):
    # An older torch refusing the dtype: one mm per group, the same result.
    b, a = torch.randn(30, 4), torch.randn(30, 6)
    ids = ids_with_gaps(30, 6, seed=1)
    want = wgrad.grouped_linear_weight_grad(b, a, ids, 6)

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("Expected mat_a to be BFloat16")

    monkeypatch.setattr(torch, "_grouped_mm", refuse)
    monkeypatch.setattr(wgrad, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="one mm per group"):
        got = wgrad.grouped_linear_weight_grad(b, a, ids, 6)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_fallback_names_the_group_limit_and_lets_other_errors_through(monkeypatch):
    b, a = torch.randn(30, 4), torch.randn(30, 6)
    ids = ids_with_gaps(30, 6, seed=3)
    want = wgrad.grouped_linear_weight_grad(b, a, ids, 6)
    monkeypatch.setattr(wgrad, "GROUPED_MM_MAX_GROUPS", 4)  # 6 segments: above the limit

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("grouped gemm is not supported for this many groups")

    monkeypatch.setattr(torch, "_grouped_mm", refuse)
    monkeypatch.setattr(wgrad, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="6 groups, above its limit of 4"):
        got = wgrad.grouped_linear_weight_grad(b, a, ids, 6)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for exc in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                RuntimeError("CUDA error: an illegal memory access was encountered")):
        def fail(*args, exc=exc, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise exc

        monkeypatch.setattr(torch, "_grouped_mm", fail)
        with pytest.raises(type(exc), match=str(exc).split(".")[0][:20]):
            wgrad.grouped_linear_weight_grad(b, a, ids, 6)


def test_deterministic_mode_without_cublas_workspace_refuses_in_one_line(monkeypatch):
    # The CUDA kernels' Python part (fastfair.ops.weight_grad._cuda_linear) on CPU tensors: the
    # refusal comes before any cuBLAS call.
    b, a = torch.randn(12, 4), torch.randn(12, 6)
    ids = torch.arange(12) % 3
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with ops.weight_grad_precision("fp32"):
            with pytest.raises(RuntimeError, match="CUBLAS_WORKSPACE_CONFIG=:4096:8.*'simt'") as info:
                ops.weight_grad._cuda_linear(b, a, ids, 3)
            assert "\n" not in str(info.value)
            monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            got = ops.weight_grad._cuda_linear(b, a, ids, 3)
    finally:
        torch.use_deterministic_algorithms(old)
    torch.testing.assert_close(got, wgrad.per_segment_weight_grad(b, a, ids, 3), rtol=1e-5, atol=1e-6)


def test_sorted_segment_sum_from_the_shared_layout_equals_segment_sum():
    # The bias / norm sums of segment_gradients reuse the pass's sorted layout
    # (no per-layer sort on GPUs); empty segments, a long one, odd sizes.
    ids = torch.tensor([0, 0, 0, 2, 2, 5, 5, 5, 5, 5, 6])
    x = torch.randn(11, 7, dtype=torch.float64)
    assert wgrad.sorted_segment_sum(x, ids, 8) is None  # no shared layout: the caller's segment_sum
    with wgrad.sorted_segments(wgrad.SegmentLayout.of_sorted(ids, 8)):
        got = wgrad.sorted_segment_sum(x, ids, 8)
        assert wgrad.sorted_segment_sum(x.half(), ids, 8) is None
        assert wgrad.sorted_segment_sum(x, ids.clone(), 8) is None  # another ids tensor: not this layout
    torch.testing.assert_close(got, ops.segment_sum(x, ids, 8), rtol=1e-12, atol=1e-12)
