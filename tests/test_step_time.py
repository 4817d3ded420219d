"""fastfair.bench.step_time at toy sizes: rows, files, the gradient check, the CPU peak meter."""
from __future__ import annotations

import json

import pytest
import torch

from fastfair.bench import step_time as st
from fastfair.distill.context import build_context

KEYS = {"method", "impl", "objective", "groups", "ms", "peak_mb", "dataset", "device", "machine", "grad_check"}
TINY = ["--classes", "2", "--batch", "6", "--image-size", "8", "--width", "4", "--ipc", "1", "--repeats", "1"]


def test_sweep_rows_json_and_plots(tmp_path):
    out = tmp_path / "res" / "step.json"
    rows = st.main(["--device", "cpu", "--dataset", "synthetic", "--groups", "1,3", "--json", str(out), *TINY])
    assert len(rows) == 2 * 2 * 4  # methods x groups x impls
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["dataset"] == "synthetic" and r["device"] == "cpu"
        assert r["ms"] is not None and r["ms"] > 0, r
        assert r["grad_check"] == "ok", r
        assert r["match_groups"] == (1 if r["impl"] == "vanilla" else r["groups"])
    assert {r["method"] for r in rows} == {"dm", "dc"}
    assert {(r["impl"], r["objective"]) for r in rows} == set(st.IMPLS)
    assert {r["groups"] for r in rows} == {1, 3}
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "step_time" and payload["rows"] == rows
    for m in ("dm", "dc"):
        png = tmp_path / "res" / f"step_synthetic_{m}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cdigits_groups():
    scale = st.Scale(classes=0, batch=6, image_size=0, width=4, ipc=1)
    base = st.base_dataset("cdigits-fg", scale, torch.device("cpu"))
    real = base.train.groups
    natural = st.natural_groups(base)
    assert base.num_classes == 10 and base.image_size == 32 and set(natural) == {10}
    ten, how = st.with_groups(base, 10, natural)
    assert torch.equal(ten.train.groups, real) and how == "the dataset's groups"  # its own colours at G = 10
    four, how = st.with_groups(base, 4, natural)
    assert four.num_groups == 4 and set(four.train.groups.tolist()) == {0, 1, 2, 3} and how == "uniformly random"
    assert set(st.with_groups(base, 1, natural)[0].train.groups.tolist()) == {0}


