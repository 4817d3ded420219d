"""Build fastfair._C: a CppExtension, or a CUDAExtension when nvcc and a CUDA
build of torch are present.

Environment:
  FASTFAIR_CUDA=0|1|auto   (default auto) compile the CUDA kernels
  CUDA_HOME                defaults to /usr/local/cuda where that exists
  TORCH_CUDA_ARCH_LIST     defaults to "9.0" (Hopper) when unset
  MAX_JOBS                 parallel compile jobs (ninja)
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    # torch.utils.cpp_extension reads CUDA_HOME at import time.
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    mode = os.environ.get("FASTFAIR_CUDA", "auto").lower()
    if mode not in {"0", "1", "auto"}:
        raise SystemExit(f"FASTFAIR_CUDA must be 0, 1 or auto, got {mode!r}")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if mode == "1" and not available:
        raise SystemExit(
            "FASTFAIR_CUDA=1 but no CUDA toolchain was found "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
        )
    return mode == "1" or (mode == "auto" and available)


def extensions():
    sources = [os.path.relpath(p, HERE) for p in sorted(glob.glob(os.path.join(HERE, "csrc", "*.cpp")))]
    sources += [os.path.relpath(p, HERE) for p in sorted(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))]
    # at::parallel_for is inline in ATen's headers: without -fopenmp it compiles
    # to a serial loop. Linking -fopenmp shares torch's already-loaded libgomp.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", "-fdiagnostics-color=always"] + openmp
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += [os.path.relpath(p, HERE) for p in sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))]
        return [
            CUDAExtension(
                "fastfair._C",
                sources,
                extra_compile_args={
                    "cxx": cxx + ["-DFASTFAIR_WITH_CUDA"],
                    "nvcc": ["-O3", "-lineinfo",
                             "-DFASTFAIR_WITH_CUDA"],
                },
                extra_link_args=openmp,
                py_limited_api=False,
            )
        ]
    return [CppExtension("fastfair._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=openmp)]


setup(
    name="fastfair",
    packages=find_packages(include=["fastfair", "fastfair.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
