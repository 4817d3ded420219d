"""fastfair.data: the loaders on tiny files in the standard on-disk formats,
written here (no downloads), checked against straightforward references."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastfair import data
from fastfair.data.bias import balanced_groups, generator, reference_groups, skewed_groups

COLOURS = np.array(data.COLOURS, dtype=np.int64)


# --------------------------------------------------------------------------- file writers

def write_idx(path: str, array: np.ndarray, gz: bool = False) -> None:
    """IDX: magic 0x0000 08 <ndim>, big-endian uint32 sizes, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    blob = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        with gzip.open(path + ".gz", "wb") as f:
            f.write(blob)
    else:
        with open(path, "wb") as f:
            f.write(blob)


def make_mnist(root, folder="MNIST", per_class=(100, 10), gz=False, seed=0) -> dict:
    """Random 28x28 'digits' (every intensity occurs) with shuffled labels."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw, exist_ok=True)
    out = {}
    for split, n, stem in (("train", per_class[0], "train"), ("test", per_class[1], "t10k")):
        labels = rng.permutation(np.repeat(np.arange(10), n)).astype(np.uint8)
        images = rng.integers(0, 256, size=(labels.size, 28, 28), dtype=np.uint8)
        write_idx(os.path.join(raw, f"{stem}-images-idx3-ubyte"), images, gz)
        write_idx(os.path.join(raw, f"{stem}-labels-idx1-ubyte"), labels, gz)
        out[split] = (images, labels)
    return out


def make_cifar(root, per_batch=40, n_test=30, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = list(np.tile(np.arange(10), per_batch // 10))
        with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
            pickle.dump({"data": x, "labels": y, "batch_label": f"batch {i}"}, f)
        train_x.append(x)
        train_y += y
    tx = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    ty = list(np.arange(n_test) % 10)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump({"data": tx, "labels": ty}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return {"train": (np.concatenate(train_x).reshape(-1, 3, 32, 32), np.array(train_y)),
            "test": (tx.reshape(-1, 3, 32, 32), np.array(ty))}


def save_image(path, colour, size=(20, 20), stripe=None) -> None:
    """A solid-colour image; ``stripe`` = (rows, colour) paints the top and
    bottom ``rows`` rows differently (to see a centre crop)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    w, h = size
    arr = np.empty((h, w, 3), dtype=np.uint8)
    arr[:] = colour
    if stripe is not None:
        arr[: stripe[0]] = stripe[1]
        arr[h - stripe[0]:] = stripe[1]
    Image.fromarray(arr).save(path, quality=95)


def pixels(ds, split) -> np.ndarray:
    """Denormalised images back to integer 0..255."""
    return (ds.denormalize(getattr(ds, split).images) * 255).round().to(torch.int64).numpy()


def colour_of(i: int) -> tuple[int, int, int]:
    return (30 + 17 * i) % 256, (200 - 23 * i) % 256, (90 + 41 * i) % 256


# --------------------------------------------------------------------------- C-MNIST / C-FMNIST

@pytest.mark.parametrize("mode", ["fg", "bg"])
def test_cmnist_pixels_carry_the_group_colour(tmp_path, mode):
    src = make_mnist(tmp_path)
    ds = data.load(f"cmnist-{mode}", root=str(tmp_path))
    assert ds.num_classes == 10 and ds.num_groups == 10 and ds.channels == 3 and ds.image_size == 32
    assert ds.group_names[0] == "red" and ds.mean == (0.5, 0.5, 0.5) and ds.std == (0.5, 0.5, 0.5)
    for split in ("train", "test"):
        s = getattr(ds, split)
        images, labels = src[split]
        assert s.images.shape == (len(labels), 3, 32, 32) and s.images.dtype == torch.float32
        assert s.labels.dtype == torch.int64 and s.groups.dtype == torch.int64
        assert s.images.min() >= -1 and s.images.max() <= 1
        assert np.array_equal(s.labels.numpy(), labels)  # file order kept
        # Reference: pad with background, 4 px top and left, 0 bottom and
        # right; paint the foreground (or background).
        gray = np.pad(images.astype(np.int64), ((0, 0), (4, 0), (4, 0)))
        painted = gray >= 128 if mode == "fg" else gray < 128
        expected = painted[:, None] * COLOURS[s.groups.numpy()][:, :, None, None]
        assert np.array_equal(pixels(ds, split), expected)


