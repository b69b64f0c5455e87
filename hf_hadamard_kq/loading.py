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
* R3 + KV-cache quantization: ``_process_model_before_weight_loading`` also gives the attention
  modules compressed-tensors' KV-cache quantizer where compressed-tensors could not attach it
  (transformers >= 5.24 passes the cache as ``cache``; see ``_attach_kv_cache_quantization``),
  removes the uninitialised ``q_scale`` it creates on <= 5.17 for the llm-compressor
  ``group_0`` artefact, and refuses real query quantization (``_check_attention_groups``).
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
from typing import Optional

import torch

from . import checkpoint as ckpt
from .attention import inner_backend
from .install import (
    KV_QUANTIZER_ATTR,
    attention_modules,
    check_architecture,
    install_plan,
    installed_plan,
)
from .plan import (
    HadamardKQConfigError,
    ModelPlan,
    build_plan,
    check_stored_tensor,
    has_r3,
    parse_transform_config,
    resolve_matrices,
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


def verify_stored_tensors(plan: ModelPlan, stored: dict[str, torch.Tensor]) -> None:
    """Check stored R3 tensors against the plan, each on its own (the plan is not changed).

    Loading goes further with :func:`hf_hadamard_kq.plan.resolve_matrices` (also: every
    needed random matrix / permutation present; the matrices attached to the rotations).
    """
    for name, tensor in stored.items():
        check_stored_tensor(plan, name, tensor)


# ------------------------------------------------------- KV-cache quantization (R3 + KV)


#: compressed-tensors' test for a KV-cached attention module (``is_cached_attention_module``):
#: "attention" in the class name, one of these projections, and a cache argument.
_KV_PROJECTIONS = ("k_proj", "v_proj", "qkv_proj", "kv_b_proj")


def _kv_cached_attention_names(model) -> list[str]:
    """Attention modules compressed-tensors gives (or, but for the ``cache`` kwarg name, would
    give) a KV-cache scheme."""
    return [
        name for name, module in attention_modules(model).items()
        if "attention" in type(module).__name__.lower()
        and any(hasattr(module, p) for p in _KV_PROJECTIONS)
    ]


def _check_attention_groups(model, ct_config, names: list[str], checkpoint: set) -> None:
    """Refuse quantization config groups that would quantize the *query* of a rotated layer.

    llm-compressor writes a KV-cache scheme also as a config group targeting the attention
    modules (``group_0``, input_activations == kv_cache_scheme) without a ``q_scale``;
    compressed-tensors (transformers <= 5.17) then fake-quantizes Q with an uninitialised
    scale. That artefact is accepted (Q is not quantized: there is no calibrated scale). Real
    query quantization (a stored ``q_scale``) is not run by hf_hadamard_kq yet.
    """
    from compressed_tensors.utils.match import match_named_modules

    kv_args = getattr(ct_config, "kv_cache_scheme", None)
    for group_name, group in (getattr(ct_config, "config_groups", None) or {}).items():
        matched = {
            n for n, _ in match_named_modules(model, group.targets, ct_config.ignore)
        } & set(names)
        if not matched:
            continue
        stored_q = sorted(n for n in matched if f"{n}.q_scale" in checkpoint)
        same_as_kv = kv_args is not None and group.input_activations == kv_args
        if stored_q or not same_as_kv:
            what = (f"stores '{stored_q[0]}.q_scale' (query quantization)" if stored_q
                    else "quantizes attention inputs with arguments other than kv_cache_scheme")
            raise HadamardKQConfigError(
                f"quantization config group '{group_name}' targets attention modules (e.g. "
                f"'{sorted(matched)[0]}') and {what}; hf_hadamard_kq runs R3 with KV-cache "
                "quantization (kv_cache_scheme, k_scale/v_scale) but not query/attention "
                "quantization yet. Load this checkpoint with compressed-tensors' runtime."
            )


def _drop_uninitialised_q_scales(model, names: list[str], checkpoint: set) -> None:
    """Remove the ``q_scale`` compressed-tensors created for Q quantization but the checkpoint
    does not store (transformers <= 5.17): it is uninitialised memory, it would be reported
    MISSING, and a re-save would write it. Q is not quantized (our attention replaces
    compressed-tensors' hooked attention)."""
    for name in names:
        module = model.get_submodule(name)
        for param in ("q_scale", "q_zero_point", "q_global_scale"):
            if param in module._parameters and f"{name}.{param}" not in checkpoint:
                del module._parameters[param]


def _attach_kv_cache_quantization(model, ct_config, names: list[str]) -> None:
    """Give attention modules the checkpoint's KV-cache quantization where compressed-tensors
    could not (version guard: only modules it left without a ``kv_cache`` quantizer).

    compressed-tensors 0.19/0.20 attach KV-cache quantization only to attention modules whose
    forward has a ``past_key_values`` argument (``is_cached_attention_module``), and its hook
    replaces that kwarg. transformers 5.24 renamed it ``cache``, so compressed-tensors silently
    skips KV quantization (``k_scale``/``v_scale`` load as UNEXPECTED). We do here what its
    ``_apply_kv_cache_scheme`` does, with its own objects: the scheme on the module, its
    ``QuantizedKVCache`` as ``kv_cache``, and the scales from its ``initialize_attn_qparams``
    (so they load from the checkpoint). The kwarg-aware hook that routes the cache through the
    quantizer is installed with the K rotation (``cache.key_rotation_pre_hook``). Once
    compressed-tensors handles ``cache`` itself, its ``kv_cache`` is found and nothing is done.
    """
    from compressed_tensors.modeling.kvcache import KV_CACHE_ATTR, QuantizedKVCache
    from compressed_tensors.quantization import QuantizationScheme, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.initialize import initialize_attn_qparams
    from compressed_tensors.quantization.utils.helpers import KV_CACHE_TARGETS

    kv_args = ct_config.kv_cache_scheme
    status = ct_config.quantization_status or QuantizationStatus.INITIALIZED
    text_config = model.config.get_text_config(decoder=True)
    for name in names:
        module = model.get_submodule(name)
        if KV_CACHE_ATTR in module._modules:
            continue  # compressed-tensors attached it (and hooks the cache kwarg) itself
        scheme = QuantizationScheme(targets=KV_CACHE_TARGETS.copy(), input_activations=kv_args)
        module.register_module(KV_CACHE_ATTR, QuantizedKVCache(text_config, module))
        initialize_attn_qparams(module, scheme, force_zero_point=False)
        module.quantization_scheme = scheme
        module.quantization_status = status
        module.__dict__[KV_QUANTIZER_ATTR] = module._modules[KV_CACHE_ATTR]


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
            check_architecture(model)  # names the class before any head_dim message
            plan = build_plan(model, tc)
            names = ckpt.tensor_files(kwargs.get("checkpoint_files") or [])
            stored = ckpt.read_tensors(names, ckpt.transform_tensor_names(names))
            resolve_matrices(plan, stored)
            ct_config = getattr(self.compressor, "quantization_config", None)
            if ct_config is not None:
                attn_names, stored_names = list(attention_modules(model)), set(names)
                _check_attention_groups(model, ct_config, attn_names, stored_names)
                _drop_uninitialised_q_scales(model, attn_names, stored_names)
                if ct_config.kv_cache_scheme is not None:
                    _attach_kv_cache_quantization(
                        model, ct_config, _kv_cached_attention_names(model))
            ignore = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or set()
            model._keys_to_ignore_on_load_unexpected = set(ignore) | _ignore_patterns(
                sorted(parse_transform_config(tc).config_groups)
            )
            self._hkq_plan, self._hkq_stored, self._hkq_requested = plan, stored, requested

        def update_weight_conversions(self, weight_conversions, *args, **kwargs):
            # R3-only checkpoints have no quantization config: compressed-tensors' expert
            # dequantize step (added to MoE merge converters) would read its None config_groups.
            if getattr(self.compressor, "quantization_config", None) is None:
                return list(weight_conversions)
            return super().update_weight_conversions(weight_conversions, *args, **kwargs)

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
