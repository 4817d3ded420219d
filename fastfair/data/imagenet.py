"""ImageNet subsets-S and Tiny-ImageNet-S: the CIFAR10-S grayscale skew on
ImageNet-derived data (FairDD paper; docs/datasets.md).

The subsets are the 10-class ImageNet subsets of the dataset-distillation
literature (ImageNette and ImageWoof from fast.ai; ImageFruit, ImageMeow,
ImageSquawk and ImageYellow from "Dataset Distillation by Matching Training
Trajectories", Cazenavette et al., CVPR'22). Class c of a subset is its c-th
entry below, so classes 0-4 are the grayscale-majority half. Images: shorter
side resized to ``resolution`` then centre-cropped (the MTT preprocessing),
ImageNet mean / std.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .bias import GRAY_GROUPS, grayscale_skew
from .core import Raw, missing_files
from .images import list_images, read_images

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# (wnid, name) in the subsets' class order. MTT defines the four newer
# subsets by ImageNet-1k class indices, given in the comments; the wnids are
# those of the standard 1000-class index (sorted wnids).
SUBSETS: dict[str, list[tuple[str, str]]] = {
    "nette": [  # fast.ai Imagenette (torchvision.datasets.Imagenette lists the same wnids)
        ("n01440764", "tench"), ("n02102040", "English springer"), ("n02979186", "cassette player"),
        ("n03000684", "chain saw"), ("n03028079", "church"), ("n03394916", "French horn"),
        ("n03417042", "garbage truck"), ("n03425413", "gas pump"), ("n03445777", "golf ball"),
        ("n03888257", "parachute"),
    ],
    "woof": [  # MTT order, indices 193 182 258 162 155 167 159 273 207 229 (fast.ai Imagewoof's dogs)
        ("n02096294", "Australian terrier"), ("n02093754", "Border terrier"), ("n02111889", "Samoyed"),
        ("n02088364", "beagle"), ("n02086240", "Shih-Tzu"), ("n02089973", "English foxhound"),
        ("n02087394", "Rhodesian ridgeback"), ("n02115641", "dingo"), ("n02099601", "golden retriever"),
        ("n02105641", "Old English sheepdog"),
    ],
    "fruit": [  # 953 954 949 950 951 957 952 945 943 948
        ("n07753275", "pineapple"), ("n07753592", "banana"), ("n07745940", "strawberry"),
        ("n07747607", "orange"), ("n07749582", "lemon"), ("n07768694", "pomegranate"),
        ("n07753113", "fig"), ("n07720875", "bell pepper"), ("n07718472", "cucumber"),
        ("n07742313", "Granny Smith"),
    ],
    "meow": [  # 281 282 283 284 285 291 292 290 289 287
        ("n02123045", "tabby"), ("n02123159", "tiger cat"), ("n02123394", "Persian cat"),
        ("n02123597", "Siamese cat"), ("n02124075", "Egyptian cat"), ("n02129165", "lion"),
        ("n02129604", "tiger"), ("n02128925", "jaguar"), ("n02128757", "snow leopard"),
        ("n02127052", "lynx"),
    ],
    "squawk": [  # 84 130 88 144 145 22 96 9 100 89
        ("n01806143", "peacock"), ("n02007558", "flamingo"), ("n01818515", "macaw"),
        ("n02051845", "pelican"), ("n02056570", "king penguin"), ("n01614925", "bald eagle"),
        ("n01843383", "toucan"), ("n01518878", "ostrich"), ("n01860187", "black swan"),
        ("n01819313", "sulphur-crested cockatoo"),
    ],
    "yellow": [  # 309 986 954 951 987 779 599 291 72 11
        ("n02206856", "bee"), ("n12057211", "yellow lady's slipper"), ("n07753592", "banana"),
        ("n07749582", "lemon"), ("n12144580", "corn"), ("n04146614", "school bus"),
        ("n03530642", "honeycomb"), ("n02129165", "lion"),
        ("n01773157", "black and gold garden spider"), ("n01531178", "goldfinch"),
    ],
}


def _class_images(folder: str, wnids: list[str]) -> tuple[list[str], Tensor, list[str]]:
    """Files of each wnid folder under ``folder`` (searched recursively, so
    both ``<wnid>/*.JPEG`` and Tiny-ImageNet's ``<wnid>/images/*.JPEG``
    work); returns paths, labels and the wnids whose folder is missing."""
    paths, labels, missing = [], [], []
    for c, wnid in enumerate(wnids):
        d = os.path.join(folder, wnid)
        if not os.path.isdir(d):
            missing.append(d + os.sep)
            continue
        found = list_images(d, recursive=True)
        paths += found
        labels += [c] * len(found)
    return paths, torch.tensor(labels, dtype=torch.int64), missing


def load_imagenet_subset(root: str, subset: str, resolution: int, bias_ratio: float, seed: int,
                         imagenet_dir: str | None) -> Raw:
    """An ImageNet ImageFolder: ``imagenet_dir`` (default root/imagenet, or
    root itself when it holds train/ and val/) with train/<wnid>/*.JPEG and
    val/<wnid>/*.JPEG; only the subset's ten wnid folders are read, so an
    Imagenette / Imagewoof download (same layout) works as well."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown ImageNet subset {subset!r}; choose from {', '.join(SUBSETS)}")
    if resolution not in (64, 128):
        raise ValueError(f"resolution must be 64 or 128, got {resolution}")
    base = imagenet_dir
    if base is None:
        base = os.path.join(root, "imagenet")
        if not os.path.isdir(base) and os.path.isdir(os.path.join(root, "train")):
            base = root
    wnids = [w for w, _ in SUBSETS[subset]]
    hint = ("torchvision cannot download ImageNet; point imagenet_dir= (or root) at an ImageFolder "
            "with train/<wnid>/ and val/<wnid>/ (the validation images sorted into wnid folders).")
    tr_paths, tr_lab, miss_tr = _class_images(os.path.join(base, "train"), wnids)
    te_paths, te_lab, miss_te = _class_images(os.path.join(base, "val"), wnids)
    if miss_tr or miss_te:
        raise missing_files(f"ImageNet subset {subset!r}", miss_tr + miss_te, hint)
    tr_img = read_images(tr_paths, resolution, desc=f"image{subset} train")
    te_img = read_images(te_paths, resolution, desc=f"image{subset} val")
    parts = grayscale_skew(tr_img, tr_lab, te_img, te_lab, 10, bias_ratio, seed)
    return Raw(*parts, class_names=[n for _, n in SUBSETS[subset]], group_names=list(GRAY_GROUPS),
               mean=MEAN, std=STD)


def load_tinyimagenet_s(root: str, bias_ratio: float, seed: int) -> Raw:
    """root/tiny-imagenet-200 as released: wnids.txt, train/<wnid>/images/*.JPEG,
    val/images/*.JPEG with val/val_annotations.txt (or val/<wnid>/ folders);
    the val split is the test set. Classes are the wnids in sorted order
    (ImageFolder's), so the first 100 are the grayscale-majority half. 64x64."""
    folder = os.path.join(root, "tiny-imagenet-200")
    train_dir, val_dir = os.path.join(folder, "train"), os.path.join(folder, "val")
    annotations = os.path.join(val_dir, "val_annotations.txt")
    expected = [os.path.join(train_dir, "<wnid>", "images") + os.sep,
                annotations + "  (with val/images/) or val/<wnid>/"]
    hint = "torchvision cannot download Tiny-ImageNet; unpack tiny-imagenet-200.zip (cs231n) there."
    if not os.path.isdir(train_dir) or not os.path.isdir(val_dir):
        raise missing_files("Tiny-ImageNet", expected, hint)
    wnids = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    if not wnids:
        raise missing_files("Tiny-ImageNet", expected, hint)
    tr_paths, tr_lab, _ = _class_images(train_dir, wnids)
    if os.path.isfile(annotations):
        index = {w: c for c, w in enumerate(wnids)}
        rows = []
        with open(annotations) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2:
                    if parts[1] not in index:
                        raise ValueError(f"{annotations}: wnid {parts[1]} has no train folder")
                    rows.append((os.path.join(val_dir, "images", parts[0]), index[parts[1]]))
        rows.sort()
        te_paths, te_lab = [p for p, _ in rows], torch.tensor([c for _, c in rows], dtype=torch.int64)
    else:
        te_paths, te_lab, missing = _class_images(val_dir, wnids)
        if missing:
            raise missing_files("Tiny-ImageNet", missing, hint)
    names = dict.fromkeys(wnids)
    words = os.path.join(folder, "words.txt")
    if os.path.isfile(words):
        with open(words) as f:
            for line in f:
                wnid, _, text = line.rstrip("\n").partition("\t")
                if wnid in names:
                    names[wnid] = text.split(",")[0].strip()
    tr_img = read_images(tr_paths, 64, desc="Tiny-ImageNet train")
    te_img = read_images(te_paths, 64, desc="Tiny-ImageNet val")
    parts = grayscale_skew(tr_img, tr_lab, te_img, te_lab, len(wnids), bias_ratio, seed)
    return Raw(*parts, class_names=[names[w] or w for w in wnids], group_names=list(GRAY_GROUPS),
               mean=MEAN, std=STD)