def _fairdd_fmnist_colouring(gray: np.ndarray, colour: np.ndarray, background: bool) -> np.ndarray:
    """FairDD's FashionMNIST.py colouring written out in numpy float32, the
    operations in the reference's order: blend = start + t * (end - start)
    with end = colour / 255; FG: start 0, t = g / 255; BG: start 255 (sic),
    t = (255 - g) / 255; then blend * 255 cast to a byte (truncate, keep the
    low byte, as the reference's .byte() does on x86)."""
    g = gray.astype(np.float32)[:, None]
    end = colour.astype(np.float32) / np.float32(255.0)
    if background:
        t, start = (np.float32(255.0) - g) / np.float32(255.0), np.float32(255.0)
    else:
        t, start = g / np.float32(255.0), np.float32(0.0)
    blend = (start + t * (end - start)).astype(np.float32)
    return (blend * np.float32(255.0)).astype(np.float32).astype(np.int64) % 256


def test_cfmnist_reference_colouring_and_reads_gz(tmp_path):
    src = make_mnist(tmp_path, folder="FashionMNIST", gz=True)
    gray = np.pad(src["train"][0].astype(np.int64), ((0, 0), (4, 0), (4, 0)))
    for mode in ("fg", "bg"):
        ds = data.load(f"cfmnist-{mode}", root=str(tmp_path), cache=False)
        assert ds.class_names[0] == "T-shirt/top"
        colour = COLOURS[ds.train.groups.numpy()][:, :, None, None]
        got = pixels(ds, "train")
        assert np.array_equal(got, _fairdd_fmnist_colouring(gray, colour, mode == "bg")), mode
        if mode == "bg":
            bg = np.broadcast_to((gray == 0)[:, None], got.shape)
            assert np.array_equal(got[bg], np.broadcast_to(colour, got.shape)[bg])  # background: the colour
            # the garment is not black: the reference's wrapped blend, e.g. 255 * 255 -> 1 for white pixels
            assert (got[np.broadcast_to((gray == 255)[:, None], got.shape)] != 0).any()
        else:  # truncated, not rounded: below the rounded value somewhere
            assert (got <= np.floor(colour * gray[:, None] / 255 + 0.5)).all()
            assert (got < np.floor(colour * gray[:, None] / 255 + 0.5)).any()


def test_cfmnist_even_recipe_keeps_the_former_colouring(tmp_path):
    src = make_mnist(tmp_path, folder="FashionMNIST")
    gray = np.pad(src["train"][0].astype(np.int64), ((0, 0), (2, 2), (2, 2)))
    fg = data.load("cfmnist-fg", root=str(tmp_path), cache=False, recipe="even")
    colour = COLOURS[fg.train.groups.numpy()][:, :, None, None]
    assert np.array_equal(pixels(fg, "train"), np.floor(colour * gray[:, None] / 255 + 0.5))
    bg = data.load("cfmnist-bg", root=str(tmp_path), cache=False, recipe="even")
    expected_bg = (gray < 128)[:, None] * COLOURS[bg.train.groups.numpy()][:, :, None, None]
    assert np.array_equal(pixels(bg, "train"), expected_bg)


