"""The torch-native rotation under torch.compile (hf_hadamard_kq/ops/native.py): forced
(``native``) and chosen by size (``auto``, the default).

Checked against compressed-tensors' Sylvester matrix and float64 matmuls (tests/reference.py),
in eager and compiled (inductor, CPU) form, inside a model's compiled decode step and compiled
generate, and with autograd. The GPU test (CUDA graphs) carries the ``gpu`` marker.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import hf_hadamard_kq
from hf_hadamard_kq.ops import native
from tests import tiny_models as tm
from tests.conftest import compile_rotation
from tests.reference import assert_single_rounding, ct_hadamard, reference_transform

GEN = dict(do_sample=False, pad_token_id=0)


@pytest.fixture
def native_mode():
    """Compile with the native form; restore the previous form (and dynamo's caches)."""
    with compile_rotation("native"):
        yield


def _counting_backend() -> tuple[list[int], object]:
    """A dynamo backend that runs each traced graph as is and records its number of
    custom-op (``hadamard_kq``) nodes in the returned list."""
    counts: list[int] = []

    def backend(gm, example_inputs):
        counts.append(sum("hadamard_kq" in str(n.target) for n in gm.graph.nodes))
        return gm.forward

    return counts, backend


@pytest.mark.parametrize("n", [1, 2, 4, 16, 64, 128, 256, 1024])
def test_sylvester_signs_equal_compressed_tensors(n):
    got = native.sylvester_signs(n, torch.device("cpu"), torch.float64)
    assert torch.equal(got, ct_hadamard(n))


CASES = [  # (last dim, block, explicit matrix size or None)
    (128, 128, None),
    (64, 16, None),  # block-diagonal
    (256, 256, None),
    (96, 96, 96),  # non-power-of-two explicit matrix
    (128, 64, 64),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("d,block,msize", CASES)
@pytest.mark.parametrize("compiled", [False, True])
def test_native_matches_float64(dtype, d, block, msize, compiled):
    gen = torch.Generator().manual_seed(d + block)
    x = (torch.randn(3, 4, 5, d, generator=gen) * 3).to(dtype)
    matrix = None
    if msize is not None:
        matrix = torch.randn(msize, msize, generator=gen, dtype=torch.float64).to(
            dtype if dtype != torch.float64 else torch.float64)
    scale = block ** -0.5
    fn = native.native_hadamard
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, dynamic=False)
    out = fn(x, scale, matrix, block)
    assert out.dtype == dtype and out.shape == x.shape
    ref = reference_transform(x, block=block, matrix=matrix, scale=scale)
    assert_single_rounding(out, ref)


def test_native_gradients_float64():
    """Autograd through the native form (x and an explicit matrix) against finite differences."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(8, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: native.native_hadamard(a, 0.5, b, 8), (x, w))
    assert torch.autograd.gradcheck(lambda a: native.native_hadamard(a, 0.25, None, 16), (x,))
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: native.native_hadamard(a, 0.5, b, 8), fullgraph=True)
    assert torch.autograd.gradcheck(compiled, (x, w))


def _graphs_of_decode_step(model):
    from tests.test_compile_offload_autograd import _decode_step_inputs

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    inputs = _decode_step_inputs(model)
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(**inputs)
    ops = [n for g in graphs for n in g.graph.nodes
           if n.op == "call_function" and "hadamard_kq" in str(n.target)]
    return graphs, ops, out, inputs


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt_neox"])
def test_native_decode_step_traces_without_the_custom_op(name, native_mode):
    """fullgraph decode step: one graph, no custom-op node (the rotation is plain torch ops),
    and the same logits as the custom-op form; with the op form, 2 op nodes/layer."""
    model = tm.rotated(name)
    graphs, ops, out_native, _ = _graphs_of_decode_step(model)
    assert len(graphs) == 1 and ops == []
    hf_hadamard_kq.set_compile_rotation("op")
    torch._dynamo.reset()
    model = tm.rotated(name)
    graphs, ops, out_op, _ = _graphs_of_decode_step(model)
    assert len(graphs) == 1 and len(ops) == 2 * tm.COMMON["num_hidden_layers"]
    assert tm.max_diff(out_native.logits, out_op.logits) < 1e-5


def test_compile_representatives_are_in_the_matrix():
    """A renamed architecture must not silently drop out of the inductor-compiled set below
    (nor out of the oldest-stack run's sweeps)."""
    assert set(tm.COMPILE_REPRESENTATIVES) <= set(tm.ARCHS)


def test_native_decode_step_caches_rotated_keys(compile_arch, native_mode):
    """Every architecture of the matrix, compiled (fullgraph) decode step with the native
    form: same logits as the plain model, and -- since logits cannot show a missing rotation
    (q and k rotated alike cancel in q.k^T) -- the static cache holds the plain model's keys
    times the float64 Hadamard matrix, including what the compiled step wrote.

    inductor compiles tiny_models.COMPILE_REPRESENTATIVES (one per attention feature that
    changes what the native rotation sits next to); the others are traced by dynamo and
    AOTAutograd (functionalization of the static-cache writes, decompositions) and run without
    inductor's code generation: the per-architecture part of the check is what dynamo traces;
    inductor's lowering of the rotation is the same code for every architecture, and inductor
    compiles cost 5-20 s each on a 2-core CI machine with a cold cache against ~2 s for the
    trace."""
    from tests.test_compile_offload_autograd import _decode_step_inputs

    name = compile_arch
    plain, ours = tm.base_model(name), tm.rotated(name)
    p_in, o_in = _decode_step_inputs(plain), _decode_step_inputs(ours)
    assert torch.equal(p_in["input_ids"], o_in["input_ids"])
    name_ = "cache" if "cache" in p_in else "past_key_values"
    before = [k.clone() for k in tm.cache_keys(o_in[name_])]
    with torch.no_grad():
        want = plain(**p_in).logits
        backend = "inductor" if name in tm.COMPILE_REPRESENTATIVES else "aot_eager"
        got = torch.compile(ours, backend=backend, fullgraph=True)(**o_in).logits
    assert tm.max_diff(got, want) < 1e-5
    for k_ours, k_before in zip(tm.cache_keys(o_in[name_]), before):
        # the compiled step wrote a key (position 7, or a sliding layer's rolling slot)
        assert not torch.equal(k_ours, k_before)
    tm.assert_keys_rotated(o_in[name_], p_in[name_])


def test_routing_under_compile(native_mode):
    """Which form hadamard_apply puts in a traced graph with native on: plain ops for blocks
    <= 256; the op for larger blocks and for fusable=False (a scheme precision cast)."""
    from hf_hadamard_kq.ops import hadamard_apply

    def op_nodes(fn, x):
        found, backend = _counting_backend()
        torch._dynamo.reset()
        torch.compile(fn, backend=backend, fullgraph=True)(x)
        return found

    x = torch.randn(2, 4, 512)
    assert op_nodes(lambda t: hadamard_apply(t, 0.125, None, 128), x) == [0]
    assert op_nodes(lambda t: hadamard_apply(t, 512 ** -0.5, None, 512), x) == [1]
    assert op_nodes(lambda t: hadamard_apply(t, 0.125, None, 128, False), x) == [1]


def test_precision_cast_keeps_its_roundings(tmp_path, native_mode):
    """A scheme with precision bf16 on an fp32 model rounds the rotation's input and result to
    bf16 (as compressed-tensors does). Inductor would fuse those roundings away in the native
    form, so that rotation keeps the op: compiled keys equal eager keys exactly, on the bf16
    grid."""
    from tests.test_transforms import ids, load_r3, r3_config, run_with_cache, write_ct_checkpoint

    tc = r3_config("random-hadamard", 16, precision="torch.bfloat16")
    path = write_ct_checkpoint(tmp_path / "m", tc, 16)
    x = ids()
    model = load_r3(path)
    want, want_keys = run_with_cache(model, x)
    model.forward = torch.compile(model.forward, fullgraph=True)
    got, got_keys = run_with_cache(model, x)
    for g, w in zip(got_keys, want_keys):
        assert torch.equal(g, w)
        assert torch.equal(g, g.to(torch.bfloat16).float())
    assert tm.max_diff(got, want) < 1e-5


@pytest.mark.parametrize("x_dtype,m_dtype", [
    (torch.bfloat16, torch.float64), (torch.float32, torch.bfloat16),
    (torch.float16, torch.float32), (torch.float32, torch.float64),
])
def test_native_mixed_matrix_dtypes(x_dtype, m_dtype):
    """The matrix is used in the compute dtype (fp32 here), as the op does: a float64 matrix
    is rounded to fp32 once, a 16-bit one is exact in fp32."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 64, generator=gen).to(x_dtype)
    m = torch.randn(32, 32, generator=gen, dtype=torch.float64).to(m_dtype)
    torch._dynamo.reset()
    fn = torch.compile(native.native_hadamard, fullgraph=True, dynamic=False)
    out = fn(x, 0.2, m, 32)
    assert out.dtype == x_dtype
    assert_single_rounding(out, reference_transform(x, block=32, matrix=m, scale=0.2))


def _kernel_calls(model) -> list[str]:
    """Kernels the inductor (CPU) code of one compiled decode step calls, in order."""
    import re

    from torch._inductor.utils import run_and_get_code

    from tests.test_compile_offload_autograd import _decode_step_inputs

    torch._dynamo.reset()
    inputs = _decode_step_inputs(model)
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(model, fullgraph=True), **inputs)
    src = "\n".join(code)
    return re.findall(
        r"(?:^\s+|= )(cpp_fused_\w+|extern_kernels\.\w+|torch\.ops\.[\w.]+)\(", src, re.M)


def test_native_adds_no_kernel(native_mode):
    """The point of the native form: inductor fuses the rotation into existing kernels, so a
    compiled decode step calls as many kernels as the plain model's (CPU, tiny 2-layer Llama,
    torch 2.13: 31), where the op form adds its 4 custom-op calls and 2 kernels (37)."""
    plain = _kernel_calls(tm.base_model("llama"))
    ours = _kernel_calls(tm.rotated("llama"))
    assert len(ours) == len(plain), (ours, plain)
    assert not any("hadamard_kq" in k for k in ours)
    hf_hadamard_kq.set_compile_rotation("op")
    with_op = _kernel_calls(tm.rotated("llama"))
    layers = tm.COMMON["num_hidden_layers"]
    assert sum("hadamard_kq" in k for k in with_op) == 2 * layers
    assert len(with_op) > len(plain)


def test_switching_form_recompiles(native_mode):
    """dynamo guards the flag: a compiled model switched to the op form retraces."""
    model = tm.rotated("llama")
    from tests.test_compile_offload_autograd import _decode_step_inputs

    counts, backend = _counting_backend()

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        compiled(**_decode_step_inputs(model))
        hf_hadamard_kq.set_compile_rotation("op")
        compiled(**_decode_step_inputs(model))
    assert counts == [0, 2 * tm.COMMON["num_hidden_layers"]]


def test_native_compiled_generate_static_cache(native_mode):
    """Inductor (CPU) compiles the model's forward with the native rotation: same tokens as
    the plain model, and the static cache holds the plain model's keys rotated (float64)."""
    from transformers import StaticCache

    from tests.test_compile_offload_autograd import (
        assert_compiled_forward_generate_matches_plain,
        assert_logits_and_rotated_keys,
    )

    plain, ours, ids, mask = assert_compiled_forward_generate_matches_plain()
    c_plain = StaticCache(config=plain.config, max_cache_len=16)
    c_ours = StaticCache(config=ours.config, max_cache_len=16)
    assert_logits_and_rotated_keys(plain, ours, ours, c_plain, c_ours, ids, mask)


def test_native_compiled_training_step_gradients(native_mode):
    """Gradients of a compiled forward + backward with the native form equal the eager
    (custom-op) model's. (Gradients, like logits, do not show whether q and k were rotated --
    that is what the key tests check -- only that the native form's backward is right.)"""
    ids, mask = tm.prompt(seq=7)
    eager, comp = tm.rotated("llama"), tm.rotated("llama")
    comp.load_state_dict(eager.state_dict())
    for model in (eager, comp):
        model.train()
    loss_e = eager(ids, attention_mask=mask, labels=ids).loss
    loss_e.backward()
    loss_c = torch.compile(comp, fullgraph=True)(ids, attention_mask=mask, labels=ids).loss
    loss_c.backward()
    assert abs(loss_c.item() - loss_e.item()) < 1e-5
    for (name, pe), pc in zip(eager.named_parameters(), comp.parameters()):
        if pe.grad is None:
            assert pc.grad is None, name
            continue
        assert tm.max_diff(pc.grad, pe.grad) <= 1e-4 * max(1.0, pe.grad.abs().max().item()), name


@pytest.mark.parametrize("value", ["native", "op", "auto"])
def test_environment_variable_values(value, monkeypatch):
    monkeypatch.setenv(native.COMPILE_ENV, value)
    assert native._mode_from_env() == value


def test_environment_variable_default_is_auto(monkeypatch):
    monkeypatch.delenv(native.COMPILE_ENV, raising=False)
    assert native._mode_from_env() == "auto"


def test_environment_variable_bogus_is_refused(monkeypatch):
    monkeypatch.setenv(native.COMPILE_ENV, "bogus")
    with pytest.raises(ValueError) as exc:
        native._mode_from_env()
    assert "HF_HADAMARD_KQ_COMPILE='bogus'" in str(exc.value) and "'native'" in str(exc.value)


def test_environment_variable_is_read_at_import():
    """A fresh interpreter takes ``MODE`` from the environment when the module is imported,
    and the import itself fails on a bad value (one child: each start imports torch, ~7 s on
    the CI machine; the child reloads the module for the second case)."""
    code = (
        "import importlib, os\n"
        "import hf_hadamard_kq.ops.native as n\n"
        "print(n.MODE)\n"
        f"os.environ[{native.COMPILE_ENV!r}] = 'bogus'\n"
        "try:\n"
        "    importlib.reload(n)\n"
        "except ValueError as exc:\n"
        "    print('refused:', exc)\n"
        "else:\n"
        "    print('accepted:', n.MODE)\n"
    )
    env = dict(os.environ, **{native.COMPILE_ENV: "native"})
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.strip().splitlines()
    assert first == "native"
    assert second.startswith("refused: HF_HADAMARD_KQ_COMPILE='bogus'"), second


@pytest.fixture
def auto_mode():
    with compile_rotation("auto"):
        yield


@pytest.mark.parametrize("shape,block,takes_op", [
    ((1, 16), 16, False),
    ((4096, 16), 16, False),  # 4096 * 16 * 16 = AUTO_MAX_WORK: still native
    ((4097, 16), 16, True),
    ((2, 8, 4, 64), 16, False),  # block-diagonal: 256 chunks of 16
    ((64, 128), 128, False),  # 64 chunks of 128 (Llama-3-8B's q at batch 2)
    ((65, 128), 128, True),
    ((1, 4, 1, 128), 128, False),
    ((16, 256), 256, False),
    ((17, 256), 256, True),
])
def test_auto_mode_traces_small_tensors_natively(shape, block, takes_op, auto_mode):
    """``auto`` picks the form by the rotation's multiply-adds, ``x.numel() * block`` (a
    trace-time constant): the native form up to AUTO_MAX_WORK, the custom op above; both give
    the float64 result."""
    from hf_hadamard_kq.ops.op import hadamard_apply

    assert native.AUTO_MAX_WORK == 64 * 128 * 128
    counts, backend = _counting_backend()

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(block)).to(torch.bfloat16)
    fn = torch.compile(lambda t: hadamard_apply(t, block ** -0.5, None, block), backend=backend,
                       fullgraph=True, dynamic=False)
    out = fn(x)
    assert counts == [int(takes_op)]
    assert_single_rounding(out, reference_transform(x, block=block, scale=block ** -0.5))


