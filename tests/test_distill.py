"""fastfair.distill: every method x objective runs; the DM and DC steps equal
straightforward per-class / per-group references; sampling, IDC, DREAM,
imperfect groups; checkpoints, Ctrl-C and resume give the uninterrupted result.

Everything runs on the CPU on the tiny ``synthetic`` dataset (8x8 images,
width-8 ConvNets, 2-3 iterations).
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from fastfair import data, distill
from fastfair.distill import context as ctx_mod
from fastfair.distill import loop, rng
from fastfair.distill.config import resolve
from fastfair.distill.dc import RandomBatches, dc_iteration
from fastfair.distill.dm import dm_iteration
from fastfair.distill.dream import DreamSelector, kmeans_representatives
from fastfair.distill.groups import noisy_groups, pseudo_groups
from fastfair.distill.sampler import RealSampler
from fastfair.distill.synset import decode, encode, sgd_step
from fastfair.objectives import OBJECTIVES

C, G = 3, 3
OPTS = {"num_classes": C, "num_groups": G, "image_size": 8, "n_per_class": 30}
TINY = dict(dataset="synthetic", ipc=2, width=8, depth=2, batch_real=12, outer_loop=2, inner_loop=1,
            log_every=1, cobra_warmup_epochs=1, dream_interval=3, dream_pool=20, extra={"data_options": OPTS})


@pytest.fixture(scope="module")
def ds():
    return data.load("synthetic", bias_ratio=0.8, **OPTS)


def cfg(**kw) -> distill.DistillConfig:
    return distill.DistillConfig(**{**TINY, **kw})


# --------------------------------------------------------------------------- every combination


@pytest.mark.parametrize("method", distill.METHODS)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_method_and_objective_runs(ds, method: str, objective: str) -> None:
    res = distill.run(cfg(method=method, objective=objective, iterations=2), ds, device="cpu", progress=False)
    factor = 2 if method == "idc" else 1
    assert res.images.shape == (C * 2 * factor * factor, 3, 8, 8)
    assert res.stored.shape == (C * 2, 3, 8, 8)
    assert torch.equal(res.labels, torch.arange(C).repeat_interleave(2 * factor * factor))
    assert [e["iteration"] for e in res.log] == [1, 2]
    assert all(torch.isfinite(torch.tensor(e["loss"])) and e["loss"] > 0 for e in res.log)
    assert torch.isfinite(res.images).all()
    init = distill.run(cfg(method=method, objective=objective, iterations=2), ds, device="cpu",
                       progress=False)  # same seed: deterministic
    assert torch.equal(init.images, res.images)
    start, _ = _initial(ds, method)
    assert (res.stored - start).abs().max() > 1e-4  # the images moved


def _initial(ds, method: str):
    c = resolve(cfg(method=method, iterations=1))
    ctx = ctx_mod.build_context(c, ds, torch.device("cpu"))
    from fastfair.distill.synset import init_images

    return init_images(ctx.sampler.class_pool, ctx.train_images, c.ipc, c.init, ctx.factor,
                       rng.generator(c.seed, 0, rng.INIT))


# --------------------------------------------------------------------------- step references


def _dm_reference_loss(net, real, labels, groups, syn, syn_labels, objective: str) -> torch.Tensor:
    """Per class, per group masked means in Python: the reference code's loop."""
    loss = syn.new_zeros(())
    er, es = net.embed(real).detach(), net.embed(syn)
    for c in range(C):
        s = es[syn_labels == c].mean(0)
        rc, gc = er[labels == c], groups[labels == c]
        means = [rc[gc == a].mean(0) for a in range(G) if (gc == a).any()]
        if objective == "vanilla":
            loss = loss + ((rc.mean(0) - s) ** 2).sum()
        elif objective == "fairdd":
            loss = loss + sum(((m - s) ** 2).sum() for m in means)
        elif objective == "cobra":
            loss = loss + (torch.stack(means).mean(0) - s).abs().sum()
    return loss


