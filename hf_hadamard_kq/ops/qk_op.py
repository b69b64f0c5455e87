"""RoPE and the rotation of a layer's query and key as one custom op, for torch.compile.

Why: in a compiled decode step with CUDA graphs the host cost is gone and what the rotation
costs is GPU time. Written as plain torch ops (ops/native.py) inductor fuses each rotation
with RoPE into a reduction kernel that recomputes RoPE for every one of its ``d`` terms (3-4
us per tensor and layer on an H100, BENCHMARKS.md); as the single-tensor op it adds two
kernels and a RoPE kernel. This op is what fused.py's RoPE wrapper puts in a traced graph
instead: one node, one launch of the fused Q/K kernel (ops/qk_kernel.py) that replaces the
RoPE kernel inductor would otherwise generate.

Numerics are the kernel's: RoPE in fp32 rounded once to the input dtype (the tensor-core
operand), then ``r @ W * scale`` accumulated in fp32 and rounded once. The implementation for
other devices (and for CUDA tensors the kernel does not take) computes exactly that with torch
ops, so every device gives the same rotation.
"""

from __future__ import annotations

from typing import Optional

import torch

from .op import torch_hadamard


def rope_once(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (``unsqueeze_dim=1``) in fp32, rounded once to ``x.dtype``."""
    c, s = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
    xf = x.float()
    half = x.shape[-1] // 2
    return (xf * c + torch.cat((-xf[..., half:], xf[..., :half]), dim=-1) * s).to(x.dtype)


def _torch_pair(q, k, cos, sin, scale, matrix):
    """The op with torch ops, outputs laid out like ``empty_like`` of the inputs (the fake's)."""
    out = []
    for x in (q, k):
        y = torch_hadamard(rope_once(x, cos, sin), scale, matrix, x.shape[-1])
        out.append(torch.empty_like(x).copy_(y))
    return out[0], out[1]


# flexible_layout: no exact-stride constraint on the inputs. Why: under the default constraint
# inductor gave every layer's node its own copy of the shared (cheap, so not realized) RoPE
# cos/sin table, one more kernel per two layers in a decode step; unconstrained, the table
# is realized once (tests/test_traced.py). The kernel takes any strides (qk_supported is
# checked again at run time; otherwise the torch implementation runs) and the outputs are
# ``empty_like`` of the inputs inductor passes, as the fake's.
@torch.library.custom_op(
    "hadamard_kq::rope_rotate_qk", mutates_args=(), tags=(torch.Tag.flexible_layout,)
)
def rope_rotate_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scale: float,
    matrix: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rope(q) @ W * scale, rope(k) @ W * scale)``; ``W`` the Sylvester matrix when
    ``matrix`` is None. Callers check ``qk_kernel.qk_supported(..., any_device=True)``."""
    return _torch_pair(q, k, cos, sin, scale, matrix)


@rope_rotate_qk.register_kernel("cuda")
def _rope_rotate_qk_cuda(q, k, cos, sin, scale, matrix):
    from . import qk_kernel

    if qk_kernel.triton is not None:
        pair = qk_kernel.try_rotate_qk(q, k, scale, matrix, cos, sin)
        if pair is not None:
            return pair
    return _torch_pair(q, k, cos, sin, scale, matrix)


@rope_rotate_qk.register_fake
def _rope_rotate_qk_fake(q, k, cos, sin, scale, matrix):
    return torch.empty_like(q), torch.empty_like(k)
