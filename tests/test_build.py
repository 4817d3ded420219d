"""Build decisions (fastfair/_build.py, used by setup.py) and the check of the
torch version an extension was built against (fastfair/_extension.py).

Nothing is compiled here: the decisions are functions of the environment.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from fastfair import _build, _extension

H200, A100, RTX3090 = (9, 0), (8, 0), (8, 6)


@pytest.mark.parametrize("env, toolchain, gpus, build, arch", [
    # auto: CUDA only where it can run or was asked for.
    ({}, True, [], False, None),                                     # pip install . on a CPU machine
    ({}, True, [H200], True, "9.0"),                                 # the visible GPU only
    ({}, True, [RTX3090, A100, RTX3090], True, "8.0;8.6"),           # every visible architecture, once
    ({"TORCH_CUDA_ARCH_LIST": "8.6"}, True, [], True, "8.6"),         # an arch list is a request
    ({"TORCH_CUDA_ARCH_LIST": "8.0"}, True, [H200], True, "8.0"),     # ... and wins over the GPU
    ({}, False, [H200], False, None),                                # no nvcc / CPU torch
    ({"FASTFAIR_CUDA": "auto", "TORCH_CUDA_ARCH_LIST": "9.0"}, False, [], False, None),
    # 1: always CUDA; without GPU and arch list the portable list.
    ({"FASTFAIR_CUDA": "1"}, True, [], True, _build.PORTABLE_ARCH_LIST),
    ({"FASTFAIR_CUDA": "1"}, True, [A100], True, "8.0"),
    ({"FASTFAIR_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0"}, True, [], True, "9.0"),  # what CI does
    # 0: never.
    ({"FASTFAIR_CUDA": "0", "TORCH_CUDA_ARCH_LIST": "9.0"}, True, [H200], False, None),
    ({"FASTFAIR_CUDA": " AUTO "}, True, [H200], True, "9.0"),
])
def test_cuda_plan(env, toolchain, gpus, build, arch):
    plan = _build.cuda_plan(env, toolchain, gpus)
    assert (plan.build, plan.arch_list) == (build, arch), plan
    assert plan.reason


def test_portable_list_covers_ampere_to_hopper_with_ptx():
    archs = _build.PORTABLE_ARCH_LIST.split(";")
    assert [a.replace("+PTX", "") for a in archs] == ["8.0", "8.6", "8.9", "9.0"]
    assert archs[-1].endswith("+PTX") and sum("+PTX" in a for a in archs) == 1


@pytest.mark.parametrize("env, toolchain, match", [
    ({"FASTFAIR_CUDA": "1"}, False, "no CUDA toolchain"),
    ({"FASTFAIR_CUDA": "yes"}, True, "0, 1 or auto"),
])
def test_cuda_plan_errors(env, toolchain, match):
    with pytest.raises(ValueError, match=match):
        _build.cuda_plan(env, toolchain, [])


def test_release_builds_carry_no_debug_info():
    rel = _build.compile_flags({}, True, "2.14.1+cu130", ["-fopenmp"])
    cxx, nvcc = rel["extra_compile_args"]["cxx"], rel["extra_compile_args"]["nvcc"]
    assert "-g" not in cxx and cxx.index("-g0") >= 0 and "-lineinfo" not in nvcc and "-g" not in nvcc
    assert "-Wl,--strip-debug" in rel["extra_link_args"] and "-fopenmp" in rel["extra_link_args"]
    assert "-DFASTFAIR_TORCH_VERSION=2.14.1+cu130" in cxx and "-DFASTFAIR_WITH_CUDA" in nvcc
    dbg = _build.compile_flags({"FASTFAIR_DEBUG": "1"}, True, "2.14.1", [])
    assert "-g" in dbg["extra_compile_args"]["cxx"] and "-lineinfo" in dbg["extra_compile_args"]["nvcc"]
    assert "-Wl,--strip-debug" not in dbg["extra_link_args"]
    cpu = _build.compile_flags({}, False, "2.14.1", [], gnu_ld=False)
    assert set(cpu["extra_compile_args"]) == {"cxx"} and cpu["extra_link_args"] == []
    # A version string that could break the command line is not passed through.
    odd = _build.compile_flags({}, False, "2.1 ; rm -rf /", [])["extra_compile_args"]["cxx"]
    assert "-DFASTFAIR_TORCH_VERSION=unknown" in odd


def test_wheel_keeps_the_users_torch():
    # Any supported torch, whatever the build's: installing fastfair never replaces the user's torch.
    assert _build.torch_requirement("2.14.1+cu130") == _build.torch_requirement("2.13.0") == "torch>=2.13"


def test_version_check():
    _extension.check_versions("2.14.1+cu130", "2.14.1+cpu", "x.so")  # same release, other variant
    with pytest.raises(ImportError, match=r"built against torch 2\.13\.0.*2\.14\.1 is running.*no-build-isolation"):
        _extension.check_versions("2.13.0", "2.14.1", "x.so")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _extension.check_versions(None, "2.14.1", "x.so")
        _extension.check_versions("unknown", "2.14.1", "x.so")
    assert len(w) == 2 and all("records no torch version" in str(x.message) for x in w)


def _fresh(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def _recorded() -> str | None:
    import torch

    op = getattr(torch.ops.fastfair, "build_torch_version", None)
    return None if op is None else str(op())


def test_the_built_extension_records_the_running_torch():
    import torch

    from fastfair import ops

    if ops.backend() == "reference":
        pytest.skip("fastfair._C is not built")
    if _recorded() is None:
        pytest.skip("this fastfair._C predates the recorded torch version")
    assert _extension.public_version(_recorded()) == _extension.public_version(torch.__version__)


def test_mismatched_extension_warns_once_and_runs_on_the_reference_ops():
    # A fresh interpreter whose running torch claims another version: the
    # user's torch is kept, the package imports, says how to rebuild, and
    # computes the same numbers on the reference ops.
    from fastfair import ops

    if ops.backend() == "reference":
        pytest.skip("fastfair._C is not built")
    if _recorded() is None:
        pytest.skip("this fastfair._C predates the recorded torch version")
    r = _fresh("import torch; torch.__version__ = '1.0.0'\nimport fastfair.ops as o\n"
               "x = torch.arange(6.).view(3, 2)\nprint(o.backend(), o.segment_sum(x, torch.tensor([0, 1, 0]), 2)"
               ".tolist())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == "reference [[4.0, 6.0], [2.0, 3.0]]"
    warned = [ln for ln in r.stderr.splitlines() if "RuntimeWarning" in ln]
    assert len(warned) == 1 and "torch 1.0.0 is running" in warned[0] and "rebuild" in warned[0]


def test_extension_can_be_switched_off():
    r = _fresh("from fastfair import ops; print(ops.backend())", FASTFAIR_EXTENSION="0")
    assert r.returncode == 0 and r.stdout.strip() == "reference", r.stderr
