"""The eager rotations' launches in C++ (``cpp_launch.cpp``): the single-tensor rotation's
and the fused Q/K rotation's (``qk_kernel``).

Why: a decode-sized rotation is ~2 us of GPU work, so in eager decode its host cost is what a
layer pays. Through triton's own C launcher the cached per-layout closure
(``triton_kernel.FAST``) cost 7.6-10 us per call on the lent H100 hosts, above issue 6's 8 us:
triton's launcher parses two dozen Python arguments per call (3.7-4.9 us with everything
prebuilt), the output allocation from Python took 2.0-3.7 us, and the closure's own Python
about 1.5 us. A :class:`Launch` object does the same work in one C++ call: it checks that
the inputs are plain dense CUDA tensors (by their dispatch keys: no subclass, wrapper, lazy
view or zero tensor; no dispatch mode; nothing autograd would record; no forward-mode AD
level open: the hot path's own Python checks, done here so that a plain call pays for
none), the
layout, the current device, triton's launch hooks and the alignment, allocates the output
from torch's CUDA allocator (not through ``at::empty_strided``'s dispatch; a Launch call
measured 0.5-1.6 us less than session 18's on the lent H100 hosts) and calls
``cuLaunchKernel`` with parameters packed once per layout (``cuLaunchKernelEx`` with the
programmatic-stream-serialization attribute for a kernel compiled with ``launch_pdl``, as
triton's own launcher does for it: see ``pdl.pdl_enabled``).
A :class:`Table` finds the Launch of a call's layouts in C++: its few most recently used
entries first (by the Launch's own per-input comparison), else by a key. The fused Q/K
launch (one per layer in eager decode of a fused model) went the same way: through triton's
launcher its cached closure (``qk_kernel._FAST``) took 12-25 us per call on those hosts, most
of it Python (a nested key of five tensors' layouts, two allocations, ~30 arguments parsed).

Correctness: the parameter slots come from the compiled kernel's own Triton signature
(``kernel.src.signature``: every non-constexpr argument in order, with its C type), and the
first Launch of each compiled kernel in a process is checked against triton's launcher on
random inputs of the same layouts (bit-identical outputs, or :class:`CppLaunchError`), and
for following the call's scale (doubling it doubles every output exactly).

Build: compiled once per (source, torch, Python, compiler) with the system C++ compiler
against torch's headers -- no CUDA toolkit: the driver entry points are looked up in
``libcuda.so.1`` -- into ``$HF_HADAMARD_KQ_CACHE_DIR`` (default
``~/.cache/hf_hadamard_kq``), then loaded from there. Set ``HF_HADAMARD_KQ_CPP_LAUNCH``:

* ``auto`` (default): build on the first eager CUDA rotation; if the build fails, warn once
  (with the compiler's output) and keep triton's launcher (same results, slower host path);
* ``require``: a failed build raises :class:`CppLaunchError`;
* ``0``: never build it, and give no new layout a C++ launch.

The variable is read when a tensor layout is first seen (not per call): set it before the
first rotation; launches made before stay in :data:`TABLE` until
``triton_kernel.clear_plans()`` (:data:`QK_TABLE`: ``qk_kernel.clear_plans()``).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import torch

from . import forward_mode

ENV = "HF_HADAMARD_KQ_CPP_LAUNCH"
CACHE_ENV = "HF_HADAMARD_KQ_CACHE_DIR"
SOURCE = Path(__file__).with_name("cpp_launch.cpp")
MODULE_NAME = "hf_hadamard_kq_cpp_launch"

#: Slot roles (the same numbers as cpp_launch.cpp's ``Role``); a pointer role's value is the
#: index of its input (``IN_PTR``) or output (``OUT_PTR``).
VALUE, IN_PTR, OUT_PTR, SCALE = 0, 1, 2, 3
#: Null pointers after the kernel's parameters: triton 3.5-3.6 append its global and profile
#: scratch pointers (unused by these kernels, whose scratch sizes are checked to be 0); extra
#: entries are never read by the driver, so the count is an upper bound.
EXTRA_PARAMS = 2
#: Parameter types the C++ side packs.
PACKED_TYPES = frozenset({"i32", "i64", "u32", "u64", "fp32", "f32"})

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_module: Optional[ModuleType] = None
#: The module's ``Table`` of every single-tensor Launch made, by (layout, block): what
#: ``op.hadamard_apply`` calls first (``TABLE(x, scale, block)`` -> out, or None when it has
#: no Launch for x's layout or the Launch declined the call). None until the module is loaded.
TABLE: Any = None
#: The same for the fused Q/K launch: ``QK_TABLE(q, k, cos, sin, matrix, scale, 0)`` -> (qo,
#: ko) or None (``qk_kernel.try_rotate_qk`` calls it first). None until the module is loaded.
QK_TABLE: Any = None
_failed: Optional[str] = None  # why the build or libcuda failed (auto mode: warned once)
#: Compiled kernels whose first Launch matched triton's launcher, by CUfunction handle (the
#: kernel is kept, so that its handle cannot be reused by another kernel meanwhile).
_checked: dict[int, Any] = {}
#: Compiled kernels whose Launch disagreed with triton's (``auto`` mode), by ``id``; kept.
_rejected: dict[int, Any] = {}


_KEY = torch._C.DispatchKey
#: The dispatch keys of a plain dense CUDA tensor (its data, autograd, autocast): the C++
#: side's ``kPlainCuda``.
_PLAIN_CUDA = (torch._C.DispatchKeySet(_KEY.CUDA) | torch._C.DispatchKeySet(_KEY.AutogradCUDA)
               | torch._C.DispatchKeySet(_KEY.ADInplaceOrView)
               | torch._C.DispatchKeySet(_KEY.AutocastCUDA))


def plain_cuda(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether every tensor (None skipped) is plain dense CUDA data a kernel may read directly
    (the C++ launch's ``inputs_usable`` key test, for the Python launch paths): not a
    functionalization or functorch wrapper (no storage of its own: a null data pointer), a
    lazily negated or conjugated view, a zero tensor, a subclass, sparse or nested. Those take
    the custom op, whose dispatch unwraps or materializes them. While a forward-mode AD level
    is open (``torch.autograd.forward_ad.dual_level``, ``torch.func.jvp``) none is: any of
    them may be a dual tensor, whose tangent only the op's autograd kernel rotates. (About
    0.8 us per tensor on the 2-core development CPU: only the paths behind a declined or
    absent C++ launch pay it.)"""
    if forward_mode.level_open():
        return False
    plain = _PLAIN_CUDA
    keys = torch._C._dispatch_keys
    return all(t is None or (keys(t) | plain) == plain for t in tensors)


