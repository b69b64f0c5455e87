"""GPU tests of the fast paths added for decode (marker ``gpu``): the one-launch fused Q/K
kernel with RoPE (ops/qk_kernel.py), the cached direct launcher (ops/launch.py) and the
fused path in a model (fused.py). References: torch's RoPE in the model dtype, then a
float64 matmul with compressed-tensors' Sylvester matrix.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from hf_hadamard_kq import fused as fused_mod
from hf_hadamard_kq.ops import qk_kernel, triton_kernel
from tests.conftest import FIXTURES
from tests.oracles import load_unrotated, with_cache
from tests.reference import ct_hadamard
from tests.reference import rope_once as torch_rope

pytestmark = pytest.mark.gpu
DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def rotate_ref(x, matrix, scale):
    d = x.shape[-1]
    w = ct_hadamard(d, x.device) if matrix is None else matrix.double()
    return (x.double() @ w) * scale


def assert_single_rounding(out, x_in, matrix, scale):
    """max|out - ref64| <= 2 * max|round(fp32 product) - ref64| + tiny (one rounding)."""
    ref = rotate_ref(x_in, matrix, scale)
    d = x_in.shape[-1]
    w32 = (ct_hadamard(d, x_in.device) if matrix is None else matrix.double()).float()
    floor = ((x_in.float() @ w32) * scale).to(x_in.dtype).double()
    bound = 2 * (floor - ref).abs().max().item()
    if x_in.dtype == torch.float32:
        bound += torch.finfo(torch.float32).eps * ref.abs().max().item()
    else:
        bound += torch.finfo(x_in.dtype).tiny
    err = (out.double() - ref).abs().max().item()
    assert err <= bound, (x_in.dtype, tuple(x_in.shape), err, bound)


def inputs(dtype, d, b, s, hq=32, hk=8, offset=0, seed=0):
    """Q/K as the projections' transposed views; ``offset`` shifts every tensor by that many
    elements inside a larger buffer (misaligned pointers for the launcher's key)."""
    g = torch.Generator(device=DEV).manual_seed(seed)

    def view(*shape):
        n = 1
        for v in shape:
            n *= v
        buf = torch.randn(n + offset, generator=g, device=DEV).to(dtype)
        return buf[offset:].view(*shape)

    q = view(b, s, hq, d).transpose(1, 2)
    k = view(b, s, hk, d).transpose(1, 2)
    angle = torch.rand(b, s, d // 2, generator=g, device=DEV) * 100
    cos = torch.cat([angle.cos()] * 2, -1).to(dtype)
    sin = torch.cat([angle.sin()] * 2, -1).to(dtype)
    return q, k, cos, sin


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotate_qk_decode_and_prefill(dtype, d):
    for b, s in ((1, 1), (4, 1), (64, 1), (1, 16), (2, 512)):
        q, k, cos, sin = inputs(dtype, d, b, s, seed=b * s)
        assert qk_kernel.qk_supported(q, k, None, cos, sin)
        first = qk_kernel.rotate_qk(q, k, d**-0.5, None, cos, sin)
        again = qk_kernel.rotate_qk(q, k, d**-0.5, None, cos, sin)  # cached direct launch
        for x, out, out2 in ((q, *[p[0] for p in (first, again)]),
                             (k, *[p[1] for p in (first, again)])):
            assert torch.equal(out, out2)
            assert_single_rounding(out, torch_rope(x, cos, sin), None, d**-0.5)
        qo, ko = qk_kernel.rotate_qk(q, k, d**-0.5, None)  # no RoPE
        assert_single_rounding(qo, q, None, d**-0.5)
        assert_single_rounding(ko, k, None, d**-0.5)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotate_qk_rope_bit_exact_and_explicit(dtype, d):
    q, k, cos, sin = inputs(dtype, d, 2, 33)
    eye = torch.eye(d, device=DEV, dtype=dtype)
    qo, ko = qk_kernel.rotate_qk(q, k, 1.0, eye, cos, sin)
    assert torch.equal(qo, torch_rope(q, cos, sin)) and torch.equal(ko, torch_rope(k, cos, sin))
    g = torch.Generator(device=DEV).manual_seed(d)
    perm = torch.randperm(d, generator=g, device=DEV)
    signs = torch.randint(0, 2, (d, 1), generator=g, device=DEV) * 2 - 1
    w = (ct_hadamard(d, DEV)[perm] * signs).to(dtype)  # random-hadamard-like, exact in 16 bit
    qo, ko = qk_kernel.rotate_qk(q, k, d**-0.5, w, cos, sin)
    assert_single_rounding(qo, torch_rope(q, cos, sin), w, d**-0.5)
    assert_single_rounding(ko, torch_rope(k, cos, sin), w, d**-0.5)


def test_cached_launcher_respects_alignment():
    """A kernel compiled for 16-byte aligned pointers must not be reused for misaligned ones
    (and vice versa): run both orders, compare against the reference."""
    for offsets in ((0, 1, 0, 3), (5, 0, 2, 0)):
        for offset in offsets:
            q, k, cos, sin = inputs(torch.bfloat16, 128, 1, 3, offset=offset, seed=offset)
            qo, ko = qk_kernel.rotate_qk(q, k, 128**-0.5, None, cos, sin)
            assert_single_rounding(qo, torch_rope(q, cos, sin), None, 128**-0.5)
            assert_single_rounding(ko, torch_rope(k, cos, sin), None, 128**-0.5)
            x = torch.randn(4 * 32 * 128 + offset, device=DEV).bfloat16()[offset:].view(4, 32, 128)
            y = triton_kernel.hadamard_triton(x, 128**-0.5, None, 128)
            assert_single_rounding(y, x, None, 128**-0.5)


def test_rows_launcher_int_specialisation():
    """Row counts / strides equal to 1 or multiples of 16 change triton's specialisation; the
    cached launcher must key on them (mixed sizes after each other, compared each time)."""
    for rows in (1, 16, 17, 32, 1, 33, 16):
        x = torch.randn(rows, 3, 128, device=DEV).bfloat16().transpose(0, 1)  # strided rows
        y = triton_kernel.hadamard_triton(x, 128**-0.5, None, 128)
        assert_single_rounding(y, x, None, 128**-0.5)


@pytest.mark.parametrize("launcher", ["cpp", "python"])
def test_eager_fast_path(monkeypatch, launcher):
    """``hadamard_apply``'s per-layout fast path -- the C++ launch table
    (``cpp_launch.TABLE``, built on this machine) or, with it off, the Python closure
    (``triton_kernel.FAST``): repeated calls of a layout run through it and match the float64
    reference; a misaligned tensor of the same layout, and a call with a triton launch hook
    installed, fall back to the normal path (the hook sees the launch) and are still right."""
    import triton

    from hf_hadamard_kq.ops import cpp_launch
    from hf_hadamard_kq.ops import op as op_mod
    from tests.reference import assert_single_rounding as assert_near
    from tests.reference import reference_transform

    if launcher == "python":
        monkeypatch.setenv(cpp_launch.ENV, "0")
        monkeypatch.setattr(cpp_launch, "TABLE", None)
    triton_kernel.clear_plans()
    op_mod._load_triton()
    assert op_mod._FAST is triton_kernel.FAST
    cases = [(torch.randn(1, t, 32, 128, device=DEV).bfloat16().transpose(1, 2), 128)
             for t in (1, 16, 64)]
    cases += [(torch.randn(3, 8, 64, device=DEV).half(), 64),
              (torch.randn(2, 5, 256, device=DEV).bfloat16(), 256),
              (torch.randn(4, 128, device=DEV), 128),  # fp32 operands
              (torch.randn(6, 8, 128, device=DEV).half()[:, :, :64], 64)]
    for x, d in cases:
        key = (x.shape, x.stride(), x.dtype, x.get_device(), d)
        first = op_mod.hadamard_apply(x, d**-0.5, None, d)
        entry = triton_kernel.FAST[key]
        hits = []
        if launcher == "cpp":
            assert type(entry).__name__ == "Launch", entry
            table = cpp_launch.TABLE
            monkeypatch.setattr(cpp_launch, "TABLE",
                                lambda t, s, b, h=hits, f=table: h.append(1) or f(t, s, b))
        else:
            assert type(entry).__name__ == "function", entry
            monkeypatch.setitem(triton_kernel.FAST, key,
                                lambda t, s, c=entry, h=hits: h.append(1) or c(t, s))
        for y in (first, op_mod.hadamard_apply(x, d**-0.5, None, d)):
            assert_near(y, reference_transform(x, d))  # fp32: relative bound
        assert hits == [1]
        if launcher == "cpp":
            monkeypatch.setattr(cpp_launch, "TABLE", table)
    x = cases[0][0]  # decode layout, 16-byte aligned
    buf = torch.randn(1 * 32 * 128 + 1, device=DEV).bfloat16()
    mis = buf[1:].view(1, 1, 32, 128).transpose(1, 2)
    assert (mis.shape, mis.stride()) == (x.shape, x.stride()) and mis.data_ptr() % 16
    assert_single_rounding(op_mod.hadamard_apply(mis, 128**-0.5, None, 128), mis, None,
                           128**-0.5)
    seen = []
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook",
                        lambda *args: seen.append(args))
    y = op_mod.hadamard_apply(x, 128**-0.5, None, 128)
    monkeypatch.undo()
    assert seen, "with a launch hook installed the launch must go through triton"
    assert_single_rounding(y, x, None, 128**-0.5)
    triton_kernel.clear_plans()  # leave no Python closures behind for later tests


@pytest.mark.parametrize("launcher", ["cpp", "python"])
@pytest.mark.parametrize("explicit", [False, True], ids=["sylvester", "matrix"])
def test_qk_fast_path(explicit, monkeypatch, launcher):
    """The fused Q/K launch's per-layout fast path -- the C++ launch table
    (``cpp_launch.QK_TABLE``, built on this machine) or, with it off, the Python closure
    (``qk_kernel._FAST``): repeated calls run through it and match the reference (RoPE once,
    then the float64 product), with and without RoPE; a misaligned call of the same layout
    falls back and is still right."""
    from hf_hadamard_kq.ops import cpp_launch

    if launcher == "python":
        monkeypatch.setenv(cpp_launch.ENV, "0")
        monkeypatch.setattr(cpp_launch, "QK_TABLE", None)
    qk_kernel.clear_plans()
    d = 128
    matrix = (torch.linalg.qr(torch.randn(d, d, device=DEV))[0] * d**0.5).bfloat16().contiguous() \
        if explicit else None
    scale = d**-0.5
    for rope in (True, False):
        for tokens in (1, 16):
            q, k, cos, sin = inputs(torch.bfloat16, d, 1, tokens, seed=tokens)
            c, s_ = (cos, sin) if rope else (None, None)
            qk_kernel.rotate_qk(q, k, scale, matrix, c, s_)
            hits = []
            if launcher == "cpp":
                table = cpp_launch.QK_TABLE
                monkeypatch.setattr(cpp_launch, "QK_TABLE",
                                    lambda *a, f=table, h=hits: h.append(f(*a)) or h[-1])
            else:
                layout = qk_kernel._layout(q, k, matrix, c, s_, scale)
                closure = qk_kernel._FAST[layout]
                monkeypatch.setitem(qk_kernel._FAST, layout,
                                    lambda *a, f=closure, h=hits: h.append(f(*a)) or h[-1])
            for _ in range(2):
                qo, ko = qk_kernel.rotate_qk(q, k, scale, matrix, c, s_)
                for x, out in ((q, qo), (k, ko)):
                    xr = torch_rope(x, cos, sin) if rope else x
                    assert_single_rounding(out, xr, matrix, scale)
            assert len(hits) == 2 and all(h is not None for h in hits)  # it launched both
            if launcher == "cpp":
                monkeypatch.setattr(cpp_launch, "QK_TABLE", table)
    q, k, cos, sin = inputs(torch.bfloat16, d, 1, 1, offset=1, seed=5)
    qo, ko = qk_kernel.rotate_qk(q, k, scale, matrix, cos, sin)
    assert_single_rounding(qo, torch_rope(q, cos, sin), matrix, scale)
    assert_single_rounding(ko, torch_rope(k, cos, sin), matrix, scale)
    qk_kernel.clear_plans()  # leave no Python closures behind for later tests


@pytest.mark.parametrize("fixture,block", [("llama_r3_hadamard_hd64", 64)])
def test_model_fused_path_matches_general_and_reference(fixture, block, monkeypatch):
    path = FIXTURES / fixture
    kw = dict(dtype=torch.bfloat16, device_map=DEV)
    calls = []
    original = qk_kernel.try_rotate_qk

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        rope = kwargs.get("cos", args[4] if len(args) > 4 else None) is not None
        calls.append(rope and out is not None)
        return out

    monkeypatch.setattr(qk_kernel, "try_rotate_qk", spy)
    fused = AutoModelForCausalLM.from_pretrained(path, attn_implementation="hadamard_kq", **kw)
    monkeypatch.setenv(fused_mod.DISABLE_ENV, "1")
    general = AutoModelForCausalLM.from_pretrained(path, attn_implementation="hadamard_kq", **kw)
    plain = load_unrotated(path, **kw)
    pre_rope = []  # the plain model's k_proj outputs: the keys before RoPE
    for layer in plain.model.layers:
        layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: pre_rope.append(out))
    x = torch.randint(3, 256, (2, 12), device=DEV)
    caches = [DynamicCache(config=m.config) for m in (fused, general, plain)]
    calls.clear()
    with torch.no_grad():
        logits = [m(x, **with_cache(m, c)).logits.float()
                  for m, c in zip((fused, general, plain), caches)]
        step = x[:, -1:]
        for m, c in zip((fused, general), caches):
            m(step, **with_cache(m, c))
        positions = torch.arange(12, device=DEV)[None].expand(2, -1)
        cos, sin = plain.model.rotary_emb(pre_rope[0], positions)
    n_layers = fused.config.num_hidden_layers
    assert calls == [True] * (2 * n_layers), calls  # one fused RoPE+rotation launch per layer
    fp32 = load_unrotated(path, dtype=torch.float32, device_map=DEV)
    with torch.no_grad():
        exact = fp32(x).logits
    floor = (logits[2] - exact).abs().max().item()
    assert (logits[0] - exact).abs().max().item() <= 3 * floor + 1e-3
    assert (logits[0] - logits[1]).abs().max().item() <= 3 * floor + 1e-3
    for i, (a, b) in enumerate(zip(caches[0].layers, caches[1].layers)):
        k_pre = pre_rope[i].view(2, 12, -1, block).transpose(1, 2)
        # the fused layer's cached keys: the float64 rotation of the fp32 RoPE of the same
        # k_proj output (layer 0 sees the same input as the plain model), rounded once
        if i == 0:
            assert_single_rounding(a.keys[..., :12, :], torch_rope(k_pre, cos, sin), None,
                                   block**-0.5)
        # the general path rotates torch's eager RoPE (three roundings): within bf16 noise
        assert a.keys.shape == b.keys.shape
        diff = (a.keys.float() - b.keys.float()).abs().max().item()
        assert diff <= 4 * torch.finfo(torch.bfloat16).eps * b.keys.float().abs().max().item()


