"""Programmatic dependent launch (PDL) for decode-sized rotations: whether to use it.

A decode-sized rotation is latency-bound, and part of its latency is starting only once the
previous kernel in the stream has finished. With CUDA's programmatic-stream-serialization
launch attribute (sm_90+) its programs may be scheduled while that kernel finishes; the
kernels (triton_kernel's row kernel, qk_kernel's fused Q/K kernel, ``PDL`` constexpr) then
wait for it with ``griddepcontrol.wait`` before touching memory. This module holds the one
decision -- asked for, and possible here -- and why it is an opt-in; the launch paths
(triton's launcher with ``launch_pdl``, ``cuLaunchKernelEx`` in cpp_launch.cpp) follow the
compiled kernel.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton.language as tl
except ImportError:  # pragma: no cover - triton absent (CPU installs)
    tl = None

#: Kernels run in triton's CPU interpreter (read once, as triton_kernel reads it).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"

#: ``1``: launch decode-sized rotations with programmatic dependent launch (:func:`pdl_enabled`);
#: unset or ``0``: without (the default).
ENV: str = "HF_HADAMARD_KQ_PDL"


def triton_has_pdl() -> bool:
    """triton can compile ``gdc_wait`` and launch with ``launch_pdl`` (3.3+)."""
    if tl is None:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - a triton without the CUDA backend
        return False
    cuda_extra = getattr(getattr(tl, "extra", None), "cuda", None)
    return (hasattr(cuda_extra, "gdc_wait")
            and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {}))


def requested() -> bool:
    """``HF_HADAMARD_KQ_PDL`` is ``1``; ValueError for a value other than 0, 1 or empty."""
    value = os.environ.get(ENV, "0").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV}={value!r}: use 1 (programmatic dependent launch for "
                         f"decode-sized rotations on sm_90+ GPUs) or 0 / unset (off)")
    return value == "1"


requested()  # a bad value fails at import, not at the first decode step


@functools.cache
def pdl_enabled(device: torch.device) -> bool:
    """Whether decode-sized rotation launches (the row kernel's and the fused Q/K kernel's)
    on ``device`` use programmatic dependent launch (PDL): only when asked for with
    ``HF_HADAMARD_KQ_PDL=1``, on a CUDA device of compute capability 9.0+ (``griddepcontrol``
    is sm_90 PTX) with triton 3.3+; never on ROCm or under the interpreter. Checked when
    this module is imported (another value than 0, 1 or empty is a ValueError) and read when
    a device's first decode-sized plan is made: set it before the first rotation, or call
    ``pdl_enabled.cache_clear()`` and ``clear_plans()`` of triton_kernel and qk_kernel.
    Prefill-sized launches (bandwidth-bound; their tilings were measured without it) never
    use it.

    What it does: the rotation is launched with the programmatic-stream-serialization
    attribute, so its programs may be scheduled while the previous kernel in the stream
    finishes; they wait for it (``griddepcontrol.wait``, which also makes its writes
    visible) before their first load or store, so their launch latency overlaps that
    kernel. Outputs are bit-identical either way.

    Why it is off by default (session 21, BENCHMARKS.md, two H100 machines): back to back in
    a CUDA graph it saves 0.23-0.35 us per launch at every decode size (d = 128: 1.63 /
    1.82 / 1.95 -> 1.35 / 1.53 / 1.64 us at 1 / 16 / 64 tokens). But behind the kernel that
    really precedes it -- the q or k projection's cuBLAS GEMM -- the effect depends on that
    GEMM: with d = 64, and d = 128 at batch 1 with up to 16 tokens, it saved 0.15-1.0 us
    per launch (the fused launch at d = 256: up to 1.1), while with d = 128 and 32-64
    tokens in a step (batch 32 or 64 decode) the fused launch cost up to 1.6 us more (3.2 on
    one machine) and the single-tensor one 0.1-0.2 more, and the single-tensor rotation at
    d = 256 0.3-0.4 us more at every size. (The fused launch's losses: scheduled while the
    GEMM still held most SMs, its programs crowded onto the few free ones -- 9 SMs for 160
    programs, benchmarks/pdl_placement.py; a third machine measured the opposite at 1 and
    at 32-64 tokens.) A default cannot know the preceding kernel or the machine, and the
    gains land where decode is host-bound (batch 1), the losses where it is not.
    """
    if not requested():  # (read first: a bad value is an error on every platform)
        return False
    if device.type != "cuda" or INTERPRET or tl is None or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9 and triton_has_pdl()
