"""The "hadamard_kq" attention implementations: rotate Q, then run an ordinary backend.

Keys arrive here already rotated (cache.py rotates them before the cache write, or fused.py
rotated them together with the query at RoPE time), so this function only rotates the query
(unless fused.py already did) and delegates, with every argument (scaling, sliding_window,
softcap, ...) passed through unchanged.

Each name is registered twice: as an attention function and as a *mask* function. Without
the mask entry ``create_causal_mask`` returns None for an unknown name, which silently breaks
padded batches, multi-token continuation and sliding windows. The mask function is the inner
backend's own, so masks are exactly what that backend expects.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from . import fused as fused_mod
from .cache import rotate
from .plan import HadamardKQConfigError
from .specs import MARKERS, SLOT_ATTR, SPECS, Markers, marker_slot, unmark

#: Registered attention names -> the inner backend they delegate to. The names avoid the
#: substrings "sdpa", "flash" and "flex_attention", which trigger transformers' dispatch checks.
IMPLEMENTATIONS: dict[str, str] = {
    "hadamard_kq": "sdpa",
    "hadamard_kq_eager": "eager",
    "hadamard_kq_flex": "flex_attention",
}

EAGER_ATTR = "_hadamard_kq_eager"

#: Set by install.probe_pattern during its check forward; None otherwise.
PROBE = None


class HadamardKQNotInstalledError(RuntimeError):
    """The attention function ran on a model that has no rotation plan installed."""


def model_eager_function(module: nn.Module) -> Callable:
    """The model's own eager attention (it implements softcap etc. that sdpa cannot)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise HadamardKQConfigError(
            f"attention class {type(module).__name__} has no module-level "
            "eager_attention_forward; use attn_implementation='hadamard_kq' (sdpa inside)"
        )
    return fn


def _unmark_call(module: nn.Module, markers: Markers, key: torch.Tensor, query: torch.Tensor):
    """Plain key and query of a marked call. The keys came from this call's cache view (it
    marks them only after storing the RoPE wrapper's key); the query must be the wrapper's
    rotated output itself, anything else was replaced after RoPE: an error."""
    if type(key) is not markers.keys or type(query) is not markers.q:
        fused_mod.mismatch(module, "query" if type(key) is markers.keys else "key")
    elif PROBE is not None:
        PROBE.events.append(("q_marked", PROBE.names.get(id(module))))
    return unmark(key), unmark(query)


def _make_attention(inner_name: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def hadamard_kq_attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        **kwargs,
    ):
        slot = module.__dict__.get(SLOT_ATTR)
        if slot is None:
            raise HadamardKQNotInstalledError(
                f"attention implementation '{module.config._attn_implementation}' ran on "
                f"{type(module).__name__} with no rotation plan installed. Load the model with "
                "from_pretrained(..., attn_implementation='hadamard_kq') from an R3 checkpoint, "
                "or call hf_hadamard_kq.apply_r3(model) first."
            )
        if PROBE is not None:
            PROBE.attention(module, inner_name, kwargs)
        spec = SPECS[slot]
        q = spec.q
        if spec.traced and (marker_slot(key) is not None or marker_slot(query) is not None):
            # a marked call (fused.py, "Under torch.compile"): the query was rotated at RoPE
            key, query = _unmark_call(module, MARKERS[slot], key, query)
        elif q is not None:
            state = None if torch.compiler.is_dynamo_compiling() else fused_mod.STATE
            if state is not None and state.done is module:
                # rotated together with the key at RoPE time (fused.py), if this is that tensor
                state.done = None
                if query is not state.q_out:
                    fused_mod.mismatch(module, "query")
                    query = rotate(query, q, module)  # probe only (mismatch raises)
                state.q_out = None
            else:
                query = rotate(query, q, module)
        if inner_name == "eager":
            inner = module.__dict__[EAGER_ATTR]
        else:
            inner = ALL_ATTENTION_FUNCTIONS[inner_name]
        return inner(module, query, key, value, attention_mask, **kwargs)

    hadamard_kq_attention.__name__ = f"hadamard_kq_attention_{inner_name}"
    return hadamard_kq_attention


def register() -> None:
    """Register every name with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for name, inner in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, _make_attention(inner))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])


def inner_backend(attn_implementation: str | None) -> str | None:
    """The inner backend for one of our names, or None if the name is not ours."""
    return IMPLEMENTATIONS.get(attn_implementation or "")
