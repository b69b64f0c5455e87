"""One Triton launch that rotates a layer's query *and* key, optionally fused with RoPE.

Why: in eager decode a rotation is ~2 us of GPU work but tens of microseconds of host time
per launch, twice per layer. The query and key of a layer come out of ``apply_rotary_pos_emb``
together, so one kernel can take both (one launch instead of two), and — for the standard
"rotate-half" RoPE — also do the RoPE itself, replacing the ~10 small element-wise kernels
that eager RoPE launches. See ``hf_hadamard_kq/fused.py`` for when this path is taken.

Math, per row ``x`` (one head of one token, ``D`` values, halves ``x0 | x1``):

* RoPE (``ROPE``): ``r = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = (-x1 | x0)``,
  in fp32 and rounded once to ``x.dtype`` (the tensor-core operand). Products of 16-bit values
  are exact in fp32, so this is the exact RoPE rounded (at most) twice, fp32 then ``x.dtype``,
  whatever FMA contraction the compiler applies. torch's eager RoPE rounds each product and
  the sum to ``x.dtype``, so the two differ by one unit in the last place in some elements
  (measured on an H100: about a quarter of them), ours being the more accurate.
  (An earlier version emulated torch's three roundings; on the GPU the compiled kernel did not
  reproduce them, so exactness with eager RoPE is not a property this kernel claims.)
* Hadamard: ``y = (r @ W) * scale``, fp32 accumulation, one rounding. For the Sylvester matrix
  ``H_D = H_2 ⊗ H_{D/2}``: ``z_i = r_i @ H_{D/2}``, ``y = (z0 + z1 | z0 - z1)`` -- for d = 128
  and 256 with 16-bit operands, ``H_{D/2} = H_P ⊗ H_{D/2P}`` in turn (``QSPLIT = P``, 2 or
  4: each half split into ``P`` parts in registers, a ``P``-point butterfly; see
  :data:`QSPLIT_PARTS`); for an
  explicit ``W`` (``D <= 128``) the four ``D/2``-square quarters of ``W`` stay in registers.

Rows are ``(b, s, h)`` triples (consecutive heads of a token are adjacent in the usual
``(B, S, H, D).transpose(1, 2)`` layout), read and written through strides, so neither input
nor output needs to be contiguous; outputs keep the inputs' memory layout (``empty_like``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from . import cpp_launch, forward_mode
from .pdl import pdl_enabled
from .triton_kernel import (
    DEFAULT_STAGES,
    INTERPRET,
    SMALL_ROWS,
    _butterfly4,
    _cached_launcher,
    _current_device,
    _dot,
    _dots4,
    _join_row,
    _max_programs,
    _round_to,
    _split4,
    _split_row,
    _w_tile,
    stage_option,
    tl,
    triton,
)

#: Largest head dim for the Sylvester form (a resident ``H_128`` with fp32 operands; see
#: :data:`QSPLIT_PARTS` for 16-bit ones) and for an explicit matrix.
MAX_SYLVESTER_D = 256
MAX_EXPLICIT_D = 128
#: ``D -> P``: Sylvester launches with 16-bit operands split each half once more, into ``P``
#: parts (``QSPLIT``: ``H_{D/2} = H_P ⊗ H_{D/2P}``, a resident ``H_{D/2P}`` instead of
#: ``H_{D/2}``; other head dims keep the halves, ``P = 1``; d = 64 would need dots narrower
#: than 16). The quarter form (``P = 4``) measured on H100s (session 23,
#: benchmarks/results/qk_quarters_ab_h100_session23_call{2,3}.json, RoPE + q (32 heads) and k
#: (8), bf16, GPU time in a CUDA graph, call 2): at 1 / 16 / 64 tokens and batch 8 / 32 at one
#: token, d = 256 2.336 / 2.463 / 3.001 / 2.462 / 2.572 us vs 3.259 / 3.357 / 4.554 / 3.303 /
#: 3.458 with the halves (compiled for sm_90: 4 KiB of shared memory instead of 40, a quarter
#: of the MMAs); d = 128 2.175 / 2.265 / 2.383 / 2.208 / 2.323 vs 2.442 / 2.524 / 2.647 /
#: 2.467 / 2.590 (the tilings' warp counts kept: 4 warps were level at d = 256, and at d = 128
#: 0.03 us faster at 1-16 tokens but 0.37 slower at 64). Prefill, 512 / 4096 tokens (call 3,
#: the prefill tilings as they are): d = 256 10.52 / 75.68 us vs 12.53 / 83.48, d = 128
#: 5.57 / 37.88 vs 5.77 / 42.59 (fp16: 5.38 / 36.92 vs 5.67 / 41.79). Two parts (``P = 2``,
#: call 5, qk_split_ab_h100_session23_call5.json): slower than four at every decode shape
#: (d = 128: 2.32-2.68 us with the tiling's 2 warps, 2.17-2.54 with 4, against 2.17-2.36;
#: d = 256: 2.46-3.39 against 2.34-2.97) and at d = 256 prefill (11.89 / 85.04 vs 10.30 /
#: 75.53); level at d = 128 prefill (37.29 vs 37.71 us at 4096 tokens, fp16 36.92 vs 36.65).
#: Editing this at run time needs :func:`clear_plans`; ``P`` must be 1, 2 or 4 with
#: ``D / 2P >= 16`` (checked when a plan is made).
QSPLIT_PARTS: dict[int, int] = {128: 4, 256: 4}
_INT32 = 2**31

if triton is not None:

    @triton.jit
    def _to_dtype_f32(v, ref_ptr, EMULATE_RTNE: tl.constexpr):
        """Round fp32 ``v`` to ``ref_ptr``'s element type and back (what a torch op in that
        dtype stores); a no-op for fp32."""
        if ref_ptr.dtype.element_ty == tl.float32:
            return v
        else:
            return _round_to(v, ref_ptr, EMULATE_RTNE).to(tl.float32)

    @triton.jit
    def _fence(v):
        """``v`` unchanged, through an opaque (non-pure) PTX move. Why: triton hoists the
        conversion of a dot operand into the MMA layout above the element-wise ops that
        produce it, so the RoPE's six inputs (x, cos, sin halves) went through shared memory
        instead of its two outputs, and the RoPE ran twice (sm_90 SASS, d = 128, 16-row tiles:
        44 barriers and 2064 instructions vs 20 and 1552 with the fence; the no-RoPE kernel
        has 20 and 1032). CUDA only (PTX); 16-bit ``v``."""
        return tl.inline_asm_elementwise(
            "mov.b16 $0, $1;", "=h,h", [v], dtype=v.dtype, is_pure=False, pack=1)

    @triton.jit
    def _qk_w(x_ptr, w_ptr, rk, D: tl.constexpr, HALF: tl.constexpr, LOG2HALF: tl.constexpr,
              SYLVESTER: tl.constexpr, DOT_F32: tl.constexpr, QSPLIT: tl.constexpr):
        """The four ``HALF``-square quarters of ``W`` (Sylvester: one generated ``H_HALF``,
        typed like ``x_ptr``'s elements; ``QSPLIT`` 2 or 4: its factor ``H_{HALF/QSPLIT}``)."""
        tl.static_assert(QSPLIT == 1 or (SYLVESTER and (QSPLIT == 2 or QSPLIT == 4)),
                         "QSPLIT: 2 or 4 parts per Sylvester half")
        if QSPLIT > 1:
            rq = tl.arange(0, HALF // QSPLIT)
            w00 = _w_tile(x_ptr, rq, rq, HALF // QSPLIT, LOG2HALF - QSPLIT // 2, True, DOT_F32)
            w01 = w00
            w10 = w00
            w11 = w00
        elif SYLVESTER:
            w00 = _w_tile(x_ptr, rk, rk, HALF, LOG2HALF, True, DOT_F32)
            w01 = w00
            w10 = w00
            w11 = w00
        else:
            w00 = _w_tile(w_ptr, rk, rk, D, 0, False, DOT_F32)
            w01 = _w_tile(w_ptr, rk, rk + HALF, D, 0, False, DOT_F32)
            w10 = _w_tile(w_ptr, rk + HALF, rk, D, 0, False, DOT_F32)
            w11 = _w_tile(w_ptr, rk + HALF, rk + HALF, D, 0, False, DOT_F32)
        return w00, w01, w10, w11

    @triton.jit
    def _pairs(r, w, DOT_F32: tl.constexpr):
        """``r @ H_HALF`` as its two ``HALF/2``-wide parts, for ``H_HALF = H_2 ⊗ H_{HALF/2}``
        (``w``): the halves of ``r`` split in registers, one dot each, a 2-point butterfly."""
        p0, p1 = _split_row(r, r.shape[1] // 2)
        zero = tl.zeros((r.shape[0], r.shape[1] // 2), dtype=tl.float32)
        u0 = _dot(p0, w, zero, DOT_F32)
        u1 = _dot(p1, w, zero, DOT_F32)
        return u0 + u1, u0 - u1

    @triton.jit
    def _quarters(r, w, DOT_F32: tl.constexpr):
        """``r @ H_HALF`` as its four ``HALF/4``-wide parts, for ``H_HALF = H_4 ⊗ H_{HALF/4}``
        (``w``): the parts of ``r`` split in registers, one dot each, a 4-point fp32
        butterfly."""
        Q: tl.constexpr = r.shape[1] // 4
        p0, p1, p2, p3 = _split4(r, Q)
        zero = tl.zeros((r.shape[0], Q), dtype=tl.float32)
        return _butterfly4(*_dots4(p0, p1, p2, p3, w, zero, DOT_F32))

    @triton.jit
    def _qk_tile(
        x_ptr, o_ptr, c_ptr, s_ptr, w_ptr, w00, w01, w10, w11, t, n_rows, H, S,
        xb, xh, xs, ob, oh, os_, cb, cs, scale,
        D: tl.constexpr, HALF: tl.constexpr, LOG2HALF: tl.constexpr, BLOCK_M: tl.constexpr,
        ROPE: tl.constexpr, SYLVESTER: tl.constexpr, DOT_F32: tl.constexpr,
        EMULATE_RTNE: tl.constexpr, LOADS_FIRST: tl.constexpr, ALIGN: tl.constexpr,
        ROPE_FENCE: tl.constexpr, QSPLIT: tl.constexpr,
    ):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.arange(0, HALF)
        ok = rows < n_rows
        h = rows % H
        bs = rows // H
        s = bs % S
        b = bs // S
        mask = ok[:, None] & (rk < HALF)[None, :]
        x_row = b * xb + h * xh + s * xs
        o_row = b * ob + h * oh + s * os_
        if ALIGN > 1:  # row starts are 16-byte aligned: lets the compiler vectorise
            x_row = tl.multiple_of(x_row, ALIGN)
            o_row = tl.multiple_of(o_row, ALIGN)
        x_at = x_ptr + x_row[:, None] + rk[None, :]
        x0 = tl.load(x_at, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(x_at + HALF, mask=mask, other=0.0).to(tl.float32)
        if ROPE:
            c_row = b * cb + s * cs
            if ALIGN > 1:
                c_row = tl.multiple_of(c_row, ALIGN)
            c_off = c_row[:, None] + rk[None, :]
            c0 = tl.load(c_ptr + c_off, mask=mask, other=0.0).to(tl.float32)
            c1 = tl.load(c_ptr + c_off + HALF, mask=mask, other=0.0).to(tl.float32)
            s0 = tl.load(s_ptr + c_off, mask=mask, other=0.0).to(tl.float32)
            s1 = tl.load(s_ptr + c_off + HALF, mask=mask, other=0.0).to(tl.float32)
            r0 = x0 * c0 - x1 * s0
            r1 = x1 * c1 + x0 * s1
            # the dot operand is x.dtype: round here explicitly (the interpreter's bf16 case
            # keeps fp32 operands, DOT_F32, and must still see the rounded RoPE)
            r0 = _to_dtype_f32(r0, x_ptr, EMULATE_RTNE)
            r1 = _to_dtype_f32(r1, x_ptr, EMULATE_RTNE)
        else:
            r0 = x0
            r1 = x1
        if not DOT_F32:
            r0 = r0.to(x_ptr.dtype.element_ty)
            r1 = r1.to(x_ptr.dtype.element_ty)
            if ROPE and ROPE_FENCE:
                r0 = _fence(r0)
                r1 = _fence(r1)
        if LOADS_FIRST:  # built after the loads were issued: generation overlaps their latency
            w00, w01, w10, w11 = _qk_w(x_ptr, w_ptr, rk, D, HALF, LOG2HALF, SYLVESTER, DOT_F32,
                                       QSPLIT)
        zero = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
        if QSPLIT == 2:  # H_D = H_2 ⊗ H_2 ⊗ H_{D/4}: each half in two parts (see _pairs)
            a0, a1 = _pairs(r0, w00, DOT_F32)
            b0, b1 = _pairs(r1, w00, DOT_F32)
            y0 = _join_row((a0 + b0) * scale, (a1 + b1) * scale)
            y1 = _join_row((a0 - b0) * scale, (a1 - b1) * scale)
        elif QSPLIT == 4:  # H_D = H_2 ⊗ H_4 ⊗ H_{D/8}: each half in four parts (_quarters)
            a0, a1, a2, a3 = _quarters(r0, w00, DOT_F32)
            b0, b1, b2, b3 = _quarters(r1, w00, DOT_F32)
            y0 = _join_row(_join_row((a0 + b0) * scale, (a1 + b1) * scale),
                           _join_row((a2 + b2) * scale, (a3 + b3) * scale))
            y1 = _join_row(_join_row((a0 - b0) * scale, (a1 - b1) * scale),
                           _join_row((a2 - b2) * scale, (a3 - b3) * scale))
        elif SYLVESTER:
            z0 = _dot(r0, w00, zero, DOT_F32)
            z1 = _dot(r1, w00, zero, DOT_F32)
            y0 = (z0 + z1) * scale
            y1 = (z0 - z1) * scale
        else:
            y0 = _dot(r1, w10, _dot(r0, w00, zero, DOT_F32), DOT_F32) * scale
            y1 = _dot(r1, w11, _dot(r0, w01, zero, DOT_F32), DOT_F32) * scale
        o_at = o_ptr + o_row[:, None] + rk[None, :]
        tl.store(o_at, _round_to(y0, o_ptr, EMULATE_RTNE), mask=mask)
        tl.store(o_at + HALF, _round_to(y1, o_ptr, EMULATE_RTNE), mask=mask)

    @triton.jit(
        do_not_specialize=[
            "nq", "nk", "tq", "n_tiles", "Hq", "Hk", "S", "qb", "qh", "qs", "kb", "kh", "ks",
            "qob", "qoh", "qos", "kob", "koh", "kos", "cb", "cs",
        ]
    )
    def _qk_kernel(
        q_ptr, k_ptr, qo_ptr, ko_ptr, c_ptr, s_ptr, w_ptr,
        nq, nk, tq, n_tiles, Hq, Hk, S,
        qb, qh, qs, kb, kh, ks, qob, qoh, qos, kob, koh, kos, cb, cs, scale,
        D: tl.constexpr, HALF: tl.constexpr, LOG2HALF: tl.constexpr, BLOCK_M: tl.constexpr,
        ROPE: tl.constexpr, SYLVESTER: tl.constexpr, DOT_F32: tl.constexpr,
        EMULATE_RTNE: tl.constexpr, LOADS_FIRST: tl.constexpr, ALIGN: tl.constexpr,
        ROPE_FENCE: tl.constexpr, QSPLIT: tl.constexpr, PDL: tl.constexpr,
    ):
        """Tiles ``[0, tq)`` are query rows, ``[tq, n_tiles)`` key rows (persistent grid).
        ``LOADS_FIRST`` (one tile per program): ``W`` is built per tile after its loads,
        else once before the loop. ``PDL`` (launched with programmatic dependent launch,
        ``pdl.pdl_enabled``): wait for the previous kernel in the stream before
        the first load or store."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        rk = tl.arange(0, HALF)
        w00 = 0  # placeholders: built per tile (LOADS_FIRST)
        w01 = 0
        w10 = 0
        w11 = 0
        # PDL: wait after building a Sylvester W (registers), before loading an explicit one
        if PDL and not SYLVESTER:
            tl.extra.cuda.gdc_wait()
        if not LOADS_FIRST:
            w00, w01, w10, w11 = _qk_w(q_ptr, w_ptr, rk, D, HALF, LOG2HALF, SYLVESTER, DOT_F32,
                                       QSPLIT)
        if PDL and SYLVESTER:
            tl.extra.cuda.gdc_wait()
        for t in range(pid, n_tiles, nprog):
            if t < tq:
                _qk_tile(
                    q_ptr, qo_ptr, c_ptr, s_ptr, w_ptr, w00, w01, w10, w11, t, nq, Hq, S,
                    qb, qh, qs, qob, qoh, qos, cb, cs, scale,
                    D, HALF, LOG2HALF, BLOCK_M, ROPE, SYLVESTER, DOT_F32, EMULATE_RTNE,
                    LOADS_FIRST, ALIGN, ROPE_FENCE, QSPLIT,
                )
            else:
                _qk_tile(
                    k_ptr, ko_ptr, c_ptr, s_ptr, w_ptr, w00, w01, w10, w11, t - tq, nk, Hk, S,
                    kb, kh, ks, kob, koh, kos, cb, cs, scale,
                    D, HALF, LOG2HALF, BLOCK_M, ROPE, SYLVESTER, DOT_F32, EMULATE_RTNE,
                    LOADS_FIRST, ALIGN, ROPE_FENCE, QSPLIT,
                )

    # ints are not specialised (do_not_specialize, all < 2**31): only pointer alignment is
    # keyed, which keeps the per-call key small (decode is host-bound)
    _LAUNCHER = _cached_launcher(_qk_kernel, specialized_ints=False)


_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def qk_supported(
    q: torch.Tensor,
    k: torch.Tensor,
    matrix: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    any_device: bool = False,
) -> bool:
    """Whether :func:`rotate_qk` takes these tensors (else the caller uses the general op).

    ``q``/``k``: ``(B, H, S, D)`` on one CUDA device (or any device under the interpreter,
    or with ``any_device``: the shapes the custom op ``rope_rotate_qk`` takes everywhere),
    same dtype, unit last stride, ``D`` a power of two in [32, 256] (explicit ``matrix``:
    <= 128, square ``D``), every offset < 2**31. ``cos``/``sin`` (None: no RoPE): ``(B or 1,
    S, D)``, q's dtype and device, identical strides, unit last stride. ``matrix``: contiguous.
    """
    if q.dim() != 4 or k.dim() != 4 or q.dtype is not k.dtype or q.dtype not in _SUPPORTED:
        return False
    b, _, s, d = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d or d < 32 or d & (d - 1):
        return False
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        return False
    if not (q.is_cuda or INTERPRET or any_device) or k.device != q.device:
        return False
    if matrix is None:
        if d > MAX_SYLVESTER_D:
            return False
    elif (
        d > MAX_EXPLICIT_D
        or tuple(matrix.shape) != (d, d)
        or matrix.device != q.device
        or not matrix.is_contiguous()  # the kernel reads W[i, j] at i * d + j
    ):
        return False
    for t in (q, k):
        # no broadcast (stride-0) dims: an overlapping input could have a larger output
        if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())):
            return False
        if sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1 >= _INT32:
            return False
    if cos is not None:
        if sin is None or cos.dim() != 3 or cos.dtype is not q.dtype or sin.dtype is not q.dtype:
            return False
        if cos.device != q.device or sin.device != q.device:
            return False
        if cos.shape[0] not in (1, b) or cos.shape[1] != s or cos.shape[2] != d:
            return False
        if sin.shape != cos.shape or sin.stride() != cos.stride() or cos.stride(-1) != 1:
            return False
        if sum((n - 1) * st for n, st in zip(cos.shape, cos.stride())) + 1 >= _INT32:
            return False
    return True


#: ``(decode, d) -> (BLOCK_M, num_warps, num_stages)``, measured with benchmarks/tune_qk.py on an
#: H100 (session 7, benchmarks/results/tune_qk_h100_session7*.json; bf16, RoPE, 32 q + 8 kv heads,
#: GPU time in a CUDA graph). Decode, d = 128: 3.18-3.36 us at 1-64 tokens and batch 1-32 with 2
#: warps (3.20-3.93 with 4); d = 64 and 256 keep 4. Prefill (512 and 4096 tokens): 64-row tiles, 4
#: warps (d = 256: 105 us at 4096 tokens vs 249 with 32-row tiles). Swept again after the RoPE fence
#: (``_fence``; session 10, benchmarks/results/tune_qk_h100_session10_d*.json, one run): decode
#: unchanged (d = 128: 2.49-2.64 us; 8 warps 0.1 us faster at 1-16 tokens, 0.4 slower at 64);
#: prefill d = 128 now 32-row tiles (5.74 / 42.2 us at 512 / 4096 tokens vs 6.52 / 47.5 with 64),
#: d = 256 32 rows and 2 warps (12.6 / 83.5 us vs 18.6 / 81.2).
#: Session 12 (tune_qk_h100_session12_stages.json): the pipelining depth made no difference (within
#: 0.02 us at decode sizes, 1.7% at prefill sizes), so it stays triton's default.
#: Editing this at run time needs ``qk_config.cache_clear()`` and :func:`clear_plans`.
TUNED_QK: dict[tuple[bool, int], tuple[int, int, int | None]] = {
    (True, 64): (16, 4, DEFAULT_STAGES),
    (True, 128): (16, 2, DEFAULT_STAGES),
    (True, 256): (16, 4, DEFAULT_STAGES),
    (False, 64): (64, 4, DEFAULT_STAGES),
    (False, 128): (32, 4, DEFAULT_STAGES),
    (False, 256): (32, 2, DEFAULT_STAGES),
}

#: The same for fp32 tensors, which the kernel multiplies with FMAs, not tensor cores:
#: ``(decode, d) -> (BLOCK_M, num_warps, num_stages)``. Session 16 (benchmarks/results/
#: tune_qk_f32_h100_session16*.json; fp32, RoPE, 32 q + 8 kv heads, GPU time in a CUDA graph):
#: at d = 256 the 16-bit tilings above were far too slow (cause not investigated; too few
#: warps for the FMA work is the obvious candidate) -- 15.3 ms at 4096 tokens and 129 us at
#: one token (32 rows / 2 warps, and 16 / 4), against 336 us and 7.0 us with 16-row tiles and
#: 8 warps, the best of 16/32 rows x 2/4/8 warps at every shape -- and took 47 s to compile
#: (4.3-4.6 s). d = 128: one token 5.98 -> 3.07 us (8 warps); 4096 / 512 tokens 123.6 / 18.9
#: -> 111.1 / 15.0 us (16 rows, 4 warps; 32 rows and 8 warps: 116.6 / 13.9). d = 64 keeps the
#: 16-bit tilings (one token: 2.25 us, within 0.04 of the best; its prefill tiling, 64 rows,
#: was not in the sweep). 16-bit tensors with a stored fp32 matrix (also FMAs) keep
#: :data:`TUNED_QK`'s tilings: neither was measured for them (tune_qk sweeps Sylvester
#: rotations), and these lost the 16-byte accesses there (d = 128, 16 rows, 8 warps: compiled
#: for sm_90, no ``ld.global.v4``).
TUNED_QK_F32: dict[tuple[bool, int], tuple[int, int, int | None]] = {
    (True, 128): (16, 8, DEFAULT_STAGES),
    (False, 128): (16, 4, DEFAULT_STAGES),
    (True, 256): (16, 8, DEFAULT_STAGES),
    (False, 256): (16, 8, DEFAULT_STAGES),
}


@functools.cache
def qk_config(d: int, rows: int, fp32: bool = False) -> tuple[int, int, int | None]:
    """``(BLOCK_M, num_warps, num_stages)`` for head dim ``d`` and ``rows`` rows in the larger
    tensor (``fp32``: fp32 tensors, :data:`TUNED_QK_F32` first): :data:`TUNED_QK` where it
    has an entry; otherwise 16-row tiles with 4 warps for
    decode-sized calls and ``8192 / d`` rows (64 at 128) for prefill; the pipelining depth is
    triton's default for the backend (None) everywhere: session 12 measured no effect of it on
    this kernel (tune_qk --stages)."""
    decode = rows <= SMALL_ROWS  # the row kernel's decode-sized class (rows = heads x tokens)
    tuned = (fp32 and TUNED_QK_F32.get((decode, d))) or TUNED_QK.get((decode, d))
    if tuned is not None:
        return tuned
    if decode:
        return 16, 4, DEFAULT_STAGES
    return max(16, min(128, 8192 // d)), 4, DEFAULT_STAGES


def _align(element_size: int, strides: list[int]) -> int:
    """``16 / element_size`` when every stride that is used (of dims longer than 1) is a
    multiple of 16 bytes, else 1: the kernel's ``ALIGN`` hint that row starts are 16-byte
    aligned *relative to the base pointers*. The ints are not specialised
    (``do_not_specialize``), so without it the compiler cannot vectorise the loads and stores;
    the pointers' own alignment is keyed by the launcher (``launch.CachedLauncher``) and
    specialised by triton."""
    unit = 16 // element_size
    return unit if all(st % unit == 0 for st in strides) else 1


class _Plan(NamedTuple):
    grid: int
    scalars: tuple
    meta: dict
    key: tuple
    num_warps: int
    num_stages: int | None

    @property
    def pdl(self) -> bool:
        """Compiled (the ``PDL`` constexpr) and launched with programmatic dependent launch."""
        return self.meta["PDL"]


_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 4096
#: The eager fast path by layout (the key of :data:`_PLANS`): ``f(q, k, cos, sin, matrix) ->
#: (qo, ko)``, or None when it cannot launch this call (then the normal path runs). Why: this
#: launch is the fused path's whole per-layer cost in eager decode; the closure does per call
#: only what depends on the call (device, hook and alignment checks, the two allocations,
#: the launch). Cleared with :data:`_PLANS`.
_FAST: dict[tuple, Any] = {}
#: The fused launch's tag in :data:`cpp_launch.QK_TABLE` (its inputs, in this order: q, k,
#: cos, sin, matrix -- :func:`try_rotate_qk` builds that tuple once for both the table call
#: and the Launch it makes).
QK_TAG = 0


def clear_plans() -> None:
    """Forget every cached plan, fast-path closure and C++ launch (after editing
    :data:`TUNED_QK`: also call ``qk_config.cache_clear()``)."""
    _PLANS.clear()
    _clear_fast()


def _clear_fast() -> None:
    """Forget the fast paths (closures and C++ launches: bounded together)."""
    _FAST.clear()
    if cpp_launch.QK_TABLE is not None:
        cpp_launch.QK_TABLE.clear()


def _make_plan(q, k, qo, ko, cos, scale, w) -> _Plan:
    b, hq, s, d = q.shape
    hk = k.shape[1]
    nq, nk = b * hq * s, b * hk * s
    sylvester = w is q
    dtype = q.dtype
    parts = QSPLIT_PARTS.get(d, 1)
    if parts not in (1, 2, 4) or d // (2 * parts) < 16:
        raise ValueError(
            f"qk_kernel.QSPLIT_PARTS[{d}] = {parts!r}: the parts per half must be 1, 2 or 4, "
            f"each at least 16 wide (head dim {d} allows "
            f"{[p for p in (1, 2, 4) if d // (2 * p) >= 16]}); fix the table")
    dot_f32 = dtype is torch.float32 or w.dtype is not dtype or (
        INTERPRET and dtype is torch.bfloat16)
    block_m, num_warps, num_stages = qk_config(d, max(nq, nk), dtype is torch.float32)
    tq = -(-nq // block_m)
    n_tiles = tq + -(-nk // block_m)
    grid = min(n_tiles, _max_programs(q.device))
    if cos is not None:
        cb, cs = (cos.stride(0) if cos.shape[0] > 1 else 0), cos.stride(1)
    else:
        cb = cs = 0
    qst, kst, qost, kost = q.stride(), k.stride(), qo.stride(), ko.stride()
    meta = {
        "D": d, "HALF": d // 2, "LOG2HALF": (d // 2).bit_length() - 1, "BLOCK_M": block_m,
        "ROPE": cos is not None, "SYLVESTER": sylvester, "DOT_F32": dot_f32,
        "EMULATE_RTNE": INTERPRET and dtype is torch.bfloat16,
        "LOADS_FIRST": n_tiles <= grid,
        "ALIGN": _align(q.element_size(), [
            st for t in (q, k, qo, ko) for n, st in zip(t.shape[:3], t.stride()[:3]) if n > 1
        ] + [cb, cs if s > 1 else 0]),
        # PTX fence after the RoPE (see _fence): CUDA, 16-bit tensor-core operands
        "ROPE_FENCE": cos is not None and not dot_f32 and not INTERPRET
        and torch.version.hip is None,
        # the Sylvester halves split once more (16-bit operands; see QSPLIT_PARTS)
        "QSPLIT": parts if sylvester and not dot_f32 else 1,
        # decode-sized launches on sm_90+: the launch latency overlaps the previous kernel
        "PDL": max(nq, nk) <= SMALL_ROWS and pdl_enabled(q.device),
    }  # in the kernel's constexpr order: the direct launch passes the values by position
    scalars = (
        nq, nk, tq, n_tiles, hq, hk, s,
        qst[0], qst[1], qst[2], kst[0], kst[1], kst[2],
        qost[0], qost[1], qost[2], kost[0], kost[1], kost[2], cb, cs, float(scale),
    )
    key = (tuple(meta.values()), dtype, w.dtype, num_warps, num_stages)
    return _Plan(grid, scalars, meta, key, num_warps, num_stages)


def _layout(q, k, matrix, cos, sin, scale) -> tuple:
    """Everything :func:`qk_supported` and :func:`_make_plan` look at (outputs are
    ``empty_like`` of the inputs, so their strides follow from these)."""
    m = None if matrix is None else (matrix.shape, matrix.stride(), matrix.dtype, matrix.device)
    c = None if cos is None else (
        cos.shape, cos.stride(), cos.dtype, cos.device,
        None if sin is None else (sin.shape, sin.stride(), sin.dtype, sin.device),
    )
    return (q.shape, q.stride(), k.shape, k.stride(), q.dtype, k.dtype, q.device, k.device,
            m, c, scale)


def _remember(layout: tuple, plan):
    """Cache a plan (or False: unsupported) for a layout; the cache is bounded."""
    if len(_PLANS) >= _MAX_PLANS:
        clear_plans()
    _PLANS[layout] = plan
    return plan


def try_rotate_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    matrix: torch.Tensor | None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(rope(q) @ W * scale, rope(k) @ W * scale)`` in one launch (no RoPE if ``cos`` is None),
    or None when :func:`qk_supported` refuses these tensors (the caller then rotates them
    another way). ``matrix`` None: the Sylvester matrix. Returns new tensors with the inputs'
    memory layouts.

    Host cost (this is the per-token hot path): the support check and the launch parameters
    are computed once per layout (shapes, strides, dtypes, devices, scale) and cached; per
    call there is one key, two allocations and the launch -- on CUDA, in C++ where
    ``cpp_launch`` could be built (:data:`cpp_launch.QK_TABLE`, looked up first), else
    through a Python closure around triton's launcher (:data:`_FAST`).
    """
    inputs = (q, k, cos, sin, matrix)  # the Launch's input order (QK_TAG)
    table = cpp_launch.QK_TABLE
    if table is not None:
        pair = table(*inputs, scale, QK_TAG)
        if pair is not None:
            return pair
    if _LAUNCHER is not None:
        if not cpp_launch.plain_cuda(*inputs):
            return None  # a wrapper or lazy view (no data of its own to read), or a dual
            # tensor (a tangent the launch would drop): the caller's op
    elif forward_mode.level_open():  # the interpreter (its tests also pass CPU tensors)
        return None
    layout = _layout(q, k, matrix, cos, sin, scale)
    fast = _FAST.get(layout)
    if fast is not None:
        pair = fast(q, k, cos, sin, matrix)
        if pair is not None:
            return pair
    plan = _PLANS.get(layout)
    if plan is False:
        return None
    if plan is None and not qk_supported(q, k, matrix, cos, sin):
        _remember(layout, False)
        return None
    qo = torch.empty_like(q)
    ko = torch.empty_like(k)
    w = _operand(q, matrix)
    if plan is None:
        plan = _remember(layout, _make_plan(q, k, qo, ko, cos, scale, w))
    if plan.grid == 0:  # no rows
        return qo, ko
    if cos is not None:
        tensors = (q, k, qo, ko, cos, sin, w)
    else:
        tensors = (q, k, qo, ko, q, q, w)
    if _LAUNCHER is None:  # interpreter: the plain triton call
        _qk_kernel[(plan.grid,)](*tensors, *plan.scalars, **plan.meta, num_warps=plan.num_warps,
                                 **stage_option(plan.num_stages, plan.pdl))
        return qo, ko
    device = q.get_device()
    if device != torch.cuda.current_device():
        with torch.cuda.device(device):
            _LAUNCHER.launch(plan.grid, plan.key, device, tensors, plan.scalars, plan.meta,
                             plan.num_warps, None, plan.num_stages, plan.pdl)
    else:
        _LAUNCHER.launch(plan.grid, plan.key, device, tensors, plan.scalars, plan.meta,
                         plan.num_warps, None, plan.num_stages, plan.pdl)
        if layout not in _FAST and (w is q or w is matrix):
            _remember_fast(layout, plan, device, inputs, (qo, ko))
    return qo, ko


def _remember_fast(layout: tuple, plan: _Plan, device: int, inputs: tuple,
                   outputs: tuple) -> None:
    """Store the fast-path closure of ``layout`` once its all-aligned launch is cached
    (nothing yet if it is not: a later call retries; None if it has no direct form), and the
    same launch in C++ (cpp_launch.py) where that is available. ``inputs``: this call's
    ``(q, k, cos, sin, matrix)`` (cos/sin None without RoPE, matrix None for Sylvester);
    ``outputs``: its ``(qo, ko)``."""
    parts = _LAUNCHER.direct_parts(plan.key, device, plan.meta, None)
    if parts is None:
        return
    if len(_FAST) >= _MAX_PLANS:
        _clear_fast()
    rope, sylvester = inputs[2] is not None, inputs[4] is None
    fast = _fast_closure(plan, device, parts, rope, sylvester) if parts else None
    if fast is not None:
        kernel = _LAUNCHER.compiled(plan.key, device, None)
        cpp = cpp_launch.make_launch(
            kernel, plan.grid, inputs, outputs, *cpp_roles(plan, rope, sylvester),
            lambda q, k, c, s, m, scale: fast(q, k, c, s, m), plan.scalars[-1])
        if cpp is cpp_launch.RETRY:  # not now (graph capture, a hook): a later call retries
            return
        if cpp is not None and cpp_launch.QK_TABLE is not None:
            cpp_launch.QK_TABLE.add(QK_TAG, cpp)
    _FAST[layout] = fast


def cpp_roles(plan: _Plan, rope: bool, sylvester: bool) -> tuple[tuple, tuple]:
    """``(roles, values)`` of the fused kernel's launch arguments for cpp_launch: the same
    arguments, in the same order, as :func:`_fast_closure` passes (q, k, qo, ko, cos, sin --
    q twice without RoPE --, W -- q for Sylvester --, the plan's ints, scale, the
    constexprs), for a Launch with inputs ``(q, k, cos, sin, matrix)`` and outputs
    ``(qo, ko)``."""
    nl = cpp_launch
    ints = len(plan.scalars) - 1  # the last scalar is the scale
    roles = (*(nl.IN_PTR,) * 2, *(nl.OUT_PTR,) * 2, *(nl.IN_PTR,) * 3, *(nl.VALUE,) * ints,
             nl.SCALE, *(nl.VALUE,) * len(plan.meta))
    values = (0, 1, 0, 1, 2 if rope else 0, 3 if rope else 0, 0 if sylvester else 4,
              *plan.scalars[:-1], None, *plan.meta.values())
    return roles, values


def _fast_closure(plan: _Plan, device: int, parts: tuple, rope: bool, sylvester: bool):
    """``f(q, k, cos, sin, matrix)``: ``plan``'s launch for tensors of the layout it was made
    for, with the arguments :meth:`~.launch.CachedLauncher.launch` would pass (q, k, the two
    outputs, cos and sin -- q twice without RoPE --, W -- q for Sylvester --, the plan's
    scalars, the constexprs). Returns None, launching nothing, when the call is not the
    cached specialisation's (another current device, a launch hook, a pointer not 16-byte
    aligned)."""
    launch, function, coop, pdl, packed, meta_values = parts
    grid, tail = plan.grid, (*plan.scalars, *meta_values)
    stream_of, hooks_active = _LAUNCHER._stream, _LAUNCHER.hooks_active
    current_device, empty_like = _current_device, torch.empty_like

    def fast(q, k, cos, sin, matrix):
        if current_device() != device or hooks_active():
            return None
        qo, ko = empty_like(q), empty_like(k)
        pq, pk, pqo, pko = q.data_ptr(), k.data_ptr(), qo.data_ptr(), ko.data_ptr()
        pc, ps = (cos.data_ptr(), sin.data_ptr()) if rope else (pq, pq)
        pw = pq if sylvester else matrix.data_ptr()
        if (pq | pk | pqo | pko | pc | ps | pw) & 15:
            return None
        launch(grid, 1, 1, stream_of(device), function, coop, pdl, None, None, packed, None,
               None, None, pq, pk, pqo, pko, pc, ps, pw, *tail)
        return qo, ko

    return fast


def _operand(q: torch.Tensor, matrix: torch.Tensor | None) -> torch.Tensor:
    """The kernel's W argument: q itself stands in for the generated Sylvester matrix."""
    if matrix is None:
        return q
    if matrix.dtype is q.dtype or matrix.dtype is torch.float32:
        return matrix
    return matrix.to(torch.float32)


def rotate_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    matrix: torch.Tensor | None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`try_rotate_qk` for tensors that must qualify (raises ValueError otherwise)."""
    out = try_rotate_qk(q, k, scale, matrix, cos, sin)
    if out is None:
        raise ValueError(
            "rotate_qk: these tensors are not supported by the fused kernel (see qk_supported): "
            f"q {tuple(q.shape)} {q.dtype} on {q.device}, k {tuple(k.shape)} {k.dtype}"
        )
    return out
