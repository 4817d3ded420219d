"""CAFE (fastfair.cafe, distill.cafe, nn.FairCAFELoss) against a per-class,
per-group reference loop in float64, written the way COBRA's train_cafe.py
computes it: CAFE's five maps [f5, f4, f3, f2, f1] (f4 the last pooled map,
f5 the same flattened), class by class and group by group."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fastfair import cafe, data, distill
from fastfair.distill.cafe import cafe_step_loss
from fastfair.distill.config import DistillConfig, resolve
from fastfair.distill.context import build_context
from fastfair.nets import ConvNet, layer_features
from fastfair.nn import FairCAFELoss

torch.set_default_dtype(torch.float32)


def _cafe_maps(net: ConvNet, x: torch.Tensor) -> list[torch.Tensor]:
    """CAFE's ConvNet forward contract: [f5, f4, f3, f2, f1] (depth 3)."""
    blocks, h = [], x
    for m in net.features:
        if isinstance(m, torch.nn.Flatten):
            break
        h = m(h)
        if isinstance(m, torch.nn.ReLU):
            blocks.append(h)
    f1, f2, f3 = blocks
    f4 = h  # the last pooled map
    return [f4.flatten(1), f4, f3, f2, f1]


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).sum()


def reference_loss(net: ConvNet, real: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                   syn: torch.Tensor, syn_labels: torch.Tensor, C: int, objective: str) -> torch.Tensor:
    """COBRA's train_cafe.py loss (vanilla / cobra) and fastfair's fairdd rule,
    one class and one group at a time."""
    r_maps = [m.detach() for m in _cafe_maps(net, real)]
    s_maps = _cafe_maps(net, syn)
    loss = syn.new_zeros(())
    for c in range(C):
        rc, sc = labels == c, syn_labels == c
        if not rc.any() or not sc.any():
            continue
        syn_mean = [m[sc].mean(0) for m in s_maps]
        present = [g for g in groups[rc].unique().tolist()]
        if objective == "vanilla":
            # loss_middle: first..fourth_weight (= 1) on f4, f3, f2, f1; f5 once more.
            for k in (1, 2, 3, 4):
                loss = loss + _mse(r_maps[k][rc].mean(0), syn_mean[k])
            loss = loss + _mse(r_maps[0][rc].mean(0), syn_mean[0])
        elif objective == "cobra":
            bary = [sum(m[rc & (groups == g)].mean(0) for g in present) / len(present) for m in r_maps]
            for k, w in ((0, 1.0), (-1, 1.0), (-2, 1.0), (-3, 0.1), (-4, 0.1)):
                loss = loss + w * _mse(bary[k], syn_mean[k]) / C
        else:  # fairdd: every group stands in for the class batch
            for g in present:
                rg = rc & (groups == g)
                for k in (0, 1, 2, 3, 4):
                    loss = loss + _mse(r_maps[k][rg].mean(0), syn_mean[k])
    if objective == "cobra":
        return loss
    # The discrimination loss: real f5 classified by the synthetic f5 centres.
    centres = torch.stack([s_maps[0][syn_labels == c].mean(0) for c in range(C)])
    ce = F.cross_entropy(r_maps[0] @ centres.t(), labels, reduction="none")
    if objective == "vanilla":
        return loss + 0.01 * ce.sum()
    disc = syn.new_zeros(())
    for c in range(C):
        rc = labels == c
        for g in groups[rc].unique().tolist():
            rg = rc & (groups == g)
            disc = disc + rc.sum() * ce[rg].mean()
    return loss + 0.01 * disc


def _batch(C: int, G: int, n: int, seed: int, size: int = 12) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n,), generator=gen)
    labels[:C] = torch.arange(C)  # every class present
    groups = torch.randint(0, G, (n,), generator=gen)
    groups[labels == 0] = 0  # a class with one group
    groups[(labels == 1) & (groups == G - 1)] = 0  # an absent group
    real = torch.randn(n, 3, size, size, generator=gen, dtype=torch.float64)
    syn_labels = torch.arange(C).repeat_interleave(2)
    syn = torch.randn(syn_labels.numel(), 3, size, size, generator=gen, dtype=torch.float64)
    return real, labels, groups, syn, syn_labels


