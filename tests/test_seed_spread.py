"""fastfair spread: reproduce cells matched across distillation seeds."""
from __future__ import annotations

import json
import math
import shutil

import pytest

from fastfair import seed_spread
from fastfair.cli import main

ARGS = ["reproduce", "--table", "cdigits", "--budget", "tiny", "--datasets", "cdigits-fg", "--cells",
        "dm:fairdd,dc:vanilla", "--threads", "1"]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    dirs = []
    for seed in (0, 1):
        out = root / f"s{seed}"
        assert main([*ARGS, "--seed", str(seed), "--out", str(out)]) == 0
        dirs.append(out)
    return dirs


def _cells(path) -> list[dict]:
    return json.loads((path / "results.json").read_text())["results"]


def test_cells_are_matched_across_seeds_and_summarised(two_seeds, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "spread"
    assert main(["spread", *map(str, two_seeds), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    s = json.loads((out / "spread.json").read_text())
    assert (out / "spread.png").stat().st_size > 0 and "| cdigits-fg | dm+fairdd | 2 |" in printed
    by_seed = [{(r["method"], r["objective"]): r for r in _cells(d)} for d in two_seeds]
    assert len(s["cells"]) == 2
    for c in s["cells"]:
        key = (c["method"], c["objective"])
        vals = [by_seed[0][key]["deo_m"], by_seed[1][key]["deo_m"]]
        assert c["seeds"] == [0, 1]
        assert c["deo_m"] == pytest.approx(sum(vals) / 2)
        assert c["deo_m_seed_std"] == pytest.approx(abs(vals[0] - vals[1]) / 2)  # population std of two
        within = [by_seed[0][key]["deo_m_std"], by_seed[1][key]["deo_m_std"]]
        assert c["deo_m_eval_std"] == pytest.approx(sum(within) / 2)
        assert [p["acc"] for p in c["per_seed"]] == [by_seed[0][key]["acc"], by_seed[1][key]["acc"]]
        assert "seed" not in c["settings"]["distill"] and "seed" not in c["settings"]["eval"]
    # The two seeds are different sets: a spread that is identically 0 would mean the seed did nothing.
    assert any(c["acc_seed_std"] > 0 or c["deo_m_seed_std"] > 0 for c in s["cells"])
    assert not math.isnan(s["cells"][0]["acc"])


def test_the_same_seed_twice_is_refused(two_seeds, capsys):
    capsys.readouterr()
    assert main(["spread", str(two_seeds[0]), str(two_seeds[0])]) == 2
    err = capsys.readouterr().err
    assert "seed 0 appears twice" in err and len(err.strip().splitlines()) == 1


def test_cells_with_other_settings_are_refused_by_name(two_seeds, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(two_seeds[1], other)
    payload = json.loads((other / "results.json").read_text())
    payload["results"][0]["settings"]["distill"]["iterations"] += 1
    (other / "results.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=r"different settings beyond the seed \(distill.iterations: \d+ vs \d+\)"):
        seed_spread.spread([str(two_seeds[0]), str(other)])


def test_records_from_before_the_recorded_dsa_still_match(two_seeds, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(two_seeds[1], old)
    payload = json.loads((old / "results.json").read_text())
    for r in payload["results"]:
        del r["settings"]["eval"]["dsa"]
    (old / "results.json").write_text(json.dumps(payload))
    s = seed_spread.spread([str(two_seeds[0]), str(old)])
    assert [c["seeds"] for c in s["cells"]] == [[0, 1], [0, 1]]


def test_bad_directories_are_one_line_errors(two_seeds, tmp_path, capsys):
    capsys.readouterr()
    assert main(["spread", str(two_seeds[0]), str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("{not json")
    assert main(["spread", str(two_seeds[0]), str(tmp_path)]) == 2
    assert "is not JSON" in capsys.readouterr().err
    assert main(["spread", str(two_seeds[0])]) == 2
    assert "at least two" in capsys.readouterr().err


def test_a_cell_of_one_seed_has_no_seed_spread(two_seeds, tmp_path):
    extra = tmp_path / "extra"
    shutil.copytree(two_seeds[1], extra)
    payload = json.loads((extra / "results.json").read_text())
    payload["results"] = payload["results"][:1]  # seed 1 ran only the first cell
    (extra / "results.json").write_text(json.dumps(payload))
    s = seed_spread.spread([str(two_seeds[0]), str(extra)])
    one = [c for c in s["cells"] if c["seeds"] == [0]]
    assert len(one) == 1 and one[0]["deo_m_seed_std"] is None and one[0]["acc_seed_std"] is None
    assert "| 1 |" in seed_spread.markdown(s)


def test_a_cell_without_a_seed_is_a_clear_error(two_seeds, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(two_seeds[1], broken)
    payload = json.loads((broken / "results.json").read_text())
    del payload["results"][0]["settings"]["distill"]["seed"]
    (broken / "results.json").write_text(json.dumps(payload))
    capsys.readouterr()
    assert main(["spread", str(two_seeds[0]), str(broken)]) == 2
    assert "carry no distillation seed" in capsys.readouterr().err
