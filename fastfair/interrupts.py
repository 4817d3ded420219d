"""Hold Ctrl-C and SIGTERM while an output is being drawn or written.

Python runs a signal handler between bytecodes, which includes the moments a
C++ extension calls back into the interpreter. A KeyboardInterrupt raised
there (matplotlib's pybind11 ``affine_transform`` while a figure is laid out,
seen in CI) is turned by the binding layer into an unrelated exception
(``TypeError``) and a traceback, instead of the clean "interrupted" exit 130
the CLI promises. Inside :func:`deferred_interrupts` the two signals are only
recorded; once the block has finished the first one is raised again, so the
handler that was in place does what it always does (the CLI's: exit 130;
Python's default SIGINT: KeyboardInterrupt; a default SIGTERM: the process
ends), at a point where nothing half-done is left behind.

Torch-free and matplotlib-free, so any module may use it.
"""
from __future__ import annotations

import contextlib
import functools
import signal
import threading
from typing import Any, Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_HELD = (signal.SIGINT, signal.SIGTERM)
_state = threading.local()


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Run the block with SIGINT / SIGTERM recorded instead of handled;
    after it, raise the first one that arrived again for the handler that was
    in place. A no-op off the main thread (Python handles signals there
    only), inside an enclosing block (the outermost one re-raises) and where
    a handler was installed outside Python (it cannot be put back). An
    exception of the block itself wins: it propagates and the recorded
    signal is dropped with the block's work."""
    if (threading.current_thread() is not threading.main_thread() or getattr(_state, "active", False)
            or any(signal.getsignal(s) is None for s in _HELD)):
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: object) -> None:
        pending.append(signum)

    old = {s: signal.signal(s, hold) for s in _HELD}
    _state.active = True
    try:
        yield
    finally:
        _state.active = False
        for s, handler in old.items():
            signal.signal(s, handler)
    if pending:
        signal.raise_signal(pending[0])


def holds_interrupts(fn: F) -> F:
    """Decorator form of :func:`deferred_interrupts` for a function that
    draws or writes one output."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with deferred_interrupts():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
