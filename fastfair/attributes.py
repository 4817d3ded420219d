"""Several protected attributes at once (fastfair's extension: neither the
FairDD nor the COBRA paper defines it; docs/methods.md "Several protected
attributes").

A dataset declares its attributes (a name and the names of its values each);
a sample's *group* is the intersection of its values, the mixed-radix index
``g = sum_k v_k * prod_{j > k} K_j`` (the last attribute varies fastest: for
digit colour x background colour, ``g = fg * K_bg + bg``). The kernels only
ever see that one group id, so the per-(class, group) statistics come from
one pass at any number of attributes. What a fair objective is fair over is
then a cheap dense step on those statistics (:func:`regroup`):

- ``intersection``: every intersectional group is a group (FairDD: one term
  per (class, intersectional group) present; COBRA: the barycenter of the
  intersectional groups present);
- ``marginal``: each attribute's groups in turn, the objective's terms summed
  over the attributes (FairDD: the sum over attributes of FairDD's sum over
  that attribute's groups present); a marginal group's statistic is the sum
  of the intersectional segment sums it covers, never a second pass;
- an attribute's name: that attribute's groups only, as the papers do with
  their one attribute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

FAIR_OVER = ("intersection", "marginal")


@dataclass(frozen=True)
class Attributes:
    names: tuple[str, ...]
    values: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if not self.names or len(self.names) != len(self.values):
            raise ValueError(f"attributes need a name and a list of values each, got {self.names!r}")
        if any(len(v) < 1 for v in self.values):
            raise ValueError(f"every attribute needs at least one value, got {self.values!r}")
        if len(set(self.names)) != len(self.names) or set(self.names) & set(FAIR_OVER):
            raise ValueError(f"attribute names must be distinct and not {', '.join(FAIR_OVER)}: {self.names!r}")

    @classmethod
    def single(cls, group_names: list[str] | tuple[str, ...], name: str = "group") -> "Attributes":
        return cls((name,), (tuple(group_names),))

    @classmethod
    def from_list(cls, spec: list | tuple) -> "Attributes":
        """From ``[(name, [value, ...]), ...]`` (how a dataset and its cache store them)."""
        return cls(tuple(str(n) for n, _ in spec), tuple(tuple(str(v) for v in vals) for _, vals in spec))

    def to_list(self) -> list[tuple[str, list[str]]]:
        return [(n, list(v)) for n, v in zip(self.names, self.values)]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(v) for v in self.values)

    @property
    def num_groups(self) -> int:
        return math.prod(self.sizes)

    def stride(self, k: int) -> int:
        return math.prod(self.sizes[k + 1:])

    def index(self, name: str) -> int:
        if name not in self.names:
            raise ValueError(f"unknown attribute {name!r}; this dataset has {', '.join(self.names)} (or say "
                             f"{' or '.join(FAIR_OVER)})")
        return self.names.index(name)

    def group(self, values: Tensor) -> Tensor:
        """[N, A] attribute values -> [N] intersectional group ids."""
        strides = torch.tensor([self.stride(k) for k in range(len(self.names))], dtype=torch.int64)
        return (values.to(torch.int64) * strides).sum(-1)

    def marginal(self, groups: Tensor, k: int) -> Tensor:
        """The value of attribute ``k`` of each intersectional group id."""
        return torch.div(groups, self.stride(k), rounding_mode="floor") % self.sizes[k]

    def group_names(self) -> list[str]:
        """The intersectional groups' names, in id order ("red/blue")."""
        names = [""]
        for vals in self.values:
            names = [f"{a}/{b}" if a else b for a in names for b in vals]
        return names

    def check_fair_over(self, over: str) -> None:
        if over not in FAIR_OVER:
            self.index(over)


def regroup(seg_sum: Tensor, counts: Tensor, num_classes: int, attrs: Attributes, over: str
            ) -> tuple[Tensor, Tensor, int]:
    """Per-(class, intersectional group) sums [C*G, *F] and counts [C*G] to the
    groups an objective is fair over: returns (sums [C*G', *F], counts [C*G'],
    G'). Sums of sums: exact, whatever the counts (empty groups stay empty)."""
    G = attrs.num_groups
    if over == "intersection" or len(attrs.names) == 1 and over in (attrs.names[0], "marginal"):
        return seg_sum, counts, G
    feat = seg_sum.shape[1:]
    s = seg_sum.reshape(num_classes, *attrs.sizes, *feat)
    n = counts.reshape(num_classes, *attrs.sizes)
    axes = range(1, 1 + len(attrs.sizes))

    def one(k: int) -> tuple[Tensor, Tensor]:
        other = [a for a in axes if a != k + 1]
        return (s.sum(dim=other) if other else s), (n.sum(dim=other) if other else n)

    parts = [one(k) for k in range(len(attrs.names))] if over == "marginal" else [one(attrs.index(over))]
    sums = torch.cat([p[0] for p in parts], dim=1)
    cnts = torch.cat([p[1] for p in parts], dim=1)
    g2 = sums.shape[1]
    return sums.reshape(num_classes * g2, *feat), cnts.reshape(num_classes * g2), g2


