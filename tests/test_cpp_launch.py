"""The C++ launch of the eager fast paths (``ops/cpp_launch``): the single-tensor rotation
and the fused Q/K rotation.

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


SLOTS = [("*bf16", nl.IN_PTR, 0), ("*bf16", nl.IN_PTR, 0), ("*bf16", nl.OUT_PTR, 0),
         ("i32", nl.VALUE, -7), ("i64", nl.VALUE, -(2**40)), ("u32", nl.VALUE, 2**32 - 1),
         ("u64", nl.VALUE, 2**64 - 1), ("fp32", nl.SCALE, None), ("fp32", nl.VALUE, 0.1)]


def _launch(mod, slots=SLOTS, runtime=None, like=None, extra=nl.EXTRA_PARAMS, owner=None,
            grid=5, num_warps=4):
    like = torch.zeros(2, 3, 128, dtype=torch.bfloat16) if like is None else like
    out = torch.empty(like.shape, dtype=like.dtype, device="meta")
    return mod.Launch(0x1234, grid, num_warps, 0, (like,), (out,), slots, runtime, extra, owner)


def test_a_pdl_launch_needs_the_drivers_launch_ex(mod):
    """``pdl=True`` (a kernel compiled with ``launch_pdl``) launches through
    ``cuLaunchKernelEx``; without that driver entry point the Launch is refused, loudly (here:
    no driver loaded), and ``make_launch`` does not ask for one (``has_launch_ex``)."""
    assert _launch(mod).pdl() is False
    like = torch.zeros(2, 3, 128, dtype=torch.bfloat16)
    out = torch.empty(like.shape, dtype=like.dtype, device="meta")
    if mod.has_launch_ex():  # pragma: no cover - a machine with a CUDA driver
        assert mod.Launch(0x1234, 5, 4, 0, (like,), (out,), SLOTS, None, nl.EXTRA_PARAMS, None,
                          pdl=True).pdl() is True
    else:
        with pytest.raises(RuntimeError, match="cuLaunchKernelEx"):
            mod.Launch(0x1234, 5, 4, 0, (like,), (out,), SLOTS, None, nl.EXTRA_PARAMS, None,
                       pdl=True)


def test_packed_parameters_are_the_kernels_c_types(mod):
    launch = _launch(mod)
    xp, op = 0x7F00_0000_1000, 0x7F00_0000_2000
    for scale in (0.125, 128**-0.5, 3.0):
        got = launch.pack((xp,), (op,), scale)
        want = (struct.pack("<QQQ", xp, xp, op) + struct.pack("<i4x", -7)
                + struct.pack("<q", -(2**40)) + struct.pack("<I4x", 2**32 - 1)
                + struct.pack("<Q", 2**64 - 1) + struct.pack("<f4x", scale)
                + struct.pack("<f4x", 0.1) + bytes(8 * nl.EXTRA_PARAMS))
        assert got == want, scale  # one 8-byte slot per parameter, then the null scratch


@pytest.mark.parametrize("bad, error", [
    ([("i32", nl.VALUE, 2**31)], OverflowError),
    ([("i32", nl.VALUE, -(2**31) - 1)], OverflowError),
    ([("u32", nl.VALUE, 2**32)], OverflowError),
    ([("i32", nl.IN_PTR, 0)], ValueError),  # a pointer role needs a pointer type
    ([("*bf16", nl.IN_PTR, 1)], ValueError),  # no input 1
    ([("*bf16", nl.OUT_PTR, 1)], ValueError),  # no output 1
    ([("*bf16", nl.IN_PTR, -1)], ValueError),
    ([("i32", nl.SCALE, None)], ValueError),  # the scale is fp32
    ([("i1", nl.VALUE, 1)], ValueError),  # a type the C++ side does not pack
    ([("i32", 9, 1)], ValueError),  # unknown role
])
def test_bad_slots_are_refused(mod, bad, error):
    with pytest.raises(error):
        _launch(mod, slots=[*SLOTS, *bad])


def test_slots_need_an_input_and_an_output(mod):
    with pytest.raises(ValueError, match="no slot takes output 0"):
        _launch(mod, slots=[s for s in SLOTS if s[1] != nl.OUT_PTR])
    with pytest.raises(ValueError, match="no slot takes input 0"):
        _launch(mod, slots=[s for s in SLOTS if s[1] != nl.IN_PTR])


QK_SLOTS = [("*bf16", nl.IN_PTR, 0), ("*bf16", nl.IN_PTR, 1), ("*bf16", nl.OUT_PTR, 0),
            ("*bf16", nl.OUT_PTR, 1), ("*bf16", nl.IN_PTR, 2), ("*bf16", nl.IN_PTR, 3),
            ("*fp32", nl.IN_PTR, 4), ("i32", nl.VALUE, 5), ("fp32", nl.SCALE, None)]


def _qk_launch(mod, rope=True, matrix=True, slots=None):
    """A Launch shaped like the fused Q/K one: inputs (q, k, cos, sin, matrix), outputs
    (qo, ko); without RoPE / matrix those inputs are None and their slots take q."""
    q = torch.zeros(1, 32, 4, 128, dtype=torch.bfloat16)
    k = torch.zeros(1, 4, 8, 128, dtype=torch.bfloat16).transpose(1, 2)  # a projection's view
    cos = torch.zeros(1, 4, 128, dtype=torch.bfloat16) if rope else None
    sin = None if cos is None else cos.clone()
    w = torch.zeros(128, 128) if matrix else None
    if slots is None:
        (c, s), m = ((2, 3) if rope else (0, 0)), (4 if matrix else 0)
        slots = [*QK_SLOTS[:4], ("*bf16", nl.IN_PTR, c), ("*bf16", nl.IN_PTR, s),
                 ("*fp32", nl.IN_PTR, m), *QK_SLOTS[7:]]
    inputs = (q, k, cos, sin, w)
    return mod.Launch(0x1234, 3, 4, 0, inputs, (q, k), slots, None, nl.EXTRA_PARAMS,
                      None), inputs


def test_multi_input_launch_packs_each_pointer_in_its_slot(mod):
    launch, _ = _qk_launch(mod)
    ins, outs = (0x1000, 0x2000, 0x3000, 0x4000, 0x5000), (0x6000, 0x7000)
    got = launch.pack(ins, outs, 0.25)
    want = (struct.pack("<QQQQQQQ", 0x1000, 0x2000, 0x6000, 0x7000, 0x3000, 0x4000, 0x5000)
            + struct.pack("<i4x", 5) + struct.pack("<f4x", 0.25) + bytes(8 * nl.EXTRA_PARAMS))
    assert got == want
    with pytest.raises(ValueError, match="one pointer per input"):
        launch.pack(ins[:4], outs, 0.25)
    bare, _ = _qk_launch(mod, rope=False, matrix=False)  # cos, sin and W take q's pointer
    got = bare.pack((0x1000, 0x2000, 0, 0, 0), outs, 0.25)
    assert got[:56] == struct.pack("<QQQQQQQ", 0x1000, 0x2000, 0x6000, 0x7000, 0x1000, 0x1000,
                                   0x1000)
    with pytest.raises(ValueError, match="names input 2, which is not a tensor"):
        _qk_launch(mod, rope=False, matrix=True, slots=QK_SLOTS)  # cos's slot, cos is None


def test_multi_input_launch_declines_other_inputs(mod):
    """A call must pass tensors exactly where the Launch has them (None where it has None),
    each of its recorded layout; anything else is declined (None), never launched."""
    launch, inputs = _qk_launch(mod, matrix=False)
    q, k, cos, sin, _ = inputs
    assert launch(q, k, cos, sin, None, 1.0) is None  # CPU tensors: declined, not launched
    assert launch.matches(q, k, cos, sin, None)  # the per-input checks pass these ...
    assert not launch.matches(q, k, cos, sin, torch.zeros(128, 128))  # ... not a tensor for None
    assert not launch.matches(q, k, None, sin, None)  # ... nor None for a tensor
    assert not launch.matches(q, q, cos, sin, None)  # ... nor another layout for k
    assert not launch.matches(q, k.contiguous(), cos, sin, None)  # ... or other strides
    assert not launch.matches(k, q, cos, sin, None)
    assert not launch.matches(q, k, cos.float(), sin, None)
    assert not launch.matches(q, k, cos, sin)
    with pytest.raises(TypeError, match="takes 6 positional"):
        launch(q, k, cos, sin, 1.0)
    with pytest.raises(TypeError, match="input 2 must be"):
        launch(q, k, "cos", sin, None, 1.0)
    with pytest.raises(ValueError, match="1 to 8 entries"):
        mod.Launch(0x1234, 3, 4, 0, (q,) * 9, (q,), SLOTS, None, 0, None)
    with pytest.raises(ValueError, match="no input is a tensor"):
        mod.Launch(0x1234, 3, 4, 0, (None,), (q,), [], None, 0, None)
    with pytest.raises(TypeError, match="outputs\\[0\\] must be a torch.Tensor"):
        mod.Launch(0x1234, 3, 4, 0, (q,), (None,), SLOTS, None, 0, None)


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
    assert launch.matches(like)  # the per-input checks, whatever the device type
    assert not launch.matches(like.transpose(0, 1))
    assert not launch.matches(torch.zeros(3, 2, 128, dtype=torch.bfloat16).transpose(0, 1))
    assert not launch.matches(like.half())
    assert not launch.matches(like[:1])
    assert not launch.matches(None) and not launch.matches(like, like)
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
    # multi-input launches: None and a tensor are different keys, as is another tag
    with_rope, inputs = _qk_launch(mod, matrix=False)
    table.add(0, with_rope)
    table.add(0, _qk_launch(mod, rope=False, matrix=False)[0])
    table.add(1, with_rope)
    assert len(table) == 7
    assert table(*inputs, 1.0, 0) is None  # CPU tensors
    with pytest.raises(TypeError, match="1 to 8 inputs, got 9"):
        table(*(like,) * 9, 1.0, 0)
    table.clear()
    assert len(table) == 0 and sys.getrefcount(first) == refs
    table.add(128, first)
    del table  # deallocation releases the entries
    assert sys.getrefcount(first) == refs


def test_table_finds_recent_launches_as_its_keys_do(mod):
    """A call's Launch comes from the recently used entries when one matches (tag and every
    input's layout), else from the key; either way the one the key names: a recent entry of
    another tag or layout is never taken, and a replaced or cleared entry is forgotten."""
    like = torch.zeros(2, 3, 128, dtype=torch.bfloat16)
    other = like.transpose(0, 1)
    table = mod.Table()
    a, b, c = _launch(mod, like=like), _launch(mod, like=like), _launch(mod, like=other)
    table.add(128, a)
    table.add(64, b)
    table.add(128, c)
    assert table.recent() == ()
    for _ in range(2):  # first from the keys, then from the recent entries
        assert table.find(128, like) is a and table.find(64, like) is b
        assert table.find(128, other) is c
        assert table.find(32, like) is None and table.find(64, other) is None
        assert table.find(128, like.half()) is None and table.find(128, None) is None
        assert sorted(table.recent(), key=lambda e: id(e[1])) == sorted(
            [(128, a), (64, b), (128, c)], key=lambda e: id(e[1]))  # hits only, once each
    for n in range(6):  # more layouts than recent entries: each still finds its own
        launch = _launch(mod, like=torch.zeros(n + 3, 3, 128, dtype=torch.bfloat16))
        table.add(128, launch)
        assert table.find(128, torch.zeros(n + 3, 3, 128, dtype=torch.bfloat16)) is launch
    assert table.find(128, like) is a
    for n in range(6):  # six hits without a change between: the four latest are kept
        table.find(128, torch.zeros(n + 3, 3, 128, dtype=torch.bfloat16))
    latest = table.recent()
    assert len(latest) == 4 and {e[1].matches(torch.zeros(n + 3, 3, 128, dtype=torch.bfloat16))
                                 for e in latest for n in (0, 1)} == {False}
    d = _launch(mod, like=like)
    table.add(128, d)  # replaces a: the recent entry must not outlive it
    assert table.recent() == ()
    assert table.find(128, like) is d and table.find(64, like) is b
    table.clear()
    assert table.recent() == ()
    assert table.find(128, like) is None and table.find(64, like) is None
    with_rope, inputs = _qk_launch(mod)
    without, bare = _qk_launch(mod, rope=False, matrix=False)
    table.add(0, with_rope)
    table.add(0, without)
    for _ in range(2):
        assert table.find(0, *inputs) is with_rope and table.find(0, *bare) is without
        assert table.find(1, *inputs) is None
        assert table.find(0, *inputs[:2], None, None, inputs[4]) is None  # RoPE inputs None
    with pytest.raises(TypeError):
        table.find(0, 1.0)


def test_table_declines_what_is_not_a_tensor(mod, monkeypatch):
    """A Table declines (None) a call whose inputs are not tensors -- an FX proxy while a model
    is traced symbolically -- so that the hot-path entry records the custom op, as it did
    before it asked the table first; Launch calls and ``find`` still raise."""
    from hf_hadamard_kq.ops import op as op_mod

    table = mod.Table()
    table.add(64, _launch(mod, like=torch.zeros(2, 64, dtype=torch.bfloat16)))
    assert table(object(), 1.0, 64) is None and table("x", None, 1.0, 0) is None
    monkeypatch.setattr(nl, "TABLE", table)
    graph = torch.fx.symbolic_trace(lambda x: op_mod.hadamard_apply(x, 0.125, None, 64)).graph
    targets = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    assert any("hadamard_kq.hadamard_transform" in t for t in targets), targets
    with pytest.raises(TypeError):
        _launch(mod)(object(), 1.0)


def test_plain_cuda_refuses_cpu_and_wrapped_tensors():
    """The Python launch paths' key test: CPU tensors, lazily negated views and zero tensors
    are not plain CUDA data (on a GPU, tests below: plain CUDA tensors are)."""
    x = torch.randn(2, 8)
    assert not nl.plain_cuda(x) and not nl.plain_cuda(None, x)
    assert nl.plain_cuda() and nl.plain_cuda(None)
    assert not nl.plain_cuda(torch._neg_view(x))
    assert not nl.plain_cuda(torch._efficientzerotensor(3))


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


def test_doubles_is_exact_outside_subnormals():
    x = torch.randn(64, 128).to(torch.float16)
    assert nl.doubles((x,), (x * 2,))
    assert not nl.doubles((x,), (x,))
    assert not nl.doubles((x,), (x * 2 + torch.finfo(torch.float16).eps,))
    assert not nl.doubles((x, x), (x * 2,))
    sub = torch.tensor([2.0**-24, 3 * 2.0**-24], dtype=torch.float16)  # subnormal: slack
    assert nl.doubles((sub,), (torch.tensor([2.0**-23, 2.0**-22], dtype=torch.float16),))


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
        return t * 2 * s

    def halve(t, s):
        return t / 2 * s

    def stale_scale(t, s):  # what a Launch whose scale slot is never rewritten would give
        return t * 2

    def refused(launch, reference, inputs, match):
        """The self-check's verdict on a mismatch: raises (require) or warns and is False."""
        if mode == "require":
            with pytest.raises(nl.CppLaunchError, match=match):
                nl._self_check(launch, reference, inputs, 1.0, _Kernel())
        else:
            with pytest.warns(RuntimeWarning, match=match):
                assert nl._self_check(launch, reference, inputs, 1.0, _Kernel()) is False
        return True

    assert nl._self_check(double, double, (like,), 1.0, _Kernel()) is True
    assert nl._self_check(double, lambda t, s: None, (like,), 1.0, _Kernel()) is None
    assert nl._self_check(lambda t, s: None, double, (like,), 1.0, _Kernel()) is None
    assert refused(double, halve, (like,), "disagrees with triton")
    # bit-identical at the checked scale, but not following the call's scale
    assert refused(stale_scale, stale_scale, (like,), "does not follow the call's scale")

    # several inputs (None passed through as None) and outputs: every output must agree
    def pair(a, absent, b, s):
        assert absent is None
        return a * 2 * s, (b + 1) * s

    def pair_second_wrong(a, absent, b, s):
        return a * 2 * s, (b - 1) * s

    inputs = (like, None, torch.zeros(2, 8))
    assert nl._self_check(pair, pair, inputs, 1.0, _Kernel()) is True
    assert refused(pair, pair_second_wrong, inputs, "disagrees with triton")


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
    assert by_name["x_ptr"][1:] == by_name["w_ptr"][1:] == (nl.IN_PTR, 0)
    assert by_name["out_ptr"][1:] == (nl.OUT_PTR, 0) and by_name["scale"][1] == nl.SCALE
    ints = [n for n in names if not n.endswith("_ptr") and n != "scale"]
    assert [by_name[n][2] for n in ints] == [v for v in plan.scalars if v != 1]
    # a signature of another length is an error, not a shifted launch
    with pytest.raises(nl.CppLaunchError):
        nl.slots({**signature, "extra": "i32"}, roles, values)


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("explicit", [False, True], ids=["sylvester", "matrix"])
def test_slots_follow_the_qk_kernel_signature(rope, explicit):
    """The fused Q/K kernel's roles line up with its parameter names: q, k in, qo, ko out, cos
    and sin (q without RoPE), W (q for Sylvester), its ints in order -- not specialised
    even when equal to 1 (``do_not_specialize``) -- and the scale."""
    qk = pytest.importorskip("hf_hadamard_kq.ops.qk_kernel")
    if qk.triton is None:
        pytest.skip("triton is not importable")
    kernel = qk._qk_kernel
    q = torch.empty(1, 32, 1, 128, dtype=torch.bfloat16)
    k = torch.empty(1, 8, 1, 128, dtype=torch.bfloat16)
    cos = torch.empty(1, 1, 128, dtype=torch.bfloat16) if rope else None
    w = torch.empty(128, 128, dtype=torch.bfloat16) if explicit else q
    plan = qk._make_plan(q, k, q, k, cos, 0.125, w)
    roles, values = qk.cpp_roles(plan, rope, not explicit)
    signature = {}
    for name, param, value in zip(kernel.arg_names, kernel.params, values):
        if param.is_constexpr or (type(value) is int and value == 1 and not
                                  name.endswith("_ptr") and not param.do_not_specialize):
            signature[name] = "constexpr"
        else:
            signature[name] = ("*bf16" if name.endswith("_ptr") else
                               "fp32" if name == "scale" else "i32")
    assert 1 in plan.scalars  # e.g. S = 1 at decode: kept as an i32 parameter
    slots = nl.slots(signature, roles, values)
    names = [n for n, ty in signature.items() if ty != "constexpr"]
    by_name = dict(zip(names, slots))
    assert len(slots) == len(names)
    want = {"q_ptr": (nl.IN_PTR, 0), "k_ptr": (nl.IN_PTR, 1), "qo_ptr": (nl.OUT_PTR, 0),
            "ko_ptr": (nl.OUT_PTR, 1), "c_ptr": (nl.IN_PTR, 2 if rope else 0),
            "s_ptr": (nl.IN_PTR, 3 if rope else 0), "w_ptr": (nl.IN_PTR, 4 if explicit else 0),
            "scale": (nl.SCALE, None)}
    assert {n: by_name[n][1:] for n in want} == want
    ints = [n for n in names if n not in want]
    assert [by_name[n][2] for n in ints] == list(plan.scalars[:-1])


