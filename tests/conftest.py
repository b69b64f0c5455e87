"""Shared pytest configuration and fixtures."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist every core already runs a worker; inductor's default pool of compile
    # subprocesses (one per core, each importing torch) then only competes with the other
    # workers. In-process compilation measured faster on the 2-core development machine:
    # the oldest-stack suite from a cold cache in 340 s against 378 s (one run each).
    import torch._inductor.config as _inductor_config

    _inductor_config.compile_threads = 1


#: The test files that take longest on the CPU CI machine (cold caches: ~250, ~200, ~140 and
#: ~120 s of one worker's time in `make test`), longest first. They run before every other
#: file, so that with pytest-xdist's ``--dist loadfile --no-loadscope-reorder`` (Makefile) they
#: start at once on separate workers and the short files fill in around them. xdist's default
#: order (files with most tests first) hands out test_triton_interpret.py, ~200 s in three
#: tests, last of all, so that it ran at the end while the other worker had nothing left.
LONGEST_FIRST = (
    "test_native_compile.py",
    "test_triton_interpret.py",
    "test_traced.py",
    "test_backends_caches.py",
)


def pytest_addoption(parser):
    parser.addoption(
        "--compile-archs", choices=("all", "representative"), default="all",
        help="architectures of the torch.compile sweeps (tests taking a compile_arch "
             "argument): every architecture of tests/tiny_models.ARCHS (default), or "
             "tiny_models.COMPILE_REPRESENTATIVES (the oldest-stack CI run, where every "
             "architecture still runs eagerly)")


def pytest_generate_tests(metafunc):
    """``compile_arch``: the architectures named by ``--compile-archs``."""
    if "compile_arch" in metafunc.fixturenames:
        from tests import tiny_models as tm

        which = metafunc.config.getoption("--compile-archs")
        names = list(tm.ARCHS) if which == "all" else list(tm.COMPILE_REPRESENTATIVES)
        metafunc.parametrize("compile_arch", names)


def pytest_collection_modifyitems(config, items):
    """Run the longest test files first (:data:`LONGEST_FIRST`; the order within each file and
    of the other files is kept). The ``gpu`` marker skips cleanly where no CUDA/ROCm device
    exists."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
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
