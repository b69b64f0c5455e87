"""The load hook: ``from_pretrained(path, attn_implementation="hadamard_kq")`` in one call.

Mechanism, and why (facts measured on transformers 5.17 and 5.24, compressed-tensors 0.19 and
0.20):

* transformers maps ``quant_method: "compressed-tensors"`` to one quantizer class through the
  plain dict ``transformers.quantizers.auto.AUTO_QUANTIZER_MAPPING``; there is no public
  plug-in point. We register a *subclass* of whatever class is registered there, so every
  compressed-tensors behaviour (weight quantization, KV-cache schemes, ``is_compileable``) is
  inherited through ``super()`` and only R3 is added.
* ``CompressedTensorsConfig`` silently drops ``transform_config`` (its pydantic model ignores
  extra keys), so neither the quantizer nor ``save_pretrained`` would ever see it. We wrap its
  ``__init__``/``to_dict`` in place to keep it (in place rather than a subclass, because
  transformers compares config classes by name when merging user-passed configs). The wrap
  is skipped if transformers ever accepts ``transform_config`` itself.
* ``_process_model_before_weight_loading`` runs after the model is built (on the meta device)
  and receives the resolved ``checkpoint_files``: there we build and validate the plan, read
  and verify the stored R3 tensors from the safetensors headers, and add them to the model's
  ``_keys_to_ignore_on_load_unexpected`` so loading drops them quietly. R3-only checkpoints
  (no quantization ``config_groups``) skip compressed-tensors' own hook, which crashes on them
  in transformers 5.17.
* ``_process_model_after_weight_loading`` installs the rotations (after compressed-tensors'
  KV-cache hooks, so keys are rotated before any KV quantizer sees them).
* ``get_state_dict_and_metadata`` puts the stored R3 tensors back on ``save_pretrained``.
* ``from_pretrained`` itself is wrapped only to turn "hadamard_kq requested but nothing was
  installed" (e.g. a checkpoint without transform_config) into an error at load time.
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings
from typing import Any, Optional

import torch

from . import checkpoint as ckpt
from .attention import inner_backend
from .install import install_plan, installed_plan
from .ops.matrices import sylvester
from .plan import (
    HadamardKQConfigError,
    ModelPlan,
    build_plan,
    has_r3,
    parse_transform_config,
)

_PATCHED_FLAG = "_hadamard_kq_patched"


def _patch_compressed_tensors_config() -> None:
    """Make CompressedTensorsConfig keep ``transform_config`` through load and save."""
    from transformers.utils.quantization_config import CompressedTensorsConfig

    if getattr(CompressedTensorsConfig, _PATCHED_FLAG, False):
        return
    if "transform_config" in inspect.signature(CompressedTensorsConfig.__init__).parameters:
        # transformers handles transform_config natively: the quantizer's double-rotation
        # check (TransformBase modules) protects us from rotating twice.
        setattr(CompressedTensorsConfig, _PATCHED_FLAG, True)
        return
    original_init = CompressedTensorsConfig.__init__
    original_to_dict = CompressedTensorsConfig.to_dict

    @functools.wraps(original_init)
    def __init__(self, *args, transform_config=None, **kwargs):
        original_init(self, *args, **kwargs)
        self.transform_config = (
            None if transform_config is None else parse_transform_config(transform_config)
        )

    @functools.wraps(original_to_dict)
    def to_dict(self):
        out = original_to_dict(self)
        tc = getattr(self, "transform_config", None)
        if tc is not None:
            out["transform_config"] = tc.model_dump(mode="json")
        return out

    CompressedTensorsConfig.__init__ = __init__
    CompressedTensorsConfig.to_dict = to_dict
    setattr(CompressedTensorsConfig, _PATCHED_FLAG, True)


def _stored_transform_tensors(checkpoint_files: Optional[list[str]]) -> dict[str, str]:
    """name -> file for every q_attn/k_cache transform tensor in the checkpoint's headers."""
    from safetensors import safe_open

    found: dict[str, str] = {}
    for file in checkpoint_files or []:
        if not str(file).endswith(".safetensors"):
            continue
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in ckpt.transform_tensor_names(f.keys()):
                found[name] = str(file)
    return found


def verify_stored_tensors(plan: ModelPlan, stored: dict[str, torch.Tensor]) -> None:
    """Every stored R3 tensor must belong to a planned rotation and equal its matrix."""
    for name, tensor in stored.items():
        m = ckpt.TRANSFORM_KEY.match(name)
        layer = plan.layers.get(m["module"]) if m else None
        slot = "q" if m and m["location"] == "q_attn" else "k"
        rotation = getattr(layer, slot) if layer is not None else None
        if rotation is None or rotation.group != m["group"]:
            raise HadamardKQConfigError(
                f"checkpoint tensor '{name}' is a {m['location'] if m else '?'} transform for a "
                "module/group that transform_config does not rotate; the checkpoint and its "
                "config.json disagree (re-export the checkpoint)"
            )
        if m["kind"] == "perm":
            raise HadamardKQConfigError(
                f"checkpoint tensor '{name}' is a permutation, but group '{rotation.group}' has "
                "randomize=false; the checkpoint and its config.json disagree"
            )
        expected = sylvester(rotation.block, torch.float64, "cpu")
        if tuple(tensor.shape) != tuple(expected.shape):
            raise HadamardKQConfigError(
                f"checkpoint tensor '{name}' has shape {tuple(tensor.shape)}, expected "
                f"{tuple(expected.shape)} for {rotation.transform_type} block {rotation.block}"
            )
        if not torch.equal(tensor.to(device="cpu", dtype=torch.float64), expected):
            diff = (tensor.to(device="cpu", dtype=torch.float64) - expected).abs().max().item()
            raise HadamardKQConfigError(
                f"checkpoint tensor '{name}' is not the unnormalised Sylvester Hadamard matrix "
                f"of size {rotation.block} that type '{rotation.transform_type}' means (max "
                f"difference {diff:.3g}); the checkpoint is corrupt or was written by a producer "
                "with other semantics. Refusing to load it with a different rotation."
            )


