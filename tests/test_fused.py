"""The fused path (hf_hadamard_kq/fused.py): Q and K rotated together at RoPE time.

On the CPU the fused path runs the model's own RoPE and then one rotation per tensor (the
one-launch Triton kernel is CUDA-only; its logic is tested under the interpreter in
tests/test_triton_interpret.py and on the GPU in tests/test_gpu.py). What is tested here is
the bookkeeping that decides, per call, who rotates: it must never rotate twice, never skip,
and never touch a model that is not installed.
"""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.models.llama import modeling_llama

import hf_hadamard_kq
from hf_hadamard_kq import fused as fused_mod
from hf_hadamard_kq.cache import RotateOnlyCache
from tests.oracles import load_unrotated, rotate64, with_cache

ATOL = 1e-5


def load_r3(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="hadamard_kq", **kwargs)


def ids(batch=2, seq=9, seed=0):
    return torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def attention_layers(model):
    return [m for m in model.modules() if isinstance(m, modeling_llama.LlamaAttention)]


def llama_forward_changing(change_key, change_query, break_at=None):
    """A LlamaAttention.forward that replaces the key and/or query (same values, new tensor)
    between RoPE and the cache / attention function: what an architecture that post-processes
    RoPE output would do. ``change_key`` may be a function ``(layer_idx, has_cache) -> bool``.
    ``break_at`` ("before_rope", "after_rope", "after_update"): a dynamo graph break there."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        # without a cache our pre-hook passes a RotateOnlyCache (rotates, stores nothing)
        has_cache = cache is not None and not isinstance(cache, RotateOnlyCache)
        key_changes = change_key(self.layer_idx, has_cache) if callable(
            change_key) else change_key
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        if break_at == "before_rope":
            torch._dynamo.graph_break()
        q, k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
        if break_at == "after_rope":
            torch._dynamo.graph_break()
        if key_changes:
            k = k * 1.0
        if change_query:
            q = q * 1.0
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if break_at == "after_update":
            torch._dynamo.graph_break()
        attend = modeling_llama.ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, weights = attend(self, q, k, v, attention_mask, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1)), weights

    return forward


def test_llama_layers_take_the_fused_path_and_unpatch(r3_hd16):
    """The wrapper is shared by installed models (refcounted) and the module's original
    function is restored when the last one is removed (or garbage-collected)."""
    gc.collect()  # models left by earlier tests release their share

    def users() -> int:
        entry = fused_mod._PATCHED.get(modeling_llama.__name__)
        return 0 if entry is None else entry[1]

    current = modeling_llama.apply_rotary_pos_emb
    original = getattr(current, fused_mod.ORIGINAL_ATTR, current)
    start = users()
    model = load_r3(r3_hd16)
    assert all(fused_mod.FUSED_ATTR in m.__dict__ for m in attention_layers(model))
    wrapper = modeling_llama.apply_rotary_pos_emb
    assert getattr(wrapper, fused_mod.ORIGINAL_ATTR) is original
    second = load_r3(r3_hd16)
    assert users() == start + 2
    hf_hadamard_kq.remove_r3(model, "sdpa")
    assert users() == start + 1 and modeling_llama.apply_rotary_pos_emb is wrapper
    assert not any(fused_mod.FUSED_ATTR in m.__dict__ for m in attention_layers(model))
    del second
    gc.collect()  # a collected model releases its share too
    assert users() <= start
    if users() == 0:
        assert modeling_llama.apply_rotary_pos_emb is original


def test_fused_and_general_paths_agree(r3_hd16, monkeypatch):
    x = ids()
    fused = load_r3(r3_hd16)
    monkeypatch.setenv(fused_mod.DISABLE_ENV, "1")
    general = load_r3(r3_hd16)
    assert not any(fused_mod.FUSED_ATTR in m.__dict__ for m in attention_layers(general))
    plain = load_unrotated(r3_hd16)
    caches = [DynamicCache(config=m.config) for m in (fused, general, plain)]
    with torch.no_grad():
        out = [m(x, **with_cache(m, c)).logits for m, c in zip((fused, general, plain), caches)]
    assert (out[0] - out[1]).abs().max() == 0  # same arithmetic, same order
    assert (out[0] - out[2]).abs().max() < ATOL
    for a, b, p in zip(caches[0].layers, caches[1].layers, caches[2].layers):
        assert torch.equal(a.keys, b.keys)
        assert (a.keys - rotate64(p.keys, 16)).abs().max() < ATOL


@pytest.mark.parametrize("key,query", [(True, False), (False, True)], ids=["key", "query"])
def test_change_after_rope_withdraws_fused_at_load(r3_hd16, monkeypatch, key, query):
    """A layer that replaces K (or Q) after RoPE loses the fused path at load, and the general
    path then rotates exactly what reaches the cache and the attention function."""
    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward",
                        llama_forward_changing(key, query))
    model = load_r3(r3_hd16)
    assert not any(fused_mod.FUSED_ATTR in m.__dict__ for m in attention_layers(model))
    x = ids()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        got = model(x, **with_cache(model, cache)).logits
        plain_cache = DynamicCache(config=model.config)
        plain = load_unrotated(r3_hd16)
        want = plain(x, **with_cache(plain, plain_cache)).logits
    assert (got - want).abs().max() < ATOL
    for a, p in zip(cache.layers, plain_cache.layers):
        assert (a.keys - rotate64(p.keys, 16)).abs().max() < ATOL


def test_change_after_rope_at_run_time_raises(r3_hd16, monkeypatch):
    model = load_r3(r3_hd16)  # fused at load
    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward",
                        llama_forward_changing(True, False))
    with torch.no_grad(), pytest.raises(fused_mod.FusedRotationMismatchError,
                                        match="changed the key"):
        model(ids(), **with_cache(model, DynamicCache(config=model.config)))
    fused_mod.reset()


def test_stale_arm_never_rotates_another_model(r3_hd16):
    """An armed state left behind (e.g. by an exception between our pre-hook and RoPE) must
    not rotate another model's RoPE call: the wrapper checks its caller is the armed module."""
    ours = load_r3(r3_hd16)
    plain = load_unrotated(r3_hd16)
    x = ids()
    with torch.no_grad():
        want = plain(x).logits
        fused_mod.STATE.armed = attention_layers(ours)[0]
        got = plain(x).logits
    assert fused_mod.STATE.done is None
    assert torch.equal(got, want)
    fused_mod.reset()


