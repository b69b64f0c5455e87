"""The marked route (fused.py, "Under torch.compile"): traced fused layers rotate q and k at
RoPE time, and the hand-off to the cache view and the attention function travels in the
Python *types* of the call's own tensors (specs.Marker), never in shared state.

What must hold whatever dynamo does with the step (graph breaks, frames run eagerly, two
threads): every key is stored rotated exactly once and the logits equal the plain model's;
a key or query replaced after RoPE is an error, never a second rotation (two threads with a
graph break before RoPE: tests/test_fused.py, parametrized over both routes). Double rotations
are made visible with the cache check (deterministic Hadamard matrices are involutions, so
logits alone could hide them) or with stored random matrices where the route is off.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama import modeling_llama

import hf_hadamard_kq
from hf_hadamard_kq import fused as fused_mod
from hf_hadamard_kq.install import attention_modules, probe_marked
from hf_hadamard_kq.ops.qk_op import rope_once
from hf_hadamard_kq.specs import (
    MARKERS,
    SLOT_ATTR,
    SPECS,
    Markers,
    mark,
    marker_slot,
    unmark,
)
from tests import tiny_models as tm
from tests.oracles import rotate64
from tests.test_compile_offload_autograd import _decode_step_inputs
from tests.test_fused import (
    _new_keys,
    _tiny_llama,
    assert_compiled_step_is_plain,
    attention_layers,
    llama_forward_changing,
)

HEAD_DIM = 32  # _tiny_llama's: the fused op takes d >= 32, so the op itself runs here


def traced(model) -> list[bool]:
    return [SPECS[m.__dict__[SLOT_ATTR]].traced for m in attention_layers(model)]


def cache_of(inputs):
    return inputs["cache"] if "cache" in inputs else inputs["past_key_values"]


def compiled_step(model, inputs, backend="eager"):
    """One compiled decode step; returns (logits, graphs dynamo produced)."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            out = torch.compile(model, backend=counting if backend == "count" else backend)
            logits = out(**inputs).logits
    finally:
        torch._dynamo.reset()
    return logits, graphs


def op_nodes(graphs, name) -> int:
    return sum(name in str(n.target) for g in graphs for n in g.graph.nodes)


# ------------------------------------------------------------------------------------------
# The building blocks


def test_rope_rotate_qk_matches_float64():
    """The op's torch implementation: RoPE (fp32, rounded once) then the Sylvester rotation,
    against float64 RoPE and an explicit float64 Hadamard matrix."""
    from hf_hadamard_kq.ops.qk_op import rope_rotate_qk

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 64, generator=gen)
    k = torch.randn(2, 2, 5, 64, generator=gen)
    cos, sin = torch.randn(2, 5, 64, generator=gen), torch.randn(2, 5, 64, generator=gen)
    qo, ko = rope_rotate_qk(q, k, cos, sin, 64 ** -0.5, None)
    for x, got in ((q, qo), (k, ko)):
        want = rotate64(rope_once(x.double(), cos.double(), sin.double()), 64)
        assert (got.double() - want).abs().max() < 1e-5
        assert got.shape == x.shape and got.dtype == x.dtype


def test_markers_are_types_dynamo_guards():
    """What the route rests on: a compiled frame that branched on a marker's type is not
    reused for a plain tensor (nor the other way round), a marker survives a graph break and
    an eagerly run function, and any op on a marker returns a plain tensor."""
    markers = Markers.for_slot(-1)  # not in the table: only its types are used
    seen = []

    def consumer(y):
        if marker_slot(y) is not None:
            seen.append("marked")
            return unmark(y) + 1
        seen.append("plain")
        return y + 100

    x = torch.randn(4)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(consumer, backend="eager")
        assert torch.equal(compiled(mark(x, markers.k)), x + 1)
        assert torch.equal(compiled(x), x + 100)
        assert torch.equal(compiled(mark(x, markers.k)), x + 1)

        eager_consumer = torch.compiler.disable(consumer)

        def producer(x):
            y = mark(x * 2, markers.k)
            torch._dynamo.graph_break()
            return eager_consumer(y) + consumer(y * 1.0)

        seen.clear()
        got = torch.compile(producer, backend="eager")(x)
    finally:
        torch._dynamo.reset()
    assert seen == ["marked", "plain"]
    assert torch.allclose(got, (x * 2 + 1) + (x * 2 + 100))
    assert type(mark(x, markers.k) * 1.0) is torch.Tensor
    assert type(unmark(mark(x, markers.q))) is torch.Tensor


