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
    # nested: the tangent of a tangent of a linear map is zero, its primal the map's tangent
    inner = lambda v: torch.func.jvp(lambda u: f(u, None, 16, 0.25), (v,), (t,))[1]  # noqa: E731
    first, second = torch.func.jvp(inner, (x,), (t,))
    torch.testing.assert_close(first, reference_transform(t, 16, None, 0.25))
    torch.testing.assert_close(second, torch.zeros_like(x))


def test_gradcheck_forward_and_reverse_modes():
    """Finite differences against both modes, for x and for an explicit matrix."""
    x = torch.randn(3, 2, 32, dtype=torch.float64, requires_grad=True)
    m = torch.randn(16, 16, dtype=torch.float64, requires_grad=True)
    for fn, args in ((lambda t: OP(t, 0.3, None, 8), (x,)),
                     (lambda t, w: OP(t, 0.3, w, 16), (x, m)),
                     (lambda t: hadamard_transform(t), (x,))):
        assert torch.autograd.gradcheck(fn, args, check_forward_ad=True,
                                        check_backward_ad=True)


def test_dual_requiring_grad_gives_tangent_and_gradient():
    """A dual of a tensor that requires grad: the reverse-mode Function's jvp gives the
    tangent, and backward the gradient, both against float64."""
    x = torch.randn(2, 32, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 32, dtype=torch.float64)
    g = torch.randn(2, 32, dtype=torch.float64)
    with fwAD.dual_level():
        y = OP(fwAD.make_dual(x, t), 0.5, None, 32)
        primal, tangent = fwAD.unpack_dual(y)
        torch.testing.assert_close(tangent, reference_transform(t, 32, None, 0.5))
        (primal * g).sum().backward()
    torch.testing.assert_close(x.grad, reference_transform(g, 32, None, 0.5))  # H symmetric


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


def _model_tangents(path, device, attn: str, plain: bool):
    """Logits and their tangent along a random direction of the input embeddings (fp32;
    eager attention: torch's sdpa kernels have no forward-mode formula)."""
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
    with torch.no_grad(), fwAD.dual_level():
        out = model(inputs_embeds=fwAD.make_dual(emb, direction), use_cache=False).logits
        primal, tangent = fwAD.unpack_dual(out)
    assert tangent is not None
    return primal, tangent


def _check_model(device, tol: float):
    """Ours and the unrotated model agree on logits and tangent within ``tol`` of the largest
    magnitude (a tangent left unrotated in any layer is off by the tangent's own size)."""
    path = FIXTURES / "llama_r3_hadamard_hd64"
    p0, t0 = _model_tangents(path, device, "eager", plain=True)
    p1, t1 = _model_tangents(path, device, "hadamard_kq_eager", plain=False)
    scale = t0.abs().max().item()
    assert scale > 1.0
    torch.testing.assert_close(p1, p0, rtol=tol, atol=tol * p0.abs().max().item())
    torch.testing.assert_close(t1, t0, rtol=tol, atol=tol * scale)


def test_model_tangent_matches_the_unrotated_model_cpu():
    _check_model("cpu", 1e-5)


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
    """The C++ table (and the Python fast path behind it) serve a layout's plain calls; a dual
    of the same layout gets its tangent rotated (single rounding against float64), inside the
    level and, without one, after it closed."""
    from hf_hadamard_kq.ops import cpp_launch, qk_kernel, triton_kernel
    from hf_hadamard_kq.ops import op as op_mod
    from tests.reference import assert_single_rounding

    triton_kernel.clear_plans()
    x = torch.randn(1, 1, 32, 128, device="cuda").to(dtype).transpose(1, 2)
    t = torch.randn(1, 1, 32, 128, device="cuda").to(dtype).transpose(1, 2)
    for _ in range(2):
        op_mod.hadamard_apply(x, 128**-0.5, None, 128)
    if cpp_launch.TABLE is not None:
        assert cpp_launch.TABLE(x, 128**-0.5, 128) is not None  # the layout is served
    with fwAD.dual_level():
        y = op_mod.hadamard_apply(fwAD.make_dual(x, t), 128**-0.5, None, 128)
        primal, tangent = fwAD.unpack_dual(y)
        assert tangent is not None, "the fast path dropped the tangent"
        assert_single_rounding(primal, reference_transform(x, 128))
        assert_single_rounding(tangent, reference_transform(t, 128))
        q = fwAD.make_dual(x, t)
        k = fwAD.make_dual(x[:, :8], t[:, :8])
        assert qk_kernel.try_rotate_qk(q, k, 128**-0.5, None) is None
        dual = fwAD.make_dual(x.clone(), t)
    if cpp_launch.TABLE is not None:  # a tensor that had a tangent: declined, still right
        assert cpp_launch.TABLE(dual, 128**-0.5, 128) is None
    assert_single_rounding(op_mod.hadamard_apply(dual, 128**-0.5, None, 128),
                           reference_transform(x, 128))
    triton_kernel.clear_plans()
