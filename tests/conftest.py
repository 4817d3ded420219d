from __future__ import annotations

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def one_thread():
    # Tiny tensors: one thread is as fast, and it keeps these tests from
    # stalling on OpenMP barriers when other jobs share the two cores here
    # (gradcheck's thousands of small grouped convolutions took 100x longer).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
