"""fastfair.bench: the benchmarks run in a tiny setting, write their JSON and
PNG, check what they compare, and ``fastfair bench`` wires them up.

These are not timing tests: the numbers are not looked at.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastfair import cli
from fastfair.bench import dc_step, segment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DC = ["--device", "cpu", "--batch", "4", "--classes", "3", "--width", "8", "--image-size", "16",
           "--repeats", "3"]


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def test_segment_tiny_writes_json_and_png(tmp_path):
    path = str(tmp_path / "seg.json")
    rows = segment.main(["--device", "cpu", "--n", "2048", "--d", "8", "--groups", "1,3,50",
                         "--loop-max-groups", "10", "--repeats", "3", "--json", path])
    payload = _load(path)
    assert payload["rows"] == rows
    assert payload["torch_scatter"].startswith(("installed", "not installed: "))
    assert payload["machine"]["device"] == "cpu" and payload["machine"]["gpu"] is None
    for r in rows:
        assert {"impl", "groups", "ms", "n", "d", "device", "threads", "torch"} <= r.keys()
        assert r["ms"] > 0 and r["n"] == 2048 and r["d"] == 8
    impls = {(r["impl"], r["groups"]) for r in rows}
    for g in (1, 3, 50):
        assert {("index_add", g), ("scatter_reduce", g), ("fastfair", g)} <= impls
    # The loop is O(G * N): skipped above --loop-max-groups.
    assert ("loop", 3) in impls and ("loop", 50) not in impls
    assert os.path.getsize(tmp_path / "seg.png") > 0


def test_segment_check_catches_a_wrong_impl():
    x = torch.randn(64, 4)
    ids = torch.randint(0, 5, (64,))
    ref = segment._fastfair(x, ids, 5)
    segment._check("index_add", segment._index_add(x, ids, 5), ref, ids)
    segment._check("loop", segment._loop(x, ids, 5), ref, ids)
    with pytest.raises(AssertionError, match="disagrees"):
        segment._check("index_add", segment._index_add(x, ids, 5) * 1.01, ref, ids)


def test_dc_step_tiny_writes_json_and_png(tmp_path):
    path = str(tmp_path / "dc.json")
    rows = dc_step.main(TINY_DC + ["--groups", "1,2,10", "--json", path])
    payload = _load(path)
    assert payload["rows"] == rows
    assert len(rows) == 3 * 4  # G x (impl, objective)
    for r in rows:
        assert {"impl", "objective", "groups", "ms", "device", "cpu", "gpu", "threads", "torch", "batch"} <= r.keys()
        assert r["ms"] > 0 and r["batch"] == 4 and r["device"] == "cpu"
    assert {(r["impl"], r["objective"]) for r in rows} == {
        ("loop", "vanilla"), ("loop", "fairdd"), ("fastfair", "vanilla"), ("fastfair", "fairdd")}
    # The check ran at every G and passed.
    assert set(payload["check_max_rel_err"]) == {"1", "2", "10"}
    assert payload["layout"] == "compact" and all(r["layout"] == "compact" for r in rows)
    assert all(e <= 1e-3 for errs in payload["check_max_rel_err"].values() for e in errs.values())
    ratios = payload["ratios"]
    assert "fastfair fairdd / fastfair vanilla at G=10" in ratios
    assert "loop fairdd / fastfair fairdd at G=10" in ratios
    assert not any("G=100" in k for k in ratios)  # G = 100 was not run
    assert os.path.getsize(tmp_path / "dc.png") > 0


def _tiny_model():
    torch.manual_seed(0)
    model = dc_step.get_network("ConvNet", 3, 3, 16, width=8, depth=2, norm="instancenorm")
    return model, [p for p in model.parameters() if p.requires_grad]


def test_dc_step_check_catches_a_different_computation(monkeypatch):
    model, params = _tiny_model()
    batch = dc_step.make_batch(3, 5, 4, 16, torch.Generator().manual_seed(1), "cpu")
    errs, ms = dc_step.check_point(model, params, batch, 3, 4, "cpu")
    assert max(errs.values()) <= 1e-3 and set(ms) == set(dc_step.FNS)

    def wrong(model, params, batch, classes, groups):  # the class gradient in every group's place
        x, y, _ = batch
        class_grads = dc_step.segment_gradients(model, x, y, y, classes)
        return tuple(g.repeat_interleave(groups, dim=0) for g in class_grads)

    monkeypatch.setitem(dc_step.FNS, ("fastfair", "fairdd"), wrong)
    with pytest.raises(AssertionError, match="fairdd: fastfair vs loop"):
        dc_step.check_point(model, params, batch, 3, 4, "cpu")


def test_dc_step_compact_layout_is_the_drivers_and_checked(monkeypatch):
    # The default fastfair fairdd row computes only the present segments, as the driver does
    # (fastfair.distill.dc.compact_layout); the check compares it densified, so a present
    # segment left out fails it.
    model, params = _tiny_model()
    batch = dc_step.make_batch(3, 5, 6, 16, torch.Generator().manual_seed(2), "cpu")
    x, y, grp = batch
    got = dc_step.FNS[("fastfair", "fairdd")](model, params, batch, 3, 6)
    present = torch.unique(y * 6 + grp)
    assert isinstance(got, dc_step.Present) and torch.equal(got.segments, present)
    assert got.grads[0].shape[0] == present.numel() < 18  # 15 images over 18 cells: some absent
    dense = dc_step.functions("dense")[("fastfair", "fairdd")](model, params, batch, 3, 6)
    for a, b in zip(dc_step.densify(got, params, 18), dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    errs, _ = dc_step.check_point(model, params, batch, 3, 6, "cpu", dc_step.functions("compact"))
    assert errs["fairdd"] <= 1e-3

    def drops_one(model, params, batch, classes, groups):
        full = dc_step.fastfair_fairdd_compact(model, params, batch, classes, groups)
        return dc_step.Present(tuple(g[1:] for g in full.grads), full.segments[1:])

    monkeypatch.setitem(dc_step.FNS, ("fastfair", "fairdd"), drops_one)
    with pytest.raises(AssertionError, match="fairdd: fastfair vs loop"):
        dc_step.check_point(model, params, batch, 3, 6, "cpu", dc_step.functions("compact"))
    with pytest.raises(ValueError, match="unknown layout"):
        dc_step.functions("sparse")


def test_dc_step_batches_have_random_group_sizes():
    gen = torch.Generator().manual_seed(0)
    x, y, grp = dc_step.make_batch(10, 40, 100, 8, gen, "cpu")
    assert x.shape == (400, 3, 8, 8) and torch.equal(y, torch.arange(10).repeat_interleave(40))
    counts = torch.bincount(y * 100 + grp, minlength=1000).view(10, 100)
    assert (counts == 0).any()  # 40 images over 100 groups: some groups are empty
    _, _, grp2 = dc_step.make_batch(10, 256, 2, 8, gen, "cpu")
    sizes = torch.bincount(torch.arange(10).repeat_interleave(256) * 2 + grp2, minlength=20).view(10, 2)
    assert len(set(sizes[:, 0].tolist())) > 1  # not an equal split


def test_dc_step_wrapper_from_a_checkout_writes_the_default_paths(tmp_path):
    # python benchmarks/dc_step.py from another directory: results under ./benchmarks/results
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "dc_step.py")] + TINY_DC
                          + ["--groups", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "benchmarks" / "results"
    assert _load(str(out / "dc_step_cpu.json"))["rows"][0]["groups"] == 2
    assert (out / "dc_step_cpu.png").is_file()


def test_bench_device_without_gpu_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as e:
        dc_step.main(["--device", "cuda", "--json", str(tmp_path / "x.json")])
    assert e.value.code == 2


@pytest.mark.parametrize("module", ["segment", "dc_step", "cafe_step", "step_time", "wgrad", "wgrad_error"])
def test_every_benchmark_names_a_bad_device_in_one_line(module, tmp_path, capsys):
    # wgrad_error called check_device unguarded: a bad --device was a traceback.
    import importlib

    main = importlib.import_module(f"fastfair.bench.{module}").main
    with pytest.raises(SystemExit) as e:
        main(["--device", "tpu", "--json", str(tmp_path / "x.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--device 'tpu' is not a torch device" in err and "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


def test_cli_bench_bad_subcommand_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice" in err


def test_cli_bench_runs_the_modules_with_out_paths(monkeypatch, tmp_path):
    seen: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(segment, "main", lambda argv: seen.append(("segment", argv)) or [])
    monkeypatch.setattr(dc_step, "main", lambda argv: seen.append(("dc", argv)) or [])
    from fastfair.bench import cafe_step

    monkeypatch.setattr(cafe_step, "main", lambda argv: seen.append(("cafe", argv)) or [])
    assert cli.main(["bench", "dc", "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    assert seen == [("dc", ["--device", "cpu", "--json", str(tmp_path / "dc_step_cpu.json"), "--quick"])]
    seen.clear()
    # `all` runs segment, dc, step, cafe in order; a missing step module is one line and exit 2.
    monkeypatch.setitem(sys.modules, "fastfair.bench.step_time", None)
    assert cli.main(["bench", "all", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert [name for name, _ in seen] == ["segment", "dc", "cafe"]
    assert seen[0][1] == ["--device", "cpu", "--json", str(tmp_path / "segment_ops_cpu.json")]


def test_cli_bench_missing_step_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastfair.bench.step_time", None)
    assert cli.main(["bench", "step", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fastfair.bench.step_time" in err


def test_cli_bench_help_explains_each(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("segment", "dc", "step", "cafe", "all", "--quick", "--out", "--device"):
        assert word in out


TINY_CAFE = ["--device", "cpu", "--batch", "6", "--width", "4", "--image-size", "16", "--repeats", "1"]


def test_cafe_step_tiny_writes_json_and_png(tmp_path):
    from fastfair.bench import cafe_step

    path = str(tmp_path / "cafe.json")
    rows = cafe_step.main(TINY_CAFE + ["--groups", "1,10", "--json", path])
    payload = _load(path)
    assert payload["rows"] == rows and payload["complete"]
    assert {(r["impl"], r["objective"], r["groups"]) for r in rows} == {
        (i, o, g) for i in ("fastfair", "loop") for o in ("vanilla", "fairdd", "cobra") for g in (1, 10)}
    assert all(r["ms"] > 0 for r in rows)
    assert all(e <= 1e-4 for errs in payload["check_max_rel_err"].values() for e in errs.values())
    assert "fastfair fairdd / fastfair vanilla at G=10" in payload["ratios"]
    assert os.path.getsize(tmp_path / "cafe.png") > 0


def test_cafe_step_check_catches_a_different_computation(tmp_path, monkeypatch):
    from fastfair.bench import cafe_step

    real = cafe_step.FNS["fastfair"]

    def wrong(net, real_x, labels, groups, syn, syn_labels, C, G, objective):  # every objective as vanilla
        return real(net, real_x, labels, groups, syn, syn_labels, C, G, "vanilla")

    monkeypatch.setitem(cafe_step.FNS, "fastfair", wrong)
    with pytest.raises(AssertionError, match="G=10 fairdd: fastfair and the loop differ"):
        cafe_step.main(TINY_CAFE + ["--groups", "10", "--json", str(tmp_path / "c.json")])


def test_round_robin_hands_consecutive_calls_different_inputs_and_rotates_the_order():
    # Every call of a round used to get the round's index, so with inputs rotated by it the
    # first implementation of each round read cold data and the rest found it in cache.
    calls = []
    fns = {name: (lambda i, name=name: calls.append((name, i))) for name in ("a", "b", "c")}
    out = segment.round_robin_ms(fns, device="cpu", repeats=4, warmup=1)
    assert {k: len(v) for k, v in out.items()} == {"a": 4, "b": 4, "c": 4}
    idx = [i for _, i in calls]
    assert idx == list(range(len(calls)))  # one index per call: consecutive calls differ
    timed = [name for name, _ in calls[3:]]
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]


def test_step_ratios_divide_the_named_rows_and_skip_unmeasured_pairs():
    from fastfair.bench.timing import step_ratios

    rows = [{"impl": "fastfair", "objective": "vanilla", "groups": 10, "ms": 4.0},
            {"impl": "fastfair", "objective": "fairdd", "groups": 10, "ms": 5.0},
            {"impl": "loop", "objective": "fairdd", "groups": 10, "ms": 60.0},
            {"impl": "fastfair", "objective": "fairdd", "groups": 100, "ms": 7.0}]
    spec = [(10, ("fastfair", "fairdd"), ("fastfair", "vanilla"), "<= 1.3"),
            (10, ("loop", "fairdd"), ("fastfair", "fairdd"), None),
            (100, ("fastfair", "fairdd"), ("fastfair", "vanilla"), None)]  # G = 100 vanilla not measured
    got = step_ratios(rows, spec)
    assert got == {"fastfair fairdd / fastfair vanilla at G=10": {"groups": 10, "ratio": 1.25, "target": "<= 1.3"},
                   "loop fairdd / fastfair fairdd at G=10": {"groups": 10, "ratio": 12.0, "target": None}}
