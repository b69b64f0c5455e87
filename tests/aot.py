"""Ahead-of-time compilation of triton (and Gluon) kernels for an H100 (sm_90) on a machine
without a GPU: the tests that check what a kernel compiles to (barriers, vector widths,
PDL waits, shared memory) share this one way of asking triton for it."""

from __future__ import annotations

import pytest


def compile_sm90(fn: object, sig: dict[str, str], const: dict[str, object], warps: int,
                 aligned_ptrs: bool = False, stages: int | None = None):
    """``fn`` compiled for sm_90: ``sig`` types the arguments it names (others ``i32``),
    ``const`` gives the constexprs. ``aligned_ptrs``: pointer arguments specialised as 16-byte
    aligned, as triton does at run time for aligned tensors; ``stages`` None: triton's default
    pipelining depth, as the package launches it. A Gluon kernel gets Gluon's source class."""
    compiler = pytest.importorskip("triton.compiler")
    backend = pytest.importorskip("triton.backends.compiler")
    import triton

    params = {p.name: p for p in fn.params}  # type: ignore[attr-defined]
    full = {
        name: ("constexpr" if params[name].is_constexpr else sig.get(name, "i32"))
        for name in fn.arg_names  # type: ignore[attr-defined]
    }
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if aligned_ptrs and full[name].startswith("*")}
    source = compiler.ASTSource
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource as source
    src = source(fn, full, const, attrs=attrs)
    options: dict[str, int] = {"num_warps": warps}
    if stages is not None:
        options["num_stages"] = stages
    return triton.compile(src, target=backend.GPUTarget("cuda", 90, 32), options=options)
