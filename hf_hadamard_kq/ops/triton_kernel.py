"""Triton kernel for the block-diagonal Hadamard transform (CUDA / ROCm, or the CPU interpreter).

``hadamard_triton(x, scale, matrix, block)`` multiplies every consecutive chunk of ``block``
elements along the last dim of ``x`` (as a row vector) by ``W`` — the Sylvester matrix
``H[i, j] = (-1) ** popcount(i & j)`` when ``matrix is None``, else ``matrix`` — times ``scale``,
accumulating in fp32 and rounding once to ``x.dtype``. It returns a new **contiguous** tensor
(what the op's ``register_fake``, ``x.new_empty(x.shape)``, reports), whatever the strides of
``x``.

Why it is built this way
------------------------
* The transform is memory bound: the floor is one read and one write of ``x``. Following
  HadaCore (arXiv 2412.09521), chunks are tiled as rows ``[BLOCK_M, n]`` and multiplied by the
  whole ``[n, n]`` matrix with ``tl.dot`` (fp32 accumulator). The ±1 entries are exact in
  fp16/bf16, so 16-bit inputs with the Sylvester matrix run on tensor cores with no loss: every
  product is exact and the sum is fp32. fp32 inputs, fp32 explicit matrices and mixed dtypes use
  fp32 operands with ``input_precision="ieee"`` (tf32 would drop ~13 mantissa bits).
* The Sylvester tile is generated in registers from the parity of ``i & j`` (no matrix load, no
  cache to keep per device). Generating or loading ``W`` costs ``n * n`` work per program, which
  is not negligible next to a ``[BLOCK_M, n]`` tile, so the kernel can be *persistent*: a grid
  of at most ``programs_per_sm * #SMs`` programs each builds ``W`` once and loops over row
  tiles. With the split forms below the matrix is small enough that one program per tile
  (``programs_per_sm = 0``) measured as fast or faster at most sizes; each configuration says
  which (:class:`RowsConfig`). To compare against a loaded matrix, pass the Sylvester matrix as
  ``matrix`` (same dtype as ``x``): that path loads ``W`` once per program instead.
* ``n < 16`` (``tl.dot`` needs every dimension >= 16) and non-power-of-two explicit matrices
  (80, 96, 112, 160, 192, ...) pad the tile to the next power of two >= 16 with masks: padded
  ``x`` columns load as zero, padded outputs are not stored. (Packing several small chunks into
  one 16-wide row with a block-diagonal ``W`` would waste less compute, but its zero blocks turn
  an inf in one chunk into NaN in its neighbours; these sizes are rare.)
* ``n`` up to 256 is one pass. A resident ``W`` is at most 128 x 128 (registers). Sylvester
  blocks can also be split: ``H_n = H_2 ⊗ H_{n/2}`` (``SPLIT2``), ``H_4 ⊗ H_{n/4}``
  (``SPLIT4``) or ``H_8 ⊗ H_{n/8}`` (``SPLIT8``, d = 256 decode): each part of a chunk goes
  through one resident small ``H`` and an fp32 butterfly combines them (exact products, fp32
  sums, still one final rounding). That cuts the per-program matrix generation and the
  tensor-core work (n/2, n/4 or n/8 instead of n MACs per element), and measured faster at
  prefill sizes for n = 128 and 256 and at decode sizes (the
  table :data:`TUNED_16BIT`, from benchmarks/tune_rows.py). Explicit ``W`` wider than 128 is
  split into ``NB x NB`` sub-tiles that are reloaded (L2) per row tile, with ``x`` sub-tiles
  re-read from L1/L2 per output block.
* ``n > 256`` (Sylvester only, up to 32768): ``H_{mb} = H_m ⊗ H_b`` (row index ``i = i_m*b +
  i_b``), i.e. for a chunk viewed as ``X (m, b)``: ``Y = H_m X H_b``. Pass 1 applies ``H_b``
  (32 <= b <= 256) to rows of ``x`` with the row kernel and writes an fp32 buffer; pass 2
  applies ``H_m`` (16 <= m <= 128) along the middle axis of the ``(outer, m, b)`` view of that
  buffer with an fp32 (ieee) dot, scales, and rounds once to ``x.dtype`` into ``out``. This
  costs extra traffic (an fp32 buffer, two passes): acceptable for research-size blocks; the
  models' R3 blocks (head_dim <= 256) take the one-pass path.
* Layout: a contiguous ``x`` is processed as flat memory (this is also the decode case: a
  ``(B, H, 1, d)`` transpose is contiguous). Otherwise the leading dims are collapsed; if at most
  three (size, stride) pairs remain and the last dim has stride 1 — e.g. the prefill
  ``(B, S, H, d).transpose(1, 2)`` view, or a ``x[..., :d]`` slice — the kernel decomposes each
  row index into those three indices and reads through the strides (sizes of 1 are specialised
  away by triton), writing contiguous rows. Anything else is made contiguous first.
* When every program has exactly one tile (``LOADS_FIRST``), the resident matrix is built
  after the tile's loads are issued, overlapping its generation with the load latency
  (measured: d = 256 prefill at 64-256 MiB +0.8-2.5 points of clone bandwidth; no change at
  decode sizes).
* Each measured tiling names its software-pipelining depth (``num_stages``; the others keep
  triton's default for the backend). triton's CUDA default (3) makes the tile loop's loads
  asynchronous copies through a ring of shared-memory buffers; at prefill sizes a program
  that runs one tile (every measured tiling but the medium class) gains nothing from that
  and loses occupancy and a staging hop: depth 1 measured 1-7 points of clone bandwidth
  faster. At decode sizes the best depth was 1 for d = 64 and 128 (d = 128 also moved from 2
  to 4 warps; together 0.06-0.1 us faster) and 2 for d = 256 (session 12).
* Decode-sized launches can use programmatic dependent launch (opt-in,
  ``HF_HADAMARD_KQ_PDL=1``; ``pdl.pdl_enabled`` says when and why it is not the default): the
  kernel's launch latency then overlaps the previous kernel, and the kernel waits for that
  kernel before touching memory.
* Host overhead matters (decode calls are ~1 token x 32 heads x 128): no autotuner; launch
  parameters come from :func:`rows_config` / :func:`mid_config` (cached pure functions of the
  size class, block and dtypes; tiles chosen so that nothing spills on sm_90), a Sylvester
  one-pass call whose (shape, strides, dtype, device, block) was seen before reuses its whole
  launch plan (:data:`_ROW_PLANS`, validation included), and the per-call Python is a
  few attribute reads and one launch (~4 us of Python on this CPU besides triton's launcher).

Interpreter caveat (``TRITON_INTERPRET=1``, triton 3.9)
-------------------------------------------------------
Two interpreter bugs concern bf16; both workarounds are compile-time flags that are off on GPUs.
Under the interpreter (detected from the environment when this module is imported, which is
also when triton decides whether ``@jit`` functions are interpreted; so set ``TRITON_INTERPRET=1``
before importing this module):

1. ``tl.dot`` on **bf16** operands returns garbage (numpy multiplies the raw bf16 bit patterns,
   stored as uint16); fp16 and fp32 operands are correct. bf16 inputs therefore take the
   fp32-operand (``DOT_F32``, ieee) path: exact for the ±1 matrix, it only changes which
   hardware path a GPU would use. On real GPUs bf16 ``tl.dot`` is correct.
2. The fp32 -> bf16 cast *truncates* (rounds toward zero) instead of rounding to nearest even as
   GPUs do, which would make results up to 1 ulp off. ``EMULATE_RTNE`` rounds with integer
   arithmetic on the fp32 bit pattern instead, so interpreter results are bit-identical to
   torch's ``float32 -> bfloat16`` rounding.

Compatibility: written against the triton 3.6 to 3.9 language (``tl.dot(..., input_precision=)``,
``tl.static_range``, runtime-step ``range`` loops); no autotuner, no descriptors, no TMA.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from typing import NamedTuple

import torch

if __package__:
    from . import cpp_launch
    from .pdl import pdl_enabled
else:  # loaded by file path, outside the package (the interpreter tests): no cached launches
    cpp_launch = None

    def pdl_enabled(device: torch.device) -> bool:
        """Loaded by file path: no programmatic dependent launch."""
        return False

try:  # triton is optional: CUDA builds of torch pin their own, CPU installs may lack it.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    _HAS_TRITON = False

__all__ = ["hadamard_triton", "mid_config", "rows_config", "triton_available"]

#: True when kernels run in the CPU interpreter (read once, like triton reads it for ``@jit``).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"

#: Persistent-grid size = ``PROGRAMS_PER_SM * multiprocessor count`` (upper bound).
PROGRAMS_PER_SM: int = 4
#: Program count used under the interpreter (programs run one after another on the CPU).
_INTERPRET_PROGRAMS: int = 4
#: Software-pipelining depth when a tiling does not name one: None, triton's own default for
#: the backend (3 on CUDA, 2 on ROCm in triton 3.x), which every launch used before session
#: 12. At 2 or more, triton pipelines the tile loop: the loads become asynchronous copies into
#: a ring of shared-memory buffers, one per stage — even when a program runs a single tile,
#: where that only costs shared memory and a staging hop.
DEFAULT_STAGES: int | None = None

#: Largest Sylvester block handled in one pass; larger blocks use the multi-pass path.
MAX_ONE_PASS: int = 256
#: Largest Sylvester block overall (2 ** 15).
MAX_SYLVESTER: int = 32768
#: Largest explicit matrix.
MAX_EXPLICIT: int = 256

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    """Return True when triton can be imported (the kernels below are then defined)."""
    return _HAS_TRITON


# ----------------------------------------------------------------------------------------------
# Launch parameters
# ----------------------------------------------------------------------------------------------


class RowsConfig(NamedTuple):
    """Compile-time parameters of the row kernel for one (block, operand kind, size class)."""

    bn: int  # sub-tile width (power of two >= 16)
    nb: int  # sub-tiles per tile row; padded width = nb * bn
    block_m: int  # tile rows per iteration
    num_warps: int
    log2n: int  # bits of the Sylvester index (0 for explicit matrices)
    programs_per_sm: int = PROGRAMS_PER_SM  # persistent grid bound; 0 = one program per tile
    num_stages: int | None = DEFAULT_STAGES  # triton's pipelining depth (1: none; None: its
    # default for the backend)


class MidConfig(NamedTuple):
    """Compile-time parameters of the middle-axis kernel for one factor ``m``."""

    block_i: int
    num_warps: int


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


#: At most this many chunks (rows) is a decode-sized call (up to 64 tokens x 32 heads): 16-bit
#: operands get their own tiling, 16-row tiles, one program each (latency-bound, not
#: bandwidth-bound; prefill sizes of >= 4 MiB have >= 8192 rows even at d = 256).
SMALL_ROWS: int = 2048

#: Measured tilings for Sylvester blocks with 16-bit operands, ``(n, small) -> (bn, block_m,
#: num_warps, programs_per_sm, num_stages)``; see :func:`rows_config` and
#: benchmarks/tune_rows.py.
#: Measured on an H100 (session 4, benchmarks/results/tune_rows_h100*.json): at prefill sizes
#: the split forms beat a resident H_128 (d = 128: 92-94% -> 96-98% of clone at >= 32 MiB,
#: 72% -> 96% at 8 MiB; d = 256: 79-94% -> 92-98% with H_4 ⊗ H_64), and decode-sized calls
#: want 16-row tiles (d = 128, one token: 3.1 -> 1.9 us in a CUDA graph); session 6
#: (tune_rows_h100_session6_decode.json): 2 warps for d = 128 decode, 1.785 / 1.995 / 2.135 us
#: at T = 1 / 16 / 64 vs 1.803 / 2.045 / 2.187 with 4 (an H_8 ⊗ H_16 form, bn = 16, measured
#: 2.0-2.4 us there and was not kept). Session 12 (tune_rows_h100_session12_*.json) added the
#: pipelining depth: triton's default (3) turns a one-tile program's loads into asynchronous
#: copies through a 3-deep shared-memory ring, which buys nothing there and costs occupancy
#: and a staging hop. With none (1), one program per tile: d = 64 prefill 95.7-96.5% ->
#: 97.6-98.7% of clone, d = 128 92.7-99.2% -> 97.9-101.6% (8 warps); decode d = 128 1.687 /
#: 1.857 / 1.978 us at T = 1 / 16 / 64 (4 warps) vs 1.786 / 1.932 / 2.039, d = 64 likewise;
#: d = 256 prefill 94.4-99.2% -> 97.8-99.2% (16-row tiles as before); d = 256 decode is best
#: with 2 stages (2.149 / 2.323 / 2.434 us vs 2.175 / 2.340 / 2.451). Session 23
#: (tune_rows_h100_session23_call1_decode.json, 5 alternating rounds): d = 256 decode with the
#: SPLIT8 form ``H_8 ⊗ H_32`` (whole rows, 4 warps, no pipelining) 1.874 / 2.020 / 2.287 us at
#: T = 1 / 16 / 64 vs 2.111 / 2.269 / 2.476 with ``H_4 ⊗ H_64`` (2 stages); d = 128 with
#: ``H_8 ⊗ H_16`` was slower than ``H_4 ⊗ H_32`` at every T (1.852 / 1.983 / 2.176 vs 1.591 /
#: 1.741 / 1.922). The (256, True) entry is also the row pass of two-pass blocks >= 4096 at
#: decode sizes (fp32 output into the buffer): not timed there; GPU-tested
#: (tests/test_gpu.py::test_large_blocks_at_decode_size).
#: Editing this (or :data:`TUNED_16BIT_MEDIUM`) at run time needs ``rows_config.cache_clear()``
#: and :func:`clear_plans` (both cache its result).
TUNED_16BIT: dict[tuple[int, bool], tuple[int, int, int, int, int]] = {
    (64, False): (64, 64, 4, 0, 1),
    (64, True): (32, 16, 4, 0, 1),
    (128, False): (64, 64, 8, 0, 1),
    (128, True): (32, 16, 4, 0, 1),
    (256, False): (64, 16, 4, 0, 1),
    (256, True): (32, 16, 4, 0, 1),
}

#: Chunk counts (inclusive) of the *medium* size class: prefill calls in this range use
#: :data:`TUNED_16BIT_MEDIUM` where it has an entry, else the large class of TUNED_16BIT.
MEDIUM_ROWS: tuple[int, int] = (16384, 65536)
#: ``n -> (bn, block_m, num_warps, programs_per_sm, num_stages)`` for the medium class.
#: Measured on H100s (sessions 4 and 6, tune_rows_h100_split4.json and
#: tune_rows_h100_session6_*.json): for
#: d = 256, 32-row tiles on a persistent grid of 4 programs per SM reach 94.6-100.2% of clone
#: at 16384-65536 chunks (16-32 MiB; 93.7-96.9% with the large-class tiling) but lose outside
#: that range (90.7% at 8192 chunks, 94.5% at 131072), hence the band. Other blocks measured
#: no consistent gain there.
TUNED_16BIT_MEDIUM: dict[int, tuple[int, int, int, int, int]] = {256: (64, 32, 4, 4, 3)}


@functools.cache
def rows_config(
    n: int, dot_f32: bool, sylvester: bool, small: bool = False, medium: bool = False
) -> RowsConfig:
    """Pick the row-kernel tiling for block ``n`` (padded width ``np2 = max(16, next_pow2(n))``).

    ``small``: the call has at most :data:`SMALL_ROWS` chunks (decode); ``medium``: its chunk
    count is in :data:`MEDIUM_ROWS` (then :data:`TUNED_16BIT_MEDIUM` is consulted first, for
    Sylvester blocks with 16-bit operands). Sylvester blocks with 16-bit operands use the
    measured table :data:`TUNED_16BIT` where it has an entry (n = 64, 128, 256 in both size
    classes); a ``bn`` of ``np2 / 2``, ``np2 / 4`` or ``np2 / 8`` there selects the kernel's
    ``SPLIT2`` / ``SPLIT4`` / ``SPLIT8`` form (``H_n = H_2 ⊗ H_{n/2}``, ``H_4 ⊗ H_{n/4}`` or
    ``H_8 ⊗ H_{n/8}``: a quarter, a sixteenth or a 64th of the resident matrix, 1/2, 1/4 or
    1/8 of the tensor-core work, an fp32 butterfly).

    Otherwise, starting points checked by compiling for sm_90 with triton 3.6 and 3.9 (no
    register spills, shared memory well under the 227 KiB limit):

    * 16-bit operands (tensor cores): ``W`` resident up to 128 x 128; ``np2 = 256`` has
      ``nb = 2``: a resident ``H_128`` used twice (Sylvester outside the table, the kernel's
      ``SPLIT2``) or 128-wide sub-tiles (explicit ``W``); ``BLOCK_M = 8192 / np2`` rows in
      [32, 256] (16 rows for small calls).
    * fp32 operands (ieee: FMA, no tensor cores): ``W`` resident up to 128 x 128 with
      ``BLOCK_M = 16`` at 128; 64-wide sub-tiles (``nb = 4``) for 256, since a resident fp32
      ``H_128`` used twice spills: Sylvester takes ``SPLIT4`` (one resident fp32 ``H_64``), an
      explicit ``W`` reloads its sub-tiles; ``BLOCK_M = 4096 / np2`` (max 128) below 128.
    """
    np2 = max(16, _next_pow2(n))
    log2n = (n.bit_length() - 1) if sylvester else 0
    tuned = None
    if sylvester and not dot_f32:
        tuned = (medium and TUNED_16BIT_MEDIUM.get(n)) or TUNED_16BIT.get((n, small))
    if tuned is not None:
        bn, block_m, num_warps, pps, stages = tuned
        return RowsConfig(bn, np2 // bn, block_m, num_warps, log2n, pps, stages)
    if dot_f32:
        bn = min(np2, 128) if np2 <= 128 else 64
        block_m = 16 if np2 >= 128 else min(128, 4096 // np2)
        num_warps = 8 if np2 >= 64 else 4
    else:
        bn = min(np2, 128)
        block_m = 16 if small else max(32, min(256, 8192 // np2))
        num_warps = 4 if block_m * bn <= 4096 else 8
    return RowsConfig(bn, np2 // bn, block_m, num_warps, log2n)


@functools.cache
def mid_config(m: int, inner: int) -> MidConfig:
    """Tiling of the middle-axis pass: ``[m, block_i]`` tiles of the fp32 buffer (ieee dot).

    ``block_i = 1024 / m`` in [16, 128] (and <= inner); 8 warps for ``m = 128`` (no spills).
    """
    block_i = max(16, min(_next_pow2(inner), 1024 // m, 128))
    return MidConfig(block_i, 8 if m >= 128 else 4)


def has_resident_w(cfg: RowsConfig, sylvester: bool) -> bool:
    """Whether the row kernel keeps one ``[bn, bn]`` matrix in registers for a tiling: ``W``
    itself (``nb == 1``) or the factor of a split Sylvester form (``nb`` 2, 4 or 8); otherwise
    (explicit ``W`` wider than 128) it reloads sub-tiles."""
    return cfg.nb == 1 or (sylvester and cfg.nb in (2, 4, 8))


def takes_whole_rows(cfg: RowsConfig, sylvester: bool, small: bool) -> bool:
    """Whether a launch with this tiling moves whole rows (the row kernel's ``WHOLE_ROWS``):
    decode-sized (``small``) split Sylvester forms with 32-wide parts (d = 64 and 128), and the
    ``SPLIT8`` form always (it has no part-wise form: eight loads and stores of 64-byte pieces
    per row are what whole rows avoid). Measured on H100s (session 22): 0.05-0.13 us faster at
    d = 64 and 128; ``H_4 ⊗ H_64`` (64-wide parts) gained nothing from joined stores and lost
    1 us with whole-row loads; prefill tilings were not measured."""
    if sylvester and cfg.nb == 8:  # SPLIT8 has no part-wise form
        return True
    return small and sylvester and cfg.nb in (2, 4) and cfg.bn <= 32


@functools.cache
def _max_programs(device: torch.device, programs_per_sm: int = PROGRAMS_PER_SM) -> int:
    """Persistent-grid bound for ``device``; ``programs_per_sm = 0``: unbounded (a program per
    tile)."""
    if programs_per_sm == 0:
        return 2**31 - 1
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, programs_per_sm * sms)
    return _INTERPRET_PROGRAMS


def _plan_passes(n: int) -> tuple[int, int]:
    """Split ``n = 2**k`` (256 < n <= 32768) as ``b * m``: row factor ``b`` in [32, 256], middle
    factor ``m`` in [16, 128].

    The big factor goes to the row pass (16-bit tensor-core operands for 16-bit inputs); the
    middle pass runs an fp32 (ieee) dot whose cost grows with ``m``, so it stays small.
    """
    k = n.bit_length() - 1
    kb = min(8, k - 4)
    return 1 << kb, 1 << (k - kb)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

if _HAS_TRITON:

    @triton.jit
    def _w_tile(
        w_ptr,
        ri,
        cj,
        N: tl.constexpr,
        LOG2N: tl.constexpr,
        SYLVESTER: tl.constexpr,
        F32: tl.constexpr,
    ):
        """Tile of ``W`` at rows ``ri``, cols ``cj`` (loaded ``W``: zero outside ``N x N``).

        Returned as fp32 when ``F32``, else in ``w_ptr``'s element type (for Sylvester tiles the
        caller passes ``x``'s pointer, so that is ``x.dtype``).
        """
        i = ri[:, None]
        j = cj[None, :]
        if SYLVESTER:
            # parity of popcount(i & j) by xor-folding (N <= 256: at most shifts 4, 2, 1), then
            # +-1.0 built from its bit pattern (sign bit = parity): no int -> float conversion.
            par = i & j & (N - 1)
            for k in tl.static_range(4):
                if (8 >> k) < LOG2N:
                    par = par ^ (par >> (8 >> k))
            neg = par & 1
            if F32:
                w = ((neg.to(tl.uint32) << 31) | 0x3F800000).to(tl.float32, bitcast=True)
            elif w_ptr.dtype.element_ty == tl.bfloat16:
                w = ((neg.to(tl.uint16) << 15) | 0x3F80).to(tl.bfloat16, bitcast=True)
            else:
                w = ((neg.to(tl.uint16) << 15) | 0x3C00).to(tl.float16, bitcast=True)
            # (entries outside N x N are not zeroed: they meet zero-padded x columns or
            # produce output columns that are never stored)
        else:
            w = tl.load(w_ptr + i * N + j, mask=(i < N) & (j < N), other=0.0)
            if F32:
                w = w.to(tl.float32)
            else:
                w = w.to(w_ptr.dtype.element_ty)
        return w

    @triton.jit
    def _round_to(y, out_ptr, EMULATE_RTNE: tl.constexpr):
        """Round fp32 ``y`` to ``out_ptr``'s element type; ``EMULATE_RTNE``: bf16 round to nearest
        even by integer arithmetic (interpreter only: its fp32 -> bf16 cast truncates; NaN
        payloads are not preserved)."""
        if EMULATE_RTNE:
            bits = y.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return y.to(out_ptr.dtype.element_ty)

    @triton.jit
    def _split_row(x, BN: tl.constexpr):
        """``x[:, :BN], x[:, BN:]`` of a ``[BLOCK_M, 2 * BN]`` tile, in registers."""
        return tl.split(tl.permute(tl.reshape(x, (x.shape[0], 2, BN)), (0, 2, 1)))

    @triton.jit
    def _join_row(y0, y1):
        """``[y0 | y1]``: two ``[BLOCK_M, BN]`` tiles as one ``[BLOCK_M, 2 * BN]`` tile."""
        return tl.reshape(tl.permute(tl.join(y0, y1), (0, 2, 1)), (y0.shape[0], 2 * y0.shape[1]))

    @triton.jit
    def _split4(x, BN: tl.constexpr):
        """The four ``BN``-wide parts of a ``[BLOCK_M, 4 * BN]`` tile, in registers."""
        x01, x23 = _split_row(x, 2 * BN)
        x0, x1 = _split_row(x01, BN)
        x2, x3 = _split_row(x23, BN)
        return x0, x1, x2, x3

    @triton.jit
    def _butterfly4(z0, z1, z2, z3):
        """``H_4 (z0, z1, z2, z3)`` in natural (Sylvester) order, in fp32."""
        a, b, c, e = z0 + z1, z0 - z1, z2 + z3, z2 - z3
        return a + c, b + e, a - c, b - e

    @triton.jit
    def _dots4(x0, x1, x2, x3, w, zero, F32: tl.constexpr):
        """Four parts of a split tile, each times the resident factor ``w``."""
        return (_dot(x0, w, zero, F32), _dot(x1, w, zero, F32), _dot(x2, w, zero, F32),
                _dot(x3, w, zero, F32))

    @triton.jit
    def _store_joined(ptr, y0, y1, scale, mask, out_ptr, EMULATE_RTNE: tl.constexpr):
        """``[y0 | y1] * scale``, each rounded once, stored as one ``2 * BN``-wide row per tile
        row (the split forms' whole-row stores)."""
        tl.store(ptr, _join_row(_round_to(y0 * scale, out_ptr, EMULATE_RTNE),
                                _round_to(y1 * scale, out_ptr, EMULATE_RTNE)), mask=mask)

    @triton.jit
    def _load_x(x_ptr, offs, mask, F32: tl.constexpr):
        xk = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if F32:
            xk = xk.to(tl.float32)
        return xk

    @triton.jit
    def _dot(a, b, acc, F32: tl.constexpr):
        if F32:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _resident_w(w_ptr, rk, N: tl.constexpr, BN: tl.constexpr, LOG2N: tl.constexpr,
                    SYLVESTER: tl.constexpr, NB: tl.constexpr, SPLIT2: tl.constexpr,
                    DOT_F32: tl.constexpr):
        """The ``[BN, BN]`` matrix a tile multiplies by when it is held in registers: ``W``
        itself (``NB == 1``) or the small Sylvester factor of the split forms."""
        if NB == 1:
            w = _w_tile(w_ptr, rk, rk, N, LOG2N, SYLVESTER, DOT_F32)
        elif SPLIT2:
            w = _w_tile(w_ptr, rk, rk, BN, LOG2N - 1, True, DOT_F32)
        elif NB == 4:  # SPLIT4
            w = _w_tile(w_ptr, rk, rk, BN, LOG2N - 2, True, DOT_F32)
        else:  # SPLIT8
            w = _w_tile(w_ptr, rk, rk, BN, LOG2N - 3, True, DOT_F32)
        return w

    @triton.jit
    def _tile_w(w_full, w_ptr, rk, N: tl.constexpr, BN: tl.constexpr, LOG2N: tl.constexpr,
                SYLVESTER: tl.constexpr, NB: tl.constexpr, SPLIT2: tl.constexpr,
                DOT_F32: tl.constexpr, LOADS_FIRST: tl.constexpr):
        """The resident matrix for the current tile: built here, after the tile's loads were
        issued (``LOADS_FIRST``), or ``w_full``, built once before the persistent loop."""
        if LOADS_FIRST:
            w = _resident_w(w_ptr, rk, N, BN, LOG2N, SYLVESTER, NB, SPLIT2, DOT_F32)
        else:
            w = w_full
        return w

    @triton.jit
    def _rows_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        n_rows,
        n_tiles,
        chunks_per_row,
        n1,
        n2,
        s0,
        s1,
        s2,
        scale,
        N: tl.constexpr,
        BN: tl.constexpr,
        NB: tl.constexpr,
        BLOCK_M: tl.constexpr,
        LOG2N: tl.constexpr,
        SYLVESTER: tl.constexpr,
        STRIDED: tl.constexpr,
        STRIDED_OUT: tl.constexpr,
        SPLIT2: tl.constexpr,
        SPLIT4: tl.constexpr,
        SPLIT8: tl.constexpr,
        LOADS_FIRST: tl.constexpr,
        WIDE: tl.constexpr,
        WHOLE_ROWS: tl.constexpr,
        DOT_F32: tl.constexpr,
        EMULATE_RTNE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """``out[r] = (x[r] @ W) * scale`` for every chunk ``r`` of ``N`` elements.

        ``out`` is contiguous: tile ``t`` (chunks ``t*BLOCK_M ...``) is the memory from
        ``t*BLOCK_M*N``, addressed as a scalar int64 base plus int32 offsets.
        Flat mode (``STRIDED`` False): ``x`` is contiguous and uses the same offsets. Strided
        mode: chunk ``r`` is chunk ``c = r % chunks_per_row`` of the row
        ``q = r // chunks_per_row = (i0*n1 + i1)*n2 + i2``, at ``i0*s0 + i1*s1 + i2*s2 + c*N``
        in ``x`` (int32 offsets unless ``WIDE``: the largest offset needs int64).
        ``STRIDED_OUT`` (with ``STRIDED``): the same decomposition addresses ``out`` instead,
        and ``x`` is read flat: for a dense ``x`` whose memory order is not its logical order
        (the projection's ``(B, S, H, D).transpose(1, 2)`` view), chunks are taken in memory
        order, so each tile's loads are one contiguous block and its stores are scattered
        (measured faster at decode sizes than scattered loads: a load's latency is on the
        tile's critical path, a store's is not).
        ``WHOLE_ROWS`` (the split forms, ``SPLIT2`` / ``SPLIT4``; ``SPLIT8`` always): each tile
        row is loaded whole and split into its ``BN``-wide parts in registers, and the outputs
        are joined into ``2 * BN``-wide rows before they are stored, instead of one load and
        one store per part. With ``BN = 32`` (the decode tilings of d = 64, 128 and 256) the
        parts are 64-byte pieces: 8-byte vector accesses and an epilogue through shared memory
        with more barriers, where the whole rows take 16-byte vectors and ``stmatrix``.
        ``LOADS_FIRST`` (every program has exactly one tile): build the resident ``W`` after
        issuing the tile's loads instead of before the loop, so that the matrix generation
        overlaps the load latency (decode-sized calls are latency-bound).
        ``PDL`` (launched with programmatic dependent launch, ``pdl.pdl_enabled``): the
        programs may start while the previous kernel in the stream still runs, so they wait
        for it (``griddepcontrol.wait``) after the register-only set-up and before their first
        load or store -- reading ``x`` or writing ``out`` earlier could race with it.
        """
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BN)
        # SPLIT2 (Sylvester, N = 2 * BN): H_N = H_2 ⊗ H_BN, so with x = [x0, x1] (halves of a
        # chunk) and z_i = x_i @ H_BN: y = [z0 + z1, z0 - z1]. One resident H_BN, two dots.
        # SPLIT4 (Sylvester, N = 4 * BN): H_N = H_4 ⊗ H_BN, the same with a 4-point butterfly;
        # SPLIT8 (N = 8 * BN, always WHOLE_ROWS): H_8 ⊗ H_BN, an 8-point butterfly.
        # PDL: wait for the previous kernel before touching memory -- after building a
        # Sylvester W (registers only), before loading an explicit one (it may be that
        # kernel's output)
        if PDL and not SYLVESTER:
            tl.extra.cuda.gdc_wait()
        w_full = 0  # placeholder: built per tile (LOADS_FIRST), or none (explicit W > 128)
        if not LOADS_FIRST:
            if NB == 1 or SPLIT2 or SPLIT4 or SPLIT8:  # W stays in registers for the loop
                w_full = _resident_w(w_ptr, rk, N, BN, LOG2N, SYLVESTER, NB, SPLIT2, DOT_F32)
        if PDL and SYLVESTER:
            tl.extra.cuda.gdc_wait()
        for t in range(pid, n_tiles, nprog):
            start = tl.cast(t, tl.int64) * (BLOCK_M * N)
            o_ptr = out_ptr + start
            row_ok = (t * BLOCK_M + rm) < n_rows
            o_row = rm * N  # int32, relative to start
            if STRIDED:
                rows = t * BLOCK_M + rm  # row decomposition in int32 (n_rows < 2**31)
                q = rows // chunks_per_row
                c = rows % chunks_per_row
                i2 = q % n2
                q = q // n2
                i1 = q % n1
                i0 = q // n1
                if WIDE:
                    i0 = i0.to(tl.int64)
                    i1 = i1.to(tl.int64)
                    i2 = i2.to(tl.int64)
                if STRIDED_OUT:  # x flat (memory order), out at the decomposed offsets
                    x_row = o_row
                    x_tile = x_ptr + start
                    o_row = i0 * s0 + i1 * s1 + i2 * s2 + c * N
                    o_ptr = out_ptr
                else:
                    x_row = i0 * s0 + i1 * s1 + i2 * s2 + c * N
                    x_tile = x_ptr
            else:
                x_row = o_row
                x_tile = x_ptr + start
            if NB == 1:
                mask = row_ok[:, None] & (rk < N)[None, :]
                xk = _load_x(x_tile, x_row[:, None] + rk[None, :], mask, DOT_F32)
                w_use = _tile_w(w_full, w_ptr, rk, N, BN, LOG2N, SYLVESTER, NB, SPLIT2, DOT_F32,
                                LOADS_FIRST)
                acc = _dot(xk, w_use, tl.zeros((BLOCK_M, BN), dtype=tl.float32), DOT_F32)
                y = _round_to(acc * scale, out_ptr, EMULATE_RTNE)
                tl.store(o_ptr + o_row[:, None] + rk[None, :], y, mask=mask)
            elif SPLIT2:
                zero = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
                mask = row_ok[:, None] & (rk < BN)[None, :]
                if WHOLE_ROWS:
                    r2 = tl.arange(0, 2 * BN)
                    mask2 = row_ok[:, None] & (r2 < 2 * BN)[None, :]
                    x0, x1 = _split_row(
                        _load_x(x_tile, x_row[:, None] + r2[None, :], mask2, DOT_F32), BN)
                else:
                    x0 = _load_x(x_tile, x_row[:, None] + rk[None, :], mask, DOT_F32)
                    x1 = _load_x(x_tile, x_row[:, None] + (rk + BN)[None, :], mask, DOT_F32)
                w_use = _tile_w(w_full, w_ptr, rk, N, BN, LOG2N, SYLVESTER, NB, SPLIT2, DOT_F32,
                                LOADS_FIRST)
                z0 = _dot(x0, w_use, zero, DOT_F32)
                z1 = _dot(x1, w_use, zero, DOT_F32)
                y0 = _round_to((z0 + z1) * scale, out_ptr, EMULATE_RTNE)
                if WHOLE_ROWS:
                    y1 = _round_to((z0 - z1) * scale, out_ptr, EMULATE_RTNE)
                    tl.store(o_ptr + o_row[:, None] + r2[None, :], _join_row(y0, y1), mask=mask2)
                else:
                    tl.store(o_ptr + o_row[:, None] + rk[None, :], y0, mask=mask)
                    y1 = _round_to((z0 - z1) * scale, out_ptr, EMULATE_RTNE)
                    tl.store(o_ptr + o_row[:, None] + (rk + BN)[None, :], y1, mask=mask)
            elif SPLIT4:
                zero = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
                mask = row_ok[:, None] & (rk < BN)[None, :]
                x_at = x_row[:, None] + rk[None, :]
                o_at = o_row[:, None] + rk[None, :]
                if WHOLE_ROWS:
                    r4 = tl.arange(0, 4 * BN)
                    x0, x1, x2, x3 = _split4(_load_x(
                        x_tile, x_row[:, None] + r4[None, :],
                        row_ok[:, None] & (r4 < 4 * BN)[None, :], DOT_F32), BN)
                else:
                    x0 = _load_x(x_tile, x_at, mask, DOT_F32)
                    x1 = _load_x(x_tile, x_at + BN, mask, DOT_F32)
                    x2 = _load_x(x_tile, x_at + 2 * BN, mask, DOT_F32)
                    x3 = _load_x(x_tile, x_at + 3 * BN, mask, DOT_F32)
                w_use = _tile_w(w_full, w_ptr, rk, N, BN, LOG2N, SYLVESTER, NB, SPLIT2, DOT_F32,
                                LOADS_FIRST)
                z0, z1, z2, z3 = _dots4(x0, x1, x2, x3, w_use, zero, DOT_F32)
                # _butterfly4 spelled out: it computes all four sums before the first store,
                # which reorders the part-wise (prefill) tilings' SASS (triton 3.6; unmeasured)
                a = z0 + z1
                b = z0 - z1
                c = z2 + z3
                e = z2 - z3
                if WHOLE_ROWS:
                    r2 = tl.arange(0, 2 * BN)
                    mask2 = row_ok[:, None] & (r2 < 2 * BN)[None, :]
                    o_at2 = o_row[:, None] + r2[None, :]
                    _store_joined(o_ptr + o_at2, a + c, b + e, scale, mask2, out_ptr,
                                  EMULATE_RTNE)
                    _store_joined(o_ptr + o_at2 + 2 * BN, a - c, b - e, scale, mask2, out_ptr,
                                  EMULATE_RTNE)
                else:
                    tl.store(o_ptr + o_at, _round_to((a + c) * scale, out_ptr, EMULATE_RTNE),
                             mask=mask)
                    tl.store(o_ptr + o_at + BN, _round_to((b + e) * scale, out_ptr, EMULATE_RTNE),
                             mask=mask)
                    tl.store(o_ptr + o_at + 2 * BN,
                             _round_to((a - c) * scale, out_ptr, EMULATE_RTNE), mask=mask)
                    tl.store(o_ptr + o_at + 3 * BN,
                             _round_to((b - e) * scale, out_ptr, EMULATE_RTNE), mask=mask)
            elif SPLIT8:
                tl.static_assert(WHOLE_ROWS, "SPLIT8 is only compiled with whole rows")
                zero = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
                r8 = tl.arange(0, 8 * BN)
                xw = _load_x(x_tile, x_row[:, None] + r8[None, :],
                             row_ok[:, None] & (r8 < 8 * BN)[None, :], DOT_F32)
                xa, xb = _split_row(xw, 4 * BN)  # parts 0-3, 4-7
                x0, x1, x2, x3 = _split4(xa, BN)
                x4, x5, x6, x7 = _split4(xb, BN)
                w_use = _tile_w(w_full, w_ptr, rk, N, BN, LOG2N, SYLVESTER, NB, SPLIT2, DOT_F32,
                                LOADS_FIRST)
                # H_8 = H_2 ⊗ H_4: a 4-point butterfly on each half, then one at distance 4
                b0, b1, b2, b3 = _butterfly4(*_dots4(x0, x1, x2, x3, w_use, zero, DOT_F32))
                b4, b5, b6, b7 = _butterfly4(*_dots4(x4, x5, x6, x7, w_use, zero, DOT_F32))
                r2 = tl.arange(0, 2 * BN)
                mask2 = row_ok[:, None] & (r2 < 2 * BN)[None, :]
                o_at2 = o_row[:, None] + r2[None, :]
                _store_joined(o_ptr + o_at2, b0 + b4, b1 + b5, scale, mask2, out_ptr,
                              EMULATE_RTNE)
                _store_joined(o_ptr + o_at2 + 2 * BN, b2 + b6, b3 + b7, scale, mask2, out_ptr,
                              EMULATE_RTNE)
                _store_joined(o_ptr + o_at2 + 4 * BN, b0 - b4, b1 - b5, scale, mask2, out_ptr,
                              EMULATE_RTNE)
                _store_joined(o_ptr + o_at2 + 6 * BN, b2 - b6, b3 - b7, scale, mask2, out_ptr,
                              EMULATE_RTNE)
            else:
                # W wider than BN (explicit W > 128): NB x NB sub-tile
                # products in runtime (not unrolled) loops, so they all reuse the same shared
                # memory; W sub-tiles are reloaded or rebuilt, x sub-tiles re-read (L1/L2).
                for nb in range(NB):
                    acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
                    for kb in range(NB):
                        ck = kb * BN + rk
                        mask = row_ok[:, None] & (ck < N)[None, :]
                        xk = _load_x(x_tile, x_row[:, None] + ck[None, :], mask, DOT_F32)
                        wk = _w_tile(w_ptr, ck, nb * BN + rk, N, LOG2N, SYLVESTER, DOT_F32)
                        acc = _dot(xk, wk, acc, DOT_F32)
                    cn = nb * BN + rk
                    mask = row_ok[:, None] & (cn < N)[None, :]
                    y = _round_to(acc * scale, out_ptr, EMULATE_RTNE)
                    tl.store(o_ptr + o_row[:, None] + cn[None, :], y, mask=mask)

    @triton.jit
    def _mid_kernel(
        buf_ptr,
        out_ptr,
        inner,
        n_itiles,
        n_tiles,
        scale,
        M: tl.constexpr,
        LOG2M: tl.constexpr,
        BLOCK_I: tl.constexpr,
        EMULATE_RTNE: tl.constexpr,
    ):
        """Apply ``H_M`` along axis 1 of the contiguous fp32 view ``(outer, M, inner)``.

        ``out`` has the same (contiguous) offsets as ``buf``.
        """
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        rm = tl.arange(0, M)
        ri = tl.arange(0, BLOCK_I)
        h = _w_tile(buf_ptr, rm, rm, M, LOG2M, True, True)
        for t in range(pid, n_tiles, nprog):
            o = t // n_itiles
            cols = (t % n_itiles) * BLOCK_I + ri
            offs = tl.cast(o, tl.int64) * (M * inner) + rm[:, None] * inner + cols[None, :]
            mask = (cols < inner)[None, :]
            xt = tl.load(buf_ptr + offs, mask=mask, other=0.0)
            y = tl.dot(h, xt, input_precision="ieee") * scale
            tl.store(out_ptr + offs, _round_to(y, out_ptr, EMULATE_RTNE), mask=mask)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def _cached_launcher(fn, specialized_ints: bool = True):
    """A :class:`~hf_hadamard_kq.ops.launch.CachedLauncher` for ``fn`` (skips triton's per-call
    binding; see launch.py), or None under the interpreter or when this module is loaded on
    its own (the interpreter tests load it by file path, outside the package): callers then
    launch ``fn`` the plain triton way."""
    if INTERPRET or not _HAS_TRITON or not __package__:
        return None
    from .launch import CachedLauncher

    return CachedLauncher(fn, specialized_ints)


_ROWS = _cached_launcher(_rows_kernel) if _HAS_TRITON else None


def _row_layout(x: torch.Tensor) -> tuple[int, int, int, int, int] | None:
    """``(n1, n2, s0, s1, s2)``: row ``(i0*n1 + i1)*n2 + i2`` of x starts at ``i0*s0 + i1*s1 +
    i2*s2`` (elements), the last dim having stride 1; None when more than three leading
    (size, stride) pairs remain after dropping size-1 dims and merging collapsible neighbours.
    """
    if x.stride(-1) != 1 and x.shape[-1] != 1:
        return None
    return _three_levels(_collapse(zip(x.shape[:-1], x.stride()[:-1])))


def _collapse(pairs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(size, stride)`` pairs, outermost first, without size-1 dims and with each pair
    merged into its outer neighbour where the two address memory as one dim."""
    dims: list[tuple[int, int]] = []
    for sz, st in pairs:
        if sz == 1:
            continue
        if dims and dims[-1][1] == st * sz:
            dims[-1] = (dims[-1][0] * sz, st)
        else:
            dims.append((sz, st))
    return dims


def _three_levels(dims: list[tuple[int, int]]) -> tuple[int, int, int, int, int] | None:
    """The kernel's ``(n1, n2, s0, s1, s2)`` for collapsed dims (:func:`_collapse`, padded
    in place with outer size-1 levels); None when there are more than three."""
    if len(dims) > 3:
        return None
    while len(dims) < 3:
        dims.insert(0, (1, 0))
    (_, s0), (n1, s1), (n2, s2) = dims
    return n1, n2, s0, s1, s2


class _OutRows(tuple):
    """A :func:`_row_layout`-style ``(n1, n2, s0, s1, s2)`` that addresses the *output*'s rows
    in ``x``'s memory order (the kernel's ``STRIDED_OUT``: x is read flat); see
    :func:`_dense_layout`. Never equal to a plain tuple of the same values (which addresses
    x instead), so the two cannot be confused by a cache keyed on layouts."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is _OutRows and tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash((_OutRows, tuple(self)))


