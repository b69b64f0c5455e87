"""A static cache layer's key and value writes as one op in compiled steps (ops/kv_store.py,
cache._store_static).

What must hold: a compiled static-cache decode step of a traced layer writes its new keys and
values with one ``kv_store`` node instead of the layer's two ``index_copy_``, and leaves the
cache exactly as transformers' own ``StaticLayer.update`` does (keys, values and
``cumulative_length``, over several steps); every other cache, layer or mode keeps the cache's
own ``update``; and a transformers whose ``StaticLayer.update`` no longer matches turns the
replacement off. The kernel itself is tested against ``index_copy_`` under the Triton
interpreter (tests/test_triton_interpret.py) and on the GPU (tests/test_gpu_fused.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers.cache_utils import DynamicCache, StaticCache, StaticLayer

from hf_hadamard_kq import cache as cache_mod
from hf_hadamard_kq.ops.kv_store import kv_store
from tests import tiny_models as tm
from tests.test_fused import _tiny_llama
from tests.test_traced import op_nodes

CACHE_LEN = 16


def _steps_inputs(model, steps: int):
    """A static cache after a 7-token prefill, and ``steps`` decode steps' inputs (greedy
    tokens taken from the plain eager model's own logits, so both arms feed the same ids)."""
    ids, mask = tm.prompt(seq=7)
    cache = StaticCache(config=model.config, max_cache_len=CACHE_LEN)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, **tm.with_cache(model, cache))
    inputs = []
    nxt = out.logits[:, -1:].argmax(-1)
    for i in range(steps):
        pos = 7 + i
        full = torch.cat([mask, torch.ones(mask.shape[0], i + 1, dtype=mask.dtype)], dim=1)
        full = torch.nn.functional.pad(full, (0, CACHE_LEN - full.shape[1]))
        inputs.append(dict(input_ids=nxt + i, attention_mask=full,
                           position_ids=torch.full((2, 1), pos),
                           cache_position=torch.tensor([pos])))
    return cache, inputs


def _compiled_steps(model, store: bool, monkeypatch, backend: str = "aot_eager"):
    """Two compiled decode steps; returns (cache, logits of each step, dynamo's graphs)."""
    monkeypatch.setattr(cache_mod, "KV_STORE", store)
    cache, steps = _steps_inputs(model, 2)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.aot_autograd import make_boxed_compiler

        def boxed(g, _):
            return g.forward

        return aot_autograd(fw_compiler=make_boxed_compiler(boxed))(gm, example_inputs)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=counting)
        with torch.no_grad():
            logits = [compiled(**s, **tm.with_cache(model, cache)).logits for s in steps]
    finally:
        torch._dynamo.reset()
    return cache, logits, graphs


