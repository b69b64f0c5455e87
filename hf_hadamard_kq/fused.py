"""Rotate Q and K where they are born: inside the model's ``apply_rotary_pos_emb`` call.

Why: the general path (cache.py rotates K inside ``cache.update``, attention.py rotates Q in
the attention function) costs two launches per layer and token. In eager decode, which is
host-bound, that is most of our overhead. The query and key of a layer leave
``apply_rotary_pos_emb(q, k, cos, sin)`` together, so at that point one launch can rotate both
(ops/qk_kernel.py) and, when the function is the standard rotate-half RoPE, also do the RoPE
(replacing about ten small eager kernels, which makes the layer cheaper than unrotated sdpa).

How, without editing model code: the modeling module's global ``apply_rotary_pos_emb`` is
replaced by a wrapper (once per modeling module, refcounted by installed models; the wrapper
calls the original unchanged unless an installed layer is mid-forward). Per call:

1. our forward pre-hook of a fused-eligible layer *arms* the thread's state with the module;
2. the wrapper sees the armed module, disarms it, checks that its caller is that module's
   ``forward`` (``self`` in the calling frame: a stale arm left by an exception elsewhere is
   never applied to another module's call), and if the tensors qualify returns
   ``(rope(q) H, rope(k) H)``, recording that this module's q/k were rotated and which tensors
   it returned;
3. ``cache.update`` (cache.py) skips its rotation for that module only if the key it receives
   *is* the returned key; the attention function (attention.py) likewise for the query;
4. our forward post-hook (:func:`handoff_post_hook`) checks that both took their tensor. They
   ignore the thread's state when they run under torch.compile inside an eagerly run module
   (only the attention function compiled, say), and then rotate a second time: that forward
   is an error, never a silently twice-rotated query or key.

Anything else falls back to the general path in the same call: no armed module (the layer
never called the wrapper, e.g. NoPE layers), extra arguments (mrope), a head dim other than
the rotation block (partial rotary), torch.compile, autograd, tensor subclasses (DTensor),
an active dispatch mode (a flop counter or FakeTensorMode must see the op).
If a tensor was *replaced* between RoPE and the cache / attention (the identity check fails),
rotation already happened and cannot be redone: the install probe finds such layers and turns
the fused path off for them; at run time it is an error, never a silent wrong rotation. (The
check is by identity: an *in-place* edit of q or k after RoPE would go unnoticed and be applied
after the rotation. In transformers 5.17 and 5.24 the only in-place edits of query/key states
are OLMo/OLMoE's ``clip_qkv`` clamps, before RoPE (checked by grep); a future model that edited
them after RoPE would need ``HF_HADAMARD_KQ_NO_FUSED=1``.)

State is thread-local, so models running in different threads do not see each other's calls.

Under torch.compile (the *marked* route). The thread-local state above cannot work in traced
code: dynamo does not write back a ``threading.local``'s changes, folds globals read in a
frame into the locals of frames it resumes after a graph break, and runs some frames eagerly
inside a compiled step (BENCHMARKS.md: two designs built on state were reverted for that). So
traced calls carry the hand-off in the *types* of the call's own tensors (specs.Marker;
dynamo guards a tensor's Python type and reconstructs it across graph breaks):

1. the pre-hook of a ``traced`` layer (the load probe saw this route work for it) replaces
   ``position_embeddings=(cos, sin)`` by ``(cos as Markers.cos, sin)`` and gives the call's
   cache view the slot's markers;
2. the wrapper, seeing a marked ``cos`` (in any mode), returns q and k rotated once, typed
   ``Markers.q`` / ``Markers.k`` (RoPE and both rotations in one ``rope_rotate_qk`` op where
   the tensors qualify, else the original RoPE and two rotations);
3. the view stores only a ``Markers.k`` key (unmarked) and returns the keys typed
   ``Markers.keys``; the attention function, seeing a marker, requires ``Markers.keys`` and a
   ``Markers.q`` query and unmarks both. Any other combination raises
   :class:`FusedRotationMismatchError`: ops on a marker return plain tensors, so a key or
   query replaced after RoPE arrives unmarked and is caught, never rotated a second time.

Nothing is stored outside the call, so graph breaks, eager frames, other models and other
threads cannot see it. What the types cannot see: a call that replaces *both* the query and
the keys between ``cache.update`` and the attention function looks unmarked there, and the
query would be rotated again; the probe runs this route eagerly at load and keeps it only
for layers whose query and key arrive as the markers.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable
from typing import Any, Optional

import torch

from .ops.op import _dispatch_modes, hadamard_apply
from .specs import marker_slot

#: Module ``__dict__`` key of an attention module's fused rotation: a :class:`FusedRotation`,
#: or absent (general path only).
FUSED_ATTR = "_hadamard_kq_fused"
#: Module ``__dict__`` key of the handle of a fused-eligible layer's :func:`handoff_post_hook`.
HANDOFF_HOOK_ATTR = "_hadamard_kq_handoff_hook"
#: Attribute marking our wrapper (holds the original function).
ORIGINAL_ATTR = "_hadamard_kq_original"
#: Set to 1 to install only the general path (rotation in cache.update + attention function).
DISABLE_ENV = "HF_HADAMARD_KQ_NO_FUSED"


class _CallState(threading.local):
    armed: Any = None  # module whose pre-hook ran and whose RoPE call is awaited
    done: Any = None  # module whose q and k the wrapper rotated in the current call
    q_out: Optional[torch.Tensor] = None
    k_out: Optional[torch.Tensor] = None


STATE = _CallState()

#: Set by install.probe_pattern during its check forward; None otherwise.
PROBE = None
#: True only while the load probe checks the marked route in eager code (cache.py pre-hook).
MARK_EAGER = False


class FusedRotation:
    """What the wrapper needs for one layer (q and k share one rotation)."""

    __slots__ = ("block", "buffer", "home", "name", "scale")

    def __init__(self, scale: float, buffer: Optional[str], block: int, name: str,
                 home: str = "") -> None:
        self.scale = scale
        self.buffer = buffer
        self.block = block
        self.name = name
        self.home = home  # the modeling module whose apply_rotary_pos_emb the layer calls


def reset() -> None:
    STATE.armed = STATE.done = STATE.q_out = STATE.k_out = None


# ------------------------------------------------------------------------------------------
# Which RoPE functions qualify
# ------------------------------------------------------------------------------------------


def _standard_rope(q, k, cos, sin):
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)

    def rot(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * c + rot(q) * s, k * c + rot(k) * s


def signature_ok(fn: Callable) -> bool:
    """``fn(q, k, cos, sin, <params with defaults>)``: the form the wrapper intercepts."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if len(params) < 4:
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind not in positional for p in params[:4]):
        return False
    return all(
        p.default is not inspect.Parameter.empty
        or p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        for p in params[4:]
    )


