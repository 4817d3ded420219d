"""``init="real-balanced"``: real initial images spread over each class's
groups and every attribute's values (fastfair's option), against counts
taken directly from the picks."""
from __future__ import annotations

import collections

import pytest
import torch

from fastfair import data, distill
from fastfair.distill.context import build_context
from fastfair.attributes import balanced_rows
from fastfair.distill.synset import init_images


def _cells(presence) -> list[torch.Tensor]:  # noqa: ANN001
    """Rows of group g are g * 1000 + i, i < presence(g)."""
    return [torch.arange(g * 1000, g * 1000 + presence(g)) for g in range(100)]


def test_ten_picks_over_two_biased_attributes_are_a_latin_square() -> None:
    # Class 7 of a 10 x 10 colour set: its row and column are full, a few
    # doubly-minority cells hold one image, the rest are empty.
    def presence(g: int) -> int:
        fg, bg = divmod(g, 10)
        return 500 if fg == 7 or bg == 7 else (1 if (fg * 3 + bg) % 4 == 0 else 0)

    cells = _cells(presence)
    for seed in range(5):
        rows = balanced_rows(cells, (10, 10), 10, torch.Generator().manual_seed(seed))
        groups = (rows // 1000).tolist()
        assert all(presence(g) > 0 for g in groups)
        assert len(set(groups)) == 10 and len(set(rows.tolist())) == 10
        assert sorted(g // 10 for g in groups) == list(range(10))  # every digit colour once
        assert sorted(g % 10 for g in groups) == list(range(10))   # every background once


def test_more_picks_than_groups_reuse_groups_evenly_and_rows_only_when_exhausted() -> None:
    # Rows of group g are g * 100 + i; group 1 is empty, group 2 holds one image.
    cells = [torch.arange(3), torch.empty(0, dtype=torch.int64), torch.arange(200, 201), torch.arange(300, 350)]
    rows = balanced_rows(cells, (4,), 9, torch.Generator().manual_seed(0)).tolist()
    by_group = collections.Counter(r // 100 for r in rows)
    assert by_group == {0: 3, 2: 3, 3: 3}  # the empty group gives nothing, the others share evenly
    assert sorted(r for r in rows if r < 100) == [0, 1, 2]  # group 0's three rows, each once
    assert [r for r in rows if r // 100 == 2] == [200, 200, 200]  # a one-image group repeats its image
    assert len({r for r in rows if r >= 300}) == 3
    with pytest.raises(ValueError, match="at least one image"):
        balanced_rows([torch.empty(0, dtype=torch.int64)] * 3, (3,), 2, torch.Generator())


def test_the_run_starts_from_balanced_real_images() -> None:
    ds = data.load("cdigits-fgbg", fg_colours=3, bg_colours=2, bias_ratio=0.8)
    cfg = distill.config.resolve(distill.DistillConfig(
        dataset="cdigits-fgbg", method="dm", objective="fairdd", ipc=6, width=8, depth=2, batch_real=12,
        iterations=1, init="real-balanced"))
    ctx = build_context(cfg, ds, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    images, labels = init_images(ctx.sampler.class_pool, ctx.train_images, 6, "real-balanced", 1, gen,
                                 cell_pools=ctx.sampler.cell_pool, attribute_sizes=ds.attributes.sizes)
    plain, _ = init_images(ctx.sampler.class_pool, ctx.train_images, 6, "real", 1, torch.Generator().manual_seed(0))
    # Find each initial image's training row to read its group.
    flat = ctx.train_images.reshape(ctx.train_images.shape[0], -1)

    def groups_of(imgs: torch.Tensor) -> list[int]:
        out = []
        for x in imgs.reshape(imgs.shape[0], -1):
            hit = (flat == x).all(1).nonzero()
            out.append(int(ds.train.groups[hit[0, 0]]))
        return out

    bal, raw = groups_of(images), groups_of(plain)
    assert labels.tolist() == [c for c in range(10) for _ in range(6)]
    for c in range(10):
        g = bal[c * 6:(c + 1) * 6]
        assert collections.Counter(x // 2 for x in g) == {0: 2, 1: 2, 2: 2}  # fg colours evenly
        assert collections.Counter(x % 2 for x in g) == {0: 3, 1: 3}          # bg colours evenly
    # The default draws by the data's bias: most classes start in one colour.
    majority = sum(max(collections.Counter(x // 2 for x in raw[c * 6:(c + 1) * 6]).values()) for c in range(10))
    assert majority > 30
    with pytest.raises(ValueError, match="cell_pools"):
        init_images(ctx.sampler.class_pool, ctx.train_images, 6, "real-balanced", 1, gen)


def test_cli_and_config_accept_the_balanced_init() -> None:
    from fastfair import choices
    assert "real-balanced" in choices.INITS and "real-balanced" in distill.config.INITS
    with pytest.raises(ValueError, match="unknown init"):
        distill.config.resolve(distill.DistillConfig(dataset="cdigits-fgbg", method="dm", init="balanced"))


def test_balanced_baseline_spreads_each_class_over_its_groups() -> None:
    from fastfair.evaluate import baseline_set, evaluate_baseline

    ds = data.load("cdigits-fgbg", fg_colours=3, bg_colours=2, bias_ratio=0.8)
    imgs, labels = baseline_set("random-balanced", ds, ipc=6, seed=1)
    assert imgs.shape[0] == 60 and labels.bincount().tolist() == [6] * 10
    flat = ds.train.images.reshape(ds.train.images.shape[0], -1)
    for c in range(10):
        rows = [int((flat == x.flatten()).all(1).nonzero()[0, 0]) for x in imgs[labels == c]]
        assert all(int(ds.train.labels[r]) == c for r in rows) and len(set(rows)) == 6
        g = [int(ds.train.groups[r]) for r in rows]
        assert collections.Counter(x // 2 for x in g) == {0: 2, 1: 2, 2: 2}
        assert collections.Counter(x % 2 for x in g) == {0: 3, 1: 3}
    # The plain random baseline keeps the bias (~0.8 x 0.8 in the class's own cell).
    imgs_r, labels_r = baseline_set("random", ds, ipc=6, seed=1)
    own = 0
    for x, y in zip(imgs_r, labels_r):
        r = int((flat == x.flatten()).all(1).nonzero()[0, 0])
        own += int(ds.train.groups[r]) == (int(y) % 3) * 2 + int(y) % 2
    assert own > 25
    res = evaluate_baseline("random-balanced", ds, ipc=6, epochs=2, runs=1, batch_size=16, device="cpu",
                            progress=False, net_kwargs={"width": 8, "depth": 2})
    assert res["kind"] == "random-balanced" and res["ipc"] == 6 and "per_attribute" in res


def test_a_value_the_class_lacks_does_not_stop_an_even_cover() -> None:
    # Background value 2 never occurs: the cover is even over the values there are.
    cells = [torch.arange(g * 100, g * 100 + (0 if g % 3 == 2 else 5)) for g in range(9)]  # sizes (3, 3)
    rows = balanced_rows(cells, (3, 3), 6, torch.Generator().manual_seed(0))
    groups = (rows // 100).tolist()
    assert collections.Counter(g // 3 for g in groups) == {0: 2, 1: 2, 2: 2}
    assert collections.Counter(g % 3 for g in groups) == {0: 3, 1: 3}
    assert len(set(groups)) == 6
