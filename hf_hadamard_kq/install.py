"""Put a ModelPlan on a model: attributes for the attention function, pre-hooks for keys.

Installation is all-or-nothing: everything that can fail is checked before the first
module is touched, and the probe (a 2-token forward that records where keys were rotated and
where the attention function ran) uninstalls everything before it raises.
"""

from __future__ import annotations

import inspect
import os
import weakref
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, Optional

import torch
from torch import nn

from . import cache as cache_mod
from . import fused as fused_mod
from . import specs as specs_mod
from .attention import EAGER_ATTR, model_eager_function
from .plan import HadamardKQConfigError, LayerPlan, ModelPlan
from .research import cache_kwarg
from .specs import KV_QUANTIZER_ATTR, LayerSpec

MODEL_PLAN_ATTR = "_hadamard_kq_model_plan"
MODEL_HOOKS_ATTR = "_hadamard_kq_hooks"
MODEL_PATCHED_ATTR = "_hadamard_kq_patched_modules"
SKIP_PROBE_ENV = "HF_HADAMARD_KQ_SKIP_PROBE"


#: Non-persistent buffers holding stored matrices: q only, k only, or one shared by both.
MATRIX_BUFFERS = {"q": "_hadamard_kq_q", "k": "_hadamard_kq_k", "qk": "_hadamard_kq_qk"}


def _cache_param(module: nn.Module) -> Optional[tuple[str, Optional[int]]]:
    """(name, positional index) of the forward's cache parameter, or None if it has none."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for name in cache_mod.CACHE_KWARGS:
        for index, param in enumerate(params):
            if param.name == name:
                positional = param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)
                return name, index if positional else None
    return None


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules the attention interface is called with: they carry ``layer_idx`` and a cache
    parameter (every transformers decoder attention we know of does).

    Some decoder *layers* carry both too (Gemma3, ...); they contain the attention module, so
    only the innermost candidates are kept.
    """
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "layer_idx") and _cache_param(module) is not None:
            found[name] = module
    outer = {n for n in found for m in found if m != n and m.startswith(n + ".")}
    return {n: m for n, m in found.items() if n not in outer}


def _refuse_double_rotation(model: nn.Module) -> None:
    """compressed-tensors (or transformers through it) may already rotate Q/K at runtime."""
    if MODEL_PLAN_ATTR in model.__dict__:
        raise HadamardKQConfigError(
            "hf_hadamard_kq rotations are already installed on this model; call "
            "hf_hadamard_kq.remove_r3(model) first to change them"
        )
    try:
        from compressed_tensors.transform.factory.base import TransformBase
    except ImportError:  # pragma: no cover - compressed-tensors is a dependency
        return
    for name, module in model.named_modules():
        if isinstance(module, TransformBase):
            raise HadamardKQConfigError(
                f"module '{name}' is a compressed-tensors transform ({type(module).__name__}): "
                "Q/K are already rotated at runtime by compressed-tensors/transformers. "
                "Refusing to rotate twice; load without attn_implementation='hadamard_kq'."
            )


#: Attention designs that do not cache one rotatable key per kv head and layer, recognised by
#: the config field that defines them (checked on the model config and its text config).
_OTHER_ATTENTION = (
    (
        lambda c: getattr(c, "is_encoder_decoder", False),
        "it is an encoder-decoder model (its decoder caches cross-attention keys computed from the "
        "encoder, and its encoder attention has no cache)",
    ),
    (
        lambda c: getattr(c, "kv_lora_rank", None),
        "it uses multi-head latent attention (MLA: keys and values are decompressed from a latent "
        "shared by all heads, which is what MLA runtimes cache; a per-head key rotation "
        "cannot be stored there)",
    ),
    (
        lambda c: getattr(c, "num_kv_shared_layers", 0),
        "it uses KV sharing (some layers reuse another layer's cached keys instead of writing "
        "their own)",
    ),
)


def check_architecture(model: nn.Module) -> None:
    """Refuse, naming the class, models whose attention is not proj -> RoPE -> cache.update
    -> attention with per-layer, per-kv-head keys. (The load probe catches other deviations
    at run time; these are known by their config and get a precise message.)"""
    config = getattr(model, "config", None)
    if config is None:
        return
    configs = [config]
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        configs.append(text)
    for predicate, what in _OTHER_ATTENTION:
        if any(predicate(c) for c in configs):
            raise HadamardKQConfigError(
                f"{type(model).__name__} is not supported by hf_hadamard_kq: {what}. "
                "hf_hadamard_kq supports decoder-only models whose attention follows proj -> "
                "(q/k norm) -> RoPE -> cache.update -> attention function."
            )


