"""Build decisions of setup.py, as functions of the environment, so that a
unit test can check them without compiling anything (tests/test_build.py).

Not imported at run time. No torch import here: setup.py asks torch for the
facts (toolchain, visible GPUs) and passes them in.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Runs on A100 (sm_80), RTX 30xx / A40 (sm_86, the FairDD paper's RTX 3090),
# RTX 40xx / L40 (sm_89) and H100 / H200 (sm_90) from SASS, and on newer GPUs
# through the sm_90 PTX, which their driver compiles at first launch.
PORTABLE_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"
CUDA_MODES = ("0", "1", "auto")


@dataclass(frozen=True)
class CudaPlan:
    build: bool            # compile csrc/cuda/*.cu
    arch_list: str | None  # the TORCH_CUDA_ARCH_LIST to build with (None: no CUDA)
    reason: str            # one line for the build log


def cuda_plan(env: Mapping[str, str], toolchain: bool, gpu_capabilities: Sequence[tuple[int, int]]) -> CudaPlan:
    """Whether to compile the CUDA kernels, and for which architectures.

    env: FASTFAIR_CUDA (0 | 1 | auto, default auto) and TORCH_CUDA_ARCH_LIST.
    toolchain: nvcc and a CUDA build of torch are present.
    gpu_capabilities: (major, minor) of each visible GPU (empty: none).

    auto compiles CUDA only where it can run or was asked for: a GPU is
    visible, or TORCH_CUDA_ARCH_LIST names the targets; so `pip install .` on
    a CPU machine builds the CPU kernels only. An explicit arch list always
    wins; otherwise the visible GPUs' architectures, else the portable list.
    """
    mode = env.get("FASTFAIR_CUDA", "auto").strip().lower() or "auto"
    if mode not in CUDA_MODES:
        raise ValueError(f"FASTFAIR_CUDA must be 0, 1 or auto, got {env.get('FASTFAIR_CUDA')!r}")
    arch_env = env.get("TORCH_CUDA_ARCH_LIST", "").strip()
    visible = ";".join(sorted({f"{a}.{b}" for a, b in gpu_capabilities}, key=lambda v: tuple(map(int, v.split(".")))))
    if mode == "0":
        return CudaPlan(False, None, "FASTFAIR_CUDA=0: CPU kernels only")
    if not toolchain:
        if mode == "1":
            raise ValueError("FASTFAIR_CUDA=1 but no CUDA toolchain was found (need nvcc under CUDA_HOME and a "
                             "CUDA build of torch)")
        return CudaPlan(False, None, "no CUDA toolchain (nvcc and a CUDA build of torch): CPU kernels only")
    if arch_env:
        return CudaPlan(True, arch_env, f"CUDA kernels for TORCH_CUDA_ARCH_LIST={arch_env}")
    if visible:
        return CudaPlan(True, visible, f"CUDA kernels for the visible GPU(s): {visible}")
    if mode == "1":
        return CudaPlan(True, PORTABLE_ARCH_LIST, f"FASTFAIR_CUDA=1, no GPU visible: CUDA kernels for "
                                                  f"{PORTABLE_ARCH_LIST}")
    return CudaPlan(False, None, "no GPU visible and no TORCH_CUDA_ARCH_LIST: CPU kernels only (set "
                                 "FASTFAIR_CUDA=1 or TORCH_CUDA_ARCH_LIST to compile the CUDA kernels)")


def debug_build(env: Mapping[str, str]) -> bool:
    return env.get("FASTFAIR_DEBUG", "0").strip().lower() in ("1", "true", "yes", "on")


def compile_flags(env: Mapping[str, str], cuda: bool, torch_version: str, openmp: Sequence[str],
                  gnu_ld: bool = True) -> dict:
    """extra_compile_args and extra_link_args of the extension.

    Release builds carry no debug info (-g0 after whatever -g Python's own
    CFLAGS add, no -lineinfo) and are stripped at link time; FASTFAIR_DEBUG=1
    keeps -g / -lineinfo and the symbols. The torch version is compiled in
    (csrc/ops.cpp: fastfair::build_torch_version) so that a mismatch is caught
    at import.
    """
    debug = debug_build(env)
    safe = torch_version if re.fullmatch(r"[A-Za-z0-9.+_]+", torch_version) else "unknown"
    cxx = ["-O3", "-fdiagnostics-color=always", f"-DFASTFAIR_TORCH_VERSION={safe}", *openmp]
    cxx += ["-g"] if debug else ["-g0"]
    nvcc = ["-O3"] + (["-lineinfo", "-g"] if debug else [])
    if cuda:
        cxx.append("-DFASTFAIR_WITH_CUDA")
        nvcc.append("-DFASTFAIR_WITH_CUDA")
    link = [*openmp] + ([] if debug or not gnu_ld else ["-Wl,--strip-debug"])
    args: dict = {"extra_compile_args": {"cxx": cxx, "nvcc": nvcc} if cuda else {"cxx": cxx},
                  "extra_link_args": link}
    return args


# The oldest torch fastfair supports (tested in CI: 2.13.0 and 2.14.1).
MIN_TORCH = "2.13"


def torch_requirement(torch_version: str) -> str:
    """The torch a built wheel asks for: any supported one, so that installing
    fastfair keeps the user's torch. Its compiled extension serves the torch
    it was built against (``torch_version``) and, with any other, the package
    runs on the reference ops and says how to rebuild (fastfair/_extension.py)."""
    return f"torch>={MIN_TORCH}"
