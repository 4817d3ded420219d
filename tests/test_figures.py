"""Every PNG of fastfair goes through one save (fastfair.figures.save_png),
every benchmark JSON through atomic_write:
a full disk mid-write is one OutputError naming the file, the previous PNG
stays whole, no temporary file is left, and the figure is closed."""
from __future__ import annotations

import errno

import pytest
from matplotlib.figure import Figure

from fastfair import figures
from fastfair.bench import step_report, timing
from fastfair.distill import outdir

ROWS = [{"impl": "a", "groups": 1, "ms": 1.0}, {"impl": "a", "groups": 10, "ms": 2.0},
        {"impl": "b", "groups": 1, "ms": 3.0}, {"impl": "b", "groups": 10, "ms": 9.0}]


def _disk_full_while_saving(monkeypatch) -> None:  # noqa: ANN001
    real = Figure.savefig

    def savefig(self, f, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        real(self, f, *a, **k)  # half of it reaches the temporary file, as on a real disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", savefig)


def test_save_png_writes_a_png_and_closes_the_figure(tmp_path) -> None:
    plt = figures.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = tmp_path / "sub" / "a.png"
    assert figures.save_png(fig, str(path)) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.number not in plt.get_fignums()


@pytest.mark.parametrize("writer", ["loglog_plot", "step_plot"])
def test_a_benchmark_plot_on_a_full_disk_keeps_the_previous_png(tmp_path, monkeypatch, writer) -> None:
    # Before save_png the benchmark plots wrote in place: a full disk left half a PNG.
    path = tmp_path / "plot.png"
    path.write_bytes(b"previous")
    plt = figures.pyplot()
    open_before = set(plt.get_fignums())
    _disk_full_while_saving(monkeypatch)
    with pytest.raises(outdir.OutputError, match=r"cannot write .*plot\.png: No space left on device "
                                                 r"\(the previous file is kept\)"):
        if writer == "loglog_plot":
            timing.loglog_plot(ROWS, "groups", "ms", "impl", "t", str(path))
        else:
            rows = [{**r, "dataset": "d", "method": "dm", "objective": "a", "peak_mb": 1.0} for r in ROWS]
            step_report.plot(rows, "d", "dm", "t", str(path))
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
    assert set(plt.get_fignums()) == open_before


def test_benchmark_json_on_a_full_disk_keeps_the_previous_results(tmp_path, monkeypatch) -> None:
    # It wrote PATH.tmp and renamed: a failed write left the .tmp behind.
    path = tmp_path / "bench.json"
    timing.write_json(str(path), {"v": 1})
    real_open = open

    class FullFile:
        def __init__(self, f) -> None:  # noqa: ANN001
            self.f = f

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(self.f, name)

        def __enter__(self):  # noqa: ANN204
            return self

        def __exit__(self, *exc) -> None:  # noqa: ANN002
            self.f.close()

        def write(self, data) -> int:  # noqa: ANN001
            raise OSError(errno.ENOSPC, "No space left on device")

    import os

    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: FullFile(real_open(fd, mode, *a, **k)))
    with pytest.raises(outdir.OutputError, match=r"cannot write .*bench\.json: No space left on device"):
        timing.write_json(str(path), {"v": 2})
    monkeypatch.undo()
    assert path.read_text() == '{\n "v": 1\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]