# ------------------------------------------------------------------------------------------
# The probe and the compiled step


def test_probe_gives_the_route_to_buffer_free_fused_layers():
    _, ours = _tiny_llama("hadamard")
    assert traced(ours) == [True, True]
    assert all(fused_mod.FUSED_ATTR in m.__dict__ for m in attention_layers(ours))
    _, stored = _tiny_llama("random-hadamard")  # a stored matrix per layer: not taken
    assert traced(stored) == [False, False]
    assert all(fused_mod.FUSED_ATTR in m.__dict__ for m in attention_layers(stored))


def test_compiled_step_is_one_graph_with_one_op_per_layer():
    """Static-cache decode step, compiled: one graph, the fused op once per layer and no
    single-tensor rotation; logits equal the plain model's; the cache holds the float64
    rotation of the plain model's keys."""
    plain, ours = _tiny_llama("hadamard")
    p_in, o_in = _decode_step_inputs(plain), _decode_step_inputs(ours)
    got, graphs = compiled_step(ours, o_in, backend="count")
    with torch.no_grad():
        want = plain(**p_in).logits
    assert len(graphs) == 1
    assert op_nodes(graphs, "rope_rotate_qk") == 2
    assert op_nodes(graphs, "hadamard_transform") == 0
    assert op_nodes(graphs, "kv_store") == 2 and op_nodes(graphs, "index_copy") == 0
    assert (got - want).abs().max() < 1e-5
    tm.assert_keys_rotated(cache_of(o_in), cache_of(p_in), block=HEAD_DIM)


def _top_level_args(text: str) -> list[str]:
    """The comma-separated arguments of a call's argument text, nested parentheses kept."""
    args, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
    return args + [text[start:].strip()]


def test_inductor_computes_cos_and_sin_once_for_every_layer():
    """With inductor, every layer's ``rope_rotate_qk`` reads the same ``cos`` and ``sin``
    buffers, and every layer's ``kv_store`` writes the cache in place. Why: under an
    exact-stride layout constraint inductor gave each op its own copy of the (cheap, not
    realized) RoPE table, one more kernel per two layers in the CUDA graph (BENCHMARKS.md,
    session 10); the op is tagged ``flexible_layout``. The logits and the keys are still
    checked, since the kernel now takes whatever layout inductor chooses."""
    import re

    from torch._inductor.utils import run_and_get_code

    plain, ours = _tiny_llama("hadamard", layers=3)
    p_in, o_in = _decode_step_inputs(plain), _decode_step_inputs(ours)
    torch._dynamo.reset()
    try:
        with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
            compiled = torch.compile(ours, backend="inductor")
            got, codes = run_and_get_code(lambda: compiled(**o_in).logits)
    finally:
        torch._dynamo.reset()
    code = "\n".join(codes)
    calls = re.findall(r"rope_rotate_qk\.default\((.*)\)", code)
    tables = {tuple(_top_level_args(args)[2:4]) for args in calls}
    assert len(calls) == 3 and len(tables) == 1, calls
    # the cache writes (ops/kv_store.py): one op per layer, writing the graph's input cache
    # tensors in place (inductor re-inplaced the functionalized mutation: no copy of a cache)
    stores = [_top_level_args(a) for a in re.findall(r"kv_store\.default\((.*)\)", code)]
    assert len(stores) == 3 and all(re.fullmatch(r"arg\d+_1", a[0]) and
                                    re.fullmatch(r"arg\d+_1", a[1]) for a in stores), stores
    assert "index_copy" not in code and ".copy_(" not in code
    with torch.no_grad():
        want = plain(**p_in).logits
    assert (got - want).abs().max() < 1e-5
    tm.assert_keys_rotated(cache_of(o_in), cache_of(p_in), block=HEAD_DIM)


@pytest.mark.parametrize("where", ["before_rope", "after_rope", "after_update"])
def test_graph_breaks_rotate_once(monkeypatch, where):
    """A graph break between the pre-hook, RoPE, the cache write and the attention function:
    the marked route still rotates once (the op ran: it is in a graph; after a break the two
    layers may share one compiled frame of the attention forward, so one node can serve
    both)."""
    plain, ours = _tiny_llama("hadamard")
    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward",
                        llama_forward_changing(False, False, break_at=where))
    p_in, o_in = _decode_step_inputs(plain), _decode_step_inputs(ours)
    got, graphs = compiled_step(ours, o_in, backend="count")
    with torch.no_grad():
        want = plain(**p_in).logits
    assert len(graphs) > 1 and op_nodes(graphs, "rope_rotate_qk") >= 1
    assert op_nodes(graphs, "hadamard_transform") == 0
    assert (got - want).abs().max() < 1e-5
    tm.assert_keys_rotated(cache_of(o_in), cache_of(p_in), block=HEAD_DIM)