def test_several_attribute_group_ladder():
    # cdigits-fgbg (4 digit colours x 4 background colours) stands in for
    # the real cmnist-fgbg: G = 4 the first attribute, 16 the intersection,
    # 160 the intersection x a random 10-valued attribute.
    scale = st.Scale(classes=0, batch=6, image_size=0, width=4, ipc=1)
    base = st.base_dataset("cdigits-fgbg", scale, torch.device("cpu"))
    inter = base.train.groups
    natural = st.natural_groups(base)
    assert sorted(natural) == [4, 16, 160]
    fg, _ = st.with_groups(base, 4, natural)
    assert torch.equal(fg.train.groups, inter // 4) and fg.attributes.names == ("group",)
    both, how = st.with_groups(base, 16, natural)
    assert torch.equal(both.train.groups, inter) and how == "fg x bg"
    more, _ = st.with_groups(base, 160, natural)
    assert torch.equal(more.train.groups // 10, inter) and more.num_groups == 160
    assert len(set(more.train.groups.tolist())) > 16


def test_the_loop_is_extrapolated_past_its_time_cap(tmp_path):
    out = tmp_path / "step.json"
    rows = st.main(["--device", "cpu", "--dataset", "synthetic", "--methods", "dc", "--groups", "1,3",
                    "--loop-max-seconds", "1e-9", "--json", str(out), *TINY])
    loops = {r["groups"]: r for r in rows if r["impl"] == "loop"}
    assert loops[1]["ms"] > 0 and "extrapolated_ms" not in loops[1]  # the first G is always measured
    third = loops[3]
    assert third["ms"] is None and third["extrapolated_from_groups"] == 1
    # Linear in the cells present: the extrapolation scales the measured time by their ratio.
    want = loops[1]["ms"] * third["cells_present"] / loops[1]["cells_present"]
    assert third["extrapolated_ms"] == pytest.approx(want)
    assert third["error"].startswith("not run:") and "--loop-max-seconds" in third["error"]
    assert all(r["grad_check"] == "not run (loop extrapolated)" for r in rows if r["groups"] == 3)
    assert all(r["ms"] is not None for r in rows if r["impl"] != "loop")


def _contexts(method: str, groups: int):
    scale = st.Scale(classes=2, batch=6, image_size=8, width=4, ipc=1)
    base = st.base_dataset("synthetic", scale, torch.device("cpu"))
    ds, _ = st.with_groups(base, groups, None)
    fair = build_context(st.make_config("synthetic", method, "fairdd", scale, 8, 0), ds, torch.device("cpu"))
    van = build_context(st.make_config("synthetic", method, "vanilla", scale, 8, 0), ds, torch.device("cpu"))
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return fair, van, images


@pytest.mark.parametrize("method", ["dm", "dc"])
def test_grad_check_tells_fairdd_from_vanilla(method):
    fair, van, images = _contexts(method, 3)
    loop = st.loop_dm_step if method == "dm" else st.loop_dc_step
    ok, err = st.grad_check(lambda x, b, it: loop(fair, x, b, it), st.fastfair_step(fair), images)
    assert ok and err < 1e-3
    # The vanilla objective is a different computation: the check must say so.
    ok, err = st.grad_check(lambda x, b, it: loop(fair, x, b, it), st.fastfair_step(van), images)
    assert not ok and err > 1e-2


def test_cpu_peak_meter_sees_a_step_allocation():
    meter = st.PeakMeter(torch.device("cpu"))
    if meter.reason is not None:
        pytest.skip(meter.reason)
    peak, base = meter.measure(lambda: torch.ones(64 * 2**20 // 4).sum())  # 64 MB touched, then freed
    assert base > 0
    assert 60 <= peak < 200, peak
    small, _ = meter.measure(lambda: torch.ones(16).sum())
    assert small < 16, small


def test_out_of_memory_is_a_row_not_a_crash(tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 54.00 GiB")

    monkeypatch.setattr(st, "loop_dm_step", oom)
    rows = st.main(["--device", "cpu", "--dataset", "synthetic", "--methods", "dm", "--groups", "2",
                    "--json", str(tmp_path / "s.json"), *TINY])
    loop = [r for r in rows if r["impl"] == "loop"]
    assert len(loop) == 1 and loop[0]["error"] == "out of memory" and loop[0]["ms"] is None
    assert all(r["grad_check"] == "not run (out of memory)" for r in rows)
    assert all(r["ms"] > 0 for r in rows if r["impl"] != "loop")


def test_implementations_are_timed_round_robin(tmp_path, monkeypatch):
    # Every round times each implementation once, with that round's iteration
    # index, so drifts of the machine fall on all of them alike.
    order: list[tuple[int, int]] = []
    real_call = st._call

    def spy(step, images, buf, it):  # noqa: ANN001
        order.append((id(step), it))
        return real_call(step, images, buf, it)

    monkeypatch.setattr(st, "_call", spy)
    assert TINY[-2:] == ["--repeats", "1"]
    tiny = TINY[:-1] + ["3"]
    rows = st.main(["--device", "cpu", "--dataset", "synthetic", "--methods", "dm", "--groups", "2",
                    "--json", str(tmp_path / "s.json"), *tiny])
    assert all(r["samples"] == 3 for r in rows)
    timed = [(s, it) for s, it in order if it >= 2]  # after the warm-up (0) and memory (1) steps
    steps = list(dict.fromkeys(s for s, _ in timed))
    assert len(steps) == 4
    assert timed == [(s, 2 + r) for r in range(3) for s in steps]


def test_dc_block_classes_reaches_the_driver(tmp_path, monkeypatch):
    seen = []
    real = st.dc_iteration

    def spy(ctx, *args, **kw):
        seen.append(ctx.cfg.dc_block_classes)
        return real(ctx, *args, **kw)

    monkeypatch.setattr(st, "dc_iteration", spy)
    out = tmp_path / "step.json"
    st.main(["--device", "cpu", "--dataset", "synthetic", "--methods", "dc", "--groups", "3",
             "--dc-block-classes", "2", "--json", str(out), *TINY])
    assert seen and set(seen) == {2}
    assert json.loads(out.read_text())["settings"]["dc_block_classes"] == 2
    with pytest.raises(SystemExit):
        st.main(["--device", "cpu", "--dc-block-classes", "0", *TINY])


def test_skip_loop_leaves_out_the_loop_rows(tmp_path):
    out = tmp_path / "step.json"
    rows = st.main(["--device", "cpu", "--dataset", "synthetic", "--methods", "dm", "--groups", "2",
                    "--skip-loop", "--json", str(out), *TINY])
    assert {(r["impl"], r["objective"]) for r in rows} == set(st.IMPLS) - {("loop", "fairdd")}
    assert all(r["grad_check"] == "not run (--skip-loop)" and r["ms"] for r in rows)
    payload = json.loads(out.read_text())
    assert payload["settings"]["skip_loop"] is True
    assert not any("loop" in name for name in payload["ratios"])


def test_memory_only_measures_peaks_without_timing(tmp_path):
    out = tmp_path / "mem.json"
    rows = st.main(["--device", "cpu", "--dataset", "synthetic", "--methods", "dc", "--groups", "2",
                    "--skip-loop", "--memory-only", "--json", str(out), *TINY])
    assert len(rows) == 3
    assert all(r["ms"] is None and r["peak_mb"] is not None and r["peak_mb"] >= 0 for r in rows)
    payload = json.loads(out.read_text())
    assert payload["settings"]["memory_only"] is True
    assert (tmp_path / "mem_synthetic_dc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_max_seconds_caps_the_samples_at_three(tmp_path):
    """Past --max-seconds an implementation keeps its 3 samples; with room
    every one gets --repeats."""
    tiny = [a if a != "1" or i == 0 or TINY[i - 1] != "--repeats" else "5" for i, a in enumerate(TINY)]
    capped = st.main(["--device", "cpu", "--dataset", "synthetic", "--methods", "dm", "--groups", "2",
                      "--max-seconds", "1e-9", "--json", str(tmp_path / "a.json"), *tiny])
    assert {r["samples"] for r in capped if r["ms"] is not None} == {3}
    roomy = st.main(["--device", "cpu", "--dataset", "synthetic", "--methods", "dm", "--groups", "2",
                     "--max-seconds", "1000", "--json", str(tmp_path / "b.json"), *tiny])
    assert {r["samples"] for r in roomy if r["ms"] is not None} == {5}
    with pytest.raises(SystemExit):
        st.main(["--device", "cpu", "--max-seconds", "0", "--json", str(tmp_path / "c.json"), *tiny])
