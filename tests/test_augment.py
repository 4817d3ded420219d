import math

import pytest
import torch
import torch.nn.functional as F

from fastfair.augment import DEFAULT_STRATEGY, DSAParams, FAMILIES, dsa, parse_strategy


def _img(n=6, c=3, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("strategy", [*FAMILIES, DEFAULT_STRATEGY])
def test_same_seed_same_output_and_global_rng_untouched(strategy):
    x = _img()
    state = torch.get_rng_state()
    a, b = dsa(x, 123, strategy), dsa(x, 123, strategy)
    assert torch.equal(a, b)
    assert torch.equal(state, torch.get_rng_state())
    assert a.shape == x.shape and a.dtype == x.dtype


def test_different_seeds_differ():
    x = _img()
    outs = [dsa(x, s) for s in range(8)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("strategy", [*FAMILIES, DEFAULT_STRATEGY])
@pytest.mark.parametrize("single_op", [True, False])
def test_batch_mode_one_transform_for_every_row(strategy, single_op):
    # The reference's siamese call: 256 identical inputs give ONE distinct
    # output, and a class's real batch and its synthetic batch (other sizes,
    # other images) augmented with the same seed get that same transform.
    p = DSAParams(single_op=single_op)
    one = _img(n=1, h=12, w=12)
    for seed in range(6):
        out = dsa(one.expand(256, -1, -1, -1).contiguous(), seed, strategy, p)
        assert torch.equal(out, out[:1].expand_as(out))
        torch.testing.assert_close(dsa(one.expand(3, -1, -1, -1).contiguous(), seed, strategy, p)[0], out[0],
                                   rtol=0, atol=0)
    # Not vacuous: per-sample mode gives the same rows different transforms.
    many = dsa(one.expand(64, -1, -1, -1).contiguous(), 0, DEFAULT_STRATEGY, p, per_sample=True)
    assert not torch.equal(many, many[:1].expand_as(many))


@pytest.mark.parametrize("strategy", [*FAMILIES, DEFAULT_STRATEGY])
def test_batch_mode_equals_each_row_alone(strategy):
    # One transform per call: the whole batch augmented at once equals every
    # row augmented on its own with the same seed.
    x = _img(n=7, h=10, w=10)
    for seed in range(5):
        whole = dsa(x, seed, strategy)
        rows = torch.cat([dsa(x[i:i + 1], seed, strategy) for i in range(x.shape[0])])
        torch.testing.assert_close(whole, rows, rtol=0, atol=1e-12)


def test_params_per_sample_selects_the_mode():
    x = _img(n=20)
    for seed in range(4):
        assert torch.equal(dsa(x, seed, DEFAULT_STRATEGY, DSAParams(per_sample=True)),
                           dsa(x, seed, DEFAULT_STRATEGY, per_sample=True))
        assert torch.equal(dsa(x, seed, DEFAULT_STRATEGY, DSAParams(per_sample=True), per_sample=False),
                           dsa(x, seed, DEFAULT_STRATEGY))


@pytest.mark.parametrize("strategy", [*FAMILIES, DEFAULT_STRATEGY])
@pytest.mark.parametrize("single_op", [True, False])
@pytest.mark.parametrize("per_sample", [True, False])
def test_siamese_prefix(strategy, single_op, per_sample):
    # The first k samples of two batches augmented with the same seed share their
    # parameters: augmenting the whole batch and its first k rows agrees there.
    p = DSAParams(single_op=single_op, per_sample=per_sample)
    real = _img(n=40)
    for seed in range(6):
        full = dsa(real, seed, strategy, p)
        head = dsa(real[:5], seed, strategy, p)
        torch.testing.assert_close(full[:5], head)


@pytest.mark.parametrize("strategy", [*FAMILIES, DEFAULT_STRATEGY])
@pytest.mark.parametrize("single_op", [True, False])
@pytest.mark.parametrize("per_sample", [True, False])
def test_row_offset_pieces_equal_the_whole_batch(strategy, single_op, per_sample):
    # A batch cut into contiguous pieces (a distributed run's shards), each
    # augmented with the offset of its first row, is augmented as the whole
    # batch: a row's parameters follow its global position. 300 rows, so a
    # generator that filled large tensors in another order would show.
    p = DSAParams(single_op=single_op, per_sample=per_sample)
    x = _img(n=300, h=8, w=8)
    cuts = [0, 1, 97, 98, 250, 300]  # uneven, with a one-row piece
    for seed in range(4):
        whole = dsa(x, seed, strategy, p)
        pieces = [dsa(x[a:b], seed, strategy, p, offset=a) for a, b in zip(cuts, cuts[1:])]
        torch.testing.assert_close(torch.cat(pieces), whole, rtol=0, atol=1e-12)
        assert torch.equal(dsa(x, seed, strategy, p, offset=0), whole)  # offset 0: the plain stream
    if per_sample:
        # Not vacuous: without its offset a later piece gets the first rows' parameters.
        assert not torch.equal(dsa(x[98:250], 1, strategy, p), dsa(x, 1, strategy, p)[98:250])


def test_row_offset_siamese_rows_share_a_transform():
    # Per-sample mode: synthetic rows (offset 0) and the real rows at the same
    # global positions get the same transform even when the real rows come
    # from a later shard.
    x = _img(n=12)
    real_shard = dsa(x[4:12], 3, DEFAULT_STRATEGY, offset=4, per_sample=True)
    syn = dsa(x[:6], 3, DEFAULT_STRATEGY, per_sample=True)
    torch.testing.assert_close(real_shard[:2], syn[4:6], rtol=0, atol=0)


def test_row_offset_rejects_bad_values():
    x = _img(n=3)
    for bad in (-1, 1.0, True, "2", None):
        with pytest.raises(ValueError, match="offset"):
            dsa(x, 0, "crop", offset=bad)
    import numpy as np

    assert torch.equal(dsa(x, 0, "crop", offset=np.int64(2)), dsa(x, 0, "crop", offset=2))


def test_siamese_same_op_on_different_images():
    # Same seed on a different batch: same op, so translation applies the same
    # shift; check with the shift-equivariant crop via a one-hot image.
    p = DSAParams()
    x = torch.zeros(3, 1, 16, 16, dtype=torch.float64)
    x[:, :, 8, 8] = 1.0
    y = x * 2
    torch.testing.assert_close(dsa(y, 5, "crop", p), 2 * dsa(x, 5, "crop", p))


@pytest.mark.parametrize("strategy", FAMILIES)
def test_gradients_flow(strategy):
    x = _img(n=4, h=8, w=8).requires_grad_(True)
    out = dsa(x, 3, strategy)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("strategy", ["color", "scale", "rotate"])
def test_gradcheck_smooth_ops(strategy):
    x = _img(n=2, c=3, h=5, w=5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: dsa(t, 11, strategy), (x,), eps=1e-6, atol=1e-5)


def test_flip_flips():
    x = _img()
    torch.testing.assert_close(dsa(x, 0, "flip", DSAParams(prob_flip=1.0)), x.flip(3))
    torch.testing.assert_close(dsa(x, 0, "flip", DSAParams(prob_flip=0.0)), x)
    out = dsa(_img(n=200), 1, "flip", per_sample=True)
    src = _img(n=200)
    flipped = (out - src.flip(3)).flatten(1).abs().amax(1) == 0
    kept = (out - src).flatten(1).abs().amax(1) == 0
    assert bool((flipped | kept).all()) and 60 < int(flipped.sum()) < 140


def test_crop_is_integer_translation_with_zero_fill():
    n, h = 50, 16
    x = _img(n=n, c=2, h=h, w=h).abs() + 1.0  # strictly positive so zero fill is visible
    out = dsa(x, 7, "crop", per_sample=True)
    pad = int(h * 0.125 + 0.5)
    xp = F.pad(x, (pad, pad, pad, pad))
    for i in range(n):  # every output is some window of the zero-padded input
        hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                if torch.equal(out[i], xp[i, :, dy:dy + h, dx:dx + h])]
        assert hits, f"sample {i} is not a translation"
    assert (out == 0).any()


def test_cutout_zeroes_a_box():
    n, h = 30, 16
    x = _img(n=n, c=2, h=h, w=h).abs() + 1.0
    out = dsa(x, 9, "cutout", per_sample=True)
    cut = int(h * 0.5 + 0.5)
    for i in range(n):
        zero = out[i, 0] == 0
        assert torch.equal(out[i, 1] == 0, zero)  # same mask on every channel
        assert torch.equal(out[i][:, ~zero], x[i][:, ~zero])  # the rest untouched
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        assert 0 < rows.numel() <= cut and 0 < cols.numel() <= cut
        # a full rectangle
        assert int(zero.sum()) == rows.numel() * cols.numel()
        assert rows.max() - rows.min() + 1 == rows.numel()


def test_color_ops():
    x = _img(n=50)
    out = dsa(x, 0, "color", per_sample=True)
    # brightness shift in [-0.5, 0.5], saturation / contrast rescale deviations:
    # the image mean moves by at most 0.5 (contrast keeps the mean)
    d = (out.mean((1, 2, 3)) - x.mean((1, 2, 3))).abs()
    assert (d <= 0.5 + 1e-9).all() and (d > 1e-6).any()
    # a grey image (all channels equal) only changes by brightness and contrast:
    # the result is still grey
    grey = x[:, :1].expand(-1, 3, -1, -1).contiguous()
    g = dsa(grey, 0, "color")
    torch.testing.assert_close(g[:, 0], g[:, 1])
    # with zero saturation every pixel becomes grey
    z = dsa(x, 0, "color", DSAParams(saturation=0.0))
    torch.testing.assert_close(z[:, 0], z[:, 2])


def test_scale_and_rotate_geometry():
    x = _img(n=8, h=9, w=9)
    # identity parameters reproduce the image
    torch.testing.assert_close(dsa(x, 2, "scale", DSAParams(ratio_scale=1.0)), x)
    torch.testing.assert_close(dsa(x, 2, "rotate", DSAParams(ratio_rotate=0.0)), x)
    # the centre pixel is a fixed point of both ops (pixel centres, odd size)
    for op in ("scale", "rotate"):
        out = dsa(x, 4, op)
        torch.testing.assert_close(out[..., 4, 4], x[..., 4, 4])
        assert not torch.allclose(out, x)
    # scale: a centred box grows or shrinks by at most the ratio 1.2 per axis
    h = 41
    box = torch.zeros(32, 1, h, h, dtype=torch.float64)
    box[:, :, 10:31, 10:31] = 1.0  # 21 px wide
    widths = (dsa(box, 6, "scale", per_sample=True)[:, 0] > 0.5).any(dim=1).sum(dim=-1).double()  # occupied columns
    assert (widths >= 21 / 1.2 - 2).all() and (widths <= 21 * 1.2 + 2).all() and widths.std() > 0


def test_rotation_angle_range():
    # rotate a centred horizontal bar; the rotated bar's angle stays within 15 deg
    h = 33
    x = torch.zeros(64, 1, h, h, dtype=torch.float64)
    x[:, :, 16, 4:29] = 1.0
    out = dsa(x, 8, "rotate", per_sample=True)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(h, dtype=torch.float64),
                            indexing="ij")
    angles = []
    for img in out[:, 0]:
        w = img.clamp(min=0)
        cy, cx = (w * ys).sum() / w.sum(), (w * xs).sum() / w.sum()
        cyy = (w * (ys - cy) ** 2).sum(); cxx = (w * (xs - cx) ** 2).sum(); cxy = (w * (ys - cy) * (xs - cx)).sum()
        angles.append(0.5 * math.degrees(math.atan2(2 * cxy, cxx - cyy)))
    a = torch.tensor(angles).abs()
    assert a.max() <= 15.5 and a.max() > 5