@pytest.mark.parametrize("plan", ["layer0_only", "both"])
def test_layer_run_eagerly_inside_a_compiled_step(plan):
    """Layer 0's forward runs eagerly inside the compiled step (its marked cos reaches the
    eager wrapper); layer 1 runs compiled with the same cos tensor. Each layer gets exactly its
    own rotation (none for an unplanned layer)."""
    targets = [r"re:.*layers\.0\.self_attn$"] if plan == "layer0_only" else None
    plain, ours = _tiny_llama("hadamard", targets=targets)
    layer0 = attention_layers(ours)[0]
    layer0.forward = torch.compiler.disable(layer0.forward)
    p_in, o_in = _decode_step_inputs(plain), _decode_step_inputs(ours)
    assert_compiled_step_is_plain(plain, ours, p_in, o_in)
    for layer in (0, 1):
        k_ours, k_plain = _new_keys(o_in, layer), _new_keys(p_in, layer)
        want = k_plain if (plan == "layer0_only" and layer == 1) else rotate64(k_plain, HEAD_DIM)
        assert (k_ours - want).abs().max() < 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("what", ["key", "query"])
def test_tensor_replaced_after_rope_at_run_time_raises(monkeypatch, what):
    """The load probe saw the standard flow; later a call replaces the key or the query after
    RoPE (same values, new tensor: the marker is gone). Compiled, that is the mismatch error,
    not a second rotation."""
    _, ours = _tiny_llama("hadamard")
    assert traced(ours) == [True, True]
    o_in = _decode_step_inputs(ours)  # prefilled before the change
    changing = llama_forward_changing(what == "key", what == "query")
    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", changing)
    torch._dynamo.reset()
    try:
        with pytest.raises(Exception, match=f"changed the {what}"), torch.no_grad():
            torch.compile(ours, backend="eager")(**o_in)
    finally:
        torch._dynamo.reset()


