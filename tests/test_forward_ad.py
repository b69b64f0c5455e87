"""Forward-mode AD through the rotation: tangents are rotated exactly as the primal is.

torch's ``register_autograd`` kernel for a custom op ignores forward-mode tangents (a dual
input that does not require grad reached the kernel below autograd: ``forward_ad`` returned no
tangent, ``torch.func.jvp`` a zero one), and the eager fast paths launched on a dual tensor's
primal. References: float64 matmuls with compressed-tensors' Sylvester matrix
(``tests/reference.py``), finite differences (``gradcheck``), and the unrotated model, whose
outputs -- hence tangents -- the rotation leaves unchanged. GPU cases carry the ``gpu`` marker.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from transformers import AutoModelForCausalLM

from hf_hadamard_kq.ops import hadamard_transform
from tests.conftest import FIXTURES
from tests.oracles import load_unrotated
from tests.reference import ct_hadamard, reference_transform

OP = torch.ops.hadamard_kq.hadamard_transform


def _explicit(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n, generator=g, dtype=torch.float64)


def _entry(kind: str):
    """``f(x, matrix, block, scale)`` through the public function or the custom op itself."""
    if kind == "api":
        return lambda x, m, b, s: hadamard_transform(x, scale=s, matrix=m, block=b)
    return lambda x, m, b, s: OP(x, s, m, b)


CASES = [  # (last dim, block, explicit matrix?, tangent on x?, tangent on the matrix?)
    (32, 32, False, True, False),
    (32, 8, False, True, False),  # block-diagonal
    (24, 12, True, True, False),  # explicit matrix, non-power-of-two
    (24, 12, True, False, True),
    (24, 12, True, True, True),
]


def _want(x, xt, m, mt, block, scale):
    """float64 ``s (xt W + x Wt)`` blockwise."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    if xt is not None:
        out += reference_transform(xt, block, m, scale)
    if mt is not None:
        out += reference_transform(x, block, mt, scale)
    return out


@pytest.mark.parametrize("kind", ["api", "op"])
@pytest.mark.parametrize("d,block,explicit,on_x,on_m", CASES)
def test_dual_tangent_matches_float64(kind, d, block, explicit, on_x, on_m):
    f = _entry(kind)
    x = torch.randn(3, 2, d, dtype=torch.float64)
    xt = torch.randn_like(x) if on_x else None
    m = _explicit(block, 1) if explicit else None
    mt = _explicit(block, 2) if on_m else None
    scale = 0.37
    with fwAD.dual_level():
        xd = fwAD.make_dual(x, xt) if on_x else x
        md = fwAD.make_dual(m, mt) if on_m else m
        primal, tangent = fwAD.unpack_dual(f(xd, md, block, scale))
    torch.testing.assert_close(primal, reference_transform(x, block, m, scale))
    assert tangent is not None, "the tangent was dropped"
    torch.testing.assert_close(tangent, _want(x, xt, m, mt, block, scale))


@pytest.mark.parametrize("kind", ["api", "op"])
def test_func_jvp_and_jacfwd(kind):
    f = _entry(kind)
    x = torch.randn(4, 16, dtype=torch.float64)
    t = torch.randn_like(x)
    out, tangent = torch.func.jvp(lambda v: f(v, None, 16, 0.25), (x,), (t,))
    torch.testing.assert_close(out, reference_transform(x, 16, None, 0.25))
    torch.testing.assert_close(tangent, reference_transform(t, 16, None, 0.25))
    # y = x H / 4 for a row: the Jacobian dy_j/dx_i = H_ij / 4 (H symmetric)
    jac = torch.func.jacfwd(lambda v: f(v, None, 16, 0.25))(x[0])
    torch.testing.assert_close(jac, ct_hadamard(16) / 4)
    # nested: g(v) = d/de f(v + e t)^2 = 2 f(v) f(t), so g's tangent along s is 2 f(s) f(t)
    s = torch.randn_like(x)
    inner = lambda v: torch.func.jvp(lambda u: f(u, None, 16, 0.25) ** 2, (v,), (t,))[1]  # noqa: E731
    first, second = torch.func.jvp(inner, (x,), (s,))
    ft, fs = reference_transform(t, 16, None, 0.25), reference_transform(s, 16, None, 0.25)
    torch.testing.assert_close(first, 2 * reference_transform(x, 16, None, 0.25) * ft)
    torch.testing.assert_close(second, 2 * fs * ft)