def test_compiled_steps_write_the_cache_as_transformers_does(monkeypatch):
    """Through AOTAutograd's functionalization of the mutating op: two decode steps with
    ``kv_store`` leave keys, values and ``cumulative_length`` bit-identical to the same steps
    with the layer's own ``update``; the graph has one ``kv_store`` per layer and no
    ``index_copy``; and the keys are rotated (float64 reference) while the plain model's
    logits are kept."""
    plain, ours = _tiny_llama("hadamard")
    with_store, got, graphs = _compiled_steps(ours, True, monkeypatch)
    without, want, graphs_off = _compiled_steps(ours, False, monkeypatch)
    assert op_nodes(graphs, "kv_store") == 2 and op_nodes(graphs, "index_copy") == 0
    assert op_nodes(graphs_off, "kv_store") == 0 and op_nodes(graphs_off, "index_copy") == 4
    for a, b in zip(with_store.layers, without.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert int(a.cumulative_length) == int(b.cumulative_length) == 9
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    plain_cache, steps = _steps_inputs(plain, 2)
    with torch.no_grad():
        ref = [plain(**s, **tm.with_cache(plain, plain_cache)).logits for s in steps]
    for g, r in zip(got, ref):
        assert (g - r).abs().max() < 1e-5
    tm.assert_keys_rotated(with_store, plain_cache, block=32)
    assert torch.equal(with_store.layers[0].values, plain_cache.layers[0].values)


def test_a_key_in_plain_torch_ops_keeps_the_layers_own_write(monkeypatch):
    """With the ``native`` form the marked route rotates the key in plain torch ops, which
    inductor can fuse into the layer's own key write: no ``kv_store`` there (the ``k``
    marker, not ``k_op``), and the cache still ends up as with the op."""
    from tests.conftest import compile_rotation

    _, ours = _tiny_llama("hadamard")
    with compile_rotation("native"):
        native_cache, _, graphs = _compiled_steps(ours, True, monkeypatch)
    assert op_nodes(graphs, "kv_store") == 0 and op_nodes(graphs, "rope_rotate_qk") == 0
    assert op_nodes(graphs, "index_copy") == 4
    op_cache, _, graphs = _compiled_steps(ours, True, monkeypatch)
    assert op_nodes(graphs, "kv_store") == 2
    for a, b in zip(native_cache.layers, op_cache.layers):
        # (layer 1's inputs differ by layer 0's rounding between the two forms)
        assert (a.keys - b.keys).abs().max() < 1e-5 and (a.values - b.values).abs().max() < 1e-5


def _initialized_static(model, layers: int = 2) -> StaticCache:
    cache = StaticCache(config=model.config, max_cache_len=8)
    for i in range(layers):
        cache.update(torch.randn(2, 2, 3, 32), torch.randn(2, 2, 3, 32), i)
    return cache


def test_store_static_equals_the_caches_own_update():
    """Called directly (eager), on two copies of one initialized StaticCache: the same keys,
    values, returned tensors (the cache's own) and ``cumulative_length``."""
    _, ours = _tiny_llama("hadamard")
    torch.manual_seed(0)
    a = _initialized_static(ours)
    b = StaticCache(config=ours.config, max_cache_len=8)
    for i, layer in enumerate(a.layers):
        b.update(layer.keys[:, :, :3].clone(), layer.values[:, :, :3].clone(), i)
    k, v = torch.randn(2, 2, 2, 32), torch.randn(2, 2, 2, 32)
    got = cache_mod._store_static(a, k, v, (1,), {})
    want = b.update(k, v, 1)
    assert got is not None and got[0] is a.layers[1].keys and got[1] is a.layers[1].values
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert int(a.layers[1].cumulative_length) == int(b.layers[1].cumulative_length) == 5
    assert cache_mod._store_static(a, k, v, (), {"layer_idx": 0}) is not None  # keyword form


def test_store_static_leaves_other_caches_to_their_update(monkeypatch):
    """None (the cache's own ``update`` runs) for a dynamic cache, a StaticCache subclass,
    an offloading cache, a layer not yet initialized, a missing layer index, a sliding-window
    layer, a value that needs a gradient, an open forward-mode AD level and a failed
    self-check. Nothing is written in any of them."""
    _, ours = _tiny_llama("hadamard")
    k, v = torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32)

    class Sub(StaticCache):
        pass

    sub = Sub(config=ours.config, max_cache_len=8)
    sub.update(torch.randn(2, 2, 3, 32), torch.randn(2, 2, 3, 32), 0)
    offloading = _initialized_static(ours)
    offloading.offloading = True
    fresh = StaticCache(config=ours.config, max_cache_len=8)
    dynamic = DynamicCache()
    dynamic.update(torch.randn(2, 2, 3, 32), torch.randn(2, 2, 3, 32), 0)
    for cache in (dynamic, sub, offloading, fresh):
        before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers
                  if getattr(layer, "is_initialized", False)]
        assert cache_mod._store_static(cache, k, v, (0,), {}) is None, type(cache)
        after = [(layer.keys, layer.values) for layer in cache.layers
                 if getattr(layer, "is_initialized", False)]
        assert all(torch.equal(x, y) for p, q in zip(before, after) for x, y in zip(p, q))
    static = _initialized_static(ours)
    assert cache_mod._store_static(static, k, v, (), {}) is None  # no layer index
    # a sliding-window layer (rolling slots) of a StaticCache: layer 0 of a tiny Gemma2
    gemma = tm.base_model("gemma2").config
    sliding = StaticCache(config=gemma, max_cache_len=8)
    kg, vg = torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16)
    sliding.update(kg, vg, 0)
    assert type(sliding.layers[0]) is not StaticLayer
    before = sliding.layers[0].keys.clone()
    assert cache_mod._store_static(sliding, kg[:, :, :1], vg[:, :, :1], (0,), {}) is None
    assert torch.equal(sliding.layers[0].keys, before)
    # a value that needs a gradient (the op has no autograd): the layer's index_copy_ keeps it
    grad_v = torch.randn(2, 2, 1, 32, requires_grad=True)
    assert cache_mod._store_static(static, k, grad_v, (0,), {}) is None
    with torch.no_grad():
        assert cache_mod._store_static(static, k, grad_v, (0,), {}) is not None
    assert int(static.layers[0].cumulative_length) == 4
    # while a forward-mode AD level is open (kv_store has no forward formula: a dual's
    # tangent would not reach the cache), dual or not
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        for value in (v, fwAD.make_dual(v, torch.randn_like(v))):
            assert cache_mod._store_static(static, k, value, (0,), {}) is None
    assert int(static.layers[0].cumulative_length) == 4
    monkeypatch.setattr(cache_mod, "KV_STORE", False)
    assert cache_mod._store_static(static, k, v, (0,), {}) is None
    assert int(static.layers[0].cumulative_length) == 4