def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    x = _img(n=6).float()
    for s in range(6):
        torch.testing.assert_close(dsa(x.cuda(), s).cpu(), dsa(x, s), atol=1e-5, rtol=1e-5)


def test_errors_and_none():
    x = _img()
    with pytest.raises(ValueError, match="unknown DSA op"):
        dsa(x, 0, "color_blur")
    with pytest.raises(ValueError):
        dsa(x[0], 0)
    assert dsa(x, 0, "none") is x
    assert parse_strategy(DEFAULT_STRATEGY) == list(FAMILIES)


@pytest.mark.filterwarnings("ignore:Default grid_sample and affine_grid behavior:UserWarning")  # the default is the point
def test_affine_uses_pytorch_default_align_corners():
    # The reference resamples with affine_grid / grid_sample at PyTorch's
    # default align_corners=False. (Both conventions give the same scaling or
    # rotation of a square image about its centre; a non-square one shows.)
    from fastfair.augment import _affine

    x = _img(n=2, h=9, w=6)
    c, s_ = math.cos(0.2), math.sin(0.2)
    theta = torch.tensor([[[c, s_, 0.0], [-s_, c, 0.0]]], dtype=x.dtype).expand(2, -1, -1)
    want = F.grid_sample(x, F.affine_grid(theta, list(x.shape)))
    torch.testing.assert_close(_affine(x, theta), want, rtol=0, atol=0)
    other = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=True), align_corners=True)
    assert not torch.allclose(want, other)
