"""Hadamard matrices the op multiplies by.

Matrices are built once per (size, dtype, device) and cached, because the decode hot path
calls the op twice per layer per token and must not rebuild a matrix each time. The
Sylvester construction is the one compressed-tensors uses for ``type="hadamard"``
(``H_2n = [[H_n, H_n], [H_n, -H_n]]``), so entry ``(i, j)`` is ``(-1) ** popcount(i & j)``;
tests check the two agree bit for bit.
"""

from __future__ import annotations

import functools

import torch

#: Largest Sylvester size the op accepts (2**15), the same bound vLLM documents for R3.
MAX_SYLVESTER_SIZE = 1 << 15


def is_power_of_two(n: int) -> bool:
    """True for 1, 2, 4, ...; False for 0 and negatives."""
    return n > 0 and (n & (n - 1)) == 0


@functools.lru_cache(maxsize=64)
def _sylvester_cached(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    idx = torch.arange(n, device=device)
    parity = torch.zeros((n, n), dtype=torch.int64, device=device)
    anded = idx[:, None] & idx[None, :]
    bit = 1
    while bit < n:
        parity ^= (anded & bit) != 0
        bit <<= 1
    return (1 - 2 * parity).to(dtype)


def sylvester(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The unnormalised ``n x n`` Sylvester Hadamard matrix (entries +-1), cached.

    The returned tensor is shared between callers: treat it as read-only.
    """
    if not is_power_of_two(n):
        raise ValueError(f"Sylvester Hadamard matrices exist only for powers of two, got n={n}")
    if n > MAX_SYLVESTER_SIZE:
        raise ValueError(f"n={n} exceeds the supported maximum {MAX_SYLVESTER_SIZE}")
    return _sylvester_cached(n, dtype, torch.device(device))
