"""The synthetic set: initialisation, IDC multi-formation, the image update,
and the files a run leaves behind (``synset.pt``, ``grid.png``).

The image update is SGD with momentum written out of place (the same rule as
``torch.optim.SGD`` with dampening 0): a step returns NEW tensors and the loop
commits them only when an iteration finishes, so a Ctrl-C in the middle of an
iteration still leaves the last finished state intact for the checkpoint,
without copying anything.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attributes import balanced_rows
from ..interrupts import holds_interrupts
from .outdir import atomic_write


def sgd_step(images: Tensor, buf: Tensor | None, grad: Tensor, lr: float, momentum: float) -> tuple[Tensor, Tensor]:
    """(new images, new momentum buffer): buf = momentum * buf + grad; x -= lr * buf."""
    new_buf = grad.clone() if buf is None else buf * momentum + grad
    return images - lr * new_buf, new_buf


def decode(stored: Tensor, factor: int, align_corners: bool = False) -> Tensor:
    """IDC multi-formation (Kim et al., ICML'22): every stored image holds a
    ``factor x factor`` grid of sub-images, each upsampled back to full size.

    [N, C, H, W] -> [N * factor^2, C, H, W]; the sub-images of stored image i
    are rows i*f^2 .. i*f^2 + f^2 - 1 (row-major over the grid). Differentiable.
    Bilinear upsampling with ``align_corners`` False as IDC's decode_zoom
    (nn.Upsample's default), True as COBRA's train_idc.py (``--preset cobra``;
    DistillConfig.idc_recipe). COBRA orders the sub-images grid position
    first; the class gradient is a mean over the class's rows, so the order
    changes nothing but the order of floating-point additions.
    """
    if factor == 1:
        return stored
    n, c, h, w = stored.shape
    if h % factor or w % factor:
        raise ValueError(f"IDC factor {factor} must divide the image size {h}x{w}")
    sh, sw = h // factor, w // factor
    parts = stored.reshape(n, c, factor, sh, factor, sw).permute(0, 2, 4, 1, 3, 5)
    parts = parts.reshape(n * factor * factor, c, sh, sw)
    return F.interpolate(parts, size=(h, w), mode="bilinear", align_corners=align_corners)


def encode(images: Tensor, factor: int) -> Tensor:
    """Inverse layout of :func:`decode` for initialisation: tile groups of
    ``factor^2`` consecutive images, each downsampled, into one stored image."""
    if factor == 1:
        return images
    m, c, h, w = images.shape
    if m % (factor * factor):
        raise ValueError(f"encode needs a multiple of {factor * factor} images, got {m}")
    sh, sw = h // factor, w // factor
    small = F.interpolate(images, size=(sh, sw), mode="area")
    n = m // (factor * factor)
    grid = small.reshape(n, factor, factor, c, sh, sw).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(n, c, h, w).contiguous()


def init_images(class_pools: list[Tensor], train_images: Tensor, ipc: int, init: str, factor: int,
                gen: torch.Generator, tile: bool = True, cell_pools: list[list[Tensor]] | None = None,
                attribute_sizes: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
    """Stored synthetic images [C * ipc, ...] (class-major) and their labels.

    ``init="real"``: random real images of each class (IDC: ``factor^2`` real
    images tiled into each stored image, IDC's 'mix' initialisation; a class
    with fewer images than that reuses its images cyclically; ``tile=False``:
    one whole real image per stored image, as COBRA's train_idc.py
    initialises). ``init="real-balanced"`` (fastfair's option, not the
    papers'): real images as evenly spread over each class's groups and
    attribute values as the data allow (fastfair.attributes.balanced_rows; needs
    ``cell_pools``, the sampler's per-(class, group) rows, and the
    attributes' ``attribute_sizes``, default one attribute). A biased class
    otherwise starts ~90% in its majority group. ``init="noise"``: standard
    normal pixels (the data are normalised, so this is noise at the data's
    scale).
    """
    if not tile:
        factor = 1
    num_classes = len(class_pools)
    shape = tuple(train_images.shape[1:])
    for c, pool in enumerate(class_pools):
        if pool.numel() < ipc:
            raise ValueError(f"ipc {ipc} is larger than class {c}, which has {pool.numel()} training images")
    labels = torch.arange(num_classes).repeat_interleave(ipc)
    if init == "noise":
        return torch.randn((num_classes * ipc, *shape), generator=gen), labels
    need = ipc * factor * factor
    picks = []
    if init == "real-balanced":
        if cell_pools is None:
            raise ValueError("init 'real-balanced' needs the per-(class, group) rows (cell_pools)")
        sizes = attribute_sizes if attribute_sizes is not None else (len(cell_pools[0]),)
        for cells in cell_pools:
            picks.append(balanced_rows(cells, sizes, need, gen))
    else:
        for pool in class_pools:
            perm = torch.randperm(pool.numel(), generator=gen)
            reps = -(-need // pool.numel())
            picks.append(pool[perm.repeat(reps)[:need]])
    idx = torch.cat(picks).to(train_images.device)
    real = train_images[idx].detach().float().cpu()
    return encode(real, factor).clone(), labels


@holds_interrupts
def save_grid(images: Tensor, labels: Tensor, num_classes: int, denormalize: Any, path: str) -> None:
    """PNG grid, one row per class (images in label order), denormalised to
    [0, 1], tiles separated by 1 px of white (PIL only: the loss and the
    driver need no torchvision)."""
    imgs = images.detach().float().cpu()
    labs = labels.detach().cpu()
    order = torch.argsort(labs, stable=True)
    imgs, labs = imgs[order], labs[order]
    per_class = int(torch.bincount(labs, minlength=num_classes).max())
    rows = []
    for c in range(num_classes):
        row = imgs[labs == c]
        if row.shape[0] < per_class:  # pad short rows with blank tiles
            row = torch.cat([row, row.new_full((per_class - row.shape[0], *row.shape[1:]), float("nan"))])
        rows.append(row)
    grid = torch.cat(rows)
    if denormalize is not None:
        grid = denormalize(grid)
    grid = torch.nan_to_num(grid, nan=1.0).clamp(0, 1)
    picture = _tile(grid, per_class)
    atomic_write(path, lambda f: picture.save(f, format="png"))


def _tile(grid: Tensor, ncol: int) -> Any:
    """[N, C, H, W] in [0, 1] -> a PIL image of ceil(N / ncol) x ncol tiles."""
    from PIL import Image

    n, ch, h, w = grid.shape
    nrow = -(-n // max(1, ncol))
    canvas = torch.ones(ch, nrow * (h + 1) + 1, ncol * (w + 1) + 1)
    for i in range(n):
        r, c = divmod(i, ncol)
        canvas[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = grid[i]
    pixels = (canvas * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    if ch == 1:
        return Image.fromarray(pixels[0].numpy(), mode="L")
    return Image.fromarray(pixels[:3].permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file beside ``path``, then os.replace: a kill
    at any moment leaves either the old file or the new one, never half; a
    failure (a full disk) removes the temporary file and raises
    :class:`fastfair.distill.outdir.OutputError` naming ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def read_synset(path: str) -> dict[str, Any]:
    """A ``synset.pt`` written by ``fastfair distill``, with its fields
    checked (ValueError in one line otherwise): ``images`` a finite float
    tensor [N, C, H, W], ``labels`` an integer tensor [N], ``config`` (when
    present) a dict whose dataset / method / objective / root are strings,
    bias_ratio a number and extra.data_options a dict."""
    try:
        syn = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike: not a synthetic set
        raise ValueError(f"cannot read {path!r} as a synthetic set ({type(exc).__name__}); expected a "
                         "synset.pt written by fastfair distill") from None
    if not isinstance(syn, dict) or not {"images", "labels"} <= set(syn):
        raise ValueError(f"{path!r} is not a synthetic set (no images and labels); expected a synset.pt "
                         "written by fastfair distill")
    images, labels = syn["images"], syn["labels"]
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"{path!r}: 'images' must be a float tensor [N, C, H, W]")
    if (not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point()
            or labels.dtype == torch.bool or labels.shape[0] != images.shape[0]):
        raise ValueError(f"{path!r}: 'labels' must be an integer tensor [N] with one label per image")
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise ValueError(f"{path!r}: the synthetic images hold {bad} non-finite values (NaN or inf); "
                         "refusing to evaluate them")
    cfg = syn.get("config", {})
    if not isinstance(cfg, dict):
        raise ValueError(f"{path!r}: 'config' must be a dict, got {type(cfg).__name__}")
    for key in ("dataset", "method", "objective", "root"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise ValueError(f"{path!r}: config {key!r} must be a string, got {type(cfg[key]).__name__}")
    ipc = cfg.get("ipc")
    if ipc is not None and (isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1):
        raise ValueError(f"{path!r}: config 'ipc' must be a positive int, got {ipc!r}")
    ratio = cfg.get("bias_ratio")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))):
        raise ValueError(f"{path!r}: config 'bias_ratio' must be a number, got {type(ratio).__name__}")
    extra = cfg.get("extra", {})
    if not isinstance(extra, dict) or not isinstance(extra.get("data_options", {}), dict):
        raise ValueError(f"{path!r}: config 'extra' must be a dict with a dict 'data_options'")
    return syn