def is_standard_rope(fn: Callable) -> bool:
    """True when ``fn(q, k, cos, sin)`` computes rotate-half RoPE with ``unsqueeze_dim=1``
    (checked numerically in float64 on random inputs, including cos/sin whose halves differ,
    so an interleaved or partial RoPE cannot pass)."""
    gen = torch.Generator().manual_seed(1234)
    q = torch.randn(2, 3, 5, 16, dtype=torch.float64, generator=gen)
    k = torch.randn(2, 2, 5, 16, dtype=torch.float64, generator=gen)
    cos = torch.randn(2, 5, 16, dtype=torch.float64, generator=gen)
    sin = torch.randn(2, 5, 16, dtype=torch.float64, generator=gen)
    try:
        got = fn(q, k, cos, sin)
    except Exception:
        return False
    want = _standard_rope(q, k, cos, sin)
    if not (isinstance(got, tuple) and len(got) == 2):
        return False
    return all(
        isinstance(g, torch.Tensor) and g.shape == w.shape and torch.allclose(g, w, rtol=0,
                                                                              atol=1e-12)
        for g, w in zip(got, want)
    )


# ------------------------------------------------------------------------------------------
# The wrapper
# ------------------------------------------------------------------------------------------


def _rotate_pair(q, k, cos, sin, original, standard, fused: FusedRotation, module):
    """Rotated (and RoPE'd) q, k, or None when these tensors must take the general path."""
    matrix = None if fused.buffer is None else module._buffers[fused.buffer]
    if q.is_cuda:
        from .ops import qk_kernel

        if qk_kernel.triton is not None:
            if standard:
                pair = qk_kernel.try_rotate_qk(q, k, fused.scale, matrix, cos, sin)
                if pair is not None:
                    return pair
            q, k = original(q, k, cos, sin)
            if type(q) is torch.Tensor and type(k) is torch.Tensor and q.shape[-1] == fused.block:
                pair = qk_kernel.try_rotate_qk(q, k, fused.scale, matrix)
                if pair is not None:
                    return pair
            return _rotate_each(q, k, fused, matrix)
    q, k = original(q, k, cos, sin)
    return _rotate_each(q, k, fused, matrix)


def _rotate_each(q, k, fused: FusedRotation, matrix):
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor:
        return None
    if q.shape[-1] != fused.block or k.shape[-1] != fused.block:
        return None
    return (hadamard_apply(q, fused.scale, matrix, fused.block),
            hadamard_apply(k, fused.scale, matrix, fused.block))


