"""hf_hadamard_kq: SpinQuant-R3 (online Hadamard rotation of attention Q and K) in transformers."""

from .ops import hadamard_transform

__version__ = "0.1.0"

__all__ = ["__version__", "hadamard_transform"]
