"""Face datasets with a natural bias: CelebA, UTKFace, bFFHQ (FairDD paper;
docs/datasets.md). The bias is the one in the data, so ``bias_ratio``
and ``seed`` do not apply; the test subsets are drawn with a fixed seed.
All are centre-cropped squares resized to ``image_size`` (64), mean = std = 0.5.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .bias import TEST_SEED, generator
from .core import Raw, missing_files, torchvision_for_download
from .images import list_images, read_images

MEAN = STD = (0.5, 0.5, 0.5)


def _balanced_cells(labels: Tensor, groups: Tensor, num_classes: int, num_groups: int,
                    per_cell: int | None) -> Tensor:
    """Indices of a (class, group)-balanced subset, ``per_cell`` rows from
    every cell (None: the size of the smallest cell), drawn with the fixed
    test seed; returned sorted so the subset keeps the file order."""
    gen = generator(TEST_SEED, "balanced-test")
    cells = labels * num_groups + groups
    n_cells = num_classes * num_groups
    counts = torch.bincount(cells, minlength=n_cells)
    k = int(counts.min().item()) if per_cell is None else per_cell
    chosen = []
    for cell in range(n_cells):
        idx = (cells == cell).nonzero().flatten()
        chosen.append(idx[torch.randperm(idx.numel(), generator=gen)[:k]])
    return torch.sort(torch.cat(chosen)).values


# --------------------------------------------------------------------------- CelebA

CELEBA_FILES = ("list_attr_celeba.txt", "list_eval_partition.txt")


def _read_attributes(path: str) -> tuple[list[str], dict[str, list[int]]]:
    """list_attr_celeba.txt: a count line, a line of attribute names, then one
    line per image (file name and one +-1 per attribute). A damaged file is a
    ValueError naming it and the line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from None
    if len(lines) < 2:
        raise ValueError(f"{path}: {len(lines)} line(s); an attribute file starts with a count line and a line of "
                         "attribute names")
    names = lines[1].split()
    rows = {}
    for no, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [int(v) for v in parts[1:]]
        except ValueError:
            raise ValueError(f"{path}, line {no}: attribute values must be integers, got {line[:80]!r}") from None
        if len(values) != len(names):
            raise ValueError(f"{path}, line {no}: {len(values)} values for {len(names)} attributes")
        rows[parts[0]] = values
    return names, rows


def load_celeba(root: str, download: bool, target_attr: str, group_attr: str, image_size: int) -> Raw:
    """root/celeba/{img_align_celeba/, list_attr_celeba.txt,
    list_eval_partition.txt} (torchvision's layout). Class = ``target_attr``
    (1 if the attribute is present), group = ``group_attr``. Official splits:
    train = partition 0, test = partition 2 subsampled so every (class, group)
    cell has the size of the smallest. CenterCrop 178, resize to image_size.

    ``group_attr`` may list several attributes, comma-separated
    (``"Male,Young"``): the group is then their intersection (fastfair's
    extension; fastfair.attributes), ``g = sum_k v_k 2^(A-1-k)`` with v_k = 1
    where attribute k is present (the last attribute varies fastest), and the
    dataset declares the attributes."""
    folder = os.path.join(root, "celeba")
    expected = [os.path.join(folder, n) for n in CELEBA_FILES] + [os.path.join(folder, "img_align_celeba") + os.sep]
    present = lambda: all(os.path.exists(p) for p in expected)  # noqa: E731
    if not present() and download:
        torchvision = torchvision_for_download()

        torchvision.datasets.CelebA(root, split="all", target_type="attr", download=True)
    if not present():
        raise missing_files("CelebA", [p for p in expected if not os.path.exists(p)],
                            f"Pass download=True to fetch CelebA with torchvision into {root} "
                            "(Google Drive quotas may refuse it; then download it by hand).")
    names, attrs = _read_attributes(os.path.join(folder, CELEBA_FILES[0]))
    group_attrs = [a.strip() for a in str(group_attr).split(",")]
    for attr in (target_attr, *group_attrs):
        if attr not in names:
            raise ValueError(f"CelebA has no attribute {attr!r}; available: {', '.join(names)}")
    if len(set(group_attrs)) != len(group_attrs) or target_attr in group_attrs:
        raise ValueError(f"CelebA: the group attributes {group_attrs} must be distinct and differ from the "
                         f"class attribute {target_attr!r}")
    t_col = names.index(target_attr)
    g_cols = [names.index(a) for a in group_attrs]
    A = len(g_cols)
    G = 2 ** A
    split_of: dict[str, list[str]] = {"0": [], "2": []}
    with open(os.path.join(folder, CELEBA_FILES[1])) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2 and parts[1] in split_of:
                split_of[parts[1]].append(parts[0])

    def split(files: list[str], what: str, balance: bool) -> tuple[Tensor, Tensor, Tensor]:
        missing_attr = [n for n in files if n not in attrs]
        if missing_attr:
            raise ValueError(f"CelebA: {len(missing_attr)} {what} images lack attributes, e.g. {missing_attr[0]}")
        labels = torch.tensor([int(attrs[n][t_col] > 0) for n in files], dtype=torch.int64)
        groups = torch.tensor([sum(int(attrs[n][c] > 0) << (A - 1 - k) for k, c in enumerate(g_cols))
                               for n in files], dtype=torch.int64)
        if not files:
            raise ValueError(f"CelebA: the partition file lists no {what} images")
        if balance:
            keep = _balanced_cells(labels, groups, 2, G, None)
            if keep.numel() == 0:
                raise ValueError(f"CelebA: a ({target_attr}, {group_attr}) cell of the {what} split is empty")
            files, labels, groups = [files[i] for i in keep.tolist()], labels[keep], groups[keep]
        paths = [os.path.join(folder, "img_align_celeba", n) for n in files]
        return read_images(paths, image_size, crop=178, desc=f"CelebA {what}"), labels, groups

    train, test = split(split_of["0"], "train", False), split(split_of["2"], "test", True)
    values = [[f"not {a}", a] for a in group_attrs]
    if A == 1:
        return Raw(*train, *test, class_names=[f"not {target_attr}", target_attr], group_names=values[0],
                   mean=MEAN, std=STD)
    group_names = [""]
    for vals in values:
        group_names = [f"{a}/{b}" if a else b for a in group_names for b in vals]
    return Raw(*train, *test, class_names=[f"not {target_attr}", target_attr], group_names=group_names,
               mean=MEAN, std=STD, attributes=[(a, v) for a, v in zip(group_attrs, values)])


