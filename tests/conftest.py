"""Shared pytest configuration and fixtures."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_collection_modifyitems(config, items):
    """The ``gpu`` marker skips cleanly where no CUDA/ROCm device exists."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA/ROCm GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def r3_hd16() -> Path:
    return FIXTURES / "llama_r3_hadamard_hd16"


@pytest.fixture(scope="session")
def r3_hd64() -> Path:
    return FIXTURES / "llama_r3_hadamard_hd64"



@contextlib.contextmanager
def compile_rotation(form: str):
    """The rotation's form under torch.compile (``"auto"``, ``"op"`` or ``"native"``) inside
    the block; the previous form and fresh dynamo caches afterwards."""
    import hf_hadamard_kq
    from hf_hadamard_kq.ops import native

    before = native.MODE
    torch._dynamo.reset()
    hf_hadamard_kq.set_compile_rotation(form)
    try:
        yield form
    finally:
        hf_hadamard_kq.set_compile_rotation(before)
        torch._dynamo.reset()


@pytest.fixture
def compile_form(request):
    """:func:`compile_rotation` for one test (``indirect`` parametrization)."""
    with compile_rotation(request.param) as form:
        yield form
