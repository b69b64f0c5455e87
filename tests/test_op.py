"""The op on CPU against compressed-tensors' float64 Hadamard matrices (tests/reference.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_hadamard_kq import hadamard_transform
from hf_hadamard_kq.ops import sylvester
from tests.reference import assert_single_rounding, ct_hadamard, reference_transform

POWERS = [1 << k for k in range(16)]  # 1 .. 32768
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _rows_for(n: int) -> int:
    return max(2, min(64, 65536 // n))


@pytest.mark.parametrize("n", POWERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_power_of_two_matches_float64_reference(n, dtype):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(_rows_for(n), n, generator=gen).to(dtype)
    out = hadamard_transform(x)
    assert out.dtype == dtype and out.shape == x.shape
    assert_single_rounding(out, reference_transform(x))


def test_kronecker_reference_agrees_with_dense_reference():
    """The >4096 reference path is itself checked against the dense CT matrix."""
    from tests import reference

    x = torch.randn(3, 4096, dtype=torch.float64)
    dense = x @ ct_hadamard(4096) / 64.0
    old = reference.DENSE_REF_MAX
    reference.DENSE_REF_MAX = 1024
    try:
        kron = reference_transform(x)
    finally:
        reference.DENSE_REF_MAX = old
    torch.testing.assert_close(kron, dense, rtol=0, atol=1e-12)


def test_our_sylvester_equals_compressed_tensors_bit_for_bit():
    for n in POWERS[:13]:
        assert torch.equal(sylvester(n, torch.float64), ct_hadamard(n))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_strided_inputs(dtype):
    views = {
        "transposed": torch.randn(64, 10).to(dtype).T,  # last dim has stride 10
        "sliced": torch.randn(5, 3, 256).to(dtype)[..., ::2],
        "permuted_heads": torch.randn(2, 7, 4, 32).to(dtype).transpose(1, 2),
        "expanded": torch.randn(1, 16).to(dtype).expand(9, 16),
    }
    for name, x in views.items():
        out = hadamard_transform(x)
        assert out.shape == x.shape, name
        assert_single_rounding(out, reference_transform(x))


def test_leading_shapes_and_zero_size():
    for shape in [(16,), (2, 3, 4, 16), (0, 16), (3, 0, 8), (0, 0, 32)]:
        x = torch.randn(shape)
        out = hadamard_transform(x)
        assert out.shape == x.shape
        assert_single_rounding(out, reference_transform(x))


def test_returns_new_tensor_and_leaves_input_alone():
    x = torch.randn(4, 8)
    before = x.clone()
    out = hadamard_transform(x)
    assert out.data_ptr() != x.data_ptr()
    assert torch.equal(x, before)
    one = torch.randn(5, 1)
    assert hadamard_transform(one).data_ptr() != one.data_ptr()


def test_hot_path_is_the_op_under_a_dispatch_mode():
    """The hot-path entry takes its direct path for plain eager calls, and the custom op (one
    node a flop counter or tracer sees) under a dispatch mode; the results are the same."""
    from hf_hadamard_kq.ops.op import hadamard_apply
    from tests.oracles import OpLog

    x = torch.randn(3, 4, 64).to(torch.bfloat16)
    with OpLog() as mode:
        got = hadamard_apply(x, 0.125, None, 64)
    assert mode.count("hadamard_kq.hadamard_transform") == 1, mode.ops
    assert_single_rounding(got, reference_transform(x, scale=0.125))
    with torch.no_grad():
        assert torch.equal(hadamard_apply(x, 0.125, None, 64), got)  # direct: the same


def test_block_diagonal_and_explicit_matrix_and_scale():
    x = torch.randn(3, 4, 64, dtype=torch.float64)
    out = hadamard_transform(x, block=16)
    expected = torch.block_diag(*[ct_hadamard(16)] * 4) / 4.0
    torch.testing.assert_close(out, x @ expected, rtol=0, atol=1e-12)
    m = torch.randn(80, 80, dtype=torch.float64)
    y = torch.randn(2, 160, dtype=torch.float64)
    out = hadamard_transform(y, matrix=m, scale=0.5)
    torch.testing.assert_close(out, reference_transform(y, matrix=m, scale=0.5), rtol=0, atol=1e-12)
    out = hadamard_transform(x, scale=1.0)
    torch.testing.assert_close(out, x @ ct_hadamard(64), rtol=0, atol=1e-11)


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(0, 10),
    rows=st.integers(0, 5),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_orthonormal_properties(k, rows, dtype, seed):
    n = 1 << k
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    y = hadamard_transform(x)
    # applying twice gives the identity (H/sqrt(n) is symmetric and orthogonal)
    torch.testing.assert_close(hadamard_transform(y), x, rtol=tol, atol=tol)
    # norms are preserved
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "args",
    [
        (torch.randn(3, 16), 0.25, None, 16),
        (torch.randn(2, 3, 64, dtype=torch.bfloat16), 0.125, None, 64),
        (torch.randn(2, 64), 0.25, None, 16),
        (torch.randn(4, 1024), 1 / 32, None, 1024),
        (torch.randn(2, 5, 96, requires_grad=True), 0.1, torch.randn(96, 96), 96),
        (torch.randn(2, 32, dtype=torch.float64), 0.2, torch.randn(16, 16, dtype=torch.float64,
                                                                    requires_grad=True), 16),
    ],
)
def test_opcheck(args):
    torch.library.opcheck(torch.ops.hadamard_kq.hadamard_transform.default, args)


def test_gradcheck_fp64():
    x = torch.randn(3, 2, 32, dtype=torch.float64, requires_grad=True)
    m = torch.randn(16, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: hadamard_transform(t), (x,))
    assert torch.autograd.gradcheck(lambda t, w: hadamard_transform(t, matrix=w), (x, m))
    assert torch.autograd.gradgradcheck(lambda t: hadamard_transform(t, block=8), (x,))


@pytest.fixture
def no_vmap_fallback():
    """torch's per-example vmap fallback raises instead of looping: a vmap that works used
    the op's own rule."""
    before = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    yield
    torch._C._functorch._set_vmap_fallback_enabled(before)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_vmap_rule(dim, device, no_vmap_fallback):
    dtype = torch.float64 if device == "cpu" else torch.float32  # fp32: the CUDA kernel's
    x = torch.randn(5, 3, 32, dtype=dtype, device=device)
    m = torch.randn(5, 8, 8, dtype=dtype, device=device)
    op = torch.ops.hadamard_kq.hadamard_transform
    tol = {} if device == "cpu" else dict(rtol=1e-5, atol=1e-5)
    got = torch.vmap(lambda v: op(v, 0.25, None, 16), in_dims=dim)(x.movedim(0, dim))
    torch.testing.assert_close(got.double(), reference_transform(x, 16, None, 0.25), **tol)
    want = torch.stack([reference_transform(x[i], 8, m[i], 0.5) for i in range(5)])
    got = torch.vmap(lambda v, w: op(v, 0.5, w, 8), in_dims=(dim, 0))(x.movedim(0, dim), m)
    torch.testing.assert_close(got.double(), want, **tol)
    empty = torch.vmap(lambda v, w: op(v, 0.5, w, 8))(x[:0], m[:0])  # no matrices at all
    assert empty.shape == (0, 3, 32)
    got = torch.vmap(lambda w: op(x[0], 0.5, w, 8))(m)  # matrices only
    want = torch.stack([reference_transform(x[0], 8, w, 0.5) for w in m])
    torch.testing.assert_close(got.double(), want, **tol)
    jac = torch.func.jacfwd(lambda v: op(v, 0.25, None, 16))(x[0, 0])  # vmap of the jvp
    want = torch.block_diag(*[ct_hadamard(16, device) / 4] * 2)
    torch.testing.assert_close(jac.double(), want, **tol)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_backward_through_the_op(backend):
    """torch.compile traces the op's own autograd kernel (ops/op.py) into its joint graph:
    forward and gradients for x and an explicit matrix equal float64 matmuls'."""
    torch._dynamo.reset()
    x = torch.randn(3, 2, 32, requires_grad=True)
    m = torch.randn(16, 16, requires_grad=True)
    g = torch.randn(3, 2, 32)

    def f(t, w):
        return torch.ops.hadamard_kq.hadamard_transform(t, 0.3, w, 16)

    out = torch.compile(f, backend=backend, fullgraph=True)(x, m)
    out.backward(g)
    torch._dynamo.reset()
    xb, gb, m64 = x.detach().double().reshape(-1, 16), g.double().reshape(-1, 16), m.double()
    tol = dict(rtol=1e-5, atol=1e-5)  # fp32 accumulation against float64
    torch.testing.assert_close(out.double(), (xb @ m64 * 0.3).reshape(3, 2, 32), **tol)
    torch.testing.assert_close(x.grad.double(), (gb @ m64.T * 0.3).reshape(3, 2, 32), **tol)
    torch.testing.assert_close(m.grad.double(), xb.T @ gb * 0.3, **tol)