def test_auto_mode_in_a_model_decode_native_prefill_op(auto_mode, monkeypatch):
    """A tiny Llama under ``auto``, with the budget scaled to its size (8192 multiply-adds):
    the compiled decode step (q: 2 x 4 heads x 16 x block 16 = 2048) has no custom-op node, a
    compiled 40-token prefill (81920) has the op's two nodes per layer. Each gives the plain
    model's logits and -- what logits cannot show -- the plain model's keys rotated (float64)
    in the static cache, including what the compiled call wrote."""
    from transformers import StaticCache

    from tests.test_compile_offload_autograd import (
        _decode_step_inputs,
        assert_logits_and_rotated_keys,
    )

    monkeypatch.setattr(native, "AUTO_MAX_WORK", 8192)
    layers = tm.COMMON["num_hidden_layers"]
    counts, backend = _counting_backend()

    plain, ours = tm.base_model("llama"), tm.rotated("llama")
    p_in, o_in = _decode_step_inputs(plain), _decode_step_inputs(ours)
    name_ = "cache" if "cache" in p_in else "past_key_values"
    before = [k.clone() for k in tm.cache_keys(o_in[name_])]
    with torch.no_grad():
        want = plain(**p_in).logits
        got = torch.compile(ours, backend=backend, fullgraph=True)(**o_in).logits
    assert counts == [0]
    assert tm.max_diff(got, want) < 1e-5
    for k_ours, k_before in zip(tm.cache_keys(o_in[name_]), before):
        assert not torch.equal(k_ours, k_before)
    tm.assert_keys_rotated(o_in[name_], p_in[name_])

    torch._dynamo.reset()
    counts.clear()
    ids, mask = tm.prompt(seq=40)
    c_plain = StaticCache(config=plain.config, max_cache_len=48)
    c_ours = StaticCache(config=ours.config, max_cache_len=48)
    compiled = torch.compile(ours, backend=backend, fullgraph=True)
    assert_logits_and_rotated_keys(plain, ours, compiled, c_plain, c_ours, ids, mask)
    assert counts == [2 * layers]


def test_set_compile_rotation_rejects_unknown_mode():
    with pytest.raises(ValueError, match="'auto', 'op' or 'native'"):
        hf_hadamard_kq.set_compile_rotation("fast")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_native_generate_cuda_graphs(name, native_mode):
    """transformers' generate auto-compile (static cache, reduce-overhead) with the native
    form on CUDA: same tokens as the plain model, CUDA graphs not skipped, and inductor's code
    has no call of our custom op. (Tokens cannot show a missing rotation; the cached keys of
    the compiled native form are checked in test_native_decode_step_caches_rotated_keys.)"""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    from tests.test_compile_offload_autograd import cuda_graph_generate_setup

    counters.clear()
    ours, ids, kw, want = cuda_graph_generate_setup(name)
    got, code = run_and_get_code(ours.generate, ids, **kw)  # capture
    assert torch.equal(got, want)
    assert code and not any("hadamard_kq" in src for src in code)
    assert torch.equal(ours.generate(ids, **kw), want)  # replay
    assert counters["inductor"]["cudagraph_skips"] == 0
