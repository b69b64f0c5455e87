"""Programmatic dependent launch (PDL) of decode-sized rotations, on a GPU (``gpu`` marker).

With PDL a rotation's programs may start while the previous kernel in the stream is still
running; they must wait for it (``griddepcontrol.wait``) before reading their input or
writing their output, or they rotate stale data -- silently. These tests make that race
likely: the previous kernel releases its dependents at once (``gdc_launch_dependents``),
then spins for about a millisecond before writing the input. A control kernel launched the
same way without the wait reads the stale input (so the set-up does start dependents early:
the checks below could fail), and every rotation path -- triton's launcher on the first call,
the C++ launch after it, a CUDA graph -- must still rotate the new data.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from hf_hadamard_kq.ops import cpp_launch, pdl  # noqa: E402
from hf_hadamard_kq.ops import op as op_mod  # noqa: E402
from hf_hadamard_kq.ops import qk_kernel as qk  # noqa: E402
from hf_hadamard_kq.ops import triton_kernel as tk  # noqa: E402
from hf_hadamard_kq.ops.matrices import sylvester  # noqa: E402

#: Spin iterations of the writer: ~1 ms on an H100, far longer than a launch.
SPINS = 400_000


@triton.jit
def _late_writer(x_ptr, src_ptr, n, spins, BLOCK: tl.constexpr):
    """Release dependents at once, spin, then copy ``src`` into ``x``."""
    tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(src_ptr + offs, mask=mask)
    t = tl.program_id(0).to(tl.float32) + 1.0
    for _ in range(spins):
        t = t * 0.999999 + 1.0
    tl.store(x_ptr + offs, tl.where(t > 0.0, v, -v), mask=mask)


@triton.jit
def _copy_without_wait(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


def _write_late(buf: torch.Tensor, src: torch.Tensor) -> None:
    n = buf.numel()
    _late_writer[(triton.cdiv(n, 1024),)](buf, src, n, SPINS, BLOCK=1024)


def _reset() -> None:
    pdl.pdl_enabled.cache_clear()
    tk.clear_plans()
    qk.clear_plans()


@pytest.fixture(autouse=True)
def _pdl_on(monkeypatch):
    """PDL asked for (``HF_HADAMARD_KQ_PDL=1``, opt-in) where this GPU and triton have it."""
    device = torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.get_device_capability(device)[0] < 9 or not pdl.triton_has_pdl():
        pytest.skip("this device or triton has no PDL (needs sm_90+, triton 3.3+)")
    monkeypatch.setenv(pdl.ENV, "1")
    _reset()
    assert pdl.pdl_enabled(device)
    yield
    monkeypatch.delenv(pdl.ENV, raising=False)
    _reset()


def _rotation_ref(x: torch.Tensor, d: int) -> torch.Tensor:
    h = sylvester(d, torch.float64, x.device) / math.sqrt(d)
    return (x.double().reshape(-1, d) @ h).reshape(x.shape).to(x.dtype)


def _check(got: torch.Tensor, settled: torch.Tensor, src: torch.Tensor, d: int, what: str):
    """``got`` (computed right behind the late writer) must be bit-identical to ``settled``
    (the same call once the writer had finished) and single-rounded against float64 (so
    ``settled`` itself is the rotation of the new data, not of the stale zeros)."""
    assert bool(src.abs().amax() > 0)
    torch.testing.assert_close(got, settled, atol=0, rtol=0, msg=lambda m: f"{what}: {m}")
    torch.testing.assert_close(settled, _rotation_ref(src, d), msg=lambda m: f"{what}: {m}")


def test_the_writer_releases_dependents_early():
    """The control: a kernel launched with PDL right behind the writer, without the wait,
    reads the input before the writer stored it (the set-up below can catch a missing
    wait)."""
    buf = torch.zeros(4096, device="cuda", dtype=torch.bfloat16)
    src = torch.randn_like(buf) + 10  # never zero
    out = torch.empty_like(buf)
    stale = 0
    for _ in range(3):
        buf.zero_()
        _write_late(buf, src)
        _copy_without_wait[(4,)](buf, out, buf.numel(), BLOCK=1024, launch_pdl=True)
        torch.cuda.synchronize()
        stale += int((out == 0).sum())
        assert torch.equal(buf, src)
    assert stale > 0, "no early start observed: this test set-up cannot detect a missing wait"


@pytest.mark.parametrize(("d", "tokens"), [(64, 1), (128, 1), (128, 16), (128, 64), (256, 1),
                                           (256, 64)])
def test_single_rotation_waits_for_the_previous_kernel(d, tokens):
    buf = torch.zeros(1, tokens, 32, d, device="cuda", dtype=torch.bfloat16)
    x = buf.transpose(1, 2)  # the projection's view, as a decode step passes it
    s = 1 / math.sqrt(d)
    op_mod.hadamard_apply(x, s, None, d)  # compiles the kernel (slower than the writer's spin)
    tk.clear_plans()  # ... but keeps it: the next call launches it through triton's launcher
    for i in range(4):  # first call: triton's launcher; then the C++ launch
        src = torch.randn_like(buf)
        buf.zero_()
        _write_late(buf, src)
        y = op_mod.hadamard_apply(x, s, None, d)
        torch.cuda.synchronize()
        _check(y, op_mod.hadamard_apply(x, s, None, d), src.transpose(1, 2), d, f"call {i}")
    plan = tk._ROW_PLANS[(x.shape, x.stride(), x.dtype, True, x.get_device(), d)]
    assert plan.pdl and plan.meta["PDL"]
    launch = tk.FAST[(x.shape, x.stride(), x.dtype, x.get_device(), d)]
    if cpp_launch.module() is not None:
        assert type(launch).__name__ == "Launch" and launch.pdl(), launch


def test_cpp_launch_sets_the_pdl_attribute():
    """The C++ launch's own ``cuLaunchKernelEx`` attribute (hand-declared structs, no CUDA
    headers) takes effect: a kernel without the wait, launched through a ``Launch(pdl=True)``
    behind the writer, reads the stale input."""
    mod = cpp_launch.module()
    if mod is None:
        pytest.skip("no C++ launcher on this machine")
    n = 4096
    buf = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    src = torch.randn_like(buf) + 10  # never zero
    kernel = _copy_without_wait[(4,)](buf, torch.empty_like(buf), n, BLOCK=1024,
                                      launch_pdl=True)
    torch.cuda.synchronize()
    assert kernel.metadata.launch_pdl
    packed = cpp_launch.slots(kernel.src.signature,
                              (cpp_launch.IN_PTR, cpp_launch.OUT_PTR, cpp_launch.VALUE,
                               cpp_launch.VALUE), (0, 0, n, 1024))
    out_layout = torch.empty(buf.shape, dtype=buf.dtype, device="meta")
    launch = mod.Launch(kernel.function, 4, kernel.metadata.num_warps, kernel.metadata.shared,
                        (buf,), (out_layout,), packed, None, cpp_launch.EXTRA_PARAMS, kernel,
                        pdl=True)
    assert launch.pdl()
    stale = 0
    for _ in range(3):
        buf.zero_()
        _write_late(buf, src)
        got = launch(buf, 1.0)
        torch.cuda.synchronize()
        assert got is not None, "the C++ launch declined the call"
        stale += int((got == 0).sum())
    assert stale > 0, "the Launch did not start early: is its PDL attribute set?"


def test_explicit_matrix_written_by_the_previous_kernel():
    """An explicit matrix is loaded by the kernel: after the wait (it may be the previous
    kernel's output, e.g. a dtype conversion right before)."""
    d = 128
    x = torch.randn(1, 32, 1, d, device="cuda", dtype=torch.bfloat16)
    mbuf = torch.zeros(d, d, device="cuda", dtype=torch.bfloat16)
    for i in range(4):
        msrc = (torch.randn(d, d, device="cuda") / math.sqrt(d)).to(torch.bfloat16)
        mbuf.zero_()
        _write_late(mbuf, msrc)
        y = op_mod.hadamard_apply(x, 1.0, mbuf, d)
        torch.cuda.synchronize()
        settled = op_mod.hadamard_apply(x, 1.0, mbuf, d)
        torch.testing.assert_close(y, settled, atol=0, rtol=0,
                                   msg=lambda m, i=i: f"call {i}: {m}")
        want = (x.double().reshape(-1, d) @ msrc.double()).reshape(x.shape)
        torch.testing.assert_close(settled.double(), want, atol=0.05, rtol=0.02)
    plan = tk._rows_plan(x, mbuf, x.dtype, d, False, False, None)
    assert plan.pdl and plan.meta["PDL"] and not plan.meta["SYLVESTER"]


@pytest.mark.parametrize("tokens", [1, 64])
def test_fused_rotation_waits_for_the_previous_kernel(tokens):
    d = 128
    qbuf = torch.zeros(1, tokens, 32, d, device="cuda", dtype=torch.bfloat16)
    kbuf = torch.zeros(1, tokens, 8, d, device="cuda", dtype=torch.bfloat16)
    q, k = qbuf.transpose(1, 2), kbuf.transpose(1, 2)
    s = 1 / math.sqrt(d)
    for i in range(4):
        qsrc, ksrc = torch.randn_like(qbuf), torch.randn_like(kbuf)
        qbuf.zero_()
        kbuf.zero_()
        _write_late(qbuf, qsrc)
        _write_late(kbuf, ksrc)  # the kernel right before the rotation: releases it early
        qo, ko = qk.rotate_qk(q, k, s, None)
        torch.cuda.synchronize()
        settled = qk.rotate_qk(q, k, s, None)
        for got, ok, src in zip((qo, ko), settled, (qsrc, ksrc)):
            _check(got, ok, src.transpose(1, 2), d, f"call {i}")
    plans = [p for p in qk._PLANS.values() if p]
    assert plans and all(p.pdl for p in plans)
    if cpp_launch.module() is not None:
        assert cpp_launch.QK_TABLE is not None
        found = cpp_launch.QK_TABLE.find(qk.QK_TAG, q, k, None, None, None)
        assert found is not None and found.pdl()


def test_fused_rotation_with_an_explicit_matrix_written_by_the_previous_kernel():
    d = 128
    q = torch.randn(1, 1, 32, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, 1, 8, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    mbuf = torch.zeros(d, d, device="cuda", dtype=torch.bfloat16)
    for i in range(4):
        msrc = (torch.randn(d, d, device="cuda") / math.sqrt(d)).to(torch.bfloat16)
        mbuf.zero_()
        _write_late(mbuf, msrc)
        qo, ko = qk.rotate_qk(q, k, 1.0, mbuf)
        torch.cuda.synchronize()
        settled = qk.rotate_qk(q, k, 1.0, mbuf)
        for got, ok, x in zip((qo, ko), settled, (q, k)):
            torch.testing.assert_close(got, ok, atol=0, rtol=0,
                                       msg=lambda m, i=i: f"call {i}: {m}")
            want = (x.double().reshape(-1, d) @ msrc.double()).reshape(x.shape)
            torch.testing.assert_close(ok.double(), want, atol=0.05, rtol=0.02)
    plans = [p for p in qk._PLANS.values() if p]
    assert plans and all(p.pdl and not p.meta["SYLVESTER"] for p in plans)


def test_rotation_in_a_cuda_graph_waits_for_the_previous_kernel():
    d = 128
    buf = torch.zeros(1, 1, 32, d, device="cuda", dtype=torch.bfloat16)
    x = buf.transpose(1, 2)
    src = torch.randn_like(buf)
    s = 1 / math.sqrt(d)
    for _ in range(2):  # plan, compiled kernel and C++ launch before the capture
        op_mod.hadamard_apply(x, s, None, d)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    control_in = torch.zeros(4096, device="cuda", dtype=torch.bfloat16)
    control_src = torch.randn_like(control_in) + 10  # never zero
    control = torch.empty_like(control_in)
    _copy_without_wait[(4,)](control_in, control, 4096, BLOCK=1024, launch_pdl=True)
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        buf.zero_()
        _write_late(buf, src)
        y = op_mod.hadamard_apply(x, s, None, d)
        # the control: the graph keeps the programmatic edge (a no-wait kernel reads early)
        control_in.zero_()
        _write_late(control_in, control_src)
        _copy_without_wait[(4,)](control_in, control, 4096, BLOCK=1024, launch_pdl=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()  # (capturing ran nothing: buf holds src only after a replay)
    torch.cuda.synchronize()
    settled = op_mod.hadamard_apply(x, s, None, d)
    stale = 0
    for i in range(3):
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        _check(y, settled, src.transpose(1, 2), d, f"replay {i}")
        stale += int((control == 0).sum())
    assert stale > 0, "no early start inside the graph: this test could not catch a race"


@pytest.mark.parametrize("value", [None, "0"])
def test_pdl_is_off_unless_asked_for(monkeypatch, value):
    """Default (unset) and ``HF_HADAMARD_KQ_PDL=0``: decode plans are made without PDL."""
    if value is None:
        monkeypatch.delenv(pdl.ENV)
    else:
        monkeypatch.setenv(pdl.ENV, value)
    _reset()
    x = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    y = op_mod.hadamard_apply(x, 128**-0.5, None, 128)
    plan = tk._ROW_PLANS[(x.shape, x.stride(), x.dtype, True, x.get_device(), 128)]
    assert not plan.pdl and not plan.meta["PDL"]
    torch.testing.assert_close(y, _rotation_ref(x, 128))
    launch = tk.FAST.get((x.shape, x.stride(), x.dtype, x.get_device(), 128))
    if type(launch).__name__ == "Launch":
        assert not launch.pdl()