def test_try_rotate_qk_asks_the_table_in_launch_order(monkeypatch):
    """The table call passes (q, k, cos, sin, matrix, scale, tag): the order of the Launch's
    inputs (cos and sin, and q and k with equal head counts, have equal layouts, so a swap
    here would pass every layout check)."""
    qk = pytest.importorskip("hf_hadamard_kq.ops.qk_kernel")
    seen = []
    monkeypatch.setattr(nl, "QK_TABLE", lambda *a: seen.append(a) or ("qo", "ko"))
    q, k = torch.zeros(1, 4, 1, 64), torch.zeros(1, 4, 1, 64)
    cos, sin, w = torch.zeros(1, 1, 64), torch.zeros(1, 1, 64), torch.zeros(64, 64)
    assert qk.try_rotate_qk(q, k, 0.5, w, cos, sin) == ("qo", "ko")
    assert len(seen) == 1 and len(seen[0]) == 7
    assert all(a is b for a, b in zip(seen[0], (q, k, cos, sin, w)))
    assert seen[0][5:] == (0.5, qk.QK_TAG)


def test_qk_clear_plans_empties_the_qk_table(mod, monkeypatch):
    qk = pytest.importorskip("hf_hadamard_kq.ops.qk_kernel")
    table = mod.Table()
    table.add(0, _qk_launch(mod)[0])
    monkeypatch.setattr(nl, "QK_TABLE", table)
    qk.clear_plans()
    assert len(table) == 0


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
    monkeypatch.setattr(nl, "QK_TABLE", None)
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
        assert nl.module() is None and nl.TABLE is None and nl.QK_TABLE is None
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
    assert nl.make_launch(object(), 1, (like,), (like,), (), (), lambda x, s: None, 1.0) is None
    assert nl.make_launch(object(), 1, (None, like), (like,), (), (), lambda x, s: None,
                          1.0) is None


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


