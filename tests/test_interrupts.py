"""Ctrl-C / SIGTERM while an output is drawn: the output is finished first,
then the interrupt arrives as the handler in place would deliver it."""
from __future__ import annotations

import os
import signal

import pytest

from fastfair import cli
from fastfair.interrupts import deferred_interrupts


@pytest.fixture(autouse=True)
def _sigint_raises():
    """Python's own SIGINT handler for each test: a job started in the
    background (CI under nohup) inherits SIGINT ignored."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def _send(sig: int) -> None:
    os.kill(os.getpid(), sig)


def test_an_ignored_signal_stays_ignored():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    done = []
    with deferred_interrupts():
        _send(signal.SIGINT)
        done.append(True)
    assert done == [True] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_sigterm_under_the_cli_handler_arrives_after_the_block() -> None:
    old = signal.signal(signal.SIGTERM, cli._terminate)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt, match="signal 15"):
            with deferred_interrupts():
                _send(signal.SIGTERM)
                for _ in range(1000):  # bytecodes where Python would have run the handler
                    pass
                done.append(True)
        assert done == [True]
        assert signal.getsignal(signal.SIGTERM) is cli._terminate
    finally:
        signal.signal(signal.SIGTERM, old)


def test_default_sigint_is_keyboard_interrupt_after_the_block() -> None:
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            _send(signal.SIGINT)
            done.append(True)
    assert done == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_exception_of_the_block_wins_and_the_handlers_come_back() -> None:
    with pytest.raises(ValueError, match="bad"):
        with deferred_interrupts():
            _send(signal.SIGINT)
            raise ValueError("bad")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nested_blocks_raise_once_at_the_outermost() -> None:
    seen = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            with deferred_interrupts():
                _send(signal.SIGINT)
            seen.append("after inner")
    assert seen == ["after inner"]


def test_no_signal_no_interrupt() -> None:
    with deferred_interrupts():
        x = 1
    assert x == 1 and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_heatmap_interrupted_while_saving_is_written_whole(tmp_path, monkeypatch) -> None:
    """The CI failure: an interrupt landed inside matplotlib. Now the PNG is
    finished and only then does the KeyboardInterrupt arrive."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from fastfair.heatmap import cell_heatmap

    real = Figure.savefig

    def savefig_interrupted(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        _send(signal.SIGINT)
        return real(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", savefig_interrupted)
    path = tmp_path / "cells.png"
    with pytest.raises(KeyboardInterrupt):
        cell_heatmap([[90.0, 50.0], [None, 70.0]], str(path), title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cells.png"]