def _dense_layout(x: torch.Tensor) -> _OutRows | None:
    """For a dense ``x`` (no gaps, no overlap, last dim innermost) whose memory order differs
    from its logical order: where each of its rows, taken in memory order, goes in the
    contiguous output, as :class:`_OutRows`; None otherwise (contiguous, or not dense: then
    :func:`_row_layout` addresses x instead).

    Why: reading such an x through its strides (the projection's ``(B, S, H, D).transpose(1,
    2)`` view at decode) makes every tile load scattered rows, and a load's latency is on the
    tile's critical path; reading x in memory order makes each tile's loads one contiguous
    block and scatters the stores instead (H100, decode, d = 128: 2.00 vs 2.15 us at 64
    tokens with contiguous stores, benchmarks/results/decode_layout_h100_session11_call3.json).
    """
    d = x.shape[-1]
    if x.stride(-1) != 1 and d != 1:
        return None
    out_strides = []
    step = d
    for sz in reversed(x.shape[:-1]):  # the contiguous output's strides
        out_strides.append(step)
        step *= sz
    out_strides.reverse()
    dims = sorted(((st, sz, ost) for sz, st, ost in zip(x.shape[:-1], x.stride()[:-1],
                                                         out_strides) if sz != 1), reverse=True)
    expect = d  # dense: strides, innermost first, are the running products of the sizes
    for st, sz, _ in reversed(dims):
        if st != expect:
            return None
        expect *= sz
    merged = _collapse((sz, ost) for _, sz, ost in dims)  # (size, out stride), memory order
    if len(merged) <= 1:  # memory order is the logical order: x is (effectively) contiguous
        return None
    levels = _three_levels(merged)
    return None if levels is None else _OutRows(levels)