def test_gradcheck_forward_and_reverse_modes():
    """Finite differences against both modes, for x and for an explicit matrix."""
    x = torch.randn(3, 2, 32, dtype=torch.float64, requires_grad=True)
    m = torch.randn(16, 16, dtype=torch.float64, requires_grad=True)
    for fn, args in ((lambda t: OP(t, 0.3, None, 8), (x,)),
                     (lambda t, w: OP(t, 0.3, w, 16), (x, m)),
                     (lambda t: hadamard_transform(t), (x,))):
        assert torch.autograd.gradcheck(fn, args, check_forward_ad=True,
                                        check_backward_ad=True)


@pytest.mark.parametrize("explicit", [False, True], ids=["sylvester", "matrix"])
def test_dual_requiring_grad_gives_tangent_and_gradient(explicit):
    """Duals of tensors that require grad: the reverse-mode Function's jvp gives the tangent
    (x's and, with an explicit non-symmetric matrix, the matrix's), and backward the
    gradients, all against float64."""
    x = torch.randn(2, 32, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 32, dtype=torch.float64)
    g = torch.randn(2, 32, dtype=torch.float64)
    block = 8 if explicit else 32
    m = _explicit(8, 3).requires_grad_() if explicit else None
    mt = _explicit(8, 4) if explicit else None
    with fwAD.dual_level():
        md = fwAD.make_dual(m, mt) if explicit else None
        y = OP(fwAD.make_dual(x, t), 0.5, md, block)
        primal, tangent = fwAD.unpack_dual(y)
        m0 = None if m is None else m.detach()
        torch.testing.assert_close(tangent, _want(x.detach(), t, m0, mt, block, 0.5))
        (primal * g).sum().backward()
    w = (ct_hadamard(32) if m is None else torch.block_diag(*[m0] * 4)) * 0.5
    torch.testing.assert_close(x.grad, g @ w.T)
    if explicit:
        gm = sum(x.detach().reshape(-1, 8)[i::4].T @ g.reshape(-1, 8)[i::4] for i in range(4))
        torch.testing.assert_close(m.grad, gm * 0.5)
    if explicit:  # forward-over-reverse and reverse-over-reverse, by finite differences
        assert torch.autograd.gradgradcheck(lambda a, b: OP(a, 0.3, b, 8), (x, m),
                                            check_fwd_over_rev=True)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_jvp_inside_a_compiled_function(backend):
    """A level opened inside a compiled function: AOTAutograd opens it in C++ while tracing
    (the Python-side flag stays unset) and the tensors the op's kernel sees are functorch
    wrappers or tracer subclasses -- the tangent must still be rotated."""
    x, t = torch.randn(4, 64), torch.randn(4, 64)
    want = reference_transform(t, 16, None, 0.25)

    def f(u):
        return OP(u, 0.25, None, 16) + u

    def jvp(v, tv):
        return torch.func.jvp(f, (v,), (tv,))

    def dual(v, tv):
        with fwAD.dual_level():
            return fwAD.unpack_dual(OP(fwAD.make_dual(v, tv), 0.25, None, 16)).tangent

    torch._dynamo.reset()
    try:
        out, tangent = torch.compile(jvp, backend=backend)(x, t)
        torch.testing.assert_close(out.double(), reference_transform(x, 16, None, 0.25)
                                   + x.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tangent.double(), want + t.double(), rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        tangent = torch.compile(dual, backend=backend)(x, t)
        assert tangent is not None
        torch.testing.assert_close(tangent.double(), want, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()


def test_func_reverse_transforms_raise_a_clear_error():
    """torch.func's reverse mode cannot record an autograd.Function applied inside an op's
    kernel: the error says so and names what works (not torch's setup_context message)."""
    x = torch.randn(2, 16, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=r"hadamard_transform.*torch\.autograd\.grad"):
        torch.func.grad(lambda v: OP(v, 0.25, None, 16).square().sum())(x)
    assert torch.func.vmap(lambda v: OP(v, 0.25, None, 16))(x).shape == x.shape


def test_no_level_open_leaves_duals_alone():
    """With no dual level open the kernel below autograd runs (no tangent to compute), also
    for a tensor that carried one at a level now closed."""
    with fwAD.dual_level():
        xd = fwAD.make_dual(torch.randn(2, 16, dtype=torch.float64),
                            torch.randn(2, 16, dtype=torch.float64))
    y = OP(xd, 0.25, None, 16)
    assert fwAD._current_level < 0
    torch.testing.assert_close(y, reference_transform(xd, 16, None, 0.25))


def _model_tangents(path, device, attn: str, plain: bool, grad: bool = False):
    """Logits and their tangent along a random direction of the input embeddings (fp32;
    eager attention: torch's sdpa kernels have no forward-mode formula). ``grad``: with grad
    mode on, where q and k require grad (the weights do) and the op's reverse-mode Function
    computes the tangent; off, its kernel does (CUDA) or torch's ops do (CPU)."""
    kw = dict(dtype=torch.float32, device_map=device)
    if plain:
        model = load_unrotated(path, attn_implementation=attn, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, **kw)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (2, 12), generator=g).to(device)
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
    direction = torch.randn(emb.shape, generator=g).to(device)
    with torch.set_grad_enabled(grad), fwAD.dual_level():
        out = model(inputs_embeds=fwAD.make_dual(emb, direction), use_cache=False).logits
        primal, tangent = fwAD.unpack_dual(out)
    assert tangent is not None
    return primal.detach(), tangent.detach()


def _check_model(device, tol: float, grad: bool = False):
    """Ours and the unrotated model agree on logits and tangent within ``tol`` of the largest
    magnitude (a tangent left unrotated in any layer is off by the tangent's own size)."""
    path = FIXTURES / "llama_r3_hadamard_hd64"
    p0, t0 = _model_tangents(path, device, "eager", plain=True, grad=grad)
    p1, t1 = _model_tangents(path, device, "hadamard_kq_eager", plain=False, grad=grad)
    scale = t0.abs().max().item()
    assert scale > 1.0
    torch.testing.assert_close(p1, p0, rtol=tol, atol=tol * p0.abs().max().item())
    torch.testing.assert_close(t1, t0, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_model_tangent_matches_the_unrotated_model_cpu(grad):
    _check_model("cpu", 1e-5, grad)


@pytest.mark.parametrize("compile_form", ["op", "auto"], indirect=True)
def test_compiled_static_step_tangent(compile_form):
    """A compiled static-cache decode step (the marked route: outside a dual level it runs the
    fused ``rope_rotate_qk`` op and writes the cache with ``kv_store``, neither of which has a
    forward formula): inside a dual level the step is recompiled without them, and the
    logits' tangent is the unrotated eager model's."""
    from torch._dynamo.backends.registry import lookup_backend

    from tests.test_compile_offload_autograd import _decode_step_inputs
    from tests.test_fused import _tiny_llama
    from tests.test_traced import op_nodes

    plain, ours = _tiny_llama("hadamard")  # head_dim 32: the fused op's size
    plain.set_attn_implementation("eager")
    ours.set_attn_implementation("hadamard_kq_eager")
    aot = lookup_backend("aot_eager")
    results = {}
    for label, model in (("plain", plain), ("ours", ours)):
        inputs = _decode_step_inputs(model)
        with torch.no_grad():
            emb = model.get_input_embeddings()(inputs.pop("input_ids"))
        direction = torch.randn(emb.shape, generator=torch.Generator().manual_seed(1))
        graphs = []
        step = model
        if label == "ours":
            torch._dynamo.reset()
            step = torch.compile(
                model, backend=lambda gm, ex, g=graphs: g.append(gm) or aot(gm, ex))
            warm = _decode_step_inputs(model)
            warm.pop("input_ids")
            with torch.no_grad():  # outside a level: the fused op and kv_store
                step(inputs_embeds=emb, **warm)
            assert op_nodes(graphs, "rope_rotate_qk") == 2 and op_nodes(graphs, "kv_store") == 2
            graphs.clear()
        with torch.no_grad(), fwAD.dual_level():
            out = step(inputs_embeds=fwAD.make_dual(emb, direction), **inputs).logits
            results[label] = fwAD.unpack_dual(out)
        if label == "ours":
            torch._dynamo.reset()
            assert graphs, "the step was not recompiled inside the level"
            assert op_nodes(graphs, "rope_rotate_qk") == 0 and op_nodes(graphs, "kv_store") == 0
    (p0, t0), (p1, t1) = results["plain"], results["ours"]
    assert t0 is not None and t1 is not None
    scale = t0.abs().max().item()
    torch.testing.assert_close(p1, p0, rtol=1e-4, atol=1e-5 * p0.abs().max().item())
    torch.testing.assert_close(t1, t0, rtol=1e-4, atol=1e-5 * scale)


# ----------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_model_tangent_matches_the_unrotated_model_cuda(monkeypatch):
    """The CUDA model takes the fused layer wrapper and the C++ launches on plain calls; on
    duals both must decline (the op rotates the tangent). A first plain forward builds every
    launch for these layouts, so the dual forward meets warm tables."""
    from hf_hadamard_kq.ops import forward_mode, qk_kernel

    served = []  # (inside a dual level?, what the fused launch returned)
    original = qk_kernel.try_rotate_qk

    def spy(*args, **kwargs):
        served.append((forward_mode.level_open(), original(*args, **kwargs)))
        return served[-1][1]

    monkeypatch.setattr(qk_kernel, "try_rotate_qk", spy)
    path = FIXTURES / "llama_r3_hadamard_hd64"
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="hadamard_kq_eager", dtype=torch.float32, device_map="cuda")
    ids = torch.randint(3, 256, (2, 12), device="cuda")
    with torch.no_grad():
        model(ids, use_cache=False)
        model(ids, use_cache=False)
    assert served and all(p is not None for _, p in served)  # the fused launch served them
    served.clear()
    _check_model("cuda", 1e-3)  # fp32 kernels on tensor cores (TF32 roundings)
    inside = [p for level, p in served if level]  # (the new models' load probes: outside)
    assert inside and all(p is None for p in inside)  # and declined every dual


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_fast_paths_decline_duals(dtype):
    """The C++ table (and the Python fast path behind it) serve a layout's plain calls; while
    a dual level is open they serve none (any tensor may carry a tangent, also a view whose
    tangent is only filled in when read), and a dual of that layout gets its tangent rotated
    (single rounding against float64). Once the level is closed the table serves again."""
    from hf_hadamard_kq.ops import cpp_launch, qk_kernel, triton_kernel
    from hf_hadamard_kq.ops import op as op_mod
    from tests.reference import assert_single_rounding

    triton_kernel.clear_plans()
    s = 128**-0.5
    x = torch.randn(1, 1, 32, 128, device="cuda").to(dtype).transpose(1, 2)
    t = torch.randn(1, 1, 32, 128, device="cuda").to(dtype).transpose(1, 2)
    for _ in range(2):
        op_mod.hadamard_apply(x, s, None, 128)
    table = cpp_launch.TABLE
    if table is not None:
        assert table(x, s, 128) is not None  # the layout is served
    with fwAD.dual_level():
        if table is not None:
            assert table(x, s, 128) is None  # not even a plain tensor: the level is open
        assert not cpp_launch.plain_cuda(x)
        y = op_mod.hadamard_apply(fwAD.make_dual(x, t), s, None, 128)
        primal, tangent = fwAD.unpack_dual(y)
        assert tangent is not None, "the fast path dropped the tangent"
        assert_single_rounding(primal, reference_transform(x, 128))
        assert_single_rounding(tangent, reference_transform(t, 128))
        # a view made before its base received a tangent in place
        base = torch.zeros(1, 1, 32, 128, device="cuda", dtype=dtype)
        view = base.transpose(1, 2)
        base.copy_(fwAD.make_dual(x.transpose(1, 2), t.transpose(1, 2)))
        tangent = fwAD.unpack_dual(op_mod.hadamard_apply(view, s, None, 128)).tangent
        assert tangent is not None, "the view's lazily filled tangent was dropped"
        assert_single_rounding(tangent, reference_transform(t, 128))
        q = fwAD.make_dual(x, t)
        k = fwAD.make_dual(x[:, :8], t[:, :8])
        assert qk_kernel.try_rotate_qk(q, k, s, None) is None
        dual = fwAD.make_dual(x.clone(), t)
    if table is not None:  # closed: the tangent is gone, the table serves the tensor again
        out = table(dual, s, 128)
        assert out is not None
        assert_single_rounding(out, reference_transform(x, 128))
    triton_kernel.clear_plans()