@pytest.mark.parametrize("objective", ["vanilla", "fairdd", "cobra"])
def test_dm_step_equals_per_group_loop(ds, objective: str) -> None:
    c = resolve(cfg(method="dm", objective=objective, dsa=False, cobra_warmup_epochs=0, lr_img=0.5))
    ctx = ctx_mod.build_context(c, ds, torch.device("cpu"))
    images = torch.randn(C * 2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    new, buf, loss = dm_iteration(ctx, images, None, it=4)

    net = ctx.new_network(4)
    batch = ctx.sampler.draw(rng.generator(c.seed, 4, rng.SAMPLE))
    real, labels, groups = ctx.real_batch(batch)
    x = images.clone().requires_grad_(True)
    ref = _dm_reference_loss(net, real, labels, groups, x, ctx.syn_labels, objective)
    (g,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new, images - 0.5 * g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(buf, g, rtol=1e-5, atol=1e-6)


def _match(gr: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    if gr.dim() == 1:
        return gr.new_zeros(())
    a, b = gr.reshape(gr.shape[0], -1), gs.reshape(gs.shape[0], -1)
    return (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-6)).sum()


@pytest.mark.parametrize("objective", ["vanilla", "fairdd", "cobra"])
def test_dc_step_equals_per_group_backward_loop(ds, objective: str) -> None:
    c = resolve(cfg(method="dc", objective=objective, dsa=False, outer_loop=1, lr_img=0.1))
    ctx = ctx_mod.build_context(c, ds, torch.device("cpu"))
    images = torch.randn(C * 2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    new, _, loss = dc_iteration(ctx, images, None, 3, RandomBatches())

    net = ctx.new_network(3)
    params = list(net.parameters())
    batch = ctx.sampler.draw(rng.generator(c.seed, 3, rng.SAMPLE, 0))
    real, labels, groups = ctx.real_batch(batch)
    x = images.clone().requires_grad_(True)
    ref = x.new_zeros(())
    for k in range(C):
        gs = torch.autograd.grad(F.cross_entropy(net(x[ctx.syn_labels == k]), ctx.syn_labels[ctx.syn_labels == k]),
                                 params, create_graph=True)
        rows = labels == k
        per_group = []
        for a in range(G):  # one backward per group, as the reference code
            m = rows & (groups == a)
            if m.any():
                per_group.append(torch.autograd.grad(F.cross_entropy(net(real[m]), labels[m]), params))
        if objective == "vanilla":
            targets = [torch.autograd.grad(F.cross_entropy(net(real[rows]), labels[rows]), params)]
        elif objective == "fairdd":
            targets = per_group
        else:
            targets = [[torch.stack(t).mean(0) for t in zip(*per_group)]]
        for t in targets:
            ref = ref + sum(_match(gr, g) for gr, g in zip(t, gs))
    (g,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new, images - 0.1 * g, rtol=1e-4, atol=1e-5)


def test_siamese_dsa_gives_real_and_synthetic_rows_of_a_class_the_same_transform(ds) -> None:
    c = resolve(cfg(method="dm"))
    ctx = ctx_mod.build_context(c, ds, torch.device("cpu"))
    batch = ctx.sampler.draw(rng.generator(0, 0, rng.SAMPLE))
    real, _, _ = ctx.real_batch(batch)
    parts = torch.split(real, batch.sizes)
    syn = torch.cat([p[:2] for p in parts])  # synthetic rows = the first real rows of each class
    ra, sa = ctx.siamese(real, batch.sizes, syn, 7)
    for k, rp in enumerate(torch.split(ra, batch.sizes)):
        torch.testing.assert_close(sa[2 * k:2 * k + 2], rp[:2])
    assert not torch.allclose(ra, real)  # DSA did something
    ra2, _ = ctx.siamese(real, batch.sizes, syn, 8)
    assert not torch.allclose(ra, ra2)  # a new iteration draws new transforms


# --------------------------------------------------------------------------- pieces


def test_sampler_takes_all_of_a_small_class_and_balances_groups() -> None:
    labels = torch.tensor([0] * 10 + [1] * 3)
    groups = torch.tensor([0] * 8 + [1] * 2 + [0, 1, 1])
    s = RealSampler(labels, groups, 2, 2, batch_real=6)
    b = s.draw(torch.Generator().manual_seed(0))
    assert b.sizes == [6, 3]
    assert labels[b.indices].tolist() == [0] * 6 + [1] * 3
    assert sorted(b.indices[6:].tolist()) == [10, 11, 12]  # all of class 1, no duplicates
    assert b.indices[:6].unique().numel() == 6
    pg = RealSampler(labels, groups, 2, 2, batch_real=6, sample_per_group=True)
    b = pg.draw(torch.Generator().manual_seed(0))
    g0 = groups[b.indices[:6]]
    assert (g0 == 1).sum() == 2 and (g0 == 0).sum() == 4  # group 1 has only 2: water-filling
    # Ranks keep contiguous shares of the same draw: their union is the 1-process batch.
    one = RealSampler(labels, groups, 2, 2, batch_real=6).draw(torch.Generator().manual_seed(5))
    shares = [RealSampler(labels, groups, 2, 2, batch_real=6, rank=r, world_size=2).draw(
        torch.Generator().manual_seed(5)) for r in range(2)]
    assert [sh.sizes for sh in shares] == [[3, 2], [3, 1]]
    merged = torch.cat([shares[0].indices[:3], shares[1].indices[:3], shares[0].indices[3:], shares[1].indices[3:]])
    assert torch.equal(merged, one.indices)


def test_idc_decode_is_the_inverse_layout_of_encode() -> None:
    values = torch.arange(8.0)  # 8 constant images -> 2 stored images of 2x2 tiles
    imgs = values.view(8, 1, 1, 1).expand(8, 2, 6, 6).contiguous()
    stored = encode(imgs, 2)
    assert stored.shape == (2, 2, 6, 6)
    assert stored[0, 0, :3, :3].eq(0).all() and stored[0, 0, :3, 3:].eq(1).all()
    assert stored[0, 0, 3:, :3].eq(2).all() and stored[1, 1, 3:, 3:].eq(7).all()
    torch.testing.assert_close(decode(stored, 2), imgs)
    assert decode(stored, 1) is stored
    x = torch.randn(2, 1, 4, 4, requires_grad=True)
    decode(x, 2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_sgd_step_matches_torch_sgd() -> None:
    p = torch.randn(5, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.3, momentum=0.5)
    x, buf = p.detach().clone(), None
    for k in range(3):
        g = torch.randn(5, generator=torch.Generator().manual_seed(k))
        p.grad = g.clone()
        opt.step()
        x, buf = sgd_step(x, buf, g, 0.3, 0.5)
        torch.testing.assert_close(x, p.detach())


def test_group_noise_flips_exactly_the_fraction() -> None:
    groups = torch.arange(4).repeat(50)
    noisy = noisy_groups(groups, 4, 0.15, seed=3)
    assert (noisy != groups).sum() == 30
    assert noisy.min() >= 0 and noisy.max() < 4
    assert torch.equal(noisy, noisy_groups(groups, 4, 0.15, seed=3))
    assert not torch.equal(noisy, noisy_groups(groups, 4, 0.15, seed=4))


def test_pseudo_groups_recover_separated_clusters() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    truth = torch.tensor([0] * 15 + [1] * 8 + [2] * 5)  # class 0: three clusters
    pts = centres[truth] + 0.3 * torch.randn(28, 2, generator=gen)
    other = torch.randn(10, 2, generator=gen)  # class 1: one blob
    ids = pseudo_groups(torch.cat([pts, other]), [28, 10], max_groups=4, min_samples=3)
    assert ids[:15].unique().numel() == 1 and ids[15:23].unique().numel() == 1 and ids[23:28].unique().numel() == 1
    assert ids[:28].unique().numel() == 3
    assert ids[0] == 0 and ids[15] == 1 and ids[23] == 2  # largest cluster first
    capped = pseudo_groups(pts, [28], max_groups=2, min_samples=3)
    assert capped.max() == 1 and torch.equal(capped[15:] == 1, torch.ones(13, dtype=torch.bool))


def test_kmeans_representatives_pick_one_member_per_blob() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    lab = torch.arange(4).repeat_interleave(6)
    x = centres[lab] + 0.2 * torch.randn(24, 2, generator=gen)
    reps = kmeans_representatives(x, 4, 10, torch.Generator().manual_seed(1))
    assert sorted(lab[reps].tolist()) == [0, 1, 2, 3]


def test_pseudo_groups_and_group_noise_runs(ds) -> None:
    for kw in ({"groups": "pseudo", "pseudo_min_samples": 2}, {"group_noise": 0.2}, {"sample_per_group": True}):
        for method in ("dm", "dc"):
            res = distill.run(cfg(method=method, objective="fairdd", iterations=1, **kw), ds, device="cpu",
                              progress=False)
            assert torch.isfinite(res.images).all() and res.log[0]["loss"] > 0


# --------------------------------------------------------------------------- config and errors


def test_config_defaults_follow_the_papers() -> None:
    dm = resolve(distill.DistillConfig(method="dm", ipc=10))
    assert (dm.iterations, dm.lr_img, dm.momentum, dm.batch_real, dm.init, dm.dsa) == (20000, 1.0, 0.5, 256, "real", True)
    assert resolve(distill.DistillConfig(method="dm", ipc=100)).lr_img == 10.0
    dc = resolve(distill.DistillConfig(method="dc", ipc=10))
    assert (dc.iterations, dc.lr_img, dc.outer_loop, dc.inner_loop, dc.lr_net) == (1000, 0.1, 10, 50, 0.01)
    assert [distill.dc_loops(k) for k in (1, 10, 20, 30, 40, 50, 100)] == [
        (1, 1), (10, 50), (20, 25), (30, 20), (40, 15), (50, 10), (100, 10)]
    assert resolve(distill.DistillConfig(objective="cobra", ipc=10)).cobra_warmup_epochs == 10
    assert resolve(distill.DistillConfig(objective="cobra", ipc=50)).cobra_warmup_epochs == 50
    assert resolve(distill.DistillConfig(objective="cobra", ipc=100)).cobra_warmup_epochs == 100
    assert resolve(distill.DistillConfig(objective="fairdd")).cobra_warmup_epochs == 0
    assert dm.eval_runs == 10 and resolve(distill.DistillConfig(preset="cobra")).eval_runs == 5


@pytest.mark.parametrize("method", ["dc", "dsa", "idc", "dream"])
def test_cobra_preset_fairdd_means_cobras_fairdd_mean_for_dc(method: str) -> None:
    # COBRA's --mode fairdd averages the DC group terms; FairDD's main_DC.py sums them.
    assert resolve(distill.DistillConfig(method=method, preset="cobra")).objective == "fairdd-mean"
    assert resolve(distill.DistillConfig(method=method, preset="fairdd")).objective == "fairdd"
    assert resolve(distill.DistillConfig(method=method, preset="cobra", objective="cobra")).objective == "cobra"
    assert resolve(distill.DistillConfig(method="dm", preset="cobra")).objective == "fairdd"


@pytest.mark.parametrize("bad, match", [
    ({"method": "kip"}, "unknown method"), ({"objective": "fair"}, "unknown objective"),
    ({"init": "zeros"}, "unknown init"), ({"group_noise": 1.5}, "group_noise"), ({"ipc": 0}, "ipc"),
    ({"groups": "guess"}, "groups"),
])
def test_bad_config_raises(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve(distill.DistillConfig(**bad))


def test_ipc_larger_than_a_class_raises(ds) -> None:
    with pytest.raises(ValueError, match="larger than class"):
        distill.run(cfg(ipc=31, iterations=1), ds, device="cpu", progress=False)


# --------------------------------------------------------------------------- outputs, checkpoints, resume


def test_outputs(ds, tmp_path) -> None:
    res = distill.run(cfg(method="idc", iterations=3, checkpoint_every=2), ds, out_dir=str(tmp_path), device="cpu",
                      progress=False)
    assert {"synset.pt", "grid.png", "log.jsonl", "checkpoint.pt"} <= {p.name for p in tmp_path.iterdir()}
    syn = torch.load(tmp_path / "synset.pt", weights_only=True)
    assert torch.equal(syn["images"], res.images) and torch.equal(syn["labels"], res.labels)
    assert torch.equal(syn["stored"], res.stored) and syn["config"]["method"] == "idc"
    assert distill.DistillConfig.from_dict(syn["config"]) == res.config
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2, 3] and all({"loss", "seconds"} <= set(x) for x in lines)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["iteration"] == 3 and torch.equal(ck["images"], res.stored)
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("method", ["dm", "dc", "dream", "idc"])
def test_resume_equals_uninterrupted_run(ds, tmp_path, method: str) -> None:
    base = cfg(method=method, objective="fairdd", checkpoint_every=2)
    full = distill.run(dataclasses.replace(base, iterations=4), ds, out_dir=str(tmp_path / "a"), device="cpu",
                       progress=False)
    distill.run(dataclasses.replace(base, iterations=2), ds, out_dir=str(tmp_path / "b"), device="cpu",
                progress=False)
    res = distill.run(dataclasses.replace(base, iterations=4), ds, out_dir=str(tmp_path / "b"), device="cpu",
                      progress=False, resume=True)
    assert torch.equal(res.images, full.images)
    assert [e["loss"] for e in res.log] == [e["loss"] for e in full.log]
    assert (full.images - distill.run(dataclasses.replace(base, iterations=3), ds, device="cpu",
                                      progress=False).images).abs().max() > 0  # iteration 4 mattered


@pytest.mark.parametrize("method", ["dm", "dream"])
def test_ctrl_c_saves_the_last_finished_iteration_and_resume_completes_it(ds, tmp_path, monkeypatch,
                                                                          method: str) -> None:
    base = cfg(method=method, objective="cobra", iterations=5, checkpoint_every=100)
    full = distill.run(base, ds, device="cpu", progress=False)
    name = "dm_iteration" if method == "dm" else "dc_iteration"
    real_step = getattr(loop, name)
    calls = {"n": 0}

    def step(*a, **kw):
        calls["n"] += 1
        out = real_step(*a, **kw)  # the 4th iteration runs to its end, then Ctrl-C arrives
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(loop, name, step)
    with pytest.raises(KeyboardInterrupt):
        distill.run(base, ds, out_dir=str(tmp_path), device="cpu", progress=False)
    monkeypatch.setattr(loop, name, real_step)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["iteration"] == 3  # the unfinished 4th iteration is not in it
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3
    res = distill.run(base, ds, out_dir=str(tmp_path), device="cpu", progress=False, resume=True)
    assert torch.equal(res.images, full.images)
    assert [json.loads(x)["iteration"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_resume_refuses_a_different_run(ds, tmp_path) -> None:
    distill.run(cfg(iterations=1), ds, out_dir=str(tmp_path), device="cpu", progress=False)
    with pytest.raises(ValueError, match="objective"):
        distill.run(cfg(iterations=2, objective="vanilla"), ds, out_dir=str(tmp_path), device="cpu",
                    progress=False, resume=True)
    with pytest.raises(ValueError, match="needs out_dir"):
        distill.run(cfg(iterations=2), ds, device="cpu", progress=False, resume=True)


def test_dream_reclusters_on_schedule_only(ds) -> None:
    c = resolve(cfg(method="dream", outer_loop=2, dream_interval=3))
    ctx = ctx_mod.build_context(c, ds, torch.device("cpu"))
    sel = DreamSelector()
    net = ctx.new_network(0)
    seen = [sel.batch(ctx, net, it, ol) for it in range(3) for ol in range(2)]  # global steps 0..5
    assert seen[0] is seen[1] is seen[2] and seen[3] is seen[4] is seen[5] and seen[0] is not seen[3]
    assert seen[0].sizes == [12, 12, 12]
    # Representatives are distinct members of their class.
    labels = ds.train.labels[seen[0].indices]
    assert torch.equal(labels, torch.arange(C).repeat_interleave(12))
    assert seen[0].indices.unique().numel() == 36


def test_idc_upsampling_follows_the_preset() -> None:
    """IDC's decode_zoom upsamples with align_corners False (nn.Upsample's
    default), COBRA's train_idc.py with True: the preset decides, the
    decoded images differ, and a checkpoint written before the field existed
    resumes as IDC's."""
    from fastfair.distill.config import resolve, resume_mismatch

    base = dict(dataset="synthetic", method="idc", ipc=1)
    fair = resolve(distill.DistillConfig(**base))
    cobra = resolve(distill.DistillConfig(**base, preset="cobra"))
    assert (fair.idc_recipe, cobra.idc_recipe) == ("idc", "cobra")
    assert resolve(distill.DistillConfig(dataset="synthetic", method="dc", ipc=1)).idc_recipe is None
    with pytest.raises(ValueError, match="unknown idc_recipe"):
        resolve(distill.DistillConfig(**base, idc_recipe="nearest"))
    x = torch.rand(2, 3, 8, 8)
    a, b = decode(x, 2), decode(x, 2, align_corners=True)
    want = torch.nn.Upsample(size=(8, 8), mode="bilinear", align_corners=True)(x[:, :, :4, :4])
    torch.testing.assert_close(b[0::4], want)
    assert not torch.allclose(a, b)
    old = fair.to_dict()
    del old["idc_recipe"]
    assert resume_mismatch(old, fair) == []
    old_cobra = cobra.to_dict()  # a COBRA-preset IDC run from before: it upsampled as IDC does
    del old_cobra["idc_recipe"]
    assert resume_mismatch(old_cobra, cobra) == ["idc_recipe"]


def test_checkpoint_from_before_several_attributes_resumes() -> None:
    # A checkpoint written before fair_over existed (one attribute: its group id is the
    # intersection) resumes; one written over another attribute does not.
    from fastfair.distill.config import resolve, resume_mismatch

    cfg = resolve(distill.DistillConfig(dataset="cdigits-fg", method="dm", ipc=1))
    old = cfg.to_dict()
    del old["fair_over"]
    assert resume_mismatch(old, cfg) == []
    assert resume_mismatch({**old, "fair_over": "fg"}, cfg) == ["fair_over"]


def test_idc_factor_follows_cobras_rule_for_face_sets() -> None:
    from fastfair.distill.config import resolve

    def factor(**kw):  # type: ignore[no-untyped-def]
        return resolve(distill.DistillConfig(method="idc", **kw)).idc_factor

    assert factor(dataset="cmnist-fg", ipc=10) == 2
    assert factor(dataset="utkface", ipc=10) == 2  # FairDD's protocol: IDC's 2
    assert factor(dataset="utkface", ipc=10, preset="cobra") == 4
    assert factor(dataset="bffhq", ipc=100, preset="cobra") == 3
    assert factor(dataset="cmnist-fg", ipc=10, preset="cobra") == 2
    assert factor(dataset="utkface", ipc=10, preset="cobra", idc_factor=2) == 2  # given: kept


def test_idc_recipe_decides_the_initialisation() -> None:
    """IDC's recipe tiles factor^2 downsampled real images into a stored image
    (its 'mix' init); COBRA's starts from one whole real image of the class."""
    from fastfair.distill.synset import init_images

    torch.manual_seed(0)
    images = torch.rand(12, 1, 8, 8)
    pools = [torch.arange(0, 6), torch.arange(6, 12)]
    tiled, labels = init_images(pools, images, 2, "real", 2, torch.Generator().manual_seed(1))
    whole, labels2 = init_images(pools, images, 2, "real", 2, torch.Generator().manual_seed(1), tile=False)
    assert tiled.shape == whole.shape == (4, 1, 8, 8) and torch.equal(labels, labels2)
    for c, pool in enumerate(pools):
        for k in range(2):
            img = whole[c * 2 + k]
            assert any(torch.equal(img, images[i]) for i in pool.tolist())  # a real image of its class, whole
            assert not any(torch.equal(tiled[c * 2 + k], images[i]) for i in range(12))


def test_cobra_idc_trains_no_network_between_matching_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """COBRA's train_idc.py matches outer_loop times on one fresh network and
    never trains it in between: --preset cobra gives IDC inner_loop 0, and
    the driver then never calls the inner training with any epoch."""
    from fastfair import reproduce
    from fastfair.distill.config import resolve
    from fastfair.distill.context import RunContext

    cobra = resolve(distill.DistillConfig(dataset="synthetic", method="idc", ipc=10, preset="cobra"))
    fair = resolve(distill.DistillConfig(dataset="synthetic", method="idc", ipc=10))
    assert (cobra.inner_loop, fair.inner_loop) == (0, 50)
    assert resolve(distill.DistillConfig(dataset="synthetic", method="dc", ipc=10, preset="cobra")).inner_loop == 50
    with pytest.raises(ValueError, match="inner_loop must be an integer >= 0"):
        resolve(distill.DistillConfig(dataset="synthetic", method="dc", ipc=10, inner_loop=-1))
    table = reproduce.TABLES["cobra"]
    cpu = reproduce.BUDGETS["cpu"]
    assert reproduce.cell_settings(table, cpu, "cmnist-fg", "idc", "cobra", 0)["distill"]["inner_loop"] == 0
    assert reproduce.cell_settings(table, cpu, "cmnist-fg", "dc", "cobra", 0)["distill"]["inner_loop"] > 0

    epochs: list[int] = []
    real = RunContext.train_on_synset
    monkeypatch.setattr(RunContext, "train_on_synset",
                        lambda self, net, opt, x, y, n, gen: epochs.append(n) or real(self, net, opt, x, y, n, gen))
    opts = {"num_classes": 2, "num_groups": 2, "image_size": 8, "n_per_class": 12}
    ds = data.load("synthetic", **opts)
    distill.run(distill.DistillConfig(dataset="synthetic", method="idc", preset="cobra", ipc=1, iterations=1,
                                      width=4, depth=1, batch_real=4, outer_loop=3, extra={"data_options": opts}),
                ds, device="cpu", progress=False)
    assert epochs and set(epochs) == {0}
