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


def assert_compiled_step_is_plain(plain, ours, p_in, o_in):
    """One decode step of ``ours`` under torch.compile (dynamo only, graph breaks allowed)
    gives the plain model's logits (eager) on the matching inputs."""
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            want = plain(**p_in).logits
            got = torch.compile(ours, backend="eager")(**o_in).logits
    finally:
        torch._dynamo.reset()
    assert (got - want).abs().max() < ATOL


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


def _reference(path, x):
    plain = load_unrotated(path)
    with torch.no_grad():
        return plain(x, **with_cache(plain, DynamicCache(config=plain.config))).logits


def test_attention_function_compiled_alone_is_an_error(r3_hd16, monkeypatch):
    """Only the attention function compiled, the layer eager: the RoPE wrapper rotated the
    query eagerly, the compiled function does not read the thread's state and rotates it
    again (wrong logits, seen before the post-hook existed). The layer's post-hook must raise,
    naming the layer and the query; after it the eager model is right again."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = load_r3(r3_hd16)
    x = ids()
    want = _reference(r3_hd16, x)
    impl = model.config._attn_implementation
    ours = ALL_ATTENTION_FUNCTIONS[impl]
    torch._dynamo.reset()
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, impl,
                        torch.compile(ours, backend="eager"))
    try:
        with torch.no_grad(), pytest.raises(fused_mod.FusedHandoffError) as err:
            model(x, **with_cache(model, DynamicCache(config=model.config)))
    finally:
        torch._dynamo.reset()
    assert "layer 'model.layers.0.self_attn'" in str(err.value)
    assert "rotated its query" in str(err.value) and "the attention function" in str(err.value)
    assert fused_mod.STATE.done is None and fused_mod.STATE.q_out is None
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, impl, ours)
    with torch.no_grad():
        got = model(x, **with_cache(model, DynamicCache(config=model.config))).logits
    assert (got - want).abs().max() < ATOL


def test_cache_update_compiled_alone_is_an_error(r3_hd16, monkeypatch):
    """Only the cache view's update compiled: it rotates the key the RoPE wrapper already
    rotated. The post-hook raises naming the key and the cache update."""
    from hf_hadamard_kq import cache as cache_mod

    model = load_r3(r3_hd16)
    torch._dynamo.reset()
    monkeypatch.setattr(cache_mod.RotatingCacheView, "update",
                        torch.compile(cache_mod.RotatingCacheView.update, backend="eager"))
    try:
        with torch.no_grad(), pytest.raises(fused_mod.FusedHandoffError,
                                            match="rotated its key at RoPE time.*KV cache"):
            model(ids(), **with_cache(model, DynamicCache(config=model.config)))
    finally:
        torch._dynamo.reset()
    assert fused_mod.STATE.k_out is None


def test_exception_inside_a_layer_leaves_no_false_handoff_error(r3_hd16, monkeypatch):
    """An exception between the key's hand-off and the attention function (here: the real
    cache's update fails once, after the view took the rotated key) skips the post-hook --
    the exception itself propagates, not a hand-off error -- and leaves the query's hand-off
    in the state. The next forward's pre-hook clears it: a retry on the general path (an
    input that needs a gradient, so the wrapper does not rotate and would not overwrite the
    state) runs without a false error and gives the plain model's logits."""
    from transformers.cache_utils import DynamicCache as Dynamic

    model = load_r3(r3_hd16)
    plain = load_unrotated(r3_hd16)
    layer = attention_layers(model)[0]
    x = ids()
    update = Dynamic.update
    calls = []

    def failing_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("simulated")
        return update(self, *args, **kwargs)

    monkeypatch.setattr(Dynamic, "update", failing_once)
    with torch.no_grad(), pytest.raises(MemoryError):
        model(x, **with_cache(model, DynamicCache(config=model.config)))
    assert fused_mod.STATE.done is layer and fused_mod.STATE.q_out is not None
    embeds = model.get_input_embeddings()(x).detach().requires_grad_()
    got = model(inputs_embeds=embeds, **with_cache(model, DynamicCache(config=model.config)))
    with torch.no_grad():
        want = plain(inputs_embeds=embeds, **with_cache(plain, DynamicCache(config=plain.config)))
    assert (got.logits.detach() - want.logits).abs().max() < ATOL
    assert fused_mod.STATE.done is None


