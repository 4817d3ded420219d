"""The ``fastfair`` command: ``demo`` | ``distill`` | ``eval`` | ``bench``.

Bad input (an unknown dataset, a missing data root, an IPC larger than a
class, an unknown objective, a bad option) ends with ONE line on stderr and
exit code 2; Ctrl-C ends with exit code 130 (``distill`` saves a checkpoint
first).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from typing import Any, Sequence

from .choices import (BUDGETS, DC_METRICS, DSA_STRATEGY, EXPORT_FORMATS, GROUP_SOURCES, INITS, METHODS, NETWORKS,
                      OBJECTIVES, PRESETS, TABLES)
from .report import format_table

EXIT_USAGE = 2
EXIT_INTERRUPT = 130


class UsageError(Exception):
    """A user error that the CLI reports in one line (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the usage block first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        msg = " ".join(message.split())
        self.exit(EXIT_USAGE, f"{self.prog}: error: {msg} (see {self.prog} --help)\n")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append "(default: X)" to every option's help unless the help already
    says what its default is (options whose None stands for a rule, such as
    "the paper default of the method", say so in words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or getattr(action, "required", False):
            return text
        return super()._get_help_string(action)


_FMT = _DefaultsFormatter

# The DC/DM code family (the DC, DSA and DM scripts that FairDD and COBRA build
# on) spells its flags with underscores; they are accepted as aliases so that a
# job script of theirs runs with few edits. Each help text says where an alias
# is not an exact equivalent.
FAMILY_NOTE = ("Aliases in square brackets are the DC/DM code family's spellings of the same option "
               "(FairDD's and COBRA's scripts); a note says where the meaning differs.")


class _CafeWeight(argparse.Action):
    """Collects CAFE's --first_weight .. --fourth_weight by name."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, value: object,
                 option: str | None = None) -> None:
        got = dict(getattr(ns, self.dest, None) or {})
        got[str(option).lstrip("-").split("_")[0]] = float(value)  # type: ignore[arg-type]
        setattr(ns, self.dest, got)


def _cafe_weights(a: argparse.Namespace) -> list[float] | None:
    if a.cafe_weights is not None and a.cafe_family:
        raise UsageError("give either --cafe-weights or CAFE's --first_weight .. --fourth_weight, not both")
    if a.cafe_weights is not None:
        try:
            return [float(w) for w in a.cafe_weights.split(",")]
        except ValueError:
            raise UsageError(f"--cafe-weights takes comma-separated numbers, got {a.cafe_weights!r}") from None
    if a.cafe_family:
        w = {"first": 1.0, "second": 1.0, "third": 1.0, "fourth": 1.0, **a.cafe_family}
        return [w["fourth"], w["third"], w["second"], 1.0 + w["first"]]
    return None


def _family(flag: str, note: str = "") -> str:
    return f" [alias {flag}{': ' + note if note else ''}]"


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="torch device (cpu, cuda, cuda:1); default: cuda when available, else cpu")


def _add_data(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--dataset", required=required, default=None,
                   help="dataset name (see fastfair.data.names(); the DC/DM family's names such as "
                        "Colored_MNIST_foreground, CIFAR10_S_90 or CelebA are aliases); cdigits-fg is embedded "
                        "and needs no download"
                        + ("" if required else "; default: the dataset recorded in the synthetic set"))
    p.add_argument("--root", "--data_path", default=None,
                   help="data directory of the datasets read from files (README: Datasets); "
                        "default: $FASTFAIR_DATA, else ./data" + _family("--data_path"))
    p.add_argument("--download", action="store_true",
                   help="let torchvision fetch MNIST, FashionMNIST, CIFAR-10 or CelebA into --root when missing")
    p.add_argument("--bias-ratio", type=float, default=0.9,
                   help="fraction of each class in its majority group (biased datasets)")
    p.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra option of the dataset loader, repeatable, e.g. subset=woof (imagenet-subset-s) or "
                        "image_size=16 (synthetic); an unknown key is an error that lists the accepted ones "
                        "(default: none)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastfair", formatter_class=_FMT,
                description="Fair dataset distillation (DM, DC, IDC, DREAM x vanilla / FairDD / COBRA) "
                            "with one-pass per-group statistics.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"fastfair {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ---------------------------------------------------------------- demo
    d = sub.add_parser("demo", formatter_class=_FMT,
                       help="quick DM vs DM+FairDD vs DM+COBRA (and DC) comparison on the embedded dataset",
                       description="The main job: on the embedded cdigits-fg dataset at IPC 10, distil with "
                                   "DM vanilla, DM+FairDD, DM+COBRA, DC vanilla and DC+FairDD under a reduced "
                                   "quick protocol (a few CPU minutes), evaluate each synthetic set and report "
                                   "Acc, DEO_M, DEO_A.")
    d.add_argument("--out", default=".", help="directory for results.json, the image grids and the bar chart")
    d.add_argument("--json", default=None, help="path of the results JSON (default: OUT/results.json)")
    _add_device(d)
    d.add_argument("--seed", type=int, default=0, help="seed of the distillation and evaluation runs")
    d.add_argument("--no-dc", action="store_true", help="skip the DC runs (DM only)")
    d.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, one per core); on a machine shared with "
                        "other jobs, 1 avoids the large slowdowns of oversubscribed OpenMP")
    d.add_argument("--jobs", type=int, default=None,
                   help="worker processes, one cell each at a time (default: one per CPU core, at most one per "
                        "cell, on a CPU; 1 on a GPU). The numbers do not depend on it; with --threads, each "
                        "worker uses that many threads (default: cores / jobs)")
    d.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # testing: a seconds-long protocol
    d.add_argument("--no-progress", action="store_true", help="no progress bars")

    # ----------------------------------------------------------- reproduce
    r = sub.add_parser("reproduce", formatter_class=_FMT,
                       help="run a paper table's cells and compare with the published numbers",
                       description="Distil and evaluate every cell (dataset x method x objective at the table's "
                                   "IPC) of a published table at a named budget, and write OUT/results.json, "
                                   "OUT/results.md (measured mean +- std beside the paper's numbers: FairDD Tables "
                                   "1-2, COBRA's where given) and OUT/results.png. Resumable: run the same "
                                   "command again and finished cells are skipped, unfinished ones continue from "
                                   "their checkpoint and finished evaluation runs.")
    r.add_argument("--table", default="fairdd-cmnist", choices=list(TABLES),
                   help="fairdd-cmnist: C-MNIST FG and BG at IPC 10, DM, DC, IDC and DREAM, each vanilla and +FairDD, "
                        "and DM+COBRA and DC+COBRA (FairDD Tables 1-2); fairdd-cfmnist: the same cells on C-FMNIST "
                        "FG and BG; fairdd: every Table 1-2 dataset; cobra-cifar10s, cobra-cmnist: "
                        "COBRA's DM numbers under COBRA's preset; intersectional: fastfair's two-attribute "
                        "C-MNIST / C-FMNIST; cobra: COBRA's table (DM, DC, IDC x vanilla / FairDD / COBRA, CAFE vanilla "
                        "/ COBRA) under COBRA's preset; cobra-cafe: CAFE vanilla / FairDD / COBRA on C-MNIST and C-FMNIST "
                        "FG and BG under COBRA's preset; cdigits, cdigits-intersectional, cdigits-cafe: the same "
                        "cells on the embedded digits (no download)")
    r.add_argument("--budget", default="cpu", choices=list(BUDGETS),
                   help="paper: the full protocol (GPU hours); cpu: a stated reduced protocol for a 2-core CPU "
                        "(about 50 min for the DM and DC cells of a C-MNIST dataset, 1 thread, and 40-60 min "
                        "for each IDC or DREAM cell; the summary is in the outputs); cpu-20min, cpu-short: the "
                        "earlier, smaller cpu budgets (about 20 and 15 min), kept so that their committed results "
                        "stay reproducible; tiny: seconds, for tests")
    r.add_argument("--out", required=True, help="output directory (one folder per cell, results.*)")
    r.add_argument("--root", default=None,
                   help="data directory (e.g. ../shared/data for the real MNIST); default: $FASTFAIR_DATA, "
                        "else ./data. Nothing is written there")
    r.add_argument("--datasets", default=None,
                   help="comma-separated subset of the table's datasets (default: all of them)")
    r.add_argument("--cells", default=None,
                   help="comma-separated subset of METHOD:OBJECTIVE cells, e.g. dm:fairdd,dc:fairdd "
                        "(default: all of the table's)")
    r.add_argument("--seed", type=int, default=0, help="seed of the distillation and the first evaluation run")
    _add_device(r)
    r.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    r.add_argument("--note", default=None, help="a note recorded with the machine (e.g. 'shared with 4 jobs')")
    r.add_argument("--progress", action="store_true", help="progress bars")

    # ------------------------------------------------------------- distill
    s = sub.add_parser("distill", formatter_class=_FMT, help="distil a dataset into a synthetic set",
                       description="Distil a dataset. Writes synset.pt, grid.png, log.jsonl and checkpoint.pt "
                                   "into --out; --resume continues an interrupted run. Launch with torchrun for "
                                   "several processes. Options left at 'None' take the paper default of the "
                                   "method and IPC. " + FAMILY_NOTE)
    _add_data(s, required=True)
    # type=str.lower: the family's scripts spell the methods DC / DSA / DM.
    s.add_argument("--method", default="dm", choices=list(METHODS), type=str.lower,
                   help="distillation method: dm (Zhao & Bilen, WACV'23), dc (Zhao et al., ICLR'21), dsa (DC with "
                        "DSA, Zhao & Bilen, ICML'21), idc (Kim et al., ICML'22), dream (Liu et al., ICCV'23), "
                        "cafe (Wang et al., CVPR'22, as COBRA's train_cafe.py runs it: 2000 iterations, lr_img "
                        "0.1, batch_real 256, loops as DC, no DSA, evaluation 1000 epochs without augmentation; "
                        "objectives vanilla, cobra, and fastfair's fairdd); "
                        "case-insensitive" + _family("--method DC / DSA / DM"))
    s.add_argument("--objective", default=None, choices=list(OBJECTIVES),
                   help="matching objective: vanilla, fairdd (FairDD, sum over groups), fairdd-mean (COBRA's "
                        "re-implementation of the FairDD DC baseline: the mean over the groups present), cobra "
                        "(COBRA barycenter), fairdd-iw / -ldam / -groupdro (FairDD's Table 7 ablations). Default: "
                        "fairdd; but a command line in the DC/DM family's spelling (--Iteration, --num_eval, ...) "
                        "means what it means in FairDD's code: vanilla unless it says --FairDD")
    s.add_argument("--FairDD", dest="fairdd_flag", action="store_true",
                   help="FairDD's switch: --objective fairdd [alias of FairDD's code]")
    s.add_argument("--mode", default=None, choices=["vanilla", "fairdd", "cobra"],
                   help="COBRA's switch: the objective under COBRA's protocol (implies --preset cobra; its "
                        "fairdd of a DC-family method is fairdd-mean) [alias of COBRA's code]")
    s.add_argument("--num_exp", type=int, default=1,
                   help="the family's number of experiments: 1 (run the command again with another --seed for "
                        "more) [alias of the family's --num_exp]")
    s.add_argument("--eval_mode", default="S", metavar="MODE",
                   help="the family's evaluation pool: S (the distillation network, ConvNet) only; other pools: "
                        "one fastfair eval --model per network [alias of the family's --eval_mode]")
    s.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="paper protocol for the options left unset: fairdd (the FairDD code: DM 20000 iterations, "
                        "batch_real 256, lr_img 1 (10 at IPC >= 100); DC 1000, 256, 0.1) or cobra (COBRA's "
                        "train_dm.py: DM 2600 iterations, batch_real 600; DC as fairdd, and --objective fairdd "
                        "of a DC-family method means fairdd-mean, what COBRA's --mode fairdd computes); both warm "
                        "COBRA's DM up 50 epochs at IPC 50, 100 at IPC 100, else 10. The preset also sets the "
                        "evaluation: fairdd 10 networks, DM 1000 epochs / DC 300; cobra 5 networks, DM 1500 / "
                        "DC 1000; and IDC's multi-formation: IDC's code tiles factor^2 real images into each stored "
                        "image and upsamples with align_corners False; COBRA's train_idc.py starts from one whole "
                        "real image each, upsamples with align_corners True, and its factor is 4 for BFFHQ / "
                        "UTKFace (3 at IPC >= 100), else 2 (default: fairdd)")
    s.add_argument("--ipc", type=int, default=10, help="synthetic images per class")
    s.add_argument("--iterations", "--Iteration", type=int, default=None,
                   help="iterations; default: the preset's (DM 20000, COBRA's DM 2600, DC family 1000, CAFE 2000)"
                        + _family("--Iteration", "the family's loop runs Iteration + 1 image updates "
                                                 "(it = 0 .. Iteration), fastfair exactly N"))
    s.add_argument("--out", "--save_path", required=True,
                   help="output directory" + _family("--save_path", "the family writes res_*.pt there; fastfair "
                                                                   "writes synset.pt, which `fastfair export "
                                                                   "--format dc` turns into res_*.pt"))
    _add_device(s)
    s.add_argument("--seed", type=int, default=0, help="seed of every random draw of the run")
    s.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt; when OUT holds no checkpoint the run starts from "
                        "iteration 0 (with a notice), so a job script may always pass --resume. Without "
                        "--resume an existing checkpoint is overwritten")
    s.add_argument("--eval-every", type=int, default=0, help="evaluate every N iterations (0: never)")
    s.add_argument("--eval-model", default="ConvNet", help="network of the evaluations during the run")
    s.add_argument("--eval-epochs", "--epoch_eval_train", type=int, default=None,
                   help="epochs of those evaluations; default: the method's under the preset (fairdd: DM, DSA, "
                        "IDC, DREAM 1000, DC 300; cobra: DM 1500, DC 1000; CAFE 1000 under both)" + _family("--epoch_eval_train"))
    s.add_argument("--eval-runs", "--num_eval", type=int, default=None,
                   help="trained networks per evaluation; default: the preset's (fairdd 10, as FairDD's scripts "
                        "pass; cobra 5, and 2 for CAFE as COBRA's run_cafe.sh)" + _family("--num_eval", "the family's argparse default is 20"))
    s.add_argument("--lr-img", "--lr_img", type=float, default=None,
                   help="image learning rate; default: the preset's (DM 1 (10 at IPC >= 100), DC family and CAFE 0.1; "
                        "CAFE halves it at iterations 1200, 1600, 1800)"
                        + _family("--lr_img"))
    s.add_argument("--momentum", type=float, default=0.5, help="SGD momentum of the image update")
    s.add_argument("--batch-real", "--batch_real", type=int, default=None,
                   help="real images per class per step; default: the preset's (256; COBRA's DM 600)"
                        + _family("--batch_real"))
    s.add_argument("--real-chunk", type=int, default=None,
                   help="at most this many real images per network pass (the per-segment sums of the chunks are "
                        "added, so the result is the same); bounds activation memory for many classes "
                        "(default: automatic: 2^24 input values per pass on a GPU, i.e. 1365 images at 64x64, "
                        "blocks of about 40 images of 3x32x32 on a CPU, where that is faster)")
    s.add_argument("--dc-block-classes", type=int, default=None,
                   help="DC family: match this many classes at a time, so only their per-group real gradients "
                        "are held (classes x groups x parameters floats); the loss and the image gradient are the "
                        "same up to float rounding (default: as many classes as fit in a quarter of the free "
                        "memory, one block whenever all classes fit, e.g. every C-MNIST run)")
    s.add_argument("--outer-loop", type=int, default=None,
                   help="DC family and CAFE: matching steps per iteration; default by IPC: 1, 10, 20, 30, 40, 50 at "
                        "IPC 1, 10, 20, 30, 40, 50; 100 above")
    s.add_argument("--inner-loop", type=int, default=None,
                   help="DC family and CAFE: network epochs between steps (0: none); default by IPC: 1, 50, 25, "
                        "20, 15, 10 at IPC 1, 10, 20, 30, 40, 50; 10 above; 0 for IDC under --preset cobra, as "
                        "COBRA's train_idc.py")
    s.add_argument("--lr-net", "--lr_net", type=float, default=0.01,
                   help="SGD lr of the DC / CAFE inner loop and COBRA warm-up" + _family("--lr_net"))
    s.add_argument("--batch-train", "--batch_train", type=int, default=256,
                   help="synthetic images per batch of the DC inner loop and COBRA warm-up" + _family("--batch_train"))
    s.add_argument("--model", default="ConvNet", help="distillation network")
    s.add_argument("--width", type=int, default=128, help="ConvNet width")
    s.add_argument("--depth", type=int, default=3, help="ConvNet depth")
    s.add_argument("--norm", default="instancenorm", help="normalisation layer of the network")
    s.add_argument("--init", default="real", choices=list(INITS),
                   help="synthetic set initialisation (default: real) [the family's own spelling and values; "
                        "FairDD's and COBRA's DC and DM code default to real images too]")
    s.add_argument("--dsa", default=None, choices=["on", "off"],
                   help="DSA augmentation while distilling; default: the method's paper: on for dm, dsa, idc, "
                        "dream; off for dc and cafe (FairDD main_DC.py and COBRA train_dc.py distil DC without DSA; COBRA's "
                        "run_cafe.sh passes no DSA strategy)")
    s.add_argument("--no-dsa", action="store_true", help="the same as --dsa off")
    s.add_argument("--dsa-per-sample", action="store_true",
                   help="siamese DSA with one transform per real/synthetic row pair instead of the reference's "
                        "one transform per class batch (an ablation, not the papers' protocol: measured less fair, "
                        "README)")
    s.add_argument("--dsa-strategy", "--dsa_strategy", default=DSA_STRATEGY, metavar="STRATEGY",
                   help="DSA ops, '_'-joined from color, crop, cutout, flip, scale, rotate; none (or None) turns "
                        f"DSA off like --dsa off (default: {DSA_STRATEGY})"
                        + _family("--dsa_strategy", "the family's DC script uses None, i.e. no DSA, unless told "
                                                    "otherwise"))
    s.add_argument("--dc-metric", "--dis_metric", default="ours", choices=list(DC_METRICS),
                   help="DC family: distance between real and synthetic gradients (ours: per-output-unit "
                        "cosine distance summed over layers, the DC paper's; mse; cos: one cosine of the "
                        "flattened gradients); DM ignores it" + _family("--dis_metric"))
    s.add_argument("--cobra-warmup-epochs", type=int, default=None,
                   help="COBRA DM warm-up epochs; default: COBRA's rule, 50 at IPC 50, 100 at IPC 100, else 10")
    s.add_argument("--group-noise", type=float, default=0.0, help="fraction of real samples given a wrong group")
    s.add_argument("--groups", default="true", choices=list(GROUP_SOURCES),
                   help="group labels: the dataset's, or DBSCAN pseudo groups per class batch")
    s.add_argument("--sample-per-group", action="store_true", help="draw each class batch equally from its groups")
    s.add_argument("--fair-over", default="intersection", metavar="intersection|marginal|ATTR",
                   help="datasets with several protected attributes (cmnist-fgbg, cfmnist-fgbg, cdigits-fgbg): "
                        "what the fair objective is fair over: every intersectional group (FairDD's terms per "
                        "(class, intersectional group), COBRA's barycenter of them), 'marginal' (the sum over "
                        "attributes of each attribute's FairDD terms) or one attribute by name (fg, bg), as the "
                        "papers do with their one attribute; all from the same one pass [fastfair's extension; "
                        "no paper defines it]")
    s.add_argument("--cafe-weights", default=None, metavar="W,W,...",
                   help="CAFE: weights of the aligned layers, shallow to deep, the embedding last (ConvNet depth "
                        "3: block 1, block 2, block 3, embedding). Default: the objective's reference, COBRA's "
                        "train_cafe.py: vanilla and fastfair's fairdd 1,1,1,2 (first..fourth_weight = 1, plus "
                        "the embedding's own term; CAFE's f4 and f5 are the same map), cobra 1,1,0.1,1.1 (its "
                        "cobra mode's fixed weights)")
    s.add_argument("--first_weight", "--second_weight", "--third_weight", "--fourth_weight", dest="cafe_family",
                   type=float, default=None, action=_CafeWeight, metavar="W",
                   help="CAFE's per-layer weights in CAFE's order (first: the last pooled map, second..fourth: "
                        "block 3..1), default 1 (COBRA's train_cafe.py); they build --cafe-weights as "
                        "fourth,third,second,1+first. COBRA's cobra mode ignores them, as its code does "
                        "[alias of CAFE's code]")
    s.add_argument("--inner-weight", type=float, default=None,
                   help="CAFE: weight of the discrimination loss (real embeddings classified by the synthetic "
                        "class centres, summed over real rows); default 0.01, cobra 0 (COBRA's cobra mode has "
                        "none)")
    s.add_argument("--inner_weight", dest="cafe_family_inner", type=float, default=None, metavar="W",
                   help="CAFE's spelling of --inner-weight; COBRA's cobra mode ignores it, as its code does "
                        "[alias of CAFE's code]")
    s.add_argument("--cafe-class-mean", default=None, choices=["on", "off"],
                   help="CAFE: divide each class's layer terms by the number of classes (default: on for cobra, "
                        "as COBRA's cobra mode does; off otherwise, as vanilla CAFE sums over classes)")
    s.add_argument("--lambda_1", "--lambda_2", dest="cafe_lambda", type=float, default=None, metavar="X",
                   help="CAFE's early-stop thresholds: accepted and ignored, because COBRA's train_cafe.py "
                        "resets its watcher every outer step, so they never stop a loop [alias of CAFE's code]")
    s.add_argument("--log-every", type=int, default=10, help="log the loss every N iterations")
    s.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also log the loss and the evaluations to TensorBoard event files in DIR (needs the "
                        "optional tensorboard package; default: no TensorBoard)")
    s.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every N iterations")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    # ---------------------------------------------------------------- eval
    e = sub.add_parser("eval", formatter_class=_FMT, help="train networks on a synthetic set (or a baseline) and "
                                                          "report Acc, DEO_M, DEO_A",
                       description="Evaluate PATH (a synset.pt or the directory holding it) and write "
                                   "metrics.json beside it, or evaluate a baseline with --baseline and --dataset. "
                                   + FAMILY_NOTE)
    e.add_argument("path", nargs="?", default=None, help="synset.pt or its directory (not with --baseline)")
    e.add_argument("--baseline", default=None, choices=["random", "whole"],
                   help="evaluate IPC random real images per class, or the whole training set, instead of PATH "
                        "(default: none, evaluate PATH)")
    _add_data(e, required=False)
    e.add_argument("--ipc", type=int, default=10, help="images per class of the random baseline")
    e.add_argument("--model", default="ConvNet", choices=list(NETWORKS),
                   help="evaluation network")
    e.add_argument("--runs", "--num_eval", type=int, default=None,
                   help="trained networks (mean and std over them); default: the preset recorded in the "
                        "synthetic set decides (fairdd 10, as FairDD's scripts pass; cobra 5; baselines 10)"
                        + _family("--num_eval"))
    e.add_argument("--epochs", "--epoch_eval_train", type=int, default=None,
                   help="training epochs Epoch (the reference trains Epoch + 1 and drops the lr after Epoch // 2 + "
                        "1); default: the reference protocol of the method recorded in the synthetic set: DM "
                        "(FairDD main_DM.py), DSA, IDC, DREAM 1000; DC 300 (FairDD main_DC.py); baselines 1000"
                        + _family("--epoch_eval_train"))
    e.add_argument("--width", type=int, default=None,
                   help="ConvNet/ViT width (default: 128)")
    e.add_argument("--dsa", default=None, choices=["on", "off"],
                   help="DSA while training; default: the method's reference protocol: on for DM, DSA, IDC, DREAM "
                        "and the baselines, off for DC (FairDD main_DC.py evaluates DC sets without augmentation)")
    e.add_argument("--no-dsa", action="store_true", help="the same as --dsa off")
    e.add_argument("--seed", type=int, default=0, help="seed of the first run (run r uses seed + r)")
    e.add_argument("--json", default=None, help="where to write the metrics (default: metrics.json beside PATH)")
    _add_device(e)
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    # -------------------------------------------------------------- export
    x = sub.add_parser(
        "export", formatter_class=_FMT, help="write a synthetic set in another code family's file layout",
        description="Write the synthetic set PATH (a synset.pt or its directory) in the layout another code "
                    "reads. dc: the DC/DSA/DM family's res_<method>_<dataset>_<model>_<ipc>ipc.pt, "
                    "{'data': [[image_syn, label_syn]], 'accs_all_exps': {model: [acc, ...]}} (the accuracies "
                    "of a metrics.json beside PATH, written by fastfair eval, as fractions; else empty), plus "
                    "the dataset's mean and std.")
    x.add_argument("path", help="synset.pt or its directory")
    x.add_argument("--format", default="dc", choices=list(EXPORT_FORMATS), help="file layout")
    x.add_argument("--out", default=None,
                   help="output file, or a directory for the family's file name (default: the family's file "
                        "name beside PATH)")

    # --------------------------------------------------------------- bench
    b = sub.add_parser(
        "bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="benchmarks: segment ops, DC per-group gradients, end-to-end step time",
        description="Run the benchmarks of fastfair.bench and write, per benchmark, OUT/<name>_<device>.json\n"
                    "and a log-log plot beside it (OUT/<name>_<device>.png):\n\n"
                    "  segment  group-count scaling of per-segment means, G = 1 .. 10^5: fastfair vs the\n"
                    "           reference masked loop, index_add_, scatter_reduce, torch_scatter where it\n"
                    "           imports (-> segment_ops_<device>.json)\n"
                    "  dc       the real-gradient side of one DC step, 10 classes, G = 1 .. 100: per-group\n"
                    "           gradients by the reference loop (one autograd.grad per group) vs one pass\n"
                    "           of segment_gradients, for the vanilla and FairDD objectives\n"
                    "           (-> dc_step_<device>.json)\n"
                    "  step     end-to-end distillation step time and peak memory vs G, DM and DC\n"
                    "           (-> step_time_<device>.json)\n"
                    "  cafe     one CAFE matching step at G = 1, 10, 100: vanilla / FairDD / COBRA, one pass\n"
                    "           vs the per-class, per-group reference loop (-> cafe_step_<device>.json)\n"
                    "  all      segment, dc, step, cafe in this order\n\n"
                    "Each also runs on its own with more options: python -m fastfair.bench.segment --help,\n"
                    "python -m fastfair.bench.dc_step --help, python -m fastfair.bench.step_time --help,\n"
                    "python -m fastfair.bench.cafe_step --help.\n"
                    "Full runs are long on a CPU (the reference loops at large G); --quick is shorter.")
    b.add_argument("which", choices=["segment", "dc", "step", "cafe", "all"], metavar="BENCHMARK",
                   help="segment, dc, step, cafe or all (see above)")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    b.add_argument("--quick", action="store_true",
                   help="smaller sizes: fewer rows and G up to 10^4 (segment), 40 real images per class "
                        "instead of 256 (dc), 64 (cafe), the scripts' quick settings (step)")
    b.add_argument("--out", default=os.path.join("benchmarks", "results"),
                   help="directory of the JSON and PNG files (default: benchmarks/results under the current "
                        "directory)")
    return p


# --------------------------------------------------------------------------- helpers


def _parse_options(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--data-option expects KEY=VALUE, got {item!r}")
        for conv in (int, float):
            try:
                out[key] = conv(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def _load_data(name: str, root: str | None, bias_ratio: float, options: dict[str, Any] | None = None,
               download: bool = False) -> Any:
    from . import data

    if root is not None and not os.path.isdir(root):
        raise FileNotFoundError(f"data root {root!r} does not exist")
    try:
        return data.load(name, root=root, bias_ratio=bias_ratio, download=download, **(options or {}))
    except FileNotFoundError as exc:
        # The loaders' hint speaks Python (download=True); say it in flags.
        msg = str(exc).replace("Pass download=True", "Pass --download")
        if root is None:
            msg += f" (no --root given, so the default root {data.registry.default_root()!r} was searched)"
        raise FileNotFoundError(msg) from None


def _check_device(device: str | None) -> None:
    """A bad --device is a usage error, found before any data are loaded."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UsageError(f"device {device!r} requested but CUDA is not available here (use --device cpu)")
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"device {device!r} requested but only {n} CUDA device(s) are visible")


def _check_out_dir(path: str, flag: str = "--out") -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a file, not a directory")


def _write_json(path: str, obj: Any) -> None:
    from .distill import outdir

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = (json.dumps(obj, indent=2) + "\n").encode()
    outdir.atomic_write(path, lambda f: f.write(text))


# --------------------------------------------------------------------------- commands


def _dsa_flag(a: argparse.Namespace) -> bool | None:
    """--dsa on|off (None: the method's paper default); --no-dsa is --dsa off."""
    if a.no_dsa and a.dsa == "on":
        raise UsageError("--no-dsa contradicts --dsa on")
    if a.no_dsa:
        return False
    return None if a.dsa is None else a.dsa == "on"


def cmd_distill(a: argparse.Namespace) -> int:
    from . import distill
    from . import distributed as dist
    from .distill import outdir
    from .augment import parse_strategy
    from .data.registry import canonical_name

    objective, preset = _family_objective(a)
    options = _parse_options(a.data_option)
    dsa_off = a.no_dsa or a.dsa_strategy.lower() in ("", "none")
    if not dsa_off:
        parse_strategy(a.dsa_strategy)  # ValueError naming the bad op, before any data are loaded
    cfg = distill.DistillConfig(
        dataset=canonical_name(a.dataset), method=a.method, objective=objective, ipc=a.ipc,
        iterations=a.iterations, lr_img=a.lr_img, momentum=a.momentum, batch_real=a.batch_real,
        real_chunk=a.real_chunk, dc_block_classes=a.dc_block_classes, outer_loop=a.outer_loop,
        inner_loop=a.inner_loop, lr_net=a.lr_net, batch_train=a.batch_train, dsa=False if dsa_off else _dsa_flag(a),
        dsa_per_sample=a.dsa_per_sample, preset=preset,
        dsa_strategy=DSA_STRATEGY if dsa_off else a.dsa_strategy, dc_metric=a.dc_metric, init=a.init,
        model=a.model, width=a.width, depth=a.depth, norm=a.norm, cobra_warmup_epochs=a.cobra_warmup_epochs,
        group_noise=a.group_noise, groups=a.groups, sample_per_group=a.sample_per_group, fair_over=a.fair_over,
        seed=a.seed, cafe_inner_weight=a.inner_weight,
        cafe_class_mean=None if a.cafe_class_mean is None else a.cafe_class_mean == "on",
        log_every=a.log_every, checkpoint_every=a.checkpoint_every, eval_every=a.eval_every,
        eval_model=a.eval_model, eval_epochs=a.eval_epochs, eval_runs=a.eval_runs, root=a.root,
        bias_ratio=a.bias_ratio, extra={"data_options": options} if options else {},
    )
    weights = _cafe_weights(a)
    if a.method != "cafe" and (weights is not None or a.inner_weight is not None or a.cafe_class_mean is not None
                               or a.cafe_family_inner is not None):
        raise UsageError("--cafe-weights, --first_weight .. --fourth_weight, --inner-weight and --cafe-class-mean "
                         "are CAFE's options; add --method cafe")
    if a.cafe_family_inner is not None and a.inner_weight is None:
        a.inner_weight = a.cafe_family_inner
        if a.method == "cafe" and objective == "cobra":
            print("note: COBRA's cobra mode of CAFE computes no discrimination loss and ignores --inner_weight; "
                  "so does fastfair: use --inner-weight to add one", file=sys.stderr)
            a.inner_weight = None
    if a.cafe_family and objective == "cobra":
        print("note: COBRA's cobra mode of CAFE ignores --first_weight .. --fourth_weight (its weights are fixed); "
              "so does fastfair: use --cafe-weights to change them", file=sys.stderr)
        weights = None
    cfg.cafe_weights, cfg.cafe_inner_weight = weights, a.inner_weight
    cfg = distill.resolve(cfg)  # bad settings fail before the data are loaded
    _check_device(a.device)
    outdir.check_writable_dir(a.out)
    _check_network(a.eval_model, "--eval-model")
    # Under torchrun: join the group, and destroy it however the run ends (a
    # group that the caller set up before calling main() is left alone).
    if a.tensorboard is not None:
        if not a.tensorboard.strip():
            raise UsageError("--tensorboard needs a directory (got an empty name)")
        # Proven writable before any work: tensorboard's writer thread would
        # only fail after the data are loaded, with its own traceback.
        outdir.check_writable_dir(a.tensorboard, "--tensorboard")
    writer_class = _tensorboard_writer_class() if a.tensorboard else None
    # The lock first: a second run into --out fails before it loads anything.
    with outdir.main_rank_lock(a.out), dist.process_group(device=a.device), contextlib.ExitStack() as stack:
        _resume_notice(a.out, a.resume)
        ds = _load_data(cfg.dataset, a.root, a.bias_ratio, options, a.download)
        on_log = None
        if writer_class is not None and dist.is_main():
            from .tboard import TensorBoardLogger

            on_log = TensorBoardLogger(a.tensorboard, cfg.to_dict(), writer_class)
            stack.callback(on_log.close)
        res = distill.run(cfg, ds, out_dir=a.out, device=a.device, resume=a.resume, progress=not a.no_progress,
                          on_log=on_log)
        if dist.is_main():
            print(f"{cfg.method}+{cfg.objective} on {cfg.dataset}, IPC {cfg.ipc}: {res.config.iterations} "
                  f"iterations in {res.seconds:.1f} s; synthetic set in {os.path.join(a.out, 'synset.pt')}")
    return 0


# The DC/DM family's own spellings: a command line using any of them is one
# of their scripts' lines, and means what it means in their code.
FAMILY_FLAGS = ("--Iteration", "--num_eval", "--lr_img", "--batch_real", "--epoch_eval_train", "--save_path",
                "--data_path", "--dsa_strategy", "--dis_metric", "--num_exp", "--lr_net", "--batch_train",
                "--eval_mode", "--FairDD", "--mode")


def _family_objective(a: argparse.Namespace) -> tuple[str, str | None]:
    """(objective, preset) from fastfair's --objective or the family's
    switches, never silently a different objective than the line asks for:
    --objective wins; COBRA's --mode names it (under COBRA's preset); FairDD's
    --FairDD means fairdd; a family line without either is vanilla, as in
    FairDD's code (said on stderr); else fastfair's default, fairdd."""
    if a.num_exp != 1:
        raise UsageError(f"--num_exp {a.num_exp}: fastfair runs one experiment per command; run it again with "
                         "another --seed")
    if a.eval_mode != "S":
        raise UsageError(f"--eval_mode {a.eval_mode}: fastfair evaluates the distillation network (S); for "
                         "other networks run fastfair eval --model NAME on the synthetic set")
    asked = [name for name, given in (("--objective", a.objective), ("--mode", a.mode),
                                      ("--FairDD", a.fairdd_flag or None)) if given is not None]
    if len(asked) > 1 and len({a.objective, a.mode, "fairdd" if a.fairdd_flag else None} - {None}) > 1:
        raise UsageError(f"{' and '.join(asked)} ask for different objectives; give one")
    preset = a.preset
    if a.mode is not None and preset is None:
        preset = "cobra"
    if a.objective is not None:
        return a.objective, preset
    if a.mode is not None:
        return a.mode, preset
    if a.fairdd_flag:
        return "fairdd", preset
    if getattr(a, "family_line", False):
        print("fastfair distill: a DC/DM-family command line without --FairDD: objective vanilla, as in "
              "FairDD's code (pass --FairDD or --objective fairdd for FairDD)", file=sys.stderr)
        return "vanilla", preset
    return "fairdd", preset


def _tensorboard_writer_class() -> Any:
    from .tboard import TensorBoardMissing, summary_writer_class

    try:
        return summary_writer_class()
    except TensorBoardMissing as exc:
        raise UsageError(str(exc)) from None


def _check_network(name: str, flag: str) -> None:
    from .nets import NETWORKS

    if name.lower() not in {n.lower() for n in NETWORKS}:
        raise UsageError(f"{flag}: unknown network {name!r}; choose one of {', '.join(NETWORKS)}")


def _resume_notice(out: str, resume: bool) -> None:
    """Say on stderr (rank 0 only) when --resume finds nothing to resume, or
    when a run without --resume is about to overwrite a checkpoint."""
    from .distill.checkpoint import CHECKPOINT

    if os.environ.get("RANK", "0") != "0":
        return
    has = os.path.isfile(os.path.join(out, CHECKPOINT))
    if resume and not has:
        print(f"fastfair distill: no {CHECKPOINT} in {out!r}; starting from iteration 0", file=sys.stderr)
    elif not resume and has:
        print(f"fastfair distill: {out!r} holds a {CHECKPOINT}; starting from iteration 0 and overwriting it "
              "(pass --resume to continue it)", file=sys.stderr)


def _synset_path(path: str) -> str:
    p = os.path.join(path, "synset.pt") if os.path.isdir(path) else path
    if not os.path.isfile(p):
        raise FileNotFoundError(f"no synthetic set at {p!r} (expected a synset.pt written by fastfair distill)")
    return p


def _read_synset(sp: str) -> dict[str, Any]:
    from .distill.synset import read_synset  # checks every field; ValueError -> one line, exit 2

    return read_synset(sp)


def _check_ipc(ds: Any, ipc: int) -> None:
    import torch

    sizes = torch.bincount(ds.train.labels.cpu(), minlength=ds.num_classes)
    c = int(sizes.argmin())
    if ipc > int(sizes[c]):
        raise UsageError(f"ipc {ipc} is larger than class {c} ({ds.class_names[c]}), which has {int(sizes[c])} "
                         "training images (use --baseline whole for every image)")


def cmd_eval(a: argparse.Namespace) -> int:
    from .distill import outdir
    from .evaluate import chance_note, evaluate_baseline, evaluate_synset
    from .metrics import COBRA_NAMES

    _check_device(a.device)
    kw: dict[str, Any] = dict(model=a.model, epochs=a.epochs, runs=a.runs, dsa=_dsa_flag(a), seed=a.seed,
                              device=a.device, progress=not a.no_progress)
    if a.width is not None:
        kw["net_kwargs"] = {"width": a.width}
    if a.baseline is not None:
        if a.path is not None:
            raise UsageError("give either PATH or --baseline, not both")
        if a.dataset is None:
            raise UsageError("--baseline needs --dataset")
        if a.json:  # before any training: metrics that cannot be written would be lost
            outdir.check_writable_file(a.json, "--json")
        ds = _load_data(a.dataset, a.root, a.bias_ratio, _parse_options(a.data_option), a.download)
        if a.baseline == "random":
            _check_ipc(ds, a.ipc)
        res = evaluate_baseline(a.baseline, ds, ipc=a.ipc, **kw)
        row = {"method": a.baseline, "objective": "-", "dataset": a.dataset}
        out_path = a.json
    else:
        if a.path is None:
            raise UsageError("give PATH (a synset.pt) or --baseline random|whole")
        sp = _synset_path(a.path)
        syn = _read_synset(sp)
        out_path = a.json or os.path.join(os.path.dirname(os.path.abspath(sp)), "metrics.json")
        outdir.check_writable_file(out_path, "--json" if a.json else "metrics.json (beside PATH; or pass --json)")
        cfg = syn.get("config", {})
        name = a.dataset or cfg.get("dataset")
        if name is None:
            raise UsageError(f"{sp} records no dataset; pass --dataset")
        root = a.root if a.root is not None else cfg.get("root")
        if a.dataset is None:  # the dataset the synthetic set was distilled from
            bias = cfg.get("bias_ratio", a.bias_ratio)
            options = {**cfg.get("extra", {}).get("data_options", {}), **_parse_options(a.data_option)}
        else:
            bias, options = a.bias_ratio, _parse_options(a.data_option)
        ds = _load_data(name, root, bias, options, a.download)
        res = evaluate_synset(syn["images"], syn["labels"], ds, method=cfg.get("method"), preset=cfg.get("preset"),
                              **kw)
        row = {"method": cfg.get("method", "?"), "objective": cfg.get("objective", "?"), "dataset": name}
    row.update({k: res[k] for k in ("acc", "acc_std", "deo_m", "deo_m_std", "deo_a", "deo_a_std", "suf_m", "suf_m_std", "suf_a", "suf_a_std")})
    runs = len(res["runs"])
    row.update(model=a.model, epochs=res["epochs"], dsa=res["dsa"], runs=runs, seconds=None)
    print(format_table([row], title=f"{row['dataset']}: {a.model}, {runs} runs x {res['epochs']} epochs "
                                   f"({'with' if res['dsa'] else 'without'} DSA)"))
    print(f"worst-group accuracy {res['worst_group_acc']:.2f} +- {res['worst_group_acc_std']:.2f} over "
          f"{res['test_cells']} (class, group) test cells")
    for name, m in res["per_attribute"].items():  # several protected attributes: each one's marginal fairness
        print(f"  attribute {name}: DEO_M {m['deo_m'][0]:.2f} +- {m['deo_m'][1]:.2f}  DEO_A {m['deo_a'][0]:.2f}  "
              f"SUF_M {m['suf_m'][0]:.2f}")
    row.update(test_cells=res["test_cells"], per_attribute=res["per_attribute"])
    note = chance_note(row["acc"], ds.num_classes)
    row["near_chance"] = note is not None
    if note:
        print(f"note: {note}")
    if out_path:
        from .heatmap import cell_heatmap, cells_payload, heatmap_path

        per_run = [{k: r[k] for k in ("acc", "deo_m", "deo_a", "suf_m", "suf_a", "worst_group_acc")}
                   for r in res["runs"]]
        cobra = {name: row[key] for name, key in COBRA_NAMES.items()}  # the same numbers, COBRA's names
        _write_json(out_path, {**row, **cobra, **cells_payload(res, ds), "per_run": per_run})
        png = cell_heatmap(res["cell_acc"], heatmap_path(out_path), class_names=ds.class_names,
                           group_names=ds.group_names,
                           title=f"{row['dataset']} {row['method']}+{row['objective']}: test accuracy per "
                                 f"(class, group), mean of {runs} runs")
        if res["per_attribute_cells"]:  # several attributes: per attribute, and the worst intersections
            from .heatmap import attribute_plots, worst_cells_plot

            stem = os.path.splitext(png)[0]
            title = f"{row['dataset']} {row['method']}+{row['objective']}"
            pngs = attribute_plots(res["per_attribute_cells"], ds, stem, title)
            pngs.append(worst_cells_plot(res["cell_acc"], f"{stem}_worst.png", class_names=ds.class_names,
                                         group_names=ds.group_names, title=f"{title}: the 20 worst cells"))
            _write_json(out_path, {**row, **cobra, **cells_payload(res, ds), "per_run": per_run,
                                   "per_attribute_cells": res["per_attribute_cells"]})
            png = ", ".join([png, *pngs])
        print(f"metrics written to {out_path}; per-cell heatmap in {png}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    import torch

    from . import export
    from .distill import outdir

    sp = _synset_path(a.path)
    syn = _read_synset(sp)
    here = os.path.dirname(os.path.abspath(sp))
    n = int(syn["labels"].numel())
    if n == 0:
        raise UsageError(f"{sp} holds no synthetic images; nothing to export")
    lo, hi = int(syn["labels"].min()), int(syn["labels"].max())
    c = int(syn.get("num_classes") or hi + 1)
    if lo < 0 or hi >= c or c > n:
        raise UsageError(f"{sp}: labels span [{lo}, {hi}] for {c} classes and {n} images; not a synthetic set "
                         "fastfair wrote")
    cfg = syn.get("config", {})
    name = export.dc_filename(cfg, int(cfg.get("ipc") or n // max(c, 1)))
    if a.out is None:
        out = os.path.join(here, name)
    elif os.path.isdir(a.out) or a.out.endswith(os.sep):
        out = os.path.join(a.out, name)
    else:
        out = a.out
    obj = export.to_dc(syn, os.path.join(here, "metrics.json"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # As every other output: a failed write (full disk, read-only folder) is one line naming the
    # file, keeps the previous file and leaves no temporary behind.
    outdir.atomic_write(out, lambda f: torch.save(obj, f))
    print(f"{sp} -> {out} (format {a.format}: {n} images, {c} classes)")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    import importlib

    import torch

    from .bench.timing import check_device

    # benchmark -> (module of fastfair.bench, stem of its result files)
    plan = {"segment": ("segment", "segment_ops"), "dc": ("dc_step", "dc_step"), "step": ("step_time", "step_time"),
            "cafe": ("cafe_step", "cafe_step")}
    device = check_device(a.device)  # ValueError: one line, exit 2
    status = 0
    for name in (["segment", "dc", "step", "cafe"] if a.which == "all" else [a.which]):
        module, stem = plan[name]
        full = f"{__package__}.bench.{module}"
        try:  # lazily: a benchmark's imports (matplotlib, ...) cost nothing until it runs
            mod = importlib.import_module(full)
        except ModuleNotFoundError as exc:
            if exc.name != full:
                raise
            print(f"fastfair bench {name}: error: {full} is not available in this installation", file=sys.stderr)
            status = EXIT_USAGE
            continue
        argv = ["--device", device, "--json",
                os.path.join(a.out, f"{stem}_{torch.device(device).type}.json")] + (["--quick"] if a.quick else [])
        print(f"== fastfair bench {name}: {' '.join(argv)}", flush=True)
        mod.main(argv)
    return status


def cmd_demo(a: argparse.Namespace) -> int:
    from .distill import outdir
    from .distill.demo import CellsStopped, run_demo

    _check_device(a.device)
    outdir.check_writable_dir(a.out)
    if a.json:
        outdir.check_writable_file(a.json, "--json")
    if a.threads is not None and a.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {a.threads}")
    if a.jobs is not None and a.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {a.jobs}")
    tiny = a.tiny or os.environ.get("FASTFAIR_DEMO_TINY", "") not in ("", "0")
    try:
        run_demo(out_dir=a.out, json_path=a.json, device=a.device, seed=a.seed, tiny=tiny, with_dc=not a.no_dc,
                 progress=not a.no_progress, threads=a.threads, jobs=a.jobs)
    except CellsStopped as stop:
        print(f"fastfair demo: error: {stop} (the finished cells are in "
              f"{a.json or os.path.join(a.out, 'results.json')})", file=sys.stderr)
        return 1
    return 0


def _split_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def cmd_reproduce(a: argparse.Namespace) -> int:
    cells = None
    if a.cells:
        cells = []
        for item in _split_list(a.cells) or []:
            method, sep, objective = item.partition(":")
            if not sep or not method or not objective:
                raise UsageError(f"--cells expects METHOD:OBJECTIVE items, got {item!r}")
            cells.append((method, objective))
    if a.threads is not None and a.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {a.threads}")
    if a.root is not None and not os.path.isdir(a.root):
        raise UsageError(f"data root {a.root!r} does not exist")
    _check_device(a.device)
    _check_out_dir(a.out)
    from .reproduce import reproduce

    res = reproduce(a.table, a.budget, a.out, root=a.root, datasets=_split_list(a.datasets), cells=cells,
                    seed=a.seed, device=a.device, progress=a.progress, threads=a.threads, note=a.note)
    with open(os.path.join(a.out, "results.md")) as f:
        print(f.read())
    print(f"{len(res['results'])} cells in {os.path.join(a.out, 'results.json')} (and results.md, results.png)")
    return 0


_COMMANDS = {"demo": cmd_demo, "distill": cmd_distill, "eval": cmd_eval, "export": cmd_export, "bench": cmd_bench,
             "reproduce": cmd_reproduce}


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    try:  # a Ctrl-C while the parser is built or reads the line: one line, not a traceback
        parser = build_parser()
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("fastfair: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT
    args.family_line = any(tok.split("=", 1)[0] in FAMILY_FLAGS for tok in argv)
    # SIGTERM (a job scheduler, `timeout`, `kill`) ends a command as Ctrl-C
    # does: distill saves its checkpoint, every output's temporary file is
    # removed on the way out, exit code 130.
    old_term = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        return _COMMANDS[args.command](args)
    except (UsageError, ValueError, OSError) as exc:  # OSError: a full disk, a read-only or missing path
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"fastfair {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fastfair: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
