"""Independent float64 references for the op, built from compressed-tensors' matrices.

Nothing here uses our own matrix code: the Sylvester matrix comes from
``compressed_tensors.transform.utils.hadamard.deterministic_hadamard_matrix`` and the product
is a plain float64 matmul (or, above 4096, an explicit Kronecker product of two such matrices
so the 8 GiB dense matrix is never built).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

DENSE_REF_MAX = 4096


def ct_hadamard(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """compressed-tensors' unnormalised Sylvester matrix in float64."""
    return deterministic_hadamard_matrix(n, torch.float64, torch.device(device))


def reference_transform(
    x: torch.Tensor,
    block: Optional[int] = None,
    matrix: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """float64 ``x_chunk @ W * scale`` per ``block`` chunk of the last dim."""
    d = x.shape[-1]
    block = block or (matrix.shape[0] if matrix is not None else d)
    scale = 1.0 / math.sqrt(block) if scale is None else scale
    xs = x.to(torch.float64).reshape(*x.shape[:-1], d // block, block)
    if matrix is not None:
        y = xs @ matrix.to(device=x.device, dtype=torch.float64)
    elif block <= DENSE_REF_MAX:
        y = xs @ ct_hadamard(block, x.device)
    else:
        a = 64
        b = block // a
        xk = xs.reshape(*xs.shape[:-1], a, b)
        ha, hb = ct_hadamard(a, x.device), ct_hadamard(b, x.device)
        y = torch.einsum("ia,...ab,bj->...ij", ha, xk, hb)
        y = y.reshape(xs.shape)
    return (y * scale).reshape(x.shape)


def assert_single_rounding(out: torch.Tensor, ref64: torch.Tensor, factor: float = 2.0) -> None:
    """Tolerance idiom: error(op) <= factor * error(one rounding of the exact result) + atol.

    The floor, ``|round(ref, dtype) - ref|``, is the best any implementation can do in that
    dtype. fp32 and fp64 outputs get a relative bound instead (the floor there is tiny and
    fp32 accumulation order dominates): 1e-5 and 1e-12 of the largest magnitude.
    """
    assert out.shape == ref64.shape, (out.shape, ref64.shape)
    if out.numel() == 0:
        return
    err = (out.to(torch.float64) - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    if out.dtype in (torch.float16, torch.bfloat16):
        floor = (ref64.to(out.dtype).to(torch.float64) - ref64).abs().max().item()
        tiny = torch.finfo(out.dtype).tiny
        assert err <= factor * floor + tiny, f"{out.dtype}: error {err} > {factor} x floor {floor}"
    else:
        rtol = 1e-5 if out.dtype == torch.float32 else 1e-12
        assert err <= rtol * max(scale, 1.0), f"{out.dtype}: error {err} (max |ref| {scale})"


def rope_once(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (``unsqueeze_dim=1``) in fp32, rounded once to ``x.dtype``: the fused
    kernel's documented RoPE (products of 16-bit values are exact in fp32)."""
    c, s = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
    xf = x.float()
    half = x.shape[-1] // 2
    return (xf * c + torch.cat((-xf[..., half:], xf[..., :half]), dim=-1) * s).to(x.dtype)
