"""One CAFE matching step: the per-group reference loop vs one pass.

What differs between CAFE's objectives in one matching step: the forward of
the real batch through every aligned layer (no graph), the per-(class,
group) statistics of every layer, the synthetic forward with a graph, the
loss (layer terms + discrimination) and its gradient w.r.t. the synthetic
images. C = 10 classes x a real batch per class (256; 64 with --quick),
IPC 10, G = 1, 10, 100 groups with Dirichlet(1) sizes per class (so at large
G many groups are empty or hold one image), the cpu budget's ConvNet (width
16, depth 3, instance norm, 32x32x3) unless told otherwise. Timed side by
side in one run:

  fastfair vanilla / fairdd / cobra  the driver's step (fastfair.distill.cafe):
      ONE pass over the real batch in cache-sized chunks (pergroup.auto_chunk)
      that never cross a class, each chunk's maps reduced per (class, group)
      segment at once (one segment sum per map, whatever G, into its class's
      G segments), then the loss from the sums;
  loop vanilla  COBRA's train_cafe.py vanilla mode: one forward over the
      batch, class means by reshaping (its way; no groups);
  loop cobra    COBRA's train_cafe.py cobra mode: per class one forward of the
      real and of the synthetic rows, then per group present (torch.unique)
      a masked mean of every layer, the barycenter, the terms;
  loop fairdd   the same per-class, per-group loop with FairDD's rule (no
      reference code exists: CAFE+FairDD is fastfair's), as FairDD's DM code
      loops over groups.

The network training between matching steps is the same for every objective
and is left out. Before timing, each loop and its fastfair twin are checked
to give the same loss and image gradient (float32, relative 1e-4 of the
gradient's largest entry). The JSON holds the ratios of issue 24's targets
(fastfair fairdd / fastfair vanilla <= 1.1 at G = 10, <= 1.3 at G = 100, on
CPU), is rewritten after every G, and SIGTERM / Ctrl-C stop the sweep keeping
the finished points (exit code 130).

Usage: python -m fastfair.bench.cafe_step --device cpu [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import statistics
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..nets import get_network, layer_features
from .dc_step import make_batch
from .segment import parse_groups, round_robin_ms
from .timing import (add_run_args, default_json, describe_machine, loglog_plot, parse_device, step_ratios,
                     stopped_cleanly, write_json)

NAME = "cafe_step"
GROUPS = [1, 10, 100]
OBJECTIVES = ("vanilla", "fairdd", "cobra")
RATIOS = [
    (10, ("fastfair", "fairdd"), ("fastfair", "vanilla"), "<= 1.1"),
    (100, ("fastfair", "fairdd"), ("fastfair", "vanilla"), "<= 1.3"),
    (10, ("fastfair", "cobra"), ("fastfair", "vanilla"), None),
    (100, ("fastfair", "cobra"), ("fastfair", "vanilla"), None),
    (10, ("loop", "fairdd"), ("fastfair", "fairdd"), None),
    (100, ("loop", "fairdd"), ("fastfair", "fairdd"), None),
    (100, ("loop", "cobra"), ("fastfair", "cobra"), None),
]


# The driver's per-run scratch (RunContext.cache) for the real sums, one per
# objective: a run has one objective, and the round-robin timing would
# otherwise hand each objective the other's (wrong-shaped) buffers.
_REUSED: dict[str, list[Tensor]] = {}


def _mse(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).pow(2).sum()


def fastfair_step(net: nn.Module, real: Tensor, labels: Tensor, groups: Tensor, syn: Tensor, syn_labels: Tensor,
                  C: int, G: int, objective: str) -> tuple[Tensor, Tensor]:
    """The driver's matching step (fastfair.distill.cafe): the real batch in
    chunks of pergroup.auto_chunk rows, every map reduced per segment as the
    chunk passes; the loss from the sums."""
    from ..cafe import cafe_layer_terms, discrimination_terms, real_layer_sums, reference_weights
    from ..objectives import get_objective
    from ..pergroup import auto_chunk

    ref = reference_weights(objective)
    per_group = get_objective(objective).target != "pooled"
    g = G if per_group else 1
    seg = labels * g + groups if per_group else labels
    sizes = [real.shape[0] // C] * C  # make_batch: class-major, the same rows per class
    rows = max(auto_chunk(net, real), g)  # as the driver: at least as many rows as segments per class
    sums, emb = real_layer_sums(net, real, seg, C * g, rows, keep_embedding=ref.inner_weight > 0,
                                class_sizes=sizes, segments_per_class=g, out=_REUSED.get(objective))
    _REUSED[objective] = sums  # as the driver reuses the previous step's buffers (ctx.cache)
    counts = ops.segment_count(seg, C * g)
    x = syn.detach().requires_grad_(True)
    syn_means = [ops.segment_mean(t, syn_labels, C) for t in layer_features(net, x)]
    loss = cafe_layer_terms(sums, counts, syn_means, ops.segment_count(syn_labels, C), g, objective, ref.layers,
                            ref.class_mean).sum()
    if emb is not None:
        parts = [(groups, G)] if per_group else ()
        loss = loss + ref.inner_weight * discrimination_terms(emb, labels, syn_means[-1], C, objective, parts).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def loop_step(net: nn.Module, real: Tensor, labels: Tensor, groups: Tensor, syn: Tensor, syn_labels: Tensor,
              C: int, G: int, objective: str) -> tuple[Tensor, Tensor]:
    """The reference codes' way (module docstring), on fastfair's four maps
    with the reference weights folded (fastfair.cafe)."""
    from ..cafe import reference_weights

    w = reference_weights(objective).layers
    x = syn.detach().requires_grad_(True)
    ipc = syn.shape[0] // C
    loss = x.new_zeros(())
    if objective == "vanilla":
        with torch.no_grad():
            rf = layer_features(net, real)
        sf = layer_features(net, x)
        per = real.shape[0] // C
        for k, wk in enumerate(w):
            loss = loss + wk * _mse(rf[k].view(C, per, -1).mean(1), sf[k].view(C, ipc, -1).mean(1))
        centres = sf[-1].view(C, ipc, -1).mean(1)
        loss = loss + 0.01 * F.cross_entropy(rf[-1] @ centres.t(), labels, reduction="sum")
    else:
        embs, centres = [], []
        for c in range(C):
            rc = labels == c
            with torch.no_grad():
                rf = layer_features(net, real[rc])
            sf = [m.mean(0) for m in layer_features(net, x[c * ipc:(c + 1) * ipc])]
            embs.append(rf[-1])
            centres.append(sf[-1])
            gc = groups[rc]
            present = torch.unique(gc)
            if objective == "cobra":
                bary = [sum(m[gc == g].mean(0) for g in present) / len(present) for m in rf]
                for k, wk in enumerate(w):
                    loss = loss + wk * _mse(bary[k], sf[k]) / C
            else:
                for g in present:
                    for k, wk in enumerate(w):
                        loss = loss + wk * _mse(rf[k][gc == g].mean(0), sf[k])
        if objective == "fairdd":  # the discrimination loss, each group standing in for its class
            logits = torch.cat(embs) @ torch.stack(centres).t()
            ce = F.cross_entropy(logits, labels, reduction="none")  # labels are class-major, as embs
            for c in range(C):
                rc = labels == c
                for g in torch.unique(groups[rc]):
                    loss = loss + 0.01 * rc.sum() * ce[rc & (groups == g)].mean()
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


FNS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {"fastfair": fastfair_step, "loop": loop_step}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cafe_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, NAME, "a real batch of 64 per class instead of 256", "the PNG goes beside it")
    p.add_argument("--groups", type=parse_groups, default=None,
                   help="comma-separated G values (default " + ",".join(map(str, GROUPS)) + ")")
    p.add_argument("--batch", type=int, default=None, help="real images per class (default 256; 64 with --quick)")
    p.add_argument("--width", type=int, default=16, help="ConvNet width (default 16, the cpu budget's)")
    p.add_argument("--image-size", type=int, default=32, help="image side (3 channels)")
    p.add_argument("--seed", type=int, default=0, help="seed of the network and the batches")
    p.add_argument("--repeats", type=int, default=15,
                   help="timed calls of each implementation per point (after 1 warm-up), round-robin: one call "
                        "of each in turn per round, so a drift of the machine lands on every row alike; the "
                        "median is reported (default 15)")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    a = parser.parse_args(argv)
    device = parse_device(parser, a.device)
    C, ipc = 10, 10
    per_class = a.batch or (64 if a.quick else 256)
    if min(per_class, a.width, a.image_size, a.repeats) < 1:
        parser.error("--batch, --width, --image-size and --repeats must be >= 1")
    machine = describe_machine(device)
    torch.manual_seed(a.seed)
    net = get_network("ConvNet", 3, C, a.image_size, width=a.width, depth=3).to(device)
    for p in net.parameters():
        p.requires_grad_(False)
    setting = f"C={C} x {per_class} real images, IPC {ipc}, ConvNet w{a.width} d3 instancenorm {a.image_size}px"
    print(f"CAFE matching step, {setting}, float32 on {machine['name']}, {machine['threads']} threads")
    path = a.json or default_json(NAME, device)
    rows: list[dict] = []
    checks: dict[str, dict[str, float]] = {}
    gen = torch.Generator().manual_seed(a.seed)
    syn = torch.randn(C * ipc, 3, a.image_size, a.image_size, generator=gen).to(device)
    syn_labels = torch.arange(C).repeat_interleave(ipc).to(device)
    groups_list = a.groups or GROUPS
    base = {"device": device, "machine": machine["name"], "threads": machine["threads"], "torch": machine["torch"],
            "batch": per_class, "width": a.width, "image_size": a.image_size}

    def save() -> None:
        write_json(path, {"benchmark": NAME, "machine": machine, "setting": setting, "dtype": "float32",
                          "timing": f"round-robin, median of {a.repeats}",
                          "ratios": step_ratios(rows, RATIOS), "check_max_rel_err": checks,
                          "complete": len(checks) == len(groups_list), "rows": rows})

    print(f"{'G':>5} " + " ".join(f"{i + ' ' + o:>16}" for i in FNS for o in OBJECTIVES) + "   (ms)")
    with stopped_cleanly(path):
        for g in groups_list:
            batch = make_batch(C, per_class, g, a.image_size, gen, device)
            checks[str(g)] = {}
            for obj in OBJECTIVES:
                ref_l, ref_g = FNS["loop"](net, *batch, syn, syn_labels, C, g, obj)
                got_l, got_g = FNS["fastfair"](net, *batch, syn, syn_labels, C, g, obj)
                err = float((got_g - ref_g).abs().max() / ref_g.abs().max().clamp(min=1e-30))
                lerr = float((got_l - ref_l).abs() / ref_l.abs().clamp(min=1e-30))
                if err > 1e-4 or lerr > 1e-4:
                    raise AssertionError(f"cafe_step G={g} {obj}: fastfair and the loop differ (loss {lerr:.2e}, "
                                         f"gradient {err:.2e} of its largest entry)")
                checks[str(g)][obj] = max(err, lerr)
            fns = {(impl, obj): (lambda i, fn=fn, obj=obj, batch=batch, g=g: fn(net, *batch, syn, syn_labels, C, g, obj))
                   for impl, fn in FNS.items() for obj in OBJECTIVES}
            with ops.validate_ids(False):
                samples = round_robin_ms(fns, device=device, repeats=a.repeats, warmup=1)
            cells = []
            for (impl, obj), ts in samples.items():
                ms = statistics.median(ts)
                rows.append({"impl": impl, "objective": obj, "groups": g, "ms": ms, "samples": len(ts), **base})
                cells.append(f"{ms:16.1f}")
            print(f"{g:>5} " + " ".join(cells), flush=True)
            save()
    for name, r in step_ratios(rows, RATIOS).items():
        print(f"{name}: {r['ratio']:.2f}" + (f"  (target {r['target']})" if r["target"] else ""))
    png = os.path.splitext(path)[0] + ".png"
    loglog_plot(rows, "groups", "ms", lambda r: f"{r['impl']} {r['objective']}",
                f"One CAFE matching step, {setting}\n{machine['name']}, {machine['threads']} threads", png)
    print(f"wrote {path} and {png}")
    return rows


if __name__ == "__main__":
    main()
