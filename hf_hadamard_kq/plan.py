"""transform_config -> which attention module rotates what, with every check in one place.

The plan is computed once, before anything is installed on the model, so that a config we
cannot run correctly fails as a whole (naming the group, the layer and the field) and the
model is never left half-rotated. Parsing and module matching are compressed-tensors' own
(pydantic ``TransformConfig`` and ``match_named_modules``), so "which layers" means exactly
what it means to the producer of the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from .ops.matrices import MAX_SYLVESTER_SIZE, is_power_of_two

Q_ATTN = "q_attn"
K_CACHE = "k_cache"
R3_LOCATIONS = (Q_ATTN, K_CACHE)


class HadamardKQConfigError(ValueError):
    """A transform_config (or stored matrix) that hf_hadamard_kq cannot run correctly."""


@dataclass(frozen=True)
class Rotation:
    """One online rotation: ``y = x_chunk @ W * scale`` over ``block``-sized chunks.

    ``matrix`` is None for the Sylvester matrix (built inside the kernel, never stored).
    """

    group: str
    location: str
    transform_type: str
    block: int
    scale: float
    matrix: Optional[torch.Tensor] = None
    inverse: bool = False
    precision: torch.dtype = torch.float32

    def describe(self) -> str:
        kind = "sylvester" if self.matrix is None else "stored matrix"
        inv = ", inverse" if self.inverse else ""
        return f"{self.transform_type} ({kind}{inv}), block {self.block}"


@dataclass
class LayerPlan:
    """What one matched attention module rotates."""

    name: str
    head_dim: int
    q: Optional[Rotation] = None
    k: Optional[Rotation] = None


@dataclass
class ModelPlan:
    """The whole model's rotations plus the config they came from (kept for save_pretrained)."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    transform_config: dict[str, Any] = field(default_factory=dict)


def parse_transform_config(raw: Union[dict, Any]):
    """Parse with compressed-tensors' pydantic model; re-raise as a readable error."""
    from compressed_tensors.transform import TransformConfig
    from pydantic import ValidationError

    if isinstance(raw, TransformConfig):
        return raw
    try:
        return TransformConfig.model_validate(raw)
    except ValidationError as exc:
        raise HadamardKQConfigError(
            f"quantization_config.transform_config is not a valid compressed-tensors "
            f"TransformConfig: {exc}"
        ) from exc


def transform_config_to_dict(config) -> dict[str, Any]:
    """JSON-ready dict of a TransformConfig, in the form config.json stores it."""
    return config.model_dump(mode="json")


def has_r3(raw: Optional[Union[dict, Any]]) -> bool:
    """True when a transform_config asks for any q_attn/k_cache rotation."""
    if raw is None:
        return False
    config = parse_transform_config(raw)
    return any(
        str(args.location) in R3_LOCATIONS
        for scheme in config.config_groups.values()
        for args in scheme.apply
    )


def model_head_dim(module: nn.Module, config: Any) -> int:
    """The attention module's head_dim, as the model computes it."""
    head_dim = getattr(module, "head_dim", None)
    if head_dim is None:
        head_dim = getattr(config, "head_dim", None)
    if head_dim is None:
        head_dim = config.hidden_size // config.num_attention_heads
    return int(head_dim)


def _location_str(location: Any) -> str:
    return getattr(location, "value", location)


def _check_scheme(group: str, scheme, location: str) -> None:
    """Refuse what this release cannot run yet; each message says what would work."""
    if scheme.type not in ("hadamard", "random-hadamard", "random-matrix"):
        raise HadamardKQConfigError(
            f"transform group '{group}': type '{scheme.type}' is unknown to hf_hadamard_kq "
            "(known: hadamard, random-hadamard, random-matrix)"
        )
    if scheme.type != "hadamard":
        raise HadamardKQConfigError(
            f"transform group '{group}' ({location}): type '{scheme.type}' is not supported "
            "yet; this release runs type 'hadamard' with randomize=false"
        )
    if scheme.randomize:
        raise HadamardKQConfigError(
            f"transform group '{group}' ({location}): randomize=true is not supported yet; "
            "this release runs type 'hadamard' with randomize=false"
        )


def _block_for(group: str, scheme, layer: str, head_dim: int) -> int:
    block = scheme.head_dim or head_dim
    if block > head_dim or head_dim % block != 0:
        raise HadamardKQConfigError(
            f"transform group '{group}': head_dim={scheme.head_dim} does not fit layer "
            f"'{layer}' whose head_dim is {head_dim}; set the scheme's head_dim to {head_dim} "
            "(or a divisor of it for a block-diagonal rotation)"
        )
    if scheme.type == "hadamard" and not is_power_of_two(block):
        raise HadamardKQConfigError(
            f"transform group '{group}': type 'hadamard' needs a power-of-two size but layer "
            f"'{layer}' uses {block}; use type 'random-hadamard' for this head_dim"
        )
    if block > MAX_SYLVESTER_SIZE:
        raise HadamardKQConfigError(
            f"transform group '{group}': size {block} exceeds the maximum {MAX_SYLVESTER_SIZE}"
        )
    return block


def build_plan(model: nn.Module, transform_config: Union[dict, Any]) -> ModelPlan:
    """Resolve every q_attn/k_cache TransformArgs to the attention modules it matches.

    Raises HadamardKQConfigError for anything that cannot be run exactly (non-R3 online
    locations, unsupported types, head_dim mismatch, two transforms at one location, a target
    that matches no module), before the model is modified.
    """
    from compressed_tensors.utils.match import match_named_modules

    config = parse_transform_config(transform_config)
    model_config = getattr(model, "config", None)
    plan = ModelPlan(transform_config=transform_config_to_dict(config))
    for group, scheme in config.config_groups.items():
        for args in scheme.apply:
            location = _location_str(args.location)
            if location not in R3_LOCATIONS:
                raise HadamardKQConfigError(
                    f"transform group '{group}' applies at location '{location}' "
                    f"(targets {args.targets}); hf_hadamard_kq runs only the online attention "
                    "rotations q_attn and k_cache (SpinQuant R3). Fuse other rotations into "
                    "the weights, or run this checkpoint with compressed-tensors' runtime."
                )
            _check_scheme(group, scheme, location)
            matched = list(match_named_modules(model, args.targets, args.ignore))
            if not matched:
                raise HadamardKQConfigError(
                    f"transform group '{group}' ({location}): targets {args.targets} match no "
                    f"module of {type(model).__name__}; check the targets / ignore patterns"
                )
            for name, module in matched:
                head_dim = model_head_dim(module, model_config)
                block = _block_for(group, scheme, name, head_dim)
                layer = plan.layers.setdefault(name, LayerPlan(name=name, head_dim=head_dim))
                rotation = Rotation(
                    group=group,
                    location=location,
                    transform_type=scheme.type,
                    block=block,
                    scale=1.0 / math.sqrt(block),
                    inverse=bool(args.inverse),
                    precision=scheme.precision,
                )
                slot = "q" if location == Q_ATTN else "k"
                existing = getattr(layer, slot)
                if existing is not None:
                    raise HadamardKQConfigError(
                        f"layer '{name}': two transforms at {location} (groups "
                        f"'{existing.group}' and '{group}'); hf_hadamard_kq applies one "
                        "rotation per location"
                    )
                setattr(layer, slot, rotation)
    if not plan.layers:
        raise HadamardKQConfigError(
            "transform_config has no q_attn/k_cache transform: there is nothing to rotate"
        )
    return plan
