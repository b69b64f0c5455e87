"""Online R3 on an already-loaded model (no transform_config in its checkpoint)."""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from torch import nn

from .attention import inner_backend
from .checkpoint import write_r3_extras
from .install import attention_modules, install_plan, installed_plan, remove_plan
from .ops.matrices import sylvester
from .plan import HadamardKQConfigError, build_plan, model_head_dim


def default_r3_config(
    transform_type: str = "hadamard", head_dim: Optional[int] = None
) -> dict[str, Any]:
    """The transform_config llm-compressor's SpinQuantModifier(rotations=["R3"]) writes.

    ``head_dim`` None means "the model's head_dim" to hf_hadamard_kq (compressed-tensors'
    runtime needs it set explicitly; apply_r3 fills it in).
    """
    return {
        "config_groups": {
            "R3": {
                "type": transform_type,
                "head_dim": head_dim,
                "randomize": False,
                "precision": "torch.float64",
                "apply": [
                    {"targets": ["re:.*self_attn$"], "location": "q_attn"},
                    {"targets": ["re:.*self_attn$"], "location": "k_cache"},
                ],
            }
        }
    }


def apply_r3(
    model: nn.Module,
    transform_config: Optional[Union[dict, Any]] = None,
    *,
    attn_implementation: str = "hadamard_kq",
) -> nn.Module:
    """Rotate Q and K of ``model`` online, as an R3 checkpoint would, and return it.

    ``transform_config`` is a compressed-tensors TransformConfig (or its dict); by default the
    one llm-compressor writes for R3 with a deterministic Hadamard matrix of the model's
    head_dim. ``attn_implementation`` picks the inner backend ("hadamard_kq" = sdpa,
    "hadamard_kq_eager", "hadamard_kq_flex").
    """
    if inner_backend(attn_implementation) is None:
        raise HadamardKQConfigError(
            f"attn_implementation={attn_implementation!r} is not a hadamard_kq implementation; "
            "use 'hadamard_kq', 'hadamard_kq_eager' or 'hadamard_kq_flex'"
        )
    modules = attention_modules(model)
    if not modules:
        raise HadamardKQConfigError(
            f"{type(model).__name__} has no attention module with a KV-cache argument; "
            "hf_hadamard_kq supports transformers decoder models"
        )
    if transform_config is None:
        head_dim = model_head_dim(next(iter(modules.values())), model.config)
        transform_config = default_r3_config(head_dim=head_dim)
    plan = build_plan(model, transform_config)
    previous = model.config._attn_implementation
    model.set_attn_implementation(attn_implementation)
    try:
        install_plan(model, plan)
    except Exception:
        model.set_attn_implementation(previous)
        raise
    return model


def remove_r3(model: nn.Module, attn_implementation: str = "sdpa") -> nn.Module:
    """Undo apply_r3 / a hadamard_kq load: no hooks, plain ``attn_implementation``."""
    remove_plan(model)
    model.set_attn_implementation(attn_implementation)
    return model


def save_r3_pretrained(model: nn.Module, save_directory: str | os.PathLike, **kwargs) -> None:
    """``save_pretrained`` plus the R3 parts, in the format llm-compressor writes.

    For a model rotated with :func:`apply_r3` (a model loaded from an R3 checkpoint keeps its
    transform_config and matrices through plain ``save_pretrained``): writes
    ``quantization_config.transform_config`` and, per transform group, the unnormalised matrix
    once as ``<first module>.<group>_<location>.weight`` (float64), as llm-compressor does.
    The result loads with ``attn_implementation="hadamard_kq"`` and with compressed-tensors.
    """
    plan = installed_plan(model)
    if plan is None:
        raise HadamardKQConfigError("save_r3_pretrained: no R3 rotation is installed on model")
    model.save_pretrained(save_directory, **kwargs)
    tensors: dict[str, torch.Tensor] = {}
    seen_groups = set()
    for name, layer in plan.layers.items():
        for rotation in (layer.q, layer.k):
            if rotation is None or rotation.group in seen_groups:
                continue
            seen_groups.add(rotation.group)
            matrix = (
                sylvester(rotation.block, torch.float64)
                if rotation.matrix is None
                else rotation.matrix.to(torch.float64)
            )
            tensors[f"{name}.{rotation.group}_{rotation.location}.weight"] = matrix
    write_r3_extras(save_directory, plan.transform_config, tensors)