def _marked_pair(q, k, cos, sin, args, kwargs, original, standard, slot: int):
    """A marked call (module docstring, "Under torch.compile"): q and k rotated once, as
    the slot's markers. ``rope_rotate_qk`` (ops/qk_op.py) is one graph node and one launch of
    the fused kernel on CUDA (its key is marked ``k_op``: the cache view may then write it
    with ``kv_store``); other tensors take the model's RoPE and the planned rotation."""
    from .ops import forward_mode, native
    from .ops.qk_kernel import qk_supported
    from .ops.qk_op import rope_rotate_qk
    from .specs import MARKERS, SPECS, mark, unmark

    markers = MARKERS[slot]
    if type(cos) is not markers.cos:  # pragma: no cover - only the pre-hook marks cos
        raise FusedRotationMismatchError("hf_hadamard_kq: a marked tensor reached RoPE as cos")
    cos = unmark(cos)
    rotation = SPECS[slot].q
    if (
        standard
        and not args
        and not kwargs
        and native.MODE != "native"
        and type(q) is torch.Tensor
        and type(k) is torch.Tensor
        and q.shape[-1] == rotation.block
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                              or cos.requires_grad or sin.requires_grad))
        and not forward_mode.level_open()  # the op has no forward formula: duals' tangents
        and qk_supported(q, k, None, cos, sin, any_device=True)
    ):
        q, k = rope_rotate_qk(q, k, cos, sin, rotation.scale, None)
        return mark(q, markers.q), mark(k, markers.k_op)
    q, k = original(q, k, cos, sin, *args, **kwargs)
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor:
        raise FusedRotationMismatchError(
            "hf_hadamard_kq: the model's apply_rotary_pos_emb returned "
            f"{type(q).__name__}/{type(k).__name__}, not tensors, in a call marked for "
            f"rotation at RoPE time. Workaround: set {DISABLE_ENV}=1 before loading."
        )
    q = hadamard_apply(q, rotation.scale, None, rotation.block)
    k = hadamard_apply(k, rotation.scale, None, rotation.block)
    return mark(q, markers.q), mark(k, markers.k)


def _make_wrapper(original: Callable, standard: bool) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        slot = marker_slot(cos)
        if slot is not None:
            return _marked_pair(q, k, cos, sin, args, kwargs, original, standard, slot)
        if torch.compiler.is_dynamo_compiling():
            return original(q, k, cos, sin, *args, **kwargs)
        state = STATE
        module = state.armed
        if module is None:
            return original(q, k, cos, sin, *args, **kwargs)
        state.armed = None
        fused = module.__dict__.get(FUSED_ATTR)
        if (
            fused is None
            or sys._getframe(1).f_locals.get("self") is not module
            or args
            or kwargs
            or type(q) is not torch.Tensor
            or type(k) is not torch.Tensor
            or q.shape[-1] != fused.block
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                             or cos.requires_grad or sin.requires_grad))
            or _dispatch_modes()  # a mode must see the op: the general path's hadamard_apply
        ):
            return original(q, k, cos, sin, *args, **kwargs)
        pair = _rotate_pair(q, k, cos, sin, original, standard, fused, module)
        if pair is None:  # original() gave something unexpected: rerun it, general path
            return original(q, k, cos, sin)
        state.done = module
        state.q_out, state.k_out = pair
        probe = PROBE
        if probe is not None:  # keyed by id: other threads' models stay unnamed (ignored)
            probe.events.append(("rope", probe.names.get(id(module))))
        return pair

    apply_rotary_pos_emb.__doc__ = original.__doc__
    apply_rotary_pos_emb.__wrapped__ = original
    setattr(apply_rotary_pos_emb, ORIGINAL_ATTR, original)
    return apply_rotary_pos_emb


#: modeling module name -> [original function, number of installed models using the wrapper]
_PATCHED: dict[str, list] = {}
#: modeling module name -> the module, while our wrapper is installed in it
_HOMES: dict[str, Any] = {}


def wrapper_in_place(home_name: Optional[str]) -> bool:
    """Whether the modeling module ``home_name`` (a traced layer's ``LayerSpec.home``)
    still calls our wrapper. The marked route needs it (an original ``apply_rotary_pos_emb``
    would return unmarked tensors: the mismatch error); it is gone when a deep copy outlived
    the model that patched the module, or when other code (e.g. a kernel library) replaced
    the function after install."""
    home = None if home_name is None else _HOMES.get(home_name)
    return home is not None and hasattr(home.apply_rotary_pos_emb, ORIGINAL_ATTR)


def patch_module(module_name: str) -> bool:
    """Install the wrapper in ``module_name`` (or count one more user). False when the module
    has no interceptable ``apply_rotary_pos_emb`` (the general path then serves its layers)."""
    entry = _PATCHED.get(module_name)
    if entry is not None:
        entry[1] += 1
        return True
    mod = sys.modules.get(module_name)
    fn = getattr(mod, "apply_rotary_pos_emb", None)
    if fn is None or not callable(fn) or getattr(fn, ORIGINAL_ATTR, None) is not None:
        return False
    if not signature_ok(fn):
        return False
    mod.apply_rotary_pos_emb = _make_wrapper(fn, is_standard_rope(fn))
    _PATCHED[module_name] = [fn, 1]
    _HOMES[module_name] = mod
    return True