# --------------------------------------------------------------------------- UTKFace

UTK_FOLDERS = ("UTKFace", "utkface", "UTKface")
UTK_RACES = ["White", "Black", "Asian", "Indian"]  # race 4 ('Others') is dropped
UTK_AGES = ["age<20", "20<=age<40", "age>=40"]


UTK_GENDERS = ["male", "female"]  # the release's 0 and 1
UTK_GROUPS = ("race", "gender", "race,gender")


def parse_utkface(filename: str, with_gender: bool = False) -> tuple[int, ...] | None:
    """``age_gender_race_date.jpg[.chip.jpg]`` -> (age bucket, race), or
    (age bucket, race, gender) ``with_gender``; None for race 4 ('Others')
    and for the few malformed names of the release."""
    fields = os.path.basename(filename).split("_")
    if len(fields) < 4:
        return None
    try:
        age, gender, race = int(fields[0]), int(fields[1]), int(fields[2])
    except ValueError:
        return None
    if race not in range(4) or age < 0 or gender not in (0, 1):
        return None
    bucket = 0 if age < 20 else 1 if age < 40 else 2
    return (bucket, race, gender) if with_gender else (bucket, race)


def load_utkface(root: str, n_test_per_cell: int, image_size: int, group_attr: str = "race") -> Raw:
    """A folder root/UTKFace of ``age_gender_race_date.jpg`` images (the
    aligned-and-cropped release; subfolders are searched too). Class = age
    bucket (<20, 20-39, >=40), group = race (White, Black, Asian, Indian);
    ``group_attr="gender"`` the gender, ``"race,gender"`` their intersection
    (8 groups, ``g = race * 2 + gender``; fastfair's extension: the dataset
    declares both attributes). Test: ``n_test_per_cell`` random images of
    every (class, group) cell; train: the rest."""
    if group_attr not in UTK_GROUPS:
        raise ValueError(f"UTKFace: group_attr must be one of {', '.join(UTK_GROUPS)}, got {group_attr!r}")
    folder = next((os.path.join(root, f) for f in UTK_FOLDERS if os.path.isdir(os.path.join(root, f))), None)
    if folder is None:
        raise missing_files("UTKFace", [os.path.join(root, "UTKFace", "<age>_<gender>_<race>_<date>.jpg")],
                            "torchvision cannot download UTKFace; get the aligned-and-cropped release from "
                            "https://susanqq.github.io/UTKFace/ and unpack it there.")
    paths, labels, groups = [], [], []
    for path in list_images(folder, recursive=True):
        parsed = parse_utkface(path, with_gender=True)
        if parsed is not None:
            bucket, race, gender = parsed
            paths.append(path)
            labels.append(bucket)
            groups.append({"race": race, "gender": gender, "race,gender": race * 2 + gender}[group_attr])
    G = {"race": 4, "gender": 2, "race,gender": 8}[group_attr]
    if not paths:
        raise missing_files("UTKFace", [os.path.join(folder, "<age>_<gender>_<race>_<date>.jpg")],
                            "The folder holds no image named age_gender_race_date.jpg with race 0-3.")
    lab, grp = torch.tensor(labels), torch.tensor(groups)
    counts = torch.bincount(lab * G + grp, minlength=3 * G)
    if counts.min() <= n_test_per_cell:
        raise ValueError(f"UTKFace: every (age bucket, {group_attr}) cell needs more than n_test_per_cell="
                         f"{n_test_per_cell} images, the smallest has {int(counts.min())}")
    test = _balanced_cells(lab, grp, 3, G, n_test_per_cell)
    is_test = torch.zeros(len(paths), dtype=torch.bool)
    is_test[test] = True
    train = (~is_test).nonzero().flatten()

    def split(idx: Tensor, what: str) -> tuple[Tensor, Tensor, Tensor]:
        return read_images([paths[i] for i in idx.tolist()], image_size, desc=f"UTKFace {what}"), lab[idx], grp[idx]

    if group_attr == "race,gender":
        names = [f"{r}/{g}" for r in UTK_RACES for g in UTK_GENDERS]
        return Raw(*split(train, "train"), *split(test, "test"), class_names=list(UTK_AGES), group_names=names,
                   mean=MEAN, std=STD, attributes=[("race", list(UTK_RACES)), ("gender", list(UTK_GENDERS))])
    return Raw(*split(train, "train"), *split(test, "test"), class_names=list(UTK_AGES),
               group_names=list(UTK_RACES if group_attr == "race" else UTK_GENDERS), mean=MEAN, std=STD)


