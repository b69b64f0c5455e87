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
64 bits — unless the kernel declares all its int arguments ``do_not_specialize`` and the
caller guarantees they fit in int32 (``specialized_ints=False``: a smaller key per call).
These are triton's rules in the versions we support, 3.3 through 3.9 (checked against triton
3.9's ``native_specialize_impl`` in tests/test_triton_interpret.py); in those versions
``CompiledKernel.run`` takes every argument, constexprs included, in signature order.
Pointers are passed to the launcher as ints (``data_ptr()``), which its C code takes as the
device address as-is.

When a launch hook is installed (profilers such as proton set one) the normal triton path is
used, so hooks see every launch. On ROCm the normal path is always used (see ``_PLAIN``).
Other runtime knobs changed after a kernel was cached (``knobs.runtime.debug``,
instrumentation) do not recompile it.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - triton absent, or 3.3 (hooks on CompiledKernel)
    _knobs = None

#: Where triton keeps its launch hooks: ``knobs.runtime`` (3.4+) or, in 3.3, the
#: ``CompiledKernel`` class itself.
_RUNTIME = getattr(_knobs, "runtime", None)
if _RUNTIME is None:  # pragma: no cover - triton 3.3
    try:
        from triton.compiler.compiler import CompiledKernel as _RUNTIME
    except ImportError:
        _RUNTIME = None

#: ROCm: triton's HIP backend also specialises tensor arguments on their storage size
#: (buffer ops for storages <= 2 GiB), which this cache does not key on: launch normally.
_PLAIN = torch.version.hip is not None


def _hook_set(hook: Any) -> bool:
    """A launch hook is installed: not None, and (triton >= 3.7's ``HookChain``) not empty."""
    return hook is not None and bool(getattr(hook, "calls", True))


def hooks_active() -> bool:
    """A launch hook (profilers such as proton) is installed: launches must go through
    triton so that the hook sees them. (Checked per launch: the usual answer, no hook at
    all, costs two attribute reads.)"""
    runtime = _RUNTIME
    if runtime is None:
        return False
    enter = getattr(runtime, "launch_enter_hook", None)
    leave = getattr(runtime, "launch_exit_hook", None)
    if enter is None and leave is None:
        return False
    return _hook_set(enter) or _hook_set(leave)


def int_spec(v: int) -> int:
    """What triton's specialisation derives from an int argument, as a small code."""
    return (v == 1) | ((v % 16 == 0) << 1) | ((not -(2**31) <= v < 2**31) << 2)


def int_specs(scalars: tuple) -> tuple[int, ...]:
    """:func:`int_spec` of every int among a launch's scalar arguments (floats are not keyed)."""
    return tuple(int_spec(v) for v in scalars if type(v) is int)


#: The parameters of triton 3.5-3.6's ``CudaLauncher.__call__``, whose body allocates the
#: (here empty) scratch buffers and forwards to the C ``launch`` function.
_PY_LAUNCHER_PARAMS = ["self", "gridX", "gridY", "gridZ", "stream", "function", "args"]


def _direct(kernel: Any):
    """The C launch function of ``kernel`` bound to its constants, when its Python launcher has
    the known triton 3.5-3.6 form and no scratch memory to allocate (saves a few microseconds
    of Python per launch); None otherwise (then ``kernel.run`` is called)."""
    import inspect

    run = kernel.run
    launch = getattr(run, "launch", None)
    try:
        params = list(inspect.signature(type(run).__call__).parameters)
    except (TypeError, ValueError):
        return None
    if launch is None or params != _PY_LAUNCHER_PARAMS:
        return None
    if getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1):
        return None
    coop, pdl = getattr(run, "launch_cooperative_grid", None), getattr(run, "launch_pdl", None)
    if coop is None or pdl is None:
        return None
    function, packed = kernel.function, kernel.packed_metadata

    def direct(grid: int, stream: int, *args: Any) -> None:
        launch(grid, 1, 1, stream, function, coop, pdl, None, None, packed, None, None, None,
               *args)

    direct.parts = (launch, function, coop, pdl, packed)  # for direct_parts
    return direct


