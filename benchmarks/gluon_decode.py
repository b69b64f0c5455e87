"""Kernels for ``decode_ladder.py`` only (never imported by the package): a decode-sized
rotation written in Gluon (triton's explicit-layout dialect), and copy kernels that time the
pieces of the rotation's latency chain one at a time.

Why Gluon: plain triton decides the register layouts itself. Our row kernel loads a tile with
16-byte vectors, goes through shared memory into the tensor cores' operand layouts (and builds
the Sylvester matrix in shared memory), and converts the accumulator back through shared
memory before its 16-byte stores. Gluon states each layout, so the ladder can time each hop
alone: a load straight into the A-operand registers (no shared memory, 4-byte loads), the
matrix generated in the B-operand registers from index bits, a store straight from the
accumulator registers (4-byte stores) -- and any mix of those with the 16-byte forms.

Requires a triton with ``triton.experimental.gluon`` (3.6 and 3.9 were used) and an NVIDIA GPU
with ``mma.sync`` (sm_80+); on a machine without one they can still be compiled ahead of time
(``tests/test_bench_ladder.py``). Experimental API: nothing here is a supported code path.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2


@gluon.constexpr_function
def _mma(wm, wn):
    """``mma.sync`` (m16n8k16) accumulators, ``wm x wn`` warps over rows x columns."""
    return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[wm, wn], instr_shape=[16, 8])


@gluon.constexpr_function
def _io_layout(width, frag_layout, frag, warps):
    """How a tile of rows ``width`` elements wide meets global memory: ``frag_layout`` itself
    (``frag``), else 16-byte vectors of consecutive elements over ``warps`` warps."""
    if frag:
        return frag_layout
    return gl.BlockedLayout([1, 8], [32 // (width // 8), width // 8], [warps, 1], [1, 0])


@gluon.jit
def _sylvester(BN: gl.constexpr, layout: gl.constexpr, dtype: gl.constexpr):
    """``H_BN`` (entries +-1, BN <= 128) in ``layout``: ``(-1) ** popcount(k & n)``."""
    k = gl.arange(0, BN, layout=gl.SliceLayout(1, layout))
    n = gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
    v = k[:, None] & n[None, :]
    v = v ^ (v >> 4)
    v = v ^ (v >> 2)
    v = v ^ (v >> 1)
    one = gl.full([BN, BN], 1.0, dtype, layout)
    return gl.where((v & 1) == 0, one, -one)


@gluon.jit
def decode_rows(x_ptr, out_ptr, n_rows, n_heads, n_tok, scale, D: gl.constexpr,
                BN: gl.constexpr, WM: gl.constexpr, WN: gl.constexpr,
                TRANSPOSED: gl.constexpr, LOAD_FRAG: gl.constexpr, STORE_FRAG: gl.constexpr):
    """``out = x @ H_D * scale`` for rows of ``D`` elements, ``H_D = H_{D/BN} ⊗ H_BN``
    (``D / BN`` in 1, 2, 4; the small factor as an fp32 butterfly), one ``16 * WM``-row tile
    per program, ``WM x WN`` warps (rows x columns of the MMA tile).

    x's rows are read in memory order; ``TRANSPOSED``: memory row ``r = t * n_heads + h`` goes
    to output row ``h * n_tok + t`` (the projection's ``(1, S, H, D).transpose(1, 2)`` view
    into a contiguous output, what our row kernel's ``STRIDED_OUT`` does). ``LOAD_FRAG``:
    load x straight into the A-operand registers (else 16-byte vectors, then a conversion);
    ``STORE_FRAG``: store from the accumulator registers (else converted to 16-byte vectors).
    """
    NSPLIT: gl.constexpr = D // BN
    BLOCK_M: gl.constexpr = 16 * WM
    mma: gl.constexpr = _mma(WM, WN)
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    ld_l: gl.constexpr = _io_layout(BN, a_l, LOAD_FRAG, WM * WN)
    st_l: gl.constexpr = _io_layout(BN, mma, STORE_FRAG, WM * WN)
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    pid = gl.program_id(0)
    rm = pid * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_l))
    rk = gl.arange(0, BN, layout=gl.SliceLayout(0, ld_l))
    a_off = rm[:, None] * D + rk[None, :]
    a_mask = (rm[:, None] < n_rows) & (rk[None, :] < BN)
    x0 = gl.convert_layout(gl.load(x_ptr + a_off, mask=a_mask), a_l)
    if NSPLIT >= 2:
        x1 = gl.convert_layout(gl.load(x_ptr + a_off + BN, mask=a_mask), a_l)
    if NSPLIT == 4:
        x2 = gl.convert_layout(gl.load(x_ptr + a_off + 2 * BN, mask=a_mask), a_l)
        x3 = gl.convert_layout(gl.load(x_ptr + a_off + 3 * BN, mask=a_mask), a_l)
    w = _sylvester(BN, b_l, dtype)
    zero = gl.zeros([BLOCK_M, BN], gl.float32, layout=mma)
    om = pid * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, st_l))
    on = gl.arange(0, BN, layout=gl.SliceLayout(0, st_l))
    if TRANSPOSED:
        orow = (om % n_heads) * n_tok + om // n_heads
    else:
        orow = om
    o_off = orow[:, None] * D + on[None, :]
    o_mask = (om[:, None] < n_rows) & (on[None, :] < BN)
    z0 = mma_v2(x0, w, zero)
    if NSPLIT == 1:
        gl.store(out_ptr + o_off, gl.convert_layout((z0 * scale).to(dtype), st_l), mask=o_mask)
    elif NSPLIT == 2:
        z1 = mma_v2(x1, w, zero)
        gl.store(out_ptr + o_off, gl.convert_layout(((z0 + z1) * scale).to(dtype), st_l),
                 mask=o_mask)
        gl.store(out_ptr + o_off + BN, gl.convert_layout(((z0 - z1) * scale).to(dtype), st_l),
                 mask=o_mask)
    else:
        z1 = mma_v2(x1, w, zero)
        z2 = mma_v2(x2, w, zero)
        z3 = mma_v2(x3, w, zero)
        a = z0 + z1
        b = z0 - z1
        c = z2 + z3
        e = z2 - z3
        gl.store(out_ptr + o_off, gl.convert_layout(((a + c) * scale).to(dtype), st_l),
                 mask=o_mask)
        gl.store(out_ptr + o_off + BN, gl.convert_layout(((b + e) * scale).to(dtype), st_l),
                 mask=o_mask)
        gl.store(out_ptr + o_off + 2 * BN, gl.convert_layout(((a - c) * scale).to(dtype), st_l),
                 mask=o_mask)
        gl.store(out_ptr + o_off + 3 * BN, gl.convert_layout(((b - e) * scale).to(dtype), st_l),
                 mask=o_mask)


@gluon.jit
def copy_tile(x_ptr, out_ptr, n_rows, D: gl.constexpr, WN: gl.constexpr,
              LOAD_FRAG: gl.constexpr, STORE_FRAG: gl.constexpr):
    """Ladder: a ``[16, D]`` tile copy, loaded in the A-operand layout or as 16-byte vectors,
    stored from the accumulator layout or as 16-byte vectors (a conversion in between when
    the two differ)."""
    mma: gl.constexpr = _mma(1, WN)
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    ld_l: gl.constexpr = _io_layout(D, a_l, LOAD_FRAG, WN)
    st_l: gl.constexpr = _io_layout(D, mma, STORE_FRAG, WN)
    pid = gl.program_id(0)
    rm = pid * 16 + gl.arange(0, 16, layout=gl.SliceLayout(1, ld_l))
    rk = gl.arange(0, D, layout=gl.SliceLayout(0, ld_l))
    x = gl.load(x_ptr + rm[:, None] * D + rk[None, :],
                mask=(rm[:, None] < n_rows) & (rk[None, :] < D))
    x = gl.convert_layout(x, st_l)
    om = pid * 16 + gl.arange(0, 16, layout=gl.SliceLayout(1, st_l))
    on = gl.arange(0, D, layout=gl.SliceLayout(0, st_l))
    gl.store(out_ptr + om[:, None] * D + on[None, :], x,
             mask=(om[:, None] < n_rows) & (on[None, :] < D))


@triton.jit
def copy_tl(x_ptr, out_ptr, n_rows, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Ladder: a plain triton tile copy with the row kernel's decode grid (16-row tiles)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, D)
    m = (rm[:, None] < n_rows) & (rk[None, :] < D)
    off = rm[:, None] * D + rk[None, :]
    tl.store(out_ptr + off, tl.load(x_ptr + off, mask=m), mask=m)


@triton.jit
def empty_tl(x_ptr, out_ptr, n_rows):
    """Ladder: the launch alone (same arguments and grid)."""
    pass
