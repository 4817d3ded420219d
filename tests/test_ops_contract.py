"""The op contract at the C++ boundary and on CUDA (issue 13 item 3, issue 16):
device and size checks of torch.ops.fastfair.* called directly, overflow-safe
conv geometry, out-of-range ids on CUDA (recorded on the device, raised by
fastfair.ops), the CPU twin of the CUDA segment tree."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastfair import ops

import segment_tree_twin as twin

compiled = pytest.mark.skipif(ops.backend() == "reference", reason="extension not built")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
cuda_kernels = pytest.mark.skipif(not torch.cuda.is_available() or ops.backend() != "cuda",
                                  reason="needs a CUDA GPU and the CUDA kernels")
F = torch.ops.fastfair if ops.backend() != "reference" else None


# ---------------------------------------------------------------------------
# C++ boundary, CPU (issue 13 item 3).


@compiled
@pytest.mark.parametrize("op", ["segment_sum", "segment_mean"])
def test_cpu_x_with_meta_ids_raises(op):
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match="device"):
        getattr(F, op)(x, torch.zeros(6, dtype=torch.long, device="meta"), 4)
    with pytest.raises(ValueError, match="device"):
        getattr(F, op)(x.to("meta"), torch.zeros(6, dtype=torch.long), 4)
    # All-meta is the fake kernel's shape inference, as before.
    out = getattr(F, op)(x.to("meta"), torch.zeros(6, dtype=torch.long, device="meta"), 4)
    assert out.device.type == "meta" and out.shape == (4, 3)


@compiled
def test_weight_grad_meta_ids_raise():
    b, a = torch.randn(5, 4), torch.randn(5, 3)
    meta_ids = torch.zeros(5, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="device"):
        F.segment_linear_weight_grad(b, a, meta_ids, 2)
    bc, ac = torch.randn(2, 4, 3, 3), torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match="device"):
        F.segment_conv2d_weight_grad(bc, ac, meta_ids[:2], 2, [3, 3], [1, 1], [0, 0], [1, 1])
    out = F.segment_linear_weight_grad(b.to("meta"), a.to("meta"), meta_ids, 2)
    assert out.device.type == "meta" and out.shape == (2, 4, 3)


@compiled
@pytest.mark.parametrize("geometry", [
    dict(dilation=[2**63 - 1, 1]),
    dict(dilation=[1, 2**62]),
    dict(padding=[2**62, 0]),
    dict(padding=[2**63 - 1, 2**63 - 1]),
    dict(kernel_size=[2**62, 3]),
])
def test_conv_geometry_overflow_raises(geometry):
    # grad_out [2, 4, 3, 3] is the output of a 3x3 conv of 5x5 inputs; none of
    # these geometries has such an output (before: the int64 span wrapped and
    # the kernel returned gradients).
    args = dict(kernel_size=[3, 3], stride=[1, 1], padding=[0, 0], dilation=[1, 1]) | geometry
    b, a = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    ids = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="does not match a convolution"):
        F.segment_conv2d_weight_grad(b, a, ids, 1, args["kernel_size"], args["stride"], args["padding"],
                                     args["dilation"])


@compiled
def test_conv_geometry_huge_but_valid_kernel_overflows_output():
    # kernel 2^31 x 2^31 with padding and stride so that the output is 1x1:
    # a consistent geometry whose weight gradient has 2^62 elements a segment.
    k, p = 2**31, 2**30
    b, a = torch.randn(1, 1, 1, 1), torch.randn(1, 1, 1, 1)
    with pytest.raises(ValueError, match="num_segments"):
        F.segment_conv2d_weight_grad(b, a, torch.zeros(1, dtype=torch.long), 4, [k, k], [2**40, 2**40], [p, p],
                                     [1, 1])


@compiled
@pytest.mark.parametrize("s", [2**62, 2**63 - 1])
def test_huge_num_segments_is_a_clear_error(s):
    x, ids = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    for call in (lambda: F.segment_sum(x, ids, s), lambda: F.segment_mean(x, ids, s),
                 lambda: F.segment_count(ids, s), lambda: ops.segment_sum(x, ids, s),
                 lambda: F.segment_linear_weight_grad(x, x, ids, s)):
        with pytest.raises(ValueError, match="num_segments"):
            call()


def test_num_segments_past_int64_is_a_value_error():
    x, ids = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="int64"):
        ops.segment_mean(x, ids, 2**63)
    with pytest.raises(ValueError, match="int64"):
        ops.segment_count(ids, 2**70)


@compiled
def test_cpu_kernel_error_names_row_and_value():
    x = torch.randn(8, 2)
    ids = torch.tensor([0, 1, 2, -3, 1, 9, 0, 0])
    with pytest.raises(ValueError, match=r"ids\[3\] = -3 is outside \[0, num_segments = 4\)"):
        F.segment_sum(x, ids, 4)
    with ops.validate_ids(False):  # CPU kernels raise at once whatever the setting
        with pytest.raises(ValueError, match=r"ids\[3\] = -3"):
            ops.segment_count(ids, 4)


@compiled
def test_take_id_error_on_cpu_has_nothing():
    assert list(F.take_id_error(torch.device("cpu"))) == [-1, 0, 0, 0]


# ---------------------------------------------------------------------------
# validate_ids / raise_pending_errors logic (device record faked, so it runs on CPU).


@pytest.fixture
def fake_cuda_record(monkeypatch):
    """A recorded error on a pretend CUDA device, taken like take_id_error."""
    state = {"msg": None, "taken": 0}

    def take(device):
        state["taken"] += 1
        msg, state["msg"] = state["msg"], None
        return msg

    # The id-error record lives in fastfair.ops._checks (the package's face re-exports functions only).
    monkeypatch.setattr(ops._checks, "_take_id_error", take)
    monkeypatch.setattr(ops._checks, "_unchecked_devices", set())
    return state


def test_validate_on_raises_right_after_the_call(fake_cuda_record):
    fake_cuda_record["msg"] = "segment_sum: ids[7] = 12 is outside [0, num_segments = 4)"
    with pytest.raises(ValueError, match=r"ids\[7\] = 12"):
        ops._after_kernel(torch.device("cuda", 0), "segment_sum")
    ops._after_kernel(torch.device("cuda", 0), "segment_sum")  # taken: nothing pending now
    ops._after_kernel(torch.device("cpu"), "segment_sum")
    assert fake_cuda_record["taken"] == 2


def test_validate_off_defers_to_raise_pending_errors(fake_cuda_record):
    with ops.validate_ids(False):
        fake_cuda_record["msg"] = "segment_mean: ids[0] = -1 is outside [0, num_segments = 4)"
        ops._after_kernel(torch.device("cuda", 0), "segment_sum")
        assert fake_cuda_record["taken"] == 0  # no sync inside the loop
        with pytest.raises(ValueError, match=r"ids\[0\] = -1"):
            ops.raise_pending_errors()
        ops.raise_pending_errors()  # nothing left, nothing read
        assert fake_cuda_record["taken"] == 1


def test_validate_off_raises_at_exit_at_the_latest(fake_cuda_record):
    with pytest.raises(ValueError, match="segment_count"):
        with ops.validate_ids(False):
            fake_cuda_record["msg"] = "segment_count: ids[2] = 5 is outside [0, num_segments = 4)"
            ops._after_kernel(torch.device("cuda", 0), "segment_sum")
    assert ops._checks._validate_ids is True


def test_validate_off_exit_keeps_the_body_exception(fake_cuda_record):
    with pytest.raises(KeyError):
        with ops.validate_ids(False):
            fake_cuda_record["msg"] = "segment_sum: ids[1] = 9 is outside [0, num_segments = 4)"
            ops._after_kernel(torch.device("cuda", 0), "segment_sum")
            raise KeyError("body")
    # Still pending: raised at the next check.
    with pytest.raises(ValueError, match=r"ids\[1\] = 9"):
        ops.raise_pending_errors()


def test_gather_rows_maps_bad_ids_to_zero_rows():
    grad = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 3, -1, 4, 2, 100])
    got = ops._gather_segment_rows(grad, ids, 4, ids_checked=False)
    want = torch.stack([grad[0], grad[3], torch.zeros(3), torch.zeros(3), grad[2], torch.zeros(3)])
    assert torch.equal(got, want)
    # Differentiable (double backward goes through it).
    got.sum().backward()
    assert torch.equal(grad.grad, torch.tensor([1.0, 0, 1, 1]).double().unsqueeze(1).expand(4, 3))


# ---------------------------------------------------------------------------
# CPU twin of the CUDA segment tree.


TWIN_CASES = [
    # (n, d, S, r0): one segment over many chunks (3 levels), many segments,
    # empty segments, chunks of one row, bad rows sorted last.
    (5000, 3, 1, 16),
    (70000, 1, 1, 256),
    (3000, 2, 7, 16),
    (2000, 4, 1500, 16),
    (1000, 2, 5, 1),
    (257, 3, 300, 16),
    (0, 2, 3, 16),
]


def _twin_inputs(n, d, s, seed, bad=0):
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, d))
    ids = g.integers(0, max(1, s - s // 4), n)
    if bad and n:
        rows = g.choice(n, size=min(bad, n), replace=False)
        ids[rows] = np.where(g.random(len(rows)) < 0.5, -1 - g.integers(0, 5, len(rows)),
                             s + g.integers(0, 5, len(rows)))
    return x, ids


def _reference(x, ids, s, mean):
    ok = (ids >= 0) & (ids < s)
    out = np.zeros((s, x.shape[1]))
    np.add.at(out, ids[ok], x[ok])
    if mean:
        out /= np.maximum(np.bincount(ids[ok], minlength=s), 1)[:, None]
    return out


@pytest.mark.parametrize("n,d,s,r0", TWIN_CASES)
@pytest.mark.parametrize("mean", [False, True])
def test_twin_matches_reference(n, d, s, r0, mean):
    x, ids = _twin_inputs(n, d, s, seed=n + s + r0, bad=7)
    got, levels = twin.segment_reduce(x, ids, s, mean, r0=r0)
    np.testing.assert_allclose(got, _reference(x, ids, s, mean), rtol=1e-12, atol=1e-12)
    if n == 70000:  # 274 chunks -> 548 slots -> 9 chunks -> 18 slots -> 1 chunk
        assert levels == 3


def test_twin_small_combine_chunks_go_deep():
    # r1 = 4 halves the slots per level only: many levels, the slot ranges must stay exact.
    x, ids = _twin_inputs(3000, 2, 3, seed=1, bad=3)
    got, levels = twin.segment_reduce(x, ids, 3, True, r0=4, r1=4)
    assert levels > 5
    np.testing.assert_allclose(got, _reference(x, ids, 3, True), rtol=1e-12)


def test_twin_geometry():
    # N = 2560, D = 128 float32: 160 chunks of 16 rows (not 10 of 256).
    assert twin.geometry(2560, 128, 4) == (16, 64)
    assert twin.geometry(2560, 2048, 4) == (20, 64)  # 4 column tiles
    assert twin.geometry(1 << 20, 512, 4) == (256, 64)


# ---------------------------------------------------------------------------
# CUDA (skipped without a GPU).


@cuda_kernels
@pytest.mark.parametrize("n,d,s", [(2560, 128, 100), (2560, 2048, 10), (70000, 5, 1), (3000, 7, 20000),
                                   (1000, 33, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "column_slice", "odd_offset"])
def test_cuda_equals_twin_bitwise(n, d, s, dtype, layout):
    x64, ids = _twin_inputs(n, d, s, seed=n + d)
    base = torch.from_numpy(x64).to(dtype)
    if layout == "column_slice":  # rows not 16-byte aligned: the scalar path
        wide = torch.zeros(n, d + 1, dtype=dtype)
        wide[:, 1:] = base
        xc = wide.cuda()[:, 1:]
    elif layout == "odd_offset":
        flat = torch.zeros(n * d + 1, dtype=dtype)
        flat[1:] = base.flatten()
        xc = flat.cuda()[1:].view(n, d)
    else:
        xc = base.cuda()
    idc = torch.from_numpy(ids).cuda()
    r0, r1 = twin.geometry(n, d, torch.tensor([], dtype=dtype).element_size())
    acc = np.float64 if dtype == torch.float64 else np.float32
    for mean, fn in ((False, ops.segment_sum), (True, ops.segment_mean)):
        want, _ = twin.segment_reduce(base.double().numpy().astype(acc), ids, s, mean, r0=r0, r1=r1, acc=acc)
        got = fn(xc, idc, s)
        assert torch.equal(got.cpu(), torch.from_numpy(want).to(dtype)), (mean, layout)
    count = ops.segment_count(idc, s)
    assert torch.equal(count.cpu(), torch.bincount(torch.from_numpy(ids), minlength=s))


@cuda_kernels
@pytest.mark.parametrize("s", [4, 20000])  # histogram and sorted count paths
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_cuda_bad_ids_raise_like_cpu(s, index_dtype):
    x = torch.randn(300, 5, device="cuda")
    ids = torch.randint(0, s, (300,), device="cuda", dtype=index_dtype)
    ids[[17, 40, 200]] = torch.tensor([s + 3, -2, -7], dtype=index_dtype, device="cuda")
    for fn, name in ((lambda: ops.segment_sum(x, ids, s), "segment_sum"),
                     (lambda: ops.segment_mean(x, ids, s), "segment_mean"),
                     (lambda: ops.segment_count(ids, s), "segment_count")):
        with pytest.raises(ValueError, match=rf"{name}: ids\[17\] = {s + 3} is outside \[0, num_segments = {s}\)"):
            fn()
    # Nothing left pending; the device is healthy.
    assert list(F.take_id_error(x.device)) == [-1, 0, 0, 0]
    torch.cuda.synchronize()


@cuda_kernels
def test_cuda_bad_ids_skip_rows_never_write_out_of_bounds():
    x = torch.ones(64, 3, device="cuda")
    ids = torch.full((64,), 5, device="cuda")
    ids[:10] = 1
    out = F.segment_sum(x, ids, 4)  # the raw op: skips, records
    assert torch.equal(out.cpu(), torch.tensor([[0.0] * 3, [10.0] * 3, [0.0] * 3, [0.0] * 3]))
    assert list(F.take_id_error(x.device)) == [10, 5, 4, 1]
    assert list(F.take_id_error(x.device)) == [-1, 0, 0, 0]  # taking clears it


@cuda_kernels
def test_cuda_validate_off_never_crashes_forward_or_backward():
    x = torch.randn(100, 4, device="cuda", requires_grad=True)
    ids = torch.randint(0, 3, (100,), device="cuda")
    ids[5], ids[60] = 3, -1
    with pytest.raises(ValueError, match=r"segment_mean: ids\[5\] = 3"):
        with ops.validate_ids(False):
            out = ops.segment_mean(x, ids, 3) + ops.segment_sum(x, ids, 3)
            out.sum().backward()  # index_select must not see ids 3 / -1
            torch.cuda.synchronize()
            grad = x.grad.clone()
    # Bad rows got zero gradient; the context is not poisoned.
    assert grad[5].abs().sum().item() == 0 and grad[60].abs().sum().item() == 0
    assert torch.isfinite(grad).all()
    assert ops.segment_sum(torch.ones(4, 1, device="cuda"), torch.arange(4, device="cuda"), 4).sum().item() == 4


@cuda_kernels
def test_cuda_first_error_wins_until_taken():
    x = torch.randn(50, 2, device="cuda")
    first = torch.zeros(50, dtype=torch.long, device="cuda")
    first[30] = 9
    second = torch.zeros(50, dtype=torch.long, device="cuda")
    second[2] = -4
    with ops.validate_ids(False):
        ops.segment_sum(x, first, 2)
        ops.segment_count(second, 2)
        with pytest.raises(ValueError, match=r"segment_sum: ids\[30\] = 9"):
            ops.raise_pending_errors()
        ops.segment_count(second, 2)
        with pytest.raises(ValueError, match=r"segment_count: ids\[2\] = -4"):
            ops.raise_pending_errors()


@cuda_kernels
def test_cuda_deterministic_and_many_chunk_segment():
    x = torch.randn(1 << 18, 64, device="cuda")
    ids = torch.zeros(1 << 18, dtype=torch.long, device="cuda")
    ids[::1000] = 1
    a, b = ops.segment_mean(x, ids, 3), ops.segment_mean(x, ids, 3)
    assert torch.equal(a, b)
    want = torch.zeros(3, 64, dtype=torch.float64).index_add_(0, ids.cpu(), x.double().cpu())
    want /= torch.bincount(ids.cpu(), minlength=3).clamp(min=1).double().unsqueeze(1)
    assert torch.allclose(a.double().cpu(), want, rtol=1e-4, atol=1e-5)
    assert (a[2] == 0).all()