def check_loss_attributes(op: str, attributes: "Attributes | None", fair_over: str, num_groups: int) -> None:
    """The loss modules' and fair_dm_loss's check of ``attributes`` /
    ``fair_over`` (ValueError naming ``op``)."""
    if attributes is not None:
        attributes.check_fair_over(fair_over)
        if attributes.num_groups != num_groups:
            raise ValueError(f"{op}: the attributes have {attributes.num_groups} intersectional groups, "
                             f"num_groups is {num_groups}")
    elif fair_over != "intersection":
        raise ValueError(f"{op}: fair_over={fair_over!r} needs the attributes")


def partitions(groups: Tensor, num_groups: int, attributes: "Attributes | None", over: str
               ) -> list[tuple[Tensor, int]]:
    """Per row, the groups an objective is fair over, as (ids, number of
    groups) per partition: the intersectional groups, one attribute's values,
    or every attribute's in turn (``marginal``)."""
    if attributes is None or over == "intersection":
        return [(groups, num_groups)]
    ks = range(len(attributes.names)) if over == "marginal" else [attributes.index(over)]
    return [(attributes.marginal(groups, k), attributes.sizes[k]) for k in ks]


def balanced_rows(cells: list[Tensor], sizes: tuple[int, ...], need: int, gen: torch.Generator,
                  tries: int = 64) -> Tensor:
    """``need`` rows of one class spread over its groups so that every
    attribute's values are covered as evenly as the data allow.

    ``cells[g]`` holds the class's rows of intersectional group ``g`` (the
    mixed-radix id of fastfair.attributes; ``sizes`` the attributes' numbers
    of values, ``(G,)`` for one attribute). Greedy: each pick takes the group
    used least so far, then the one whose attribute values are least covered,
    ties broken at random; a group gives a row it has not given yet while it
    has one. A greedy pass can paint itself into a corner (the groups left
    repeat a value already taken), so up to ``tries`` random tie orders are
    run and the most even cover kept (the first perfectly even one ends the
    search): over two 10-valued attributes and 10 picks, a Latin square on
    the groups the class has, where the data hold one. Vectorised over the
    groups (1024 groups, 200 picks: well under a second on one core).
    """
    present = [g for g, c in enumerate(cells) if c.numel() > 0]
    if not present:
        raise ValueError("balanced_rows needs a class with at least one image")
    orders = [cells[g][torch.randperm(cells[g].numel(), generator=gen)] for g in present]
    ids = torch.tensor(present, dtype=torch.int64)
    # Each present group's attribute values [P, A], as Attributes.marginal decodes the mixed-radix id.
    vals = torch.stack([torch.div(ids, math.prod(sizes[a + 1:]), rounding_mode="floor") % k
                        for a, k in enumerate(sizes)], 1)
    # One key per group, ordered as (times used, coverage of its values, tie):
    # coverage is an integer <= need * A and the tie is in [0, 1).
    dominate = float(need * len(sizes) + 2)
    # The values the class has at all: a value no group of the class holds
    # cannot be covered, and must not keep the search from stopping.
    held = [torch.bincount(vals[:, a], minlength=k) > 0 for a, k in enumerate(sizes)]
    best, best_score = None, None
    for _ in range(max(1, tries)):
        tie = torch.randperm(len(present), generator=gen).to(torch.float64) / len(present)
        used = torch.zeros(len(present), dtype=torch.float64)
        cover = [torch.zeros(k, dtype=torch.float64) for k in sizes]
        picks = []
        for _ in range(need):
            coverage = sum(cover[a][vals[:, a]] for a in range(len(sizes)))
            j = int(torch.argmin(used * dominate + coverage + tie))
            picks.append(j)
            used[j] += 1
            for a in range(len(sizes)):
                cover[a][vals[j, a]] += 1
        score = float(sum((c * c).sum() for c in cover))
        if best_score is None or score < best_score:
            best, best_score = picks, score
        if all(float(c[h].max() - c[h].min()) <= 1 for c, h in zip(cover, held)):
            break
    taken = [0] * len(present)
    rows = []
    for j in best:
        rows.append(orders[j][taken[j] % orders[j].numel()])
        taken[j] += 1
    return torch.stack(rows)