def test_cli_build_launcher_reports_the_cached_module(mod, capsys):
    """``hf-hadamard-kq build-launcher`` where the module is built (the fixture's cache): it
    says so and where, loads it, and says when this machine has no CUDA driver."""
    from hf_hadamard_kq.cli import main

    report = nl.prebuild()
    assert report["cached"] and report["path"].startswith(str(nl.cache_dir()))
    with pytest.raises(SystemExit) as exc:
        main(["build-launcher"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"C++ launcher already built: {report['path']}" in out
    assert ("no CUDA driver" in out) is (not report["driver"])


def test_cli_build_launcher_fails_loudly(unbuilt, monkeypatch, tmp_path, capsys):
    """Exit status 1 with the reason when the compiler fails, and when what it built does
    not load (here a compiler that writes a file that is no shared library)."""
    from hf_hadamard_kq.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["build-launcher"])
    assert exc.value.code == 1
    assert "building the C++ launcher failed" in capsys.readouterr().err
    fake, _ = _fake_compiler(tmp_path, 0)
    monkeypatch.setenv("CXX", fake)
    with pytest.raises(SystemExit) as exc:
        main(["build-launcher"])
    assert exc.value.code == 1
    assert "does not load" in capsys.readouterr().err


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


class _Sub(torch.Tensor):
    """A tensor subclass: its own dispatch must run, so no direct launch may serve it."""


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_plans")
def test_gpu_cpp_launch_declines_subclasses_autograd_and_dispatch_modes():
    """The C++ Launch and Table decline what the hot path's Python checks route to the custom
    op: a tensor subclass, an input autograd would record, any dispatch mode; the op path then
    gives the same rotation (and the mode sees the op)."""
    from hf_hadamard_kq.ops import op as op_mod
    from tests.oracles import OpLog
    from tests.reference import assert_single_rounding, reference_transform

    x = torch.randn(1, 1, 32, 128, device="cuda").to(torch.bfloat16).transpose(1, 2)
    fast = _seen_twice(x, S128, 128)
    assert type(fast).__name__ == "Launch" and nl.TABLE(x, S128, 128) is not None
    sub = x.as_subclass(_Sub)
    leaf = x.detach().requires_grad_()
    assert fast(sub, S128) is None and nl.TABLE(sub, S128, 128) is None
    assert fast(leaf, S128) is None and nl.TABLE(leaf, S128, 128) is None
    with torch.no_grad():  # nothing to record: served
        assert_single_rounding(fast(leaf, S128), reference_transform(x))
        assert_single_rounding(nl.TABLE(leaf, S128, 128), reference_transform(x))

    with OpLog() as mode:
        assert fast(x, S128) is None and nl.TABLE(x, S128, 128) is None
        y = op_mod.hadamard_apply(x, S128, None, 128)
    assert mode.count("hadamard_kq.hadamard_transform") == 1, mode.ops
    assert_single_rounding(y, reference_transform(x))
    y = op_mod.hadamard_apply(leaf, S128, None, 128)
    assert y.requires_grad and y.grad_fn is not None  # the op, with its autograd
    assert_single_rounding(y.detach(), reference_transform(x))
    assert fast(x, S128) is not None  # and plain calls are served again


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_plans")
def test_gpu_wrapped_and_lazy_tensors_take_the_op():
    """Tensors whose data a kernel must not read directly -- a functionalization wrapper (no
    storage: a null data pointer), a lazily negated view (its data is -x), a zero tensor (no
    storage) -- are declined by the C++ launch and the Python paths alike and take the op,
    which unwraps or materializes them: the right rotation, no illegal address."""
    from hf_hadamard_kq.ops import op as op_mod
    from hf_hadamard_kq.ops import qk_kernel as qk
    from tests.reference import assert_single_rounding, reference_transform

    x = torch.randn(1, 1, 32, 128, device="cuda").to(torch.bfloat16).transpose(1, 2)
    fast = _seen_twice(x, S128, 128)
    assert type(fast).__name__ == "Launch" and nl.plain_cuda(x)
    with torch.inference_mode():
        assert nl.plain_cuda(x.clone())
    assert nl.plain_cuda(torch.nn.Parameter(x.clone(), requires_grad=False))
    neg = torch._neg_view(x)
    assert (neg.shape, neg.stride()) == (x.shape, x.stride()) and not nl.plain_cuda(neg)
    assert fast(neg, S128) is None and nl.TABLE(neg, S128, 128) is None
    assert_single_rounding(op_mod.hadamard_apply(neg, S128, None, 128), reference_transform(-x))
    zero = torch._efficientzerotensor(x.shape, dtype=x.dtype, device="cuda")
    assert not nl.plain_cuda(zero)
    assert not op_mod.hadamard_apply(zero, S128, None, 128).any()
    seen = {}

    def body(t):
        seen["plain"] = nl.plain_cuda(t)
        seen["table"] = nl.TABLE(t, S128, 128)
        return op_mod.hadamard_apply(t, S128, None, 128)

    y = torch.func.functionalize(body)(x)
    torch.cuda.synchronize()  # an illegal address would surface here
    assert seen == {"plain": False, "table": None}
    assert_single_rounding(y, reference_transform(x))
    # the fused launch: declined by its table and by its Python path (the caller's op then)
    q = torch.randn(1, 3, 32, 128, device="cuda").to(torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, 3, 8, 128, device="cuda").to(torch.bfloat16).transpose(1, 2)
    for _ in range(3):
        assert qk.try_rotate_qk(q, k, S128, None) is not None
    assert qk.try_rotate_qk(torch._neg_view(q), k, S128, None) is None
    assert qk.try_rotate_qk(q, torch._neg_view(k), S128, None) is None
    qk.clear_plans()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["require", "auto"])