def test_state_is_per_thread(r3_hd16):
    model = load_r3(r3_hd16)
    layer = attention_layers(model)[0]
    fused_mod.STATE.armed = layer
    seen = []
    thread = threading.Thread(target=lambda: seen.append(fused_mod.STATE.armed))
    thread.start()
    thread.join()
    assert seen == [None]
    fused_mod.reset()


def test_qk_plans_that_cannot_fuse_use_the_general_path(r3_hd16):
    """K-only (or Q-only) rotations, or a precision cast, cannot share one fused call."""
    from hf_hadamard_kq.install import _install_fused
    from hf_hadamard_kq.plan import LayerPlan, Rotation

    def rotation(scale=0.25, cast=None):
        return Rotation("R3", "k_cache", "hadamard", 16, scale, cast=cast)

    module = attention_layers(load_unrotated(r3_hd16))[0]
    patched: list[str] = []
    rot = rotation()
    assert not _install_fused(module, "l0", LayerPlan("l0", 16, q=None, k=rot), patched)
    cast = rotation(cast=torch.float16)
    assert not _install_fused(module, "l0", LayerPlan("l0", 16, q=cast, k=cast), patched)
    other = rotation(scale=0.5)
    assert not _install_fused(module, "l0", LayerPlan("l0", 16, q=rot, k=other), patched)
    assert patched == [] and fused_mod.FUSED_ATTR not in module.__dict__


