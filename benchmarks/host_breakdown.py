"""Where the host time of one eager rotation goes (decode size, CUDA): the single-tensor
rotation and the fused Q/K launch.

Issue 6 asks for <= 8 us of host time per rotation; on the lent H100 hosts ``torch.clone`` of
the same tensor alone takes 7-12 us. This splits our call into its parts, each timed the same
way (back-to-back calls, one sync at the end, per-call mean; rounds interleave the parts so
that host drift hits all of them), to show how much is Python of ours and how much is the
allocation and the launch that any implementation pays:

* ``clone``: ``x.clone()`` (torch's own allocation + one copy kernel), the reference;
* ``empty_like``: the output allocation alone;
* ``hadamard_apply``: the whole call the model hooks make (its FAST entry is the C++ launch
  when cpp_launch could build it, as in normal use);
* ``hadamard_apply_python``: the same call without the C++ table and with the FAST entry
  swapped for the Python closure around triton's launcher (the path before the C++ launch;
  set per round, outside the timing);
* ``cpp_launch``: the C++ ``Launch`` alone (checks, allocation, ``cuLaunchKernel``);
* ``cpp_table``: the C++ ``Table`` call (the layout lookup in C++, then the Launch);
* ``fast_closure``: the Python closure alone (no dispatch checks, no key lookup);
* ``launch_only``: triton's C launcher with the closure's arguments into a preallocated
  output (no allocation, no Python of ours);
* ``key_lookup``: building the layout key and the dict lookup (no launch);
* ``device_and_hook_checks``: the closure's per-call device and launch-hook checks;
* ``qk_fused``: the fused Q/K launch a fused layer makes (``qk_kernel.try_rotate_qk`` with
  RoPE: query (1, 32, tokens, 128) and key (1, 8, tokens, 128) in the projections' views,
  cos/sin (1, tokens, 128)), through the C++ ``QK_TABLE`` as in normal use;
* ``qk_fused_python``: the same call with ``QK_TABLE`` off (the Python closure around
  triton's launcher: the path before the C++ launch);
* ``qk_cpp_table``: the ``QK_TABLE`` call alone;
* ``qk_clone_pair``: ``q.clone(), k.clone()``, the reference for two allocations and two
  copy kernels.

With ``--baseline-source FILE`` (another version of ``cpp_launch.cpp``, e.g. ``git show
HEAD~1:hf_hadamard_kq/ops/cpp_launch.cpp``), that version is built too and its launches made
for the same kernels and layouts, for an A/B in one process (same host, interleaved rounds):

* ``base_cpp_launch`` / ``base_cpp_table`` / ``base_qk_cpp_table``: its Launch, Table and
  QK table calls;
* ``base_hadamard_apply``: its table behind the hot-path entry's Python checks as they were
  before session 19 (exact type, compiling, autograd, CUDA, then the table);
* ``base_qk_fused``: ``try_rotate_qk`` with its QK table.

With ``--baseline-no-pdl`` (which sets ``HF_HADAMARD_KQ_PDL=1`` for this run's own launches:
PDL is opt-in) the baseline is this package's own module, its launches made with
programmatic dependent launch off (``pdl_enabled`` patched where the kernels' modules use
it: the kernels compiled without the wait, launched with ``cuLaunchKernel``), and
``base_hadamard_apply`` is the current hot-path entry with the baseline's launch and table
installed: the host cost of PDL (``cuLaunchKernelEx`` with its attribute) side by side.

Usage (GPU machine): ``python benchmarks/host_breakdown.py --out results/x.json``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_hadamard_kq.ops import cpp_launch, pdl
from hf_hadamard_kq.ops import launch as launch_mod
from hf_hadamard_kq.ops import op as op_mod
from hf_hadamard_kq.ops import qk_kernel as qk
from hf_hadamard_kq.ops import triton_kernel as tk


def per_call_us(fn, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def with_module(loaded, warm):
    """``warm()``'s result, run with ``loaded`` as the C++ module (fresh tables and plans, so
    that the launches it makes are ``loaded``'s); the package's own module is back after."""
    saved = cpp_launch._module, cpp_launch.TABLE, cpp_launch.QK_TABLE
    try:
        cpp_launch._module = loaded
        cpp_launch.TABLE, cpp_launch.QK_TABLE = loaded.Table(), loaded.Table()
        tk.clear_plans()
        qk.clear_plans()
        return warm()
    finally:
        cpp_launch._module, cpp_launch.TABLE, cpp_launch.QK_TABLE = saved
        tk.clear_plans()
        qk.clear_plans()


def apply_before_session19(table, x, scale, matrix, block):
    """The hot-path entry's Python before session 19 (op.hadamard_apply up to its C++ table
    call), for the baseline's table."""
    if (
        type(x) is torch.Tensor
        and not torch.compiler.is_compiling()
        and not (
            torch.is_grad_enabled()
            and (x.requires_grad or (matrix is not None and matrix.requires_grad))
        )
    ):
        if matrix is None and x.is_cuda:
            out = None if table is None else table(x, scale, block)
            if out is not None:
                return out
    raise SystemExit("the baseline table declined a call")


