"""What the grouped GEMM's precision does to the real gradients and to the DC loss.

On a real cdigits-fg batch (``per`` images of each of the 10 classes, its 10
groups, segments class * G + group) and the DC ConvNet (width 128, depth 3,
instance norm), the per-segment real gradients of
fastfair.pergroup.segment_gradients are computed four ways:
  fp64          the network and the C++ CPU kernel in float64 (the reference);
  fp32_kernel   the network in float32, the C++ CPU kernel (float32 today);
  grouped_fp32  the network in float32, the weight gradients by
                fastfair.wgrad's grouped GEMM in float32 (the CUDA algorithm);
  grouped_bf16  the same with bfloat16 operands (what the tensor cores get).
Reported per variant: the relative error of every parameter tensor
(||g - g64|| / ||g64||, all segments of one parameter together; the largest
over the weight tensors) and the DC
matching loss (FairDD objective, the 'ours' layer-wise distance, as the DC
driver computes it) against per-class synthetic gradients (10 real images
per class as the synthetic set, float64), relative to the float64 loss.

Runs wherever torch's grouped_mm runs (CPU here; on CUDA the same function
uses the tensor cores).

Usage: python -m fastfair.bench.wgrad_error [--per 256] [--device cpu] [--json PATH]
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Iterator

import torch

from .. import ops, wgrad
from ..data.registry import load
from ..nets import get_network
from ..objectives import dc_matching_loss
from ..pergroup import class_gradients, segment_gradients
from .timing import default_json, describe_machine, parse_device, write_json


@contextlib.contextmanager
def grouped_ops(precision: str) -> Iterator[None]:
    """Route pergroup's weight-gradient ops through wgrad's grouped GEMM."""
    lin, conv = ops.segment_linear_weight_grad, ops.segment_conv2d_weight_grad

    def glin(b, a, ids, s):  # noqa: ANN001, ANN202
        return wgrad.grouped_linear_weight_grad(b, a, ids, s, precision).to(a.dtype)

    def gconv(b, a, ids, s, ks, st=1, pd=0, dl=1):  # noqa: ANN001, ANN202
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
        return wgrad.grouped_conv2d_weight_grad(b, a, ids, s, pair(ks), pair(st), pair(pd), pair(dl),
                                                precision).to(a.dtype)

    ops.segment_linear_weight_grad, ops.segment_conv2d_weight_grad = glin, gconv
    try:
        yield
    finally:
        ops.segment_linear_weight_grad, ops.segment_conv2d_weight_grad = lin, conv


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="wgrad_error", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per", type=int, default=256,
                   help="real images per class, at most all of them (default 256: cdigits-fg has ~125 per class)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--json", default=None, help="output JSON (default benchmarks/results/wgrad_error_<device>.json)")
    a = p.parse_args(argv)
    device = parse_device(p, a.device)
    data = load("cdigits-fg")
    C, G = data.num_classes, data.num_groups
    gen = torch.Generator().manual_seed(0)
    idx, syn_idx = [], []
    for c in range(C):
        pool = (data.train.labels == c).nonzero().flatten()
        pick = pool[torch.randperm(pool.numel(), generator=gen)]
        idx.append(pick[:a.per])
        syn_idx.append(pick[-10:])  # the synthetic set: 10 real images (the last of the shuffled class)
    idx, syn_idx = torch.cat(idx), torch.cat(syn_idx)
    x = data.train.images[idx].to(device)
    y = data.train.labels[idx].to(device)
    seg = y * G + data.train.groups[idx].to(device)
    syn = data.train.images[syn_idx].to(device, torch.float64)
    syn_y = data.train.labels[syn_idx].to(device)
    torch.manual_seed(0)
    net32 = get_network("ConvNet", 3, C, data.image_size, width=128, depth=3).to(device)
    net64 = get_network("ConvNet", 3, C, data.image_size, width=128, depth=3).to(device, torch.float64)
    net64.load_state_dict({k: v.double() for k, v in net32.state_dict().items()})
    S = C * G
    counts = ops.segment_count(seg, S)
    syn_grads = class_gradients(net64, syn, syn_y, C, create_graph=False, class_sizes=[10] * C)

    def loss_of(grads: tuple) -> float:
        return float(dc_matching_loss([g.double() for g in grads], counts, syn_grads, G,
                                      objective="fairdd", metric="ours"))

    ref = segment_gradients(net64, x.double(), y, seg, S)
    ref_loss = loss_of(ref)
    variants = {"fp64": ref}
    variants["fp32_kernel"] = segment_gradients(net32, x, y, seg, S)
    for prec in ("fp32", "bf16"):
        with grouped_ops(prec):
            variants[f"grouped_{prec}"] = segment_gradients(net32, x, y, seg, S)
    names = [n for n, _ in net32.named_parameters()]
    out = {"benchmark": "wgrad_error", "machine": describe_machine(device),
           "setting": {"dataset": "cdigits-fg", "per_class": a.per, "rows": int(x.shape[0]), "classes": C,
                       "groups": G, "net": "ConvNet w128 d3 instancenorm", "objective": "fairdd",
                       "metric": "ours", "syn": "10 real images per class, float64"},
           "fp64_loss": ref_loss, "variants": {}}
    for name, grads in variants.items():
        errs = {n: float((g.double() - r).norm() / r.norm().clamp(min=1e-300)) for n, g, r in zip(names, grads, ref)}
        # Weight tensors only in the max: the conv biases before instance norm
        # have gradients ~1e-9 of the weights' (the norm removes them), so
        # their relative error is rounding noise over ~0.
        worst = max(errs[n] for n, r in zip(names, ref) if r.dim() > 2)
        loss = loss_of(grads)
        out["variants"][name] = {"max_weight_rel_err": worst, "param_rel_err": errs,
                                 "dc_loss": loss, "dc_loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss)}
        print(f"{name:13s} max weight rel err {worst:.2e}  DC loss {loss:.9g} "
              f"(rel diff {abs(loss - ref_loss) / abs(ref_loss):.2e})", flush=True)
    write_json(a.json or default_json("wgrad_error", device), out)
    return out


if __name__ == "__main__":
    main()