def test_rope_recognition():
    from transformers.models.cohere import modeling_cohere
    from transformers.models.phi3 import modeling_phi3

    assert fused_mod.is_standard_rope(fused_mod._standard_rope)
    llama = getattr(modeling_llama.apply_rotary_pos_emb, fused_mod.ORIGINAL_ATTR,
                    modeling_llama.apply_rotary_pos_emb)
    assert fused_mod.is_standard_rope(llama)
    assert not fused_mod.is_standard_rope(modeling_cohere.apply_rotary_pos_emb)  # interleaved
    # Phi3's partial-rotary RoPE equals the standard one when cos covers the head; when it
    # does not, qk_supported refuses RoPE fusion (tests/test_triton_interpret.py).
    assert fused_mod.is_standard_rope(modeling_phi3.apply_rotary_pos_emb)
    assert not fused_mod.signature_ok(lambda q, k, cos: None)
    assert not fused_mod.signature_ok(lambda q, k, cos, sin, mrope_section: None)
    assert fused_mod.signature_ok(lambda q, k, cos, sin, unsqueeze_dim=1: None)


def test_layers_whose_rope_never_qualifies_take_the_general_path():
    """StableLM applies RoPE to a slice of each head (partial rotary): the wrapper cannot
    rotate there, the probe sees no fused call and drops the marker; describe() says so."""
    from hf_hadamard_kq.inspect_model import FUSED_PATH, GENERAL_PATH
    from tests.tiny_models import rotated

    partial = rotated("stablelm")
    assert {r["path"] for r in hf_hadamard_kq.rotation_table(partial)} == {GENERAL_PATH}
    full = rotated("llama")
    assert {r["path"] for r in hf_hadamard_kq.rotation_table(full)} == {FUSED_PATH}
    assert "| fused" in hf_hadamard_kq.describe(full)


def test_probe_repeats_until_no_layer_is_withdrawn(r3_hd16, monkeypatch):
    """Layer 0 changes K after RoPE with a cache, layer 1 only without one: the first probe
    withdraws layer 0 (cache pass), the second layer 1 (no-cache pass), the third passes."""
    from hf_hadamard_kq import install

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", llama_forward_changing(
        lambda layer, has_cache: has_cache if layer == 0 else not has_cache, False))
    rounds = []
    probe = install.probe_pattern

    def counting_probe(*args):
        rounds.append(probe(*args))
        return rounds[-1]

    monkeypatch.setattr(install, "probe_pattern", counting_probe)
    model = load_r3(r3_hd16)
    # each round's withdrawals, the last one complete (both passes checked, none withdrawn)
    assert rounds == [["model.layers.0.self_attn"], ["model.layers.1.self_attn"], []]
    assert not any(fused_mod.FUSED_ATTR in m.__dict__ for m in attention_layers(model))
    x = ids()
    with torch.no_grad():
        got = model(x, use_cache=False).logits
        want = load_unrotated(r3_hd16)(x, use_cache=False).logits
    assert (got - want).abs().max() < ATOL


def test_loading_while_another_thread_serves(r3_hd16):
    """The load probe records events globally; a model of the same class running in another
    thread meanwhile must neither fail the load nor be treated as the probed model."""
    serving = load_r3(r3_hd16)
    x = ids(batch=1, seq=4)
    stop = threading.Event()
    errors: list[BaseException] = []

    def serve():
        try:
            with torch.no_grad():
                while not stop.is_set():
                    serving(x, **with_cache(serving, DynamicCache(config=serving.config)))
        except BaseException as e:  # reported below
            errors.append(e)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        for _ in range(5):
            load_r3(r3_hd16)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors


def test_mismatch_of_a_model_not_being_probed_raises(r3_hd16):
    """During another model's probe, a real mismatch elsewhere is still an error."""
    from hf_hadamard_kq.install import _Recorder

    model = load_r3(r3_hd16)
    layer = attention_layers(model)[0]
    fused_mod.PROBE = _Recorder({})  # probing some other model
    try:
        with pytest.raises(fused_mod.FusedRotationMismatchError):
            fused_mod.mismatch(layer, "key")
    finally:
        fused_mod.PROBE = None