def test_attention_function_compiled_before_load_takes_the_general_path(r3_hd16,
                                                                          monkeypatch):
    """The attention function compiled on its own before the model is loaded: the load
    probe's forward sees the hand-off missed and withdraws the fused path (as for a tensor
    replaced after RoPE); the general path then rotates the query once, inside the compiled
    function, and the model gives the plain model's logits."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    x = ids()
    want = _reference(r3_hd16, x)
    impl = "hadamard_kq"
    ours = ALL_ATTENTION_FUNCTIONS[impl]
    torch._dynamo.reset()
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, impl,
                        torch.compile(ours, backend="eager"))
    try:
        model = load_r3(r3_hd16)
        assert not any(fused_mod.FUSED_ATTR in m.__dict__ for m in attention_layers(model))
        assert not any(m._forward_hooks for m in attention_layers(model))
        with torch.no_grad():
            got = model(x, **with_cache(model, DynamicCache(config=model.config))).logits
    finally:
        torch._dynamo.reset()
    assert (got - want).abs().max() < ATOL


def test_handoff_post_hook_only_on_fused_layers(r3_hd16):
    """Fused layers carry the post-hook; layers the probe moved to the general path (StableLM's
    partial rotary) do not, and remove_r3 takes it off."""
    from tests.tiny_models import rotated

    def hooked(model):  # modules carrying the hook or its handle
        return [n for n, m in model.named_modules() if fused_mod.HANDOFF_HOOK_ATTR in m.__dict__
                or fused_mod.handoff_post_hook in m._forward_hooks.values()]

    model = load_r3(r3_hd16)
    layers = attention_layers(model)
    assert all(fused_mod.handoff_post_hook in m._forward_hooks.values() for m in layers)
    hf_hadamard_kq.remove_r3(model, "sdpa")
    assert not any(m._forward_hooks for m in layers)
    assert not any(fused_mod.HANDOFF_HOOK_ATTR in m.__dict__ for m in layers)
    assert hooked(rotated("stablelm")) == []


def test_handoff_left_over_during_another_models_probe_raises(r3_hd16):
    """During a load probe the post-hook records a withdrawal for the probed model's own
    layers and still raises for any other model's."""
    from hf_hadamard_kq.install import _Recorder

    model = load_r3(r3_hd16)
    layer = attention_layers(model)[0]
    try:
        for names, raises in (({id(layer): "l0"}, False), ({}, True)):
            fused_mod.PROBE = recorder = _Recorder(names)
            fused_mod.STATE.done, fused_mod.STATE.q_out = layer, torch.zeros(1)
            if raises:
                with pytest.raises(fused_mod.FusedHandoffError, match="rotated its query"):
                    fused_mod.handoff_post_hook(layer, (), None)
                assert recorder.events == []
            else:  # the probed model's layer: an event that withdraws its fused path
                fused_mod.handoff_post_hook(layer, (), None)
                assert recorder.events == [("query_changed", "l0")]
            assert fused_mod.STATE.done is None
    finally:
        fused_mod.PROBE = None
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
    from hf_hadamard_kq.inspect_model import FUSED_PATH, GENERAL_PATH, MARKED_PATH
    from tests.tiny_models import rotated

    partial = rotated("stablelm")
    rows = hf_hadamard_kq.rotation_table(partial)
    assert {r["path"] for r in rows} == {r["compiled"] for r in rows} == {GENERAL_PATH}
    assert "| general, compiled: general" in hf_hadamard_kq.describe(partial)
    full = rotated("llama")
    rows = hf_hadamard_kq.rotation_table(full)
    assert {r["path"] for r in rows} == {FUSED_PATH}
    assert {r["compiled"] for r in rows} == {MARKED_PATH}
    assert "| fused, compiled: fused" in hf_hadamard_kq.describe(full)


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
# torch.compile: the fused bookkeeping must stay out of traced code. dynamo does not write
# back attribute changes of a ``threading.local`` (the thread's STATE) made inside a compiled
# region, so a traced handoff from the RoPE wrapper to cache.update / the attention function
# breaks at a graph break (rotated twice) and a stale eager arm leaks into compiled calls of
# another model (a session-7 prototype did both, found in review). These pin that compiled
# layers take the general path, whatever the graph breaks and the thread's state.