# --------------------------------------------------------------------------- bFFHQ

BFFHQ_TRAIN = ("0.5pct", "train")


def parse_bffhq(filename: str) -> tuple[int, int] | None:
    """``<idx>_<age>_<gender>.png`` -> (age, gender), each 0 or 1."""
    stem = os.path.splitext(os.path.basename(filename))[0]
    fields = stem.split("_")
    if len(fields) < 3:
        return None
    try:
        age, gender = int(fields[-2]), int(fields[-1])
    except ValueError:
        return None
    return (age, gender) if age in (0, 1) and gender in (0, 1) else None


def load_bffhq(root: str, image_size: int) -> Raw:
    """bFFHQ as released with "Learning Debiased Representation via
    Disentangled Feature Augmentation" (Lee et al., NeurIPS'21):
    root/bffhq/0.5pct/{align,conflict}/<label>/<idx>_<age>_<gender>.png for
    training (root/bffhq/train/... is accepted too; subfolders are searched)
    and root/bffhq/test/<idx>_<age>_<gender>.png. Class = age (0 young,
    1 old), group = gender. Gender 0 is taken to be female and 1 male: the
    release's bias-aligned pairs are young women and old men, which carry
    equal age and gender labels."""
    folder = os.path.join(root, "bffhq")
    train_dir = next((os.path.join(folder, d) for d in BFFHQ_TRAIN if os.path.isdir(os.path.join(folder, d))), None)
    test_dir = os.path.join(folder, "test")
    layout = [os.path.join(folder, "0.5pct", "{align,conflict}", "<age>", "<idx>_<age>_<gender>.png")
              + "  (or bffhq/train/...)", os.path.join(test_dir, "<idx>_<age>_<gender>.png")]
    hint = ("torchvision cannot download bFFHQ; get it from the DFA / FairDD release "
            "(https://github.com/kakaoenterprise/Learning-Debiased-Disentangled) and unpack it there.")
    if train_dir is None or not os.path.isdir(test_dir):
        raise missing_files("bFFHQ", layout, hint)

    def split(d: str, what: str) -> tuple[Tensor, Tensor, Tensor]:
        found = [(p, parse_bffhq(p)) for p in list_images(d, recursive=True)]
        found = [(p, a) for p, a in found if a is not None]
        if not found:
            raise missing_files("bFFHQ", layout, f"No {what} image named <idx>_<age>_<gender>.png in {d}. " + hint)
        labels = torch.tensor([a[0] for _, a in found])
        groups = torch.tensor([a[1] for _, a in found])
        return read_images([p for p, _ in found], image_size, desc=f"bFFHQ {what}"), labels, groups

    return Raw(*split(train_dir, "train"), *split(test_dir, "test"), class_names=["young", "old"],
               group_names=["female", "male"], mean=MEAN, std=STD)
