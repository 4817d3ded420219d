"""fastfair reproduce: tiny budgets on the embedded dataset (and on real MNIST
when /work/shared/data holds it), resumption, and the published numbers in
the Markdown table."""
from __future__ import annotations

import json
import os

import pytest

import fastfair
from fastfair import choices, ops, reproduce
from fastfair.cli import main
from fastfair.distill import config

REAL_ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
if not os.path.isdir(os.path.join(REAL_ROOT, "MNIST", "raw")):
    REAL_ROOT = "/work/shared/data"
HAS_MNIST = os.path.isdir(os.path.join(REAL_ROOT, "MNIST", "raw"))


def test_names_agree_with_the_torch_free_choices():
    assert choices.TABLES == tuple(reproduce.TABLES)
    assert choices.BUDGETS == tuple(reproduce.BUDGETS)
    assert choices.PRESETS == config.PRESETS


def test_paper_numbers_are_the_reference_tables():
    # Spot checks against docs/methods.md (FairDD Tables 1-2, COBRA).
    assert reproduce.PAPER[("cmnist-fg", 10, "dm", "fairdd")][:3] == (17.04, 7.95, 94.61)
    assert reproduce.PAPER[("cmnist-bg", 10, "dc", "vanilla")][:3] == (100.0, 73.60, 65.91)
    assert reproduce.PAPER[("cmnist-bg", 50, "dm", "cobra")][0] == 7.46
    md = reproduce.markdown("fairdd-cmnist", "cpu", [_record("cmnist-fg", "dm", "fairdd", 20.0)],
                            {"machine": {"cpu": "X", "cpu_count": 2}})
    row = [ln for ln in md.splitlines() if ln.startswith("| cmnist-fg")][0]
    assert "20.00 +- 1.00" in row and "17.04 / 7.95 / 94.61" in row
    assert "10.10 / 5.89 / 97.71" in md  # the whole-set row of the paper


def test_published_numbers_only_beside_cells_of_the_same_protocol():
    # FairDD's Table 1-2 numbers describe FairDD's protocol; the `cobra` table runs COBRA's
    # (fairdd-mean for DC, COBRA's evaluation schedule), so its cells get no FairDD number.
    recs = [_record("cmnist-fg", "dc", "fairdd", 20.0), _record("cmnist-fg", "dm", "vanilla", 99.0)]
    info = {"machine": {"cpu": "X", "cpu_count": 2}}
    cobra_rows = [ln for ln in reproduce.markdown("cobra", "cpu", recs, info).splitlines()
                  if ln.startswith("| cmnist-fg")]
    assert len(cobra_rows) == 2
    assert all(ln.split("|")[-4:-2] == [" - ", " - "] for ln in cobra_rows), cobra_rows
    fairdd_md = reproduce.markdown("fairdd-cmnist", "cpu", recs, info)
    assert "26.75 / 11.96 / 90.62" in fairdd_md and "100.00 / 99.96 / 25.01" in fairdd_md
    assert reproduce.published("cobra", "cmnist-fg", 10, "dc", "fairdd") is None
    assert reproduce.published("cobra-cmnist", "cmnist-bg", 50, "dm", "cobra")[0] == 7.46
    assert reproduce.published("fairdd-cmnist", "cmnist-bg", 50, "dm", "cobra") is None
    assert "Whole training set" not in reproduce.markdown("cobra", "cpu", recs, info)


def _record(dataset: str, method: str, objective: str, deo_m: float) -> dict:
    return {"dataset": dataset, "ipc": 10, "method": method, "objective": objective, "deo_m": deo_m,
            "deo_m_std": 1.0, "deo_a": 5.0, "deo_a_std": 0.5, "acc": 90.0, "acc_std": 0.1,
            "worst_group_acc": 70.0, "distill_seconds": 60, "eval_seconds": 60}