# ------------------------------------------------------------------------------------------
# torch.compile: the eager bookkeeping (thread-local STATE) must stay out of traced code.
# dynamo does not write back attribute changes of a ``threading.local`` made inside a compiled
# region, so a traced hand-off through it breaks at a graph break (rotated twice) and a stale
# eager arm leaks into compiled calls of another model (a session-7 prototype did both, found
# in review). Traced calls use their own per-call hand-off (fused.py, "Under torch.compile");
# these check both the general path and that hand-off across graph breaks and stale arms.


@pytest.mark.parametrize("traced", [False, True], ids=["general", "traced"])
@pytest.mark.parametrize("where", ["before_rope", "after_rope", "after_update"])
def test_compiled_step_with_graph_breaks_rotates_once(r3_hd64, monkeypatch, where, traced):
    """A compiled decode step whose attention forward graph-breaks between the pre-hook, RoPE,
    the cache write and the attention function: plain logits, and the static cache holds the
    float64 rotation of the plain model's keys (not a double or a missing rotation). With
    ``traced`` the traced fused path runs on the CPU (TRACED_DEVICES widened) and must have
    rotated at RoPE time, its hand-off crossing the graph break."""
    from tests import tiny_models as tm
    from tests.test_compile_offload_autograd import _decode_step_inputs

    ours = load_r3(r3_hd64)
    plain = load_unrotated(r3_hd64)
    assert any(fused_mod.FUSED_ATTR in m.__dict__ for m in attention_layers(ours))
    fired, general = [], []
    if traced:
        assert all(fused_mod.FUSED_ATTR in m.__dict__ for m in attention_layers(ours))
        monkeypatch.setattr(fused_mod, "TRACED_DEVICES", frozenset({"cuda", "cpu"}))
        inner = fused_mod._traced_pair
        monkeypatch.setattr(fused_mod, "_traced_pair",
                            lambda *a: fired.append(1) or inner(*a))
    from hf_hadamard_kq import attention as attn_mod
    from hf_hadamard_kq import cache as cache_mod

    rotate = cache_mod.rotate
    for mod in (cache_mod, attn_mod):  # the general path's rotations (traced or run)
        monkeypatch.setattr(mod, "rotate", lambda *a: general.append(1) or rotate(*a))
    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward",
                        llama_forward_changing(False, False, break_at=where))
    p_in, o_in = _decode_step_inputs(plain), _decode_step_inputs(ours)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            want = plain(**p_in).logits
            got = torch.compile(ours, backend="eager")(**o_in).logits
    finally:
        torch._dynamo.reset()
    assert (got - want).abs().max() < ATOL
    name = "cache" if "cache" in p_in else "past_key_values"
    tm.assert_keys_rotated(o_in[name], p_in[name], block=64)
    # traced: every rotation happened at RoPE time, the hand-off crossed the graph break
    assert bool(fired) == traced and bool(general) != traced


def test_stale_eager_arm_does_not_reach_compiled_calls(r3_hd64):
    """An exception between a fused layer's pre-hook and its RoPE call leaves the thread's
    state armed; a compiled step of another, plain model in the same thread must not be
    rotated by it (nor a compiled step of the installed model)."""
    from tests import tiny_models as tm
    from tests.test_compile_offload_autograd import _decode_step_inputs

    ours = load_r3(r3_hd64)
    plain = load_unrotated(r3_hd64)
    layer0 = attention_layers(ours)[0]
    # inputs first: their eager prefill would consume a stale arm (eager checks the caller)
    p_eager, p_comp = _decode_step_inputs(plain), _decode_step_inputs(plain)

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure after the pre-hook")

    layer0.q_proj.forward = boom
    with pytest.raises(RuntimeError, match="simulated"), torch.no_grad():
        ours(ids(1, 3))
    del layer0.q_proj.forward
    torch._dynamo.reset()
    try:
        assert fused_mod.STATE.armed is layer0  # the stale arm this test is about
        with torch.no_grad():
            got = torch.compile(plain, backend="eager", fullgraph=True)(**p_comp).logits
            want = plain(**p_eager).logits
    finally:
        torch._dynamo.reset()
        fused_mod.reset()
    assert (got - want).abs().max() < ATOL
    name = "cache" if "cache" in p_eager else "past_key_values"
    for a, b in zip(tm.cache_keys(p_eager[name]), tm.cache_keys(p_comp[name])):
        assert (a - b).abs().max() < ATOL