#: Inner backend -> transformers' capability flag on the model class (``_supports_sdpa`` is
#: False e.g. for Gemma2, whose attention logit softcapping sdpa cannot do).
_BACKEND_FLAGS = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn"}


def check_backend(model: nn.Module) -> None:
    """Refuse an inner backend the model class says it does not support, as transformers does
    for the plain names (our names bypass its check)."""
    from .attention import inner_backend

    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    flag = _BACKEND_FLAGS.get(inner_backend(impl) or "")
    if flag is not None and getattr(model, flag, True) is False:
        raise HadamardKQConfigError(
            f"{type(model).__name__} does not support {inner_backend(impl)} attention "
            f"(transformers' {flag} is False), so attn_implementation={impl!r} cannot run it. "
            "Use attn_implementation='hadamard_kq_eager' (the model's own eager attention)"
            + (" or 'hadamard_kq_flex'" if getattr(model, "_supports_flex_attn", False) else "")
            + "."
        )


def _module_device(module: nn.Module) -> torch.device:
    """Where the module computes: accelerate's execution device, else its parameters'."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if isinstance(device, int):  # accelerate gives a bare CUDA index
        return torch.device("cuda", device)
    if device is not None:
        return torch.device(device)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _module_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def _buffer_dtype(matrix: torch.Tensor, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the op can use without a per-call conversion (rotations with a ``cast``
    keep their matrix in that dtype instead).

    A matrix whose entries are exact in a 16-bit model dtype (every +-1 Hadamard matrix) is
    kept in that dtype: Triton then multiplies on tensor cores, exactly. Otherwise fp32 (the
    op accumulates in fp32), or fp64 for an fp64 model.
    """
    if model_dtype in (torch.float16, torch.bfloat16):
        if torch.equal(matrix.to(model_dtype).to(matrix.dtype), matrix):
            return model_dtype
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def _attach_matrices(module: nn.Module, layer: LayerPlan) -> None:
    """Register the layer's stored matrices as non-persistent buffers and name them in its
    rotations. The buffers follow ``.to()``, accelerate and ``model.half()`` like the
    compressed-tensors transform weights they replace; they are not saved (save_pretrained
    writes the checkpoint's tensors instead, see loading.py)."""
    q, k = layer.q, layer.k
    shared = q is not None and k is not None and q.matrix is not None and q.matrix is k.matrix
    device, dtype = _module_device(module), _module_dtype(module)
    for slot in ("q", "k"):
        rotation = getattr(layer, slot)
        if rotation is None:
            continue
        if rotation.matrix is None:
            setattr(layer, slot, replace(rotation, buffer=None))
            continue
        name = MATRIX_BUFFERS["qk" if shared else slot]
        if not (shared and slot == "k"):  # (a shared matrix is registered once, for q)
            matrix = rotation.matrix
            buffer_dtype = rotation.cast or _buffer_dtype(matrix, dtype)
            module.register_buffer(
                name, matrix.to(device=device, dtype=buffer_dtype).contiguous(), persistent=False
            )
        setattr(layer, slot, replace(rotation, buffer=name))


def kv_quantizer(module: nn.Module) -> Any:
    """compressed-tensors' KV-cache quantizer (``QuantizedKVCache``) of an attention module,
    if it has one with a quantization scheme (else None)."""
    wrapper = module._modules.get("kv_cache")
    scheme = getattr(module, "quantization_scheme", None)
    if wrapper is None or getattr(scheme, "input_activations", None) is None:
        return None
    return wrapper


def install_plan(model: nn.Module, plan: ModelPlan, *, probe: bool = True) -> None:
    """Install ``plan`` on ``model`` (see module docstring for the guarantees)."""
    check_architecture(model)
    check_backend(model)
    _refuse_double_rotation(model)
    modules = attention_modules(model)
    for name in plan.layers:
        if name not in modules:
            raise HadamardKQConfigError(
                f"transform targets matched '{name}' ({type(model.get_submodule(name)).__name__})"
                ", which is not an attention module with a KV cache argument; hf_hadamard_kq "
                "needs targets that match attention modules (e.g. 're:.*self_attn$')"
            )
    eager = {}
    for name, module in modules.items():
        try:
            eager[name] = model_eager_function(module)
        except HadamardKQConfigError:
            eager[name] = None
    patched: list[str] = []
    # released by remove_plan, or when the model is garbage-collected without it
    model.__dict__[MODEL_PATCHED_ATTR] = weakref.finalize(model, _release_patches, patched)
    hooks: list = []
    model.__dict__[MODEL_HOOKS_ATTR] = hooks  # filled as we go: remove_plan finds them all
    try:
        for name, module in modules.items():
            _install_module(module, name, plan.layers.get(name), eager[name], patched, hooks)
    except BaseException:
        remove_plan(model)  # nothing half-applied (a failure here is e.g. out of memory)
        raise
    model.__dict__[MODEL_PLAN_ATTR] = plan
    if probe and os.environ.get(SKIP_PROBE_ENV) != "1":
        try:
            # a probe that withdraws layers from the fused path stops there; those layers
            # now take the general path, so probe again until a whole probe withdraws nothing
            for _ in range(len(plan.layers) + 1):
                if not probe_pattern(model, plan):
                    break
            else:  # pragma: no cover - each round withdraws at least one layer
                raise HadamardKQConfigError("hf_hadamard_kq: the load probe did not settle")
            probe_marked(model)
        except Exception:
            remove_plan(model)
            raise


