"""Put a ModelPlan on a model: attributes for the attention function, pre-hooks for keys.

Installation is all-or-nothing: everything that can fail is checked before the first
module is touched, and the probe (a 2-token forward that records where keys were rotated and
where the attention function ran) uninstalls everything before it raises.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Optional

import torch
from torch import nn

from . import cache as cache_mod
from .attention import EAGER_ATTR, PLAN_ATTR, model_eager_function
from .plan import HadamardKQConfigError, LayerPlan, ModelPlan

MODEL_PLAN_ATTR = "_hadamard_kq_model_plan"
MODEL_HOOKS_ATTR = "_hadamard_kq_hooks"
SKIP_PROBE_ENV = "HF_HADAMARD_KQ_SKIP_PROBE"


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
    parameter (every transformers decoder attention we know of does)."""
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "layer_idx") and _cache_param(module) is not None:
            found[name] = module
    return found


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


def install_plan(model: nn.Module, plan: ModelPlan, *, probe: bool = True) -> None:
    """Install ``plan`` on ``model`` (see module docstring for the guarantees)."""
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
    hooks = []
    for name, module in modules.items():
        module.__dict__[PLAN_ATTR] = plan.layers.get(name)
        if eager[name] is not None:
            module.__dict__[EAGER_ATTR] = eager[name]
    for name, layer in plan.layers.items():
        if layer.k is None:
            continue
        module = modules[name]
        kwarg, index = _cache_param(module)
        hook = cache_mod.make_key_pre_hook(layer.k, kwarg, index)
        hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))
    model.__dict__[MODEL_PLAN_ATTR] = plan
    model.__dict__[MODEL_HOOKS_ATTR] = hooks
    if probe and os.environ.get(SKIP_PROBE_ENV) != "1":
        try:
            probe_pattern(model, plan)
        except Exception:
            remove_plan(model)
            raise


def remove_plan(model: nn.Module) -> None:
    """Undo install_plan: hooks removed, attributes deleted."""
    for hook in model.__dict__.pop(MODEL_HOOKS_ATTR, []):
        hook.remove()
    model.__dict__.pop(MODEL_PLAN_ATTR, None)
    for module in model.modules():
        module.__dict__.pop(PLAN_ATTR, None)
        module.__dict__.pop(EAGER_ATTR, None)


def installed_plan(model: nn.Module) -> Optional[ModelPlan]:
    """The plan installed on ``model`` or None."""
    return model.__dict__.get(MODEL_PLAN_ATTR)


class _Recorder:
    """Collects (event, layer) pairs during the probe forward."""

    def __init__(self, modules: dict[int, str]) -> None:
        self.names = modules
        self.events: list[tuple[str, str]] = []


def probe_pattern(model: nn.Module, plan: ModelPlan) -> None:
    """Run a 2-token forward and check each matched layer rotated its new keys on the way into
    the cache exactly once, *before* its attention function ran, and that the attention
    function ran (so the query was rotated). Raises naming the first layer that deviates.

    Why: a model whose attention does not follow proj -> RoPE -> cache.update -> attention
    would otherwise run with unrotated (or twice-rotated) keys without any visible error.
    """
    from transformers import DynamicCache

    from . import attention as attn_mod

    modules = attention_modules(model)
    ids = {id(m): n for n, m in modules.items()}
    recorder = _Recorder(ids)
    attn_mod.PROBE = recorder
    cache_mod.PROBE = recorder
    try:
        device = _input_device(model)
        input_ids = torch.tensor([[0, 1]], device=device)
        with torch.no_grad():
            for use_cache in (True, False):
                recorder.events.clear()
                kwargs: dict[str, Any] = {"use_cache": use_cache}
                if use_cache:
                    kwargs[_model_cache_kwarg(model)] = DynamicCache(config=model.config)
                model(input_ids=input_ids, **kwargs)
                _check_events(recorder.events, plan, modules, use_cache)
    finally:
        attn_mod.PROBE = None
        cache_mod.PROBE = None


def _model_cache_kwarg(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _input_device(model: nn.Module) -> torch.device:
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None and getattr(embed, "weight", None) is not None:
        if embed.weight.device.type != "meta":
            return embed.weight.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _check_events(events, plan: ModelPlan, modules, use_cache: bool) -> None:
    mode = f"use_cache={use_cache}"
    for name in modules:
        layer: Optional[LayerPlan] = plan.layers.get(name)
        mine = [e for e, n in events if n == name]
        attn_calls = mine.count("attention")
        if layer is None:
            continue
        if attn_calls != 1:
            raise HadamardKQConfigError(
                f"layer '{name}' ({type(modules[name]).__name__}): its attention function ran "
                f"{attn_calls} times in one forward ({mode}); hf_hadamard_kq supports attention "
                "that calls the attention interface once (proj -> RoPE -> cache.update -> "
                "attention)"
            )
        if layer.k is not None:
            expected = ["k_rotated", "attention"]
            if mine != expected:
                raise HadamardKQConfigError(
                    f"layer '{name}' ({type(modules[name]).__name__}) does not follow proj -> "
                    f"RoPE -> cache.update -> attention ({mode}): observed {mine}, expected "
                    f"{expected}; its keys would not be rotated exactly once before the cache. "
                    "This architecture is not supported."
                )