def qk_inputs(tokens: int) -> tuple:
    """q, k, cos, sin of a fused layer's call (Llama-3-8B's heads: 32 query, 8 key)."""
    q = torch.randn(1, tokens, 32, 128, device="cuda").to(torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, tokens, 8, 128, device="cuda").to(torch.bfloat16).transpose(1, 2)
    angle = torch.rand(1, tokens, 64, device="cuda") * 100
    cos = torch.cat([angle.cos()] * 2, -1).to(torch.bfloat16)
    sin = torch.cat([angle.sin()] * 2, -1).to(torch.bfloat16)
    return q, k, cos, sin


def set_pdl_decision(decide):
    """Make ``decide(device)`` the PDL decision of every module that plans rotation launches
    (the row kernel's and the fused Q/K kernel's); returns the previous one. Plans made
    before keep theirs: clear them to rebuild."""
    saved = tk.pdl_enabled
    tk.pdl_enabled = qk.pdl_enabled = decide
    return saved


def _without_pdl(fn):
    """``fn()`` with programmatic dependent launch off for the launches it makes."""
    saved = set_pdl_decision(lambda device: False)
    try:
        return fn()
    finally:
        set_pdl_decision(saved)


def parts_for(tokens: int, baseline=None, no_pdl: bool = False) -> dict:
    """The timed callables for a query (1, 32, tokens, 128) in the projection's view, and the
    fused Q/K launch's (``no_pdl``: ``baseline`` is this module, its launches without PDL)."""
    x = torch.randn(1, tokens, 32, 128, device="cuda").to(torch.bfloat16).transpose(1, 2)
    q, k, cos, sin = qk_inputs(tokens)
    scale = 1 / math.sqrt(128)
    device = x.get_device()
    key = (x.shape, x.stride(), x.dtype, device, 128)

    def warm():
        for _ in range(3):  # plans, launcher cache entries, closures and C++ launches
            op_mod.hadamard_apply(x, scale, None, 128)
            qk.try_rotate_qk(q, k, scale, None, cos, sin)
        return tk.FAST.get(key), cpp_launch.TABLE, cpp_launch.QK_TABLE

    # the baseline's launches first: making them clears every plan, closure and table
    if baseline is None:
        base = None
    else:
        base = with_module(baseline, (lambda: _without_pdl(warm)) if no_pdl else warm)
    warm()
    native = tk.FAST.get(key)
    if type(native).__name__ != "Launch":
        raise SystemExit(f"no C++ launch for {key}: {native!r} (see cpp_launch.py)")
    plan = tk._ROW_PLANS[(x.shape, x.stride(), x.dtype, True, device, 128)]
    parts = tk._ROWS.direct_parts(plan.key, device, plan.meta, plan.int_key)
    launch, function, coop, pdl, packed, meta_values = parts
    fast = tk._fast_closure(plan, device, parts)
    cpp_table = cpp_launch.TABLE
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    xp, op = x.data_ptr(), out.data_ptr()
    args = (*plan.scalars, float(scale), *meta_values)
    stream = tk._ROWS._stream(device)
    table = tk.FAST
    current_device, hooks_active = tk._current_device, launch_mod.hooks_active
    contiguous = torch.contiguous_format
    parts = {
        "clone": lambda: x.clone(),
        "empty_like": lambda: torch.empty_like(x, memory_format=contiguous),
        "hadamard_apply": (lambda: op_mod.hadamard_apply(x, scale, None, 128),
                           _installs(key, native, cpp_table)),
        "hadamard_apply_python": (lambda: op_mod.hadamard_apply(x, scale, None, 128),
                                  _installs(key, fast, None)),
        "cpp_launch": lambda: native(x, scale),
        "cpp_table": lambda: cpp_table(x, scale, 128),
        "fast_closure": lambda: fast(x, scale),
        "launch_only": lambda: launch(plan.grid, 1, 1, stream, function, coop, pdl, None, None,
                                      packed, None, None, None, xp, xp, op, *args),
        "key_lookup": lambda: table.get((x.shape, x.stride(), x.dtype, x.get_device(), 128)),
        "device_and_hook_checks": lambda: current_device() != device or hooks_active(),
    }
    # the paths timed here compute the rotation (torch's fp32 path, bf16 tolerances), alike
    torch.testing.assert_close(fast(x, scale), op_mod.torch_hadamard(x, scale, None, 128))
    assert torch.equal(native(x, scale), fast(x, scale))
    if base is not None:
        base_launch, base_table = base[:2]
        if type(base_launch).__name__ != "Launch" or (type(base_launch) is type(native)
                                                      and not no_pdl):
            raise SystemExit(f"no baseline C++ launch for {key}: {base_launch!r}")
        if no_pdl and (base_launch.pdl() or not native.pdl()):
            raise SystemExit(f"PDL A/B: baseline pdl={base_launch.pdl()}, ours {native.pdl()}")
        assert torch.equal(base_launch(x, scale), native(x, scale))
        assert torch.equal(base_table(x, scale, 128), native(x, scale))
        parts.update({
            "base_cpp_launch": lambda: base_launch(x, scale),
            "base_cpp_table": lambda: base_table(x, scale, 128),
            "base_hadamard_apply": (
                (lambda: op_mod.hadamard_apply(x, scale, None, 128),
                 _installs(key, base_launch, base_table)) if no_pdl else
                (lambda: apply_before_session19(base_table, x, scale, None, 128))),
        })
    parts.update(qk_parts_for(q, k, cos, sin, scale, None if base is None else base[2], no_pdl))
    return parts