class CppLaunchError(RuntimeError):
    """The C++ launch could not be built (``require`` mode) or disagreed with triton's."""


def mode() -> str:
    """``auto``, ``require`` or ``off`` from :data:`ENV` (read per call: tests change it)."""
    value = os.environ.get(ENV, "auto").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("auto", "1", "on", "true", "yes", ""):
        return "auto"
    if value == "require":
        return "require"
    raise ValueError(f"{ENV}={value!r}: use auto, require or 0")


def cache_dir() -> Path:
    """Where built modules are kept."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_hadamard_kq"


def compiler() -> Optional[str]:
    """The C++ compiler: ``$CXX``, else the first of c++, g++, clang++ on PATH."""
    explicit = os.environ.get("CXX")
    if explicit:
        return explicit
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def compile_command(cxx: str, source: Path, output: Path) -> list[str]:
    """The compiler command line (torch's headers and libraries, this Python's headers)."""
    torch_dir = Path(torch.__file__).resolve().parent
    lib = torch_dir / "lib"
    return [
        cxx, "-O2", "-std=c++17", "-fPIC", "-shared", "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-I", str(torch_dir / "include"),
        "-I", str(torch_dir / "include" / "torch" / "csrc" / "api" / "include"),
        "-I", sysconfig.get_paths()["include"],
        str(source), "-o", str(output),
        "-L", str(lib), "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python", "-ldl",
        f"-Wl,-rpath,{lib}",
    ]  # fmt: skip


def _artifact(cxx: str, source: Optional[Path] = None) -> Path:
    """The cached module's path: named by a hash of everything the build depends on."""
    digest = hashlib.sha256()
    digest.update((SOURCE if source is None else source).read_bytes())
    for part in (torch.__version__, getattr(torch.version, "git_version", ""), sys.version,
                 " ".join(compile_command(cxx, Path("src"), Path("out")))):
        digest.update(part.encode())
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return cache_dir() / f"cpp_launch_{digest.hexdigest()[:20]}{suffix}"


