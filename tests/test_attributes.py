"""Several protected attributes (fastfair's extension): the mixed-radix group
ids, the two-attribute datasets, what the fair objectives are fair over
(intersection / marginal / one attribute) against per-class, per-group
float64 loops, and the per-attribute metrics."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastfair import data, distill
from fastfair.attributes import Attributes, regroup
from fastfair.distill.context import build_context
from fastfair.distill.dm import dm_iteration
from fastfair.distill.synset import init_images as _init_images
from fastfair.metrics import attribute_reports, fairness_report
from fastfair.objectives import dm_matching_loss

ATTRS = Attributes(("fg", "bg"), (("r", "g", "b"), ("x", "y")))


def test_mixed_radix_ids_and_marginals() -> None:
    vals = torch.tensor([[a, b] for a in range(3) for b in range(2)])
    ids = ATTRS.group(vals)
    assert ids.tolist() == list(range(6))  # the last attribute varies fastest: g = fg * K_bg + bg
    assert torch.equal(ATTRS.marginal(ids, 0), vals[:, 0]) and torch.equal(ATTRS.marginal(ids, 1), vals[:, 1])
    assert ATTRS.group_names() == ["r/x", "r/y", "g/x", "g/y", "b/x", "b/y"]
    with pytest.raises(ValueError, match="unknown attribute 'age'.*fg, bg"):
        ATTRS.check_fair_over("age")
    with pytest.raises(ValueError, match="distinct"):
        Attributes(("marginal",), (("a",),))


def _loop_dm(real, labels, groups, syn, syn_labels, C, attr_groups: list[tuple[torch.Tensor, int]]):
    """FairDD DM summed over the given (group id per row, number of groups)
    partitions: per class, per group present, ||mean_real - mean_syn||^2."""
    total = syn.new_zeros(())
    for gid, K in attr_groups:
        for c in range(C):
            rc, sc = labels == c, syn_labels == c
            if not rc.any() or not sc.any():
                continue
            nu = syn[sc].mean(0)
            for k in range(K):
                m = rc & (gid == k)
                if m.any():
                    total = total + (real[m].mean(0) - nu).pow(2).sum()
    return total


@pytest.mark.parametrize("over", ["intersection", "marginal", "fg", "bg"])
def test_regrouped_dm_loss_equals_the_per_group_loop(over: str) -> None:
    g = torch.Generator().manual_seed(0)
    C, n, d = 3, 60, 5
    labels = torch.randint(0, C, (n,), generator=g)
    groups = torch.randint(0, 5, (n,), generator=g)  # intersectional group 5 (b/y) never occurs
    real = torch.randn(n, d, generator=g, dtype=torch.float64)
    syn_labels = torch.arange(C).repeat_interleave(2)
    syn = torch.randn(6, d, generator=g, dtype=torch.float64, requires_grad=True)
    G = ATTRS.num_groups
    seg = labels * G + groups
    sums = torch.zeros(C * G, d, dtype=torch.float64).index_add_(0, seg, real)
    counts = torch.bincount(seg, minlength=C * G)
    s2, n2, g2 = regroup(sums, counts, C, ATTRS, over)
    syn_mean = torch.stack([syn[syn_labels == c].mean(0) for c in range(C)])
    got = dm_matching_loss(s2, n2, syn_mean, torch.full((C,), 2), g2, "fairdd")
    parts = {"intersection": [(groups, G)], "fg": [(ATTRS.marginal(groups, 0), 3)],
             "bg": [(ATTRS.marginal(groups, 1), 2)],
             "marginal": [(ATTRS.marginal(groups, 0), 3), (ATTRS.marginal(groups, 1), 2)]}[over]
    want = _loop_dm(real, labels, groups, syn, syn_labels, C, parts)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (a,) = torch.autograd.grad(got, syn)
    (b,) = torch.autograd.grad(want, syn)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_cdigits_fgbg_dataset() -> None:
    ds = data.load("cdigits-fgbg", fg_colours=3, bg_colours=2, bias_ratio=0.8)
    assert ds.attributes.names == ("fg", "bg") and ds.num_groups == 6 and ds.attributes.sizes == (3, 2)
    fg, bg = ds.attributes.marginal(ds.train.groups, 0), ds.attributes.marginal(ds.train.groups, 1)
    for c in range(10):  # each attribute biased toward its class value, about 0.8 each (even recipe)
        m = ds.train.labels == c
        assert abs(float((fg[m] == c % 3).float().mean()) - 0.8) < 0.02
        assert abs(float((bg[m] == c % 2).float().mean()) - 0.8) < 0.02
    cells = torch.bincount(ds.test.labels * 6 + ds.test.groups, minlength=60)
    assert int(cells.min()) >= 20 and int(cells.max()) - int(cells.min()) <= 10  # every test cell is filled
    with pytest.raises(ValueError, match="fg_colours"):
        data.load("cdigits-fgbg", fg_colours=11)


def init_images(ctx) -> torch.Tensor:  # noqa: ANN001
    return _init_images(ctx.sampler.class_pool, ctx.train_images, 2, "real", 1, torch.Generator().manual_seed(0))[0]


def _ctx(fair_over: str, ds, objective: str = "fairdd"):
    cfg = distill.config.resolve(distill.DistillConfig(
        dataset="cdigits-fgbg", method="dm", objective=objective, ipc=2, width=8, depth=2, batch_real=12,
        iterations=1, fair_over=fair_over))
    return build_context(cfg, ds, torch.device("cpu"))


def test_dm_step_fair_over_marginal_is_the_sum_of_the_attributes_steps() -> None:
    # One driver step: FairDD over the marginals = FairDD over fg + FairDD over
    # bg (the same network, batch and DSA draw), from one pass.
    ds = data.load("cdigits-fgbg", fg_colours=3, bg_colours=2)
    losses = {}
    for over in ("marginal", "fg", "bg"):
        ctx = _ctx(over, ds)
        _, _, losses[over] = dm_iteration(ctx, init_images(ctx), None, 0)
    torch.testing.assert_close(losses["marginal"], losses["fg"] + losses["bg"], rtol=1e-5, atol=1e-5)


def test_dc_matching_fair_over_marginal_is_the_sum_of_the_attributes() -> None:
    # The DC driver's matching on one real batch: FairDD over the marginals =
    # FairDD over fg + over bg, and each equals the loss of per-attribute
    # group gradients computed directly (segment = class x attribute value).
    from fastfair.distill import dc
    from fastfair.nets import get_network
    from fastfair.objectives import dc_matching_loss
    from fastfair.pergroup import class_gradients, segment_gradients

    ds = data.load("cdigits-fgbg", fg_colours=3, bg_colours=2)
    torch.manual_seed(0)
    net = get_network("ConvNet", 3, 10, 32, width=4, depth=1).double()
    sizes = [6] * 10
    labels = torch.arange(10).repeat_interleave(6)
    groups = torch.randint(0, 6, (60,))
    real = torch.randn(60, 3, 32, 32, dtype=torch.float64)
    x = torch.randn(20, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    syn_labels = torch.arange(10).repeat_interleave(2)
    losses, grads = {}, {}
    for over in ("marginal", "fg", "bg"):
        cfg = distill.config.resolve(distill.DistillConfig(dataset="cdigits-fgbg", method="dc", ipc=2,
                                                           fair_over=over))
        ctx = build_context(cfg, ds, torch.device("cpu"))
        syn_grads = class_gradients(net, x, syn_labels, 10, create_graph=True)
        losses[over], grads[over] = dc._blocked_matching(ctx, net, real, labels, labels * 6 + groups, 6, sizes,
                                                         syn_grads, x)
    torch.testing.assert_close(losses["marginal"], losses["fg"] + losses["bg"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads["marginal"], grads["fg"] + grads["bg"], rtol=1e-9, atol=1e-10)
    fg = ds.attributes.marginal(groups, 0)
    direct = segment_gradients(net, real, labels, labels * 3 + fg, 30)
    counts = torch.bincount(labels * 3 + fg, minlength=30)
    want = dc_matching_loss(direct, counts, class_gradients(net, x, syn_labels, 10, create_graph=True), 3,
                            objective="fairdd")
    torch.testing.assert_close(losses["fg"], want.detach(), rtol=1e-10, atol=1e-10)


def test_dc_runs_over_every_choice_and_refuses_unknown_attributes() -> None:
    ds = data.load("cdigits-fgbg", fg_colours=2, bg_colours=2)
    base = distill.DistillConfig(dataset="cdigits-fgbg", method="dc", objective="fairdd", ipc=1, width=4, depth=1,
                                 batch_real=8, outer_loop=1, inner_loop=1, iterations=1)
    for over in ("intersection", "marginal", "fg", "bg"):
        res = distill.run(dataclasses.replace(base, fair_over=over), ds, device="cpu", progress=False)
        assert torch.isfinite(res.images).all()
    with pytest.raises(ValueError, match="unknown attribute 'age'"):
        distill.run(dataclasses.replace(base, fair_over="age"), ds, device="cpu", progress=False)
    one = data.load("synthetic", num_classes=3, num_groups=2, image_size=8, n_per_class=10)
    with pytest.raises(ValueError, match="unknown attribute 'fg'"):
        distill.run(dataclasses.replace(base, dataset="synthetic", fair_over="fg"), one, device="cpu",
                    progress=False)


def test_attribute_reports_equal_reports_on_marginal_groups() -> None:
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (300,), generator=g)
    groups = torch.randint(0, 6, (300,), generator=g)
    pred = torch.where(torch.rand(300, generator=g) < 0.6, labels, torch.randint(0, 4, (300,), generator=g))
    reps = attribute_reports(pred, labels, groups, 4, ATTRS)
    assert set(reps) == {"fg", "bg"}
    for k, name in enumerate(("fg", "bg")):
        want = fairness_report(pred, labels, ATTRS.marginal(groups, k), 4, ATTRS.sizes[k])
        for key in ("deo_m", "deo_a", "suf_m"):
            assert reps[name][key] == pytest.approx(want[key])
    assert attribute_reports(pred, labels, groups, 4, Attributes.single(list("abcdef"))) == {}


@pytest.mark.parametrize("over", ["intersection", "marginal", "fg", "bg"])
def test_fair_dm_loss_module_fair_over_equals_the_loop(over: str) -> None:
    from fastfair.nn import FairDMLoss

    g = torch.Generator().manual_seed(5)
    C, n, d = 3, 80, 4
    labels = torch.randint(0, C, (n,), generator=g)
    groups = torch.randint(0, 6, (n,), generator=g)
    real = torch.randn(n, d, generator=g, dtype=torch.float64)
    syn_labels = torch.arange(C).repeat_interleave(2)
    syn = torch.randn(6, d, generator=g, dtype=torch.float64, requires_grad=True)
    got = FairDMLoss(C, 6, "fairdd", attributes=ATTRS, fair_over=over)(real, labels, groups, syn, syn_labels)
    parts = {"intersection": [(groups, 6)], "fg": [(ATTRS.marginal(groups, 0), 3)],
             "bg": [(ATTRS.marginal(groups, 1), 2)],
             "marginal": [(ATTRS.marginal(groups, 0), 3), (ATTRS.marginal(groups, 1), 2)]}[over]
    want = _loop_dm(real, labels, groups, syn, syn_labels, C, parts)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="needs the attributes"):
        FairDMLoss(C, 6, fair_over="fg")


@pytest.mark.parametrize("over", ["marginal", "fg"])
def test_fair_dm_loss_function_fair_over(over: str) -> None:
    from fastfair import ops
    from fastfair.nn import FairDMLoss

    g = torch.Generator().manual_seed(8)
    labels, groups = torch.randint(0, 3, (60,), generator=g), torch.randint(0, 6, (60,), generator=g)
    real, syn = torch.randn(60, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    syn_labels = torch.arange(3).repeat_interleave(2)
    got = ops.fair_dm_loss(real, labels, groups, syn, syn_labels, 3, 6, attributes=ATTRS, fair_over=over)
    want = FairDMLoss(3, 6, attributes=ATTRS, fair_over=over)(real, labels, groups, syn, syn_labels)
    parts = {"fg": [(ATTRS.marginal(groups, 0), 3)],
             "marginal": [(ATTRS.marginal(groups, 0), 3), (ATTRS.marginal(groups, 1), 2)]}[over]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, _loop_dm(real, labels, groups, syn, syn_labels, 3, parts), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="needs the attributes"):
        ops.fair_dm_loss(real, labels, groups, syn, syn_labels, 3, 6, fair_over="fg")


@pytest.mark.parametrize("over", ["marginal", "fg", "bg"])
def test_gradient_matching_fair_over_is_the_sum_over_each_attribute(over: str) -> None:
    """Over one attribute: the loss on that attribute's values as the groups;
    marginal: the sum of the attributes' losses (FairDD's terms summed)."""
    from fastfair.nets import ConvNet
    from fastfair.nn import FairGradientMatching

    torch.manual_seed(0)
    net = ConvNet(3, 3, 8, width=4, depth=1).double()
    g = torch.Generator().manual_seed(2)
    real = torch.randn(40, 3, 8, 8, generator=g, dtype=torch.float64)
    labels, groups = torch.randint(0, 3, (40,), generator=g), torch.randint(0, 6, (40,), generator=g)
    syn = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)
    syn_labels = torch.arange(3).repeat_interleave(2)
    got = FairGradientMatching(net, 3, 6, attributes=ATTRS, fair_over=over)(real, labels, groups, syn, syn_labels)
    names = ["fg", "bg"] if over == "marginal" else [over]
    want = sum(FairGradientMatching(net, 3, ATTRS.sizes[ATTRS.index(a)])(
        real, labels, ATTRS.marginal(groups, ATTRS.index(a)), syn, syn_labels) for a in names)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("over", ["marginal", "bg"])
def test_cafe_loss_fair_over_is_the_sum_over_each_attribute(over: str) -> None:
    from fastfair.nets import ConvNet, layer_features
    from fastfair.nn import FairCAFELoss

    torch.manual_seed(1)
    net = ConvNet(3, 3, 8, width=4, depth=3).double()
    g = torch.Generator().manual_seed(4)
    real = torch.randn(50, 3, 8, 8, generator=g, dtype=torch.float64)
    labels, groups = torch.randint(0, 3, (50,), generator=g), torch.randint(0, 6, (50,), generator=g)
    syn = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)
    syn_labels = torch.arange(3).repeat_interleave(2)
    rf, sf = layer_features(net, real), layer_features(net, syn)
    got = FairCAFELoss(3, 6, attributes=ATTRS, fair_over=over)(rf, labels, groups, sf, syn_labels)
    names = ["fg", "bg"] if over == "marginal" else [over]
    want = sum(FairCAFELoss(3, ATTRS.sizes[ATTRS.index(a)])(rf, labels, ATTRS.marginal(groups, ATTRS.index(a)), sf,
                                                             syn_labels) for a in names)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_reproduce_and_eval_draw_a_heatmap_per_attribute(tmp_path, capsys) -> None:
    import json

    from fastfair.cli import main

    out = tmp_path / "r"
    assert main(["reproduce", "--table", "cdigits-intersectional", "--budget", "tiny", "--cells",
                 "dm:fairdd@marginal", "--out", str(out), "--threads", "1"]) == 0
    cell = out / "cdigits-fgbg" / "dm_fairdd_over_marginal_ipc10"
    for name in ("cells.png", "cells_fg.png", "cells_bg.png", "cells_worst.png"):
        assert (cell / name).stat().st_size > 0, name
    rec = json.loads((cell / "cell.json").read_text())
    fg = rec["per_attribute_cells"]["fg"]
    assert len(fg) == 10 and len(fg[0]) == 4  # classes x the fg attribute's values
    assert main(["eval", str(cell), "--epochs", "1", "--runs", "1", "--width", "8", "--no-progress",
                 "--json", str(tmp_path / "m.json")]) == 0
    for name in ("m_cells.png", "m_cells_fg.png", "m_cells_bg.png", "m_cells_worst.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert set(json.loads((tmp_path / "m.json").read_text())["per_attribute_cells"]) == {"fg", "bg"}
    capsys.readouterr()


def test_evaluations_during_a_run_report_each_attribute(tmp_path, capsys) -> None:
    """A curve over iterations (--eval-every) on two attributes logs each one's
    marginal gaps beside the intersection's, as metrics.json does."""
    import json

    from fastfair.cli import main

    out = tmp_path / "o"
    assert main(["distill", "--dataset", "cdigits-fgbg", "--method", "dm", "--objective", "fairdd", "--ipc", "1",
                 "--iterations", "2", "--width", "8", "--depth", "2", "--batch-real", "8", "--eval-every", "2",
                 "--eval-epochs", "1", "--eval-width", "4", "--eval-runs", "1", "--no-progress", "--device", "cpu",
                 "--out", str(out)]) == 0
    err = capsys.readouterr()
    ev = next(json.loads(line)["eval"] for line in (out / "log.jsonl").read_text().splitlines()
              if "eval" in json.loads(line))
    assert set(ev["per_attribute"]) == {"fg", "bg"}
    for m in ev["per_attribute"].values():
        deo_m, std = m["deo_m"]
        assert 0 <= deo_m <= 100 and std == 0  # one run
    assert "fg DEO_M" in err.out + err.err and "bg DEO_M" in err.out + err.err
    assert set(ev["deo_floor"]) == {"deo_m", "deo_a", "fg_deo_m", "bg_deo_m"}  # each point's chance floor
    assert "chance DEO_M" in err.out + err.err
    syn = torch.load(out / "synset.pt", weights_only=True)
    assert syn["config"]["eval_width"] == 4  # --eval-width reached the run's evaluations


def test_a_wrong_fair_over_fails_before_the_checkpoint_notice(tmp_path, capsys) -> None:
    """A folder with a checkpoint and a misspelt --fair-over: one error naming
    the attributes, and no "overwriting" notice (nothing is overwritten)."""
    from fastfair.cli import EXIT_USAGE, main

    out = tmp_path / "o"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"kept")
    assert main(["distill", "--dataset", "cdigits-fgbg", "--method", "dm", "--ipc", "1", "--iterations", "1",
                 "--fair-over", "age", "--no-progress", "--device", "cpu", "--out", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "unknown attribute 'age'" in err and "fg, bg" in err, err
    assert "overwriting" not in err, err
    assert (out / "checkpoint.pt").read_bytes() == b"kept"
