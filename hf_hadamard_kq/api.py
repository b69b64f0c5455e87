"""Online R3 on an already-loaded model (no transform_config in its checkpoint)."""

from __future__ import annotations

import os
import re
from typing import Any, Optional, Union

import torch
from torch import nn

from .attention import inner_backend
from .checkpoint import write_r3_extras
from .install import (
    attention_modules,
    check_architecture,
    install_plan,
    installed_plan,
    remove_plan,
)
from .ops.matrices import sylvester
from .plan import (
    HadamardKQConfigError,
    ModelPlan,
    build_plan,
    model_head_dim,
    parse_transform_config,
    resolve_matrices,
)

#: llm-compressor's R3 target (SpinQuantModifier's default attention mapping).
DEFAULT_TARGET = "re:.*self_attn$"


def default_r3_config(
    transform_type: str = "hadamard",
    head_dim: Optional[int] = None,
    targets: Optional[list[str]] = None,
) -> dict[str, Any]:
    """The transform_config llm-compressor's SpinQuantModifier(rotations=["R3"]) writes.

    ``head_dim`` None means "the model's head_dim" to hf_hadamard_kq (compressed-tensors'
    runtime needs it set explicitly; apply_r3 fills it in). ``targets`` default to
    llm-compressor's ``["re:.*self_attn$"]``; :func:`r3_targets` gives the right ones for a
    model whose attention modules are named otherwise (GPT-NeoX: ``attention``).
    """
    targets = list(targets) if targets is not None else [DEFAULT_TARGET]
    return {
        "config_groups": {
            "R3": {
                "type": transform_type,
                "head_dim": head_dim,
                "randomize": False,
                "precision": "torch.float64",
                "apply": [
                    {"targets": list(targets), "location": "q_attn"},
                    {"targets": list(targets), "location": "k_cache"},
                ],
            }
        }
    }


def r3_targets(model: nn.Module) -> list[str]:
    """compressed-tensors targets that match exactly ``model``'s attention modules.

    Derived from the detected attention modules (the ones with ``layer_idx`` and a cache
    argument): one ``re:.*<last name component>$`` per distinct last component, which is
    llm-compressor's ``re:.*self_attn$`` for Llama-style models and ``re:.*attention$`` for
    GPT-NeoX. If such a pattern would also match a non-attention module, the exact module
    names are used instead, so the targets never select anything else.
    """
    from compressed_tensors.utils.match import match_named_modules

    check_architecture(model)
    modules = attention_modules(model)
    if not modules:
        raise HadamardKQConfigError(
            f"{type(model).__name__} has no attention module with a KV-cache argument; "
            "hf_hadamard_kq supports transformers decoder models"
        )
    leaves = sorted({name.rsplit(".", 1)[-1] for name in modules})
    targets = [f"re:.*{re.escape(leaf)}$" for leaf in leaves]
    matched = {name for name, _ in match_named_modules(model, targets)}
    return targets if matched == set(modules) else sorted(modules)


def generate_transform_tensors(
    model: nn.Module, plan: ModelPlan, seed: Optional[int] = None
) -> dict[str, torch.Tensor]:
    """The transform tensors compressed-tensors would create (and save) for ``plan``.

    Built by compressed-tensors' own factories (``TransformFactory.from_scheme(...,
    seed=seed)``, ``create_transform`` per matched module and location), so the matrices, the
    permutations, the inverses of random matrices and their sharing are exactly its; a tensor
    shared by several modules/locations is returned once, under the first owner in module
    order (as ``_register_tied_transform_weights`` + ``save_pretrained`` store it). With
    ``seed=None`` the generator has torch's default seed, as in ``apply_transform_config``.
    Groups of type ``hadamard`` without randomize need no tensor (Sylvester, built in-kernel).
    """
    from compressed_tensors.transform import TransformFactory
    from compressed_tensors.utils.match import match_named_modules

    config = parse_transform_config(plan.transform_config)
    owners: dict[str, list[tuple[str, Any]]] = {}  # module -> [(group_location, transform)]
    for group, scheme in config.config_groups.items():
        if scheme.type == "hadamard" and not scheme.randomize:
            continue
        blocks = {r.block for layer in plan.layers.values() for r in (layer.q, layer.k)
                  if r is not None and r.group == group}
        if scheme.head_dim is None and len(blocks) > 1:
            raise HadamardKQConfigError(
                f"transform group '{group}': head_dim is not set and the matched layers use "
                f"several sizes {sorted(blocks)}; set the scheme's head_dim"
            )
        if scheme.head_dim is None:  # compressed-tensors needs it for attention modules
            scheme = scheme.model_copy(update={"head_dim": blocks.pop()})
        factory = TransformFactory.from_scheme(scheme, name=group, seed=seed)
        for args in scheme.apply:
            for name, module in match_named_modules(model, args.targets, args.ignore):
                transform = factory.create_transform(module, args)
                owners.setdefault(name, []).append((f"{group}_{args.location}", transform))
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, _ in model.named_modules():
        for label, transform in owners.get(name, []):
            for key in ("weight", "perm"):
                param = getattr(transform, key, None)
                if param is None or id(param) in seen:
                    continue
                seen.add(id(param))
                tensors[f"{name}.{label}.{key}"] = param.detach().to("cpu").clone()
    return tensors


