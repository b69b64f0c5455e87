"""The C++ launch of the eager single-tensor fast path (``ops/cpp_launch``).

On CPU: the module builds with the system compiler against torch's headers; the parameter
bytes it packs are the kernel's C types (checked against ``struct``); its per-call hook check
agrees with ``launch.hooks_active``; it declines every call it cannot launch; the slots follow
the row kernel's real signature; and the build modes fail loudly where they should. On a GPU
(``gpu`` marker): the hot path uses it, and its outputs are bit-identical to triton's
launcher and single-rounded against a float64 reference.
"""

from __future__ import annotations

import math
import struct
import warnings

import pytest
import torch

from hf_hadamard_kq.ops import cpp_launch as nl
from hf_hadamard_kq.ops import launch as launch_mod


@pytest.fixture(scope="module")
def mod(tmp_path_factory):
    """The module built into a fresh cache directory (what a first use on a machine does)."""
    if nl.compiler() is None:
        pytest.skip("no C++ compiler on PATH")
    mp = pytest.MonkeyPatch()
    mp.setenv(nl.CACHE_ENV, str(tmp_path_factory.mktemp("native_cache")))
    try:
        path = nl.build()
        assert path.exists() and path.parent == nl.cache_dir()
        assert nl.build() == path  # cached: the second call compiles nothing
        yield nl._load(path)
    finally:
        mp.undo()


SLOTS = [("*bf16", nl.X_PTR, None), ("*bf16", nl.X_PTR, None), ("*bf16", nl.OUT_PTR, None),
         ("i32", nl.VALUE, -7), ("i64", nl.VALUE, -(2**40)), ("u32", nl.VALUE, 2**32 - 1),
         ("u64", nl.VALUE, 2**64 - 1), ("fp32", nl.SCALE, None), ("fp32", nl.VALUE, 0.1)]


def _launch(mod, slots=SLOTS, runtime=None, like=None, extra=nl.EXTRA_PARAMS, owner=None,
            grid=5, num_warps=4):
    like = torch.zeros(2, 3, 128, dtype=torch.bfloat16) if like is None else like
    return mod.Launch(0x1234, grid, num_warps, 0, like, slots, runtime, extra, owner)


def test_packed_parameters_are_the_kernels_c_types(mod):
    launch = _launch(mod)
    xp, op = 0x7F00_0000_1000, 0x7F00_0000_2000
    for scale in (0.125, 128**-0.5, 3.0):
        got = launch.pack(xp, op, scale)
        want = (struct.pack("<QQQ", xp, xp, op) + struct.pack("<i4x", -7)
                + struct.pack("<q", -(2**40)) + struct.pack("<I4x", 2**32 - 1)
                + struct.pack("<Q", 2**64 - 1) + struct.pack("<f4x", scale)
                + struct.pack("<f4x", 0.1) + bytes(8 * nl.EXTRA_PARAMS))
        assert got == want, scale  # one 8-byte slot per parameter, then the null scratch


@pytest.mark.parametrize("bad, error", [
    ([("i32", nl.VALUE, 2**31)], OverflowError),
    ([("i32", nl.VALUE, -(2**31) - 1)], OverflowError),
    ([("u32", nl.VALUE, 2**32)], OverflowError),
    ([("i32", nl.X_PTR, None)], ValueError),  # a pointer role needs a pointer type
    ([("i32", nl.SCALE, None)], ValueError),  # the scale is fp32
    ([("i1", nl.VALUE, 1)], ValueError),  # a type the C++ side does not pack
    ([("i32", 9, 1)], ValueError),  # unknown role
])
def test_bad_slots_are_refused(mod, bad, error):
    with pytest.raises(error):
        _launch(mod, slots=[*SLOTS, *bad])


def test_slots_need_an_input_and_an_output(mod):
    with pytest.raises(ValueError, match="no x or no output"):
        _launch(mod, slots=[s for s in SLOTS if s[1] != nl.OUT_PTR])


@pytest.mark.parametrize("kwargs", [dict(grid=-1), dict(grid=2**31), dict(num_warps=0),
                                    dict(num_warps=33), dict(extra=9)])
def test_launch_geometry_is_range_checked(mod, kwargs):
    with pytest.raises(ValueError):
        _launch(mod, **kwargs)


def test_launch_keeps_its_owner_alive(mod):
    """The Launch holds the compiled kernel that owns its CUfunction (triton unloads a
    kernel's module when the kernel object dies)."""
    import sys

    owner = object()
    refs = sys.getrefcount(owner)
    launch = _launch(mod, owner=owner)
    assert sys.getrefcount(owner) == refs + 1
    del launch
    assert sys.getrefcount(owner) == refs