def test_model_under_a_dispatch_mode_rotates_through_the_op(monkeypatch):
    """Under a dispatch mode (a flop counter, a tracer) no direct launch serves the layers:
    the fused wrapper leaves them to the general path, whose calls are the custom op the mode
    sees (query and key per layer), and the logits are the fused path's."""
    from tests.oracles import OpLog

    path = FIXTURES / "llama_r3_hadamard_hd64"
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="hadamard_kq", dtype=torch.bfloat16, device_map=DEV)
    fused_calls = []
    original = qk_kernel.try_rotate_qk
    monkeypatch.setattr(qk_kernel, "try_rotate_qk",
                        lambda *a, **k: fused_calls.append(1) or original(*a, **k))
    x = torch.randint(3, 256, (2, 12), device=DEV)
    with torch.no_grad():
        want = model(x).logits.float()
        assert fused_calls  # the fused path served the plain call
        fused_calls.clear()
        with OpLog() as mode:
            got = model(x).logits.float()
    n_layers = model.config.num_hidden_layers
    assert not fused_calls
    assert mode.count("hadamard_kq.hadamard_transform") == 2 * n_layers, mode.ops
    plain = load_unrotated(path, dtype=torch.bfloat16, device_map=DEV)
    fp32 = load_unrotated(path, dtype=torch.float32, device_map=DEV)
    with torch.no_grad():
        exact = fp32(x).logits
        floor = (plain(x).logits.float() - exact).abs().max().item()
    assert (want - exact).abs().max().item() <= 3 * floor + 1e-3
    assert (got - exact).abs().max().item() <= 3 * floor + 1e-3


