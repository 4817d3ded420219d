"""Distillation settings: one dataclass, paper defaults, per-IPC rules, presets, validation.

Defaults follow docs/cli.md ("Paper defaults"), per method:
- DM (Zhao & Bilen, WACV'23; FairDD main_DM.py): 20000 iterations, lr_img 1
  (10 at IPC >= 100), SGD momentum 0.5, real batch 256 per class, init from
  real images, DSA on.
- DC (Zhao et al., ICLR'21; FairDD main_DC.py, COBRA train_dc.py): 1000 outer
  iterations, lr_img 0.1, momentum 0.5, (outer_loop, inner_loop) by IPC,
  inner network SGD lr 0.01, DSA OFF (the papers' DC rows).
- DSA (Zhao & Bilen, ICML'21; FairDD main_DC.py ``--method DSA``): DC with
  DSA on.
- IDC (Kim et al., ICML'22) and DREAM (Liu et al., ICCV'23), DC versions: the
  DC settings with DSA on (both distil with DSA); under ``--preset cobra``
  IDC is COBRA's train_idc.py: no DSA, outer_loop 30 at IPC 50 and 100.
- COBRA's DM warm-up (Moslemi et al., ICML'26, train_dm.py): 50 epochs if
  IPC == 50, 100 if IPC == 100, else 10.
- CAFE (Wang et al., CVPR'22) as COBRA's train_cafe.py / run_cafe.sh run it:
  2000 iterations, lr_img 0.1 (x0.5 at 1200, 1600, 1800), momentum 0.5, real
  batch 256 per class, (outer_loop, inner_loop) by IPC as DC, inner network
  SGD lr 0.01, no DSA; layer weights, discrimination weight and class scaling
  per objective (fastfair.cafe.REFERENCE; fastfair's ``fairdd`` keeps
  vanilla's). Neither FairDD nor COBRA has a CAFE+FairDD mode, so ``fairdd``
  stays fastfair's summed rule under both presets.

Presets (``preset``) name a paper's protocol and fill only the fields left
``None`` (an explicit value always wins): ``fairdd`` is the FairDD code's
protocol (the defaults above), ``cobra`` COBRA's (DM: batch_real 600 per
class, 2600 iterations; DC as FairDD's). COBRA's re-implementation of the
FairDD DC baseline is the objective ``fairdd-mean`` (the group terms averaged
over the groups present, where FairDD's main_DC.py sums them), so under the
``cobra`` preset a DC-family run asked for ``fairdd`` runs ``fairdd-mean``,
what COBRA's ``--mode fairdd`` computes (the resolved config records it).
The preset also decides the evaluation (``eval_epochs`` / ``eval_runs``
None; fastfair.evaluate.method_protocol and preset_runs): FairDD 10 networks,
DM 1000 epochs / DC 300; COBRA DM 1500 / DC 1000.

Fields left ``None`` are filled by :func:`resolve` from the preset, method and
IPC, so a saved config always records the values that were actually used.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from ..augment import DEFAULT_STRATEGY
from ..eval_protocol import preset_runs
from ..objectives import OBJECTIVES

METHODS = ("dm", "dc", "dsa", "idc", "dream", "cafe")
DC_FAMILY = ("dc", "dsa", "idc", "dream")
# Methods with an outer matching loop and a network trained between its steps.
OUTER_LOOP_METHODS = (*DC_FAMILY, "cafe")
# Whether a method distils with DSA when ``dsa`` is left None (module docstring).
DSA_DEFAULT = {"dm": True, "dc": False, "dsa": True, "idc": True, "dream": True, "cafe": False}
PRESETS = ("fairdd", "cobra")
IDC_RECIPES = ("idc", "cobra")
# Where a preset's code distils a method with or without DSA unlike the
# method's paper default: COBRA's train_idc.py defaults to no DSA strategy.
PRESET_DSA = {("cobra", "idc"): False}
INITS = ("real", "real-balanced", "noise")
GROUP_SOURCES = ("true", "pseudo")

# Fields that may change between an interrupted run and its resumption: they
# do not alter the trajectory of the synthetic set (no schedule depends on the
# total number of iterations).
RESUMABLE_CHANGES = frozenset({
    "iterations", "eval_every", "eval_model", "eval_epochs", "eval_runs", "eval_width",
    "log_every", "checkpoint_every", "root",
})


def dc_loops(ipc: int) -> tuple[int, int]:
    """(outer_loop, inner_loop) of the DC code family for an IPC."""
    table = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
    if ipc in table:
        return table[ipc]
    if ipc > 50:
        return 100, 10
    # Between table entries: the loops of the next larger listed IPC.
    for k in sorted(table):
        if ipc < k:
            return table[k]
    return 100, 10  # pragma: no cover - unreachable


def cobra_warmup(ipc: int) -> int:
    """COBRA's warm-up epochs of the random DM network on the synthetic set
    (train_dm.py: exactly these two IPCs differ; IPC 60 or 200 get 10)."""
    return {50: 50, 100: 100}.get(ipc, 10)


def dm_lr_img(ipc: int) -> float:
    """DM's image learning rate (DM / FairDD code: 10 at IPC >= 100, else 1)."""
    return 10.0 if ipc >= 100 else 1.0


