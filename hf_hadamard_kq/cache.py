"""Rotate new keys *before* they reach the KV cache.

Why here and not in the attention function: transformers calls ``cache.update(k, v, layer)``
before the attention function, so the attention function only sees keys read back from the
cache. Rotating there would leave an unrotated cache (the whole point of R3 is a cache of
rotated keys, which quantizes better) and cost O(context) per decode step.

So a forward pre-hook on each matched attention module replaces the cache argument by a thin
per-call view whose ``update`` rotates only the new keys and forwards everything else to the
real cache. This composes with any cache class (dynamic, static, quantized, sliding, offloaded)
because the real cache still does all the storing. With ``use_cache=False`` (no cache) the
view stores nothing and only rotates, so the attention code's ``if cache is not None`` branch
is what delivers rotated keys in both cases.

Where the layer's RoPE call already rotated q and k (the fused path, fused.py), ``update``
receives exactly the tensor the RoPE wrapper returned and stores it as it is; any other key is
rotated here. Either way each key is rotated exactly once.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch
from transformers.cache_utils import StaticCache, StaticLayer

from . import fused as fused_mod
from .ops import forward_mode
from .ops.kv_store import kv_store
from .ops.op import hadamard_apply
from .plan import Rotation
from .specs import KV_QUANTIZER_ATTR, MARKERS, SLOT_ATTR, SPECS, LayerSpec, Markers, mark, unmark

#: Names the attention modules use for the cache argument (transformers 5.24 renamed
#: ``past_key_values`` to ``cache``; older releases use the old name; GPT-NeoX-style
#: attention calls it ``layer_past``).
CACHE_KWARGS = ("cache", "past_key_values", "layer_past")

#: Set by install.probe_pattern during its check forward; None otherwise (one global read
#: per update on the hot path).
PROBE = None

#: Set to 1 (before import) to keep transformers' own two cache writes in compiled static-cache
#: steps instead of the one-kernel ``kv_store`` (for A/B measurements; see :func:`_store_static`).
NO_KV_STORE_ENV = "HF_HADAMARD_KQ_NO_KV_STORE"


def _record(owner, event: str = "k_rotated") -> None:
    PROBE.events.append((event, PROBE.names.get(id(owner))))


def _rotate_key(key_states: torch.Tensor, rotation: Rotation, owner: Any) -> torch.Tensor:
    """The key to store: ``key_states`` itself when fused.py already rotated exactly this
    tensor at RoPE time for ``owner`` in this call, else its rotation."""
    if not torch.compiler.is_dynamo_compiling():
        state = fused_mod.STATE
        state.armed = None  # this layer's RoPE (if any) is over
        if state.done is owner:
            if key_states is state.k_out:
                state.k_out = None
                if PROBE is not None:
                    _record(owner, "k_fused")
                return key_states
            fused_mod.mismatch(owner, "key")
    if PROBE is not None:
        _record(owner)
    return rotate(key_states, rotation, owner)


def _marked_key(key_states: torch.Tensor, markers: Markers,
                owner: Any) -> tuple[torch.Tensor, bool]:
    """The key to store in a marked call (its ``cos`` was marked by the pre-hook): the RoPE
    wrapper's rotated output, unmarked, and whether the fused Q/K op made it (``k_op``).
    Anything else is a key that was replaced after RoPE or never went through it (fused.py,
    "Under torch.compile"): an error, never a guess."""
    kind = type(key_states)
    if kind is markers.k_op or kind is markers.k:
        if PROBE is not None:
            _record(owner, "k_marked")
        return unmark(key_states), kind is markers.k_op
    fused_mod.mismatch(owner, "key")  # raises, except while probing
    return unmark(key_states), False


def rotate(x: torch.Tensor, rotation: Rotation, module: Any) -> torch.Tensor:
    """Apply one planned rotation (validation was done at load).

    ``hadamard_apply`` is the custom op under autograd and (for large tensors, or always
    with ``set_compile_rotation("op")``) under torch.compile, plain torch ops for small
    tensors under torch.compile (ops/native.py), and a direct call of the same
    implementation in plain eager inference (less host time per decode step).

    A stored matrix is read from ``module``'s non-persistent buffer (it follows the module's
    device and dtype); ``rotation.matrix`` (CPU) is only a fallback for a rotation that was
    never installed. ``rotation.cast`` (a scheme precision below fp32) rounds the input and
    the result to that precision, as compressed-tensors does.
    """
    name = rotation.buffer
    matrix = rotation.matrix if name is None else module._buffers[name]
    if rotation.cast is None:
        return hadamard_apply(x, rotation.scale, matrix, rotation.block)
    # not fusable: inductor would drop the two roundings to the scheme precision (ops/native.py)
    y = hadamard_apply(x.to(rotation.cast), rotation.scale, matrix, rotation.block, False)
    return y.to(x.dtype)


def _store_layer(layer: StaticLayer, key_states: torch.Tensor,
                 value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`_store_static` does in place of an initialized ``StaticLayer.update`` (and
    what :func:`_store_check` compares with it): one ``kv_store`` at ``cumulative_length``,
    read before it advances, as the layer itself does."""
    keys, values = layer.keys, layer.values
    kv_store(keys, values, key_states, value_states, layer.cumulative_length)
    layer.cumulative_length.add_(key_states.shape[-2])
    return keys, values