@pytest.mark.parametrize("form", ["auto", "native"])
def test_compiled_static_generate_with_fused_layers(form, monkeypatch):
    """Under torch.compile the fused layers take the marked route (fused.py, "Under
    torch.compile"): their RoPE call traces to one ``rope_rotate_qk`` node (the fused kernel;
    with the ``native`` form the model's RoPE and plain-torch rotations). A static-cache
    compiled generate (inductor, CUDA graphs) gives the eager model's tokens (fp32) and its
    cache holds the float64 rotation of the plain model's keys."""
    from hf_hadamard_kq.ops import kv_store
    from hf_hadamard_kq.specs import SLOT_ATTR, SPECS
    from tests import tiny_models as tm
    from tests.conftest import compile_rotation

    marked, stores = [], []
    inner = fused_mod._marked_pair
    monkeypatch.setattr(fused_mod, "_marked_pair",
                        lambda *a: marked.append(a[-1]) or inner(*a))
    launch = kv_store._launch
    monkeypatch.setattr(kv_store, "_launch", lambda *a: stores.append(1) or launch(*a))
    path = FIXTURES / "llama_r3_hadamard_hd64"
    with compile_rotation(form):
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="hadamard_kq",
                                                     device_map=DEV)
        plain = load_unrotated(path, device_map=DEV)
        layers = [m for m in model.modules() if SLOT_ATTR in m.__dict__]
        assert layers and all(SPECS[m.__dict__[SLOT_ATTR]].traced for m in layers)
        x = torch.randint(3, 256, (2, 10), device=DEV)
        kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
        eager = model.generate(x, **kw)
        marked.clear()
        static = model.generate(x, cache_implementation="static", return_dict_in_generate=True,
                                **kw)
        ref = plain.generate(x, cache_implementation="static", return_dict_in_generate=True,
                             **kw)
    assert marked  # traced (the count is per trace, not per step)
    # the cache writes: the kv_store kernel where the key came from the fused op (auto); with
    # the native form the layer's own index_copy_ (not counted per step: CUDA graphs replay)
    assert bool(stores) == (form == "auto")
    assert torch.equal(eager, plain.generate(x, **kw))
    assert torch.equal(static.sequences, eager)
    assert torch.equal(ref.sequences, eager)
    tm.assert_keys_rotated(static.past_key_values, ref.past_key_values, block=64, atol=1e-4)
    for a, b in zip(static.past_key_values.layers, ref.past_key_values.layers):
        assert int(a.cumulative_length) == int(b.cumulative_length)
        scale = b.values.abs().max().item()
        assert (a.values - b.values).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_store_kernel_equals_index_copy(dtype):
    """The one-kernel cache write (ops/kv_store.py) against the layer's own two
    ``index_copy_``: decode and prefill sizes, the projections' transposed views, a start
    past 0, and inside a CUDA graph replayed after ``start`` moved (the position is read on
    the device, as in a compiled decode step)."""
    from hf_hadamard_kq.ops import kv_store

    g = torch.Generator(device=DEV).manual_seed(0)
    for b, h, s, d, length, start in ((1, 8, 1, 128, 640, 512), (2, 8, 37, 128, 64, 3),
                                      (4, 2, 1, 64, 16, 15)):
        keys = torch.randn(b, h, length, d, generator=g, device=DEV).to(dtype)
        values = torch.randn(b, h, length, d, generator=g, device=DEV).to(dtype)
        k = torch.randn(b, s, h, d, generator=g, device=DEV).to(dtype).transpose(1, 2)
        v = torch.randn(b, s, h, d, generator=g, device=DEV).to(dtype).transpose(1, 2)
        pos = torch.tensor(start, device=DEV)
        assert kv_store.kernel_takes(keys, values, k, v, pos)
        want_k, want_v = keys.clone(), values.clone()
        index = torch.arange(s, device=DEV) + start
        want_k.index_copy_(2, index, k)
        want_v.index_copy_(2, index, v)
        torch.ops.hadamard_kq.kv_store(keys, values, k, v, pos)
        assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    keys, values = torch.zeros(1, 8, 32, 128, device=DEV, dtype=dtype), torch.zeros(
        1, 8, 32, 128, device=DEV, dtype=dtype)
    k = torch.randn(1, 8, 1, 128, generator=g, device=DEV).to(dtype)
    pos = torch.tensor(0, device=DEV)
    graph = torch.cuda.CUDAGraph()
    torch.ops.hadamard_kq.kv_store(keys, values, k, k, pos)  # warm-up (compiles the kernel)
    with torch.cuda.graph(graph):
        torch.ops.hadamard_kq.kv_store(keys, values, k, k, pos)
    for step in range(1, 4):
        pos.fill_(step)
        graph.replay()
    torch.cuda.synchronize()
    for step in range(4):
        assert torch.equal(keys[:, :, step], k[:, :, 0]) and torch.equal(values[:, :, step],
                                                                          k[:, :, 0])
    assert not keys[:, :, 4:].any()