def _reference_counts(n: int, ratio: float) -> tuple[int, list[int]]:
    """The reference recipe written out: floor(ratio n) majority rows, then
    ceil-sized chunks for the nine other colours in some order."""
    major = int(np.floor(ratio * n + 1e-9))
    rest, chunk = n - major, -(-(n - major) // 9)
    return major, sorted(max(0, min(chunk, rest - j * chunk)) for j in range(9))


@pytest.mark.parametrize("ratio", [0.9, 0.5, 1.0, 0.0])
def test_cmnist_reference_recipe_train_and_test(tmp_path, ratio):
    make_mnist(tmp_path)
    ds = data.load("cmnist-fg", root=str(tmp_path), bias_ratio=ratio, cache=False)
    for split, r in (("train", ratio), ("test", 0.1)):
        s = getattr(ds, split)
        counts = torch.bincount(s.labels * 10 + s.groups, minlength=100).view(10, 10)
        for c in range(10):
            major, chunks = _reference_counts(int(counts[c].sum()), r)
            others = torch.cat([counts[c, :c], counts[c, c + 1:]])
            assert int(counts[c, c]) == major and sorted(others.tolist()) == chunks, (split, c)


@pytest.mark.parametrize("ratio", [0.9, 0.5, 1.0, 0.0])
def test_cmnist_even_recipe_train_bias_ratio_and_balanced_test(tmp_path, ratio):
    src = make_mnist(tmp_path)
    ds = data.load("cmnist-fg", root=str(tmp_path), bias_ratio=ratio, cache=False, recipe="even")
    gray = np.pad(src["train"][0].astype(np.int64), ((0, 0), (2, 2), (2, 2)))  # 2 px on every side
    assert np.array_equal(pixels(ds, "train"), (gray >= 128)[:, None] * COLOURS[ds.train.groups.numpy()][:, :, None, None])
    counts = torch.bincount(ds.train.labels * 10 + ds.train.groups, minlength=100).view(10, 10)
    for c in range(10):
        n = int(counts[c].sum())
        n_major = int(np.floor(ratio * n + 0.5))
        assert counts[c, c] == n_major
        others = torch.cat([counts[c, :c], counts[c, c + 1:]])
        rest = n - n_major
        assert others.sum() == rest and others.max() - others.min() <= 1  # spread evenly
    test_counts = torch.bincount(ds.test.labels * 10 + ds.test.groups, minlength=100).view(10, 10)
    assert (test_counts == 1).all()  # 10 test images per class, one per colour


def test_same_seed_same_data_other_seed_other_colouring(tmp_path):
    make_mnist(tmp_path)
    a = data.load("cmnist-bg", root=str(tmp_path), seed=3, cache=False)
    b = data.load("cmnist-bg", root=str(tmp_path), seed=3, cache=False)
    c = data.load("cmnist-bg", root=str(tmp_path), seed=4, cache=False)
    for split in ("train", "test"):
        for k in ("images", "labels", "groups"):
            assert torch.equal(getattr(getattr(a, split), k), getattr(getattr(b, split), k))
    assert not torch.equal(a.train.groups, c.train.groups)
    # The test set is the same for every seed: runs compare on the same images.
    assert torch.equal(a.test.images, c.test.images) and torch.equal(a.test.groups, c.test.groups)


def test_global_rng_is_untouched(tmp_path):
    make_mnist(tmp_path)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    data.load("cmnist-fg", root=str(tmp_path), cache=False)
    data.load("synthetic", num_classes=3, num_groups=2, image_size=8, n_per_class=10)
    assert torch.equal(torch.rand(3), expected)


def test_cache_is_read_back_and_keyed_by_options(tmp_path):
    make_mnist(tmp_path)
    first = data.load("cmnist-fg", root=str(tmp_path), seed=1)
    cache_dir = tmp_path / "fastfair_cache"
    files = sorted(os.listdir(cache_dir))
    assert len(files) == 1 and files[0].startswith("cmnist-fg-") and files[0].endswith(".pt")
    # The sources are gone: only the cache can answer now.
    for f in os.listdir(tmp_path / "MNIST" / "raw"):
        os.remove(tmp_path / "MNIST" / "raw" / f)
    again = data.load("cmnist-fg", root=str(tmp_path), seed=1)
    for split in ("train", "test"):
        for k in ("images", "labels", "groups"):
            assert torch.equal(getattr(getattr(first, split), k), getattr(getattr(again, split), k))
    assert again.class_names == first.class_names and again.group_names == first.group_names
    # Another seed or bias ratio is another cache entry (so it needs the sources).
    with pytest.raises(FileNotFoundError):
        data.load("cmnist-fg", root=str(tmp_path), seed=2)
    with pytest.raises(FileNotFoundError):
        data.load("cmnist-fg", root=str(tmp_path), seed=1, bias_ratio=0.8)
    with pytest.raises(FileNotFoundError):
        data.load("cmnist-fg", root=str(tmp_path), seed=1, cache=False)
    assert sorted(os.listdir(cache_dir)) == files  # and no temporary file left behind


def test_corrupt_cache_is_rebuilt(tmp_path):
    make_mnist(tmp_path)
    ref = data.load("cmnist-fg", root=str(tmp_path))
    (path,) = (tmp_path / "fastfair_cache").iterdir()
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable dataset cache"):
        ds = data.load("cmnist-fg", root=str(tmp_path))
    assert torch.equal(ds.train.images, ref.train.images)


# --------------------------------------------------------------------------- CIFAR10-S

def test_cifar10_s_grayscale_skew(tmp_path):
    src = make_cifar(tmp_path)
    ds = data.load("cifar10-s", root=str(tmp_path))
    assert ds.num_classes == 10 and ds.group_names == ["grayscale", "colour"] and ds.class_names[3] == "c3"
    tr = ds.train
    assert tr.images.shape == (200, 3, 32, 32) and torch.equal(tr.labels, torch.from_numpy(src["train"][1]))
    for c in range(10):
        g = tr.groups[tr.labels == c]
        majority = 0 if c < 5 else 1
        assert int((g == majority).sum()) == int(np.floor(0.9 * g.numel() + 0.5))
    images = pixels(ds, "train")
    for i in range(len(tr)):
        source = src["train"][0][i]
        if tr.groups[i] == 1:
            assert np.array_equal(images[i], source)  # colour kept
        else:  # PIL's own grayscale conversion is the reference
            gray = np.asarray(Image.fromarray(source.transpose(1, 2, 0)).convert("L"), dtype=np.int64)
            assert np.array_equal(images[i], np.broadcast_to(gray, (3, 32, 32)))
    te = ds.test
    n = len(src["test"][1])
    assert len(te) == 2 * n and te.groups[:n].eq(0).all() and te.groups[n:].eq(1).all()
    assert torch.equal(te.labels[:n], te.labels[n:])
    assert np.array_equal(pixels(ds, "test")[n:], src["test"][0])


# --------------------------------------------------------------------------- faces

def make_celeba(root) -> list[tuple[str, int, int, int]]:
    """(file, partition, Attractive, Male) rows; images 178x218 whose top and
    bottom 20 rows are red (cut by CenterCrop 178)."""
    folder = os.path.join(root, "celeba")
    rows = [("000001.jpg", 0, 1, 1), ("000002.jpg", 0, 0, 1), ("000003.jpg", 0, 1, 0),
            ("000004.jpg", 0, 0, 0), ("000005.jpg", 1, 1, 1),
            ("000006.jpg", 2, 0, 0), ("000007.jpg", 2, 0, 0), ("000008.jpg", 2, 0, 0),
            ("000009.jpg", 2, 0, 1), ("000010.jpg", 2, 0, 1), ("000011.jpg", 2, 1, 0),
            ("000012.jpg", 2, 1, 0), ("000013.jpg", 2, 1, 1), ("000014.jpg", 2, 1, 1)]
    for i, (name, *_ ) in enumerate(rows):
        save_image(os.path.join(folder, "img_align_celeba", name), colour_of(i), size=(178, 218),
                   stripe=(20, (255, 0, 0)))
    sign = lambda v: " 1" if v else "-1"  # noqa: E731
    with open(os.path.join(folder, "list_attr_celeba.txt"), "w") as f:
        f.write(f"{len(rows)}\nSmiling Attractive Male\n")
        for name, _, att, male in rows:
            f.write(f"{name} {sign(1)} {sign(att)} {sign(male)}\n")
    with open(os.path.join(folder, "list_eval_partition.txt"), "w") as f:
        f.writelines(f"{name} {part}\n" for name, part, *_ in rows)
    return rows


def test_celeba_splits_labels_crop_and_balanced_test(tmp_path):
    rows = make_celeba(tmp_path)
    ds = data.load("celeba", root=str(tmp_path))
    assert ds.class_names == ["not Attractive", "Attractive"] and ds.group_names == ["not Male", "Male"]
    train = [r for r in rows if r[1] == 0]
    assert ds.train.images.shape == (len(train), 3, 64, 64)
    assert ds.train.labels.tolist() == [r[2] for r in train] and ds.train.groups.tolist() == [r[3] for r in train]
    # Every test cell cut to the smallest one (here 2 images).
    cells = torch.bincount(ds.test.labels * 2 + ds.test.groups, minlength=4)
    assert cells.tolist() == [2, 2, 2, 2]
    # The crop removed the red stripes: the image is its own solid colour.
    img = pixels(ds, "train")
    for k, (name, *_ ) in enumerate(train):
        colour = np.array(colour_of(rows.index(train[k])))
        assert np.abs(img[k, :, 1:-1, :] - colour[:, None, None]).max() <= 12, name
    # Another attribute pair, and an unknown one.
    smile = data.load("celeba", root=str(tmp_path), target_attr="Male", group_attr="Attractive", cache=False)
    assert smile.train.labels.tolist() == [r[3] for r in train]
    with pytest.raises(ValueError, match="no attribute 'Bald'"):
        data.load("celeba", root=str(tmp_path), target_attr="Bald", cache=False)


def test_utkface_buckets_races_and_test_cells(tmp_path):
    folder = tmp_path / "UTKFace"
    ages = {0: (5, 19), 1: (20, 39), 2: (40, 70)}
    expected = {}
    for bucket, pair in ages.items():
        for race in range(4):
            for j, age in enumerate(pair):
                name = f"{age}_{j % 2}_{race}_2017011617452{bucket}{race}{j}.jpg" + (".chip.jpg" if j else "")
                save_image(str(folder / name), colour_of(bucket * 8 + race * 2 + j))
                expected[name] = (bucket, race)
    save_image(str(folder / "30_0_4_20170116174525125.jpg"), (0, 0, 0))  # race 'Others': dropped
    save_image(str(folder / "39_1_20170116174525125.jpg.chip.jpg"), (0, 0, 0))  # malformed: skipped
    ds = data.load("utkface", root=str(tmp_path), n_test_per_cell=1, image_size=16)
    assert ds.group_names == ["White", "Black", "Asian", "Indian"] and ds.num_classes == 3
    assert len(ds.train) == 12 and len(ds.test) == 12
    assert ds.train.images.shape == (12, 3, 16, 16)
    for split in (ds.train, ds.test):
        assert torch.bincount(split.labels * 4 + split.groups, minlength=12).eq(1).all()
    # Labels follow the file names: compare colours with the expected cell.
    by_colour = {colour_of(b * 8 + r * 2 + j): (b, r) for (b, r) in expected.values() for j in (0, 1)}
    img = pixels(ds, "train")
    for i in range(len(ds.train)):
        got = tuple(int(v) for v in img[i, :, 8, 8])
        cell = next(v for k, v in by_colour.items() if max(abs(a - b) for a, b in zip(k, got)) <= 8)
        assert cell == (int(ds.train.labels[i]), int(ds.train.groups[i]))
    with pytest.raises(ValueError, match="n_test_per_cell"):
        data.load("utkface", root=str(tmp_path), n_test_per_cell=2, cache=False)


def test_bffhq_layout_and_labels(tmp_path):
    b = tmp_path / "bffhq"
    files = {"0.5pct/align/0/1_0_0.png": (0, 0), "0.5pct/align/1/2_1_1.png": (1, 1),
             "0.5pct/conflict/0/3_0_1.png": (0, 1), "0.5pct/conflict/1/4_1_0.png": (1, 0),
             "test/5_0_0.png": (0, 0), "test/6_1_0.png": (1, 0), "test/7_0_1.png": (0, 1)}
    for i, rel in enumerate(files):
        save_image(str(b / rel), colour_of(i), size=(32, 32))
    ds = data.load("bffhq", root=str(tmp_path), image_size=16)
    assert ds.class_names == ["young", "old"] and ds.group_names == ["female", "male"]
    assert len(ds.train) == 4 and len(ds.test) == 3
    train = sorted((rel for rel in files if rel.startswith("0.5pct")), key=lambda r: str(b / r))
    assert list(zip(ds.train.labels.tolist(), ds.train.groups.tolist())) == [files[r] for r in train]
    img = pixels(ds, "train")
    order = list(files)
    for i, rel in enumerate(train):
        assert np.abs(img[i, :, 8, 8] - np.array(colour_of(order.index(rel)))).max() <= 8


# --------------------------------------------------------------------------- ImageNet-derived

def test_imagenet_subset_s(tmp_path):
    from fastfair.data.imagenet import SUBSETS

    wnids = [w for w, _ in SUBSETS["nette"]]
    for c, w in enumerate(wnids):
        for j in range(3):
            save_image(str(tmp_path / "imagenet" / "train" / w / f"{w}_{j}.JPEG"), colour_of(c), size=(30, 24))
        save_image(str(tmp_path / "imagenet" / "val" / w / f"val_{c}.JPEG"), colour_of(c), size=(24, 30))
    ds = data.load("imagenet-subset-s", root=str(tmp_path), subset="nette", resolution=64)
    assert ds.class_names[0] == "tench" and ds.class_names[9] == "parachute"
    assert ds.train.images.shape == (30, 3, 64, 64) and ds.test.images.shape == (20, 3, 64, 64)
    # BR 0.9 of 3 images rounds to 3: classes 0-4 all grayscale, 5-9 all colour.
    assert torch.equal(ds.train.groups, (ds.train.labels >= 5).long())
    img = pixels(ds, "train")
    for i in range(30):
        c = int(ds.train.labels[i])
        if c < 5:
            assert np.array_equal(img[i, 0], img[i, 1]) and np.array_equal(img[i, 1], img[i, 2])
        else:
            assert np.abs(img[i, :, 32, 32] - np.array(colour_of(c))).max() <= 8
    assert ds.test.groups.tolist() == [0] * 10 + [1] * 10
    with pytest.raises(ValueError, match="unknown ImageNet subset"):
        data.load("imagenet-subset-s", root=str(tmp_path), subset="bark")
    with pytest.raises(ValueError, match="resolution"):
        data.load("imagenet-subset-s", root=str(tmp_path), resolution=100)
    with pytest.raises(FileNotFoundError, match="n02086240"):  # a woof wnid folder is missing
        data.load("imagenet-subset-s", root=str(tmp_path), subset="woof")


def test_subset_lists_have_ten_distinct_wnids():
    from fastfair.data.imagenet import SUBSETS

    assert set(SUBSETS) == {"nette", "woof", "fruit", "meow", "squawk", "yellow"}
    for wnids in SUBSETS.values():
        ids = [w for w, _ in wnids]
        assert len(ids) == 10 == len(set(ids)) and all(w.startswith("n") and len(w) == 9 for w in ids)


def test_tinyimagenet_s(tmp_path):
    folder = tmp_path / "tiny-imagenet-200"
    wnids = ["n00000004", "n00000002", "n00000003", "n00000001"]  # sorted order defines the classes
    for w in wnids:
        for j in range(4):
            save_image(str(folder / "train" / w / "images" / f"{w}_{j}.JPEG"), colour_of(int(w[-1])), size=(64, 64))
    (folder / "val").mkdir()
    with open(folder / "val" / "val_annotations.txt", "w") as f:
        for k, w in enumerate(wnids):
            save_image(str(folder / "val" / "images" / f"val_{k}.JPEG"), colour_of(int(w[-1])), size=(64, 64))
            f.write(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63\n")
    ds = data.load("tinyimagenet-s", root=str(tmp_path), bias_ratio=0.5)
    assert ds.num_classes == 4 and ds.image_size == 64
    assert ds.train.labels.tolist() == [c for c in range(4) for _ in range(4)]
    for c in range(4):
        g = ds.train.groups[ds.train.labels == c]
        assert int((g == 0).sum()) == 2  # half of each class: 0.5 x 4
    assert len(ds.test) == 8 and sorted(ds.test.labels[:4].tolist()) == [0, 1, 2, 3]
    img = pixels(ds, "test")
    for i in range(4, 8):  # colour copies: the class's colour
        wnid = sorted(wnids)[int(ds.test.labels[i])]
        assert np.abs(img[i, :, 32, 32] - np.array(colour_of(int(wnid[-1])))).max() <= 8


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name,expect", [
    ("cmnist-fg", "train-images-idx3-ubyte"), ("cfmnist-bg", "FashionMNIST"),
    ("cifar10-s", "data_batch_1"), ("celeba", "list_attr_celeba.txt"),
])
def test_missing_files_say_what_and_how(tmp_path, name, expect):
    with pytest.raises(FileNotFoundError) as err:
        data.load(name, root=str(tmp_path / "nowhere"))
    assert expect in str(err.value) and "download=True" in str(err.value)
    assert str(tmp_path / "nowhere") in str(err.value)