def unpatch_module(module_name: str) -> None:
    """One user fewer; restore the original function when none is left."""
    entry = _PATCHED.get(module_name)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        mod = sys.modules.get(module_name)
        if mod is not None:
            mod.apply_rotary_pos_emb = entry[0]
        del _PATCHED[module_name]
        _HOMES.pop(module_name, None)


# ------------------------------------------------------------------------------------------
# Hooks used by cache.py / attention.py / install.py
# ------------------------------------------------------------------------------------------


class FusedRotationMismatchError(RuntimeError):
    """A tensor rotated at RoPE time was replaced before the cache / attention function."""


class FusedHandoffError(RuntimeError):
    """A query or key rotated at RoPE time did not reach the eager cache update / attention
    function of its layer (they ran under torch.compile, or not at all)."""


def handoff_post_hook(module: Any, args: tuple, output: Any) -> None:
    """Forward post-hook of a fused-eligible layer: the query and key its RoPE call rotated
    (eagerly) must have been taken by the eager cache update and attention function.

    Why: those two recognise the wrapper's tensors through the thread's state, which traced
    code does not read (module docstring). A cache update or attention function compiled on
    its own, inside a module that runs eagerly, therefore rotates the tensor a second time;
    the state still holds it afterwards, and this hook turns that into an error instead of a
    wrong output. An exception inside the forward skips the hook; the next pre-hook clears
    the state. Traced calls carry their hand-off in types (checked where they arrive).

    During the load probe the layer's fused path is withdrawn instead (the event a replaced
    tensor records): with its consumers compiled on their own, the general path rotates
    each tensor exactly once, in them."""
    if torch.compiler.is_dynamo_compiling():
        return
    state = STATE
    state.armed = None
    if state.done is not module and state.k_out is None:
        return
    missed = [what for what, tensor in (("key", state.k_out), ("query", state.q_out))
              if tensor is not None]
    reset()
    if not missed:  # pragma: no cover - the wrapper sets done, q_out and k_out together
        return
    if _withdraw_in_probe(module, missed):
        return
    name = _layer_name(module)
    places = " and ".join(
        {"key": "the KV cache update", "query": "the attention function"}[w] for w in missed)
    it, they = ("them", "They") if len(missed) > 1 else ("it", "It")
    keys = " and this layer's keys in the cache are rotated twice" if "key" in missed else ""
    raise FusedHandoffError(
        f"hf_hadamard_kq: layer '{name}' ({type(module).__name__}) rotated its "
        f"{' and '.join(missed)} at RoPE time in eager code, but {places} did not receive "
        f"{it} in eager code. {they} ran under torch.compile while the attention module "
        f"itself ran eagerly (compiled code rotates {it} a second time), or did not run. This "
        f"forward's output is wrong{keys}, and the cache holds this forward's keys only up to "
        "this layer: discard both. Compile the whole model, a decoder layer or the attention "
        "module instead of only the attention function or cache update, or set "
        f"{DISABLE_ENV}=1 before loading (no rotation at RoPE time)."
    )


def _layer_name(module: Any) -> str:
    """The layer's name in its model (the fused rotation records it), for error messages."""
    return getattr(module.__dict__.get(FUSED_ATTR), "name", type(module).__name__)


def _withdraw_in_probe(module: Any, what: list[str]) -> bool:
    """During the load probe of ``module``'s model: record ``<what>_changed`` for each tensor,
    the events on which the probe withdraws the layer's fused path (install.probe_pattern),
    and return True. False otherwise (another model's probe, or none): the caller raises."""
    probe = PROBE
    if probe is None or id(module) not in probe.names:
        return False
    probe.events.extend((f"{w}_changed", probe.names[id(module)]) for w in what)
    return True


def mismatch(module: Any, what: str) -> None:
    """Record (probe) or raise: ``what`` ('key' or 'query') changed after RoPE."""
    name = _layer_name(module)
    reset()
    if _withdraw_in_probe(module, [what]):
        return
    raise FusedRotationMismatchError(
        f"hf_hadamard_kq: layer '{name}' ({type(module).__name__}) changed the {what} between "
        "apply_rotary_pos_emb and the "
        + ("KV cache" if what == "key" else "attention function")
        + ", after hf_hadamard_kq had already rotated it there; the result would not be the "
        "R3 rotation. This was not seen when the model was loaded; please report it. "
        f"Workaround: set {DISABLE_ENV}=1 before loading (general path only)."
    )