_FLAT = None  # layout marker: x is contiguous
#: Strided offsets at or above this use int64 index math (a knob so tests can force it).
_WIDE_OFFSETS = 2**31


class _RowsPlan(NamedTuple):
    """Everything a row-kernel launch derives from x's shape/strides/dtypes (host cost: decode
    calls are ~2 us of GPU work, so per-call Python matters; see launch.py)."""

    grid: int
    scalars: tuple  # the launch's int scalars (scale is appended per call)
    meta: dict
    key: tuple
    int_key: tuple | None  # the launcher's key of the int scalars (None: no launcher)
    num_warps: int
    num_stages: int | None

    @property
    def pdl(self) -> bool:
        """Compiled (the ``PDL`` constexpr) and launched with programmatic dependent launch."""
        return self.meta["PDL"]


def _rows_plan(
    x: torch.Tensor,
    w: torch.Tensor,
    out_dtype: torch.dtype,
    n: int,
    sylvester: bool,
    dot_f32: bool,
    layout: tuple[int, int, int, int, int] | None,
) -> _RowsPlan:
    numel = x.numel()
    strided = layout is not None
    strided_out = type(layout) is _OutRows
    n1, n2, s0, s1, s2 = layout if strided else (1, 1, 0, 0, 0)
    wide = False
    if strided:  # int64 index math only when an offset into x (or out) can reach 2**31
        d = x.shape[-1]
        n0 = numel // (d * n1 * n2)
        wide = (n0 - 1) * s0 + (n1 - 1) * s1 + (n2 - 1) * s2 + d >= _WIDE_OFFSETS
    n_rows = numel // n
    medium = MEDIUM_ROWS[0] <= n_rows <= MEDIUM_ROWS[1]
    small = n_rows <= SMALL_ROWS
    cfg = rows_config(n, dot_f32, sylvester, small, medium)
    pdl = small and pdl_enabled(x.device)
    n_tiles = (n_rows + cfg.block_m - 1) // cfg.block_m
    grid = min(n_tiles, _max_programs(x.device, cfg.programs_per_sm))
    scalars = (n_rows, n_tiles, x.shape[-1] // n if strided else 1, n1, n2, s0, s1, s2)
    meta = dict(
        N=n, BN=cfg.bn, NB=cfg.nb, BLOCK_M=cfg.block_m, LOG2N=cfg.log2n, SYLVESTER=sylvester,
        STRIDED=strided, STRIDED_OUT=strided_out, SPLIT2=sylvester and cfg.nb == 2,
        SPLIT4=sylvester and cfg.nb == 4, SPLIT8=sylvester and cfg.nb == 8,
        LOADS_FIRST=has_resident_w(cfg, sylvester) and grid == n_tiles, WIDE=wide,
        WHOLE_ROWS=takes_whole_rows(cfg, sylvester, small), DOT_F32=dot_f32,
        EMULATE_RTNE=INTERPRET and out_dtype is torch.bfloat16, PDL=pdl,
    )  # fmt: skip
    # every constexpr, warps and stages (the launcher reuses a compiled kernel by this key)
    key = (*meta.values(), cfg.num_warps, cfg.num_stages, x.dtype, w.dtype, out_dtype)
    int_key = None if _ROWS is None else _ROWS.int_key(scalars)
    return _RowsPlan(grid, scalars, meta, key, int_key, cfg.num_warps, cfg.num_stages)


def stage_option(num_stages: int | None, pdl: bool = False) -> dict:
    """The launch keywords for a pipelining depth (none for None: triton's backend default)
    and for programmatic dependent launch (only when on: triton < 3.3 has no such option)."""
    opts = {} if num_stages is None else {"num_stages": num_stages}
    if pdl:
        opts["launch_pdl"] = True
    return opts


def _launch_plan(plan: _RowsPlan, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
                 scale: float) -> None:
    """One row-kernel launch as ``plan`` describes it (``_rows_plan`` of these tensors'
    layout)."""
    if _ROWS is None:  # interpreter, or no launcher: the plain triton call
        _rows_kernel[(plan.grid,)](x, w, out, *plan.scalars, scale, **plan.meta,
                                   num_warps=plan.num_warps,
                                   **stage_option(plan.num_stages, plan.pdl))
        return
    _ROWS.launch(plan.grid, plan.key, x.get_device(), (x, w, out), (*plan.scalars, scale),
                 plan.meta, plan.num_warps, plan.int_key, plan.num_stages, plan.pdl)


def _launch_rows(
    x: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    n: int,
    sylvester: bool,
    dot_f32: bool,
    layout: tuple[int, int, int, int, int] | None,
) -> None:
    """Row kernel over x (flat when ``layout`` is None, else see :func:`_row_layout`)."""
    _launch_plan(_rows_plan(x, w, out.dtype, n, sylvester, dot_f32, layout), x, w, out, scale)


def _launch_mid(buf: torch.Tensor, out: torch.Tensor, m: int, inner: int, scale: float) -> None:
    cfg = mid_config(m, inner)
    outer = buf.numel() // (m * inner)
    n_itiles = (inner + cfg.block_i - 1) // cfg.block_i
    n_tiles = outer * n_itiles
    grid = (min(n_tiles, _max_programs(buf.device)),)
    _mid_kernel[grid](
        buf,
        out,
        inner,
        n_itiles,
        n_tiles,
        scale,
        M=m,
        LOG2M=m.bit_length() - 1,
        BLOCK_I=cfg.block_i,
        EMULATE_RTNE=INTERPRET and out.dtype is torch.bfloat16,
        num_warps=cfg.num_warps,
    )


def _run(
    x: torch.Tensor,
    out: torch.Tensor,
    w: torch.Tensor,
    scale: float,
    block: int,
    sylvester: bool,
    dot_f32: bool,
    layout: tuple[int, int, int, int, int] | None,
) -> None:
    if block <= MAX_ONE_PASS:
        _launch_rows(x, w, out, scale, block, sylvester, dot_f32, layout)
        return
    # Two-pass Kronecker path (H_n = H_m ⊗ H_b): contiguous fp32 buffer.
    b, m = _plan_passes(block)
    buf = torch.empty(x.numel(), dtype=torch.float32, device=x.device)
    _launch_rows(x, w, buf, 1.0, b, True, dot_f32, layout)
    _launch_mid(buf, out, m, b, scale)


def hadamard_triton(
    x: torch.Tensor, scale: float, matrix: torch.Tensor | None, block: int
) -> torch.Tensor:
    """Block-diagonal transform of the last dim: ``y_chunk = (x_chunk @ W) * scale``.

    Args:
        x: fp16 / bf16 / fp32 tensor on a CUDA (or ROCm) device — or on the CPU under
            ``TRITON_INTERPRET=1``; last dim a multiple of ``block``; any strides.
        scale: multiplier applied to the fp32 accumulator (e.g. ``block ** -0.5``).
        matrix: ``(block, block)`` matrix ``W``, or None for the Sylvester Hadamard matrix.
            Used as a 16-bit operand when its dtype equals ``x.dtype`` (16-bit), otherwise in
            fp32 (converted here if needed: cache an fp32 or ``x.dtype`` copy to avoid that).
        block: chunk size; a power of two in [1, 32768] for Sylvester, [1, 256] for a matrix.

    Returns:
        A new contiguous tensor with x's shape and dtype.
    """
    if matrix is None:  # a layout seen before: its plan (validation included) is cached
        device = x.get_device()
        plan = _ROW_PLANS.get((x.shape, x.stride(), x.dtype, x.is_cuda, device, block))
        if plan is not None and device == torch.cuda.current_device():
            out = torch.empty_like(x, memory_format=torch.contiguous_format)
            _launch_plan(plan, x, x, out, float(scale))
            if x.is_cuda and (x.shape, x.stride(), x.dtype, device, block) not in FAST:
                _remember_fast(x, plan, block, scale)
            return out
    if not _HAS_TRITON:
        raise RuntimeError("hadamard_triton needs triton, which is not importable")
    if not (x.is_cuda or INTERPRET):
        raise ValueError(f"hadamard_triton needs a CUDA/ROCm tensor, got one on {x.device}")
    dtype = x.dtype
    if dtype not in _SUPPORTED:
        raise TypeError(f"hadamard_triton supports float16/bfloat16/float32, got {dtype}")
    if x.dim() == 0 or block < 1 or x.shape[-1] % block:
        raise ValueError(f"last dim of shape {tuple(x.shape)} is not a multiple of block {block}")
    sylvester = matrix is None
    if sylvester:
        if block > MAX_SYLVESTER or block & (block - 1):
            raise ValueError(f"Sylvester block must be a power of two <= 32768, got {block}")
        w = x
        dot_f32 = dtype is torch.float32
    else:
        if block > MAX_EXPLICIT:
            raise ValueError(f"explicit matrices are limited to block <= 256, got {block}")
        if tuple(matrix.shape) != (block, block):
            raise ValueError(f"matrix shape {tuple(matrix.shape)} != ({block}, {block})")
        w = matrix
        if not (w.dtype is dtype and dtype in _SIXTEEN_BIT) and w.dtype is not torch.float32:
            w = w.to(torch.float32)
        if w.device != x.device:
            w = w.to(x.device)
        if not w.is_contiguous():
            w = w.contiguous()
        dot_f32 = w.dtype is torch.float32
    if INTERPRET and dtype is torch.bfloat16:
        dot_f32 = True  # interpreter bug: tl.dot on bf16 operands is wrong (module docstring)

    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):
            _dispatch(x, out, w, float(scale), block, sylvester, dot_f32)
    else:
        _dispatch(x, out, w, float(scale), block, sylvester, dot_f32)
    return out


