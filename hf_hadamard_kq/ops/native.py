"""The rotation written in plain torch ops, for torch.compile to fuse (small tensors by default).

Why: under ``torch.compile`` the rotation is otherwise our custom op, one opaque node per
tensor. With a static cache and CUDA graphs the host cost is gone, so what is left is GPU
time, and every opaque node is one more kernel (~2-4 us each on an H100, two per layer).
Written as ``(x[..., :, None] * W).sum(-2)`` -- a broadcast multiply and a ``block``-term
reduction, with the Sylvester matrix built from ``arange`` bit arithmetic -- inductor can
fuse the rotation into the kernel that already computes RoPE (its producer), so the compiled
step gets no extra kernel: on CPU (inductor's C++ backend) a tiny Llama's compiled decode step
calls as many kernels as the plain model's (tests/test_native_compile.py). Its cost grows
with the tensor (``block`` multiply-adds per element), the op's does not at decode sizes, so
the default ``auto`` mode uses this form only for tensors whose rotation is at most
:data:`AUTO_MAX_WORK` multiply-adds (decode at small batch). Measured on an H100 (BENCHMARKS.md,
session 5; Llama-3-8B shapes, static cache, CUDA graphs): batch 1 0.991x sdpa with this form
vs ~0.96x with the op; batch 32 0.993x with the op vs 0.935x with this form.

Numerics: products and sum in fp32 (fp64 for fp64 inputs), one rounding to the input dtype,
like the op. Inside a compiled graph inductor also skips the rounding of RoPE's output before
the rotation (it keeps fused intermediates in fp32), so results can differ from eager by that
one rounding -- the same thing the fused eager kernel does.

Only blocks up to :data:`NATIVE_MAX_BLOCK` take this form (its work grows with ``block**2``);
larger blocks keep the custom op, and so do rotations whose scheme ``precision`` rounds the
input and result (cache.rotate: inductor would fuse those roundings away), and DTensors.

Memory: inductor fuses the broadcast product into the sum (checked on CPU), so nothing of
size ``x.numel() * block`` is stored. A backend that does not fuse (``backend="eager"`` or
``"aot_eager"``, ``torch.export`` then run eagerly) materialises it: ``4 * x.numel() * block``
bytes, e.g. 16 GiB for the query of an 8k-token prefill with 32 heads of 128 under
``native`` -- under ``auto`` at most ``AUTO_MAX_WORK`` elements (4 MiB in fp32, 8 MiB in
fp64); prefer ``auto`` or ``op`` with those backends.

Choose with ``HF_HADAMARD_KQ_COMPILE=auto|op|native`` in the environment (read at import) or
:func:`set_compile_rotation` before compiling.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

#: Environment variable choosing the compiled form: ``auto`` (default), ``op`` or ``native``.
COMPILE_ENV = "HF_HADAMARD_KQ_COMPILE"
#: Largest block written as a dense broadcast-multiply-sum.
NATIVE_MAX_BLOCK = 256
#: ``auto``: a tensor takes the native form when its rotation is at most this many
#: multiply-adds (``x.numel() * block``: the native form does ``block`` per element; the op's
#: cost is about constant at these sizes). Why 64 chunks of 128: in a CUDA-graphed Llama-3-8B
#: decode step on an H100 (BENCHMARKS.md, session 5) the native form's fused reduction cost
#: ~31-37 ns of GPU time per 128-chunk (q and k of 32 layers: ~+40 us per step at batch 1,
#: ~+1.5 ms at batch 32) and the op form a roughly constant ~2.3 us per tensor (its kernel
#: plus the cache write inductor can no longer fuse): equal at 62-74 chunks. Measured at
#: block 128 and the two ends only (batch 1: 32 and 8 chunks; batch 32: 1024 and 256); other
#: blocks are scaled by ``block**2`` per chunk, not measured.
AUTO_MAX_WORK = 64 * 128 * 128

_MODES = ("auto", "op", "native")


def _mode_from_env() -> str:
    mode = os.environ.get(COMPILE_ENV, "auto")
    if mode not in _MODES:
        raise ValueError(
            f"{COMPILE_ENV}={mode!r} is not a valid value; use 'auto' (default: plain torch "
            "ops for small tensors, the custom op for large ones), 'op' (always the custom op "
            "under torch.compile) or 'native' (always plain torch ops that inductor can fuse)"
        )
    return mode


#: The form hadamard_apply gives the rotation while torch.compile traces (see use_native).
MODE: str = _mode_from_env()


def set_compile_rotation(mode: str) -> None:
    """Choose how the rotation appears in graphs traced by torch.compile: ``"auto"`` (the
    default: ``"native"`` for tensors whose rotation is at most :data:`AUTO_MAX_WORK`
    multiply-adds, such as decode steps at small batch, ``"op"`` for larger ones), ``"op"``
    (our custom op, one kernel per tensor) or ``"native"`` (plain torch ops that inductor
    fuses with their producer, see this module's docstring). Dynamo guards the setting: a
    compiled function called after a switch is traced again (one recompilation, counted
    against dynamo's recompile limit)."""
    global MODE
    if mode not in _MODES:
        raise ValueError(f"mode must be 'auto', 'op' or 'native', got {mode!r}")
    MODE = mode


def use_native(x: torch.Tensor, block: int) -> bool:
    """Whether a traced rotation of ``x`` (validated, ``block <= NATIVE_MAX_BLOCK``) takes the
    native form under the current mode. Under ``auto`` the size is a trace-time constant with
    static shapes; with dynamic shapes dynamo guards on it."""
    if MODE == "auto":
        return x.numel() * block <= AUTO_MAX_WORK
    return MODE == "native"


def sylvester_signs(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The unnormalised Sylvester matrix ``H[i, j] = (-1) ** popcount(i & j)`` from ``arange``
    and bit operations (no constant tensor: inductor computes it inside the fused kernel).
    ``n`` is a power of two <= 2**15."""
    i = torch.arange(n, device=device)
    parity = i[:, None] & i[None, :]
    for shift in (8, 4, 2, 1):  # xor-fold 16 bits into bit 0
        parity = parity ^ (parity >> shift)
    return 1 - 2 * (parity & 1).to(dtype)


def native_hadamard(
    x: torch.Tensor, scale: float, matrix: Optional[torch.Tensor], block: int
) -> torch.Tensor:
    """``y = chunk @ W * scale`` for every ``block``-sized chunk of ``x``'s last dim, in torch
    ops that inductor can fuse (arguments as validated for the op)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = x.shape
    xs = x.reshape(*shape[:-1], shape[-1] // block, block, 1).to(compute)
    if matrix is None:
        w = sylvester_signs(block, x.device, compute)
    else:
        w = matrix.to(device=x.device, dtype=compute)
    y = (xs * w).sum(-2) * scale
    return y.to(x.dtype).reshape(shape)
