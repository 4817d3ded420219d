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


# What an image of a face or object dataset can be: anything larger, or more
# elongated, is refused from its header before a pixel is decoded (a 321-byte
# PNG can claim 2,000,000 x 1 pixels, whose resize allocates 25 GB).
MAX_PIXELS = 1 << 26  # 64 Mpx: 8192 x 8192
MAX_ASPECT = 16


def _check_geometry(w: int, h: int) -> None:
    if w < 1 or h < 1:
        raise ValueError(f"an image of {w}x{h} pixels")
    if w * h > MAX_PIXELS:
        raise ValueError(f"{w}x{h} pixels is more than the {MAX_PIXELS} this loader decodes (a decompression bomb?)")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ValueError(f"{w}x{h} pixels is more elongated than 1:{MAX_ASPECT}; not a dataset image")


def _load(path: str, size: int, crop: int | None) -> np.ndarray:
    """One image, decoded and resized; every failure (not a regular file, a
    damaged or truncated file, an absurd size) is a ValueError naming it."""
    import stat

    from PIL import Image

    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block open() forever
            raise ValueError("not a regular file")
        with Image.open(path) as im:  # reads the header only
            _check_geometry(*im.size)
            im = im.convert("RGB")
            if crop is not None:
                im = _centre_crop(im, crop)
            im = _centre_crop(_resize_shorter(im, size), size)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, MemoryError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"{path}: cannot use this image ({reason})") from None


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
    # Only regular files (symlinks to them included): a FIFO or a device named
    # like an image would hang the decoder.
    return sorted(p for p in found if os.path.isfile(p))
