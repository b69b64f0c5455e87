"""hf_hadamard_kq: SpinQuant-R3 (online Hadamard rotation of attention Q and K) in transformers.

Importing the package registers the "hadamard_kq" attention implementations (and their mask
functions) with transformers and installs the load hook, so that

    AutoModelForCausalLM.from_pretrained(path, attn_implementation="hadamard_kq")

runs an R3 checkpoint with Q rotated in attention and K rotated before the KV cache.
"""

from .api import apply_r3, default_r3_config, remove_r3, save_r3_pretrained
from .attention import IMPLEMENTATIONS, register
from .inspect_model import describe, rotation_table
from .loading import patch_transformers
from .ops import hadamard_transform, set_compile_rotation
from .plan import HadamardKQConfigError

__version__ = "0.1.0"

register()
patch_transformers()

__all__ = [
    "IMPLEMENTATIONS",
    "HadamardKQConfigError",
    "__version__",
    "apply_r3",
    "default_r3_config",
    "describe",
    "hadamard_transform",
    "remove_r3",
    "rotation_table",
    "save_r3_pretrained",
    "set_compile_rotation",
]
