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

import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import distributed as dist
from .. import ops
from . import checkpoint as ck
from . import rng
from .config import RESUMABLE_CHANGES, DistillConfig, resolve, resume_mismatch
from .context import build_context
from .dc import RandomBatches, dc_iteration
from .dm import dm_iteration
from .dream import DreamSelector
from .synset import atomic_save, decode, init_images, save_grid


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


def load_dataset(cfg: DistillConfig) -> Any:
    from .. import data

    return data.load(cfg.dataset, root=cfg.root, bias_ratio=cfg.bias_ratio, **cfg.extra.get("data_options", {}))


def _evaluate(cfg: DistillConfig, images: Tensor, labels: Tensor, dataset: Any, device: torch.device) -> dict:
    from ..evaluate import evaluate_synset

    kw: dict[str, Any] = {}
    if cfg.eval_width is not None:
        kw["net_kwargs"] = {"width": cfg.eval_width}
    res = evaluate_synset(images, labels, dataset, model=cfg.eval_model, epochs=cfg.eval_epochs,
                          runs=cfg.eval_runs, seed=cfg.seed, device=device, progress=False, **kw)
    return {k: res[k] for k in ("acc", "acc_std", "deo_m", "deo_m_std", "deo_a", "deo_a_std")}


def run(config: DistillConfig, dataset: Any = None, out_dir: str | None = None,
        device: str | torch.device | None = None, resume: bool = False, progress: bool = True) -> DistillResult:
    """Distil ``dataset`` (a ``fastfair.data`` dataset; None: load
    ``config.dataset``) with ``config.method`` and ``config.objective``.

    With ``out_dir``, rank 0 writes ``synset.pt``, ``grid.png``, ``log.jsonl``
    and ``checkpoint.pt`` (every ``checkpoint_every`` iterations, at the end,
    and on Ctrl-C). ``resume=True`` continues from ``out_dir/checkpoint.pt``
    (a fresh start when there is none); ``iterations`` may be raised on resume.
    """
    cfg = resolve(config)
    dev = _device(device)
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (where the checkpoint lives)")
    if dataset is None:
        dataset = load_dataset(cfg)
    ctx = build_context(cfg, dataset, dev)
    main = dist.is_main()
    write = out_dir is not None and main
    if write:
        os.makedirs(out_dir, exist_ok=True)

    source = DreamSelector() if cfg.method == "dream" else RandomBatches()
    step = dm_iteration if cfg.method == "dm" else partial(dc_iteration, source=source)

    saved = ck.load_checkpoint(out_dir) if resume else None
    if saved is not None:
        bad = resume_mismatch(saved["config"], cfg)
        if bad:
            raise ValueError(f"cannot resume {out_dir}: the checkpoint was made with different "
                             f"{', '.join(bad)} (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)")
        if saved["iteration"] > cfg.iterations:
            raise ValueError(f"the checkpoint in {out_dir} already has {saved['iteration']} iterations, "
                             f"more than the {cfg.iterations} requested")
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
        images, _ = init_images(ctx.sampler.class_pool, ctx.train_images, cfg.ipc, cfg.init, ctx.factor,
                                rng.generator(cfg.seed, 0, rng.INIT))
        images, buf = images.to(dev), None
        start, log, elapsed = 0, [], 0.0
    if write:
        ck.rewrite_log(out_dir, log)

    # (finished iterations, images, momentum buffer, batch-source state): replaced
    # by one assignment, so an interrupt always sees a consistent state.
    state = (start, images, buf, source.state_dict())
    t0 = time.perf_counter()

    def seconds() -> float:
        return elapsed + time.perf_counter() - t0

    def checkpoint() -> None:
        if write:
            it, imgs, b, src = state
            ck.save_checkpoint(out_dir, {
                "iteration": it, "images": imgs.detach().cpu(), "buf": None if b is None else b.cpu(),
                "labels": ctx.syn_labels.cpu(), "source": src, "log": log, "seconds": seconds(),
                "config": cfg.to_dict(), "world_size": ctx.world_size,
            })

    loss_acc = torch.zeros((), device=dev)
    n_acc = 0
    desc = f"{cfg.method}+{cfg.objective}"
    bar = tqdm(total=cfg.iterations, initial=start, desc=desc, unit="it", disable=not (progress and main),
               file=sys.stderr, dynamic_ncols=True)
    try:
        with ops.validate_ids(False):
            while state[0] < cfg.iterations:
                it, imgs, b, _ = state
                new_imgs, new_buf, loss = step(ctx, imgs, b, it)
                state = (it + 1, new_imgs, new_buf, source.state_dict())
                done = it + 1
                bar.update(1)
                loss_acc = loss_acc + loss
                n_acc += 1
                if done % cfg.log_every == 0 or done == cfg.iterations:
                    # The only host sync of an iteration, every log_every iterations;
                    # out-of-range ids that a CUDA kernel recorded since the last
                    # one are raised here.
                    ops.raise_pending_errors()
                    entry = {"iteration": done, "loss": float(loss_acc / n_acc), "seconds": round(seconds(), 3)}
                    loss_acc, n_acc = torch.zeros((), device=dev), 0
                    log.append(entry)
                    bar.set_postfix(loss=f"{entry['loss']:.4g}")
                    if write:
                        ck.append_log(out_dir, entry)
                if cfg.eval_every and done % cfg.eval_every == 0:
                    # Rank 0 evaluates. The others wait for it with a timeout of
                    # its own (dist.run_on_main says why), not in the next
                    # iteration's collective, whose timeout a long evaluation
                    # would exceed.
                    syn = state[1]
                    ev = dist.run_on_main(lambda: _evaluate(cfg, decode(syn.detach(), ctx.factor).cpu(),
                                                            ctx.dec_labels.cpu(), dataset, dev))
                    if main:
                        entry = {"iteration": done, "eval": ev, "seconds": round(seconds(), 3)}
                        log.append(entry)
                        bar.write(f"[{desc}] iteration {done}: acc {ev['acc']:.2f}  DEO_M {ev['deo_m']:.2f}  "
                                  f"DEO_A {ev['deo_a']:.2f}")
                        if write:
                            ck.append_log(out_dir, entry)
                if done % cfg.checkpoint_every == 0 and done < cfg.iterations:
                    checkpoint()
    except KeyboardInterrupt:
        bar.close()
        checkpoint()
        if main:
            where = f"; checkpoint in {out_dir}, continue with resume" if write else ""
            print(f"\ninterrupted after {state[0]} finished iterations{where}", file=sys.stderr)
        raise
    bar.close()
    total = seconds()
    checkpoint()

    _, stored, _, _ = state
    stored = stored.detach()
    train_images = decode(stored, ctx.factor).cpu()
    labels = ctx.dec_labels.cpu()
    if write:
        payload = {"images": train_images, "labels": labels, "config": cfg.to_dict(), "iterations": state[0],
                   "seconds": total, "num_classes": ctx.num_classes, "factor": ctx.factor}
        if ctx.factor > 1:
            payload["stored"] = stored.cpu()
        atomic_save(payload, os.path.join(out_dir, ck.SYNSET))
        save_grid(train_images, labels, ctx.num_classes, getattr(dataset, "denormalize", None),
                  os.path.join(out_dir, ck.GRID))
    dist.barrier()
    return DistillResult(images=train_images, labels=labels, log=log, config=cfg, stored=stored.cpu(),
                         seconds=total, out_dir=out_dir)