def _net(C: int, size: int = 12, width: int = 6) -> ConvNet:
    torch.manual_seed(3)
    return ConvNet(3, C, size, width=width, depth=3).double()


@pytest.mark.parametrize("objective", ["vanilla", "fairdd", "cobra"])
@pytest.mark.parametrize("C,G,n", [(3, 4, 37), (5, 7, 61)])
def test_loss_module_equals_reference_loop(objective: str, C: int, G: int, n: int) -> None:
    real, labels, groups, syn, syn_labels = _batch(C, G, n, seed=C * 100 + G)
    net = _net(C)
    x1 = syn.clone().requires_grad_(True)
    ref = reference_loss(net, real, labels, groups, x1, syn_labels, C, objective)
    (g_ref,) = torch.autograd.grad(ref, x1)
    x2 = syn.clone().requires_grad_(True)
    loss_fn = FairCAFELoss(C, G, objective)
    got = loss_fn(layer_features(net, real), labels, groups, layer_features(net, x2), syn_labels)
    (g_got,) = torch.autograd.grad(got, x2)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    # float64 rounding, relative to the gradient's scale (sums of ~1e3 terms)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-8, atol=1e-11 * float(g_ref.abs().max()))
    assert g_ref.abs().sum() > 0


@pytest.mark.parametrize("objective", ["vanilla", "fairdd", "cobra"])
def test_driver_step_equals_reference_loop(objective: str) -> None:
    ds = data.load("cdigits-fg")
    cfg = resolve(DistillConfig(dataset="cdigits-fg", method="cafe", objective=objective, ipc=2, width=6,
                                batch_real=8, real_chunk=7))  # chunks that cut classes
    ctx = build_context(cfg, ds, torch.device("cpu"))
    C, G = ctx.num_classes, ctx.num_groups
    gen = torch.Generator().manual_seed(1)
    n = 50
    labels = torch.arange(C).repeat_interleave(n // C + 1)[:n]  # class-major, as the sampler draws
    groups = torch.randint(0, G, (n,), generator=gen)
    groups[labels == 2] = 1
    real = torch.randn(n, ds.channels, ds.image_size, ds.image_size, generator=gen, dtype=torch.float64)
    syn = torch.randn(C * cfg.ipc, ds.channels, ds.image_size, ds.image_size, generator=gen, dtype=torch.float64)
    torch.manual_seed(5)
    net = ConvNet(ds.channels, C, ds.image_size, width=6, depth=3).double()
    x = syn.clone().requires_grad_(True)
    for p in net.parameters():
        p.requires_grad_(False)
    loss, grad = cafe_step_loss(ctx, net, x, real, labels, groups, 0, 0)
    x2 = syn.clone().requires_grad_(True)
    ref = reference_loss(net, real, labels, groups, x2, ctx.syn_labels, C, objective)
    (g_ref,) = torch.autograd.grad(ref, x2)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, g_ref, rtol=1e-8, atol=1e-11 * float(g_ref.abs().max()))


