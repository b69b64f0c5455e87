"""Independent references for the integration tests.

* ``hand_rotated_attention``: an attention function that rotates post-RoPE q and k in float64
  with compressed-tensors' explicit Hadamard matrix (block-diagonal), then runs eager math.
  No hf_hadamard_kq code is involved.
* ``ct_runtime_model``: compressed-tensors' own runtime transforms (``apply_transform_config``)
  on the unrotated checkpoint, with the checkpoint's stored transform tensors loaded into its
  (tied) transform parameters by name, as a compressed-tensors-aware loader would (random
  types cannot be regenerated). Its k_cache hook looks for the ``past_key_values`` kwarg; on
  transformers >= 5.24 attention takes ``cache`` (GPT-NeoX: ``layer_past``), so the hook would
  silently not fire. ``_teach_ct_cache_kwarg`` adapts only that kwarg name (the
  quantized-cache wrapper and the transform itself are compressed-tensors' code).
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from hf_hadamard_kq import checkpoint as ckpt
from tests.reference import ct_hadamard


class OpLog(TorchDispatchMode):
    """A dispatch mode that runs every op it sees and records its name: what a flop counter
    or tracer would see (``count(name)``: how many op names contain ``name``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def count(self, name: str) -> int:
        return sum(name in op for op in self.ops)


def rotate64(x: torch.Tensor, block: int) -> torch.Tensor:
    """x @ blockdiag(H_block)/sqrt(block) in float64, back to x's dtype."""
    d = x.shape[-1]
    h = ct_hadamard(block, x.device) / math.sqrt(block)
    y = x.to(torch.float64).reshape(*x.shape[:-1], d // block, block) @ h
    return y.reshape(x.shape).to(x.dtype)


def _hand_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    block = module._hand_block
    query, key = rotate64(query, block), rotate64(key, block)
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    w = (query @ key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    return (w @ value).transpose(1, 2).contiguous(), w


AttentionInterface.register("hand_rotated_test", _hand_attention)
AttentionMaskInterface.register("hand_rotated_test", eager_mask)


def with_cache(model, cache) -> dict:
    """The cache kwarg under the name this transformers version uses (5.24: cache)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def load_unrotated(path, attn_implementation: str = "sdpa", **kwargs):
    """The checkpoint's weights with plain sdpa, or the named transformers attention (our load
    hook warns that R3 is skipped)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            path, attn_implementation=attn_implementation, **kwargs)


def hand_rotated_model(path, block: int, **kwargs):
    model = load_unrotated(path, **kwargs)
    model.set_attn_implementation("hand_rotated_test")
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "q_proj"):
            module._hand_block = block
    return model


def _teach_ct_cache_kwarg() -> None:
    import compressed_tensors.modeling.kvcache as kvc

    if getattr(kvc._kv_cache_attention_hook, "_adapted", False):
        return
    original = kvc._kv_cache_attention_hook

    def hook(module, args, kwargs):
        params = inspect.signature(module.forward).parameters
        if "past_key_values" not in params:
            # transformers >= 5.24 names it ``cache``; GPT-NeoX-style attention ``layer_past``
            for name in ("cache", "layer_past"):
                if name in params:
                    wrapper = getattr(module, kvc.KV_CACHE_ATTR)
                    wrapper.add_past_key_values(kwargs.get(name))
                    kwargs[name] = wrapper
                    return args, kwargs
        return original(module, args, kwargs)

    hook._adapted = True
    kvc._kv_cache_attention_hook = hook


def load_stored_transforms(model, path) -> None:
    """Copy the checkpoint's ``*_q_attn|*_k_cache .weight|.perm`` tensors into the transform
    parameters compressed-tensors created. They are tied (one Parameter shared by every module
    and location of a slot), so copying into the stored name updates every user."""
    from pathlib import Path

    from safetensors import safe_open

    with torch.no_grad():
        for file in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    if ckpt.TRANSFORM_KEY.match(name):
                        model.get_parameter(name).copy_(f.get_tensor(name))


def ct_runtime_model(path, **kwargs):
    """The unrotated checkpoint with compressed-tensors' runtime R3 transforms applied."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    _teach_ct_cache_kwarg()
    model = load_unrotated(path, **kwargs)
    tc = ckpt.transform_config_of(ckpt.read_config(path))
    apply_transform_config(model, TransformConfig.model_validate(tc))
    load_stored_transforms(model, path)
    return model