def _install_module(module: nn.Module, name: str, layer: Optional[LayerPlan],
                    eager: Optional[Any], patched: list[str], hooks: list) -> None:
    """One attention module: its matrices, eager function, slot, key pre-hook and (fused
    layers) the hand-off post-hook (fused.handoff_post_hook)."""
    if layer is not None:
        _attach_matrices(module, layer)
    if eager is not None:
        module.__dict__[EAGER_ATTR] = eager
    kv_quant = KV_QUANTIZER_ATTR in module.__dict__
    q = None if layer is None else layer.q
    k = None if layer is None else layer.k
    if k is None and not kv_quant:
        spec = LayerSpec(q, None)
    else:
        fused = _install_fused(module, name, layer, patched)
        kwarg, index = _cache_param(module)
        spec = LayerSpec(q, k, kwarg, index, kv_quant, fused)
    specs_mod.attach(module, spec)
    if spec.kwarg_name is not None:
        # Appended (runs after any earlier pre-hook): compressed-tensors' own KV-cache hook,
        # where it works, has then already put its quantizer in place of the cache, and our
        # view wraps it, so keys are rotated *before* they are quantized.
        hooks.append(module.register_forward_pre_hook(
            cache_mod.key_rotation_pre_hook, with_kwargs=True))
    if spec.fused:
        handle = module.register_forward_hook(fused_mod.handoff_post_hook)
        hooks.append(handle)
        module.__dict__[fused_mod.HANDOFF_HOOK_ATTR] = handle


def _install_fused(module: nn.Module, name: str, layer: Optional[LayerPlan],
                   patched: list[str]) -> bool:
    """Let the layer rotate Q and K at RoPE time (fused.py) where its plan allows it: one
    rotation shared by q and k (same scale, matrix and block, no precision cast), and its
    modeling module has an interceptable ``apply_rotary_pos_emb``."""
    if layer is None or os.environ.get(fused_mod.DISABLE_ENV) == "1":
        return False
    q, k = layer.q, layer.k
    if q is None or k is None or q.cast is not None or k.cast is not None:
        return False
    if q.scale != k.scale or q.block != k.block or q.buffer != k.buffer:
        return False
    if q.buffer is None and (q.matrix is not None or k.matrix is not None):
        return False
    module_name = type(module).__module__
    if module_name not in patched:
        if not fused_mod.patch_module(module_name):
            return False
        patched.append(module_name)
    module.__dict__[fused_mod.FUSED_ATTR] = fused_mod.FusedRotation(
        q.scale, q.buffer, q.block, name, module_name)
    return True


def _release_patches(patched: list[str]) -> None:
    for module_name in patched:
        fused_mod.unpatch_module(module_name)
    patched.clear()


def remove_plan(model: nn.Module) -> None:
    """Undo install_plan: hooks removed, attributes deleted, RoPE wrappers released."""
    for hook in model.__dict__.pop(MODEL_HOOKS_ATTR, []):
        hook.remove()
    release = model.__dict__.pop(MODEL_PATCHED_ATTR, None)
    if release is not None:
        release()  # a weakref.finalize: runs _release_patches once
    fused_mod.reset()
    model.__dict__.pop(MODEL_PLAN_ATTR, None)
    for module in model.modules():
        specs_mod.detach(module)
        module.__dict__.pop(EAGER_ATTR, None)
        module.__dict__.pop(fused_mod.FUSED_ATTR, None)
        module.__dict__.pop(fused_mod.HANDOFF_HOOK_ATTR, None)
        for name in MATRIX_BUFFERS.values():
            module._buffers.pop(name, None)


def installed_plan(model: nn.Module) -> Optional[ModelPlan]:
    """The plan installed on ``model`` or None."""
    return model.__dict__.get(MODEL_PLAN_ATTR)


