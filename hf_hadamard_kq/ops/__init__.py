"""The Hadamard op: matrices, the torch custom op and its CPU / Triton implementations."""

from .matrices import MAX_SYLVESTER_SIZE, is_power_of_two, sylvester
from .native import set_compile_rotation
from .op import hadamard_apply, hadamard_transform, torch_hadamard

__all__ = [
    "MAX_SYLVESTER_SIZE",
    "hadamard_apply",
    "hadamard_transform",
    "is_power_of_two",
    "set_compile_rotation",
    "sylvester",
    "torch_hadamard",
]
