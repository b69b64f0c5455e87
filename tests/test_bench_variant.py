"""benchmarks/bench_op_variant.py: an A/B of tiling tables must really switch what the kernel
launches (a variant that silently kept the current tables would make the A/B compare a
configuration with itself)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_op_variant  # noqa: E402

from hf_hadamard_kq.ops import triton_kernel as tk  # noqa: E402


@pytest.fixture
def restore_tables(monkeypatch):
    monkeypatch.setattr(tk, "TUNED_16BIT", dict(tk.TUNED_16BIT))
    monkeypatch.setattr(tk, "TUNED_16BIT_MEDIUM", dict(tk.TUNED_16BIT_MEDIUM))
    tk.rows_config.cache_clear()
    yield
    tk.rows_config.cache_clear()
    tk.clear_plans()


def _plan(rows: int, d: int):
    """The row-kernel launch plan of a contiguous bf16 ``(rows, d)`` call."""
    x = torch.empty(rows, d, dtype=torch.bfloat16)
    return tk._rows_plan(x, x, x.dtype, d, True, False, None)


@pytest.mark.usefixtures("restore_tables")
def test_session11_variant_launches_the_old_tilings():
    new_128 = _plan(32768, 128)  # 4096 tokens x 8 heads: the large class
    bench_op_variant.apply("session11")
    old_128 = _plan(32768, 128)
    assert (new_128.num_warps, new_128.num_stages) != (old_128.num_warps, old_128.num_stages)
    assert (old_128.meta["BN"], old_128.meta["BLOCK_M"], old_128.num_warps,
            old_128.num_stages) == (64, 64, 4, 3)
    # d = 64 prefill was on a persistent grid (4 programs per SM; 4 interpreter programs here)
    old_64 = _plan(32768, 64)
    assert old_64.grid < 32768 // 64 and not old_64.meta["LOADS_FIRST"]


@pytest.mark.usefixtures("restore_tables")
def test_nomedium_variant_drops_the_medium_class():
    medium = _plan(32768, 256)
    assert medium.meta["BLOCK_M"] == tk.TUNED_16BIT_MEDIUM[256][1]
    bench_op_variant.apply("nomedium")
    plain = _plan(32768, 256)
    assert plain.meta["BLOCK_M"] == tk.TUNED_16BIT[(256, False)][1] != medium.meta["BLOCK_M"]


def test_unknown_variant_is_refused():
    with pytest.raises(SystemExit, match="unknown variant"):
        bench_op_variant.apply("sesion11")
