"""Write a layer's new keys *and* values into a static KV cache with one kernel.

Why: in a compiled, CUDA-graphed static-cache decode step transformers' ``StaticLayer.update``
writes keys and values with one ``index_copy_`` each. For the plain model inductor folds the
key's RoPE into the key's write, so a layer costs two small kernels there (RoPE + key write,
value write). With R3 the key comes out of the fused Q/K op (ops/qk_op.py), an extern kernel
that inductor cannot fuse into, so the key's write became a kernel of its own: three kernels
per layer (BENCHMARKS.md, session 10, H100: ``_qk_kernel`` 2.55 us, the two writes ~1.1 us
each, against sdpa's 1.36 us RoPE-and-key-write and 1.0 us value write). At batch 1 the
decode step waits for the GPU, and that third kernel is about 0.4 % of a step. This op writes
both in one launch, so a rotated layer has as many kernels as a plain one.

What it computes is exactly what ``StaticLayer.update`` does for an initialized layer:
``keys[:, :, start + s] = k[:, :, s]`` and the same for values, for ``s < k.shape[2]``, with
``start`` the layer's ``cumulative_length`` tensor read before the caller advances it
(cache.py). The implementation for other devices, and for CUDA tensors the kernel does not
take, is those two ``index_copy_`` calls themselves. One difference: a position outside the
cache (past its end, or before its start after too large a ``crop``) is not written by the
kernel (masked), where ``index_copy_`` would fail (eagerly) -- inductor's own lowering of that
``index_copy_`` does not check it either.
"""

from __future__ import annotations

import contextlib

import torch

from .triton_kernel import INTERPRET, tl, triton

#: Rows of ``BLOCK_D`` elements per program: 16 rows at d = 128 (the decode step's 8 key
#: heads and 8 value heads are one program each at batch 1).
_TILE_ELEMENTS = 2048

if triton is not None:

    @triton.jit
    def _copy_rows(src_ptr, dst_ptr, start, t, n_rows, H, S, L, sb, sh, ss, db, dh, ds,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        s = rows % S
        bh = rows // S
        h = bh % H
        b = bh // H
        pos = start + s
        ok = (rows < n_rows) & (pos >= 0) & (pos < L)
        mask = ok[:, None] & (cols < D)[None, :]
        src = b.to(tl.int64) * sb + h.to(tl.int64) * sh + s.to(tl.int64) * ss
        dst = b.to(tl.int64) * db + h.to(tl.int64) * dh + pos.to(tl.int64) * ds
        x = tl.load(src_ptr + src[:, None] + cols[None, :], mask=mask)
        tl.store(dst_ptr + dst[:, None] + cols[None, :], x, mask=mask)

    @triton.jit
    def _kv_store_kernel(
        k_ptr, v_ptr, keys_ptr, values_ptr, start_ptr,
        nk, nv, tk, H, HV, S, L,
        kb, kh, ks, vb, vh, vs, kcb, kch, kcs, vcb, vch, vcs,
        DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_MK: tl.constexpr, BLOCK_MV: tl.constexpr,
    ):
        """Programs ``[0, tk)`` copy key rows, the rest value rows; a row is one (b, h, s)."""
        t = tl.program_id(0)
        start = tl.load(start_ptr)
        if t < tk:
            _copy_rows(k_ptr, keys_ptr, start, t, nk, H, S, L, kb, kh, ks, kcb, kch, kcs,
                       DK, BLOCK_DK, BLOCK_MK)
        else:
            _copy_rows(v_ptr, values_ptr, start, t - tk, nv, HV, S, L, vb, vh, vs, vcb, vch,
                       vcs, DV, BLOCK_DV, BLOCK_MV)


def kernel_takes(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 start: torch.Tensor) -> bool:
    """Whether the Triton kernel takes these tensors: one CUDA device (or the interpreter),
    4-d ``(B, H, S, D)`` tensors whose batch, heads and head dim match the cache's, equal
    dtypes, unit last strides, ``start`` a one-element int64 tensor. Anything else goes to
    ``index_copy_``, which raises its own error where the tensors do not fit."""
    if triton is None or not (keys.is_cuda or INTERPRET):
        return False
    if any(t.dim() != 4 for t in (keys, values, k, v)):
        return False
    if k.dtype is not keys.dtype or v.dtype is not values.dtype:
        return False
    if start.dtype is not torch.int64 or start.numel() != 1:
        return False
    if any(t.device != keys.device for t in (values, k, v, start)):
        return False
    if k.shape[2] != v.shape[2] or keys.shape[2] != values.shape[2]:
        return False
    for new, cache in ((k, keys), (v, values)):
        if (new.shape[0], new.shape[1], new.shape[3]) != (cache.shape[0], cache.shape[1],
                                                           cache.shape[3]):
            return False
        if new.stride(-1) != 1 or cache.stride(-1) != 1:
            return False
    return True


def _launch(keys, values, k, v, start) -> None:
    b, h, s, dk = k.shape
    hv, dv = v.shape[1], v.shape[3]
    nk, nv = b * h * s, b * hv * s
    if nk == 0 and nv == 0:
        return
    block_dk, block_dv = triton.next_power_of_2(dk), triton.next_power_of_2(dv)
    block_mk = max(1, min(64, _TILE_ELEMENTS // block_dk))
    block_mv = max(1, min(64, _TILE_ELEMENTS // block_dv))
    tk = -(-nk // block_mk)
    grid = tk + -(-nv // block_mv)
    # triton launches on the current device: the cache's, under a multi-GPU device_map
    other = keys.is_cuda and keys.get_device() != torch.cuda.current_device()
    with torch.cuda.device(keys.device) if other else contextlib.nullcontext():
        _kv_store_kernel[(grid,)](
            k, v, keys, values, start,
            nk, nv, tk, h, hv, s, keys.shape[2],
            *k.stride()[:3], *v.stride()[:3], *keys.stride()[:3], *values.stride()[:3],
            DK=dk, DV=dv, BLOCK_DK=block_dk, BLOCK_DV=block_dv, BLOCK_MK=block_mk,
            BLOCK_MV=block_mv, num_warps=4,
        )


def _index_copy(keys, values, k, v, start) -> None:
    """``StaticLayer.update``'s own two writes (with its fallback for devices without
    ``index_copy_``, such as MPS)."""
    pos = torch.arange(k.shape[-2], device=keys.device) + start
    try:
        keys.index_copy_(2, pos, k)
        values.index_copy_(2, pos, v)
    except NotImplementedError:
        keys[:, :, pos] = k
        values[:, :, pos] = v


@torch.library.custom_op("hadamard_kq::kv_store", mutates_args=("keys", "values"))
def kv_store(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             start: torch.Tensor) -> None:
    """Write ``k`` and ``v`` (``(B, H, S, D)``) into ``keys`` and ``values`` (``(B, H, L, D)``)
    at positions ``start + [0, S)``, as ``StaticLayer.update`` does (module docstring)."""
    if kernel_takes(keys, values, k, v, start):
        _launch(keys, values, k, v, start)
    else:
        _index_copy(keys, values, k, v, start)


@kv_store.register_fake
def _kv_store_fake(keys, values, k, v, start) -> None:
    return None
