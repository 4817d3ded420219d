"""Train-on-synthetic evaluation: accuracy and fairness of networks trained on a
(distilled or baseline) training set and tested on the balanced test split.

Protocol of the DC/DM/FairDD code (docs/methods.md): a fresh network per run, SGD
lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, cross-entropy, and the
reference's schedule: ``Epoch + 1`` epochs, the lr x0.1 (with a fresh SGD
optimizer, as the reference re-creates it) after epoch ``Epoch // 2 + 1``.
Epochs and augmentation per method (:func:`method_protocol`): DM 1000 epochs
with DSA (FairDD main_DM.py); DC 300 epochs without augmentation (FairDD
main_DC.py; the FairDD datasets get no DC augmentation); DSA, IDC and DREAM
1000 epochs with DSA (the DSA protocol; IDC's / DREAM's own evaluation adds
mixup, which fastfair does not implement). Training DSA draws parameters per
sample, as the reference's ``DiffAugment(seed=-1)`` does.

The preset (``fairdd`` or ``cobra``, the paper whose protocol a run follows)
decides the schedule and the number of trained networks
(:func:`method_protocol`, :func:`preset_runs`): ``fairdd`` as above with 10
networks (FairDD's scripts/main_DM.sh and main_DC.sh pass ``--num_eval 10``;
its argparse default is 20); ``cobra`` evaluates DM sets for 1500 epochs
(with DSA), DC and IDC sets for 1000 (without augmentation), as COBRA's
code does, with 5 networks (its run_dm.sh and run_dc.sh pass --num_eval 5),
3 for IDC (run_idc.sh) and 2 for CAFE (run_cafe.sh). CAFE sets are evaluated 1000 epochs without
augmentation under both presets (COBRA's train_cafe.py: epoch_eval_train
1000, no DSA strategy; FairDD has no CAFE).

``dataset`` is duck-typed (``fastfair.data.BiasedDataset``): ``train`` / ``test``
splits with ``.images`` [N, C, H, W] float, ``.labels`` [N] and ``.groups`` [N]
int64, plus ``num_classes``, ``num_groups``, ``channels``, ``image_size``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .attributes import balanced_rows
from .augment import DEFAULT_STRATEGY, dsa as dsa_augment
from .metrics import attribute_reports, class_accuracy, deo_chance_floor, fairness_report
from .eval_protocol import (DEFAULT_EPOCHS, METHOD_PROTOCOL, PRESET_METHOD_RUNS, PRESET_PROTOCOL,  # noqa: F401
                            PRESET_RUNS, method_protocol, preset_runs)
from .nets import get_network

_EVAL_BATCH = 1024
_METRICS = ("acc", "deo_m", "deo_a", "suf_m", "suf_a")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_synset(images: Tensor, labels: Tensor, dataset: Any) -> None:
    if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
        raise ValueError("images and labels must be torch tensors")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor [N], got {labels.dtype} {tuple(labels.shape)}")
    n = images.shape[0]
    if n == 0:
        raise ValueError("the training set is empty")
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        # Networks trained on NaN predict one class: DEO 0 would read as "fair".
        raise ValueError(f"the training images hold {bad} non-finite values (NaN or inf) of {images.numel()}; "
                         "refusing to evaluate them")
    if labels.shape[0] != n:
        raise ValueError(f"{n} images but {labels.shape[0]} labels")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= dataset.num_classes:
        raise ValueError(f"labels must lie in [0, {dataset.num_classes}), got range [{lo}, {hi}]")
    want = (dataset.channels, dataset.image_size, dataset.image_size)
    if tuple(images.shape[1:]) != want:
        raise ValueError(f"images must be [N, {want[0]}, {want[1]}, {want[2]}] to match the dataset, "
                         f"got {tuple(images.shape)}")


@torch.no_grad()
def predict(net: nn.Module, images: Tensor, device: torch.device, batch_size: int = _EVAL_BATCH) -> Tensor:
    """Predicted class ids (on CPU) of ``images``, in batches, eval mode, no grad."""
    net.eval()
    out = [net(images[i:i + batch_size].to(device, non_blocking=True)).argmax(dim=1).cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def lr_drop_epoch(epochs: int) -> int:
    """The epoch after which the reference multiplies the lr by 0.1."""
    return epochs // 2 + 1


def train_network(net: nn.Module, images: Tensor, labels: Tensor, epochs: int, batch_size: int, lr: float,
                  dsa: bool, gen: torch.Generator, device: torch.device, bar: Any = None) -> nn.Module:
    """Train ``net`` in place with the reference's evaluation schedule:
    ``epochs + 1`` passes of shuffled batches from ``gen`` (a fresh per-sample
    DSA seed per batch), after pass ``epochs // 2 + 1`` the lr x0.1 with a new
    optimizer (momentum restarts, as in the reference)."""
    def sgd(rate: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(net.parameters(), lr=rate, momentum=0.9, weight_decay=5e-4)

    opt = sgd(lr)
    n = images.shape[0]
    drop = lr_drop_epoch(epochs)
    net.train()
    for ep in range(epochs + 1):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size].to(images.device)
            x = images[idx].to(device, non_blocking=True)
            y = labels[idx].to(device, non_blocking=True)
            if dsa:
                # Per sample, as the reference trains (DiffAugment with seed -1).
                x = dsa_augment(x, seed=int(torch.randint(2**62, (1,), generator=gen)), strategy=DEFAULT_STRATEGY,
                                per_sample=True)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if ep == drop:
            lr *= 0.1
            opt = sgd(lr)
        if bar is not None:
            bar.update(1)
    return net


def evaluate_synset(images: Tensor, labels: Tensor, dataset: Any, model: str = "ConvNet", epochs: int | None = None,
                    runs: int | None = None, batch_size: int = 256, lr: float = 0.01, dsa: bool | None = None,
                    seed: int = 0, device: str | torch.device | None = None, progress: bool = True,
                    net_kwargs: dict[str, Any] | None = None, method: str | None = None,
                    preset: str | None = None) -> dict[str, Any]:
    """Train ``runs`` fresh ``model`` networks on (images, labels) and test each
    on ``dataset.test``.

    Run r initialises its network and draws its batches and DSA seeds from seed
    ``seed + r`` (the global RNG state is restored afterwards). ``epochs`` is
    the reference's ``Epoch`` (``epochs + 1`` passes, see :func:`train_network`);
    ``epochs`` / ``dsa`` / ``runs`` None take the reference protocol of
    ``method`` under ``preset`` (:func:`method_protocol`, :func:`preset_runs`;
    no method: DM's 1000 epochs with DSA; no preset: FairDD's). ``net_kwargs`` go to
    :func:`fastfair.nets.get_network` (e.g. ``width``, ``norm``).

    Returns ``acc``, ``deo_m``, ``deo_a`` (means over runs, percent), their
    ``*_std`` (POPULATION standard deviation over runs, ddof=0, as ``np.std``
    in the DC/DM code), ``runs`` (per-run dicts with acc / deo_m / deo_a /
    cell_acc / empty_cells), ``cell_acc`` and ``cell_acc_std`` ([C][G] mean
    and std over runs of the per-cell accuracy, None for an empty cell),
    ``worst_group_acc`` (mean over runs of the lowest non-empty cell
    accuracy, and ``worst_group_acc_std``), ``model``, ``epochs`` and ``dsa``.
    """
    _check_synset(images, labels, dataset)
    ref_epochs, ref_dsa = method_protocol(method, preset)
    epochs = ref_epochs if epochs is None else int(epochs)
    runs = preset_runs(preset, method) if runs is None else int(runs)
    dsa = ref_dsa if dsa is None else bool(dsa)
    if epochs < 1 or runs < 1 or batch_size < 1:
        raise ValueError(f"epochs, runs and batch_size must be >= 1, got {epochs}, {runs}, {batch_size}")
    dev = _resolve_device(device)
    images = images.detach()
    labels = labels.detach().long()
    test = dataset.test

    per_run: list[dict[str, Any]] = []
    with tqdm(total=runs * (epochs + 1), disable=not progress, desc=f"eval {model}", unit="ep") as bar:
        for r in range(runs):
            gen = torch.Generator().manual_seed(seed + r)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + r)
                net = get_network(model, dataset.channels, dataset.num_classes, dataset.image_size,
                                  **(net_kwargs or {}))
            net = net.to(dev)
            train_network(net, images, labels, epochs, batch_size, lr, dsa, gen, dev, bar)
            pred = predict(net, test.images, dev)
            rep = fairness_report(pred, test.labels, test.groups, dataset.num_classes, dataset.num_groups)
            rep["per_attribute"] = attribute_reports(pred, test.labels, test.groups, dataset.num_classes,
                                                     getattr(dataset, "attributes", None))
            per_run.append(rep)
            bar.set_postfix(acc=f"{rep['acc']:.1f}", deo_m=f"{rep['deo_m']:.1f}")
    out: dict[str, Any] = {}
    for k in (*_METRICS, "worst_group_acc"):
        vals = np.array([rep[k] for rep in per_run], dtype=np.float64)
        out[k] = float(vals.mean())
        out[f"{k}_std"] = float(vals.std())
    cells = np.array([[[np.nan if v is None else v for v in row] for row in rep["cell_acc"]] for rep in per_run],
                     dtype=np.float64)  # [runs, C, G]
    empty = np.isnan(cells[0])
    mean, std = cells.mean(0), cells.std(0)
    out["cell_acc"] = [[None if empty[c, a] else float(mean[c, a]) for a in range(cells.shape[2])]
                       for c in range(cells.shape[1])]
    out["cell_acc_std"] = [[None if empty[c, a] else float(std[c, a]) for a in range(cells.shape[2])]
                           for c in range(cells.shape[1])]
    out["test_cells"] = dataset.num_classes * dataset.num_groups - len(per_run[0]["empty_cells"])
    out["deo_floor"] = chance_floor(out["cell_acc"], dataset)
    # Several attributes: each attribute's marginal fairness, mean and std over runs.
    out["per_attribute"] = {
        name: {k: (float(np.mean(v)), float(np.std(v)))
               for k, v in ((k, [rep["per_attribute"][name][k] for rep in per_run])
                            for k in ("deo_m", "deo_a", "suf_m", "suf_a", "worst_group_acc"))}
        for name in per_run[0]["per_attribute"]}
    # ... and each attribute's (class, marginal group) accuracies, mean over runs (None: no test samples).
    out["per_attribute_cells"] = {name: _mean_cells([rep["per_attribute"][name]["cell_acc"] for rep in per_run])
                                  for name in per_run[0]["per_attribute"]}
    out.update(runs=per_run, model=model, epochs=epochs, dsa=dsa)
    return out


def cell_test_counts(dataset: Any) -> np.ndarray:
    """[C, G] test samples per (class, group) of ``dataset.test``."""
    C, G = int(dataset.num_classes), int(dataset.num_groups)
    cell = dataset.test.labels.long().cpu() * G + dataset.test.groups.long().cpu()
    return torch.bincount(cell, minlength=C * G).view(C, G).numpy()


def chance_floor(cell_acc: list, dataset: Any) -> dict[str, list[float]]:
    """DEO_M / DEO_A (and each attribute's DEO_M) that a group-blind model with
    the per-class accuracies of ``cell_acc`` would score on ``dataset.test``
    by chance (fastfair.metrics.deo_chance_floor): [mean, 5%, 95%]."""
    counts = cell_test_counts(dataset)
    return deo_chance_floor(counts, class_accuracy(cell_acc, counts), getattr(dataset, "attributes", None))


def _mean_cells(mats: list) -> list:
    """Mean over runs of [C][G] accuracy matrices whose empty cells are None."""
    arr = np.array([[[np.nan if v is None else v for v in row] for row in m] for m in mats], dtype=np.float64)
    mean = arr.mean(0)
    return [[None if np.isnan(v) else float(v) for v in row] for row in mean]


def chance_note(acc: float, num_classes: int) -> str | None:
    """A warning for an accuracy near chance level, where a DEO near 0 says
    nothing about fairness (a classifier that ignores its input is "fair");
    None otherwise. Near: within a tenth of the way from chance to 100 %."""
    chance = 100.0 / max(1, num_classes)
    if acc > chance + 0.1 * (100.0 - chance):
        return None
    return (f"Acc {acc:.1f} % is near chance level ({chance:.1f} % for {num_classes} classes): "
            "its DEO says nothing about fairness")


BASELINES = ("random", "random-balanced", "whole")


def baseline_set(kind: str, dataset: Any, ipc: int = 10, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Training set of a baseline: ``"random"`` = ``ipc`` real train images per
    class drawn with ``seed`` (all of a class's images if it has fewer, so
    on biased data mostly the class's majority group); ``"random-balanced"``
    = ``ipc`` real images per class spread over its groups and every
    attribute's values as evenly as the data allow
    (fastfair.attributes.balanced_rows; a group-balanced real subset of the
    synthetic set's size: over several attributes each image still carries
    one combination of values, which a few images per class can tie to the
    class, docs/reproduction.md); ``"whole"`` = the full train split."""
    train = dataset.train
    if kind == "whole":
        return train.images, train.labels
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline kind {kind!r}; expected one of {', '.join(BASELINES)}")
    if ipc < 1:
        raise ValueError(f"ipc must be >= 1, got {ipc}")
    gen = torch.Generator().manual_seed(seed)
    labels = train.labels.cpu()
    groups = train.groups.cpu().long()
    attrs = getattr(dataset, "attributes", None)
    sizes = attrs.sizes if attrs is not None else (int(dataset.num_groups),)
    picks = []
    for c in range(dataset.num_classes):
        idx = (labels == c).nonzero().flatten()
        if idx.numel() == 0:
            raise ValueError(f"class {c} has no training images")
        if kind == "random-balanced":
            g = groups[idx]
            cells = [idx[g == k] for k in range(int(dataset.num_groups))]
            picks.append(balanced_rows(cells, sizes, min(ipc, idx.numel()), gen))
            continue
        picks.append(idx[torch.randperm(idx.numel(), generator=gen)[:ipc]])
    sel = torch.cat(picks).to(train.images.device)
    return train.images[sel], train.labels[sel]


def evaluate_baseline(kind: str, dataset: Any, ipc: int = 10, **kwargs: Any) -> dict[str, Any]:
    """:func:`evaluate_synset` on a baseline training set (see
    :func:`baseline_set`); same keyword arguments. Adds ``kind`` and ``ipc``
    (None for ``"whole"``) to the result."""
    images, labels = baseline_set(kind, dataset, ipc=ipc, seed=int(kwargs.get("seed", 0)))
    res = evaluate_synset(images, labels, dataset, **kwargs)
    res.update(kind=kind, ipc=None if kind == "whole" else ipc)
    return res