@pytest.mark.parametrize("where", ["before_rope", "after_rope", "after_update"])
def test_compiled_step_with_graph_breaks_rotates_once(r3_hd64, monkeypatch, where):
    """A compiled decode step whose attention forward graph-breaks between the pre-hook, RoPE,
    the cache write and the attention function: plain logits, and the static cache holds the
    float64 rotation of the plain model's keys (not a double or a missing rotation)."""
    from tests import tiny_models as tm
    from tests.test_compile_offload_autograd import _decode_step_inputs

    ours = load_r3(r3_hd64)
    plain = load_unrotated(r3_hd64)
    assert any(fused_mod.FUSED_ATTR in m.__dict__ for m in attention_layers(ours))
    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward",
                        llama_forward_changing(False, False, break_at=where))
    p_in, o_in = _decode_step_inputs(plain), _decode_step_inputs(ours)
    assert_compiled_step_is_plain(plain, ours, p_in, o_in)
    name = "cache" if "cache" in p_in else "past_key_values"
    tm.assert_keys_rotated(o_in[name], p_in[name], block=64)


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


# Scenarios from the review of session 8's traced hand-off (reverted): an arm in a plain
# global, matched by the call's ``cos`` tensor, let a later layer of the same forward take a
# left-over arm (every layer gets the same ``cos``), and let a frame dynamo resumed after a
# graph break run with another thread's cache view (dynamo folded the frame's locals into
# the global's contents). Whatever a future compile path does, these must hold.


