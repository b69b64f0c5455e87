"""The rotation written in plain torch ops, for torch.compile to fuse (opt-in, experimental).

Why: under ``torch.compile`` the rotation is normally our custom op, one opaque node per
tensor. With a static cache and CUDA graphs the host cost is gone, so what is left is GPU
time, and every opaque node is one more kernel (~2-4 us each on an H100, two per layer; see
BENCHMARKS.md: static + compile ran at 0.94x sdpa before the fused eager path existed).
Written as ``(x[..., :, None] * W).sum(-2)`` -- a broadcast multiply and a 128-term
reduction, with the Sylvester matrix built from ``arange`` bit arithmetic -- inductor can
fuse the rotation into the kernel that already computes RoPE (its producer), so the compiled
step gets no extra kernel: on CPU (inductor's C++ backend) a tiny Llama's compiled decode step
calls as many kernels as the plain model's (tests/test_native_compile.py). Whether inductor's
Triton kernels beat the custom op on a GPU has **not been measured yet**, so this stays off by
default.

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
bytes, e.g. 16 GiB for the query of an 8k-token prefill with 32 heads of 128 -- use the
default form with those backends.

Enable with ``HF_HADAMARD_KQ_COMPILE=native`` in the environment (read at import) or
:func:`set_compile_rotation` before compiling.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

#: Environment variable choosing the compiled form: ``op`` (default) or ``native``.
COMPILE_ENV = "HF_HADAMARD_KQ_COMPILE"
#: Largest block written as a dense broadcast-multiply-sum.
NATIVE_MAX_BLOCK = 256

_MODES = ("op", "native")


def _mode_from_env() -> str:
    mode = os.environ.get(COMPILE_ENV, "op")
    if mode not in _MODES:
        raise ValueError(
            f"{COMPILE_ENV}={mode!r} is not a valid value; use 'op' (default: the custom op "
            "under torch.compile) or 'native' (plain torch ops that inductor can fuse)"
        )
    return mode


#: True when hadamard_apply uses :func:`native_hadamard` while torch.compile traces.
ENABLED: bool = _mode_from_env() == "native"


def set_compile_rotation(mode: str) -> None:
    """Choose how the rotation appears in graphs traced by torch.compile: ``"op"`` (our custom
    op, the default) or ``"native"`` (plain torch ops that inductor fuses with their producer,
    see this module's docstring). Dynamo guards the setting: a compiled function called after
    a switch is traced again (one recompilation, counted against dynamo's recompile limit)."""
    global ENABLED
    if mode not in _MODES:
        raise ValueError(f"mode must be 'op' or 'native', got {mode!r}")
    ENABLED = mode == "native"


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
