"""What each attention module's hot path needs, kept in one interned table read by slot number.

Why a table: torch.compile guards every Python value a traced function reads, once per place
it was read from. When the key pre-hook and the attention function read their rotation from
per-layer closures and per-layer plan objects, a compiled decode step carried 52 more lines
of guards per layer than the plain model (the hook's closure cells, the rotation's fields, the
plan's type), and dynamo evaluates them all before every call; ``generate`` waits for each
step, so that host time adds to every token (BENCHMARKS.md, session 5: on an H100 host the
compiled call took 0.3-0.6 ms longer than sdpa's, at 32 layers). Here a module carries one
int (its slot), and every layer with the same rotation shares one table entry, so dynamo
guards one int per layer plus one entry per distinct rotation (+15 lines per layer, most of
them for the pre-hook's presence; tests/test_specs.py).

Entries are reference-counted by the modules that use them (see :class:`_Ticket`): dropped
by ``detach`` (``remove_plan``) or when the modules are garbage-collected.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .plan import Rotation

#: Name, in an attention module's ``__dict__``, of its slot in :data:`SPECS`.
SLOT_ATTR = "_hadamard_kq_slot"
_TICKET_ATTR = "_hadamard_kq_slot_ticket"
#: Set (in the module's __dict__) by the load hook on attention modules whose KV-cache
#: quantization *we* attached (compressed-tensors' ``QuantizedKVCache``; see loading.py).
KV_QUANTIZER_ATTR = "_hadamard_kq_kv_quantizer"


class Marker(torch.Tensor):
    """A plain tensor whose Python type says where it came from in the current call.

    Why types: under torch.compile the only per-call facts that survive graph breaks, eager
    frames inside a compiled step and concurrent threads without being folded into another
    call's are the values that flow through the call itself, and dynamo guards a tensor's
    Python type (a compiled frame is never reused for a tensor of another type; checked in
    tests/test_traced.py). Attributes set on a tensor are not guarded, so the type is the
    message. ``__torch_function__`` is disabled: every op on a marker returns a plain tensor,
    so a tensor *derived* from a marked one (``k * 1.0``, ``k.contiguous()``) is unmarked.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl
    #: the slot of the marker's type (an int: dynamo cannot wrap other objects it reads from
    #: a type it did not get from a guarded source); None on this base class
    hkq_slot: Optional[int] = None


def marker_slot(x: Any) -> Optional[int]:
    """The slot of a marker, None for anything else (plain tensors first: the hot path)."""
    t = type(x)
    if t is torch.Tensor or not issubclass(t, Marker):
        return None
    return t.hkq_slot


def mark(x: torch.Tensor, marker: type) -> torch.Tensor:
    """``x`` as ``marker``, through a fresh view: dynamo gives ``as_subclass`` of a frame's
    input the input's source, so a guard on the marker's type would be evaluated on the
    (plain) input."""
    return x.view_as(x).as_subclass(marker)


def unmark(x: torch.Tensor) -> torch.Tensor:
    """The plain tensor behind a marker: a view of it (dynamo cannot trace
    ``as_subclass(torch.Tensor)``; any op on a marker returns a plain tensor)."""
    return x.view_as(x)


@dataclass(frozen=True)
class Markers:
    """The marker types of one traced slot (fused.py, "Under torch.compile"):

    ``cos``: the pre-hook marked the call's ``cos`` (this call takes the marked route);
    ``q``/``k``: the RoPE wrapper's outputs, rotated once; ``k_op``: the wrapper's key when
    the fused Q/K op (``rope_rotate_qk``) made it, which the cache view may write into a static
    cache with ``kv_store`` (cache._store_static; a key in plain torch ops is left to the
    cache's own write, which inductor can fuse it into); ``keys``: what the cache view returns
    in a marked call (tells the attention function that the call was marked)."""

    slot: int
    cos: type
    q: type
    k: type
    k_op: type
    keys: type

    @classmethod
    def for_slot(cls, slot: int) -> Markers:
        return cls(slot, **{
            role: type(f"HadamardKQ{role.capitalize()}{slot}", (Marker,), {"hkq_slot": slot})
            for role in ("cos", "q", "k", "k_op", "keys")
        })