class _Chain:
    """triton's hook chains: a ``calls`` list, empty when no hook is installed."""

    def __init__(self, calls):
        self.calls = calls


RUNTIMES = {
    "no hooks": type("R", (), {"launch_enter_hook": None, "launch_exit_hook": None}),
    "no attributes": type("R", (), {}),
    "enter hook": type("R", (), {"launch_enter_hook": staticmethod(print),
                                 "launch_exit_hook": None}),
    "exit hook": type("R", (), {"launch_enter_hook": None,
                                "launch_exit_hook": staticmethod(print)}),
    "empty chains": type("R", (), {"launch_enter_hook": _Chain([]),
                                   "launch_exit_hook": _Chain([])}),
    "one chained hook": type("R", (), {"launch_enter_hook": _Chain([]),
                                       "launch_exit_hook": _Chain([print])}),
}


@pytest.mark.parametrize("name", list(RUNTIMES))
def test_hook_check_agrees_with_hooks_active(mod, monkeypatch, name):
    runtime = RUNTIMES[name]
    monkeypatch.setattr(launch_mod, "_RUNTIME", runtime)
    expected = launch_mod.hooks_active()
    assert _launch(mod, runtime=runtime).hooks_active() is expected
    assert expected is (name in ("enter hook", "exit hook", "one chained hook"))


def test_calls_it_cannot_launch_are_declined(mod):
    like = torch.zeros(2, 3, 128, dtype=torch.bfloat16)
    launch = _launch(mod, like=like)
    assert launch(like, 1.0) is None  # a CPU tensor
    assert launch(like.transpose(0, 1), 1.0) is None  # another layout
    with pytest.raises(TypeError):
        launch(like)
    with pytest.raises(TypeError):
        launch([1.0], 1.0)
    with pytest.raises(TypeError):
        launch(like, "1.0")


def test_table_keys_launches_by_layout_and_block(mod):
    """The Table holds one Launch per (layout, block); a call finds it in C++ or returns None
    (nothing for that layout, or not a CUDA tensor: this CPU tensor never reaches a launch)."""
    import sys

    like = torch.zeros(2, 3, 128, dtype=torch.bfloat16)
    table = mod.Table()
    assert len(table) == 0 and table(like, 1.0, 128) is None
    first, second = _launch(mod, like=like), _launch(mod, like=like)
    refs = sys.getrefcount(first)
    table.add(128, first)
    assert len(table) == 1 and sys.getrefcount(first) == refs + 1
    table.add(128, second)  # the same key: replaced, the old one released
    assert len(table) == 1 and sys.getrefcount(first) == refs
    table.add(64, first)
    table.add(128, _launch(mod, like=like.transpose(0, 1)))
    table.add(128, _launch(mod, like=like.to(torch.float16)))
    assert len(table) == 4
    assert table(like, 1.0, 128) is None  # a CPU tensor
    with pytest.raises(TypeError):
        table(like, 1.0)
    with pytest.raises(TypeError):
        table.add(128, object())
    table.clear()
    assert len(table) == 0 and sys.getrefcount(first) == refs
    table.add(128, first)
    del table  # deallocation releases the entries
    assert sys.getrefcount(first) == refs


def test_clear_plans_empties_the_table(mod, monkeypatch):
    tk = pytest.importorskip("hf_hadamard_kq.ops.triton_kernel")
    table = mod.Table()
    table.add(128, _launch(mod))
    monkeypatch.setattr(nl, "TABLE", table)
    tk.clear_plans()
    assert len(table) == 0


def test_probe_follows_overlapping_layouts():
    """The self-check's random input takes any layout a row plan takes, an expanded (stride
    0) one included (``empty_strided(...).normal_()`` refuses those)."""
    like = torch.randn(1, 1, 128).expand(4, 32, 128)
    probe = nl.probe_like(like)
    assert probe.shape == like.shape and probe.stride() == like.stride()
    assert probe.dtype == like.dtype and torch.isfinite(probe).all()
    dense = torch.empty(1, 3, 8, 64, dtype=torch.float16).transpose(1, 2)
    probe = nl.probe_like(dense)
    assert probe.stride() == dense.stride() and probe.dtype == torch.float16
    assert probe.unique().numel() > 100  # random, not a constant fill