#: Attention-function arguments an inner backend cannot apply. transformers <= 5.17's sdpa
#: silently ignores ``softcap`` (Gemma2 claims sdpa support there) and ``s_aux`` (attention
#: sinks): the probe refuses such a model instead of running it with different math.
_UNAPPLIED_KWARGS = {"sdpa": ("softcap", "s_aux")}


class _Recorder:
    """Collects (event, layer) pairs during the probe forward."""

    def __init__(self, modules: dict[int, str]) -> None:
        self.names = modules
        self.events: list[tuple[str, str]] = []
        self.unapplied: list[tuple[str, str, str, list[str]]] = []

    def attention(self, module: nn.Module, inner: str, kwargs: dict[str, Any]) -> None:
        """Called by the attention function (probe forward only)."""
        name = self.names.get(id(module))
        self.events.append(("attention", name))
        bad = [k for k in _UNAPPLIED_KWARGS.get(inner, ()) if kwargs.get(k) is not None]
        if bad:
            self.unapplied.append((name, type(module).__name__, inner, bad))


def probe_pattern(model: nn.Module, plan: ModelPlan) -> list[str]:
    """Run a 2-token forward and check each matched layer rotated its new keys on the way into
    the cache exactly once, *before* its attention function ran, and that the attention
    function ran (so the query was rotated). Raises naming the first layer that deviates.

    Why: a model whose attention does not follow proj -> RoPE -> cache.update -> attention
    would otherwise run with unrotated (or twice-rotated) keys without any visible error.

    Layers on the fused path (fused.py) must show ``rope`` (q and k rotated at RoPE time)
    then ``k_fused`` (that very key tensor reached the cache). A layer whose key or query was
    replaced between RoPE and the cache / attention function loses the fused path; their
    names are returned (the caller probes again: the general path must then pass).
    """

    from . import attention as attn_mod

    modules = attention_modules(model)
    ids = {id(m): n for n, m in modules.items()}
    recorder = _Recorder(ids)
    attn_mod.PROBE = recorder
    cache_mod.PROBE = recorder
    fused_mod.PROBE = recorder
    withdrawn: list[str] = []
    probe_hooks = []
    for name, module in modules.items():
        quantizer = kv_quantizer(module)
        if quantizer is not None:
            def record(_mod, _args, _kwargs, name=name):
                recorder.events.append(("kv_quant", name))
            probe_hooks.append(quantizer.register_forward_pre_hook(record, with_kwargs=True))
    try:
        fused_seen: set[str] = set()
        for use_cache in _probe_forwards(model, recorder):
            changed = _changed_after_rope(recorder.events)
            if changed:
                for name in changed:
                    _withdraw_fused(modules[name])
                withdrawn.extend(changed)
                return withdrawn
            _check_events(recorder.events, plan, modules, use_cache)
            fused_seen.update(n for e, n in recorder.events if e == "rope")
            if recorder.unapplied:
                name, cls, inner, bad = recorder.unapplied[0]
                raise HadamardKQConfigError(
                    f"layer '{name}' ({cls}) passes {', '.join(bad)} to the attention "
                    f"function, which the {inner} inner backend cannot apply (the model "
                    "would silently compute other attention). Use "
                    "attn_implementation='hadamard_kq_eager' (the model's own eager "
                    "attention) or 'hadamard_kq_flex'."
                )
        # layers whose RoPE call never qualified (no RoPE call, partial rotary, ...) take the
        # general path on every call: drop the fused marker (no arming, honest describe())
        for name, module in modules.items():
            if name not in fused_seen:
                _withdraw_fused(module)
    finally:
        attn_mod.PROBE = None
        cache_mod.PROBE = None
        fused_mod.PROBE = None
        fused_mod.reset()
        for handle in probe_hooks:
            handle.remove()
    return withdrawn


def _withdraw_fused(module: nn.Module) -> None:
    """The layer takes the general path from now on: no rotation at RoPE time, and no
    hand-off check after its forward (its post-hook would only cost host time and guards)."""
    module.__dict__.pop(fused_mod.FUSED_ATTR, None)
    handle = module.__dict__.pop(fused_mod.HANDOFF_HOOK_ATTR, None)
    if handle is not None:
        handle.remove()


def _set_traced(module: nn.Module, traced: bool) -> None:
    spec = specs_mod.SPECS[module.__dict__[specs_mod.SLOT_ATTR]]
    fused = module.__dict__.get(fused_mod.FUSED_ATTR)
    home = fused.home if traced and fused is not None else None
    if spec.traced != traced or spec.home != home:
        specs_mod.attach(module, replace(spec, traced=traced, home=home))