@dataclass(frozen=True, eq=False)
class LayerSpec:
    """The rotations and cache plumbing of one attention module (shared by equal modules).

    ``kwarg_name``/``arg_index``: where the module's forward takes the cache (found once at
    install time). ``kv_quant``: *we* attached compressed-tensors' ``QuantizedKVCache`` to
    this module (read from the module's ``KV_QUANTIZER_ATTR`` per call, so a deep copy uses
    its own; see cache.key_rotation_pre_hook). ``fused``: the module was given the fused RoPE
    path at install (whether it still has it is read per call). ``traced``: the load probe
    saw this module's q and k go through the *marked* route (fused.py, "Under
    torch.compile"): under torch.compile its pre-hook marks ``cos`` and its RoPE call rotates
    q and k; the :data:`MARKERS` of its slot say so. ``home`` (``traced`` entries): the
    modeling module whose ``apply_rotary_pos_emb`` the module calls, read by the pre-hook
    from here rather than from the module so that it costs no guards per layer."""

    q: Optional[Rotation]
    k: Optional[Rotation]
    kwarg_name: Optional[str] = None
    arg_index: Optional[int] = None
    kv_quant: bool = False
    fused: bool = False
    traced: bool = False
    home: Optional[str] = None


#: slot -> spec. Read by the hot path (cache.key_rotation_pre_hook, attention.py).
SPECS: dict[int, LayerSpec] = {}
#: slot -> the marker types of a ``traced`` entry (present exactly while the entry is).
MARKERS: dict[int, Markers] = {}
_SLOTS: dict[tuple, int] = {}
_REFS: dict[int, int] = {}
_NEXT = itertools.count()  # slots are never reused: a guard on a slot means one entry
_LOCK = threading.RLock()


def _rotation_key(rotation: Optional[Rotation]) -> Optional[tuple]:
    """What the hot path reads of a rotation (cache.rotate): equal keys rotate identically.
    A matrix that is not in a module buffer is read from the rotation itself, so it is
    compared by identity (the entry keeps it alive, so the id stays unique)."""
    if rotation is None:
        return None
    own_matrix = id(rotation.matrix) if rotation.buffer is None and rotation.matrix is not None \
        else None
    return (rotation.scale, rotation.block, rotation.buffer, rotation.cast, own_matrix)


def _spec_key(spec: LayerSpec) -> tuple:
    return (_rotation_key(spec.q), _rotation_key(spec.k), spec.kwarg_name, spec.arg_index,
            spec.kv_quant, spec.fused, spec.traced, spec.home)


def _acquire(spec: LayerSpec) -> int:
    """The slot of an entry equal to ``spec`` (added if new), with one reference taken.

    The reference is taken right after the lookup, with nothing in between that allocates
    (so no garbage collection can run a ticket's finalizer and drop the entry first), and
    under a reentrant lock (finalizers run on whichever thread collects)."""
    key = _spec_key(spec)
    with _LOCK:
        slot = _SLOTS.get(key)
        if slot is not None:
            _REFS[slot] += 1
            return slot
        slot = next(_NEXT)
        _REFS[slot] = 1
        SPECS[slot] = spec
        if spec.traced:
            MARKERS[slot] = Markers.for_slot(slot)
        _SLOTS[key] = slot
        return slot


def _release(slot: int) -> None:
    with _LOCK:
        _REFS[slot] -= 1
        if _REFS[slot] == 0:
            del _REFS[slot], _SLOTS[_spec_key(SPECS.pop(slot))]
            MARKERS.pop(slot, None)


class _Ticket:
    """A module's reference to its slot: the entry lives while any module holds a ticket.

    Kept in the module's ``__dict__`` next to the slot, so it goes where the module goes: a
    ``copy.deepcopy`` of an installed model copies the ticket (one more reference, same
    entry) and keeps working after the original is removed or collected; a dropped module
    releases its reference when the ticket is collected."""

    __slots__ = ("__weakref__", "slot")

    def __init__(self, slot: int) -> None:
        """Owns one reference to ``slot``, already taken by :func:`_acquire`."""
        self.slot = slot
        weakref.finalize(self, _release, slot)

    def __copy__(self) -> _Ticket:
        return _Ticket(_acquire(SPECS[self.slot]))

    def __deepcopy__(self, memo: dict) -> _Ticket:
        return self.__copy__()

    def __reduce__(self):
        raise TypeError(
            "hf_hadamard_kq: a model with R3 installed cannot be pickled (its rotation lives "
            "in hooks and a per-process table); save it with hf_hadamard_kq.save_r3_pretrained "
            "and load it with attn_implementation='hadamard_kq'"
        )


def attach(module: Any, spec: LayerSpec) -> None:
    """Give ``module`` the slot of an entry equal to ``spec`` (added if new)."""
    slot = _acquire(spec)
    module.__dict__[_TICKET_ATTR] = _Ticket(slot)
    module.__dict__[SLOT_ATTR] = slot


def detach(module: Any) -> None:
    """Remove ``module``'s slot (its entry goes when no module uses it any more)."""
    module.__dict__.pop(SLOT_ATTR, None)
    module.__dict__.pop(_TICKET_ATTR, None)
