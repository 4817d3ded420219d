"""Group-count scaling of per-segment means.

Times, side by side in one run, at a fixed N x D and G = 1 .. 10^5 segments:
  loop            the reference code's masked loop over groups
                  (torch.stack([x[ids == g].mean(0) for g in ids.unique()]))
  index_add       index_add_ sums divided by counts
  scatter_reduce  scatter_reduce_(..., "mean")
  torch_scatter   torch_scatter.scatter_mean, where that package imports
  fastfair        fastfair.ops.segment_mean

Usage: python benchmarks/segment_ops.py --device cpu|cuda [--quick] --json PATH
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # the repository, when fastfair is not installed
from timing import copy_bandwidth_gbs, describe_machine, loglog_plot, median_ms, write_json  # noqa: E402

from fastfair import ops  # noqa: E402


def impls(device: str) -> dict:
    def loop(x, ids, s):
        return torch.stack([x[ids == g].mean(0) for g in ids.unique()])

    def index_add(x, ids, s):
        total = torch.zeros(s, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, ids, x)
        count = torch.zeros(s, dtype=x.dtype, device=x.device).index_add_(0, ids, torch.ones_like(ids, dtype=x.dtype))
        return total / count.clamp(min=1).unsqueeze(1)

    def scatter_reduce(x, ids, s):
        out = torch.zeros(s, x.shape[1], dtype=x.dtype, device=x.device)
        return out.scatter_reduce_(0, ids.unsqueeze(1).expand_as(x), x, "mean", include_self=False)

    def fastfair(x, ids, s):
        return ops.segment_mean(x, ids, s)

    out = {"loop": loop, "index_add": index_add, "scatter_reduce": scatter_reduce}
    try:
        import torch_scatter  # type: ignore

        out["torch_scatter"] = lambda x, ids, s: torch_scatter.scatter_mean(x, ids, dim=0, dim_size=s)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        print(f"torch_scatter: not available ({type(exc).__name__}: {exc})")
    out["fastfair"] = fastfair
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="smaller N and G up to 10^4")
    p.add_argument("--n", type=int, default=None, help="rows (default 2^20 on CUDA, 2^17 on CPU; /8 with --quick)")
    p.add_argument("--d", type=int, default=None, help="features (default 512 on CUDA, 64 on CPU)")
    p.add_argument("--loop-max-groups", type=int, default=1000, help="skip the loop above this G (it is O(G*N))")
    p.add_argument("--json", default=None, help="output JSON (default benchmarks/results/segment_ops_<device>.json)")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    n = a.n or ((1 << 20) if cuda else (1 << 17)) // (8 if a.quick else 1)
    d = a.d or (512 if cuda else 64)
    groups = [1, 2, 10, 100, 1000, 10000] + ([] if a.quick else [100000])
    machine = describe_machine(a.device)
    bw = copy_bandwidth_gbs(a.device) if cuda else None
    print(f"segment mean, N={n} D={d} float32 on {machine.get('gpu', machine['cpu'])}"
          + (f", copy bandwidth {bw:.0f} GB/s" if bw else ""))
    bytes_moved = n * d * 4  # the read of x dominates; outputs are G x D
    rows: list[dict] = []
    fns = impls(a.device)
    gen = torch.Generator().manual_seed(0)
    for g in groups:
        # Three input sets, rotated between calls.
        xs = [torch.randn(n, d, generator=gen).to(a.device) for _ in range(3)]
        idss = [torch.randint(0, g, (n,), generator=gen).to(a.device) for _ in range(3)]
        line = [f"G={g:>6}"]
        for name, fn in fns.items():
            if name == "loop" and g > a.loop_max_groups:
                line.append(f"{name}=skipped")
                continue
            ms = median_ms(lambda i: fn(xs[i % 3], idss[i % 3], g), device=a.device,
                           repeats=3 if name == "loop" else 7)
            row = {"impl": name, "groups": g, "n": n, "d": d, "ms": ms, "device": a.device,
                   "machine": machine.get("gpu", machine["cpu"]), "threads": machine["threads"],
                   "backend": ops.backend()}
            if cuda:
                row["gbs"] = bytes_moved / (ms * 1e-3) / 1e9
                row["frac_copy_bw"] = row["gbs"] / (bw / 2)  # copy bw counts read+write
            rows.append(row)
            line.append(f"{name}={ms:.3f}ms")
        print("  ".join(line), flush=True)
    path = a.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"segment_ops_{a.device.split(':')[0]}.json")
    if bw is not None:
        for r in rows:
            r["copy_bandwidth_gbs"] = bw
    write_json(path, rows)
    loglog_plot(rows, "groups", "ms", "impl", f"segment mean N={n} D={d} ({machine.get('gpu', machine['cpu'])})",
                path.replace(".json", ".png"))
    print(f"wrote {path} and {path.replace('.json', '.png')}")
    return rows


if __name__ == "__main__":
    main()