def _tiny_llama(transform="random-hadamard", targets=None, seed=0, layers=2):
    """A tiny Llama (head_dim 32), plain and with R3 (``targets`` None: every layer)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from tests import tiny_models as tm

    cfg = LlamaConfig(**{**tm.COMMON, "hidden_size": 128, "head_dim": 32,
                         "num_hidden_layers": layers})
    torch.manual_seed(seed)
    plain = LlamaForCausalLM(cfg).eval()
    tm.boost_qk(plain)
    config = hf_hadamard_kq.default_r3_config(transform, targets=targets)
    return plain, hf_hadamard_kq.apply_r3(copy.deepcopy(plain), config, seed=0)


def _new_keys(inputs, layer):
    """The key the decode step wrote (position 7) into ``layer`` of its static cache."""
    from tests import tiny_models as tm

    cache = inputs["cache"] if "cache" in inputs else inputs["past_key_values"]
    return tm.cache_keys(cache)[layer][:, :, 7].double()


def _key_matrix(model, layer):
    """The float64 matrix ``layer``'s keys are rotated by: its stored matrix, or (no stored
    matrix) compressed-tensors' Sylvester matrix, times the rotation's scale."""
    from hf_hadamard_kq.specs import SLOT_ATTR, SPECS
    from tests.reference import ct_hadamard

    attn = attention_layers(model)[layer]
    rotation = SPECS[attn.__dict__[SLOT_ATTR]].k
    if rotation.buffer is None:
        return ct_hadamard(rotation.block) * rotation.scale
    return attn._buffers[rotation.buffer].double() * rotation.scale


@pytest.mark.parametrize("rotated", ["layer0_only", "layer1_drops_kwargs"])
def test_compiled_later_layer_is_not_rotated_by_an_earlier_layers_call(monkeypatch, rotated):
    """Layer 0's attention forward runs eagerly inside a compiled step (dynamo gives it up:
    ``torch.compiler.disable``), layer 1 runs compiled with the same ``cos``. Layer 1 must get
    exactly its own rotation: none when the plan rotates layer 0 only; one (not two) when it is
    rotated but its forward drops extra keyword arguments (random-hadamard: a double rotation
    is visible, H·H = I would hide it)."""
    import functools

    from tests.test_compile_offload_autograd import _decode_step_inputs

    if rotated == "layer0_only":
        plain, ours = _tiny_llama("hadamard", targets=[r"re:.*layers\.0\.self_attn$"])
    else:
        original = modeling_llama.LlamaAttention.forward

        @functools.wraps(original)
        def forward(self, *args, **kwargs):
            if self.layer_idx == 1:
                kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_hkq")}
            return original(self, *args, **kwargs)

        monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", forward)
        plain, ours = _tiny_llama("random-hadamard")
    layer0 = attention_layers(ours)[0]
    layer0.forward = torch.compiler.disable(layer0.forward)
    p_in, o_in = _decode_step_inputs(plain), _decode_step_inputs(ours)
    assert_compiled_step_is_plain(plain, ours, p_in, o_in)
    k_ours, k_plain = _new_keys(o_in, 1), _new_keys(p_in, 1)
    expected = k_plain if rotated == "layer0_only" else k_plain @ _key_matrix(ours, 1)
    assert (k_ours - expected).abs().max() < 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("transform", ["random-hadamard", "hadamard"])
def test_compiled_steps_in_two_threads_with_a_graph_break_before_rope(monkeypatch, transform):
    """One installed model serves two requests in two threads; its compiled attention forward
    graph-breaks before RoPE, and thread A waits at that break until thread B has run its
    layer-0 pre-hook and reached the same break. Each thread's logits equal the plain model's
    and each cache gets its own key at the step's position, rotated once. ``random-hadamard``
    (a stored matrix: a double rotation shows) takes the general path under compile,
    ``hadamard`` the marked route (fused.py, "Under torch.compile")."""
    import threading

    from hf_hadamard_kq.specs import SLOT_ATTR, SPECS
    from tests.test_compile_offload_autograd import _decode_step_inputs

    plain, ours = _tiny_llama(transform)
    marked = [SPECS[m.__dict__[SLOT_ATTR]].traced for m in attention_layers(ours)]
    assert marked == [transform == "hadamard"] * 2
    a_at, b_at, a_done = threading.Event(), threading.Event(), threading.Event()
    local = threading.local()

    @torch.compiler.disable
    def sync_point(layer_idx):  # a graph break that orders the two threads
        if not getattr(local, "on", False) or layer_idx != 0:
            return
        local.on = False
        if threading.current_thread().name == "A":
            a_at.set()
            b_at.wait(30)
        else:
            b_at.set()
            a_done.wait(30)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        sync_point(self.layer_idx)
        q, k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attend = modeling_llama.ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, weights = attend(self, q, k, v, attention_mask, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1)), weights

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", forward)
    w = _key_matrix(ours, 0)
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="eager")
    results = {}

    def run(name):
        p_in, o_in = _decode_step_inputs(plain), _decode_step_inputs(ours)
        try:
            with torch.no_grad():
                want = plain(**p_in).logits
                local.on = True
                got = compiled(**o_in).logits
            results[name] = ((got - want).abs().max().item(), _new_keys(o_in, 0),
                             _new_keys(p_in, 0))
        except Exception as exc:  # reported by the assertion below
            results[name] = (exc, None, None)
        finally:
            if name == "A":
                a_done.set()

    try:
        for _ in range(2):  # compile every frame in this thread first
            with torch.no_grad():
                p_in, o_in = _decode_step_inputs(plain), _decode_step_inputs(ours)
                assert (compiled(**o_in).logits - plain(**p_in).logits).abs().max() < ATOL
        thread_a = threading.Thread(target=run, name="A", args=("A",))
        thread_b = threading.Thread(target=run, name="B", args=("B",))
        thread_a.start()
        assert a_at.wait(30)
        thread_b.start()
        thread_a.join(60)
        thread_b.join(60)
    finally:
        torch._dynamo.reset()
    for name in ("A", "B"):
        diff, k_ours, k_plain = results[name]
        assert not isinstance(diff, Exception), (name, diff)
        assert diff < ATOL, name
        assert (k_ours - k_plain @ w).abs().max() < 1e-5 * max(1.0, k_plain.abs().max()), name