def test_gpu_cpp_self_check_on_disagreement(monkeypatch, mode):
    from hf_hadamard_kq.ops import op as op_mod
    from hf_hadamard_kq.ops import triton_kernel as tk

    x = torch.randn(1, 3, 8, 128, device="cuda").to(torch.bfloat16).transpose(1, 2)
    out = torch.empty(x.shape, dtype=x.dtype, device="meta")
    op_mod.hadamard_apply(x, S128, None, 128)
    plan = tk._ROW_PLANS[(x.shape, x.stride(), x.dtype, True, x.get_device(), 128)]
    kernel = tk._ROWS.compiled(plan.key, x.get_device(), plan.int_key)
    monkeypatch.setattr(nl, "_checked", {})
    monkeypatch.setattr(nl, "_rejected", {})
    monkeypatch.setenv(nl.ENV, mode)

    def wrong(t, scale):
        return torch.zeros(t.shape, dtype=t.dtype, device=t.device)

    def make():
        return nl.make_launch(kernel, plan.grid, (x,), (out,), *tk.cpp_roles(plan), wrong, 1.0)

    _assert_refused(make, kernel, mode)


def _assert_refused(make, kernel, mode):
    """``make()`` (a make_launch whose self-check disagrees) raises in require mode; in auto
    mode it warns and gives None, and the kernel is rejected (it keeps triton's launcher:
    later calls give None without a check); it is never marked checked."""
    if mode == "require":
        with pytest.raises(nl.CppLaunchError, match="disagrees with triton"):
            make()
    else:
        with pytest.warns(RuntimeWarning, match="disagrees with triton"):
            assert make() is None
        assert id(kernel) in nl._rejected and make() is None
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