def preset_values(preset: str, method: str, ipc: int) -> dict[str, Any]:
    """The fields a named paper protocol sets for a method and IPC (as data:
    iterations, batch_real, lr_img; the warm-up rule is COBRA's in both)."""
    dm = method == "dm"
    if method == "cafe":  # COBRA's run_cafe.sh, the only reference protocol, under both presets
        return {"iterations": 2000, "batch_real": 256, "lr_img": 0.1}
    if preset == "fairdd":
        if dm:
            return {"iterations": 20000, "batch_real": 256, "lr_img": dm_lr_img(ipc)}
        return {"iterations": 1000, "batch_real": 256, "lr_img": 0.1}
    if preset == "cobra":
        if dm:
            return {"iterations": 2600, "batch_real": 600, "lr_img": dm_lr_img(ipc)}
        return {"iterations": 1000, "batch_real": 256, "lr_img": 0.1}
    raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


@dataclass
class DistillConfig:
    """Everything that defines one distillation run (see module docstring).

    Data provenance (``dataset``, ``root``, ``bias_ratio``) is recorded so a
    saved synthetic set can be evaluated later; :func:`fastfair.distill.run`
    loads the dataset from them only when it is not given one.
    """

    dataset: str = "cdigits-fg"
    method: str = "dm"
    objective: str = "fairdd"
    ipc: int = 10
    preset: str | None = None            # None: "fairdd" (the defaults); "cobra": COBRA's protocol
    iterations: int | None = None        # DM 20000, DC family 1000 (outer iterations)
    lr_img: float | None = None          # DM 1 (10 at IPC >= 100), DC family 0.1
    momentum: float = 0.5
    batch_real: int | None = None        # per class; 256 (COBRA preset DM: 600)
    real_chunk: int | None = None        # rows per network pass over the real batch; None: automatic
                                         # (2^24 input values on GPUs, cache-sized blocks on CPUs)
    dc_block_classes: int | None = None  # DC family: classes whose per-group real gradients are held
                                         # at once; None: as many as the free memory allows (distill.dc)
    outer_loop: int | None = None        # DC family, by IPC
    inner_loop: int | None = None        # DC family, by IPC
    lr_net: float = 0.01                 # inner-loop / warm-up network SGD
    batch_train: int = 256               # inner-loop / warm-up batch of synthetic images
    dsa: bool | None = None              # None: the method's paper default (DSA_DEFAULT)
    dsa_strategy: str = DEFAULT_STRATEGY
    dsa_per_sample: bool = False         # siamese DSA: one transform per class (reference) or per row
    init: str = "real"
    model: str = "ConvNet"
    width: int = 128
    depth: int = 3
    norm: str = "instancenorm"
    dc_metric: str = "ours"              # DC match_loss: ours | mse | cos
    cobra_warmup_epochs: int | None = None  # DM + cobra only; by IPC
    group_noise: float = 0.0             # fraction of real samples given a wrong group
    groups: str = "true"                 # "true" labels or "pseudo" (DBSCAN per class batch)
    pseudo_eps: float | None = None      # DBSCAN eps; None: median k-NN distance per class batch
    pseudo_min_samples: int = 5
    pseudo_max_groups: int | None = None  # None: the dataset's number of groups
    sample_per_group: bool = False       # draw each class batch equally from its groups
    fair_over: str = "intersection"      # several protected attributes: "intersection", "marginal" or
                                         # one attribute's name (fastfair.attributes; checked on the dataset)
    idc_factor: int | None = None        # IDC multi-formation: factor x factor sub-images; None: 2, or
                                         # under --preset cobra COBRA's rule (face sets 4, 3 at IPC >= 100)
    idc_recipe: str | None = None        # IDC multi-formation as run by: "idc" (Kim et al.'s code: factor^2
                                         # real images tiled into each stored image, bilinear upsampling
                                         # with align_corners=False) or "cobra" (COBRA's train_idc.py: one
                                         # whole real image per stored image, align_corners=True);
                                         # None: the preset's
    dream_interval: int = 10             # DREAM: re-cluster every this many matching steps
    dream_pool: int = 1024               # DREAM: per-class pool that is clustered
    dream_kmeans_iters: int = 10
    cafe_weights: list[float] | None = None   # CAFE: layer weights, shallow to deep, embedding last;
                                              # None: the objective's reference (fastfair.cafe.REFERENCE)
    cafe_inner_weight: float | None = None    # CAFE discrimination weight; None: 0.01 (cobra: 0)
    cafe_class_mean: bool | None = None       # CAFE: divide each class term by C; None: cobra only
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    eval_every: int = 0                  # 0: no evaluation during distillation
    eval_model: str = "ConvNet"
    eval_epochs: int | None = None       # None: the method's under the preset (FairDD: DM 1000, DC 300)
    eval_runs: int | None = None         # None: the preset's (FairDD 10, COBRA 5)
    eval_width: int | None = None        # None: the evaluation network's default width
    root: str | None = None
    bias_ratio: float = 0.9
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DistillConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown DistillConfig fields: {', '.join(sorted(unknown))}")
        return cls(**d)


