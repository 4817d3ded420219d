"""Decoding image files into one uint8 tensor (PIL, a thread pool).

The geometry follows torchvision's PIL transforms so that tensors match what
the reference pipelines (``CenterCrop``, ``Resize``) produce: an optional
centre crop, then the shorter side resized to ``size`` (bilinear) and a
centre crop to ``size x size``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _centre_crop(im, size: int):  # noqa: ANN001, ANN202 (PIL image)
    w, h = im.size
    if w == size and h == size:
        return im
    # torchvision pads an image smaller than the crop; none of our sources is.
    if w < size or h < size:
        raise ValueError(f"image of {w}x{h} is smaller than the {size}x{size} crop")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def _resize_shorter(im, size: int):  # noqa: ANN001, ANN202
    from PIL import Image

    w, h = im.size
    if min(w, h) == size:
        return im
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return im.resize(new, Image.BILINEAR)


def _load(path: str, size: int, crop: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if crop is not None:
            im = _centre_crop(im, crop)
        im = _centre_crop(_resize_shorter(im, size), size)
        return np.asarray(im, dtype=np.uint8)


def read_images(paths: Sequence[str], size: int, crop: int | None = None, workers: int | None = None,
                desc: str = "decoding images") -> Tensor:
    """Decode ``paths`` in order into uint8 [N, 3, size, size]."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    if len(paths) == 0:
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    workers = workers or min(8, os.cpu_count() or 1)
    progress = None
    if len(paths) >= 5000:  # only the real datasets, once (then cached)
        from tqdm import tqdm

        progress = tqdm(total=len(paths), desc=desc, unit="img", leave=False)
    # PIL releases the GIL while decoding and resizing, so threads scale;
    # map() keeps the order, so the result is deterministic.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, arr in enumerate(pool.map(lambda p: _load(p, size, crop), paths)):
            out[i] = arr
            if progress is not None:
                progress.update(1)
    if progress is not None:
        progress.close()
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def list_images(folder: str, recursive: bool = False) -> list[str]:
    """Image files in ``folder`` (sorted, so the order is the same everywhere)."""
    found = []
    if recursive:
        for dirpath, _, files in os.walk(folder):
            found += [os.path.join(dirpath, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    else:
        found = [os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)