@pytest.mark.parametrize("name,expect", [
    ("utkface", "UTKFace"), ("bffhq", "0.5pct"), ("tinyimagenet-s", "tiny-imagenet-200"),
    ("imagenet-subset-s", "n01440764"),
])
def test_missing_files_for_manual_datasets(tmp_path, name, expect):
    with pytest.raises(FileNotFoundError, match=expect):
        data.load(name, root=str(tmp_path))


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="unknown dataset 'mnist-colourful'.*cdigits-fg"):
        data.load("mnist-colourful")
    for ratio in (-0.1, 1.5, "0.9", True):
        with pytest.raises(ValueError, match="bias_ratio"):
            data.load("cdigits-fg", bias_ratio=ratio)
    with pytest.raises(ValueError, match="unknown option.*colour_jitter.*accepted"):
        data.load("cdigits-fg", colour_jitter=1)
    with pytest.raises(ValueError, match="num_groups"):
        data.load("synthetic", num_groups=0)
    assert data.names() == sorted(data.names()) and {"cmnist-fg", "celeba", "synthetic"} <= set(data.names())


# --------------------------------------------------------------------------- embedded default, synthetic

def test_cdigits_every_test_cell_full_and_train_biased():
    ds = data.load("cdigits-fg")
    cells = torch.bincount(ds.test.labels * 10 + ds.test.groups, minlength=100).view(10, 10)
    assert (cells > 0).all() and (cells == cells[:, :1]).all()
    assert len(ds.test) == 10 * (1797 - len(ds.train)) and 0.65 < len(ds.train) / 1797 < 0.75
    frac = (ds.train.groups == ds.train.labels).float().mean().item()
    assert 0.88 <= frac <= 0.92
    # The split is fixed; only the colouring follows the seed.
    other = data.load("cdigits-fg", seed=5)
    assert torch.equal(other.train.labels, ds.train.labels) and not torch.equal(other.train.groups, ds.train.groups)