def _ignore_patterns(groups: list[str]) -> set[str]:
    return {rf"(^|\.){re.escape(g)}_(q_attn|k_cache)\.(weight|perm)$" for g in groups}


def _make_quantizer_class(base: type) -> type:
    class HadamardKQCompressedTensorsQuantizer(base):
        """compressed-tensors' quantizer plus online R3 (see hf_hadamard_kq.loading)."""

        _hadamard_kq_subclass = True

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self._hkq_plan: Optional[ModelPlan] = None
            self._hkq_stored: dict[str, torch.Tensor] = {}
            self._hkq_requested: Optional[str] = None
            tc = getattr(quantization_config, "transform_config", None)
            if tc is not None and getattr(quantization_config, "quantization_config", 1) is None:
                # transformers 5.17 forces dequantize for an R3-only config and then deletes
                # the whole quantization config after loading (losing transform_config).
                quantization_config.dequantize = False

        def _process_model_before_weight_loading(self, model, **kwargs):
            requested = model.config._attn_implementation  # before super(): CT may change it
            if getattr(self.compressor, "quantization_config", None) is not None:
                super()._process_model_before_weight_loading(model, **kwargs)
            tc = getattr(self.quantization_config, "transform_config", None)
            if tc is None or not has_r3(tc):
                return
            if inner_backend(requested) is None:
                warnings.warn(
                    "This checkpoint asks for SpinQuant-R3 rotations (transform_config with "
                    f"q_attn/k_cache) but was loaded with attn_implementation={requested!r}, "
                    "so Q/K are NOT rotated (its KV-cache scales, if any, were calibrated on "
                    "rotated keys). Load with attn_implementation='hadamard_kq' to apply them.",
                    UserWarning,
                    stacklevel=2,
                )
                return
            plan = build_plan(model, tc)
            files = _stored_transform_tensors(kwargs.get("checkpoint_files"))
            stored = ckpt.read_tensors(files, files.keys())
            verify_stored_tensors(plan, stored)
            ignore = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or set()
            model._keys_to_ignore_on_load_unexpected = set(ignore) | _ignore_patterns(
                sorted(parse_transform_config(tc).config_groups)
            )
            self._hkq_plan, self._hkq_stored, self._hkq_requested = plan, stored, requested

        def _process_model_after_weight_loading(self, model, **kwargs):
            result = super()._process_model_after_weight_loading(model, **kwargs)
            if self._hkq_plan is not None:
                if model.config._attn_implementation != self._hkq_requested:
                    # transformers 5.17 + a KV-cache scheme: compressed-tensors switched to its
                    # own hooked attention, which would also fake-quantize Q with a scale that
                    # R3+KV checkpoints do not store. Its K/V quantization hooks stay.
                    model.set_attn_implementation(self._hkq_requested)
                install_plan(model, self._hkq_plan)
            return result

        def get_state_dict_and_metadata(self, model):
            state_dict, metadata = super().get_state_dict_and_metadata(model)
            if not self._hkq_stored:
                return state_dict, metadata
            if state_dict is None:
                state_dict = model.state_dict()
            return {**state_dict, **self._hkq_stored}, metadata

    return HadamardKQCompressedTensorsQuantizer


def _patch_quantizer_registry() -> None:
    from transformers.quantizers import auto

    base = auto.AUTO_QUANTIZER_MAPPING["compressed-tensors"]
    if getattr(base, "_hadamard_kq_subclass", False):
        return
    auto.AUTO_QUANTIZER_MAPPING["compressed-tensors"] = _make_quantizer_class(base)


def _patch_from_pretrained() -> None:
    """Refuse, at load, a hadamard_kq request that installed nothing."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.from_pretrained.__func__
    if getattr(original, _PATCHED_FLAG, False):
        return

    @functools.wraps(original)
    def from_pretrained(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        loaded = model[0] if isinstance(model, tuple) else model
        impl = getattr(getattr(loaded, "config", None), "_attn_implementation", None)
        if inner_backend(impl) is not None and installed_plan(loaded) is None:
            raise HadamardKQConfigError(
                f"attn_implementation={impl!r} was requested, but this checkpoint has no "
                "quantization_config.transform_config with q_attn/k_cache transforms, so there "
                "is nothing to rotate. Load it with attn_implementation='sdpa' (or 'eager'), or "
                "add R3 rotations with hf_hadamard_kq.apply_r3(model) after loading."
            )
        return model

    setattr(from_pretrained, _PATCHED_FLAG, True)
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)


def patch_transformers() -> None:
    """Install every load-time hook (idempotent; called on import)."""
    _patch_compressed_tensors_config()
    _patch_quantizer_registry()
    _patch_from_pretrained()


def loaded_transform_config(model: Any) -> Optional[dict]:
    """The transform_config of an installed plan (for inspection and export)."""
    plan = installed_plan(model)
    return None if plan is None else plan.transform_config