def build(source: Optional[Path] = None) -> Path:
    """Compile the module into the cache (if not there yet); its path. Raises
    :class:`CppLaunchError` with the compiler's output when it cannot. ``source``: another
    version of ``cpp_launch.cpp`` (benchmarks/host_breakdown.py's same-process A/B)."""
    source = SOURCE if source is None else source
    cxx = compiler()
    if cxx is None:
        raise CppLaunchError(
            "no C++ compiler found (set CXX, or install g++); "
            f"or set {ENV}=0 to use triton's launcher")
    target = _artifact(cxx, source)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=target.suffix, dir=target.parent)
    os.close(fd)
    cmd = compile_command(cxx, source, Path(tmp))
    # a warning so that the pause (~10 s on an H100 host) is explained; once per machine
    _log.warning("hf_hadamard_kq: building the C++ launcher once (cached in %s)", target.parent)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CppLaunchError(
                f"building the C++ launcher failed ({' '.join(cmd)}):\n"
                f"{proc.stderr[-4000:]}\nset {ENV}=0 to use triton's launcher")
        os.chmod(tmp, 0o755)  # mkstemp made it 0600
        os.replace(tmp, target)  # atomic: a concurrent process sees all of it or nothing
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _log.info("hf_hadamard_kq: C++ launcher built in %.1f s", time.perf_counter() - start)
    return target


def prebuild() -> dict[str, Any]:
    """Build the module now (e.g. in a container's build step), not on the first eager CUDA
    rotation, and load it; what happened, as a dict: ``path``, ``cached`` (it was built
    before), ``seconds`` (the build), ``driver`` (whether libcuda's entry points were found:
    False on a machine without a CUDA driver, where the module is still built and cached for
    a machine with one of the same torch, Python and compiler). Raises :class:`CppLaunchError`
    when it cannot be built or loaded. Ignores :data:`ENV`: asked for explicitly."""
    cxx = compiler()
    cached = cxx is not None and _artifact(cxx).exists()
    start = time.perf_counter()
    path = build()
    seconds = time.perf_counter() - start
    try:
        loaded = _load(path)
    except (ImportError, OSError) as err:
        raise CppLaunchError(f"the built C++ launcher {path} does not load: {err}") from err
    try:
        loaded.load_driver()
        driver = True
    except RuntimeError:
        driver = False
    return {"path": str(path), "cached": cached, "seconds": round(seconds, 2),
            "driver": driver}