def apply_r3(
    model: nn.Module,
    transform_config: Optional[Union[dict, Any]] = None,
    *,
    attn_implementation: str = "hadamard_kq",
    seed: Optional[int] = None,
) -> nn.Module:
    """Rotate Q and K of ``model`` online, as an R3 checkpoint would, and return it.

    ``transform_config`` is a compressed-tensors TransformConfig (or its dict); by default the
    one llm-compressor writes for R3 with a deterministic Hadamard matrix of the model's
    head_dim, targeting the model's attention modules (:func:`r3_targets`).
    ``attn_implementation`` picks the inner backend ("hadamard_kq" = sdpa,
    "hadamard_kq_eager", "hadamard_kq_flex"). Random types (``random-hadamard``,
    ``random-matrix``, ``randomize=true``) get their matrices from compressed-tensors'
    factories with ``seed`` (:func:`generate_transform_tensors`); :func:`save_r3_pretrained`
    writes them.
    """
    if inner_backend(attn_implementation) is None:
        raise HadamardKQConfigError(
            f"attn_implementation={attn_implementation!r} is not a hadamard_kq implementation; "
            "use 'hadamard_kq', 'hadamard_kq_eager' or 'hadamard_kq_flex'"
        )
    check_architecture(model)  # before planning: name the class, not a symptom
    if transform_config is None:
        targets = r3_targets(model)
        head_dims = {model_head_dim(m, model.config) for m in attention_modules(model).values()}
        # one explicit head_dim when all layers agree (compressed-tensors' runtime needs it);
        # None (= each layer's own head_dim) otherwise
        head_dim = head_dims.pop() if len(head_dims) == 1 else None
        transform_config = default_r3_config(head_dim=head_dim, targets=targets)
    plan = build_plan(model, transform_config)
    resolve_matrices(plan, generate_transform_tensors(model, plan, seed))
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
    ``quantization_config.transform_config`` and the transform tensors in compressed-tensors'
    layout: the plan's generated tensors for random types (matrices, ``.perm``, inverses), and
    for ``hadamard`` the unnormalised Sylvester matrix once per group as
    ``<first module>.<group>_<location>.weight`` (float64), as llm-compressor does.
    The result loads with ``attn_implementation="hadamard_kq"`` and with compressed-tensors.
    """
    plan = installed_plan(model)
    if plan is None:
        raise HadamardKQConfigError("save_r3_pretrained: no R3 rotation is installed on model")
    model.save_pretrained(save_directory, **kwargs)
    tensors: dict[str, torch.Tensor] = dict(plan.tensors)
    seen_groups = _groups_of(tensors)
    for name, layer in plan.layers.items():
        for rotation in (layer.q, layer.k):
            if rotation is None or rotation.group in seen_groups:
                continue
            seen_groups.add(rotation.group)
            if rotation.matrix is None:  # deterministic: the Sylvester matrix, once per group
                matrix = sylvester(rotation.block, torch.float64, "cpu")
                tensors[f"{name}.{rotation.group}_{rotation.location}.weight"] = matrix
    write_r3_extras(save_directory, plan.transform_config, tensors)


def _groups_of(tensors: dict[str, torch.Tensor]) -> set[str]:
    from .checkpoint import TRANSFORM_KEY

    return {m["group"] for m in map(TRANSFORM_KEY.match, tensors) if m}
