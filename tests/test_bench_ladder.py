"""benchmarks/gluon_decode.py (the kernels of decode_ladder.py): each rung must compile for an
H100 (sm_90) to the memory path its name claims -- a rung that silently went through shared
memory (or did not) would time something other than what BENCHMARKS.md says it isolates."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.experimental.gluon", reason="this triton has no Gluon")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gluon_decode as g  # noqa: E402

from tests.aot import compile_sm90  # noqa: E402


def _compile(fn, const: dict, warps: int):
    """``fn`` compiled ahead of time for sm_90 (bf16 pointers, 16-byte aligned)."""
    return compile_sm90(fn, {"x_ptr": "*bf16", "out_ptr": "*bf16", "scale": "fp32"}, const,
                        warps, aligned_ptrs=True)


def _count(ptx: str, pattern: str) -> int:
    return len(re.findall(pattern, ptx))


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("d,bn,wm,wn", [(128, 64, 1, 4), (128, 32, 1, 1), (64, 32, 1, 2),
                                        (256, 64, 1, 2)])
def test_rotation_rungs_take_their_memory_paths(d: int, bn: int, wm: int, wn: int) -> None:
    """``l1s1``: no shared memory at all, 4-byte global accesses; ``l0s0``: 16-byte global
    accesses through shared memory; in every form the matrix is generated in registers (no
    per-element shared-memory stores) and multiplied on tensor cores (``mma.sync``), one
    instruction per 16 x 8 x 16 block of the ``d / bn`` products."""
    n_mma = (d // bn) * (16 * wm // 16) * (bn // 8) * (bn // 16) // (wm * wn)
    for lf, sf in ((True, True), (False, False), (True, False), (False, True)):
        const = dict(D=d, BN=bn, WM=wm, WN=wn, TRANSPOSED=True, LOAD_FRAG=lf, STORE_FRAG=sf)
        k = _compile(g.decode_rows, const, wm * wn)
        ptx = k.asm["ptx"]
        assert _count(ptx, r"mma\.sync") == n_mma, (const, _count(ptx, r"mma\.sync"))
        assert _count(ptx, r"st\.shared\.b16") == 0, const
        loads = re.findall(r"ld\.global[.\w]*", ptx)
        stores = re.findall(r"st\.global[.\w]*", ptx)
        assert loads and stores
        assert all(a == ("ld.global.b32" if lf else "ld.global.v4.b32") for a in loads), loads
        assert all(a == ("st.global.b32" if sf else "st.global.v4.b32") for a in stores), stores
        if lf and sf:
            assert k.metadata.shared == 0 and "bar.sync" not in ptx, const
        else:
            assert k.metadata.shared > 0, const


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_copy_rungs_take_their_memory_paths() -> None:
    """The copy rungs: 16-byte in and out without shared memory (``l0s0``), and each
    fragment-layout side as 4-byte accesses with a conversion through shared memory."""
    for lf, sf in ((False, False), (True, False), (False, True), (True, True)):
        k = _compile(g.copy_tile, dict(D=128, WN=4, LOAD_FRAG=lf, STORE_FRAG=sf), 4)
        ptx = k.asm["ptx"]
        loads = re.findall(r"ld\.global[.\w]*", ptx)
        stores = re.findall(r"st\.global[.\w]*", ptx)
        assert loads and all(a == ("ld.global.b32" if lf else "ld.global.v4.b32")
                             for a in loads), loads
        assert stores and all(a == ("st.global.b32" if sf else "st.global.v4.b32")
                              for a in stores), stores
        assert (k.metadata.shared == 0) == (not lf and not sf), (lf, sf)