def _positive(cfg: DistillConfig, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v is None or v < 1:
            raise ValueError(f"{n} must be a positive integer, got {v!r}")


def resolve(cfg: DistillConfig) -> DistillConfig:
    """A copy of ``cfg`` with every ``None`` filled and every field checked.

    Raises ValueError with a message naming the field and the allowed values.
    """
    c = dataclasses.replace(cfg, extra=dict(cfg.extra))
    if c.method not in METHODS:
        raise ValueError(f"unknown method {c.method!r}; choose one of {', '.join(METHODS)}")
    if c.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {c.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if c.init not in INITS:
        raise ValueError(f"unknown init {c.init!r}; choose one of {', '.join(INITS)}")
    if c.groups not in GROUP_SOURCES:
        raise ValueError(f"unknown groups source {c.groups!r}; choose one of {', '.join(GROUP_SOURCES)}")
    if c.dc_metric not in ("ours", "mse", "cos"):
        raise ValueError(f"unknown dc_metric {c.dc_metric!r}; choose one of ours, mse, cos")
    dm = c.method == "dm"
    if c.preset is None:
        c.preset = "fairdd"
    if c.preset not in PRESETS:
        raise ValueError(f"unknown preset {c.preset!r}; choose one of {', '.join(PRESETS)}")
    _positive(c, "ipc")
    for name, value in preset_values(c.preset, c.method, c.ipc).items():
        if getattr(c, name) is None:
            setattr(c, name, value)
    if c.preset == "cobra" and c.method in DC_FAMILY and c.objective == "fairdd":
        c.objective = "fairdd-mean"  # COBRA's --mode fairdd (module docstring)
    if c.eval_runs is None:
        c.eval_runs = preset_runs(c.preset, c.method)
    if c.dsa is None:
        c.dsa = PRESET_DSA.get((c.preset, c.method), DSA_DEFAULT[c.method])
    if not dm:
        outer, inner = dc_loops(c.ipc)
        if c.preset == "cobra" and c.method == "idc":
            if c.ipc in (50, 100):
                outer = 30  # COBRA's train_idc.py: "a wider gradient sweep" at IPC 50 and 100
            inner = 0  # COBRA's train_idc.py never trains the network between its matching steps
        c.outer_loop = outer if c.outer_loop is None else c.outer_loop
        c.inner_loop = inner if c.inner_loop is None else c.inner_loop
    if c.cobra_warmup_epochs is None:
        c.cobra_warmup_epochs = cobra_warmup(c.ipc) if (dm and c.objective == "cobra") else 0
    if c.method == "cafe":
        _resolve_cafe(c)
    _positive(c, "ipc", "iterations", "batch_real", "batch_train", "width", "depth", "log_every",
              "checkpoint_every", "eval_runs", "pseudo_min_samples", "dream_interval", "dream_pool",
              "dream_kmeans_iters")
    if c.eval_width is not None:
        _positive(c, "eval_width")
    if not dm:
        _positive(c, "outer_loop")
        if c.inner_loop is None or c.inner_loop < 0:
            raise ValueError(f"inner_loop must be an integer >= 0 (0: no network training between matching "
                             f"steps), got {c.inner_loop!r}")
    if c.idc_factor is None:
        c.idc_factor = idc_factor(c.preset, c.dataset, c.ipc)
    if c.method == "idc" and c.idc_factor < 1:
        raise ValueError(f"idc_factor must be >= 1, got {c.idc_factor}")
    if c.method == "idc":
        if c.idc_recipe is None:
            c.idc_recipe = "cobra" if c.preset == "cobra" else "idc"
        if c.idc_recipe not in IDC_RECIPES:
            raise ValueError(f"unknown idc_recipe {c.idc_recipe!r}; choose one of {', '.join(IDC_RECIPES)}")
    if c.eval_every < 0 or c.cobra_warmup_epochs < 0:
        raise ValueError("eval_every and cobra_warmup_epochs must be >= 0")
    if not 0.0 <= c.group_noise <= 1.0:
        raise ValueError(f"group_noise must be a fraction in [0, 1], got {c.group_noise}")
    if not c.lr_img > 0 or not c.lr_net > 0 or not 0.0 <= c.momentum < 1.0:
        raise ValueError(f"need lr_img > 0, lr_net > 0 and 0 <= momentum < 1, got "
                         f"{c.lr_img}, {c.lr_net}, {c.momentum}")
    if c.real_chunk is not None and c.real_chunk < 1:
        raise ValueError(f"real_chunk must be a positive integer or None, got {c.real_chunk}")
    if c.dc_block_classes is not None and c.dc_block_classes < 1:
        raise ValueError(f"dc_block_classes must be a positive integer or None, got {c.dc_block_classes}")
    if not isinstance(c.fair_over, str) or not c.fair_over:
        raise ValueError(f"fair_over must be 'intersection', 'marginal' or an attribute name, got {c.fair_over!r}")
    if c.groups == "pseudo" and c.fair_over != "intersection":
        raise ValueError("fair_over needs the dataset's attributes; pseudo groups have none (use "
                         "fair_over='intersection')")
    if c.pseudo_max_groups is not None and c.pseudo_max_groups < 1:
        raise ValueError(f"pseudo_max_groups must be >= 1, got {c.pseudo_max_groups}")
    return c


def _resolve_cafe(c: DistillConfig) -> None:
    from ..cafe import reference_weights

    ref = reference_weights(c.objective)
    if c.cafe_weights is None and c.model.lower() == "convnet":
        # The references are for depth 3 (CAFE's ConvNet). At another depth no
        # reference exists: every block weighs 1, the embedding as the
        # reference's (fastfair's rule; docs/methods.md, "CAFE").
        c.cafe_weights = list(ref.layers) if c.depth == 3 else [1.0] * c.depth + [ref.layers[-1]]
    if c.cafe_weights is None:
        raise ValueError(f"CAFE's layer weights are defined for the ConvNet; for {c.model} give cafe_weights "
                         "(--cafe-weights): one per ReLU of its features, shallow to deep, then the embedding")
    try:
        c.cafe_weights = [float(w) for w in c.cafe_weights]
    except (TypeError, ValueError):
        raise ValueError(f"cafe_weights must be a list of numbers, got {c.cafe_weights!r}") from None
    if not c.cafe_weights or any(not (w >= 0) or w == float("inf") for w in c.cafe_weights):
        raise ValueError(f"cafe_weights must be finite numbers >= 0, one per aligned layer, got {c.cafe_weights}")
    if c.cafe_inner_weight is None:
        c.cafe_inner_weight = ref.inner_weight
    if not (0 <= c.cafe_inner_weight < float("inf")):
        raise ValueError(f"cafe_inner_weight must be a finite number >= 0, got {c.cafe_inner_weight}")
    if c.cafe_class_mean is None:
        c.cafe_class_mean = ref.class_mean
    if c.groups == "pseudo":
        raise ValueError("CAFE takes true group labels; groups='pseudo' is supported by DM and the DC family")


# COBRA's train_idc.py picks the multi-formation factor by dataset: 4 for its
# face datasets (3 at IPC >= 100), 2 otherwise; IDC's and FairDD's runs use 2.
COBRA_FACE_DATASETS = ("bffhq", "utkface")


def idc_factor(preset: str, dataset: str, ipc: int) -> int:
    """The preset's IDC multi-formation factor."""
    if preset == "cobra" and dataset.lower() in COBRA_FACE_DATASETS:
        return 3 if ipc >= 100 else 4
    return 2


# Fields added after checkpoints were written, with the value an older
# version behaved as: a checkpoint without the field resumes under it.
ADDED_FIELDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "idc_recipe": lambda saved: "idc" if saved.get("method") == "idc" else None,
    # Before several attributes, a run had one group id per sample: the intersection of one attribute.
    "fair_over": lambda saved: "intersection",
}


def resume_mismatch(saved: dict[str, Any], current: DistillConfig) -> list[str]:
    """Fields whose change would make a resumed run differ from an uninterrupted one."""
    cur = current.to_dict()
    return sorted(k for k in cur if k not in RESUMABLE_CHANGES
                  and (saved[k] if k in saved else ADDED_FIELDS.get(k, lambda _: None)(saved)) != cur[k])
