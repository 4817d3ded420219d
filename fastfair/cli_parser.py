"""The ``fastfair`` command line's parser: every subcommand's options and
help text, and the one-line error format. :mod:`fastfair.cli` runs the
commands; this module only describes them (no torch)."""
from __future__ import annotations

import argparse
import os

from .choices import (BASELINES, BUDGETS, DC_METRICS, DSA_STRATEGY, EXPORT_FORMATS, GROUP_SOURCES, INITS, METHODS,
                      NETWORKS, OBJECTIVES, PRESETS, TABLES)

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
                description="Fair dataset distillation (DM, DC, IDC, DREAM, CAFE x vanilla / FairDD / COBRA) "
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
                                   "their checkpoint and finished evaluation runs. Two processes on one --out "
                                   "share it: a cell another process is running is left to it (the same command "
                                   "started twice uses two cores).")
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
                        "for each IDC or DREAM cell; the summary is in the outputs); cpu-long: the cpu budget with "
                        "DM run 6x as long and IDC and DREAM 2x and evaluated as DM (where the measured iteration "
                        "curves say the budget buys fairness: C-FMNIST DM, C-MNIST IDC); cpu-20min, cpu-short: the "
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
    bars = r.add_mutually_exclusive_group()
    bars.add_argument("--progress", dest="progress", action="store_true", default=None,
                      help="progress bars of each cell's distillation and evaluation (default: when stderr is a "
                           "terminal; a log file gets the per-cell lines only)")
    bars.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    r.add_argument("--status", action="store_true",
                   help="run nothing: list where each cell of this command stands in --out (done with its numbers, "
                        "evaluating k of R runs, distilling at iteration i, not started; which process is running "
                        "it), read without locking or writing, so safe beside the running processes")

    # -------------------------------------------------------------- spread
    sp = sub.add_parser("spread", formatter_class=_FMT,
                        help="a reproduce cell's mean and spread over distillation seeds (several --seed runs)",
                        description="Read several `fastfair reproduce` output directories that ran the same cells "
                                    "with different --seed, match the cells by their settings (seeds aside; any "
                                    "other difference is an error) and print, per cell, every seed's Acc / DEO_M, "
                                    "the mean over seeds and the standard deviation over seeds beside the mean "
                                    "spread over evaluation networks within one seed. A cell's +- in results.md "
                                    "is the latter only: all its networks train on one synthetic set.")
    sp.add_argument("dirs", nargs="+", metavar="DIR", help="reproduce output directories (each with results.json)")
    sp.add_argument("--out", default=None,
                    help="write OUT/spread.json, spread.md and spread.png (default: print the table only)")

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
                        "(COBRA barycenter), fairdd-iw / -ldam / -groupdro (FairDD's Table 7 ablations), fairdd-raked "
                        "(fastfair's, several attributes: the intersection's FairDD terms weighted so each "
                        "attribute's marginal weight is uniform; docs/methods.md). Default: "
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
    s.add_argument("--eval-width", type=int, default=None,
                   help="width of the network of those evaluations (default: the network's, 128 for ConvNet; "
                        "the cpu budgets evaluate at 32)")
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
                        "FairDD's and COBRA's DC and DM code default to real images too]; real-balanced: real images "
                        "spread as evenly as the data allow over each class's groups and every attribute's values "
                        "(fastfair's option: a biased class otherwise starts ~90%% in its majority group)")
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
    e.add_argument("--baseline", default=None, choices=list(BASELINES),
                   help="evaluate IPC random real images per class (random: as the data are biased; "
                        "random-balanced: spread over each class's groups and every attribute's values, "
                        "fastfair's), or the whole training set, instead of PATH (default: none, evaluate PATH)")
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