def probe_marked(model: nn.Module) -> list[str]:
    """Give the marked route (fused.py, "Under torch.compile") to the fused layers it works
    for, checked by running it: a 2-token forward with and without a cache in which the
    pre-hooks mark ``cos`` in eager code. A layer keeps the route only if, in both, its key
    reached the cache view and its query the attention function as the RoPE wrapper's
    markers; others (a tensor replaced after RoPE, no ``position_embeddings`` keyword, no
    RoPE call) keep the general path under torch.compile. Stored matrices are not taken
    (the wrapper reads the rotation from the shared table, not from the module). Returns
    the names of the layers that have the route."""

    from . import attention as attn_mod

    modules = attention_modules(model)
    candidates = {
        name: module for name, module in modules.items()
        if getattr(module.__dict__.get(fused_mod.FUSED_ATTR), "buffer", "") is None
    }
    for module in candidates.values():
        _set_traced(module, True)
    recorder = _Recorder({id(m): n for n, m in modules.items()})
    passed: set[str] = set()
    attn_mod.PROBE = cache_mod.PROBE = fused_mod.PROBE = recorder
    fused_mod.MARK_EAGER = True
    try:
        if candidates:
            seen = set(candidates)
            for _ in _probe_forwards(model, recorder):
                for name in candidates:
                    mine = [e for e, n in recorder.events if n == name]
                    if mine.count("k_marked") != 1 or mine.count("q_marked") != 1 or \
                            any(e.endswith("_changed") for e in mine):
                        seen.discard(name)
            passed = seen  # only after both forwards ran: an exception leaves none traced
    finally:
        fused_mod.MARK_EAGER = False
        attn_mod.PROBE = cache_mod.PROBE = fused_mod.PROBE = None
        fused_mod.reset()
        for name, module in candidates.items():
            if name not in passed:
                _set_traced(module, False)
    return sorted(passed)


def _probe_forwards(model: nn.Module, recorder: _Recorder) -> Iterator[bool]:
    """The probes' 2-token forwards, with a fresh DynamicCache and without a cache: yields
    ``use_cache`` after each, the recorder holding that forward's events only."""
    from transformers import DynamicCache

    input_ids = torch.tensor([[0, 1]], device=_input_device(model))
    for use_cache in (True, False):
        recorder.events.clear()
        kwargs: dict[str, Any] = {"use_cache": use_cache}
        if use_cache:
            kwargs[cache_kwarg(model)] = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=input_ids, **kwargs)
        yield use_cache


def _input_device(model: nn.Module) -> torch.device:
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None and getattr(embed, "weight", None) is not None:
        if embed.weight.device.type != "meta":
            return embed.weight.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _changed_after_rope(events) -> list[str]:
    """Layers whose key or query was replaced after being rotated at RoPE time."""
    return list(dict.fromkeys(n for e, n in events if e in ("key_changed", "query_changed")))


def _check_events(events, plan: ModelPlan, modules, use_cache: bool) -> None:
    mode = f"use_cache={use_cache}"
    for name, module in modules.items():
        layer: Optional[LayerPlan] = plan.layers.get(name)
        mine = [e for e, n in events if n == name]
        quantized = kv_quantizer(module) is not None
        if quantized and mine.count("kv_quant") != 1:
            raise HadamardKQConfigError(
                f"layer '{name}' ({type(module).__name__}): its KV-cache quantizer ran "
                f"{mine.count('kv_quant')} times in one forward ({mode}), expected once; the "
                "checkpoint's kv_cache_scheme would not be applied correctly"
            )
        if layer is None:
            continue
        attn_calls = mine.count("attention")
        if attn_calls != 1:
            raise HadamardKQConfigError(
                f"layer '{name}' ({type(module).__name__}): its attention function ran "
                f"{attn_calls} times in one forward ({mode}); hf_hadamard_kq supports attention "
                "that calls the attention interface once (proj -> RoPE -> cache.update -> "
                "attention)"
            )
        if layer.k is not None:
            first = ["rope", "k_fused"] if mine[:1] == ["rope"] else ["k_rotated"]
            expected = first + (["kv_quant", "attention"] if quantized else ["attention"])
            if mine != expected:
                raise HadamardKQConfigError(
                    f"layer '{name}' ({type(module).__name__}) does not follow proj -> "
                    f"RoPE -> cache.update -> attention ({mode}): observed {mine}, expected "
                    f"{expected}; its keys would not be rotated exactly once before the cache"
                    + (" (and before the KV-cache quantizer)" if quantized else "")
                    + ". This architecture is not supported."
                )