def _store_check() -> bool:
    """Whether ``StaticLayer.update`` still does what :func:`_store_static` does in its place:
    run both on a small CPU cache (two updates, of 3 and 1 positions) and compare the keys, the
    values and ``cumulative_length``. Why: the replacement reads the layer's attributes, so a
    transformers release that changed the layer's bookkeeping must turn it off rather than
    write elsewhere; checked once, at import. A failed check warns (the steps stay correct,
    with one more kernel per layer), unless :data:`NO_KV_STORE_ENV` turned the store off."""
    if os.environ.get(NO_KV_STORE_ENV) == "1":
        return False
    gen = torch.Generator().manual_seed(0)
    theirs, ours = StaticLayer(max_cache_len=6), StaticLayer(max_cache_len=6)
    try:
        for length in (3, 1):
            k = torch.randn(2, 3, length, 4, generator=gen)
            v = torch.randn(2, 3, length, 5, generator=gen)
            theirs.update(k, v)
            if not ours.is_initialized:
                ours.update(k, v)
                continue
            _store_layer(ours, k, v)
        same = (
            torch.equal(theirs.keys, ours.keys)
            and torch.equal(theirs.values, ours.values)
            and int(theirs.cumulative_length) == int(ours.cumulative_length) == 4
        )
        why = "its keys, values or cumulative_length differ from the one-kernel store's"
    except Exception as err:  # an attribute this module reads is gone
        same, why = False, f"{type(err).__name__}: {err}"
    if not same:
        warnings.warn(
            "hf_hadamard_kq: transformers' StaticLayer.update no longer matches the one-kernel "
            f"key/value store of compiled static-cache steps ({why}), so they keep "
            "StaticLayer.update (same results, one more kernel per layer); set "
            f"{NO_KV_STORE_ENV}=1 to silence this", RuntimeWarning, stacklevel=2)
    return same


#: Whether compiled static-cache steps write keys and values with ``kv_store`` (see
#: :func:`_store_static`); False when :data:`NO_KV_STORE_ENV` is set or the check fails.
KV_STORE: bool = _store_check()


