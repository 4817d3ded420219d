"""The docs live in the repository (issue 26): the README is a front page
(under 300 lines), every relative link in it and in docs/ resolves to a file
of the repository, nothing cites a file that is not here, and the README's
Python examples run."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def test_readme_is_a_front_page() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) < 300


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    text = doc.read_text()
    bad = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        if not (doc.parent / target).exists():
            bad.append(target)
    assert not bad, f"{doc.name} links to missing files: {bad}"


def test_no_reference_to_files_outside_the_repository() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    hits = []
    for name in tracked.stdout.split():
        if name.endswith((".py", ".md", ".sh", ".toml", ".cpp", ".cu", ".h")) and name != "tests/test_docs.py":
            text = (ROOT / name).read_text(errors="replace")
            hits += [f"{name}: {m}" for m in ("DESIGN.md", "REFERENCE.md") if m in text]
    assert not hits, hits


def test_the_readmes_python_examples_run(tmp_path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks
    for code in blocks:
        script = tmp_path / "example.py"
        script.write_text(code)
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]


def test_readme_results_tables_are_the_committed_results() -> None:
    # The README's per-dataset tables are generated from benchmarks/results/*/results.json;
    # a cell committed without re-running benchmarks/readme_results.py leaves them stale.
    from fastfair import results_summary

    readme = (ROOT / "README.md").read_text()
    assert results_summary.rewrite(readme, str(ROOT)) == readme, (
        "README results tables differ from the results.json files: run python benchmarks/readme_results.py")
    assert "| DM | " in readme.split(results_summary.BEGIN)[1]


def test_results_tables_show_missing_cells_and_refuse_a_readme_without_markers(tmp_path) -> None:
    from fastfair import results_summary

    rec = {"dataset": "cmnist-fg", "ipc": 10, "method": "dm", "objective": "fairdd", "acc": 90.5, "deo_m": 23.12,
           "deo_m_std": 7.37, "deo_a": 10.03}
    md = results_summary.dataset_table("fairdd-cmnist", "cmnist-fg", [rec])
    dm = next(ln for ln in md.splitlines() if ln.startswith("| DM |"))
    assert dm.split(" | ")[3:5] == ["90.50 / 23.12 +- 7.4 / 10.03", "94.61 / 17.04 / 7.95"]
    assert "not run yet" in dm  # DM vanilla and DM+COBRA
    # A larger budget's cells add a row named by the budget, for the methods it ran only.
    longer = {**rec, "acc": 92.0, "deo_m": 18.0}
    md = results_summary.dataset_table("fairdd-cmnist", "cmnist-fg", [rec], (("cpu-long", [longer]),))
    rows = [ln for ln in md.splitlines() if ln.startswith("| DM")]
    assert [r.split(" | ")[0] for r in rows] == ["| DM", "| DM, `cpu-long`"]
    assert rows[1].split(" | ")[3] == "92.00 / 18.00 +- 7.4 / 10.03"
    assert not any(ln.startswith("| DC, ") for ln in md.splitlines())
    with pytest.raises(ValueError, match="no"):
        results_summary.rewrite("# no markers\n", str(tmp_path))
