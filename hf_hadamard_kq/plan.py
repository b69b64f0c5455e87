"""transform_config -> which attention module rotates what, with every check in one place.

The plan is computed once, before anything is installed on the model, so that a config we
cannot run correctly fails as a whole (naming the group, the layer and the field) and the
model is never left half-rotated. Parsing and module matching are compressed-tensors' own
(pydantic ``TransformConfig`` and ``match_named_modules``), so "which layers" means exactly
what it means to the producer of the checkpoint.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

import torch
from torch import nn

from .ops.matrices import MAX_SYLVESTER_SIZE, is_power_of_two, sylvester

Q_ATTN = "q_attn"
K_CACHE = "k_cache"
R3_LOCATIONS = (Q_ATTN, K_CACHE)

HADAMARD_TYPES = ("hadamard", "random-hadamard")
TRANSFORM_TYPES = (*HADAMARD_TYPES, "random-matrix")

#: Precisions below fp32: compressed-tensors rounds x and the result to them, so we do too.
_NARROW_PRECISIONS = (torch.float16, torch.bfloat16)


class HadamardKQConfigError(ValueError):
    """A transform_config (or stored matrix) that hf_hadamard_kq cannot run correctly."""


@dataclass(frozen=True)
class Rotation:
    """One online rotation: ``y = x_chunk @ W * scale`` over ``block``-sized chunks.

    ``matrix`` is the *effective* unnormalised matrix W (permutation and inverse already
    applied, as loaded from the checkpoint, on the CPU), or None for the deterministic
    Sylvester matrix (built inside the kernel, never stored). At run time the op reads the
    matrix from the attention module's non-persistent buffer named ``buffer`` (so it follows
    ``.to(device)`` and accelerate), never from ``matrix``.

    ``cast``: the dtype to compute in when the op's fp32 accumulation would not follow the
    scheme's precision (see :func:`_compute_cast`), else None.
    """

    group: str
    location: str
    transform_type: str
    block: int
    scale: float
    matrix: Optional[torch.Tensor] = None
    inverse: bool = False
    precision: torch.dtype = torch.float32
    randomize: bool = False
    buffer: Optional[str] = None
    cast: Optional[torch.dtype] = None

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
    """The whole model's rotations plus the config they came from (kept for save_pretrained).

    ``tensors``: the transform tensors in compressed-tensors' checkpoint layout
    (``<module>.<group>_<location>.weight|perm``) that the matrices were resolved from; what
    ``save_r3_pretrained`` writes back.
    """

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    transform_config: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


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
    if scheme.type not in TRANSFORM_TYPES:
        raise HadamardKQConfigError(
            f"transform group '{group}' ({location}): type '{scheme.type}' is unknown to "
            f"hf_hadamard_kq (known: {', '.join(TRANSFORM_TYPES)})"
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


def _compute_cast(scheme) -> Optional[torch.dtype]:
    """The dtype a rotation must compute in to follow compressed-tensors' precision semantics
    (``x.to(precision) @ W``, cast back), where the op's own fp32 accumulation would not.

    * fp16/bf16 precision: compressed-tensors rounds the input and the result to it.
    * float64 precision for ``random-matrix``: the stored matrices (and inverses) are not
      orthogonal and can be ill-conditioned (condition numbers 1e3..1e5 for 16..256), so fp32
      accumulation differs measurably (logits 1e-5); these compute in float64, like
      compressed-tensors (on GPU through torch: Triton has no fp64 path).
    * otherwise None: the op accumulates in fp32 and rounds once. For the orthonormal Hadamard
      types this differs from a float64 product by ~1e-7 relative at most.
    """
    if scheme.precision in _NARROW_PRECISIONS:
        return scheme.precision
    if scheme.precision == torch.float64 and scheme.type == "random-matrix":
        return torch.float64
    return None


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
                    # compressed-tensors divides the Hadamard types by sqrt(n); random-matrix
                    # is applied unnormalised
                    scale=1.0 if scheme.type == "random-matrix" else 1.0 / math.sqrt(block),
                    inverse=bool(args.inverse),
                    precision=scheme.precision,
                    # compressed-tensors' RandomMatrixFactory ignores randomize (no permutation)
                    randomize=bool(scheme.randomize) and scheme.type in HADAMARD_TYPES,
                    cast=_compute_cast(scheme),
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


# ------------------------------------------------------------------ stored matrices


def _slot_key(rotation: Rotation, kind: str) -> tuple:
    """Which rotations share one tensor in compressed-tensors.

    Its factories cache one matrix per (group, size) (``ParameterizedDefaultDict`` keyed by
    size; device and precision are uniform for online transforms of one group), one
    permutation per matrix, and for ``random-matrix`` one *inverse* matrix per matrix, so
    forward and inverse random matrices are distinct tensors. Tied tensors are saved once,
    under the first module/location that owns them (``_register_tied_transform_weights``).
    """
    inverse_class = rotation.inverse if (
        rotation.transform_type == "random-matrix" and kind == "weight"
    ) else None
    return (rotation.group, kind, rotation.block, inverse_class)


def _own_name(layer: str, rotation: Rotation, kind: str) -> str:
    return f"{layer}.{rotation.group}_{rotation.location}.{kind}"


def _find_tensor(layer: str, rotation: Rotation, kind: str, tensors, parsed) -> Optional[str]:
    """The stored tensor a rotation uses: its own name, else the tied one of its slot."""
    own = _own_name(layer, rotation, kind)
    if own in tensors:
        return own
    key = _slot_key(rotation, kind)
    candidates = [
        n for n, (_, rot, k) in parsed.items() if k == kind and _slot_key(rot, kind) == key
    ]
    if not candidates:
        return None
    same_module = [n for n in candidates if parsed[n][0] == layer]
    if same_module:
        return same_module[0]
    first = tensors[candidates[0]]
    if all(torch.equal(tensors[n], first) for n in candidates[1:]):
        return candidates[0]
    raise HadamardKQConfigError(
        f"layer '{layer}' has no tensor '{own}', and the checkpoint stores "
        f"{len(candidates)} different {kind} tensors for transform group '{rotation.group}' "
        f"({', '.join(candidates[:3])}{', ...' if len(candidates) > 3 else ''}), so it is "
        "ambiguous which one this layer shares; re-export the checkpoint"
    )


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple, rotation: Rotation) -> None:
    if tuple(tensor.shape) != shape:
        raise HadamardKQConfigError(
            f"checkpoint tensor '{name}' has shape {tuple(tensor.shape)}, expected {shape} for "
            f"{rotation.transform_type} block {rotation.block}"
        )


def _check_permutation(name: str, perm: torch.Tensor, n: int) -> torch.Tensor:
    if perm.dtype.is_floating_point or perm.dtype.is_complex or perm.dtype == torch.bool:
        raise HadamardKQConfigError(
            f"checkpoint tensor '{name}' must be an integer permutation, got dtype {perm.dtype}"
        )
    perm = perm.to(device="cpu", dtype=torch.int64)
    if perm.dim() != 1 or perm.numel() != n or not torch.equal(
        torch.sort(perm).values, torch.arange(n, device="cpu")
    ):
        raise HadamardKQConfigError(
            f"checkpoint tensor '{name}' (shape {tuple(perm.shape)}) is not a permutation of "
            f"0..{n - 1}; the checkpoint is corrupt"
        )
    return perm


def _check_hadamard(name: str, w64: torch.Tensor, what: str) -> None:
    """``w64`` must have entries +-1 and W Wᵀ = n I (checked exactly: integers in float64)."""
    n = w64.shape[0]
    if not bool(torch.all(w64.abs() == 1)):
        raise HadamardKQConfigError(
            f"checkpoint tensor '{name}' is not a +-1 matrix, so it is not the unnormalised "
            f"Hadamard matrix that {what} means (entries found: e.g. "
            f"{w64[w64.abs() != 1].flatten()[:3].tolist()}); the checkpoint is corrupt or was "
            "written by a producer with other semantics"
        )
    step = 1024
    for i in range(0, n, step):
        gram = w64[i : i + step] @ w64.T
        expected = torch.zeros_like(gram)
        expected[:, i : i + step].diagonal().fill_(n)
        if not torch.equal(gram, expected):
            raise HadamardKQConfigError(
                f"checkpoint tensor '{name}' is a +-1 matrix but W Wᵀ != {n} I, so it is not a "
                f"Hadamard matrix ({what}); the checkpoint is corrupt"
            )


def _missing(layer: str, rotation: Rotation, kind: str, why: str) -> HadamardKQConfigError:
    return HadamardKQConfigError(
        f"layer '{layer}': transform group '{rotation.group}' ({rotation.transform_type}, "
        f"{rotation.location}) needs the stored tensor '{_own_name(layer, rotation, kind)}' (or "
        f"one it is tied to), which is not in the checkpoint: {why}. Re-export the checkpoint "
        "with its transform tensors."
    )


def _stored_rotation(plan: ModelPlan, name: str) -> tuple[str, Rotation, str]:
    """(module, rotation, kind) a stored transform tensor belongs to, or a clear error."""
    from .checkpoint import TRANSFORM_KEY

    m = TRANSFORM_KEY.match(name)
    layer = plan.layers.get(m["module"]) if m else None
    slot = "q" if m and m["location"] == Q_ATTN else "k"
    rotation = getattr(layer, slot) if layer is not None else None
    if rotation is None or rotation.group != m["group"]:
        raise HadamardKQConfigError(
            f"checkpoint tensor '{name}' is a {m['location'] if m else '?'} transform for a "
            "module/group that transform_config does not rotate; the checkpoint and its "
            "config.json disagree (re-export the checkpoint)"
        )
    if m["kind"] == "perm" and not rotation.randomize:
        why = ("type 'random-matrix' has no permutation"
               if rotation.transform_type == "random-matrix"
               else f"group '{rotation.group}' has randomize=false")
        raise HadamardKQConfigError(
            f"checkpoint tensor '{name}' is a permutation, but {why}; the checkpoint and its "
            "config.json disagree"
        )
    return m["module"], rotation, m["kind"]


def check_stored_tensor(plan: ModelPlan, name: str, tensor: torch.Tensor) -> None:
    """Check one stored transform tensor on its own (no other tensor needed, plan unchanged).

    ``.perm``: a permutation of 0..n-1. ``.weight``: n x n and, by type, ``hadamard``: exactly
    the Sylvester matrix (with randomize=true a symmetric Hadamard matrix is also accepted: the
    permutation folded in, H[perm][:, perm]); ``random-hadamard``: +-1 with W Wᵀ = n I;
    ``random-matrix``: finite. Each failure names the tensor.
    """
    _, rotation, kind = _stored_rotation(plan, name)
    n = rotation.block
    if kind == "perm":
        _check_permutation(name, tensor, n)
        return
    _check_shape(name, tensor, (n, n), rotation)
    w64 = tensor.to(device="cpu", dtype=torch.float64)
    if rotation.transform_type == "hadamard":
        sylvester_64 = sylvester(n, torch.float64, "cpu")
        if torch.equal(w64, sylvester_64):
            return
        if not rotation.randomize:
            diff = (w64 - sylvester_64).abs().max().item()
            raise HadamardKQConfigError(
                f"checkpoint tensor '{name}' is not the unnormalised Sylvester Hadamard matrix "
                f"of size {n} that type 'hadamard' means (max difference {diff:.3g}); the "
                "checkpoint is corrupt or was written by a producer with other semantics. "
                "Refusing to load it with a different rotation."
            )
        _check_hadamard(name, w64, "type 'hadamard' with a folded permutation")
        if not torch.equal(w64, w64.T):
            raise HadamardKQConfigError(
                f"checkpoint tensor '{name}' is a Hadamard matrix but not symmetric, so it is "
                "not a permuted Sylvester matrix H[perm][:, perm] (type 'hadamard', "
                "randomize=true)"
            )
    elif rotation.transform_type == "random-hadamard":
        _check_hadamard(name, w64, "type 'random-hadamard'")
    elif not bool(torch.isfinite(w64).all()):
        raise HadamardKQConfigError(f"checkpoint tensor '{name}' has non-finite entries")


def _effective_matrix(
    layer: str, rotation: Rotation, tensors, parsed, memo
) -> Optional[torch.Tensor]:
    """The effective matrix of one rotation (None: Sylvester) from already-checked tensors;
    an error naming the tensor when one it needs is absent."""
    n = rotation.block
    w_name = _find_tensor(layer, rotation, "weight", tensors, parsed)
    p_name = _find_tensor(layer, rotation, "perm", tensors, parsed) if rotation.randomize else None
    key = (rotation.transform_type, w_name, p_name, rotation.inverse, n)
    if key in memo:
        return memo[key]
    weight = None if w_name is None else tensors[w_name].to("cpu")
    perm = None if p_name is None else tensors[p_name].to(device="cpu", dtype=torch.int64)
    kind = rotation.transform_type
    if kind == "hadamard":
        sylvester_64 = sylvester(n, torch.float64, "cpu")
        folded = weight is not None and not torch.equal(
            weight.to(torch.float64), sylvester_64)  # checked: a permuted Sylvester matrix
        if rotation.randomize and perm is None and not folded:
            raise _missing(
                layer, rotation, "perm",
                "randomize=true uses a random permutation, which cannot be regenerated (a "
                "stored matrix with the permutation folded in would also do, but the stored "
                "matrix, if any, is the unpermuted Sylvester matrix)",
            )
        if not rotation.randomize:
            memo[key] = None  # the deterministic Sylvester matrix: generated in the kernel
            return None
        base = weight if folded else sylvester_64
    else:
        if weight is None:
            why = "a random matrix cannot be regenerated"
            if kind == "random-matrix" and rotation.inverse:
                why += (" (for inverse=true compressed-tensors stores the inverse matrix as a "
                        "tensor of its own)")
            raise _missing(layer, rotation, "weight", why)
        base = weight
    if perm is not None:
        base = base[perm][:, perm]
    if rotation.inverse and kind in HADAMARD_TYPES:
        # compressed-tensors transposes Hadamard matrices for inverse=true; a random-matrix
        # inverse is the stored (true) inverse, used as is
        base = base.T
    memo[key] = base.contiguous()
    return memo[key]


def resolve_matrices(plan: ModelPlan, tensors: dict[str, torch.Tensor]) -> None:
    """Verify a checkpoint's transform tensors and give every rotation its effective matrix.

    ``tensors`` are the stored ``<module>.<group>_<location>.weight|perm`` tensors. Each is
    checked on its own (:func:`check_stored_tensor`) and must belong to a planned rotation;
    tied tensors (compressed-tensors saves a shared matrix once, see :func:`_slot_key`) serve
    every rotation of their slot. A random matrix or permutation that a rotation needs but
    the checkpoint lacks is an error naming the tensor. Warns when the resulting q and k
    rotations of a layer do not preserve q·kᵀ.
    """
    parsed = {name: _stored_rotation(plan, name) for name in tensors}
    for name, tensor in tensors.items():
        check_stored_tensor(plan, name, tensor)
    memo: dict = {}
    for name, layer in plan.layers.items():
        for slot in ("q", "k"):
            rotation = getattr(layer, slot)
            if rotation is not None:
                matrix = _effective_matrix(name, rotation, tensors, parsed, memo)
                setattr(layer, slot, replace(rotation, matrix=matrix))
    plan.tensors = dict(tensors)
    warn_if_scores_change(plan)


def _full_rotation(rotation: Rotation, head_dim: int) -> torch.Tensor:
    """The normalised head_dim x head_dim matrix a rotation applies (block-diagonal)."""
    m = rotation.matrix if rotation.matrix is not None else sylvester(rotation.block, torch.float64)
    m = m.to(torch.float64) * rotation.scale
    reps = head_dim // rotation.block
    return m if reps == 1 else torch.block_diag(*([m] * reps))


def _preserves_scores(layer: LayerPlan) -> bool:
    q, k = layer.q, layer.k
    hadamard_types = q.transform_type in HADAMARD_TYPES and k.transform_type in HADAMARD_TYPES
    if q.block == k.block and hadamard_types:
        # both orthonormal (verified): R_q R_kᵀ = I exactly when R_q == R_k
        if q.matrix is k.matrix:
            return True
        return torch.equal(_full_rotation(q, q.block), _full_rotation(k, k.block))
    a, b = _full_rotation(q, layer.head_dim), _full_rotation(k, layer.head_dim)
    eye = torch.eye(a.shape[0], dtype=torch.float64, device="cpu")
    return bool(((a @ b.T) - eye).abs().max() <= 1e-4)


def warn_if_scores_change(plan: ModelPlan) -> None:
    """Warn (once per plan) when the q and k rotations of a layer do not preserve q·kᵀ.

    The rotation is still applied exactly as compressed-tensors applies it; the warning says
    that such a model's attention scores differ from the unrotated model's.
    """
    bad: list[str] = []
    memo: dict = {}
    for name, layer in plan.layers.items():
        if layer.q is None or layer.k is None:
            bad.append(f"{name} (only {'q' if layer.k is None else 'k'} is rotated)")
            continue
        key = (id(layer.q.matrix), id(layer.k.matrix), layer.q.block, layer.k.block,
               layer.q.scale, layer.k.scale, layer.head_dim)
        if key not in memo:
            memo[key] = _preserves_scores(layer)
        if not memo[key]:
            bad.append(name)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        warnings.warn(
            f"hf_hadamard_kq: the q_attn and k_cache transforms of {shown} do not satisfy "
            "R_q R_kᵀ = I, so q·kᵀ (the attention scores) differs from the unrotated model's. "
            "They are applied exactly as compressed-tensors applies them (e.g. a non-orthogonal "
            "random-matrix, or inverse=true on only one side of a non-symmetric matrix).",
            UserWarning,
            stacklevel=3,
        )