@pytest.mark.parametrize("compile_form", ["op", "auto"], indirect=True)
def test_torch_compile_fullgraph_cpu(compile_form):
    """Under inductor in both forms these small tensors can take (``auto`` traces them as
    plain torch ops, ``op`` as the custom op): q.k^T unchanged, no graph break."""
    def f(q, k):
        return hadamard_transform(q) @ hadamard_transform(k).transpose(-1, -2)

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    q, k = torch.randn(2, 4, 5, 64), torch.randn(2, 4, 7, 64)
    torch.testing.assert_close(compiled(q, k), q @ k.transpose(-1, -2), rtol=1e-4, atol=1e-4)
    explain = torch._dynamo.explain(f)(q, k)
    assert explain.graph_break_count == 0
    ops = [n for g in explain.graphs for n in g.graph.nodes if "hadamard_kq" in str(n.target)]
    assert len(ops) == (2 if compile_form == "op" else 0)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(x=torch.randn(3, 12)), ValueError, "power-of-two"),
        (dict(x=torch.randn(1, 65536)), ValueError, "exceeds the supported maximum"),
        (dict(x=torch.randint(0, 5, (2, 8))), TypeError, "float16, bfloat16"),
        (dict(x=torch.randn(2, 8) > 0), TypeError, "float16, bfloat16"),
        (dict(x=torch.randn(3, 0)), ValueError, "empty"),
        (dict(x=torch.tensor(1.0)), ValueError, "at least one dimension"),
        (dict(x=torch.randn(2, 24), block=16), ValueError, "not a multiple"),
        (dict(x=torch.randn(2, 16), matrix=torch.randn(8, 4)), ValueError, "square"),
        (dict(x=torch.randn(2, 16), matrix=torch.randn(8, 8), block=4), ValueError, "match"),
        (dict(x=torch.randn(2, 16), scale=math.inf), ValueError, "finite"),
        (dict(x=[1.0, 2.0]), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_errors(kwargs, exc, match):
    x = kwargs.pop("x")
    with pytest.raises(exc, match=match):
        hadamard_transform(x, **kwargs)
