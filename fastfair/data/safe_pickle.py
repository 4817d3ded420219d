"""Reading the CIFAR batch pickles without running code from them.

``pickle.load`` calls whatever callable a file names, so a crafted
``data_batch_1`` under ``--root`` could run arbitrary code. The CIFAR batches
hold only dicts, lists, str / bytes, ints and uint8 numpy arrays; this
unpickler resolves just the few globals numpy needs to rebuild such arrays
(in Python 2's layout, which the published files use, and in Python 3's
protocols 2-5, which tests and re-saved copies use) and refuses every other
global with an error naming the file.
"""
from __future__ import annotations

import codecs
import io
import pickle
from typing import Any, Callable

import numpy as np


class UnsafePickleError(ValueError):
    """The file names a global outside the CIFAR allow-list (or is no pickle)."""


def _plain_dtype(*args: Any) -> np.dtype:
    dt = np.dtype(*args)
    if dt.hasobject:  # object arrays would unpickle their elements as Python objects
        raise UnsafePickleError(f"object dtype {dt} is not allowed")
    return dt


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"array subtype {subtype!r} is not allowed")
    return np.ndarray.__new__(np.ndarray, shape, _plain_dtype(dtype))


def _scalar(dtype: Any, *data: Any) -> Any:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    return core.multiarray.scalar(_plain_dtype(dtype), *data)


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    arr = np.frombuffer(buf, dtype=_plain_dtype(dtype))
    return arr.reshape(shape, order=order if order in ("C", "F") else "C")


def _encode(text: str, encoding: str = "utf-8") -> bytes:
    # Protocol 2 writes bytes as _codecs.encode(text, 'latin1').
    if not isinstance(text, str) or codecs.lookup(encoding).name not in ("latin-1", "iso8859-1", "utf-8"):
        raise UnsafePickleError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode(encoding)


_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    **{(mod, "_reconstruct"): _reconstruct for mod in _NUMPY_CORE},
    **{(mod, "scalar"): _scalar for mod in _NUMPY_CORE},
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,  # only ever passed to _reconstruct above
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _encode,
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refers to {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("uses persistent ids")


def load_batch(path: str) -> Any:
    """The object pickled in ``path`` (a CIFAR batch or batches.meta), built
    from the allow-listed types only. Raises ValueError naming the file for a
    global outside the list and for a file that is not a pickle at all."""
    with open(path, "rb") as f:
        blob = f.read()
    try:
        return _CifarUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except UnsafePickleError as exc:
        raise ValueError(f"{path}: refusing to unpickle: {exc} (a CIFAR batch holds only dicts, lists, "
                         "strings, ints and uint8 arrays)") from None
    except Exception as exc:  # truncated or garbage: pickle raises many types
        raise ValueError(f"{path}: not a CIFAR batch pickle ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:120]})") from None