#: Row-kernel plans of Sylvester one-pass calls, by (shape, strides, dtype, is_cuda, device
#: index, block): bounded like the fused kernel's plan cache. Only inputs that passed
#: validation are stored, so a hit needs none.
_ROW_PLANS: dict[tuple, _RowsPlan] = {}
_MAX_ROW_PLANS = 4096

#: The eager fast path of Sylvester one-pass rotations on CUDA, by (shape, strides, dtype,
#: device index, block): ``f(x, scale) -> out`` (or None when it cannot launch this call;
#: then the caller takes the normal path). ops/op.py's ``hadamard_apply`` looks here first.
#: Why: a decode-sized rotation is ~2 us of GPU work and its host cost is the step's cost;
#: this closure does per call only what depends on the call (device, hook and alignment
#: checks, the allocation, the launch). Cleared with :data:`_ROW_PLANS` (see
#: :func:`clear_plans`).
FAST: dict[tuple, object] = {}
#: The current CUDA device index, without torch.cuda.current_device()'s Python (absent from
#: CPU builds of torch, where no fast-path closure is ever made outside tests).
_current_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)


def clear_plans() -> None:
    """Forget every cached row-kernel plan and fast-path closure (after editing the tilings:
    also call ``rows_config.cache_clear()``)."""
    _ROW_PLANS.clear()
    FAST.clear()
    if cpp_launch is not None and cpp_launch.TABLE is not None:
        cpp_launch.TABLE.clear()


