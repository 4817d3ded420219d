"""DSA: differentiable siamese augmentation (Zhao & Bilen, ICML'21).

Every op is differentiable w.r.t. the images (affine_grid / grid_sample with
PyTorch's default ``align_corners=False`` for scale and rotate, index gathers
and masks for crop and cutout, flip + torch.where for flip, arithmetic for the
colour ops), so gradients reach the synthetic images through the augmentation.

Two ways of drawing parameters, as in the DSA / DM / FairDD code family:

*Batch mode* (``per_sample=False``, the default; the reference's
``DiffAugment(x, strategy, seed)`` with a seed): ONE parameter set per call,
applied to every row of the batch. The real batch of a class and its synthetic
batch are augmented with the same seed, so every real and every synthetic
image of the class gets the same transform; the augmented real target is the
class mean of one transformed view, as in the reference.

*Per-sample mode* (``per_sample=True``; the reference's ``seed=-1``, which it
uses to train networks: evaluation, the DC inner loop): every row gets its own
parameters. With a seed, row i of two batches still shares its parameters
(``DSAParams.per_sample`` makes the matching use this mode: a named
ablation, not the papers' protocol, and measured less fair than the
reference's batch mode: README, benchmarks/results/dsa_per_sample_cpu.json).

All randomness comes from a local CPU ``torch.Generator`` (the global RNG is
never touched): the op choice is drawn first, then the parameters from a single
``[N, P]`` draw, so the parameters of row i never depend on the batch size N.

*Row offset* (per-sample mode): ``dsa(x, seed, offset=k)`` gives row i of
``x`` the parameters of row ``k + i`` of that stream, so a batch split into
contiguous pieces (the shards of a distributed run) and augmented piece by
piece, each with the offset of its first row, is augmented exactly as the whole
batch. In batch mode every row has the seed's one parameter set whatever the
offset, which gives the same guarantee trivially.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclass
class DSAParams:
    """DSA hyper-parameters (defaults from the DSA / DM / FairDD code family).

    single_op=True picks one op family per call (the DSA code's 'S' mode);
    False applies every family of the strategy in order.
    per_sample: the parameter mode of the siamese (seeded) calls the
    distillation makes; False (the reference's batch mode) gives the whole
    batch one transform, True gives each row its own (an option; see the
    module docstring). Network training always draws per sample.
    """

    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0  # degrees
    ratio_crop_pad: float = 0.125  # fraction of the image size
    ratio_cutout: float = 0.5  # fraction of the image size
    prob_flip: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    single_op: bool = True
    per_sample: bool = False


# Each family's ops, and how many uniform numbers one sample consumes.
_NUM_PARAMS = {"color": 3, "crop": 2, "cutout": 2, "flip": 1, "scale": 2, "rotate": 1}
FAMILIES = tuple(_NUM_PARAMS)


def parse_strategy(strategy: str) -> list[str]:
    """Op families of a strategy string like ``"color_crop_flip"``
    (``""`` or ``"none"`` -> no augmentation)."""
    if strategy in ("", "none", None):
        return []
    fams = [f for f in strategy.lower().split("_") if f]
    bad = [f for f in fams if f not in _NUM_PARAMS]
    if bad:
        raise ValueError(f"unknown DSA op(s) {bad} in strategy {strategy!r}; expected '_'-joined names from {FAMILIES}")
    return fams


# -- ops; u is [N, P] uniform in [0, 1) on x's device and dtype -------------------

def _color(x: Tensor, u: Tensor, p: DSAParams) -> Tensor:
    # brightness: shift by U(-0.5, 0.5) * brightness
    x = x + (u[:, 0].view(-1, 1, 1, 1) - 0.5) * p.brightness
    # saturation: scale the deviation from the per-pixel channel mean by U(0, 1) * saturation
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (u[:, 1].view(-1, 1, 1, 1) * p.saturation) + mean
    # contrast: scale the deviation from the image mean by U(0, 1) + contrast
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (u[:, 2].view(-1, 1, 1, 1) + p.contrast) + mean


def _crop(x: Tensor, u: Tensor, p: DSAParams) -> Tensor:
    """Random translation by integer pixels in [-pad, pad], zero fill (a
    padded random crop), as a differentiable gather."""
    n, _, h, w = x.shape
    ph, pw = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
    sy = (u[:, 0] * (2 * ph + 1)).floor().long().clamp_(max=2 * ph)  # offset into the padded image
    sx = (u[:, 1] * (2 * pw + 1)).floor().long().clamp_(max=2 * pw)
    xp = F.pad(x, (pw, pw, ph, ph))
    rows = (torch.arange(h, device=x.device).view(1, h) + sy.view(n, 1)).view(n, 1, h, 1)
    cols = (torch.arange(w, device=x.device).view(1, w) + sx.view(n, 1)).view(n, 1, 1, w)
    idx = (rows * (w + 2 * pw) + cols).expand(n, x.shape[1], h, w).reshape(n, x.shape[1], h * w)
    return xp.flatten(2).gather(2, idx).view_as(x)


def _cutout(x: Tensor, u: Tensor, p: DSAParams) -> Tensor:
    """Zero a (ratio*h) x (ratio*w) box centred at a random position (it may
    stick out of the image; only its inside part is zeroed)."""
    n, _, h, w = x.shape
    ch, cw = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
    # Centre ranges of the DSA code: [0, size + (1 - cut % 2)).
    ny, nx = h + (1 - ch % 2), w + (1 - cw % 2)
    cy = (u[:, 0] * ny).floor().long().clamp_(max=ny - 1) - ch // 2
    cx = (u[:, 1] * nx).floor().long().clamp_(max=nx - 1) - cw // 2
    r = torch.arange(h, device=x.device).view(1, h)
    c = torch.arange(w, device=x.device).view(1, w)
    in_r = (r >= cy.view(n, 1)) & (r < (cy + ch).view(n, 1))
    in_c = (c >= cx.view(n, 1)) & (c < (cx + cw).view(n, 1))
    keep = ~(in_r.view(n, 1, h, 1) & in_c.view(n, 1, 1, w))
    return x * keep.to(x.dtype)


def _flip(x: Tensor, u: Tensor, p: DSAParams) -> Tensor:
    do = (u[:, 0] < p.prob_flip).view(-1, 1, 1, 1)
    return torch.where(do, x.flip(3), x)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def _scale(x: Tensor, u: Tensor, p: DSAParams) -> Tensor:
    lo, hi = 1.0 / p.ratio_scale, p.ratio_scale
    s = u * (hi - lo) + lo  # [N, 2]: sx, sy
    zero = torch.zeros_like(s[:, 0])
    theta = torch.stack([torch.stack([s[:, 0], zero, zero], 1), torch.stack([zero, s[:, 1], zero], 1)], 1)
    return _affine(x, theta)


def _rotate(x: Tensor, u: Tensor, p: DSAParams) -> Tensor:
    ang = (u[:, 0] - 0.5) * 2 * p.ratio_rotate / 180.0 * torch.pi
    cos, sin, zero = ang.cos(), ang.sin(), torch.zeros_like(ang)
    theta = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)
    return _affine(x, theta)


_OPS = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate}


def dsa(x: Tensor, seed: int, strategy: str = DEFAULT_STRATEGY, params: DSAParams | None = None,
        offset: int = 0, per_sample: bool | None = None) -> Tensor:
    """Augment a batch ``x`` [N, C, H, W] with DSA, deterministically in ``seed``.

    ``per_sample`` None takes ``params.per_sample`` (default False: batch
    mode, one parameter set for every row, the reference's siamese call);
    True draws one parameter row per sample. The same seed on two batches
    picks the same op family and the same parameters (batch mode: for all
    rows; per-sample mode: row i of both). ``offset`` (per-sample mode): row
    i of ``x`` gets the parameters of row ``offset + i`` of the seed's stream,
    so a batch augmented in contiguous pieces, each with the offset of its
    first row, equals the batch augmented whole; batch mode ignores it (every
    row has the same parameters). Differentiable w.r.t. ``x``; works on any
    device (parameters are drawn on CPU and moved).
    """
    try:
        ok = not isinstance(offset, bool) and operator.index(offset) >= 0  # python / numpy ints, not floats
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"dsa: offset must be an integer >= 0, got {offset!r}")
    offset = operator.index(offset)
    if x.dim() != 4:
        raise ValueError(f"dsa expects images [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"dsa expects floating-point images, got {x.dtype}")
    p = params if params is not None else DSAParams()
    each = p.per_sample if per_sample is None else bool(per_sample)
    fams = parse_strategy(strategy)
    if not fams or x.shape[0] == 0:
        return x
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    if p.single_op:
        pick = int(torch.randint(len(fams), (1,), generator=gen).item())
        fams = [fams[pick]]
    sizes = [_NUM_PARAMS[f] for f in fams]
    if each:
        # One draw for all ops: row i holds sample i's parameters whatever N
        # is. The rows before ``offset`` are drawn and dropped: a few floats
        # per row (offsets are at most a class batch).
        u = torch.rand(offset + x.shape[0], sum(sizes), generator=gen)[offset:]
    else:
        # The reference draws a row per sample and copies row 0 to all; one
        # row, expanded, is that without the unused draws.
        u = torch.rand(1, sum(sizes), generator=gen).expand(x.shape[0], -1)
    u = u.to(device=x.device, dtype=x.dtype)
    start = 0
    for fam, k in zip(fams, sizes):
        x = _OPS[fam](x, u[:, start:start + k], p)
        start += k
    return x
