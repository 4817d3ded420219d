"""COBRA's DM step against vanilla DM's, in COBRA's own code and in fastfair
(issue 26: the warm-up is COBRA's cost, not fastfair's overhead).

Runs COBRA's train_dm.py (a checkout you fetched yourself: --cobra DIR, with
MNIST's raw IDX files unpacked under DIR/data/MNIST/raw) for 1 and for 1 + N
iterations in each mode and takes the difference, so the data set-up cancels;
then fastfair's DM step the same way (distill.run, C-MNIST FG at the same
settings). ConvNet width 128, batch_real --batch-real per class, IPC 10, no
evaluation, --threads torch threads. Writes JSON (seconds per iteration per
mode and the cobra / vanilla ratios). Time it on a quiet machine.

Usage: python benchmarks/cobra_warmup_vs_code.py --cobra /path/to/COBRA --root ../shared/data
       [--iterations 5] [--batch-real 256] [--threads 2] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def cobra_seconds(cobra: str, mode: str, iterations: int, batch_real: int, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "train_dm.py", "--mode", mode, "--dataset", "Colored_MNIST_foreground",
                    "--Iteration", str(iterations), "--num_eval", "0", "--batch_real", str(batch_real),
                    "--data_path", "data", "--save_path", os.path.join("/tmp", "cobra_warmup_res")],
                   cwd=cobra, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def fastfair_seconds(root: str, objective: str, iterations: int, batch_real: int, threads: int) -> float:
    import torch

    from fastfair import data, distill

    torch.set_num_threads(threads)
    ds = data.load("cmnist-fg", root=root)
    cfg = distill.DistillConfig(dataset="cmnist-fg", method="dm", objective=objective, ipc=10, preset="cobra",
                                iterations=iterations, batch_real=batch_real, log_every=1,
                                checkpoint_every=10 ** 6)
    return distill.run(cfg, ds, progress=False).seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cobra", required=True, help="a checkout of COBRA's code (github.com/mhmoslemi/COBRA)")
    p.add_argument("--root", required=True, help="fastfair's data root (MNIST/raw)")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="benchmarks/results/cobra_warmup_vs_code_cpu.json")
    a = p.parse_args()
    rows = {}
    for mode in ("vanilla", "cobra"):
        # COBRA's loop runs Iteration + 1 steps: 1 + N against 1.
        one = cobra_seconds(a.cobra, mode, 0, a.batch_real, a.threads)
        more = cobra_seconds(a.cobra, mode, a.iterations, a.batch_real, a.threads)
        rows[f"cobra_code_{mode}"] = (more - one) / a.iterations
        # fastfair the same way: 1 + N iterations against 1 (the first pays for warm-up).
        rows[f"fastfair_{mode}"] = (fastfair_seconds(a.root, mode, a.iterations + 1, a.batch_real, a.threads)
                                    - fastfair_seconds(a.root, mode, 1, a.batch_real, a.threads)) / a.iterations
        print(mode, {k: round(v, 3) for k, v in rows.items()}, flush=True)
    out = {"benchmark": "cobra_warmup_vs_code", "seconds_per_iteration": rows,
           "ratio_cobra_over_vanilla": {"cobra_code": rows["cobra_code_cobra"] / rows["cobra_code_vanilla"],
                                        "fastfair": rows["fastfair_cobra"] / rows["fastfair_vanilla"]},
           "settings": {"iterations": a.iterations, "batch_real": a.batch_real, "threads": a.threads,
                        "width": 128, "ipc": 10, "warmup_epochs": 10, "dataset": "C-MNIST FG"}}
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out["ratio_cobra_over_vanilla"]))


if __name__ == "__main__":
    main()