def _load(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(path))
    spec = importlib.util.spec_from_file_location(MODULE_NAME, str(path), loader=loader)
    if spec is None:  # pragma: no cover - the loader above always gives a spec
        raise CppLaunchError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def module() -> Optional[ModuleType]:
    """The built module, building it on first use and looking up libcuda's entry points;
    None when off (new layouts then get no C++ launch; those made before stay in
    :data:`TABLE` / :data:`QK_TABLE` until ``triton_kernel.clear_plans()`` /
    ``qk_kernel.clear_plans()``), or (``auto``) when the build or the lookup failed --
    then a RuntimeWarning said why, once."""
    global _module, _failed, TABLE, QK_TABLE
    current = mode()
    if current == "off":
        return None
    if _module is not None:
        return _module
    if _failed is not None and current == "auto":
        return None
    with _lock:
        if _failed is not None and current == "auto":  # failed while this thread waited
            return None
        if _module is None:
            try:
                loaded = _load(build())
                loaded.load_driver()  # libcuda's entry points (RuntimeError if it is absent)
                TABLE, QK_TABLE = loaded.Table(), loaded.Table()
                _module = loaded
                _failed = None
            except (CppLaunchError, OSError, ImportError, RuntimeError) as err:
                if current == "require":
                    raise CppLaunchError(str(err)) from err
                if _failed is None:
                    warnings.warn(
                        f"hf_hadamard_kq: the C++ launcher is unavailable, so eager rotations "
                        f"use triton's launcher (same results, more host time per call): "
                        f"{err}", RuntimeWarning, stacklevel=3)
                _failed = str(err)
                return None
    return _module


def slots(signature: dict, roles: Sequence[int], values: Sequence[Any]) -> Optional[list]:
    """``(type, role, value)`` of every non-constexpr parameter of a kernel whose Triton
    ``signature`` (name -> type, in order) takes the launch arguments described by ``roles``
    and ``values`` (one each per argument, constexprs included); None when a type is not one
    the C++ side packs."""
    types = list(signature.values())
    if len(types) != len(roles) or len(roles) != len(values):
        raise CppLaunchError(
            f"the kernel signature has {len(types)} parameters, the launch {len(roles)}")
    out = []
    for ty, role, value in zip(types, roles, values):
        if ty == "constexpr":
            continue
        if not (ty.startswith("*") or ty in PACKED_TYPES):
            return None
        out.append((ty, role, value))
    return out


#: What :func:`make_launch` returns when it cannot make a Launch *now* (a CUDA graph is being
#: captured, or a launch hook declined the self-check): the caller stores nothing, so that
#: a later call of the layout tries again.
RETRY = object()


def make_launch(
    kernel: Any,
    grid: int,
    inputs: Sequence[Optional[torch.Tensor]],
    outputs: Sequence[torch.Tensor],
    roles: Sequence[int],
    values: Sequence[Any],
    reference: Callable[..., Any],
    scale: float,
) -> Any:
    """A :class:`Launch` of ``kernel`` (a triton ``CompiledKernel`` that has run) for inputs of
    the layouts of ``inputs`` (tensors, or None where a call passes None), allocating outputs
    of the layouts of ``outputs``; None when there will be none (module off or unavailable, a
    launch feature it does not handle, a kernel whose self-check failed in ``auto`` mode: the
    caller keeps ``reference``, the Python launch of the same kernel:
    ``reference(*inputs, scale)`` -> the same outputs, or None when it declines);
    :data:`RETRY` when not now. The first Launch of each compiled kernel is compared with
    ``reference`` on random inputs of these layouts (:func:`_self_check`)."""
    first = next((t for t in inputs if t is not None), None)
    if (kernel is None or first is None or first.device.type != "cuda"
            or torch.version.hip is not None):
        return None
    if torch.cuda.is_current_stream_capturing():  # no build, no self-check (it syncs) now
        return RETRY
    mod = module()
    if mod is None or id(kernel) in _rejected:
        return None
    meta = kernel.metadata
    pdl = bool(getattr(meta, "launch_pdl", False))
    if (getattr(meta, "num_ctas", 1) != 1 or getattr(meta, "launch_cooperative_grid", False)
            or (pdl and not mod.has_launch_ex())
            or getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0)
            or kernel.function is None):
        return None
    packed = slots(kernel.src.signature, roles, values)
    if packed is None:
        return None
    from . import launch as launch_mod

    if launch_mod.hooks_active():  # the launch and its self-check would decline: not now
        return RETRY
    launch = mod.Launch(kernel.function, grid, meta.num_warps, meta.shared, tuple(inputs),
                        tuple(outputs), packed, launch_mod._RUNTIME, EXTRA_PARAMS, kernel,
                        pdl=pdl)
    if _checked.get(kernel.function) is not kernel:
        verdict = _self_check(launch, reference, inputs, scale, kernel)
        if verdict is None:
            return RETRY
        if not verdict:
            _rejected[id(kernel)] = kernel
            return None
        _checked[kernel.function] = kernel
    return launch


