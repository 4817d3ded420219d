"""What DEO_M would a perfectly fair model score on an intersectional test set?

DEO_M over 100 (fg, bg) groups is a max over classes of a range over 100
cells of ~60 test images each: binomial sampling alone spreads the cells, so
even a model whose accuracy does not depend on the group at all scores well
above 0. This script measures that floor by simulation: for every class c a
group-invariant model with accuracy p_c (taken from a metrics.json, or a
constant), each cell's hits drawn Binomial(n_cell, p_c) with the real test
set's cell sizes, and DEO_M / DEO_A computed as fastfair.metrics does, over
the intersection and over each attribute's marginal groups.

    python benchmarks/intersectional_noise_floor.py --root ../shared/data \
        --metrics benchmarks/results/explore_intersectional/dm_fairdd_intersection_sample_per_group/metrics.json

Writes the floors as JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from fastfair import data


def _floor(cnt: np.ndarray, p_class: np.ndarray, sizes: tuple[int, int], trials: int,
           rng: np.random.Generator) -> dict[str, list[float]]:
    C = cnt.shape[0]
    k_fg, k_bg = sizes
    rows = []
    for _ in range(trials):
        hits = rng.binomial(cnt, p_class[:, None])
        r = hits / cnt
        gap = r.max(1) - r.min(1)
        h3, n3 = hits.reshape(C, k_fg, k_bg), cnt.reshape(C, k_fg, k_bg)
        fg = h3.sum(2) / n3.sum(2)  # groups are g = fg * K_bg + bg (fastfair.attributes)
        bg = h3.sum(1) / n3.sum(1)
        rows.append([gap.max(), gap.mean(), (fg.max(1) - fg.min(1)).max(), (bg.max(1) - bg.min(1)).max()])
    a = np.array(rows) * 100.0
    keys = ["deo_m", "deo_a", "fg_deo_m", "bg_deo_m"]
    return {k: [float(a[:, i].mean()), float(np.percentile(a[:, i], 5)), float(np.percentile(a[:, i], 95))]
            for i, k in enumerate(keys)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cmnist-fgbg", help="an intersectional dataset with two attributes")
    ap.add_argument("--root", default="../shared/data", help="where the MNIST files are")
    ap.add_argument("--metrics", help="a metrics.json whose per-class accuracies the fair model takes")
    ap.add_argument("--acc", type=float, nargs="*", default=[85.0, 90.0, 95.0],
                    help="also: every class at this accuracy (percent)")
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the floors here as JSON")
    args = ap.parse_args()

    ds = data.load(args.dataset, root=args.root)
    names = ds.attributes.names
    if len(names) != 2:
        raise SystemExit(f"{args.dataset} has attributes {names}; this script takes two")
    sizes = tuple(len(v) for v in ds.attributes.values)
    C, G = ds.num_classes, ds.num_groups
    y, g = ds.test.labels.numpy(), ds.test.groups.numpy()
    cnt = np.bincount(y * G + g, minlength=C * G).reshape(C, G)
    if cnt.min() == 0:
        raise SystemExit("a (class, group) cell of the test set is empty; the floor assumes none is")
    print(f"{args.dataset}: {C} classes x {G} groups; test cells hold {cnt.min()}-{cnt.max()} images "
          f"(median {np.median(cnt):.0f})")
    rng = np.random.default_rng(args.seed)
    cases: list[tuple[str, np.ndarray]] = []
    if args.metrics:
        m = json.load(open(args.metrics))
        cell = np.array([[np.nan if v is None else v for v in row] for row in m["cell_acc"]], dtype=float)
        cases.append((f"per-class accuracy of {args.metrics} (overall {m['acc']:.2f})", np.nanmean(cell, 1) / 100))
    cases += [(f"every class {a:g}%", np.full(C, a / 100)) for a in args.acc]
    out = {"dataset": args.dataset, "trials": args.trials, "cell_sizes": [int(cnt.min()), int(cnt.max())],
           "cases": []}
    for name, p in cases:
        f = _floor(cnt, p, sizes, args.trials, rng)
        out["cases"].append({"model": name, "class_acc": [float(v) * 100 for v in p], **f})
        print(f"{name}: intersection DEO_M {f['deo_m'][0]:.1f} (5-95%: {f['deo_m'][1]:.1f}-{f['deo_m'][2]:.1f}), "
              f"DEO_A {f['deo_a'][0]:.1f}; {names[0]} DEO_M {f['fg_deo_m'][0]:.1f}, {names[1]} DEO_M "
              f"{f['bg_deo_m'][0]:.1f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
