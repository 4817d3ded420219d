"""Loading the compiled extension ``fastfair._C``, and refusing one that was
built against another torch.

A C++ extension is bound to the torch it was compiled with: against another
version it fails to load (undefined symbols) or, worse, loads and misbehaves.
``csrc/ops.cpp`` records the version (setup.py passes ``torch.__version__``)
as the op ``fastfair::build_torch_version``; :func:`load` compares it with the
running torch. Three outcomes:

- no ``_C`` in the package (a source checkout without a build, or
  ``FASTFAIR_EXTENSION=0``): the pure-PyTorch reference ops, with the warning
  of ``fastfair.ops`` at first use;
- a ``_C`` that cannot be loaded or was built for another torch (a user
  who keeps their own torch and installed a wheel built for another one):
  the package still imports and runs on the reference ops, and says once, at
  import, which torch the extension was built for and how to rebuild it (never
  a silent fallback: the reference ops are orders of magnitude slower);
- otherwise the compiled kernels.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

DISABLE_ENV = "FASTFAIR_EXTENSION"
REBUILD = ("rebuild it against the running torch: `pip install --no-build-isolation --force-reinstall --no-deps .` "
           "in the fastfair source tree (or `python setup.py build_ext --inplace` in a checkout); set "
           f"{DISABLE_ENV}=0 to use the slow pure-PyTorch reference ops instead")


def public_version(version: str) -> str:
    """``2.14.1+cu130`` -> ``2.14.1``: the local tag names the build variant
    (CUDA or CPU), which decides whether the library loads, not its ABI."""
    return version.split("+", 1)[0]


def check_versions(built: str | None, running: str, where: str) -> None:
    """Raise ImportError when the extension at ``where`` was built for another torch."""
    if built is None or built == "unknown":
        # Built before the version was recorded (or without setup.py): cannot tell, so say so.
        warnings.warn(f"fastfair: the extension {where} records no torch version (built by an older "
                      f"fastfair); if it misbehaves, {REBUILD}", RuntimeWarning, stacklevel=3)
        return
    if public_version(built) != public_version(running):
        raise ImportError(f"fastfair: the compiled extension {where} was built against torch {built}, but torch "
                          f"{running} is running; {REBUILD}")


def load(package: str = "fastfair") -> tuple[bool, str | None]:
    """(loaded, why not) for ``package._C``: a mismatched or unloadable
    extension is (False, the reason), said once as a RuntimeWarning."""
    try:
        return _load(package)
    except ImportError as exc:
        warnings.warn(f"{exc}; running on the pure-PyTorch reference ops until then", RuntimeWarning,
                      stacklevel=3)
        return False, str(exc)


def _load(package: str) -> tuple[bool, str | None]:
    import torch

    name = f"{package}._C"
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False, f"{DISABLE_ENV}=0"
    spec = importlib.util.find_spec(name)
    if spec is None:
        return False, f"{name} is not built"
    where = spec.origin or name
    try:
        importlib.import_module(name)  # loading the library registers the ops
    except (ImportError, OSError) as exc:
        raise ImportError(f"fastfair: the compiled extension {where} cannot be loaded with torch "
                          f"{torch.__version__} ({exc}); it was probably built against another torch; "
                          f"{REBUILD}") from None
    op = getattr(torch.ops.fastfair, "build_torch_version", None)
    built = None
    if op is not None:
        try:
            built = str(op())
        except RuntimeError:  # pragma: no cover - a registration without a kernel
            built = None
    check_versions(built, torch.__version__, where)
    return True, None