def probe_like(like: torch.Tensor) -> torch.Tensor:
    """A random tensor with ``like``'s shape, strides and dtype (strides may overlap, as in
    an expanded tensor: the values are drawn for the underlying storage)."""
    span = 1 + sum((n - 1) * abs(st) for n, st in zip(like.shape, like.stride()) if n > 0)
    flat = torch.randn(span, device=like.device).to(like.dtype)
    return flat.as_strided(like.shape, like.stride())


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN payloads and signed zeros included), unlike ``torch.equal``."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_int = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def _outputs(result: Any) -> Optional[tuple]:
    """A launch's result as a tuple of tensors (None stays None)."""
    if result is None or isinstance(result, tuple):
        return result
    return (result,)


def doubles(single: Sequence[torch.Tensor], doubled: Sequence[torch.Tensor]) -> bool:
    """Whether each of ``doubled`` is exactly twice ``single``'s tensor: scaling by 2 commutes
    with every floating-point operation and rounding outside the subnormal range, so a launch
    that follows the call's scale gives this (subnormal results may differ by their spacing,
    at most ``2 * tiny``); one whose scale slot is stale gives ``doubled == single``."""
    if len(single) != len(doubled):
        return False
    for one, two in zip(single, doubled):
        if one.shape != two.shape or one.dtype != two.dtype:
            return False
        slack = 2 * torch.finfo(one.dtype).tiny
        if not bool(((two.double() - 2 * one.double()).abs() <= slack).all()):
            return False
    return True


def _self_check(launch: Callable, reference: Callable, inputs: Sequence[Optional[torch.Tensor]],
                scale: float, kernel: Any) -> Optional[bool]:
    """Whether ``launch`` and ``reference`` give bit-identical outputs on random inputs of the
    layouts of ``inputs`` (None stays None), and ``launch`` follows the call's scale (at twice
    the scale, exactly twice the outputs: the Launch writes its scale slot per call, and the
    tables are keyed without the scale); None when one of them declined the call (e.g. a
    launch hook is installed: check again later). A disagreement raises in ``require`` mode
    and warns in ``auto`` mode (the kernel then keeps triton's launcher)."""
    probes = [None if t is None else probe_like(t) for t in inputs]
    expected = _outputs(reference(*probes, scale))
    got = _outputs(launch(*probes, scale))
    doubled = _outputs(launch(*probes, 2 * scale))
    if expected is None or got is None or doubled is None:
        return None
    if len(expected) == len(got) and all(map(same_bits, expected, got)):
        if doubles(got, doubled):
            return True
        problem = "does not follow the call's scale"
    else:
        problem = "disagrees with triton's launcher"
    like = next(t for t in inputs if t is not None)
    message = (f"the C++ launch of {kernel.name} {problem} for inputs "
               f"of shapes {[None if t is None else tuple(t.shape) for t in inputs]} (the "
               f"first: strides {like.stride()}, {like.dtype})")
    if mode() == "require":
        raise CppLaunchError(f"{message}; set {ENV}=0 to use triton's launcher, and please "
                             "report this")
    warnings.warn(f"hf_hadamard_kq: {message}; this kernel keeps triton's launcher (please "
                  "report this)", RuntimeWarning, stacklevel=4)
    return False