# --- GPU: the fused Q/K launch ---------------------------------------------------------------


@pytest.fixture
def fresh_qk():
    """The fused kernel's plans, closures and C++ table start and end empty."""
    qk = pytest.importorskip("hf_hadamard_kq.ops.qk_kernel")
    qk.clear_plans()
    yield qk
    qk.clear_plans()


QK_CASES = [  # (dtype, d, batch, tokens, rope, matrix: None, "same" dtype or "fp32"; kv heads)
    (torch.bfloat16, 128, 1, 1, True, None, 8), (torch.bfloat16, 128, 1, 16, True, None, 8),
    (torch.bfloat16, 128, 2, 4, True, None, 8), (torch.float16, 64, 1, 1, True, None, 8),
    (torch.bfloat16, 256, 1, 1, True, None, 8), (torch.float32, 128, 1, 1, True, None, 8),
    (torch.bfloat16, 128, 1, 1, False, None, 8), (torch.bfloat16, 128, 1, 1, True, "same", 8),
    (torch.float16, 64, 1, 16, False, "same", 8), (torch.bfloat16, 128, 4, 1, True, "fp32", 8),
    (torch.bfloat16, 128, 1, 512, True, None, 8),
    # as many kv heads as query heads: q and k of one layout (an input-order swap would
    # pass every layout check; the values must tell them apart)
    (torch.bfloat16, 128, 1, 1, True, None, 32), (torch.bfloat16, 64, 1, 16, True, "same", 32),
]