def _remember_fast(x: torch.Tensor, plan: _RowsPlan, block: int, scale: float) -> None:
    """Store the fast-path closure of ``x``'s layout once its all-aligned launch is cached
    (nothing yet if it is not: a later call retries; None if it has no direct form): the C++
    launch (cpp_launch.py) where it is available, else a Python closure around triton's
    launcher."""
    if _ROWS is None or plan.int_key is None:
        return
    device = x.get_device()
    parts = _ROWS.direct_parts(plan.key, device, plan.meta, plan.int_key)
    if parts is None:
        return
    if len(FAST) >= _MAX_ROW_PLANS:
        clear_plans()
    fast = _fast_closure(plan, device, parts) if parts else None
    if fast is not None:
        kernel = _ROWS.compiled(plan.key, device, plan.int_key)
        out = torch.empty(x.shape, dtype=x.dtype, device="meta")  # the output's layout
        cpp = cpp_launch.make_launch(kernel, plan.grid, (x,), (out,), *cpp_roles(plan), fast,
                                     scale)
        if cpp is cpp_launch.RETRY:  # not now (graph capture, a hook): a later call retries
            return
        if cpp is not None:
            if cpp_launch.TABLE is not None:  # (None only where a test or benchmark set it)
                cpp_launch.TABLE.add(block, cpp)
            fast = cpp
    FAST[(x.shape, x.stride(), x.dtype, device, block)] = fast


