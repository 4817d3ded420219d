"""``fastfair export``: a synthetic set in another code family's file layout.

``dc``: the layout of the DC/DSA/DM scripts (and of FairDD's and COBRA's, which
build on them), so that their evaluation code can train on a set fastfair
distilled. Those scripts save, after the last iteration,

    {"data": [[image_syn, label_syn], ...], "accs_all_exps": {model: [acc, ...]}}

to ``res_<method>_<dataset>_<model>_<ipc>ipc.pt`` in their ``--save_path``:
one ``[images, labels]`` pair per experiment (``data[exp][0]`` is the image
tensor [N, C, H, W] on the CPU, normalised with the dataset's mean and std;
``data[exp][1]`` the int64 labels) and, per evaluation network, the test
accuracies as fractions in [0, 1]. fastfair's file holds one experiment. The
extra keys (``mean``, ``std``, ``dataset``, ``config``) are fastfair's own and
ignored by readers that index ``data``.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

from .choices import EXPORT_FORMATS as FORMATS  # noqa: F401  (the CLI offers these)

# The family names a method in its file names; its "DSA" is DC with DSA on.
_FAMILY_METHOD = {"dm": "DM", "dc": "DC", "idc": "IDC", "dream": "DREAM"}


def family_dataset_name(name: str) -> str:
    from .data.registry import ALIASES

    return next((alias for alias, canon in ALIASES.items() if canon == name), name)


def _safe(part: str) -> str:
    """A name read from a file made safe as one path component: anything but
    letters, digits, '.', '-', '+' becomes '_' (so '/', '..' and NUL cannot
    lead the file out of its folder), at most 64 characters."""
    cleaned = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9.+-]", "_", part))[:64].strip(".")
    return cleaned or "_"


def dc_filename(config: dict[str, Any], ipc: int) -> str:
    """The family's file name for a synthetic set; every part taken from the
    file's config is sanitised (:func:`_safe`): a crafted ``synset.pt`` must not
    choose where the export is written."""
    ours = str(config.get("method", "method")).lower()
    method = "DSA" if ours == "dc" and config.get("dsa") else _FAMILY_METHOD.get(ours, ours.upper())
    dataset = family_dataset_name(str(config.get("dataset", "dataset")))
    model = str(config.get("model", "ConvNet"))
    return f"res_{_safe(method)}_{_safe(dataset)}_{_safe(model)}_{int(ipc)}ipc.pt"


def _accuracies(metrics_path: str) -> dict[str, list[float]]:
    """The per-run accuracies of ``fastfair eval``'s metrics.json, as the
    family stores them (fractions, keyed by the evaluation network)."""
    if not os.path.isfile(metrics_path):
        return {}
    try:
        with open(metrics_path) as f:
            m = json.load(f)
        return {str(m["model"]): [float(r["acc"]) / 100.0 for r in m["per_run"]]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # a metrics file we cannot read is not worth failing the export for


def to_dc(syn: dict[str, Any], metrics_path: str | None = None) -> dict[str, Any]:
    """The family's ``res_*.pt`` object for a loaded ``synset.pt``."""
    import torch

    images = syn["images"].detach().to("cpu", torch.float32).contiguous()
    labels = syn["labels"].detach().to("cpu", torch.long).contiguous()
    out: dict[str, Any] = {
        "data": [[images, labels]],
        "accs_all_exps": _accuracies(metrics_path) if metrics_path else {},
    }
    cfg = syn.get("config", {})
    for key in ("mean", "std"):
        if syn.get(key) is not None:
            out[key] = list(syn[key])
    out["dataset"] = cfg.get("dataset")
    out["config"] = cfg
    return out
