"""COBRA's DM step against vanilla DM's, in COBRA's own code and in fastfair,
timed in ONE process (issue 26: the warm-up is COBRA's cost, not fastfair's).

COBRA's steps are its train_dm.py loop written out here from reading it
(a fresh ConvNet from its utils.get_network; per class 256 real images,
siamese DiffAugment with one seed, embeddings; vanilla: squared distance of
the class means; cobra: 10 warm-up epochs of its utils.epoch2 on the
synthetic set, then one forward per group present and the L1 distance to the
barycenter), calling its own functions from a checkout (--cobra DIR, put on
sys.path; nothing of it is in fastfair). fastfair's steps are
distill.dm.dm_iteration under --preset cobra. C-MNIST FG, ConvNet width 128,
IPC 10, --threads torch threads; the median of --repeats steps each, the two
codes alternating. Time it on a quiet machine.

Usage: python benchmarks/cobra_warmup_vs_code.py --cobra /path/to/COBRA --root ../shared/data
       [--repeats 3] [--threads 1] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cobra", required=True, help="a checkout of COBRA's code (github.com/mhmoslemi/COBRA)")
    p.add_argument("--root", required=True, help="fastfair's data root (MNIST/raw)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="benchmarks/results/cobra_warmup_vs_code_cpu.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    sys.path.insert(0, os.path.abspath(a.cobra))
    import utils as cobra_utils  # COBRA's utils.py, from the checkout

    from fastfair import data, distill
    from fastfair.distill import rng
    from fastfair.distill.config import resolve
    from fastfair.distill.context import build_context
    from fastfair.distill.dm import dm_iteration
    from fastfair.distill.synset import init_images

    ds = data.load("cmnist-fg", root=a.root)
    images, labels, colours = ds.train.images, ds.train.labels, ds.train.groups
    per_class = [torch.nonzero(labels == c).flatten().numpy() for c in range(10)]
    strategy = "color_crop_cutout_flip_scale_rotate"

    class Args:
        dsa, device, dsa_strategy, dsa_param = True, "cpu", strategy, cobra_utils.ParamDiffAug()

    syn = images[:100].clone().requires_grad_(True)
    opt = torch.optim.SGD([syn], lr=1.0, momentum=0.5)

    def cobra_step(mode: str) -> None:
        net = cobra_utils.get_network("ConvNet", 3, 10, (32, 32))
        net.train()
        if mode == "cobra":
            net_opt = torch.optim.SGD(net.parameters(), lr=0.01)
            loader = torch.utils.data.DataLoader(
                cobra_utils.TensorDataset(syn.detach().clone(), torch.arange(10).repeat_interleave(10)),
                batch_size=256, shuffle=True)
            for _ in range(10):
                cobra_utils.epoch2("train", loader, net, net_opt, torch.nn.CrossEntropyLoss(), Args, aug=True)
        for q in net.parameters():
            q.requires_grad = False
        loss = torch.zeros(())
        for c in range(10):
            rows = np.random.permutation(per_class[c])[:256]
            seed = int(time.time() * 1000) % 100000
            real = cobra_utils.DiffAugment(images[rows], strategy, seed=seed, param=Args.dsa_param)
            s = cobra_utils.DiffAugment(syn[c * 10:(c + 1) * 10], strategy, seed=seed, param=Args.dsa_param)
            out_syn = net.embed(s)
            if mode == "vanilla":
                loss = loss + ((net.embed(real).detach().mean(0) - out_syn.mean(0)) ** 2).sum()
            else:
                col = colours[rows]
                means = [net.embed(real[col == g]).mean(0) for g in torch.unique(col)]
                loss = loss + (torch.stack(means).mean(0) - out_syn.mean(0)).abs().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    ctxs = {}
    for mode in ("vanilla", "cobra"):
        cfg = resolve(distill.DistillConfig(dataset="cmnist-fg", method="dm", objective=mode, ipc=10, preset="cobra",
                                            batch_real=256))
        ctxs[mode] = build_context(cfg, ds, torch.device("cpu"))
    start, _ = init_images(ctxs["vanilla"].sampler.class_pool, ctxs["vanilla"].train_images, 10, "real", 1,
                           rng.generator(0, 0, rng.INIT))
    samples: dict[str, list[float]] = {}
    for r in range(a.repeats + 1):  # the first round warms up and is dropped
        for mode in ("vanilla", "cobra"):
            for code, fn in (("cobra_code", lambda: cobra_step(mode)),
                             ("fastfair", lambda: dm_iteration(ctxs[mode], start, None, r))):
                t0 = time.perf_counter()
                fn()
                if r:
                    samples.setdefault(f"{code}_{mode}", []).append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in samples.items()}
    out = {"benchmark": "cobra_warmup_vs_code", "seconds_per_step_median": med, "samples": samples,
           "ratio_cobra_over_vanilla": {c: med[f"{c}_cobra"] / med[f"{c}_vanilla"] for c in ("cobra_code", "fastfair")},
           "settings": {"repeats": a.repeats, "threads": a.threads, "batch_real": 256, "width": 128, "ipc": 10,
                        "warmup_epochs": 10, "dataset": "C-MNIST FG"}}
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps({k: round(v, 2) for k, v in med.items()}), json.dumps(out["ratio_cobra_over_vanilla"]))


if __name__ == "__main__":
    main()