def qk_parts_for(q, k, cos, sin, scale: float, base_table=None, no_pdl: bool = False) -> dict:
    """The fused Q/K launch's timed callables (after the hot path made its launches);
    ``base_table``: the baseline module's QK table, made for the same tensors."""
    table = cpp_launch.QK_TABLE
    if table is None or table(q, k, cos, sin, None, scale, qk.QK_TAG) is None:
        raise SystemExit("no C++ fused Q/K launch (see cpp_launch.py)")
    python = qk._FAST[qk._layout(q, k, None, cos, sin, scale)]
    assert all(map(cpp_launch.same_bits, table(q, k, cos, sin, None, scale, qk.QK_TAG),
                   python(q, k, cos, sin, None)))
    parts = {}
    if base_table is not None and no_pdl:
        ours = table.find(qk.QK_TAG, q, k, cos, sin, None)
        base = base_table.find(qk.QK_TAG, q, k, cos, sin, None)
        if ours is None or base is None or base.pdl() or not ours.pdl():
            raise SystemExit(f"PDL A/B (fused): baseline {base!r}, ours {ours!r}")
    if base_table is not None:
        pair = base_table(q, k, cos, sin, None, scale, qk.QK_TAG)
        assert pair is not None and all(map(cpp_launch.same_bits, pair,
                                            table(q, k, cos, sin, None, scale, qk.QK_TAG)))
        parts = {
            "base_qk_cpp_table": lambda: base_table(q, k, cos, sin, None, scale, qk.QK_TAG),
            "base_qk_fused": (lambda: qk.try_rotate_qk(q, k, scale, None, cos, sin),
                              _sets(cpp_launch, "QK_TABLE", base_table)),
        }
    return parts | {
        "qk_clone_pair": lambda: (q.clone(), k.clone()),
        "qk_fused": (lambda: qk.try_rotate_qk(q, k, scale, None, cos, sin),
                     _sets(cpp_launch, "QK_TABLE", table)),
        "qk_fused_python": (lambda: qk.try_rotate_qk(q, k, scale, None, cos, sin),
                            _sets(cpp_launch, "QK_TABLE", None)),
        "qk_cpp_table": lambda: table(q, k, cos, sin, None, scale, qk.QK_TAG),
    }