def test_cell_settings_follow_the_budget():
    t, b = reproduce.TABLES["fairdd-cmnist"], reproduce.BUDGETS["cpu"]
    dm = reproduce.cell_settings(t, b, "cmnist-fg", "dm", "fairdd", 0)
    dc = reproduce.cell_settings(t, b, "cmnist-fg", "dc", "fairdd", 0)
    assert dm["distill"]["iterations"] == b.distill["dm"]["iterations"]
    assert dc["distill"]["outer_loop"] == b.distill["dc"]["outer_loop"]
    assert dm["eval"]["runs"] == b.eval_runs
    paper = reproduce.cell_settings(t, reproduce.BUDGETS["paper"], "cmnist-fg", "dm", "fairdd", 0)
    cfg = config.resolve(config.DistillConfig(**paper["distill"]))
    assert (cfg.iterations, cfg.batch_real, cfg.dsa, cfg.width) == (20000, 256, True, 128)
    assert paper["eval"]["epochs"] is None  # the method's reference protocol


def test_cpu_long_differs_from_cpu_in_iterations_and_idc_dream_evaluation_only():
    # DM 6x, IDC and DREAM 2x and evaluated as DM (as the reference evaluates them) except
    # under COBRA's protocol (its own IDC length); DC, CAFE and every other evaluation as cpu.
    cpu, long = reproduce.BUDGETS["cpu"], reproduce.BUDGETS["cpu-long"]
    factor = {"dm": 6, "idc": 2, "dream": 2}
    for t, methods in ((reproduce.TABLES["fairdd-cfmnist"], ("dm", "dc", "idc", "dream")),
                       (reproduce.TABLES["cobra"], ("dm", "dc", "idc", "cafe"))):
        for m in methods:
            a = reproduce.cell_settings(t, cpu, "cfmnist-bg", m, "fairdd", 0)
            b = reproduce.cell_settings(t, long, "cfmnist-bg", m, "fairdd", 0)
            if m in factor:
                assert b["distill"].pop("iterations") == factor[m] * a["distill"].pop("iterations")
            if t.preset == "fairdd" and m in ("idc", "dream"):
                assert (a["eval"].pop("epochs"), b["eval"].pop("epochs")) == (300, 500)
            assert (a["distill"], a["eval"]) == (b["distill"], b["eval"]), (t.name, m)
    assert "DM 6000 iterations" in long.summary and "IDC and DREAM 160 outer iterations (DC 80)" in long.summary
    assert "evaluated as DM (500 epochs with DSA" in long.summary
    # The cobra preset's IDC protocol (no inner training) still applies to a method-keyed entry.
    idc = reproduce.cell_settings(reproduce.TABLES["cobra"], long, "cmnist-fg", "idc", "cobra", 0)["distill"]
    assert (idc["iterations"], idc["inner_loop"]) == (160, 0)


def test_cpu_budget_evaluates_the_cobra_table_in_cobras_proportions():
    # COBRA's code evaluates DM 1500 and DC 1000 epochs (FairDD's 1000 / 300); the cpu
    # budget halves FairDD's DM length and keeps its DC one, so under COBRA: 750 / 1000.
    b = reproduce.BUDGETS["cpu"]
    cobra, fairdd = reproduce.TABLES["cobra"], reproduce.TABLES["fairdd-cmnist"]
    ep = {m: reproduce.cell_settings(cobra, b, "cmnist-fg", m, "vanilla", 0)["eval"]["epochs"]
          for m in ("dm", "dc", "idc", "cafe")}
    assert ep == {"dm": 750, "dc": 1000, "idc": 1000, "cafe": 300}
    assert [reproduce.cell_settings(fairdd, b, "cmnist-fg", m, "vanilla", 0)["eval"]["epochs"]
            for m in ("dm", "dc", "idc")] == [500, 300, 300]
    assert "750" in b.summary and "COBRA's code 1500 / 1000" in b.summary