def _qk_inputs(dtype, d, b, s, rope, matrix, hk=8, offset=0, seed=0):
    from tests.test_gpu_fused import inputs

    q, k, cos, sin = inputs(dtype, d, b, s, hk=hk, offset=offset, seed=seed)
    if not rope:
        cos = sin = None
    w = None
    if matrix is not None:
        g = torch.Generator(device="cuda").manual_seed(seed + 1)
        w = torch.linalg.qr(torch.randn(d, d, device="cuda", generator=g))[0] * d**0.5
        w = w.to(dtype if matrix == "same" else torch.float32).contiguous()
    return q, k, cos, sin, w


def _check_qk(qk_pair, q, k, cos, sin, w, scale):
    from tests.reference import rope_once
    from tests.test_gpu_fused import assert_single_rounding

    for x, out in zip((q, k), qk_pair):
        assert out.shape == x.shape and out.stride() == x.stride() and out.dtype == x.dtype
        xr = rope_once(x, cos, sin) if cos is not None else x
        assert_single_rounding(out, xr, w, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("case", QK_CASES, ids=[
    f"{str(c[0])[6:]}-d{c[1]}-b{c[2]}-t{c[3]}-{'rope' if c[4] else 'norope'}-{c[5]}-kv{c[6]}"
    for c in QK_CASES])
def test_gpu_qk_cpp_launch_matches_triton(fresh_qk, case):
    """The fused Q/K launch through ``cpp_launch.QK_TABLE``: made on the layout's first
    (all-aligned) call, used from the second on, bit-identical to the Python closure around
    triton's launcher, single-rounded against the float64 reference, outputs laid out like
    ``empty_like`` of the inputs; a changed scale reaches the kernel."""
    qk = fresh_qk
    q, k, cos, sin, w = _qk_inputs(*case)
    scale = case[1] ** -0.5
    first = qk.try_rotate_qk(q, k, scale, w, cos, sin)
    assert nl.QK_TABLE is not None and len(nl.QK_TABLE) == 1, "no C++ launch was made"
    got = nl.QK_TABLE(q, k, cos, sin, w, scale, 0)
    assert isinstance(got, tuple) and len(got) == 2
    closure = qk._FAST[qk._layout(q, k, w, cos, sin, scale)]
    want = closure(q, k, cos, sin, w)
    hot = qk.try_rotate_qk(q, k, scale, w, cos, sin)  # the table first
    for pair in (first, got, hot):
        assert all(map(nl.same_bits, pair, want))
    _check_qk(got, q, k, cos, sin, w, scale)
    table = nl.QK_TABLE
    try:
        nl.QK_TABLE = None  # the Python path for another scale: its own plan and closure
        other = qk.try_rotate_qk(q, k, 0.5, w, cos, sin)
    finally:
        nl.QK_TABLE = table
    assert all(map(nl.same_bits, table(q, k, cos, sin, w, 0.5, 0), other))
    assert len(table) == 1  # the scale is not part of the layout


@pytest.mark.gpu
def test_gpu_qk_cpp_launch_declines(fresh_qk, monkeypatch):
    """Misaligned inputs of the same layout, other inputs (None for a tensor), another
    tag and a launch hook are declined by the table and by the Launch itself; the rotation
    then takes triton's launcher and is still right (the hook sees that launch)."""
    import triton

    qk = fresh_qk
    case = (torch.bfloat16, 128, 1, 1, True, None)
    q, k, cos, sin, w = _qk_inputs(*case)
    scale = 128**-0.5
    qk.try_rotate_qk(q, k, scale, w, cos, sin)
    table = nl.QK_TABLE
    assert len(table) == 1 and table(q, k, cos, sin, w, scale, 0) is not None
    layout = qk._layout(q, k, w, cos, sin, scale)
    plan, closure = qk._PLANS[layout], qk._FAST[layout]
    launch = nl.make_launch(  # the same Launch as the table's (its kernel is checked)
        qk._LAUNCHER.compiled(plan.key, q.get_device(), None), plan.grid, (q, k, cos, sin, w),
        (torch.empty_like(q), torch.empty_like(k)), *qk.cpp_roles(plan, True, True),
        lambda *a: closure(*a[:5]), scale)
    assert type(launch).__name__ == "Launch"
    assert all(map(nl.same_bits, launch(q, k, cos, sin, w, scale), closure(q, k, cos, sin, w)))
    mq, mk, mc, ms, _ = _qk_inputs(*case, offset=1, seed=3)
    assert (mq.shape, mq.stride()) == (q.shape, q.stride()) and mq.data_ptr() % 16
    for call in (launch, lambda *a: table(*a[:5], a[5], 0)):
        assert call(mq, mk, mc, ms, w, scale) is None  # misaligned
        assert call(q, mk, cos, sin, w, scale) is None  # k misaligned
        assert call(q, k, None, None, w, scale) is None  # None for tensors
        assert call(q, k, cos, sin, torch.eye(128, device="cuda"), scale) is None
        assert call(q, q, cos, sin, w, scale) is None  # another layout for k
        assert call(q, k, cos.cpu(), sin, w, scale) is None  # another device
    assert table(mq, mk, mc, ms, w, scale, 0) is None
    _check_qk(qk.try_rotate_qk(mq, mk, scale, w, mc, ms), mq, mk, mc, ms, w, scale)
    assert table(q, k, None, None, w, scale, 0) is None
    assert table(q, k, cos, sin, w, scale, 1) is None
    seen = []
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook",
                        lambda *args: seen.append(args))
    assert table(q, k, cos, sin, w, scale, 0) is None
    assert launch(q, k, cos, sin, w, scale) is None
    pair = qk.try_rotate_qk(q, k, scale, w, cos, sin)
    monkeypatch.undo()
    assert seen, "with a launch hook installed the launch must go through triton"
    _check_qk(pair, q, k, cos, sin, w, scale)
    assert table(q, k, cos, sin, w, scale, 0) is not None


