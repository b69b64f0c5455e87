"""Launch a compiled Triton kernel without going through ``JITFunction.run`` on every call.

Why: in eager decode each rotation is a tiny kernel (~2 us of GPU time) and the host cost of
``kernel[grid](...)`` (argument binding, specialisation, cache lookup: ~40 us for a kernel with
two dozen arguments, measured on an H100 host with triton 3.6) dominates the whole step.
After the first call of a specialisation we keep the ``CompiledKernel`` that triton returned
and call its launcher directly with the same arguments.

Correctness rests on our key naming everything triton specialises on for these kernels:
the constexpr values and dtypes (``meta``, given by the caller), the device, the 16-byte
alignment of every pointer argument, and for each int argument what triton derives from its
value: equal to 1 (made a constant), divisible by 16 (an alignment hint) and whether it needs
64 bits. (Kernels may also declare ints ``do_not_specialize``; the key is then merely finer
than necessary.) These are triton's rules from 3.0 through 3.9 (checked against triton 3.9's
``native_specialize_impl`` in tests/test_triton_interpret.py). Pointers are passed to the
launcher as ints (``data_ptr()``), which its C code takes as the device address as-is.

When a launch hook is installed (profilers such as proton set one) the normal triton path is
used, so hooks see every launch.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import triton
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - triton absent or too old for knobs
    triton = None
    _knobs = None


def _hooks_active() -> bool:
    runtime = getattr(_knobs, "runtime", None)
    return runtime is not None and (
        getattr(runtime, "launch_enter_hook", None) is not None
        or getattr(runtime, "launch_exit_hook", None) is not None
    )


def int_spec(v: int) -> int:
    """What triton's specialisation derives from an int argument, as a small code."""
    return (v == 1) | ((v % 16 == 0) << 1) | ((not -(2**31) <= v < 2**31) << 2)


class CachedLauncher:
    """Per-kernel cache of compiled specialisations, launched directly.

    ``launch(grid, key, tensors, scalars, meta, num_warps)``: ``tensors`` are the pointer
    arguments (in signature order, first), ``scalars`` the int/float arguments that follow
    them, ``meta`` the constexpr keyword arguments (a dict whose insertion order is the
    signature order of the trailing constexpr parameters). ``key`` must identify ``meta``
    and the dtypes (the caller builds it cheaply); this class adds the device and the pointer
    alignment.
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.cache: dict[tuple, tuple] = {}
        get_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        self._stream = get_stream or (lambda idx: torch.cuda.current_stream(idx).cuda_stream)

    def launch(
        self,
        grid: int,
        key: tuple,
        device: int,
        tensors: tuple[torch.Tensor, ...],
        scalars: tuple,
        meta: dict[str, Any],
        num_warps: int,
    ) -> None:
        ptrs = [t.data_ptr() for t in tensors]
        full_key = (key, device, *[p & 15 == 0 for p in ptrs],
                    *[int_spec(v) for v in scalars if type(v) is int])
        entry = self.cache.get(full_key)
        if entry is None or _hooks_active():
            kernel = self.fn[(grid,)](*tensors, *scalars, **meta, num_warps=num_warps)
            if entry is None and hasattr(kernel, "run") and hasattr(kernel, "packed_metadata"):
                self.cache[full_key] = (kernel, tuple(meta.values()))
            return
        kernel, meta_values = entry
        kernel.run(
            grid, 1, 1, self._stream(device), kernel.function, kernel.packed_metadata, None,
            None, None, *ptrs, *scalars, *meta_values,
        )
