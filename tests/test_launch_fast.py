"""The eager fast path of single-tensor rotations (``triton_kernel.FAST``, used first by
``op.hadamard_apply``) on CPU: its closure must hand triton's C launcher exactly the arguments
that ``CachedLauncher``'s own direct launch passes for the same plan, and launch nothing when
the call is not the cached specialisation's. A fake compiled kernel records both (no GPU
here); tests/test_gpu_fused.py runs the real kernel through the fast path on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

tk = pytest.importorskip("hf_hadamard_kq.ops.triton_kernel")
from hf_hadamard_kq.ops import launch as launch_mod  # noqa: E402
from hf_hadamard_kq.ops import op as op_mod  # noqa: E402
from hf_hadamard_kq.ops import pdl  # noqa: E402

#: Position of the first kernel argument in a C launcher call: grid (3), stream, function,
#: coop, pdl, two scratch buffers, packed metadata, hook args, enter and exit hooks.
FIRST_ARG = 13


class _Run:
    """triton 3.5-3.6's ``CudaLauncher`` form, as ``launch._direct`` recognises it."""

    global_scratch_size = 0
    profile_scratch_size = 0
    launch_cooperative_grid = False
    launch_pdl = False

    def __init__(self, calls: list) -> None:
        self.launch = lambda *args: calls.append(args)

    def __call__(self, gridX, gridY, gridZ, stream, function, args):
        raise AssertionError("the direct launch must call the C function, not __call__")


class _Kernel:
    def __init__(self, calls: list) -> None:
        self.run = _Run(calls)
        self.function = "function-handle"
        self.packed_metadata = "packed-metadata"


class _JitFunction:
    """Stands in for the @triton.jit function: records the first (compiling) launch."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def __getitem__(self, grid):
        def compile_and_launch(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return _Kernel(self.calls)

        return compile_and_launch


@pytest.fixture
def recorded(monkeypatch):
    calls: list = []
    launcher = launch_mod.CachedLauncher(_JitFunction(calls))
    launcher._stream = lambda device: 1234
    device = [-1]  # CPU tensors report device index -1
    monkeypatch.setattr(tk, "_ROWS", launcher)
    monkeypatch.setattr(tk, "FAST", {})
    monkeypatch.setattr(tk, "_current_device", lambda: device[0])
    return calls, device


def _decode_query(tokens: int, offset: int = 0) -> torch.Tensor:
    """The query of a decode step as the projection's transposed view (strided rows)."""
    buf = torch.randn(tokens * 32 * 128 + offset).to(torch.bfloat16)
    return buf[offset:].view(1, tokens, 32, 128).transpose(1, 2)


