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

from .choices import DSA_STRATEGY
from .cli_parser import EXIT_INTERRUPT, EXIT_USAGE, UsageError, _cafe_weights, build_parser
from .report import floor_line, format_table


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
        eval_model=a.eval_model, eval_epochs=a.eval_epochs, eval_runs=a.eval_runs, eval_width=a.eval_width, root=a.root,
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
    given = {"--eval-runs": a.eval_runs is not None, "--eval-epochs": a.eval_epochs is not None,
             "--eval-width": a.eval_width is not None, "--eval-model": a.eval_model != "ConvNet"}
    unused = [flag for flag, on in given.items() if on]
    if unused and not a.eval_every:
        # Said before the run, not discovered after it: these shape the
        # evaluations DURING the run, and --eval-every 0 (the default) has none.
        print(f"note: {', '.join(unused)} set but --eval-every is 0, so the run evaluates nothing; add "
              f"--eval-every N (N = --iterations for one evaluation at the end) or run `fastfair eval {a.out}` "
              "afterwards", file=sys.stderr)
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
        ds = _load_data(cfg.dataset, a.root, a.bias_ratio, options, a.download)
        from .distill.context import check_fair_over

        check_fair_over(cfg, ds)  # a wrong --fair-over fails before the checkpoint notice below
        _resume_notice(a.out, a.resume)
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
        if a.baseline != "whole":
            _check_ipc(ds, a.ipc)
        res = evaluate_baseline(a.baseline, ds, ipc=a.ipc, **kw)
        row = {"method": a.baseline, "objective": "-", "dataset": a.dataset}
        out_path = a.json
    else:
        if a.path is None:
            raise UsageError("give PATH (a synset.pt) or --baseline random|random-balanced|whole")
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
    row.update(test_cells=res["test_cells"], per_attribute=res["per_attribute"], deo_floor=res["deo_floor"])
    print(floor_line(res["deo_floor"]))
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
    if a.status:
        from .reproduce_status import status, text

        if not os.path.isdir(a.out):
            raise UsageError(f"--out {a.out!r} does not exist: nothing has run there yet")
        print(text(status(a.table, a.budget, a.out, datasets=_split_list(a.datasets), cells=cells, seed=a.seed)),
              end="")
        return 0
    if a.threads is not None and a.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {a.threads}")
    if a.root is not None and not os.path.isdir(a.root):
        raise UsageError(f"data root {a.root!r} does not exist")
    _check_device(a.device)
    _check_out_dir(a.out)
    from .reproduce import reproduce

    res = reproduce(a.table, a.budget, a.out, root=a.root, datasets=_split_list(a.datasets), cells=cells,
                    seed=a.seed, device=a.device,
                    progress=sys.stderr.isatty() if a.progress is None else a.progress, threads=a.threads, note=a.note)
    with open(os.path.join(a.out, "results.md")) as f:
        print(f.read())
    print(f"{len(res['results'])} cells in {os.path.join(a.out, 'results.json')} (and results.md, results.png)")
    if res.get("elsewhere"):
        print(f"{len(res['elsewhere'])} cells were being run by another process and are left to it: "
              f"{', '.join(res['elsewhere'])}; the results files gain them when it finishes them "
              "(`fastfair reproduce ... --status` shows where they stand)")
    return 0


def cmd_spread(a: argparse.Namespace) -> int:
    from . import seed_spread

    s = seed_spread.spread(a.dirs)
    print(seed_spread.markdown(s))
    if a.out:
        _check_out_dir(a.out)
        paths = seed_spread.write(s, a.out)
        print(f"{len(s['cells'])} cells in {', '.join(paths)}")
    return 0


_COMMANDS = {"demo": cmd_demo, "distill": cmd_distill, "eval": cmd_eval, "export": cmd_export, "bench": cmd_bench,
             "reproduce": cmd_reproduce, "spread": cmd_spread}


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
