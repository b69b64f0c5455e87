"""Whether forward-mode AD may be in play: the test every path that computes no tangent asks.

Why one place: a dual tensor (``torch.autograd.forward_ad``, ``torch.func.jvp``) is an exact
``torch.Tensor`` with no dispatch key of its own, so the type and key tests that keep
subclasses and wrappers away from the direct launches, the fused Q/K op and ``kv_store`` let
it through, and none of those computes a tangent: they returned the primal's rotation and
dropped the tangent's, silently. Only the custom op's autograd kernel (ops/op.py) rotates
tangents, so every other path declines while a dual level is open. torch supports one level
at a time (index 0; nested levels raise), and closing it clears every tangent, so no open
level means no tangent to lose. (The C++ launch table asks torch's own level registry.)
"""

from __future__ import annotations

from typing import Optional

import torch

_fwad = torch.autograd.forward_ad

#: The only forward-AD level torch supports (``torch.autograd.forward_ad``: "nested forward
#: mode AD is not supported").
LEVEL = 0


def level_open() -> bool:
    """Whether a level was opened through ``torch.autograd.forward_ad`` (``dual_level``; eager
    ``torch.func.jvp`` uses it too). Dynamo guards on it: a step compiled outside a level is
    recompiled inside one. Not seen: a level opened in C++ -- AOTAutograd does that while it
    traces a compiled ``jvp``, with wrapper tensors (see :func:`may_be_dual`)."""
    return _fwad._current_level >= 0


def may_be_dual(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` may carry a tangent: a level is open (:func:`level_open`), a
    torch.func transform is active, or one is not a plain tensor. The last two are what
    AOTAutograd's trace of a compiled ``jvp`` shows after it opened the level in C++, where
    :func:`level_open` does not see it: functorch's wrappers (exact ``torch.Tensor``s) and
    tracer subclasses. Cheap for plain tensors outside a level; the exact per-tensor test
    (:func:`primal_tangent`) costs ~5 us on the development CPU."""
    if level_open() or _functorch_active():
        return True
    return any(t is not None and type(t) is not torch.Tensor for t in tensors)


_functorch_active = torch._C._are_functorch_transforms_active


def primal_tangent(t: Optional[torch.Tensor]) -> tuple:
    """``(primal, tangent)`` of ``t`` at :data:`LEVEL` (tangent None when it has none)."""
    if t is None:
        return None, None
    return tuple(torch._VF._unpack_dual(t, level=LEVEL))


def make_dual(primal: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """``primal`` carrying ``tangent`` at :data:`LEVEL`."""
    return torch._VF._make_dual(primal, tangent, level=LEVEL)