@pytest.mark.gpu
def test_gpu_qk_cpp_launch_under_graph_capture(fresh_qk, monkeypatch):
    """A fused Launch made before capture is captured through the table (and replays on new
    data); a layout first seen during capture gets no Launch then, one afterwards."""
    qk = fresh_qk
    case = (torch.bfloat16, 128, 1, 1, True, None)
    q, k, cos, sin, _ = _qk_inputs(*case)
    nq, nk, ncos, nsin, _ = _qk_inputs(torch.bfloat16, 128, 1, 2, True, None, seed=4)
    qk.try_rotate_qk(nq, nk, 128**-0.5, None, ncos, nsin)  # compiled ...
    qk.clear_plans()  # ... but not seen
    qk.try_rotate_qk(q, k, 128**-0.5, None, cos, sin)
    assert len(nl.QK_TABLE) == 1
    table, hits = nl.QK_TABLE, []
    monkeypatch.setattr(nl, "QK_TABLE", lambda *a: hits.append(1) or table(*a))
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            pair = qk.try_rotate_qk(q, k, 128**-0.5, None, cos, sin)
            new_pair = qk.try_rotate_qk(nq, nk, 128**-0.5, None, ncos, nsin)
    assert hits == [1, 1] and len(table) == 1  # nothing made during capture
    monkeypatch.setattr(nl, "QK_TABLE", table)
    for t in (q, k, nq, nk):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    _check_qk(pair, q, k, cos, sin, None, 128**-0.5)
    _check_qk(new_pair, nq, nk, ncos, nsin, None, 128**-0.5)
    qk.try_rotate_qk(nq, nk, 128**-0.5, None, ncos, nsin)
    assert len(table) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["require", "auto"])
def test_gpu_qk_cpp_self_check_on_disagreement(fresh_qk, monkeypatch, mode):
    qk = fresh_qk
    q, k, cos, sin, w = _qk_inputs(torch.bfloat16, 128, 1, 3, True, None)
    scale = 128**-0.5
    qk.try_rotate_qk(q, k, scale, w, cos, sin)
    plan = qk._PLANS[qk._layout(q, k, w, cos, sin, scale)]
    kernel = qk._LAUNCHER.compiled(plan.key, q.get_device(), None)
    monkeypatch.setattr(nl, "_checked", {})
    monkeypatch.setattr(nl, "_rejected", {})
    monkeypatch.setenv(nl.ENV, mode)
    right = qk._FAST[qk._layout(q, k, w, cos, sin, scale)]

    def key_wrong(q_, k_, c_, s_, m_, sc):  # only the key output differs
        qo, ko = right(q_, k_, c_, s_, m_)
        return qo, torch.zeros_like(ko)

    def make():
        return nl.make_launch(kernel, plan.grid, (q, k, cos, sin, w),
                              (torch.empty_like(q), torch.empty_like(k)),
                              *qk.cpp_roles(plan, True, True), key_wrong, scale)

    _assert_refused(make, kernel, mode)