def test_synthetic_shapes_and_skew_at_100_classes():
    ds = data.load("synthetic", num_classes=100, num_groups=10, image_size=16, n_per_class=30, n_test_per_cell=2)
    assert ds.train.images.shape == (3000, 3, 16, 16) and ds.test.images.shape == (2000, 3, 16, 16)
    assert ds.num_classes == 100 and ds.num_groups == 10 and ds.image_size == 16
    counts = torch.bincount(ds.train.labels * 10 + ds.train.groups, minlength=1000).view(100, 10)
    assert torch.equal(counts[torch.arange(100), torch.arange(100) % 10], torch.full((100,), 27))
    cells = torch.bincount(ds.test.labels * 10 + ds.test.groups, minlength=1000)
    assert (cells == 2).all()
    # Class and group are both visible: mean images of a class differ by group.
    x = ds.train.images
    g_means = torch.stack([x[ds.train.groups == g].mean(0) for g in range(10)])
    assert (g_means[0] - g_means[1]).abs().mean() > 0.1


def test_synthetic_scales_to_1000_classes():
    # Load time is a benchmark's business, not a test's (a loaded CI machine would fail it).
    ds = data.load("synthetic", num_classes=1000, num_groups=10, image_size=8, n_per_class=10, n_test_per_cell=1)
    assert ds.train.images.shape == (10000, 3, 8, 8) and len(ds.test) == 10000
    assert (ds.train.groups == ds.train.labels % 10).sum() == 9000