def _sets(obj, name: str, value):
    """An install function: sets ``obj.name`` to ``value``, returns the undo."""
    def install():
        old = getattr(obj, name)
        setattr(obj, name, value)
        return lambda: setattr(obj, name, old)

    return install


def _installs(key, entry, table):
    """An install function for ``tk.FAST[key]`` and ``cpp_launch.TABLE`` (None: the Python
    path)."""
    def install():
        saved = tk.FAST[key], cpp_launch.TABLE
        tk.FAST[key], cpp_launch.TABLE = entry, table

        def undo():
            tk.FAST[key], cpp_launch.TABLE = saved

        return undo

    return install


def timed(part, n: int) -> float:
    """``per_call_us`` of a part: a callable, or (callable, install function: run before the
    timing, its undo after)."""
    if isinstance(part, tuple):
        fn, install = part
        undo = install()
        try:
            return per_call_us(fn, n)
        finally:
            undo()
    return per_call_us(part, n)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--baseline-source", type=Path, default=None,
                        help="another cpp_launch.cpp to time side by side (base_* parts)")
    parser.add_argument("--baseline-no-pdl", action="store_true",
                        help="base_* parts: this module's launches without PDL")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("host_breakdown.py needs a GPU")
    import triton

    start = time.perf_counter()
    cpp_launch.module()  # builds unless cached (use an empty HF_HADAMARD_KQ_CACHE_DIR)
    build_s = time.perf_counter() - start
    baseline = None
    if args.baseline_source is not None and args.baseline_no_pdl:
        raise SystemExit("--baseline-source and --baseline-no-pdl exclude each other")
    if args.baseline_source is not None:
        baseline = cpp_launch._load(cpp_launch.build(args.baseline_source))
        baseline.load_driver()
    elif args.baseline_no_pdl:
        os.environ[pdl.ENV] = "1"
        pdl.pdl_enabled.cache_clear()
        baseline = cpp_launch.module()
    rows = []
    for tokens in (1, 16, 64):
        parts = parts_for(tokens, baseline, args.baseline_no_pdl)
        samples: dict[str, list[float]] = {name: [] for name in parts}
        for part in parts.values():  # warm-up
            timed(part, 200)
        for _ in range(args.rounds):
            for name, part in parts.items():
                samples[name].append(timed(part, args.calls))
        row = {"tokens": tokens}
        for name, values in samples.items():
            row[f"{name}_us"] = round(statistics.median(values), 2)
            row[f"{name}_us_all"] = [round(v, 2) for v in values]
        rows.append(row)
        print({k: v for k, v in row.items() if not k.endswith("_all")}, flush=True)
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=triton.__version__, calls=args.calls, rounds=args.rounds,
               native_module_s=round(build_s, 2),
               baseline_source=None if args.baseline_source is None else str(args.baseline_source),
               baseline_no_pdl=args.baseline_no_pdl)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
