"""The distillation loop shared by every method: state, logging, progress bar,
checkpoints, resume, Ctrl-C, evaluation during the run, and the output files.

State commits are atomic: an iteration builds new tensors (see
:func:`fastfair.distill.synset.sgd_step`) and the loop swaps them in with ONE
assignment when the iteration has finished. A KeyboardInterrupt at any moment
therefore finds the state of the last finished iteration, which is saved to
``checkpoint.pt`` before the interrupt propagates; ``resume=True`` continues
from it and, for the same seed, ends with the same synthetic set as a run that
was never interrupted (bitwise on CPU; on GPU as far as the kernels are
deterministic).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import distributed as dist
from .. import ops
from . import checkpoint as ck
from . import outdir
from . import rng
from .config import RESUMABLE_CHANGES, DistillConfig, resolve, resume_mismatch
from .cafe import cafe_iteration
from .context import build_context
from .dc import RandomBatches, dc_iteration
from .dm import dm_iteration
from .dream import DreamSelector
from .synset import atomic_save, init_images, save_grid


class NonFiniteError(ValueError):
    """The loss or the synthetic images stopped being finite (a too large
    image learning rate, typically); nothing of the non-finite state is saved."""


class _State(NamedTuple):
    iteration: int  # finished iterations
    images: Tensor
    buf: Tensor | None  # momentum buffer
    source: Any  # the real-batch source's state (DREAM)
    loss_sum: Tensor  # losses since the last log line (device), and how many
    loss_n: int
    finite: Tensor  # device bool: every loss and image update so far was finite


def _non_finite(by: int, good: int, out_dir: str | None) -> NonFiniteError:
    kept = f"; nothing non-finite was written: {out_dir} keeps its last checkpoint" if out_dir else ""
    return NonFiniteError(f"the loss or the synthetic images became non-finite (NaN or inf) between iterations "
                          f"{good} and {by}; lower --lr-img (or the network's lr){kept}")


@dataclass
class DistillResult:
    """A finished run: ``images`` / ``labels`` are the training set for
    evaluation (IDC: the decoded sub-images), ``stored`` the stored images."""

    images: Tensor
    labels: Tensor
    log: list[dict[str, Any]]
    config: DistillConfig
    stored: Tensor
    seconds: float
    out_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _floats(values: Any) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


def load_dataset(cfg: DistillConfig) -> Any:
    from .. import data

    return data.load(cfg.dataset, root=cfg.root, bias_ratio=cfg.bias_ratio, **cfg.extra.get("data_options", {}))


def _evaluate(cfg: DistillConfig, images: Tensor, labels: Tensor, dataset: Any, device: torch.device) -> dict:
    from ..evaluate import evaluate_synset

    kw: dict[str, Any] = {}
    if cfg.eval_width is not None:
        kw["net_kwargs"] = {"width": cfg.eval_width}
    res = evaluate_synset(images, labels, dataset, model=cfg.eval_model, epochs=cfg.eval_epochs,
                          runs=cfg.eval_runs, seed=cfg.seed, device=device, progress=False, method=cfg.method,
                          preset=cfg.preset, **kw)
    ev = {k: res[k] for k in ("acc", "acc_std", "deo_m", "deo_m_std", "deo_a", "deo_a_std", "suf_m", "suf_m_std",
                              "suf_a", "suf_a_std")}
    if res["per_attribute"]:  # several attributes: a curve over iterations needs each one's marginal gaps too
        ev["per_attribute"] = res["per_attribute"]
    ev["deo_floor"] = res["deo_floor"]  # what a group-blind model would score at this point's accuracies
    return ev


def run(config: DistillConfig, dataset: Any = None, out_dir: str | None = None,
        device: str | torch.device | None = None, resume: bool = False, progress: bool = True,
        on_log: Callable[[dict[str, Any]], None] | None = None) -> DistillResult:
    """Distil ``dataset`` (a ``fastfair.data`` dataset; None: load
    ``config.dataset``) with ``config.method`` and ``config.objective``.

    With ``out_dir``, rank 0 writes ``synset.pt``, ``grid.png``, ``log.jsonl``
    and ``checkpoint.pt`` (every ``checkpoint_every`` iterations, at the end,
    and on Ctrl-C). ``resume=True`` continues from ``out_dir/checkpoint.pt``
    (a fresh start when there is none); ``iterations`` may be raised on resume.
    The writing process holds an exclusive lock on ``out_dir``
    (:func:`fastfair.distill.outdir.locked`): a second run into it fails at once.
    ``on_log`` (rank 0) receives every log entry as it is written, e.g. for
    :class:`fastfair.tboard.TensorBoardLogger`.
    """
    config = resolve(config)  # bad settings fail before out_dir is created
    write = out_dir is not None and dist.is_main()
    with outdir.locked(out_dir) if write else contextlib.nullcontext():
        return _run(config, dataset, out_dir, device, resume, progress, on_log)


def _run(config: DistillConfig, dataset: Any, out_dir: str | None, device: str | torch.device | None,
         resume: bool, progress: bool, on_log: Callable[[dict[str, Any]], None] | None) -> DistillResult:
    cfg = resolve(config)
    dev = _device(device)
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (where the checkpoint lives)")
    # A damaged checkpoint fails before the dataset and the networks are built.
    saved = ck.load_checkpoint(out_dir) if resume else None
    if dataset is None:
        dataset = load_dataset(cfg)
    ctx = build_context(cfg, dataset, dev)
    main = dist.is_main()
    write = out_dir is not None and main
    if write:
        os.makedirs(out_dir, exist_ok=True)

    source = DreamSelector() if cfg.method == "dream" else RandomBatches()
    step = {"dm": dm_iteration, "cafe": cafe_iteration}.get(cfg.method) or partial(dc_iteration, source=source)

    if saved is not None:
        if not isinstance(saved.get("config"), dict):
            raise ValueError(f"{os.path.join(out_dir, ck.CHECKPOINT)}: field 'config' is missing or not a dict; "
                             "the checkpoint is damaged (move it away to start afresh)")
        bad = resume_mismatch(saved["config"], cfg)
        if bad:
            raise ValueError(f"cannot resume {out_dir}: the checkpoint was made with different "
                             f"{', '.join(bad)} (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)")
        ck.check_fields(saved, os.path.join(out_dir, ck.CHECKPOINT), iterations=cfg.iterations,
                        images_shape=(int(ctx.syn_labels.numel()), *ctx.train_images.shape[1:]),
                        labels=ctx.syn_labels, num_train=int(ctx.train_images.shape[0]),
                        num_classes=ctx.num_classes)
        if saved.get("world_size", 1) != ctx.world_size and cfg.method == "dream":
            # The global batch and its DSA parameters do not depend on the
            # number of ranks (up to float rounding); DREAM's k-means does: each
            # rank clusters its own share of the pool.
            warnings.warn(f"resuming a {saved.get('world_size', 1)}-process DREAM run with {ctx.world_size} "
                          "processes: each rank clusters its share of the pool, so the representatives differ",
                          stacklevel=2)
        images, buf = saved["images"].to(dev), saved["buf"]
        buf = buf.to(dev) if buf is not None else None
        source.load_state_dict(saved["source"])
        start, log, elapsed = int(saved["iteration"]), list(saved["log"]), float(saved["seconds"])
    else:
        attrs = getattr(ctx.dataset, "attributes", None)
        images, _ = init_images(ctx.sampler.class_pool, ctx.train_images, cfg.ipc, cfg.init, ctx.factor,
                                rng.generator(cfg.seed, 0, rng.INIT), tile=cfg.idc_recipe != "cobra",
                                cell_pools=ctx.sampler.cell_pool,
                                attribute_sizes=attrs.sizes if attrs is not None else None)
        images, buf = images.to(dev), None
        start, log, elapsed = 0, [], 0.0
    if write:
        ck.rewrite_log(out_dir, log)

    # Everything a finished iteration leaves behind, replaced by ONE assignment
    # so that an interrupt always sees a consistent state.
    zero = torch.zeros((), device=dev)
    window = saved.get("loss_window") if saved is not None else None
    acc = zero if window is None else window[0].to(dev)
    state = _State(start, images, buf, source.state_dict(), acc, 0 if window is None else window[1],
                   torch.ones((), dtype=torch.bool, device=dev))
    last_good = start  # the newest iteration known to be finite (checkpoints are only written of those)
    t0 = time.perf_counter()

    def seconds() -> float:
        return elapsed + time.perf_counter() - t0

    def check_finite(st: _State) -> None:
        # One host sync, at points that sync anyway (a checkpoint, an evaluation).
        if not bool(st.finite):
            raise _non_finite(st.iteration, last_good, out_dir if write else None)

    def checkpoint() -> None:
        if write:
            st = state
            check_finite(st)
            # A window already written to the log (an interrupt between the
            # log line and the window reset) is empty.
            logged = (st.iteration % cfg.log_every == 0 and bool(log) and log[-1].get("iteration") == st.iteration
                      and "loss" in log[-1])
            ck.save_checkpoint(out_dir, {
                "iteration": st.iteration, "images": st.images.detach().cpu(),
                "buf": None if st.buf is None else st.buf.cpu(), "labels": ctx.syn_labels.cpu(),
                "source": st.source, "log": log, "seconds": seconds(), "config": cfg.to_dict(),
                "world_size": ctx.world_size,
                "loss_window": None if logged or st.loss_n == 0 else (st.loss_sum.detach().cpu(), st.loss_n),
            })

    desc = f"{cfg.method}+{cfg.objective}"
    bar = tqdm(total=cfg.iterations, initial=start, desc=desc, unit="it", disable=not (progress and main),
               file=sys.stderr, dynamic_ncols=True)
    try:
        with ops.validate_ids(False):
            while state.iteration < cfg.iterations:
                it, imgs, b = state.iteration, state.images, state.buf
                new_imgs, new_buf, loss = step(ctx, imgs, b, it)
                # A device-side flag: no host sync per iteration; read where the
                # loop syncs anyway, before anything is written.
                ok = state.finite & torch.isfinite(loss) & torch.isfinite(new_imgs).all()
                state = _State(it + 1, new_imgs, new_buf, source.state_dict(), state.loss_sum + loss,
                               state.loss_n + 1, ok)
                done = it + 1
                bar.update(1)
                if done % cfg.log_every == 0 or done == cfg.iterations:
                    # The only host sync of an iteration, every log_every iterations;
                    # out-of-range ids that a CUDA kernel recorded since the last
                    # one are raised here.
                    ops.raise_pending_errors()
                    mean, fin = torch.stack([state.loss_sum / state.loss_n, state.finite.to(zero.dtype)]).tolist()
                    if not fin:
                        raise _non_finite(done, last_good, out_dir if write else None)
                    last_good = done
                    entry = {"iteration": done, "loss": mean, "seconds": round(seconds(), 3)}
                    log.append(entry)
                    if done % cfg.log_every == 0:
                        # (the last line of a run off the grid keeps its window: a
                        # resume with more iterations logs what a longer run would)
                        state = state._replace(loss_sum=zero, loss_n=0)
                    bar.set_postfix(loss=f"{entry['loss']:.4g}")
                    if write:
                        ck.append_log(out_dir, entry)
                    if on_log is not None and main:
                        on_log(entry)
                if cfg.eval_every and done % cfg.eval_every == 0:
                    check_finite(state)
                    # Rank 0 evaluates. The others wait for it with a timeout of
                    # its own (dist.run_on_main says why), not in the next
                    # iteration's collective, whose timeout a long evaluation
                    # would exceed.
                    syn = state.images
                    ev = dist.run_on_main(lambda: _evaluate(cfg, ctx.decode(syn.detach()).cpu(),
                                                            ctx.dec_labels.cpu(), dataset, dev))
                    if main:
                        entry = {"iteration": done, "eval": ev, "seconds": round(seconds(), 3)}
                        log.append(entry)
                        from ..evaluate import chance_note

                        note = chance_note(ev["acc"], ctx.num_classes)
                        marg = "".join(f"  {name} DEO_M {m['deo_m'][0]:.2f}"
                                       for name, m in ev.get("per_attribute", {}).items())
                        bar.write(f"[{desc}] iteration {done}: acc {ev['acc']:.2f}  DEO_M {ev['deo_m']:.2f}  "
                                  f"DEO_A {ev['deo_a']:.2f}{marg}  (chance DEO_M {ev['deo_floor']['deo_m'][0]:.1f})"
                                  + (f"  ({note})" if note else ""))
                        if write:
                            ck.append_log(out_dir, entry)
                        if on_log is not None:
                            on_log(entry)
                if done % cfg.checkpoint_every == 0 and done < cfg.iterations:
                    checkpoint()
                    last_good = done
    except KeyboardInterrupt:
        bar.close()
        checkpoint()
        if main:
            where = f"; checkpoint in {out_dir}, continue with resume" if write else ""
            print(f"\ninterrupted after {state.iteration} finished iterations{where}", file=sys.stderr)
        raise
    bar.close()
    total = seconds()
    check_finite(state)
    checkpoint()

    stored = state.images.detach()
    train_images = ctx.decode(stored).cpu()
    labels = ctx.dec_labels.cpu()
    if write:
        payload = {"images": train_images, "labels": labels, "config": cfg.to_dict(), "iterations": state.iteration,
                   "seconds": total, "num_classes": ctx.num_classes, "factor": ctx.factor,
                   # What the images are normalised with: to view or de-normalise them without the dataset.
                   "mean": _floats(getattr(dataset, "mean", None)), "std": _floats(getattr(dataset, "std", None))}
        if ctx.factor > 1:
            payload["stored"] = stored.cpu()
        atomic_save(payload, os.path.join(out_dir, ck.SYNSET))
        save_grid(train_images, labels, ctx.num_classes, getattr(dataset, "denormalize", None),
                  os.path.join(out_dir, ck.GRID))
    dist.barrier()
    return DistillResult(images=train_images, labels=labels, log=log, config=cfg, stored=stored.cpu(),
                         seconds=total, out_dir=out_dir)