def test_probe_withdraws_the_route_from_a_forward_that_makes_its_own_cos(monkeypatch):
    """A forward that ignores ``position_embeddings`` (computes cos/sin itself): its RoPE call
    never sees the marker, so the probe keeps the general path under compile for it, and the
    compiled step is still right (the cache check sees a missing or double rotation)."""
    import functools

    original = modeling_llama.LlamaAttention.forward

    @functools.wraps(original)  # the signature (where the cache goes) is the original's
    def forward(self, hidden_states, position_embeddings=None, *args, **kwargs):
        cos, sin = position_embeddings
        return original(self, hidden_states, (cos * 1.0, sin * 1.0), *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", forward)
    plain, ours = _tiny_llama("hadamard")
    assert traced(ours) == [False, False]
    assert all(fused_mod.FUSED_ATTR in m.__dict__ for m in attention_layers(ours))
    assert probe_marked(ours) == []
    p_in, o_in = _decode_step_inputs(plain), _decode_step_inputs(ours)
    got, graphs = compiled_step(ours, o_in, backend="count")
    assert op_nodes(graphs, "rope_rotate_qk") == 0
    with torch.no_grad():
        assert (got - plain(**p_in).logits).abs().max() < 1e-5
    tm.assert_keys_rotated(cache_of(o_in), cache_of(p_in), block=HEAD_DIM)


def test_every_architecture_compiled(compile_arch):
    """Every architecture of the matrix: the probe gives the route exactly to the fused
    layers without a stored matrix; a compiled prefill and decode give the plain logits and
    keys rotated once (head dim 16 here: the route's fallback, the model's RoPE and two
    rotations, runs instead of the op). ``--compile-archs representative`` narrows the
    sweep (conftest.py)."""
    name = compile_arch
    plain = tm.base_model(name)
    ours = tm.rotated(name)
    modules = list(attention_modules(ours).values())
    fused = [fused_mod.FUSED_ATTR in m.__dict__ for m in modules]
    assert [SPECS[m.__dict__[SLOT_ATTR]].traced for m in modules] == fused
    ids, mask = tm.prompt()
    want, c_plain = tm.prefill_and_decode(plain, ids, mask)
    torch._dynamo.reset()
    try:
        got, c_ours = tm.prefill_and_decode(torch.compile(ours, backend="eager"), ids, mask)
    finally:
        torch._dynamo.reset()
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-4
    tm.assert_keys_rotated(c_ours, c_plain)


def test_remove_r3_drops_the_markers():
    _, ours = _tiny_llama("hadamard")
    slots = {m.__dict__[SLOT_ATTR] for m in attention_layers(ours)}
    assert all(s in MARKERS for s in slots)
    hf_hadamard_kq.remove_r3(ours, "sdpa")
    import gc

    gc.collect()
    assert not any(s in MARKERS for s in slots)


# ------------------------------------------------------------------------------------------
# Found in the session-9 review


def test_eager_steps_ignore_another_threads_compile(monkeypatch):
    """``torch.compiler.is_compiling()`` is process-wide in torch 2.13: True in every thread
    while any thread compiles. Eager calls must not read it (the review measured 81 of 400
    eager steps rotated twice while another thread compiled: the flag turned True between
    the RoPE wrapper and cache.update / the attention function). Simulated here: the flag
    reads True in the key's and the query's rotation functions, False elsewhere."""
    import sys

    plain, ours = _tiny_llama("random-hadamard")
    p_in = _decode_step_inputs(plain)

    def is_compiling() -> bool:
        return sys._getframe(1).f_code.co_name in ("_rotate_key", "hadamard_kq_attention")

    monkeypatch.setattr(torch.compiler, "is_compiling", is_compiling)
    o_in = _decode_step_inputs(ours)  # the prefill also runs with the flag set
    with torch.no_grad():
        got, want = ours(**o_in).logits, plain(**p_in).logits
    assert (got - want).abs().max() < 1e-5
    from tests.test_fused import _key_matrix

    for layer in (0, 1):
        k_plain = _new_keys(p_in, layer)
        want_k = k_plain @ _key_matrix(ours, layer)
        assert (_new_keys(o_in, layer) - want_k).abs().max() < 1e-5 * max(
            1.0, want_k.abs().max().item())


def _rope_copy(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # what a kernel library installs
        return original(q, k, cos, sin, unsqueeze_dim)

    return apply_rotary_pos_emb


def test_rope_replaced_after_install_takes_the_general_path():
    """Code that replaces the modeling module's ``apply_rotary_pos_emb`` after install (an
    equivalent function): the compiled step no longer marks ``cos`` (that would reach a
    function that returns unmarked tensors) and runs the general path, rotating once."""
    plain, ours = _tiny_llama("hadamard")
    current = modeling_llama.apply_rotary_pos_emb
    # restored while ``ours`` is alive (its share of the wrapper is released when it goes)
    modeling_llama.apply_rotary_pos_emb = _rope_copy(getattr(current, fused_mod.ORIGINAL_ATTR))
    try:
        p_in, o_in = _decode_step_inputs(plain), _decode_step_inputs(ours)
        got, graphs = compiled_step(ours, o_in, backend="count")
    finally:
        modeling_llama.apply_rotary_pos_emb = current
    assert op_nodes(graphs, "rope_rotate_qk") == 0
    with torch.no_grad():
        assert (got - plain(**p_in).logits).abs().max() < 1e-5
    tm.assert_keys_rotated(cache_of(o_in), cache_of(p_in), block=HEAD_DIM)


def test_deep_copy_outliving_the_original_model():
    """A deep copy of an installed model keeps working under compile after the original was
    removed (its share of the RoPE wrapper released): plain logits, keys rotated once."""
    import copy
    import gc

    plain, ours = _tiny_llama("hadamard")
    twin = copy.deepcopy(ours)
    hf_hadamard_kq.remove_r3(ours, "sdpa")
    del ours
    gc.collect()
    p_in, o_in = _decode_step_inputs(plain), _decode_step_inputs(twin)
    got, _ = compiled_step(twin, o_in)
    with torch.no_grad():
        assert (got - plain(**p_in).logits).abs().max() < 1e-5
    tm.assert_keys_rotated(cache_of(o_in), cache_of(p_in), block=HEAD_DIM)


def test_probe_that_raises_leaves_no_layer_on_the_route(monkeypatch):
    """``probe_marked`` on its own (not inside install_plan, which removes the plan on an
    error): an exception during its forward leaves every layer off the route."""
    _, ours = _tiny_llama("hadamard")
    assert traced(ours) == [True, True]

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure in the probe forward")

    monkeypatch.setattr(attention_layers(ours)[1].o_proj, "forward", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        probe_marked(ours)
    assert traced(ours) == [False, False]