def _store_static(cache: Any, key_states: torch.Tensor, value_states: torch.Tensor,
                  args: tuple, kwargs: dict) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``cache.update(key_states, value_states, layer_idx)`` for an initialized layer of a
    plain :class:`StaticCache` in a traced (marked) call, with one ``kv_store`` kernel instead
    of the layer's two ``index_copy_`` (ops/kv_store.py says why); None for anything else
    (the caller then calls the cache's own ``update``).

    The caller uses it only for a key the fused Q/K op made (the ``k_op`` marker): a key
    rotated in plain torch ops (the ``native`` form) is left to the layer's own write, which
    inductor can fuse the rotation into. Exact classes only: a subclass may store
    differently (the sliding-window layers' rolling slots); offloading moves layers between
    devices around the update; and a key or value that needs a gradient, or any while a
    forward-mode AD level is open, keeps the layer's ``index_copy_`` (the op has no autograd
    formula).
    """
    if not KV_STORE or type(cache) is not StaticCache:
        return None
    # the op has no autograd: a value (or key) that needs a gradient, or may carry a
    # forward-mode tangent, keeps index_copy_'s
    if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
        return None
    if forward_mode.level_open():
        return None
    layer_idx = args[0] if args else kwargs.get("layer_idx")
    if type(layer_idx) is not int or cache.offloading:
        return None
    layer = cache.layers[layer_idx]
    if type(layer) is not StaticLayer or not layer.is_initialized:
        return None
    return _store_layer(layer, key_states, value_states)


class RotatingCacheView:
    """Stands in for the real cache during one attention call; rotates keys on update."""

    # "__dict__": dynamo, resuming after a graph break inside the attention module, guards on
    # the cache argument's __dict__ (without one, compile failed: "getattr failed on source
    # kwargs['cache'].__dict__"); the attributes themselves stay slots.
    __slots__ = ("__dict__", "__weakref__", "_hkq_cache", "_hkq_marked", "_hkq_owner",
                 "_hkq_rotation")

    def __init__(self, cache: Any, rotation: Rotation, owner: Any,
                 marked: Optional[Markers] = None) -> None:
        self._hkq_cache = cache
        self._hkq_rotation = rotation
        self._hkq_owner = owner
        self._hkq_marked = marked  # this call's cos was marked (fused.py)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        marked = self._hkq_marked
        if marked is not None:
            key_states, from_op = _marked_key(key_states, marked, self._hkq_owner)
            stored = (_store_static(self._hkq_cache, key_states, value_states, args, kwargs)
                      if from_op else None)
            if stored is None:
                stored = self._hkq_cache.update(key_states, value_states, *args, **kwargs)
            keys, values = stored
            return mark(keys, marked.keys), values
        key_states = _rotate_key(key_states, self._hkq_rotation, self._hkq_owner)
        return self._hkq_cache.update(key_states, value_states, *args, **kwargs)

    def __getattr__(self, name: str):
        # Guard: __slots__ attributes missing (e.g. during copy/pickle or dynamo's probing)
        # must not recurse into __getattr__ forever.
        if name.startswith("_hkq_"):
            raise AttributeError(name)
        return getattr(self._hkq_cache, name)

    def __len__(self) -> int:
        return len(self._hkq_cache)


class RotateOnlyCache:
    """Used when the model runs without a cache: ``update`` rotates keys and stores nothing."""

    __slots__ = ("__dict__", "__weakref__", "_hkq_marked", "_hkq_owner", "_hkq_rotation")

    def __init__(self, rotation: Rotation, owner: Any, marked: Optional[Markers] = None) -> None:
        self._hkq_rotation = rotation
        self._hkq_owner = owner
        self._hkq_marked = marked

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        marked = self._hkq_marked
        if marked is not None:
            key, _ = _marked_key(key_states, marked, self._hkq_owner)
            return mark(key, marked.keys), value_states
        return _rotate_key(key_states, self._hkq_rotation, self._hkq_owner), value_states

    def __getattr__(self, name: str):
        if name.startswith("_hkq_"):
            raise AttributeError(name)
        raise AttributeError(
            f"hf_hadamard_kq: the attention module read cache.{name} while running without a "
            "cache (use_cache=False); this architecture is not supported with use_cache=False, "
            "please report it"
        )


def _view_of(cache: Any, module: Any, spec: LayerSpec,
             marked: Optional[Markers] = None) -> Any:
    """What the module gets in place of ``cache``: the view that rotates new keys (wrapping
    our KV quantizer, if we attached one), or the quantizer alone for an unrotated layer."""
    if spec.kv_quant:
        quantizer = module.__dict__[KV_QUANTIZER_ATTR]
        quantizer.add_past_key_values(cache)
        cache = quantizer
    if spec.k is None:
        return cache
    if cache is None:
        return RotateOnlyCache(spec.k, module, marked)
    return RotatingCacheView(cache, spec.k, module, marked)


def key_rotation_pre_hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The forward pre-hook (``with_kwargs=True``) of every attention module whose keys we
    rotate or whose KV cache we quantize: puts :func:`_view_of` in place of the cache.

    One function for all modules, reading the module's :class:`~.specs.LayerSpec` by slot
    (specs.py says why: fewer guards in compiled graphs).

    ``spec.kv_quant``: *we* attached compressed-tensors' KV-cache quantization to this module
    (its ``QuantizedKVCache`` is in the module's ``KV_QUANTIZER_ATTR``; compressed-tensors
    cannot hook the ``cache`` kwarg of transformers >= 5.24 itself; see
    ``loading._attach_kv_cache_quantization``). The hook then
    does what compressed-tensors' own hook does (the quantizer wraps the real cache) and puts
    the key rotation outside it, so keys are rotated before they are quantized:
    ``view.update -> rotate K -> QuantizedKVCache (fake-quantize K, V) -> real cache``. Where
    compressed-tensors' own hook is active (transformers <= 5.17) our hook runs after it and
    wraps its quantizer the same way. ``spec.k`` None: quantizer only (an unrotated layer).
    """
    slot = module.__dict__[SLOT_ATTR]
    spec = SPECS[slot]
    marked = None
    # is_dynamo_compiling, not is_compiling: the latter is True in every thread while any
    # thread compiles (torch 2.13), which would send eager calls down the wrong branch
    if torch.compiler.is_dynamo_compiling():
        if spec.traced and fused_mod.wrapper_in_place(spec.home):
            marked = _mark_cos(kwargs, MARKERS[slot])
    elif spec.fused:
        # the load probe checks the marked route in eager code
        if fused_mod.MARK_EAGER and spec.traced and fused_mod.wrapper_in_place(spec.home):
            marked = _mark_cos(kwargs, MARKERS[slot])
        state = fused_mod.STATE
        state.armed = module if marked is None and fused_mod.FUSED_ATTR in module.__dict__ \
            else None
        state.done = state.q_out = state.k_out = None
    for name in CACHE_KWARGS:
        if name in kwargs:
            kwargs[name] = _view_of(kwargs[name], module, spec, marked)
            return args, kwargs
    index = spec.arg_index
    if index is not None and len(args) > index:
        args = (*args[:index], _view_of(args[index], module, spec, marked), *args[index + 1 :])
        return args, kwargs
    kwargs[spec.kwarg_name] = _view_of(None, module, spec, marked)
    return args, kwargs


def _mark_cos(kwargs: dict, markers: Markers) -> Optional[Markers]:
    """Mark the call's ``cos`` (``position_embeddings=(cos, sin)``) so that the RoPE wrapper
    rotates q and k and the cache view / attention function expect exactly its outputs
    (fused.py, "Under torch.compile"). None (the general path) when the call has no such
    keyword argument."""
    pair = kwargs.get("position_embeddings")
    if type(pair) is not tuple or len(pair) != 2 or type(pair[0]) is not torch.Tensor:
        return None
    kwargs["position_embeddings"] = (mark(pair[0], markers.cos), pair[1])
    return markers