# ------------------------------------------------------------------------------------------
# Under torch.compile: the fused layer's RoPE call becomes one ``rope_rotate_qk`` node.
# On CUDA that node is the one-launch kernel; here ``TRACED_DEVICES`` is widened to "cpu" so
# the same traced bookkeeping runs with the op's torch implementation.


def _llama_hd32(transform_type="hadamard"):
    """A tiny Llama with head_dim 32 (the op's smallest head dim), plain and with R3."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from tests import tiny_models as tm

    cfg = LlamaConfig(**{**tm.COMMON, "hidden_size": 128, "head_dim": 32})
    torch.manual_seed(0)
    plain = LlamaForCausalLM(cfg).eval()
    tm.boost_qk(plain)
    ours = hf_hadamard_kq.apply_r3(
        copy.deepcopy(plain), hf_hadamard_kq.default_r3_config(transform_type), seed=0)
    return plain, ours


@pytest.fixture
def traced_on_cpu(monkeypatch):
    monkeypatch.setattr(fused_mod, "TRACED_DEVICES", frozenset({"cuda", "cpu"}))
    yield
    torch._dynamo.reset()


def _compiled_decode_step(model, backend):
    from tests.test_compile_offload_autograd import _decode_step_inputs

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return backend(gm, example_inputs) if backend else gm.forward

    inputs = _decode_step_inputs(model)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=counting, fullgraph=True)(**inputs)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes
               if n.op == "call_function" and "hadamard_kq" in str(n.target)]
    return out, inputs, targets


@pytest.mark.parametrize("transform_type", ["hadamard", "random-hadamard"])
@pytest.mark.parametrize("compile_form", ["auto", "op", "native"], indirect=True)
def test_traced_fused_layers_use_one_op_per_layer(traced_on_cpu, compile_form, transform_type):
    """Each fused layer's RoPE call traces to one ``rope_rotate_qk`` node (none of the
    single-tensor rotations), except with the ``native`` form (plain torch ops throughout);
    the step's logits equal the plain model's and the static cache holds the float64
    rotation of the plain model's keys, including the key the compiled step wrote."""
    from torch._inductor.compile_fx import compile_fx

    from tests import tiny_models as tm
    from tests.test_compile_offload_autograd import _decode_step_inputs

    plain, ours = _llama_hd32(transform_type)
    layers = plain.config.num_hidden_layers
    p_in = _decode_step_inputs(plain)
    with torch.no_grad():
        want = plain(**p_in).logits
    name = "cache" if "cache" in p_in else "past_key_values"
    matrix = None
    if transform_type != "hadamard":
        from hf_hadamard_kq.specs import SLOT_ATTR, SPECS

        attn = attention_layers(ours)[0]  # one matrix for every layer (compressed-tensors')
        rotation = SPECS[attn.__dict__[SLOT_ATTR]].q
        matrix = attn._buffers[rotation.buffer].double() * rotation.scale
        assert matrix.shape == (32, 32)
        assert torch.allclose(matrix @ matrix.T, torch.eye(32, dtype=torch.float64))
    for backend in (None, compile_fx):  # dynamo's graph as is, then inductor
        out, o_in, targets = _compiled_decode_step(_llama_hd32(transform_type)[1], backend)
        if compile_form == "native":
            assert targets == []
        else:
            assert targets == ["hadamard_kq.rope_rotate_qk.default"] * layers
        assert tm.max_diff(out.logits, want) < 1e-5
        for k_ours, k_plain in zip(tm.cache_keys(o_in[name]), tm.cache_keys(p_in[name])):
            ref = rotate64(k_plain, 32) if matrix is None else (k_plain.double() @ matrix)
            assert (k_ours.double() - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max())
            assert (k_ours - k_plain).abs().max() > 1e-2  # rotated, not left as is