@pytest.mark.parametrize("tokens", [1, 16, 64, 300])
def test_fast_closure_passes_the_direct_launch_arguments(recorded, tokens):
    calls, _ = recorded
    x = _decode_query(tokens)
    plan = tk._rows_plan(x, x, x.dtype, 128, True, False, tk._row_layout(x))
    out = torch.empty(x.shape, dtype=x.dtype)
    scale = 128**-0.5
    tk._launch_plan(plan, x, x, out, scale)  # compiles (fake) and caches the launch
    tk._launch_plan(plan, x, x, out, scale)  # the cached direct launch
    assert calls[0][0] == "jit" and len(calls) == 2
    # the compiling call gets the tiling's warps and pipelining depth (the measured table's)
    cfg = tk.rows_config(128, False, True, x.numel() // 128 <= tk.SMALL_ROWS)
    assert cfg.num_stages is not None
    assert calls[0][3]["num_warps"] == cfg.num_warps
    assert calls[0][3]["num_stages"] == cfg.num_stages == plan.num_stages
    direct = calls[1]
    tk._remember_fast(x, plan, 128, 1.0)
    fast = tk.FAST[(x.shape, x.stride(), x.dtype, -1, 128)]
    y = fast(x, scale)
    assert len(calls) == 3
    got = calls[2]
    out_at = FIRST_ARG + 2  # x, W (= x for Sylvester), out
    assert got[:out_at] == direct[:out_at]
    assert direct[FIRST_ARG] == x.data_ptr() and direct[out_at] == out.data_ptr()
    assert got[out_at] == y.data_ptr() and got[out_at + 1 :] == direct[out_at + 1 :]
    assert got[0] == plan.grid and got[3] == 1234
    scale_at = out_at + 1 + len(plan.scalars)
    assert type(got[scale_at]) is float
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    for s in (0.5, 2, scale):  # the closure keeps the last scale's arguments: a new one counts
        fast(x, s)
        assert calls[-1][scale_at] == s and type(calls[-1][scale_at]) is float
        assert calls[-1][scale_at + 1 :] == direct[scale_at + 1 :]


@pytest.mark.parametrize("pdl", [True, False])
def test_direct_launches_pass_the_compiled_kernels_pdl_flag(recorded, monkeypatch, pdl):
    """A kernel compiled with ``launch_pdl`` must be launched with the attribute (and one
    compiled without it, without): the cached direct launch and the fast closure pass the
    compiled kernel's own flag to triton's C launcher (its 7th argument)."""
    calls, _ = recorded
    monkeypatch.setattr(_Run, "launch_pdl", pdl)
    x = _decode_query(1)
    plan = tk._rows_plan(x, x, x.dtype, 128, True, False, tk._row_layout(x))
    out = torch.empty(x.shape, dtype=x.dtype)
    tk._launch_plan(plan, x, x, out, 1.0)  # compiles (fake)
    tk._launch_plan(plan, x, x, out, 1.0)  # the cached direct launch
    tk._remember_fast(x, plan, 128, 1.0)
    tk.FAST[(x.shape, x.stride(), x.dtype, -1, 128)](x, 1.0)
    assert len(calls) == 3 and calls[0][0] == "jit"
    assert calls[1][6] is pdl and calls[2][6] is pdl


def test_launcher_passes_the_pipelining_depth_only_when_named():
    """``num_stages`` reaches the compiling call when given; None (a tiling without a measured
    depth) passes nothing, so triton keeps its own default for the backend (3 on CUDA, 2 on
    ROCm)."""
    calls: list = []
    launcher = launch_mod.CachedLauncher(_JitFunction(calls))
    x = torch.empty(4)
    for key, stages in (("a", 1), ("b", None), ("c", 3)):
        launcher.launch(1, key, -1, (x,), (), {}, 4, None, stages)
        kwargs = calls[-1][3]
        assert kwargs.get("num_stages", "absent") == ("absent" if stages is None else stages)
    assert [c[0] for c in calls] == ["jit"] * 3


@pytest.mark.parametrize("device_has_pdl", [True, False])
def test_decode_plans_launch_with_pdl_where_the_device_has_it(recorded, monkeypatch,
                                                              device_has_pdl):
    """Decode-sized row-kernel plans wait for their predecessor in the kernel (``PDL``) and
    ask triton's compiling call for ``launch_pdl`` (its launcher then sets the attribute)
    exactly where ``pdl_enabled`` says the device has PDL; prefill-sized plans never do (their
    tilings were measured without it). The interpreter/CPU case: tests below."""
    calls, _ = recorded
    seen = []
    monkeypatch.setattr(tk, "pdl_enabled", lambda device: seen.append(device) or device_has_pdl)
    for tokens in (1, 64, 300):  # 32, 2048 and 9600 rows (SMALL_ROWS: 2048)
        x = _decode_query(tokens)
        plan = tk._rows_plan(x, x, x.dtype, 128, True, False, tk._row_layout(x))
        want = device_has_pdl and tokens * 32 <= tk.SMALL_ROWS
        assert plan.pdl is want and plan.meta["PDL"] is want, tokens
        tk._launch_plan(plan, x, x, torch.empty(x.shape, dtype=x.dtype), 1.0)
        assert calls[-1][0] == "jit", "each case is its own compiled kernel"
        assert calls[-1][3].get("launch_pdl", False) is want, tokens
    assert seen and all(d == torch.device("cpu") for d in seen)


def test_fused_plans_launch_with_pdl_at_decode_sizes(monkeypatch):
    from hf_hadamard_kq.ops import qk_kernel as qk

    monkeypatch.setattr(qk, "pdl_enabled", lambda device: True)
    for tokens, want in ((1, True), (64, True), (65, False)):  # rows: 32 x tokens query heads
        q = torch.empty(1, 32, tokens, 128, dtype=torch.bfloat16)
        k = torch.empty(1, 8, tokens, 128, dtype=torch.bfloat16)
        cos = torch.empty(1, tokens, 128, dtype=torch.bfloat16)
        plan = qk._make_plan(q, k, q, k, cos, 1.0, q)
        assert plan.pdl is want and plan.meta["PDL"] is want, tokens
    monkeypatch.setattr(qk, "pdl_enabled", lambda device: False)
    assert not qk._make_plan(q[:, :, :1], k[:, :, :1], q, k, cos, 1.0, q).pdl


def test_pdl_is_opt_in_and_needs_cuda_compute_capability_9(monkeypatch):
    """``pdl_enabled``: only with ``HF_HADAMARD_KQ_PDL=1`` (off by default: measured gains and
    losses, see its docstring), never off CUDA or under the interpreter, only from sm_90 (PTX
    ``griddepcontrol``); another value is an error naming the variable, at import too."""
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(pdl, "INTERPRET", False)
    cuda = torch.device("cuda", 0)
    available = pdl.triton_has_pdl() and torch.version.hip is None
    try:
        for value, want in ((None, False), ("0", False), ("", False), ("1", available)):
            pdl.pdl_enabled.cache_clear()
            if value is None:
                monkeypatch.delenv(pdl.ENV, raising=False)
            else:
                monkeypatch.setenv(pdl.ENV, value)
            assert pdl.pdl_enabled(cuda) is want, value
            assert not pdl.pdl_enabled(torch.device("cpu"))
        pdl.pdl_enabled.cache_clear()
        capability[0] = (8, 0)
        assert not pdl.pdl_enabled(cuda)
        pdl.pdl_enabled.cache_clear()
        capability[0] = (9, 0)
        monkeypatch.setattr(pdl, "INTERPRET", True)
        assert not pdl.pdl_enabled(cuda)
        monkeypatch.setattr(pdl, "INTERPRET", False)
        pdl.pdl_enabled.cache_clear()
        monkeypatch.setenv(pdl.ENV, "yes")
        for device in (cuda, torch.device("cpu")):  # an error everywhere, not just on sm_90
            with pytest.raises(ValueError, match="HF_HADAMARD_KQ_PDL"):
                pdl.pdl_enabled(device)
    finally:
        pdl.pdl_enabled.cache_clear()
    proc = subprocess.run([sys.executable, "-c", "import hf_hadamard_kq"], capture_output=True,
                          text=True, env={**os.environ, pdl.ENV: "on"})
    assert proc.returncode != 0 and "HF_HADAMARD_KQ_PDL='on'" in proc.stderr, proc.stderr[-500:]


def test_fast_closure_refuses_other_calls(recorded, monkeypatch):
    """Misaligned pointers (same shape and strides, so the same FAST key), another current
    device, or an installed launch hook: the closure launches nothing and returns None (the
    caller then takes the normal path, which handles each case)."""
    calls, device = recorded
    x = _decode_query(1)
    plan = tk._rows_plan(x, x, x.dtype, 128, True, False, tk._row_layout(x))
    tk._launch_plan(plan, x, x, torch.empty(x.shape, dtype=x.dtype), 1.0)
    tk._remember_fast(x, plan, 128, 1.0)
    fast = tk.FAST[(x.shape, x.stride(), x.dtype, -1, 128)]
    n = len(calls)
    misaligned = _decode_query(1, offset=1)
    assert (misaligned.shape, misaligned.stride()) == (x.shape, x.stride())
    assert misaligned.data_ptr() % 16 and fast(misaligned, 1.0) is None
    device[0] = 0
    assert fast(x, 1.0) is None
    device[0] = -1

    class Runtime:
        launch_enter_hook = staticmethod(lambda *a: None)
        launch_exit_hook = None

    monkeypatch.setattr(launch_mod, "_RUNTIME", Runtime)
    assert fast(x, 1.0) is None
    assert len(calls) == n  # nothing was launched
    monkeypatch.setattr(launch_mod, "_RUNTIME", None)
    assert fast(x, 1.0) is not None and len(calls) == n + 1


@pytest.mark.usefixtures("recorded")
def test_no_fast_entry_before_the_aligned_launch_is_cached():
    """Only a cached all-aligned launch yields a closure; until then nothing is stored, so a
    later call retries (the first call of a layout may have had misaligned pointers)."""
    x = _decode_query(1, offset=1)
    plan = tk._rows_plan(x, x, x.dtype, 128, True, False, tk._row_layout(x))
    tk._launch_plan(plan, x, x, torch.empty(x.shape, dtype=x.dtype), 1.0)
    tk._remember_fast(x, plan, 128, 1.0)
    assert tk.FAST == {}


def test_hadamard_apply_uses_fast_entries_only_for_cuda_tensors(monkeypatch):
    """A FAST entry is keyed by device *index*; a tensor of another device type with the same
    index and layout must not reach the CUDA closure."""
    x = torch.randn(2, 32, 128)

    def cuda_only(*args):
        raise AssertionError("a CPU tensor reached the CUDA fast path")

    key = (x.shape, x.stride(), x.dtype, x.get_device(), 128)
    monkeypatch.setattr(op_mod, "_FAST", {key: cuda_only})
    y = op_mod.hadamard_apply(x, 128**-0.5, None, 128)
    assert torch.allclose(y, op_mod.torch_hadamard(x, 128**-0.5, None, 128))


def test_row_plan_keys_name_every_constexpr():
    """The launcher reuses the kernel compiled for a key: two plans with one key must launch
    the same specialisation (constexprs, warps and pipelining depth). ``LOADS_FIRST``
    depends on the grid, not only on the tiling (it was missing from the key: a later call
    reused the first call's value -- the same result, the other build order)."""
    seen: dict = {}
    loads_first = set()
    for rows in (1, 16, 300, 2049, 9000, 40000):
        for d in (64, 128, 256):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                x = torch.empty(rows, d, dtype=dtype)
                plan = tk._rows_plan(x, x, dtype, d, True, dtype is torch.float32, None)
                spec = (tuple(plan.meta.items()), plan.num_warps, plan.num_stages)
                assert seen.setdefault(plan.key, spec) == spec, (rows, d, dtype)
                loads_first.add((d, dtype, plan.meta["LOADS_FIRST"]))
    both = {(d, t) for d, t, v in loads_first if (d, t, not v) in loads_first}
    assert both, "no tiling had both LOADS_FIRST values: the check above proves nothing"


def _constexpr_names(kernel) -> list[str]:
    return [n for n, p in zip(kernel.arg_names, kernel.params) if p.is_constexpr]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rope", [True, False])
def test_plan_constexprs_follow_the_kernel_signature(dtype, rope):
    """The direct launch passes a plan's ``meta`` values by position (launch.py), so its keys
    must be the kernel's constexprs in signature order (review, session 10: ``ROPE_FENCE``
    was added to the fused kernel's plan before ``ALIGN``, to the signature after it). The
    RoPE fence is asked for exactly with RoPE and 16-bit tensor-core operands on CUDA (never
    under the interpreter or on ROCm: its PTX would not compile there)."""
    from hf_hadamard_kq.ops import qk_kernel as qk

    q = torch.empty(1, 4, 1, 128, dtype=dtype)
    k = torch.empty(1, 2, 1, 128, dtype=dtype)
    cos = torch.empty(1, 1, 128, dtype=dtype) if rope else None
    meta = qk._make_plan(q, k, q, k, cos, 1.0, q).meta
    assert list(meta) == _constexpr_names(qk._qk_kernel)
    fence = rope and dtype is not torch.float32 and not qk.INTERPRET
    assert meta["ROPE_FENCE"] == (fence and torch.version.hip is None)
    x = torch.empty(16, 128, dtype=dtype)
    rows = tk._rows_plan(x, x, dtype, 128, True, dtype is torch.float32, None)
    assert list(rows.meta) == _constexpr_names(tk._rows_kernel)


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("explicit", [False, True], ids=["sylvester", "matrix"])
def test_qk_fast_closure_passes_the_direct_launch_arguments(monkeypatch, rope, explicit):
    """The fused Q/K launch's closure (``qk_kernel._FAST``): the second call of a layout runs
    through it and hands the C launcher what ``CachedLauncher``'s direct launch passes for the
    same plan and tensors (but the two new outputs); misaligned inputs of the same layout,
    another current device or a launch hook launch nothing."""
    from hf_hadamard_kq.ops import qk_kernel as qk

    calls: list = []
    launcher = launch_mod.CachedLauncher(_JitFunction(calls), specialized_ints=False)
    launcher._stream = lambda device: 99
    device = [-1]
    monkeypatch.setattr(qk, "_LAUNCHER", launcher)
    monkeypatch.setattr(qk, "_FAST", {})
    monkeypatch.setattr(qk, "_PLANS", {})
    monkeypatch.setattr(qk, "_current_device", lambda: device[0])
    monkeypatch.setattr(qk, "qk_supported", lambda *a: True)  # CPU tensors stand in
    monkeypatch.setattr(qk.cpp_launch, "plain_cuda", lambda *t: True)  # (for CUDA ones)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: -1)

    def tensors(offset=0):
        def view(*shape):
            n = 1
            for v in shape:
                n *= v
            return torch.randn(n + offset).to(torch.bfloat16)[offset:].view(*shape)

        q = view(1, 3, 32, 128).transpose(1, 2)
        k = view(1, 3, 8, 128).transpose(1, 2)
        cos, sin = (view(1, 3, 128), view(1, 3, 128)) if rope else (None, None)
        return q, k, cos, sin

    matrix = torch.randn(128, 128).to(torch.bfloat16) if explicit else None
    q, k, cos, sin = tensors()
    made = []  # the C++ Launch's inputs and outputs (none is made for CPU tensors)
    monkeypatch.setattr(qk.cpp_launch, "make_launch",
                        lambda kernel, grid, ins, outs, *rest: made.append((ins, outs)))
    first = qk.try_rotate_qk(q, k, 0.125, matrix, cos, sin)  # plans, compiles (fake), caches
    assert calls[0][0] == "jit" and len(qk._FAST) == 1
    assert len(made) == 1  # in the Launch's input order: q, k, cos, sin, matrix
    assert all(a is b for a, b in zip(made[0][0], (q, k, cos, sin, matrix)))
    assert len(made[0][0]) == 5 and all(a is b for a, b in zip(made[0][1], first))
    qo, ko = qk.try_rotate_qk(q, k, 0.125, matrix, cos, sin)  # through the closure
    assert len(calls) == 2
    got = calls[1]
    plan = next(iter(qk._PLANS.values()))
    w = matrix if explicit else q
    ref_out = (torch.empty_like(q), torch.empty_like(k))
    launcher.launch(plan.grid, plan.key, -1,
                    (q, k, *ref_out, *((cos, sin) if rope else (q, q)), w),
                    plan.scalars, plan.meta, plan.num_warps, None, plan.num_stages)
    direct = calls[2]
    outs = slice(FIRST_ARG + 2, FIRST_ARG + 4)
    assert got[:outs.start] == direct[:outs.start] and got[outs.stop:] == direct[outs.stop:]
    assert got[outs] == (qo.data_ptr(), ko.data_ptr())
    assert direct[outs] == (ref_out[0].data_ptr(), ref_out[1].data_ptr())
    assert qo.stride() == q.stride() and ko.stride() == k.stride()
    # refusals: nothing launched by the closure (the normal path then launches once)
    fast = qk._FAST[next(iter(qk._FAST))]
    mq, mk, mc, ms = tensors(offset=1)
    assert fast(mq, mk, mc, ms, matrix) is None
    device[0] = 0
    assert fast(q, k, cos, sin, matrix) is None
    device[0] = -1

    class Runtime:
        launch_enter_hook = staticmethod(lambda *a: None)
        launch_exit_hook = None

    monkeypatch.setattr(launch_mod, "_RUNTIME", Runtime)
    assert fast(q, k, cos, sin, matrix) is None
    assert len(calls) == 3