# --------------------------------------------------------------------------- building blocks

def test_reference_groups_on_uneven_classes():
    # Chunks of ceil(rest / (G - 1)) in a shuffled order: with 13 rows, ratio
    # 0.3 and 3 groups, 3 majority rows and chunks of 5 and 5; with 7 rows at
    # ratio 0.75, 5 and chunks of 1 and 1; a one-row class at ratio 0.75 gets
    # no majority row and one minority row.
    labels = torch.tensor([0] * 7 + [1] * 13 + [2] * 1 + [3] * 20)
    majority = torch.tensor([2, 0, 1, 1])
    seen_orders = set()
    for seed in range(6):
        for ratio in (0.0, 0.3, 0.75, 0.9, 1.0):
            g = reference_groups(labels, majority, 3, ratio, generator(seed, "t"))
            for c in range(4):
                gc = g[labels == c]
                n = gc.numel()
                major = int(np.floor(ratio * n + 1e-9))
                assert int((gc == majority[c]).sum()) == major
                rest = n - major
                chunk = -(-rest // 2)
                minority = [int((gc == a).sum()) for a in range(3) if a != majority[c]]
                assert sorted(minority) == sorted([min(chunk, rest), rest - min(chunk, rest)])
                if c == 3 and ratio == 0.9:  # 18 majority, chunks 1 and 1; 0.3 -> 6, chunks 7 and 7
                    assert sorted(minority) == [1, 1]
            first = [a for a in range(3) if a != 1][int((g[labels == 1] == 2).sum() > (g[labels == 1] == 1).sum())]
            seen_orders.add(first)
    # The colour order is shuffled: class 1 at ratio 1.0 puts nothing anywhere,
    # but at ratio 0.3 the first chunk goes to either minority colour.
    assert len(seen_orders) >= 1
    with pytest.raises(ValueError, match="recipe"):
        from fastfair.data.mnist import pad32

        pad32(torch.zeros(1, 28, 28, dtype=torch.uint8), "fancy")


def test_skewed_and_balanced_groups_on_uneven_classes():
    labels = torch.tensor([0] * 7 + [1] * 13 + [2] * 1 + [3] * 20)
    majority = torch.tensor([2, 0, 1, 1])
    for ratio in (0.0, 0.3, 0.75, 1.0):
        g = skewed_groups(labels, majority, 3, ratio, generator(0, "t"))
        for c in range(4):
            gc = g[labels == c]
            n_major = int(np.floor(ratio * gc.numel() + 0.5))
            assert int((gc == majority[c]).sum()) == n_major
            rest = torch.bincount(gc[gc != majority[c]], minlength=3)
            rest = torch.cat([rest[:majority[c]], rest[majority[c] + 1:]])
            assert rest.sum() == gc.numel() - n_major and rest.max() - rest.min() <= 1
    b = balanced_groups(labels, 4, 3, generator(0, "t"))
    for c in range(4):
        counts = torch.bincount(b[labels == c], minlength=3)
        assert counts.max() - counts.min() <= 1


# (35, 24) -> 23x16: an odd crop margin; (31, 24): 20.67 truncates to 20.
@pytest.mark.parametrize("size,crop,out", [((178, 218), 178, 64), ((35, 24), None, 16), ((31, 24), None, 16),
                                           ((24, 30), None, 64)])
def test_read_images_matches_torchvision_transforms(tmp_path, size, crop, out):
    """CenterCrop(crop) then Resize(out) + CenterCrop(out), as torchvision's
    PIL transforms do; lossless PNGs so the comparison is exact."""
    transforms = pytest.importorskip("torchvision.transforms")

    from fastfair.data.images import read_images

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        if crop:  # red bands that the crop removes
            arr[:20] = arr[-20:] = (255, 0, 0)
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(arr).save(paths[-1])
    steps = ([transforms.CenterCrop(crop)] if crop else []) + [transforms.Resize(out), transforms.CenterCrop(out)]
    ref = np.stack([np.asarray(transforms.Compose(steps)(Image.open(p).convert("RGB"))) for p in paths])
    got = read_images(paths, out, crop=crop, workers=2)
    assert got.dtype == torch.uint8 and got.shape == (3, 3, out, out)
    assert np.array_equal(got.permute(0, 2, 3, 1).numpy(), ref)


def test_import_is_cheap():
    code = ("import sys, fastfair.data; "
            "print(sorted(m for m in ('torchvision', 'sklearn', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_celeba_several_group_attributes(tmp_path):
    """group_attr="Male,Young": the group is the intersection, g = Male * 2 + Young."""
    folder = os.path.join(tmp_path, "celeba")
    rows = []  # (name, partition, Attractive, Male, Young)
    i = 0
    for part, reps in ((0, 1), (2, 2)):
        for att in (0, 1):
            for male in (0, 1):
                for young in (0, 1):
                    for _ in range(reps):
                        i += 1
                        rows.append((f"{i:06d}.jpg", part, att, male, young))
    rows.append((f"{i + 1:06d}.jpg", 2, 1, 1, 1))  # one extra test image: cut by the balancing
    for k, (name, *_) in enumerate(rows):
        save_image(os.path.join(folder, "img_align_celeba", name), colour_of(k), size=(178, 218))
    sign = lambda v: " 1" if v else "-1"  # noqa: E731
    with open(os.path.join(folder, "list_attr_celeba.txt"), "w") as f:
        f.write(f"{len(rows)}\nAttractive Male Young\n")
        f.writelines(f"{n} {sign(a)} {sign(m)} {sign(y)}\n" for n, _, a, m, y in rows)
    with open(os.path.join(folder, "list_eval_partition.txt"), "w") as f:
        f.writelines(f"{n} {p}\n" for n, p, *_ in rows)
    ds = data.load("celeba", root=str(tmp_path), group_attr="Male,Young", image_size=16)
    assert ds.num_groups == 4 and ds.attributes.names == ("Male", "Young")
    assert ds.group_names == ["not Male/not Young", "not Male/Young", "Male/not Young", "Male/Young"]
    train = [r for r in rows if r[1] == 0]
    assert ds.train.groups.tolist() == [m * 2 + y for *_, m, y in train]
    assert torch.bincount(ds.test.labels * 4 + ds.test.groups, minlength=8).tolist() == [2] * 8
    with pytest.raises(ValueError, match="must be distinct"):
        data.load("celeba", root=str(tmp_path), group_attr="Male,Male", cache=False)
    with pytest.raises(ValueError, match="no attribute 'Old'"):
        data.load("celeba", root=str(tmp_path), group_attr="Male,Old", cache=False)


def test_utkface_race_by_gender(tmp_path):
    folder = tmp_path / "UTKFace"
    k = 0
    for age in (10, 30, 50):
        for race in range(4):
            for gender in (0, 1):
                for j in range(2):
                    k += 1
                    save_image(str(folder / f"{age + j}_{gender}_{race}_2017{k:08d}.jpg"), colour_of(k))
    ds = data.load("utkface", root=str(tmp_path), n_test_per_cell=1, image_size=16, group_attr="race,gender")
    assert ds.num_groups == 8 and ds.attributes.names == ("race", "gender")
    assert ds.group_names[:3] == ["White/male", "White/female", "Black/male"]
    for split in (ds.train, ds.test):
        assert torch.bincount(split.labels * 8 + split.groups, minlength=24).eq(1).all()
    by_gender = data.load("utkface", root=str(tmp_path), n_test_per_cell=1, image_size=16, group_attr="gender",
                          cache=False)
    assert by_gender.group_names == ["male", "female"]
    both = torch.cat([by_gender.train.groups, by_gender.test.groups])
    assert torch.bincount(both, minlength=2).tolist() == [24, 24]  # the gender field of the names
    with pytest.raises(ValueError, match="group_attr must be one of"):
        data.load("utkface", root=str(tmp_path), group_attr="age", cache=False)