def test_traced_fused_path_off_device_takes_the_general_path():
    """Without "cpu" in TRACED_DEVICES (the default) a CPU model's compiled step keeps the
    general path: no fused node; with the ``op`` form, the two single-tensor ops per layer."""
    from tests.conftest import compile_rotation

    with compile_rotation("op"):
        _, ours = _llama_hd32()
        _, _, targets = _compiled_decode_step(ours, None)
    assert targets == ["hadamard_kq.hadamard_transform"] * 4


def test_traced_mismatch_raises(traced_on_cpu, monkeypatch):
    """A query replaced between RoPE and the attention function after the load probe (so the
    layer kept its fused marker) is an error under torch.compile too, never a second or a
    missing rotation."""
    _, ours = _llama_hd32()
    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward",
                        llama_forward_changing(False, True))
    with pytest.raises(Exception, match="changed the query"):
        _compiled_decode_step(ours, None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("explicit", [False, True], ids=["sylvester", "matrix"])
def test_rope_rotate_qk_op_matches_float64(dtype, explicit):
    """The op's torch implementation (every device but CUDA, and the CUDA fallback) against
    float64: RoPE rounded once to the dtype, then compressed-tensors' Sylvester matrix (or an
    explicit orthogonal matrix) in float64, one rounding; layouts of the inputs kept; and
    torch.library.opcheck's schema / fake / dispatch checks."""
    from hf_hadamard_kq.ops.qk_op import rope_rotate_qk
    from tests.reference import assert_single_rounding, ct_hadamard
    from tests.reference import rope_once as ref_rope

    g = torch.Generator().manual_seed(3)
    d = 64
    q = torch.randn(2, 5, 4, d, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(2, 5, 2, d, generator=g).to(dtype).transpose(1, 2)
    angle = torch.randn(2, 5, d // 2, generator=g)
    cos = torch.cat([angle.cos(), angle.sin() * 0.5], -1).to(dtype)
    sin = torch.cat([angle.sin(), angle.cos() * 0.7], -1).to(dtype)
    if explicit:
        perm = torch.randperm(d, generator=g)
        matrix = (ct_hadamard(d)[perm] / d**0.5).to(dtype)
        scale, w64 = 1.0, matrix.double()
    else:
        matrix, scale, w64 = None, d**-0.5, ct_hadamard(d) * d**-0.5
    qo, ko = rope_rotate_qk(q, k, cos, sin, scale, matrix)
    for x, out in ((q, qo), (k, ko)):
        assert out.stride() == x.stride() and out.dtype == dtype
        assert_single_rounding(out, ref_rope(x, cos, sin).double() @ w64)
    torch.library.opcheck(torch.ops.hadamard_kq.rope_rotate_qk.default,
                          (q, k, cos, sin, scale, matrix))


def test_stale_traced_arm_never_rotates_another_call(traced_on_cpu, r3_hd64):
    """A traced arm left set (its layer failed between the pre-hook and RoPE, after a graph
    break wrote the arm back) names that call's ``cos`` and view: compiled steps of a plain
    model and of the installed model get other ``cos`` tensors and must not be rotated by it
    (plain logits; the installed model's cache holds keys rotated exactly once)."""
    from hf_hadamard_kq.cache import RotatingCacheView
    from hf_hadamard_kq.specs import SLOT_ATTR, SPECS
    from tests import tiny_models as tm
    from tests.test_compile_offload_autograd import _decode_step_inputs

    ours = load_r3(r3_hd64)
    plain = load_unrotated(r3_hd64)
    layer0 = attention_layers(ours)[0]
    p_eager, p_comp = _decode_step_inputs(plain), _decode_step_inputs(plain)
    o_in, o_ref = _decode_step_inputs(ours), _decode_step_inputs(ours)
    with torch.no_grad():
        want_plain = plain(**p_eager).logits
        want_ours = ours(**o_ref).logits
    stale_view = RotatingCacheView(DynamicCache(config=ours.config),
                                   SPECS[layer0.__dict__[SLOT_ATTR]].k, layer0)
    torch._dynamo.reset()
    try:
        fused_mod.TRACED_ARM.value = (torch.ones(1, 1, 64), stale_view, layer0)
        with torch.no_grad():
            got_plain = torch.compile(plain, backend="eager")(**p_comp).logits
        assert fused_mod.TRACED_ARM.value is not None  # still stale: nothing took it
        with torch.no_grad():
            got_ours = torch.compile(ours, backend="eager")(**o_in).logits
    finally:
        torch._dynamo.reset()
        fused_mod.reset()
    assert stale_view._hkq_q is None and stale_view._hkq_k is None
    assert (got_plain - want_plain).abs().max() < ATOL
    assert (got_ours - want_ours).abs().max() < ATOL
    name = "cache" if "cache" in p_comp else "past_key_values"
    tm.assert_keys_rotated(o_in[name], p_comp[name], block=64)


@pytest.mark.parametrize("forward_kind", ["passes_kwargs", "rejects_kwarg", "drops_kwarg"])
def test_probe_enables_traced_fusion_only_where_the_view_reaches_attention(
        traced_on_cpu, r3_hd64, monkeypatch, forward_kind):
    """The traced fused path needs the call's view to reach the attention function (as
    ``fused.CALL_KW``). The load probe checks that per layer: Llama's forward passes it on;
    a forward that rejects the keyword (TypeError: probed again without it) or drops it
    loads with the traced path off (eager fusion unchanged), and its compiled step takes the
    general path, rotating exactly once."""
    import functools

    from hf_hadamard_kq.specs import SLOT_ATTR, SPECS
    from tests import tiny_models as tm
    from tests.test_compile_offload_autograd import _decode_step_inputs

    original = modeling_llama.LlamaAttention.forward

    @functools.wraps(original)  # its signature: where the cache argument is
    def forward(self, *args, **kwargs):
        if fused_mod.CALL_KW in kwargs and forward_kind != "passes_kwargs":
            if forward_kind == "rejects_kwarg":
                raise TypeError(f"forward() got an unexpected keyword argument "
                                f"'{fused_mod.CALL_KW}'")
            kwargs.pop(fused_mod.CALL_KW)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", forward)
    ours = load_r3(r3_hd64)
    plain = load_unrotated(r3_hd64)
    layers = attention_layers(ours)
    assert all(fused_mod.FUSED_ATTR in m.__dict__ for m in layers)  # eager fusion kept
    traced = [SPECS[m.__dict__[SLOT_ATTR]].traced for m in layers]
    assert traced == [forward_kind == "passes_kwargs"] * len(layers)
    fired = []
    inner = fused_mod._traced_pair
    monkeypatch.setattr(fused_mod, "_traced_pair", lambda *a: fired.append(1) or inner(*a))
    p_in, o_in = _decode_step_inputs(plain), _decode_step_inputs(ours)
    torch._dynamo.reset()
    with torch.no_grad():
        want = plain(**p_in).logits
        got = torch.compile(ours, backend="eager", fullgraph=True)(**o_in).logits
    assert (got - want).abs().max() < ATOL
    name = "cache" if "cache" in p_in else "past_key_values"
    tm.assert_keys_rotated(o_in[name], p_in[name], block=64)
    assert bool(fired) == (forward_kind == "passes_kwargs")