class CachedLauncher:
    """Per-kernel cache of compiled specialisations, launched directly.

    ``launch(grid, key, device, tensors, scalars, meta, num_warps, int_key, num_stages)``:
    ``tensors`` are the pointer
    arguments (in signature order, first), ``scalars`` the int/float arguments that follow
    them, ``meta`` the constexpr keyword arguments (a dict whose insertion order is the
    signature order of the trailing constexpr parameters). ``key`` must identify ``meta``
    and the dtypes (the caller builds it cheaply); this class adds the device and the pointer
    alignment.
    """

    #: For closures built from :meth:`direct_parts` (and replaceable in tests).
    hooks_active = staticmethod(hooks_active)

    def __init__(self, fn: Any, specialized_ints: bool = True) -> None:
        self.fn = fn
        self.specialized_ints = specialized_ints
        self.cache: dict[tuple, tuple] = {}
        get_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        self._stream = get_stream or (lambda idx: torch.cuda.current_stream(idx).cuda_stream)

    @staticmethod
    def int_key(scalars: tuple) -> tuple[int, ...]:
        """What :meth:`launch` keys the int ``scalars`` on (for callers that cache it)."""
        return int_specs(scalars)

    def launch(
        self,
        grid: int,
        key: tuple,
        device: int,
        tensors: tuple[torch.Tensor, ...],
        scalars: tuple,
        meta: dict[str, Any],
        num_warps: int,
        int_key: tuple | None = None,
        num_stages: int | None = None,
        pdl: bool = False,
    ) -> None:
        """``int_key``: :meth:`int_key` of ``scalars`` when the caller already has it;
        ``num_stages``: triton's pipelining depth (None: triton's default); ``pdl``: compile
        and launch with programmatic dependent launch (the kernel must wait for its
        predecessor itself). ``key`` must name ``num_warps``, ``num_stages`` and ``pdl`` too
        (each is a different compiled kernel; the row kernel's ``PDL`` constexpr does)."""
        ptrs = [t.data_ptr() for t in tensors]
        merged = 0
        for p in ptrs:
            merged |= p
        # all 16-byte aligned (the usual case) is one flag; otherwise one flag per pointer
        align = True if not merged & 15 else tuple(p & 15 == 0 for p in ptrs)
        if self.specialized_ints:
            full_key = (key, device, align, int_specs(scalars) if int_key is None else int_key)
        else:
            full_key = (key, device, align)
        entry = None if _PLAIN else self.cache.get(full_key)
        if entry is None or hooks_active():
            opts = {"num_warps": num_warps}
            if num_stages is not None:
                opts["num_stages"] = num_stages
            if pdl:
                opts["launch_pdl"] = True
            kernel = self.fn[(grid,)](*tensors, *scalars, **meta, **opts)
            if (entry is None and not _PLAIN and hasattr(kernel, "run")
                    and hasattr(kernel, "packed_metadata")):
                self.cache[full_key] = (_direct(kernel), kernel, tuple(meta.values()))
            return
        direct, kernel, meta_values = entry
        if direct is not None:
            direct(grid, self._stream(device), *ptrs, *scalars, *meta_values)
            return
        kernel.run(
            grid, 1, 1, self._stream(device), kernel.function, kernel.packed_metadata, None,
            None, None, *ptrs, *scalars, *meta_values,
        )

    def _aligned_entry(self, key: tuple, device: int, int_key: tuple) -> Any:
        """The cache entry :meth:`launch` made for all-aligned pointers under this key, or
        None (none yet, or the plain path, which caches nothing)."""
        full_key = (key, device, True, int_key) if self.specialized_ints else (key, device, True)
        return None if _PLAIN else self.cache.get(full_key)

    def compiled(self, key: tuple, device: int, int_key: tuple) -> Any:
        """The triton ``CompiledKernel`` that :meth:`launch` cached for all-aligned pointers
        under this key (as :meth:`direct_parts` finds it), or None."""
        entry = self._aligned_entry(key, device, int_key)
        return None if entry is None else entry[1]

    def direct_parts(
        self,
        key: tuple,
        device: int,
        meta: dict[str, Any],
        int_key: tuple,
    ) -> tuple | bool | None:
        """``(launch, function, coop, pdl, packed, meta_values)`` of a specialisation that
        :meth:`launch` has cached for all-aligned pointers, for a caller that binds its own
        launch closure; None when there is no such entry yet, False when it has no direct
        form (this triton's launcher is not the known one); then keep calling :meth:`launch`.
        The closure calls ``launch(grid, 1, 1, stream, function, coop, pdl, None, None,
        packed, None, None, None, *ptrs, *scalars, *meta_values)``.

        Why: the eager single-tensor rotation's host cost is mostly Python between the call
        and the C launcher (key building, argument tuples, the entry lookup); a caller that
        caches everything per tensor layout needs only the pointers per call. Such a caller
        must check per call what its cache cannot know: that the pointers are 16-byte
        aligned, that ``device`` is the current device and that no launch hook is installed
        (:func:`hooks_active`); otherwise it calls :meth:`launch`. ``int_key`` is
        :meth:`int_key` of the launch's scalars (launchers with ``specialized_ints``).
        """
        entry = self._aligned_entry(key, device, int_key)
        if entry is None:
            return None
        if entry[0] is None:
            return False
        meta_values = entry[2]
        if meta_values != tuple(meta.values()):  # same key, other constexprs: a caller bug
            raise RuntimeError("direct_parts: meta does not match the cached specialisation")
        return (*entry[0].parts, meta_values)
