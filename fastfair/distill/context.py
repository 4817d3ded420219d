"""What every distillation step needs, built once per run: the dataset on the
device, the sampler, the synthetic labels, the network builder, and the shared
pieces of the DM and DC steps (real batches with their groups, siamese DSA,
training a network on the synthetic set).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as dist
from ..augment import DSAParams, dsa
from ..attributes import regroup
from ..nets import get_network
from ..objectives import Objective, with_group_layout
from ..pergroup import auto_chunk
from . import rng
from .config import DistillConfig
from .groups import noisy_groups, pseudo_groups
from .sampler import Batch, RealSampler
from .synset import decode

# Keep the train split on the accelerator when it is smaller than this; larger
# sets (CelebA at 64x64 is ~8 GB) stay on the host and each batch is copied.
_DEVICE_RESIDENT_BYTES = 4 << 30


@dataclass
class RunContext:
    cfg: DistillConfig
    dataset: Any
    device: torch.device
    num_classes: int
    num_groups: int
    train_images: Tensor          # on ``device`` when small enough, else CPU
    train_labels: Tensor          # on ``device``
    train_groups: Tensor          # on ``device``; noisy when cfg.group_noise > 0
    sampler: RealSampler
    syn_labels: Tensor            # stored synthetic labels, class-major, on device
    factor: int                   # IDC multi-formation factor (1 otherwise)
    syn_sizes: list[int]          # decoded synthetic rows per class
    dec_labels: Tensor            # decoded synthetic labels, on device
    rank: int
    world_size: int
    # Per-run decisions that must not change while the run goes on (e.g. the
    # DC class blocking, distill.dc.auto_block_classes).
    cache: dict = field(default_factory=dict)

    @property
    def num_segments(self) -> int:
        return self.num_classes * self.num_groups

    def fair_statistics(self, seg_sum: Tensor, counts: Tensor, num_classes: int) -> tuple[Tensor, Tensor, int]:
        """Per-(class, intersectional group) sums [C*G, *F] and counts to the
        groups the objective is fair over (``cfg.fair_over``;
        fastfair.attributes.regroup): unchanged for ``intersection``."""
        attrs = getattr(self.dataset, "attributes", None)
        if self.cfg.fair_over == "intersection" or attrs is None or self.cfg.groups == "pseudo":
            return seg_sum, counts, self.num_groups
        return regroup(seg_sum, counts, num_classes, attrs, self.cfg.fair_over)

    @property
    def objective(self) -> Objective:
        """The run's objective, resolved against the data's group layout:
        ``raked`` learns the attribute sizes of the intersectional groups it
        weighs (objectives.raking_weights); over a marginal, one attribute or
        pseudo groups it has none and weighs as ``fairdd`` does."""
        attrs = getattr(self.dataset, "attributes", None) if self.cfg.groups != "pseudo" else None
        return with_group_layout(self.cfg.objective, attrs, self.cfg.fair_over)

    # ------------------------------------------------------------------ nets

    def new_network(self, it: int, *keys: int) -> nn.Module:
        """A freshly initialised network, the same on every rank and on resume."""
        c = self.cfg
        ds = self.dataset

        def build() -> nn.Module:
            return get_network(c.model, ds.channels, ds.num_classes, ds.image_size, width=c.width,
                               depth=c.depth, norm=c.norm)

        return rng.make_network(build, rng.derive(c.seed, it, rng.NET, *keys)).to(self.device)

    # ------------------------------------------------------------ real data

    def real_batch(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Images, labels and (true or noisy) groups of a sampled batch."""
        idx = batch.indices
        imgs = self.train_images[idx.to(self.train_images.device, non_blocking=True)]
        imgs = imgs.to(self.device, non_blocking=True)
        idx_d = idx.to(self.device, non_blocking=True)
        return imgs, self.train_labels[idx_d], self.train_groups[idx_d]

    def pseudo(self, emb: Tensor, sizes: list[int]) -> Tensor:
        """DBSCAN pseudo groups of class-major real embeddings (host sync)."""
        c = self.cfg
        cap = c.pseudo_max_groups if c.pseudo_max_groups is not None else self.num_groups
        return pseudo_groups(emb, sizes, cap, c.pseudo_eps, c.pseudo_min_samples)

    # ---------------------------------------------------------- augmentation

    @torch.no_grad()
    def embed_real(self, net: nn.Module, real: Tensor) -> Tensor:
        """Embeddings of the real batch, ``cfg.real_chunk`` rows per forward
        (None: ``pergroup.auto_chunk``): the embeddings are small, the
        activations of a many-class batch are not."""
        return torch.cat([net.embed(part) for part in real.split(self.real_chunk(net, real))])

    def decode(self, stored: Tensor) -> Tensor:
        """The synthetic set the stored images stand for: IDC's multi-formation
        (upsampling as ``cfg.idc_recipe`` says), the images themselves otherwise."""
        return decode(stored, self.factor, align_corners=self.cfg.idc_recipe == "cobra")

    def real_chunk(self, net: nn.Module, real: Tensor) -> int:
        """Rows per network pass over the real batch: ``cfg.real_chunk``, or
        when None the automatic choice (2^24 input values per pass on GPUs,
        cache-sized blocks on CPUs)."""
        return self.cfg.real_chunk or auto_chunk(net, real)

    def siamese(self, real: Tensor, real_sizes: list[int], syn: Tensor, it: int, *keys: int,
                real_offsets: list[int] | None = None) -> tuple[Tensor, Tensor]:
        """DSA with one seed per class shared by that class's real and synthetic
        rows: the same transform for all of them (batch mode, as the DSA/DM
        reference code does; ``cfg.dsa_per_sample``: row i of both shares its
        parameters instead). A cheap loop over classes; the network
        forward stays one pass over all classes.

        ``real_offsets`` (``Batch.offsets``): where this rank's real rows of
        each class start in the global class batch. A real row takes the
        parameters of its GLOBAL position, so a distributed run augments every
        real row as one process would; the synthetic set is replicated, its
        rows always start at 0, and synthetic row i keeps the transform of
        global real row i of its class, as in one process."""
        return (self.augment_real(real, real_sizes, it, *keys, real_offsets=real_offsets),
                self.augment_syn(syn, it, *keys))

    def _dsa_seed(self, it: int, keys: tuple[int, ...], c: int) -> int:
        return rng.derive(self.cfg.seed, it, rng.DSA, *keys, c)

    @property
    def dsa_params(self) -> DSAParams:
        """Parameters of the siamese calls: batch mode (one transform per
        class, the reference's) unless ``cfg.dsa_per_sample``."""
        return DSAParams(per_sample=self.cfg.dsa_per_sample)

    def augment_syn(self, syn: Tensor, it: int, *keys: int) -> Tensor:
        """The synthetic half of :meth:`siamese`."""
        if not self.cfg.dsa:
            return syn
        parts = torch.split(syn, self.syn_sizes)
        return torch.cat([dsa(parts[c], self._dsa_seed(it, keys, c), self.cfg.dsa_strategy, self.dsa_params)
                          for c in range(self.num_classes)])

    def _augment_class(self, part: Tensor, c: int, it: int, keys: tuple[int, ...],
                       offsets: list[int] | None) -> Tensor:
        if not self.cfg.dsa:
            return part
        off = offsets[c] if offsets is not None else 0
        return dsa(part, self._dsa_seed(it, keys, c), self.cfg.dsa_strategy, self.dsa_params, offset=off)

    def augment_real(self, real: Tensor, real_sizes: list[int], it: int, *keys: int,
                     real_offsets: list[int] | None = None, first_class: int = 0) -> Tensor:
        """The real half of :meth:`siamese` (class-major rows). ``first_class``:
        the rows are those of classes first_class, first_class + 1, ... (a
        block of the batch; ``real_sizes`` lists those classes only)."""
        if not self.cfg.dsa:
            return real
        # Written in place of a list + cat: at an ImageNet subset's scale
        # (25600 images at 64 px) every copy of the batch is 1.3 GB.
        out = torch.empty_like(real)
        row = 0
        for c, part in enumerate(torch.split(real, real_sizes), start=first_class):
            out[row:row + part.shape[0]] = self._augment_class(part, c, it, keys, real_offsets)
            row += part.shape[0]
        return out

    @torch.no_grad()
    def embed_real_augmented(self, net: nn.Module, real: Tensor, real_sizes: list[int], it: int, *keys: int,
                             real_offsets: list[int] | None = None) -> Tensor:
        """``embed_real(net, augment_real(real, ...))`` without an augmented
        copy of the whole batch: each class is augmented when the chunked
        forward reaches it, so at most one chunk plus one class of augmented
        rows exist at a time. The chunks are the same rows as there, so the
        embeddings are the same."""
        rows = self.real_chunk(net, real)
        out: list[Tensor] = []
        pending: list[Tensor] = []
        waiting = 0
        parts = torch.split(real, real_sizes)
        for c, part in enumerate(parts):
            pending.append(self._augment_class(part, c, it, keys, real_offsets))
            waiting += part.shape[0]
            last = c == len(parts) - 1
            if waiting >= rows or last:
                # Whole chunks now, the remainder waits for the next class.
                block = torch.cat(pending)
                full = block.shape[0] if last else block.shape[0] - block.shape[0] % rows
                out.append(self.embed_real(net, block[:full]))
                pending, waiting = [block[full:]], block.shape[0] - full
        return torch.cat(out)

    # ----------------------------------------------------- network training

    def train_on_synset(self, net: nn.Module, opt: torch.optim.Optimizer, images: Tensor, labels: Tensor,
                        epochs: int, gen: torch.Generator) -> None:
        """``epochs`` passes of cross-entropy SGD over the (detached) synthetic
        set in batches of ``batch_train``, with DSA: the DC inner loop and
        COBRA's warm-up."""
        x_all, y_all = images.detach(), labels
        n = x_all.shape[0]
        bs = self.cfg.batch_train
        net.train()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).to(self.device)
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                x, y = x_all[idx], y_all[idx]
                if self.cfg.dsa:
                    # Per sample: the reference trains networks with seed -1.
                    x = dsa(x, int(torch.randint(1 << 62, (1,), generator=gen)), self.cfg.dsa_strategy,
                            per_sample=True)
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()


