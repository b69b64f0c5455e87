"""Whether forward-mode AD may be in play: the one test every direct path asks.

Why one place: a dual tensor (``torch.autograd.forward_ad``, ``torch.func.jvp``) is an exact
``torch.Tensor`` with no dispatch key of its own, so the type and key tests that keep
subclasses and wrappers away from the direct launches, the fused Q/K op and ``kv_store`` let
it through, and none of those computes a tangent: they returned the primal's rotation and
dropped the tangent's, silently. Only the custom op's autograd kernel (ops/op.py) rotates
tangents, so every other path declines while a dual level is open. Duals cannot outlive their
level with a tangent (closing it clears them), so no open level means no tangent to lose.
"""

from __future__ import annotations

import torch

_fwad = torch.autograd.forward_ad


def level_open() -> bool:
    """Whether a forward-mode AD level is open (``torch.func.jvp`` opens one too). Dynamo
    guards on it: a step compiled outside a level is recompiled inside one."""
    return _fwad._current_level >= 0