def test_one_group_fairdd_is_vanilla() -> None:
    real, labels, groups, syn, syn_labels = _batch(4, 3, 40, seed=7)
    net = _net(4)
    zeros = torch.zeros_like(groups)
    a = FairCAFELoss(4, 3, "fairdd")(layer_features(net, real), labels, zeros, layer_features(net, syn), syn_labels)
    b = FairCAFELoss(4, 3, "vanilla")(layer_features(net, real), labels, groups, layer_features(net, syn), syn_labels)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_weights_follow_the_order_given() -> None:
    """A CAFE network's own order ([f5, f4, f3, f2, f1], embedding first) with
    COBRA's vanilla weights equals fastfair's folded four maps."""
    C = 3
    real, labels, groups, syn, syn_labels = _batch(C, 2, 30, seed=11)
    net = _net(C)
    ours = FairCAFELoss(C, 2, "vanilla")(layer_features(net, real), labels, groups, layer_features(net, syn),
                                        syn_labels)
    theirs = FairCAFELoss(C, 2, "vanilla", weights=[1, 1, 1, 1, 1], embedding=0)(
        _cafe_maps(net, real), labels, groups, _cafe_maps(net, syn), syn_labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_loss_module_errors() -> None:
    real, labels, groups, syn, syn_labels = _batch(3, 2, 20, seed=2)
    net = _net(3)
    rf, sf = layer_features(net, real), layer_features(net, syn)
    with pytest.raises(ValueError, match="3 layer weights but 4 real"):
        FairCAFELoss(3, 2, weights=[1, 1, 1])(rf, labels, groups, sf, syn_labels)
    bad = groups.clone()
    bad[4] = 2
    with pytest.raises(ValueError, match=r"real_groups\[4\] = 2"):
        FairCAFELoss(3, 2)(rf, labels, bad, sf, syn_labels)


def test_lr_schedule_and_reference_weights() -> None:
    assert [cafe.lr_at(0.1, i) for i in (0, 1199, 1200, 1600, 1800, 5000)] == pytest.approx(
        [0.1, 0.1, 0.05, 0.025, 0.0125, 0.0125])
    c = resolve(DistillConfig(method="cafe", objective="cobra"))
    assert (c.iterations, c.lr_img, c.batch_real, c.dsa, c.outer_loop, c.inner_loop) == (2000, 0.1, 256, False, 10, 50)
    assert (c.cafe_weights, c.cafe_inner_weight, c.cafe_class_mean) == ([1.0, 1.0, 0.1, 1.1], 0.0, True)
    v = resolve(DistillConfig(method="cafe", objective="fairdd", preset="cobra"))
    assert v.objective == "fairdd" and v.cafe_weights == [1.0, 1.0, 1.0, 2.0] and v.cafe_inner_weight == 0.01
    assert v.eval_runs == 2 and resolve(DistillConfig(method="cafe")).eval_runs == 10
    with pytest.raises(ValueError, match="cafe_weights"):
        resolve(DistillConfig(method="cafe", cafe_weights=[1, -1]))
    with pytest.raises(ValueError, match="pseudo"):
        resolve(DistillConfig(method="cafe", groups="pseudo"))


def _tiny(objective: str, **kw) -> DistillConfig:
    return DistillConfig(dataset="cdigits-fg", method="cafe", objective=objective, ipc=2, iterations=4, width=8,
                         batch_real=16, outer_loop=2, inner_loop=2, log_every=1, checkpoint_every=2, **kw)


def test_end_to_end_and_resume(tmp_path) -> None:
    ds = data.load("cdigits-fg")
    whole = distill.run(_tiny("fairdd"), ds, out_dir=str(tmp_path / "a"), progress=False)
    assert whole.images.shape == (ds.num_classes * 2, ds.channels, ds.image_size, ds.image_size)
    first = _tiny("fairdd")
    first = dataclasses.replace(first, iterations=2)
    distill.run(first, ds, out_dir=str(tmp_path / "b"), progress=False)
    resumed = distill.run(_tiny("fairdd"), ds, out_dir=str(tmp_path / "b"), resume=True, progress=False)
    assert torch.equal(resumed.images, whole.images)
    losses = [e["loss"] for e in whole.log if "loss" in e]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


def test_other_depths_and_networks() -> None:
    ds = data.load("cdigits-fg")
    # No reference at depth 2: every block 1, the embedding as the reference's.
    assert resolve(_tiny("vanilla", depth=2)).cafe_weights == [1.0, 1.0, 2.0]
    assert resolve(_tiny("cobra", depth=4)).cafe_weights == [1.0, 1.0, 1.0, 1.0, 1.1]
    r = distill.run(dataclasses.replace(_tiny("vanilla", depth=2), iterations=1), ds, progress=False)
    assert torch.isfinite(r.images).all()
    with pytest.raises(ValueError, match="aligns 3 layers"):
        distill.run(_tiny("vanilla", depth=2, cafe_weights=[1, 1, 1, 2]), ds, progress=False)
    with pytest.raises(ValueError, match="for AlexNet give cafe_weights"):
        resolve(_tiny("vanilla", model="AlexNet"))


@pytest.mark.parametrize("objective,combine", [("fairdd-groupdro", "max"), ("fairdd-mean", "mean"),
                                               ("cobra", "mean"), ("fairdd", "sum")])
def test_discrimination_combines_groups_as_the_objective(objective: str, combine: str) -> None:
    g = torch.Generator().manual_seed(9)
    C, G, n = 3, 4, 40
    labels = torch.arange(C).repeat_interleave(n // C + 1)[:n]
    groups = torch.randint(0, G, (n,), generator=g)
    emb = torch.randn(n, 5, generator=g, dtype=torch.float64)
    centres = torch.randn(C, 5, generator=g, dtype=torch.float64)
    got = cafe.discrimination_terms(emb, labels, centres, C, objective, [(groups, G)])
    ce = F.cross_entropy(emb @ centres.t(), labels, reduction="none")
    for c in range(C):
        rc = labels == c
        terms = torch.stack([rc.sum() * ce[rc & (groups == k)].mean() for k in groups[rc].unique()])
        want = {"max": terms.max(), "mean": terms.mean(), "sum": terms.sum()}[combine]
        torch.testing.assert_close(got[c], want, rtol=1e-12, atol=1e-12)
    plain = cafe.discrimination_terms(emb, labels, centres, C, "vanilla")
    torch.testing.assert_close(plain, torch.stack([ce[labels == c].sum() for c in range(C)]))


def test_cli_family_weights(tmp_path, capsys) -> None:
    from fastfair import cli

    base = ["distill", "--dataset", "cdigits-fg", "--method", "CAFE", "--ipc", "2", "--iterations", "1",
            "--width", "8", "--batch-real", "8", "--outer-loop", "1", "--inner-loop", "1", "--no-progress"]
    assert cli.main(base + ["--objective", "vanilla", "--first_weight", "0.5", "--fourth_weight", "0.1",
                            "--lambda_1", "0.04", "--out", str(tmp_path / "a")]) == 0
    cfg = torch.load(tmp_path / "a" / "synset.pt")["config"]
    assert cfg["cafe_weights"] == [0.1, 1.0, 1.0, 1.5] and cfg["cafe_inner_weight"] == 0.01
    assert cli.main(base + ["--objective", "cobra", "--cafe-weights", "1,2,3,4", "--cafe-class-mean", "off",
                            "--out", str(tmp_path / "b")]) == 0
    cfg = torch.load(tmp_path / "b" / "synset.pt")["config"]
    assert cfg["cafe_weights"] == [1.0, 2.0, 3.0, 4.0] and cfg["cafe_class_mean"] is False
    # COBRA's line: its cobra mode ignores CAFE's --inner_weight and layer weights (with a note).
    assert cli.main(base + ["--mode", "cobra", "--inner_weight", "0.01", "--first_weight", "2",
                            "--out", str(tmp_path / "d")]) == 0
    cfg = torch.load(tmp_path / "d" / "synset.pt")["config"]
    assert cfg["objective"] == "cobra" and cfg["cafe_inner_weight"] == 0.0 and cfg["cafe_weights"] == [1, 1, 0.1, 1.1]
    err = capsys.readouterr().err
    assert "ignores --inner_weight" in err and "ignores --first_weight" in err
    assert cli.main(base + ["--objective", "cobra", "--inner-weight", "0.5", "--out", str(tmp_path / "e")]) == 0
    assert torch.load(tmp_path / "e" / "synset.pt")["config"]["cafe_inner_weight"] == 0.5
    capsys.readouterr()
    for argv, msg in ((["--method", "dm", "--inner-weight", "1"], "add --method cafe"),
                      (["--cafe-weights", "1,x"], "comma-separated numbers"),
                      (["--cafe-weights", "1,1,1,1", "--third_weight", "2"], "not both")):
        args = base + ["--out", str(tmp_path / "c")] + argv
        try:
            rc = cli.main(args)
        except SystemExit as e:
            rc = e.code
        assert rc == 2
        assert msg in capsys.readouterr().err


@pytest.mark.parametrize("over", ["marginal", "fg"])
def test_driver_step_fair_over_equals_the_loss_module(over: str) -> None:
    ds = data.load("cdigits-fgbg")
    cfg = resolve(DistillConfig(dataset="cdigits-fgbg", method="cafe", objective="fairdd", ipc=2, width=6,
                                batch_real=8, real_chunk=9, fair_over=over))
    ctx = build_context(cfg, ds, torch.device("cpu"))
    C, G = ctx.num_classes, ctx.num_groups
    gen = torch.Generator().manual_seed(3)
    labels = torch.arange(C).repeat_interleave(5)
    groups = torch.randint(0, G, (labels.numel(),), generator=gen)
    real = torch.randn(labels.numel(), ds.channels, ds.image_size, ds.image_size, generator=gen, dtype=torch.float64)
    syn = torch.randn(C * 2, ds.channels, ds.image_size, ds.image_size, generator=gen, dtype=torch.float64)
    torch.manual_seed(2)
    net = ConvNet(ds.channels, C, ds.image_size, width=6, depth=3).double()
    for p in net.parameters():
        p.requires_grad_(False)
    x = syn.clone().requires_grad_(True)
    loss, grad = cafe_step_loss(ctx, net, x, real, labels, groups, 0, 0)
    x2 = syn.clone().requires_grad_(True)
    want = FairCAFELoss(C, G, "fairdd", attributes=ds.attributes, fair_over=over)(
        layer_features(net, real), labels, groups, layer_features(net, x2), ctx.syn_labels)
    (g2,) = torch.autograd.grad(want, x2)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, g2, rtol=1e-8, atol=1e-11 * float(g2.abs().max()))


def test_cobra_preset_follows_cobras_scripts_per_method() -> None:
    from fastfair.evaluate import method_protocol, preset_runs

    idc = resolve(DistillConfig(method="idc", preset="cobra", ipc=50))
    assert (idc.dsa, idc.outer_loop, idc.eval_runs) == (False, 30, 3)  # train_idc.py, run_idc.sh
    assert resolve(DistillConfig(method="idc", preset="fairdd")).dsa is True
    assert method_protocol("idc", "cobra") == (1000, False) and method_protocol("idc", "fairdd") == (1000, True)
    assert (preset_runs("cobra", "dm"), preset_runs("cobra", "dc"), preset_runs("fairdd", "idc")) == (5, 5, 10)


def test_real_layer_sums_reuse_their_buffers() -> None:
    # The driver passes the previous step's sums as ``out``: they are
    # overwritten (stale values must not leak, a class without rows is zero)
    # and the result equals fresh buffers and a per-segment float64 sum.
    torch.manual_seed(0)
    net = ConvNet(3, 4, 16, width=5, depth=3).double()
    C, G = 4, 3
    sizes = [7, 0, 5, 9]  # class 1 has no rows
    labels = torch.arange(C).repeat_interleave(torch.tensor(sizes))
    groups = torch.randint(0, G, (labels.shape[0],))
    seg = labels * G + groups
    real = torch.randn(labels.shape[0], 3, 16, 16, dtype=torch.float64)
    fresh, _ = cafe.real_layer_sums(net, real, seg, C * G, rows=4, class_sizes=sizes, segments_per_class=G)
    stale = [torch.full_like(t, float("nan")) for t in fresh]
    again, _ = cafe.real_layer_sums(net, real, seg, C * G, rows=4, class_sizes=sizes, segments_per_class=G,
                                    out=stale)
    assert all(a is s for a, s in zip(again, stale))  # the buffers were reused
    taps = layer_features(net, real)
    for got, want_t, ref in zip(again, fresh, taps):
        want = torch.zeros(C * G, ref.shape[1], dtype=torch.float64).index_add_(0, seg, ref)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(want_t, want, rtol=1e-12, atol=1e-12)
        assert (got[G:2 * G] == 0).all()
    # A buffer of another shape is not written to.
    wrong = [torch.zeros(1, 1, dtype=torch.float64) for _ in fresh]
    other, _ = cafe.real_layer_sums(net, real, seg, C * G, rows=4, out=wrong)
    assert all(o is not w for o, w in zip(other, wrong)) and all((w == 0).all() for w in wrong)
    for got, want in zip(other, fresh):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