def test_tiny_run_writes_outputs_and_resumes(tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["reproduce", "--table", "cdigits", "--budget", "tiny", "--datasets", "cdigits-fg",
            "--cells", "dm:fairdd,dc:vanilla", "--out", str(out), "--threads", "1"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["objective"]) for r in res["results"]] == [("dm", "fairdd"), ("dc", "vanilla")]
    for r in res["results"]:
        assert 0 <= r["acc"] <= 100 and 0 <= r["deo_m"] <= 100 and r["eval_runs"] == 2
        assert len(r["cell_acc"]) == 10 and len(r["cell_acc"][0]) == 10
    dc = res["results"][1]
    assert dc["eval_dsa"] is False and dc["settings"]["distill"]["method"] == "dc"
    # Which code made the cell travels with it (a kernel change moves numbers at rounding level).
    cell = json.loads((out / "cdigits-fg" / "dc_vanilla_ipc10" / "cell.json").read_text())
    assert cell["build"]["backend"] == ops.backend() and cell["build"]["fastfair"] == fastfair.__version__
    assert (out / "results.md").read_text().count("| cdigits-fg |") == 2
    assert (out / "results.png").stat().st_size > 0
    cell = out / "cdigits-fg" / "dm_fairdd_ipc10"
    assert (cell / "synset.pt").is_file() and (cell / "cells.png").is_file()
    # A second run skips the finished cells: cell.json is not rewritten.
    stamp = (cell / "cell.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (cell / "cell.json").stat().st_mtime_ns == stamp
    capsys.readouterr()


def test_unfinished_cell_keeps_its_finished_eval_runs(tmp_path):
    from fastfair import data

    t, b = reproduce.TABLES["cdigits"], reproduce.BUDGETS["tiny"]
    ds = data.load("cdigits-fg")
    cell = tmp_path / "c"
    first = reproduce.run_cell(ds, t, b, "cdigits-fg", "dm", "vanilla", str(cell))
    lines = (cell / "eval_runs.jsonl").read_text().splitlines()
    assert len(lines) == b.eval_runs
    # Interrupted after one evaluation run (cell.json not yet written, and a
    # half-written second line): the rerun keeps run 0 and redoes run 1.
    (cell / "cell.json").unlink()
    (cell / "eval_runs.jsonl").write_text(lines[0] + "\n" + lines[1][:20])
    again = reproduce.run_cell(ds, t, b, "cdigits-fg", "dm", "vanilla", str(cell))
    assert json.loads((cell / "eval_runs.jsonl").read_text().splitlines()[0]) == json.loads(lines[0])
    # The cut line is gone, not left between run 0 and the redone run 1 (where
    # the next resume would stop reading and redo run 1 once more).
    recs = [json.loads(ln) for ln in (cell / "eval_runs.jsonl").read_text().splitlines()]
    assert [r["run"] for r in recs] == list(range(b.eval_runs))
    assert all(r["result"]["seconds"] >= 0 for r in recs)  # each run's wall time, for `--status`
    for k in ("acc", "deo_m", "deo_a"):
        assert again[k] == pytest.approx(first[k])  # same seeds, same synthetic set (resumed checkpoint)


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    for argv, what in ((["--cells", "dm-fairdd"], "METHOD:OBJECTIVE"), (["--datasets", "mnist"], "no dataset"),
                       (["--cells", "dm:cobra-x"], "no cell")):
        assert main(["reproduce", "--table", "cdigits", "--budget", "tiny", "--out", str(tmp_path / "x"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and what in err[0]


@pytest.mark.skipif(not HAS_MNIST, reason="real MNIST not present (../shared/data/MNIST/raw)")
def test_tiny_run_on_real_cmnist(tmp_path, capsys):
    out = tmp_path / "m"
    before = sorted(os.walk(REAL_ROOT))
    assert main(["reproduce", "--table", "fairdd-cmnist", "--budget", "tiny", "--datasets", "cmnist-fg",
                 "--cells", "dm:fairdd", "--root", REAL_ROOT, "--out", str(out), "--threads", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    (r,) = res["results"]
    assert r["dataset"] == "cmnist-fg" and 0 <= r["deo_m"] <= 100
    assert "17.04 / 7.95 / 94.61" in (out / "results.md").read_text()
    assert sorted(os.walk(REAL_ROOT)) == before  # nothing written into the data root
    capsys.readouterr()


def test_intersectional_cells_carry_what_they_are_fair_over() -> None:
    t, b = reproduce.TABLES["intersectional"], reproduce.BUDGETS["tiny"]
    assert ("dm", "fairdd@marginal") in t.cells and ("dc", "cobra@intersection") in t.cells
    s = reproduce.cell_settings(t, b, "cmnist-fgbg", "dm", "fairdd@fg", 0)["distill"]
    assert s["objective"] == "fairdd" and s["fair_over"] == "fg"
    assert "fair_over" not in reproduce.cell_settings(t, b, "cmnist-fgbg", "dm", "vanilla", 0)["distill"]
    assert reproduce.cell_name("dm", "fairdd@fg", 10) == "dm_fairdd_over_fg_ipc10"
    assert "sample_per_group" not in s


def test_balanced_cells_sample_every_group(tmp_path, capsys) -> None:
    t, b = reproduce.TABLES["intersectional"], reproduce.BUDGETS["tiny"]
    s = reproduce.cell_settings(t, b, "cmnist-fgbg", "dm", "fairdd@intersection+balanced", 0)["distill"]
    assert s["objective"] == "fairdd" and s["fair_over"] == "intersection" and s["sample_per_group"] is True
    s = reproduce.cell_settings(t, b, "cmnist-fgbg", "dm", "fairdd-raked@intersection+balanced", 0)["distill"]
    assert s["objective"] == "fairdd-raked" and s["sample_per_group"] is True
    assert ("dm", "fairdd-raked@intersection+balanced") in t.cells
    with pytest.raises(ValueError, match="unknown sampling 'lucky'"):
        reproduce.cell_settings(t, b, "cmnist-fgbg", "dm", "fairdd@intersection+lucky", 0)
    out = tmp_path / "r"
    assert main(["reproduce", "--table", "cdigits-intersectional", "--budget", "tiny", "--cells",
                 "dm:fairdd@intersection+balanced", "--out", str(out), "--threads", "1"]) == 0
    cell = out / "cdigits-fgbg" / "dm_fairdd_over_intersection_balanced_ipc10"
    rec = json.loads((cell / "cell.json").read_text())
    assert rec["objective"] == "fairdd@intersection+balanced"
    assert rec["config"]["sample_per_group"] is True  # what the distillation really ran with
    assert "fairdd@intersection+balanced" in (out / "results.md").read_text()
    assert rec["config"]["init"] == "real"
    capsys.readouterr()


def test_balanced_init_cells_also_start_from_balanced_real_images(tmp_path, capsys) -> None:
    t, b = reproduce.TABLES["intersectional"], reproduce.BUDGETS["tiny"]
    s = reproduce.cell_settings(t, b, "cmnist-fgbg", "dm", "fairdd@intersection+balanced-init", 0)["distill"]
    assert s["sample_per_group"] is True and s["init"] == "real-balanced" and s["fair_over"] == "intersection"
    assert "init" not in reproduce.cell_settings(t, b, "cmnist-fgbg", "dm", "fairdd@intersection+balanced",
                                                 0)["distill"]  # the committed cells' settings are unchanged
    assert ("dm", "fairdd@intersection+balanced-init") in t.cells
    out = tmp_path / "r"
    assert main(["reproduce", "--table", "cdigits-intersectional", "--budget", "tiny", "--cells",
                 "dm:fairdd@intersection+balanced-init", "--out", str(out), "--threads", "1"]) == 0
    rec = json.loads((out / "cdigits-fgbg" / "dm_fairdd_over_intersection_balanced-init_ipc10" / "cell.json")
                     .read_text())
    assert rec["config"]["init"] == "real-balanced" and rec["config"]["sample_per_group"] is True
    capsys.readouterr()


def test_cafe_table_runs_every_objective(tmp_path, capsys) -> None:
    out = tmp_path / "c"
    argv = ["reproduce", "--table", "cdigits-cafe", "--budget", "tiny", "--out", str(out), "--threads", "1"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["objective"]) for r in res["results"]] == [
        ("cafe", "vanilla"), ("cafe", "fairdd"), ("cafe", "cobra")]
    for r in res["results"]:
        s = r["settings"]
        assert s["distill"]["preset"] == "cobra" and s["distill"]["outer_loop"] == 2
        assert r["eval_dsa"] is False and r["eval_runs"] == 2 and 0 <= r["deo_m"] <= 100
    capsys.readouterr()


def test_two_runs_into_one_out_keep_each_others_cells(tmp_path, monkeypatch):
    # Two reproduce processes into one --out (two datasets or cells at once,
    # to use both cores): a cell the second run finishes while the first is
    # running must survive the first run's later writes. Run A plans
    # dm:fairdd; while its cell runs, run B (here: nested) finishes dc:vanilla.
    # Before the read-merge-write under a lock, A wrote its start-time view
    # and B's cell vanished from results.json (seen on C-MNIST, 2026-12-04).
    out = str(tmp_path / "r")
    reproduce.reproduce("cdigits", "tiny", out, datasets=["cdigits-fg"], cells=[("dm", "vanilla")], threads=1)
    real_run_cell = reproduce.run_cell

    def run_cell_with_b(ds, table, budget, dataset, method, objective, *args, **kwargs):
        if (method, objective) == ("dm", "fairdd"):
            monkeypatch.setattr(reproduce, "run_cell", real_run_cell)
            reproduce.reproduce("cdigits", "tiny", out, datasets=["cdigits-fg"], cells=[("dc", "vanilla")],
                                threads=1)
        return real_run_cell(ds, table, budget, dataset, method, objective, *args, **kwargs)

    monkeypatch.setattr(reproduce, "run_cell", run_cell_with_b)
    reproduce.reproduce("cdigits", "tiny", out, datasets=["cdigits-fg"], cells=[("dm", "fairdd")], threads=1)
    res = json.loads(open(os.path.join(out, "results.json")).read())
    got = sorted((r["method"], r["objective"]) for r in res["results"])
    assert got == [("dc", "vanilla"), ("dm", "fairdd"), ("dm", "vanilla")]
    md = open(os.path.join(out, "results.md")).read()
    assert "| dc | vanilla |" in md and "| dm | fairdd |" in md


def test_a_stale_results_file_loses_no_finished_cell(tmp_path):
    # results.json restored from an older version (git stash / checkout while a run
    # writes) lists fewer cells than the folders hold: the next write puts them back.
    out = str(tmp_path / "r")
    reproduce.reproduce("cdigits", "tiny", out, datasets=["cdigits-fg"], cells=[("dm", "vanilla"), ("dc", "vanilla")],
                        threads=1)
    path = os.path.join(out, "results.json")
    res = json.loads(open(path).read())
    res["results"] = [r for r in res["results"] if r["method"] == "dm"]  # the stale view: dc:vanilla gone
    open(path, "w").write(json.dumps(res))
    (tmp_path / "r" / "cdigits-fg" / "junk").mkdir()  # a folder without cell.json is no cell
    reproduce.reproduce("cdigits", "tiny", out, datasets=["cdigits-fg"], cells=[("dm", "fairdd")], threads=1)
    res = json.loads(open(path).read())
    got = sorted((r["method"], r["objective"]) for r in res["results"])
    assert got == [("dc", "vanilla"), ("dm", "fairdd"), ("dm", "vanilla")]
    assert all("config" not in r for r in res["results"])


def test_several_attribute_rows_show_each_attributes_deo_and_the_test_cells():
    rec = {**_record("cmnist-fgbg", "dm", "fairdd@intersection", 90.0), "test_cells": 1000,
           "per_attribute": {"fg": {"deo_m": 30.5, "deo_a": 12.25}, "bg": {"deo_m": 20.0, "deo_a": 8.0}}}
    md = reproduce.markdown("intersectional", "cpu", [rec, _record("cmnist-fgbg", "dm", "vanilla", 100.0)],
                            {"machine": {"cpu": "X", "cpu_count": 2}})
    head = next(ln for ln in md.splitlines() if ln.startswith("| dataset"))
    assert "| fg DEO_M / DEO_A | bg DEO_M / DEO_A | worst cell |" in head
    row = next(ln for ln in md.splitlines() if "fairdd@intersection" in ln)
    assert "| 30.50 / 12.25 | 20.00 / 8.00 |" in row
    vanilla = next(ln for ln in md.splitlines() if "| vanilla |" in ln)
    assert "| - | - |" in vanilla  # a record without per-attribute metrics
    assert "cmnist-fgbg 1000" in md


def test_evaluation_augmentation_is_the_presets_protocol():
    # COBRA's train_idc.py evaluates IDC sets without DSA, FairDD's code with it;
    # DM always with, DC never (both codes).
    b = reproduce.BUDGETS["cpu"]
    cobra, fairdd = reproduce.TABLES["cobra"], reproduce.TABLES["fairdd-cmnist"]
    dsa = {(t, m): reproduce.cell_settings(reproduce.TABLES[t], b, "cmnist-fg", m, "vanilla", 0)["eval"]["dsa"]
           for t in ("cobra", "fairdd-cmnist") for m in ("dm", "dc", "idc")}
    assert dsa == {("cobra", "dm"): True, ("cobra", "dc"): False, ("cobra", "idc"): False,
                   ("fairdd-cmnist", "dm"): True, ("fairdd-cmnist", "dc"): False, ("fairdd-cmnist", "idc"): True}
    assert cobra.preset == "cobra" and fairdd.preset == "fairdd"


def _drop_recorded_dsa(cell) -> None:
    """Rewrite a cell's records as reproduce wrote them before the evaluation's
    DSA was part of a cell's settings."""
    rec = json.loads((cell / "cell.json").read_text())
    del rec["settings"]["eval"]["dsa"]
    (cell / "cell.json").write_text(json.dumps(rec))
    lines = [json.loads(x) for x in (cell / "eval_runs.jsonl").read_text().splitlines()]
    for x in lines:
        del x["settings"]["eval"]["dsa"]
    (cell / "eval_runs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_cells_recorded_without_their_dsa_are_kept_where_the_protocol_agrees(tmp_path):
    from fastfair import data

    b = reproduce.BUDGETS["tiny"]
    ds = data.load("cdigits-fg")
    # FairDD's DM (DSA on in both readings): the finished cell is reused as it is.
    cell = tmp_path / "dm"
    reproduce.run_cell(ds, reproduce.TABLES["cdigits"], b, "cdigits-fg", "dm", "vanilla", str(cell))
    _drop_recorded_dsa(cell)
    stamp = (cell / "cell.json").stat().st_mtime_ns
    again = reproduce.run_cell(ds, reproduce.TABLES["cdigits"], b, "cdigits-fg", "dm", "vanilla", str(cell))
    assert (cell / "cell.json").stat().st_mtime_ns == stamp and "dsa" not in again["settings"]["eval"]


def test_cobra_idc_cells_recorded_with_fairdds_dsa_are_evaluated_again_without(tmp_path):
    from fastfair import data

    b = reproduce.BUDGETS["tiny"]
    ds = data.load("cdigits-fg")
    cell = tmp_path / "idc"
    first = reproduce.run_cell(ds, reproduce.TABLES["cobra"], b, "cdigits-fg", "idc", "vanilla", str(cell))
    assert first["eval_dsa"] is False and first["settings"]["eval"]["dsa"] is False
    runs = [json.loads(x)["result"] for x in (cell / "eval_runs.jsonl").read_text().splitlines()]
    assert [r["dsa"] for r in runs] == [False] * b.eval_runs
    # A record from before (no dsa in its settings: reproduce evaluated with
    # FairDD's IDC protocol, DSA on) is not COBRA's protocol: evaluated again.
    _drop_recorded_dsa(cell)
    again = reproduce.run_cell(ds, reproduce.TABLES["cobra"], b, "cdigits-fg", "idc", "vanilla", str(cell))
    assert again["settings"]["eval"]["dsa"] is False and again["eval_dsa"] is False
    lines = [json.loads(x) for x in (cell / "eval_runs.jsonl").read_text().splitlines()]
    assert len(lines) == b.eval_runs and all(x["settings"]["eval"]["dsa"] is False for x in lines)


@pytest.mark.parametrize("flags, tty, bars", [([], False, False), ([], True, True), (["--progress"], False, True),
                                              (["--no-progress"], True, False)])
def test_progress_bars_follow_the_terminal_unless_asked(tmp_path, monkeypatch, capsys, flags, tty, bars):
    # A log file (nohup, CI) gets the per-cell lines only; a terminal gets bars.
    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        (tmp_path / "r").mkdir(exist_ok=True)
        (tmp_path / "r" / "results.md").write_text("table\n")
        return {"results": []}

    monkeypatch.setattr(reproduce, "reproduce", fake)
    monkeypatch.setattr("sys.stderr.isatty", lambda: tty)
    assert main(["reproduce", "--table", "cdigits", "--budget", "tiny", "--out", str(tmp_path / "r"), *flags]) == 0
    assert seen["progress"] is bars
    capsys.readouterr()


def test_progress_and_no_progress_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--out", str(tmp_path / "r"), "--progress", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not allowed with argument" in err


def test_results_chart_stacks_the_metrics_over_the_cells_in_table_order(tmp_path, monkeypatch):
    # Cells arrive in the order they finish; the chart, like results.md, lists
    # them in the table's order, one row per metric so that 40+ cells stay legible.
    from fastfair import reproduce_outputs
    figs = []
    monkeypatch.setattr(reproduce_outputs, "save_png", lambda fig, path: figs.append(fig))
    finished = [_record("cmnist-bg", "dm", "fairdd", 30.0), _record("cmnist-fg", "dm", "cobra", 25.0),
                _record("cmnist-fg", "dm", "vanilla", 100.0), _record("cmnist-fg", "dm", "fairdd", 20.0)]
    reproduce_outputs.bar_chart("fairdd-cmnist", finished, str(tmp_path / "r.png"), "t")
    (fig,) = figs
    axes = fig.get_axes()
    assert len(axes) == 3 and len({round(ax.get_position().x0, 3) for ax in axes}) == 1  # stacked
    labels = [t.get_text().replace("\n", " ") for t in axes[-1].get_xticklabels()]
    assert labels == ["cmnist-fg dm+vanilla", "cmnist-fg dm+fairdd", "cmnist-fg dm+cobra", "cmnist-bg dm+fairdd"]
    heights = [p.get_height() for p in axes[0].patches if p.get_width() < 1]
    assert heights[:4] == [100.0, 20.0, 25.0, 30.0]  # DEO_M bars follow their labels


def test_results_chart_legend_names_each_colour_once_and_the_paper_only_when_drawn(tmp_path, monkeypatch):
    from fastfair import reproduce_outputs
    figs = []
    monkeypatch.setattr(reproduce_outputs, "save_png", lambda fig, path: figs.append(fig))
    cells = [_record("cmnist-fg", "dm", "fairdd-mean", 30.0), _record("cmnist-fg", "dc", "fairdd-raked", 20.0),
             _record("cmnist-fg", "dm", "vanilla", 100.0)]
    reproduce_outputs.bar_chart("cobra", cells, str(tmp_path / "a.png"), "t")  # no published numbers
    labels = [t.get_text() for t in figs[-1].legends[0].get_texts()]
    assert labels == ["vanilla", "fairdd-mean, fairdd-raked"]  # in the table's order
    reproduce_outputs.bar_chart("fairdd-cmnist", [_record("cmnist-fg", "dm", "fairdd", 20.0)],
                                str(tmp_path / "b.png"), "t")
    assert [t.get_text() for t in figs[-1].legends[0].get_texts()] == ["fairdd", "paper"]
    # Several attributes: a cell's colour is its objective's, whatever it is fair over.
    reproduce_outputs.bar_chart("intersectional", [_record("cmnist-fgbg", "dm", "cobra@intersection", 40.0),
                                                   _record("cmnist-fgbg", "dm", "fairdd@fg", 90.0)],
                                str(tmp_path / "c.png"), "t")
    fig = figs[-1]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["fairdd", "cobra"]
    bars = {round(p.get_height()): p.get_facecolor()[:3] for p in fig.get_axes()[0].patches}
    assert bars[40] == pytest.approx((0.839, 0.153, 0.157), abs=1e-2)  # COBRA's red
    assert bars[90] == pytest.approx((0.122, 0.467, 0.706), abs=1e-2)  # FairDD's blue
    # A sampling without an attribute keeps the colour too.
    reproduce_outputs.bar_chart("intersectional", [_record("cmnist-fgbg", "dm", "cobra+balanced", 40.0)],
                                str(tmp_path / "d.png"), "t")
    assert figs[-1].get_axes()[0].patches[0].get_facecolor()[:3] == pytest.approx((0.839, 0.153, 0.157), abs=1e-2)


def test_each_cell_keeps_the_machine_it_ran_on(tmp_path, monkeypatch, capsys):
    out = tmp_path / "m"
    # A table written before cells kept their machine: one old cell, the table's machine.
    out.mkdir()
    old = _record("cdigits-fg", "dm", "vanilla", 99.0)
    (out / "results.json").write_text(json.dumps({"machine": {"cpu": "Old EPYC", "cpu_count": 2, "torch": "2.14",
                                                              "threads": 1}, "note": "beside two jobs",
                                                  "results": [old]}))
    monkeypatch.setattr(reproduce, "machine", lambda: {"cpu": "New Xeon", "cpu_count": 2, "torch": "2.14",
                                                       "threads": 1})
    assert main(["reproduce", "--table", "cdigits", "--budget", "tiny", "--cells", "dm:fairdd", "--out", str(out),
                 "--threads", "1", "--note", "alone"]) == 0
    res = json.loads((out / "results.json").read_text())
    new = [r for r in res["results"] if r["objective"] == "fairdd"]
    (kept,) = [r for r in res["results"] if r["objective"] == "vanilla"]
    assert kept["machine"]["cpu"] == "Old EPYC" and kept["note"] == "beside two jobs"
    assert new and all(r["machine"]["cpu"] == "New Xeon" and r["note"] == "alone" for r in new)
    md = (out / "results.md").read_text()
    line = [ln for ln in md.splitlines() if ln.startswith("Machine")][0]
    assert line.startswith("Machines: ") and "Old EPYC" in line and "beside two jobs (1 cell)" in line
    n = len(new)
    assert "New Xeon" in line and f"alone ({n} cell{'s' if n > 1 else ''})" in line
    # One machine for every cell: the one-line form.
    one = reproduce.markdown("cdigits", "tiny", new[:1], {"machine": {"cpu": "Y"}})
    assert "Machine: New Xeon, 2 cores, torch 2.14, 1 threads; alone." in one
    capsys.readouterr()