def test_same_bits_is_a_bit_comparison():
    a = torch.tensor([1.0, float("nan"), 0.0], dtype=torch.bfloat16)
    assert nl.same_bits(a, a.clone())  # NaN == NaN bitwise, unlike torch.equal
    assert not torch.equal(a, a.clone())
    assert not nl.same_bits(a, torch.tensor([1.0, float("nan"), -0.0], dtype=torch.bfloat16))
    assert not nl.same_bits(a, a.float())


class _Kernel:
    name = "_rows_kernel"


@pytest.mark.parametrize("mode", ["auto", "require"])
def test_self_check_verdicts(monkeypatch, mode):
    """Equal outputs pass; a declined call asks to retry; a disagreement raises in
    ``require`` mode and warns (the kernel keeps triton's launcher) in ``auto`` mode."""
    monkeypatch.setenv(nl.ENV, mode)
    like = torch.zeros(3, 64)

    def double(t, s):
        return t * 2

    def halve(t, s):
        return t / 2

    assert nl._self_check(double, double, like, 1.0, _Kernel()) is True
    assert nl._self_check(double, lambda t, s: None, like, 1.0, _Kernel()) is None
    assert nl._self_check(lambda t, s: None, double, like, 1.0, _Kernel()) is None
    if mode == "require":
        with pytest.raises(nl.CppLaunchError, match="disagrees with triton"):
            nl._self_check(double, halve, like, 1.0, _Kernel())
    else:
        with pytest.warns(RuntimeWarning, match="disagrees with triton"):
            assert nl._self_check(double, halve, like, 1.0, _Kernel()) is False


def test_slots_follow_the_row_kernel_signature():
    """cpp_launch takes the parameter list from the compiled kernel's signature; the roles
    the row kernel's fast path hands it must line up with that signature's names. The
    signature is built here the way triton 3.6 types it (pointers, fp32 scale, i32 ints, and
    ints equal to 1 specialised into constexprs), from the kernel's own parameter list."""
    tk = pytest.importorskip("hf_hadamard_kq.ops.triton_kernel")
    kernel = tk._rows_kernel
    x = torch.empty(1, 16, 32, 128, dtype=torch.bfloat16).transpose(1, 2)
    plan = tk._rows_plan(x, x, x.dtype, 128, True, False, tk._row_layout(x))
    roles, values = tk.cpp_roles(plan)
    signature = {}
    for name, param, value in zip(kernel.arg_names, kernel.params, values):
        if param.is_constexpr or (type(value) is int and value == 1):
            signature[name] = "constexpr"
        else:
            signature[name] = ("*bf16" if name.endswith("_ptr") else
                               "fp32" if name == "scale" else "i32")
    assert 1 in plan.scalars  # the decode plan has a specialised 1 (chunks_per_row)
    slots = nl.slots(signature, roles, values)
    names = [n for n, ty in signature.items() if ty != "constexpr"]
    assert len(slots) == len(names)
    by_name = dict(zip(names, slots))
    assert by_name["x_ptr"][1] == by_name["w_ptr"][1] == nl.X_PTR
    assert by_name["out_ptr"][1] == nl.OUT_PTR and by_name["scale"][1] == nl.SCALE
    ints = [n for n in names if not n.endswith("_ptr") and n != "scale"]
    assert [by_name[n][2] for n in ints] == [v for v in plan.scalars if v != 1]
    # a signature of another length is an error, not a shifted launch
    with pytest.raises(nl.CppLaunchError):
        nl.slots({**signature, "extra": "i32"}, roles, values)


def test_mode_parsing(monkeypatch):
    for value, want in (("0", "off"), ("auto", "auto"), ("1", "auto"), ("require", "require")):
        monkeypatch.setenv(nl.ENV, value)
        assert nl.mode() == want
    monkeypatch.setenv(nl.ENV, "sometimes")
    with pytest.raises(ValueError, match=nl.ENV):
        nl.mode()