def cpp_roles(plan: _RowsPlan) -> tuple[tuple, tuple]:
    """``(roles, values)`` of the row kernel's launch arguments for cpp_launch: the same
    arguments, in the same order, as :func:`_fast_closure` passes (x, W = x, out, the plan's
    ints, scale, the constexprs), for the Launch's one input x and one output."""
    nl = cpp_launch
    roles = (nl.IN_PTR, nl.IN_PTR, nl.OUT_PTR, *(nl.VALUE,) * len(plan.scalars), nl.SCALE,
             *(nl.VALUE,) * len(plan.meta))
    return roles, (0, 0, 0, *plan.scalars, None, *plan.meta.values())


def _fast_closure(plan: _RowsPlan, device: int, parts: tuple):
    """``f(x, scale)``: ``plan``'s launch for a tensor of the layout it was made for, with
    the arguments :meth:`~.launch.CachedLauncher.launch` would pass (the row kernel's
    signature: x, W (x itself for Sylvester), out, the plan's ints, scale, constexprs).
    Returns None, launching nothing, when the call is not the cached specialisation's
    (another current device, a launch hook installed, a pointer not 16-byte aligned)."""
    launch, function, coop, pdl, packed, meta_values = parts
    grid, scalars = plan.grid, plan.scalars
    stream_of = _ROWS._stream
    current_device, hooks_active = _current_device, _ROWS.hooks_active
    empty_like, contiguous = torch.empty_like, torch.contiguous_format
    # (scale, the arguments after the pointers) for the last scale seen (a layer's scale is
    # fixed); replaced as one tuple, so a thread never pairs one scale with another's args
    last: list = [(None, ())]

    def fast(x: torch.Tensor, scale: float):
        if current_device() != device or hooks_active():
            return None
        # (measured on an H100 host: 1.9 us vs 3.1 for x.new_empty(x.shape))
        out = empty_like(x, memory_format=contiguous)
        xp, op = x.data_ptr(), out.data_ptr()
        if (xp | op) & 15:
            return None
        memo = last[0]
        if memo[0] != scale:
            memo = last[0] = (scale, (*scalars, float(scale), *meta_values))
        launch(grid, 1, 1, stream_of(device), function, coop, pdl, None, None, packed, None,
               None, None, xp, xp, op, *memo[1])
        return out

    return fast


def _dispatch(
    x: torch.Tensor,
    out: torch.Tensor,
    w: torch.Tensor,
    scale: float,
    block: int,
    sylvester: bool,
    dot_f32: bool,
) -> None:
    contiguous = x.is_contiguous()
    layout = _FLAT if contiguous else (_dense_layout(x) or _row_layout(x))
    if layout is None and not contiguous:  # no strided form: copy, never planned by layout
        _run(x.contiguous(), out, w, scale, block, sylvester, dot_f32, _FLAT)
        return
    if sylvester and block <= MAX_ONE_PASS and _ROWS is not None:
        plan = _rows_plan(x, w, out.dtype, block, sylvester, dot_f32, layout)
        if len(_ROW_PLANS) >= _MAX_ROW_PLANS:
            clear_plans()
        _ROW_PLANS[(x.shape, x.stride(), x.dtype, x.is_cuda, x.get_device(), block)] = plan
        _launch_plan(plan, x, w, out, scale)
        if x.is_cuda:
            _remember_fast(x, plan, block, scale)
        return
    _run(x, out, w, scale, block, sylvester, dot_f32, layout)