def check_fair_over(cfg: DistillConfig, dataset: Any) -> None:
    """``cfg.fair_over`` against the dataset's attributes: a ValueError naming
    them. Public so the CLI can check it before it says anything about --out."""
    attrs = getattr(dataset, "attributes", None)
    if attrs is not None:
        attrs.check_fair_over(cfg.fair_over)
    elif cfg.fair_over not in ("intersection", "marginal"):
        raise ValueError(f"fair_over={cfg.fair_over!r}: this dataset declares no attributes")


def build_context(cfg: DistillConfig, dataset: Any, device: torch.device) -> RunContext:
    """Move the data where the steps need it and fix every static shape."""
    train = dataset.train
    C, G = int(dataset.num_classes), int(dataset.num_groups)
    rank, world = dist.rank(), dist.world_size()
    if cfg.groups == "pseudo" and world > 1:
        raise ValueError("groups='pseudo' clusters each class batch as a whole; it does not support "
                         "distributed runs (every rank would cluster its own shard differently)")
    if cfg.groups == "pseudo" and cfg.sample_per_group:
        raise ValueError("sample_per_group needs group labels; it cannot be combined with groups='pseudo'")
    check_fair_over(cfg, dataset)
    labels = train.labels.long()
    groups = train.groups.long()
    if cfg.group_noise > 0:
        groups = noisy_groups(groups, G, cfg.group_noise, cfg.seed)
    images = train.images
    nbytes = images.numel() * images.element_size()
    keep = device if (device.type == "cpu" or nbytes <= _DEVICE_RESIDENT_BYTES) else torch.device("cpu")
    images = images.to(keep)
    sampler = RealSampler(labels, groups, C, G, cfg.batch_real, cfg.sample_per_group, rank, world)
    for c, n in enumerate(sampler.class_sizes):
        if n < cfg.ipc:
            name = getattr(dataset, "class_names", None)
            label = f"{c} ({name[c]})" if name else str(c)
            raise ValueError(f"ipc {cfg.ipc} is larger than class {label}, which has {n} training images")
    factor = cfg.idc_factor if cfg.method == "idc" else 1
    per = cfg.ipc * factor * factor
    syn_labels = torch.arange(C, device=device).repeat_interleave(cfg.ipc)
    # Pseudo groups are DBSCAN cluster ids: their capacity sets the segments.
    match_groups = (cfg.pseudo_max_groups or G) if cfg.groups == "pseudo" else G
    return RunContext(
        cfg=cfg, dataset=dataset, device=device, num_classes=C, num_groups=match_groups,
        train_images=images, train_labels=labels.to(device), train_groups=groups.to(device),
        sampler=sampler, syn_labels=syn_labels, factor=factor, syn_sizes=[per] * C,
        dec_labels=torch.arange(C, device=device).repeat_interleave(per), rank=rank, world_size=world,
    )