@pytest.fixture
def unbuilt(monkeypatch, tmp_path):
    """cpp_launch as if nothing was built yet in this process, with an empty cache and a
    compiler that always fails."""
    monkeypatch.setattr(nl, "_module", None)
    monkeypatch.setattr(nl, "_failed", None)
    monkeypatch.setattr(nl, "TABLE", None)
    monkeypatch.setenv(nl.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", "false")


def test_failed_build_auto_warns_once(unbuilt, monkeypatch):
    monkeypatch.setenv(nl.ENV, "auto")
    with pytest.warns(RuntimeWarning, match="C\\+\\+ launcher is unavailable"):
        assert nl.module() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nl.module() is None  # remembered: no second build, no second warning


def test_failed_build_require_raises(unbuilt, monkeypatch):
    monkeypatch.setenv(nl.ENV, "require")
    with pytest.raises(nl.CppLaunchError, match="building the C\\+\\+ launcher failed"):
        nl.module()


@pytest.mark.parametrize("mode", ["auto", "require"])
def test_missing_libcuda_is_a_load_failure(unbuilt, monkeypatch, tmp_path, mode):
    """The driver lookup happens when the module is loaded: without libcuda the module is
    unavailable like a failed build (auto: one warning, then None; require: raises)."""

    class NoDriver:
        def load_driver(self):
            raise RuntimeError("cpp launch: libcuda.so.1 could not be loaded")

    monkeypatch.setenv(nl.ENV, mode)
    monkeypatch.setattr(nl, "build", lambda: tmp_path / "built.so")
    monkeypatch.setattr(nl, "_load", lambda path: NoDriver())
    if mode == "require":
        with pytest.raises(nl.CppLaunchError, match="libcuda"):
            nl.module()
    else:
        with pytest.warns(RuntimeWarning, match="libcuda"):
            assert nl.module() is None
        assert nl.module() is None and nl.TABLE is None
    assert nl._module is None


def test_off_builds_nothing(unbuilt, monkeypatch, tmp_path):
    monkeypatch.setenv(nl.ENV, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nl.module() is None
    assert list(tmp_path.iterdir()) == []


def test_cpu_tensors_never_build(unbuilt, monkeypatch):
    """make_launch declines non-CUDA tensors before building anything (a CPU-only process
    never compiles)."""
    monkeypatch.setenv(nl.ENV, "require")  # a build attempt would raise
    like = torch.zeros(4, 128)
    assert nl.make_launch(object(), 1, like, (), (), lambda x, s: None, 1.0) is None


def _fake_compiler(tmp_path, status: int):
    """A compiler that writes ``partial`` to its ``-o`` file, counts its runs, exits ``status``."""
    script = tmp_path / f"fake_cxx_{status}"
    count = tmp_path / f"runs_{status}"
    script.write_text(
        "#!/bin/sh\n"
        f"echo run >> {count}\n"
        'while [ "$#" -gt 0 ]; do\n'
        '  if [ "$1" = "-o" ]; then printf partial > "$2"; fi\n'
        "  shift\n"
        "done\n"
        f"exit {status}\n")
    script.chmod(0o755)
    return str(script), count


def test_build_publishes_whole_files_only(monkeypatch, tmp_path):
    """A failed compile leaves nothing in the cache (its partial output is removed, never
    renamed into place); a successful one is published by one rename, readable by others,
    and found by the next build without compiling again."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(nl.CACHE_ENV, str(cache))
    failing, _ = _fake_compiler(tmp_path, 1)
    monkeypatch.setenv("CXX", failing)
    with pytest.raises(nl.CppLaunchError, match="building the C\\+\\+ launcher failed"):
        nl.build()
    assert list(cache.iterdir()) == []
    working, runs = _fake_compiler(tmp_path, 0)
    monkeypatch.setenv("CXX", working)
    path = nl.build()
    assert path.read_text() == "partial" and list(cache.iterdir()) == [path]
    assert path.stat().st_mode & 0o777 == 0o755
    assert nl.build() == path and runs.read_text().count("run") == 1


def test_the_artifact_name_follows_the_source(monkeypatch, tmp_path):
    first = nl._artifact("c++")
    changed = tmp_path / "cpp_launch.cpp"
    changed.write_text(nl.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(nl, "SOURCE", changed)
    assert nl._artifact("c++") != first
    assert nl._artifact("c++") == nl._artifact("c++")
    assert nl._artifact("clang++") != nl._artifact("c++")


# --- GPU -----------------------------------------------------------------------------------

LAYOUTS = [  # (shape of the projection output, transposed to (B, H, T, d) like the model)
    ((1, 1, 32, 128), torch.bfloat16), ((1, 16, 32, 128), torch.bfloat16),
    ((1, 64, 32, 128), torch.float16), ((1, 1, 8, 64), torch.bfloat16),
    ((2, 7, 8, 256), torch.bfloat16), ((1, 1, 32, 128), torch.float32),
    ((1, 512, 32, 128), torch.bfloat16), ((1, 300, 4, 256), torch.float16),
]


S128, S64 = 128**-0.5, 64**-0.5


@pytest.fixture
def fresh_plans():
    """Plans, FAST entries and the C++ table start empty (another test may have left Python
    closures in FAST, e.g. with the C++ launch switched off)."""
    tk = pytest.importorskip("hf_hadamard_kq.ops.triton_kernel")
    tk.clear_plans()
    yield
    tk.clear_plans()


def _fast_entry(x, block):
    """The FAST entry of x's layout after the hot path has seen it; skips where this triton's
    launcher has no direct form (then no C++ launch is ever made: launch._direct)."""
    tk = pytest.importorskip("hf_hadamard_kq.ops.triton_kernel")
    key = (x.shape, x.stride(), x.dtype, x.get_device(), block)
    if key in tk.FAST and tk.FAST[key] is None:
        pytest.skip("this triton's launcher has no direct form (launch._direct)")
    return tk.FAST.get(key)


def _seen_twice(x, scale, block):
    """Run the hot path twice on x (plan, launcher cache, fast entry); the entry."""
    from hf_hadamard_kq.ops import op as op_mod

    op_mod.hadamard_apply(x, scale, None, block)
    op_mod.hadamard_apply(x, scale, None, block)
    return _fast_entry(x, block)


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_plans")
@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize("shape, dtype", LAYOUTS)
def test_gpu_cpp_launch_matches_triton(shape, dtype, contiguous):
    from hf_hadamard_kq.ops import op as op_mod
    from hf_hadamard_kq.ops import triton_kernel as tk
    from tests.reference import assert_single_rounding, reference_transform

    d = shape[-1]
    x = torch.randn(shape, device="cuda").to(dtype).transpose(1, 2)
    if contiguous:
        x = x.contiguous()
    scale = 1 / math.sqrt(d)
    fast = _seen_twice(x, scale, d)
    assert type(fast).__name__ == "Launch", f"the C++ launch is not in use: {fast!r}"
    y = op_mod.hadamard_apply(x, scale, None, d)
    assert nl.same_bits(nl.TABLE(x, scale, d), y)  # what hadamard_apply calls first
    plan = tk._ROW_PLANS[(x.shape, x.stride(), x.dtype, True, x.get_device(), d)]
    parts = tk._ROWS.direct_parts(plan.key, x.get_device(), plan.meta, plan.int_key)
    python = tk._fast_closure(plan, x.get_device(), parts)
    assert nl.same_bits(y, python(x, scale))
    assert y.is_contiguous() and y.shape == x.shape and y.dtype == dtype
    assert_single_rounding(y, reference_transform(x, scale=scale))
    for other in (0.5, -3.0, scale):  # a changed scale reaches the kernel
        assert nl.same_bits(fast(x, other), python(x, other))


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_plans")
def test_gpu_cpp_launch_expanded_input():
    """A stride-0 (expanded) layout: row-planned, self-checked through its storage."""
    from hf_hadamard_kq.ops import op as op_mod
    from tests.reference import assert_single_rounding, reference_transform

    x = torch.randn(1, 1, 128, device="cuda").to(torch.bfloat16).expand(4, 32, 128)
    fast = _seen_twice(x, S128, 128)
    assert type(fast).__name__ == "Launch", fast
    assert_single_rounding(op_mod.hadamard_apply(x, S128, None, 128), reference_transform(x))


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_plans")
def test_gpu_cpp_launch_declines_hooks_misalignment_and_other_streams_work():
    import triton

    from hf_hadamard_kq.ops import op as op_mod
    from tests.reference import assert_single_rounding, reference_transform

    x = torch.randn(1, 1, 32, 128, device="cuda").to(torch.bfloat16).transpose(1, 2)
    fast = _seen_twice(x, S128, 128)
    assert type(fast).__name__ == "Launch"
    buf = torch.randn(x.numel() + 1, device="cuda").to(torch.bfloat16)
    misaligned = buf[1:].view(1, 1, 32, 128).transpose(1, 2)
    assert (misaligned.shape, misaligned.stride()) == (x.shape, x.stride())
    assert fast(misaligned, S128) is None
    assert fast(torch.empty(x.shape, dtype=x.dtype, device="cuda"), S128) is None  # layout
    assert_single_rounding(op_mod.hadamard_apply(misaligned, S128, None, 128),
                           reference_transform(misaligned))
    seen = []
    runtime = triton.knobs.runtime
    old = runtime.launch_enter_hook
    runtime.launch_enter_hook = lambda metadata: seen.append(metadata)
    new_x = torch.randn(1, 2, 32, 128, device="cuda").to(torch.bfloat16).transpose(1, 2)
    try:
        assert fast(x, S128) is None  # the hook must see every launch: triton launches it
        y = op_mod.hadamard_apply(x, S128, None, 128)
        # a layout first seen while a hook is installed gets no entry yet (no Launch, no
        # self-check launches), and its calls are all triton's (the hook sees each)
        n = len(seen)
        y_new = op_mod.hadamard_apply(new_x, S128, None, 128)
        op_mod.hadamard_apply(new_x, S128, None, 128)
        assert _fast_entry(new_x, 128) is None and len(seen) == n + 2
    finally:
        runtime.launch_enter_hook = old
    assert seen and fast(x, S128) is not None
    assert_single_rounding(y_new, reference_transform(new_x))
    assert type(_seen_twice(new_x, S128, 128)).__name__ == "Launch"  # made once hooks are gone
    assert_single_rounding(y, reference_transform(x))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        z = fast(x, S128)
    torch.cuda.current_stream().wait_stream(side)
    assert_single_rounding(z, reference_transform(x))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["require", "auto"])
def test_gpu_cpp_self_check_on_disagreement(monkeypatch, mode):
    from hf_hadamard_kq.ops import op as op_mod
    from hf_hadamard_kq.ops import triton_kernel as tk

    x = torch.randn(1, 3, 8, 128, device="cuda").to(torch.bfloat16).transpose(1, 2)
    op_mod.hadamard_apply(x, S128, None, 128)
    plan = tk._ROW_PLANS[(x.shape, x.stride(), x.dtype, True, x.get_device(), 128)]
    kernel = tk._ROWS.compiled(plan.key, x.get_device(), plan.int_key)
    monkeypatch.setattr(nl, "_checked", {})
    monkeypatch.setattr(nl, "_rejected", {})
    monkeypatch.setenv(nl.ENV, mode)

    def wrong(t, scale):
        return torch.zeros(t.shape, dtype=t.dtype, device=t.device)

    if mode == "require":
        with pytest.raises(nl.CppLaunchError, match="disagrees with triton"):
            nl.make_launch(kernel, plan.grid, x, *tk.cpp_roles(plan), wrong, 1.0)
    else:
        with pytest.warns(RuntimeWarning, match="disagrees with triton"):
            assert nl.make_launch(kernel, plan.grid, x, *tk.cpp_roles(plan), wrong, 1.0) is None
        assert id(kernel) in nl._rejected  # this kernel keeps triton's launcher
        assert nl.make_launch(kernel, plan.grid, x, *tk.cpp_roles(plan), wrong, 1.0) is None
    assert kernel.function not in nl._checked


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_plans")
def test_gpu_cpp_launch_under_graph_capture(monkeypatch):
    """A Launch made before capture is captured (through the table); a layout first seen
    during capture gets no entry then (no self-check may sync) and its Launch afterwards."""
    from hf_hadamard_kq.ops import op as op_mod
    from hf_hadamard_kq.ops import triton_kernel as tk
    from tests.reference import assert_single_rounding, reference_transform

    x = torch.randn(1, 5, 8, 64, device="cuda").to(torch.bfloat16).transpose(1, 2)
    new_x = torch.randn(3, 7, 64, device="cuda").to(torch.bfloat16)
    _seen_twice(new_x, S64, 64)  # its kernel compiled (no compiling during capture) ...
    tk.clear_plans()  # ... but its layout not seen
    assert type(_seen_twice(x, S64, 64)).__name__ == "Launch"
    static_x = x.clone()
    hits = []
    table = nl.TABLE
    monkeypatch.setattr(nl, "TABLE", lambda t, s, b: hits.append(1) or table(t, s, b))
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            y = op_mod.hadamard_apply(static_x, S64, None, 64)
            y_new = op_mod.hadamard_apply(new_x, S64, None, 64)
    assert hits == [1, 1]
    assert _fast_entry(new_x, 64) is None  # nothing stored during capture
    monkeypatch.setattr(nl, "TABLE", table)
    fresh, fresh_new = torch.randn_like(static_x), torch.randn_like(new_x)
    static_x.copy_(fresh)
    new_x.copy_(fresh_new)
    graph.replay()
    torch.cuda.synchronize()
    assert_single_rounding(y, reference_transform(fresh))
    assert_single_rounding(y_new, reference_transform(fresh_new))
    assert type(_seen_twice(new_x, S64, 64)).__name__ == "Launch"
