"""What DEO_M would a perfectly fair model score on a dataset's test set?

DEO_M is a max over classes of a range over the (class, group) test cells:
binomial sampling alone spreads the cells, so even a model whose accuracy
does not depend on the group at all scores well above 0 (over 100 (fg, bg)
groups of ~60 images per cell: ~30). This script measures that floor by
simulation: for every class c a group-invariant model with accuracy p_c
(taken from a metrics.json or a reproduce cell.json, or a constant), each
cell's hits drawn Binomial(n_cell, p_c) with the real test set's cell sizes,
and DEO_M / DEO_A computed as fastfair.metrics does, over the groups and,
with several attributes, over each attribute's marginal groups
(fastfair.metrics.deo_chance_floor, which every evaluation now reports as
``deo_floor``; this script asks it for any accuracies).

    python benchmarks/deo_noise_floor.py --root ../shared/data \
        --metrics benchmarks/results/explore_intersectional/dm_fairdd_intersection_sample_per_group/metrics.json
    python benchmarks/deo_noise_floor.py --dataset cfmnist-bg --root ../shared/data \
        --metrics benchmarks/results/reproduce_cpu-long_cfmnist/cfmnist-bg/dm_fairdd_ipc10/cell.json

Writes the floors as JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from fastfair import data
from fastfair.evaluate import cell_test_counts
from fastfair.metrics import class_accuracy, deo_chance_floor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cmnist-fgbg", help="any dataset name fastfair.data.load takes")
    ap.add_argument("--root", default="../shared/data", help="where the MNIST files are")
    ap.add_argument("--metrics", help="a metrics.json or reproduce cell.json whose per-class accuracies the "
                                      "fair model takes")
    ap.add_argument("--acc", type=float, nargs="*", default=[85.0, 90.0, 95.0],
                    help="also: every class at this accuracy (percent)")
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the floors here as JSON")
    args = ap.parse_args()
    if any(not 0.0 <= a <= 100.0 for a in args.acc):
        ap.error(f"--acc takes accuracies in percent, in [0, 100]; got {args.acc}")
    if args.trials < 1:
        ap.error(f"--trials must be >= 1, got {args.trials}")

    ds = data.load(args.dataset, root=args.root)
    names = list(ds.attributes.names)
    C, G = ds.num_classes, ds.num_groups
    cnt = cell_test_counts(ds)
    print(f"{args.dataset}: {C} classes x {G} groups; test cells hold {cnt.min()}-{cnt.max()} images "
          f"(median {np.median(cnt):.0f})")
    cases: list[tuple[str, np.ndarray]] = []
    if args.metrics:
        with open(args.metrics) as fh:
            m = json.load(fh)
        shape = (len(m["cell_acc"]), len(m["cell_acc"][0]) if m["cell_acc"] else 0)
        if shape != (C, G):
            raise SystemExit(f"{args.metrics} holds {shape} cells; {args.dataset} has {(C, G)}")
        cases.append((f"per-class accuracy of {args.metrics} (overall {m['acc']:.2f}, DEO_M {m['deo_m']:.2f})",
                      class_accuracy(m["cell_acc"], cnt)))
    cases += [(f"every class {a:g}%", np.full(C, a / 100)) for a in args.acc]
    out = {"dataset": args.dataset, "attributes": names, "trials": args.trials,
           "cell_sizes": [int(cnt.min()), int(cnt.max())], "cases": []}
    for name, p in cases:
        f = deo_chance_floor(cnt, p, ds.attributes, trials=args.trials, seed=args.seed)
        out["cases"].append({"model": name, "class_acc": [float(v) * 100 for v in p], **f})
        extra = "".join(f"; {n} DEO_M {f[n + '_deo_m'][0]:.1f}" for n in names if n + "_deo_m" in f)
        print(f"{name}: DEO_M {f['deo_m'][0]:.1f} (5-95%: {f['deo_m'][1]:.1f}-{f['deo_m'][2]:.1f}), "
              f"DEO_A {f['deo_a'][0]:.1f}{extra}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
