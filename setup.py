"""Build fastfair._C: the CPU kernels always, the CUDA kernels where they can
run or were asked for (fastfair/_build.py decides; tests/test_build.py checks).

Environment:
  FASTFAIR_CUDA=0|1|auto   (default auto) compile the CUDA kernels: auto does
                           where nvcc, a CUDA build of torch and a visible GPU
                           or a TORCH_CUDA_ARCH_LIST are present; 1 insists
  TORCH_CUDA_ARCH_LIST     the CUDA targets; unset: the visible GPU(s), else
                           (FASTFAIR_CUDA=1) "8.0;8.6;8.9;9.0+PTX"
  FASTFAIR_DEBUG=1         keep debug info (-g, nvcc -lineinfo) and symbols;
                           release builds are stripped
  CUDA_HOME                defaults to /usr/local/cuda where that exists
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # fastfair/_build.py, from this source tree (fastfair/__init__ imports nothing heavy)

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

from fastfair._build import compile_flags, cuda_plan, torch_requirement  # noqa: E402


def _sources(pattern: str) -> list[str]:
    return [os.path.relpath(p, HERE) for p in sorted(glob.glob(os.path.join(HERE, "csrc", pattern)))]


def _visible_gpus() -> list[tuple[int, int]]:
    try:
        if not torch.cuda.is_available():
            return []
        return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    except Exception:  # a broken driver is the same as no GPU for building
        return []


def extensions() -> list:
    toolchain = torch.version.cuda is not None and CUDA_HOME is not None
    try:
        plan = cuda_plan(os.environ, toolchain, _visible_gpus() if toolchain else [])
    except ValueError as exc:
        raise SystemExit(f"fastfair setup.py: {exc}") from None
    print(f"fastfair setup.py: {plan.reason}", file=sys.stderr)
    sources = _sources("*.cpp") + _sources(os.path.join("cpu", "*.cpp"))
    # at::parallel_for is inline in ATen's headers: without -fopenmp it compiles
    # to a serial loop. Linking -fopenmp shares torch's already-loaded libgomp.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    flags = compile_flags(os.environ, plan.build, torch.__version__, openmp, gnu_ld=sys.platform.startswith("linux"))
    if plan.build:
        os.environ["TORCH_CUDA_ARCH_LIST"] = plan.arch_list or ""
        return [CUDAExtension("fastfair._C", sources + _sources(os.path.join("cuda", "*.cu")),
                              py_limited_api=False, **flags)]
    return [CppExtension("fastfair._C", sources, **flags)]


setup(
    name="fastfair",
    packages=find_packages(include=["fastfair", "fastfair.*"]),
    package_data={"fastfair": ["py.typed"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    # Any supported torch: the user's is kept. _C serves the torch it was
    # compiled against; with another, fastfair/_extension.py falls back to the
    # reference ops and says how to rebuild. torchvision only fetches datasets
    # (--download): an extra. scikit-learn (the embedded digits, DBSCAN) and
    # matplotlib (the plots) stay: `pip install . && fastfair demo` needs them.
    install_requires=[torch_requirement(torch.__version__), "numpy", "scikit-learn", "tqdm", "matplotlib",
                      "pillow"],
)