def test_self_check_turns_the_store_off_when_transformers_changes(monkeypatch):
    """``_store_check`` passes on this transformers, and fails -- with a warning, not
    silently -- when ``StaticLayer.update`` writes elsewhere or keeps its length under another
    name; it fails quietly when the environment variable asks for the cache's own writes."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache_mod._store_check() is True
    original = StaticLayer.update

    def shifted(self, key_states, value_states, *args, **kwargs):
        keys, values = original(self, key_states, value_states, *args, **kwargs)
        self.keys.copy_(self.keys.roll(1, dims=2))
        return keys, values

    monkeypatch.setattr(StaticLayer, "update", shifted)
    with pytest.warns(RuntimeWarning, match="differ from the one-kernel store"):
        assert cache_mod._store_check() is False
    monkeypatch.setattr(StaticLayer, "update", original)

    def renamed(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.cumulative_length = torch.tensor(0)
        pos = torch.arange(key_states.shape[-2]) + self.__dict__.setdefault("_n", 0)
        self._n += key_states.shape[-2]
        self.keys.index_copy_(2, pos, key_states)
        self.values.index_copy_(2, pos, value_states)
        return self.keys, self.values

    monkeypatch.setattr(StaticLayer, "update", renamed)
    with pytest.warns(RuntimeWarning, match="differ from the one-kernel store"):
        assert cache_mod._store_check() is False
    monkeypatch.setattr(StaticLayer, "update", original)
    monkeypatch.delattr(StaticLayer, "lazy_initialization")  # an attribute the store needs
    with pytest.warns(RuntimeWarning, match="AttributeError"):
        assert cache_mod._store_check() is False
    monkeypatch.undo()
    monkeypatch.setenv(cache_mod.NO_KV_STORE_ENV, "1")
    monkeypatch.setattr(StaticLayer, "update", shifted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache_mod._store_check() is False


def test_op_on_cpu_is_the_layers_index_copy():
    keys, values = torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 3)
    k, v = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 3)
    kv_store(keys, values, k, v, torch.tensor(3))
    assert torch.equal(keys[:, :, 3:5], k) and torch.equal(values[:, :, 3:5], v)
    assert not keys[:, :, :3].any() and not keys[:, :, 5:].any() and not values[:, :, 5:].any()
    with pytest.raises((IndexError, RuntimeError)):  # past the end: index_copy_'s own error
        kv_store(keys, values, k, v, torch.tensor(5))
