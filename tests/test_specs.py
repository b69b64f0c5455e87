"""The interned per-layer spec table (hf_hadamard_kq/specs.py) and why it exists: few guards
per layer in a compiled decode step."""

from __future__ import annotations

import copy
import gc

import pytest
import torch

import hf_hadamard_kq
from hf_hadamard_kq import specs
from tests import tiny_models as tm


def _attention_modules(model):
    return [m for m in model.modules() if specs.SLOT_ATTR in m.__dict__]


def _slots(model) -> set[int]:
    return {m.__dict__[specs.SLOT_ATTR] for m in _attention_modules(model)}


def _settled() -> dict:
    """SPECS once models dropped by earlier tests are collected (their entries go then)."""
    gc.collect()
    return dict(specs.SPECS)


def _config(head_dim: int) -> dict:
    """A rotation no other test uses (its own entry), from the default R3 config."""
    return hf_hadamard_kq.default_r3_config(head_dim=head_dim)


def test_uniform_layers_share_one_entry_and_remove_releases_it():
    before = _settled()
    model = hf_hadamard_kq.apply_r3(tm.fresh("llama"), _config(4))
    mods = _attention_modules(model)
    assert len(mods) == tm.COMMON["num_hidden_layers"]
    slots = _slots(model)
    assert len(slots) == 1
    slot = next(iter(slots))
    assert slot not in before
    spec = specs.SPECS[slot]
    assert spec.q.block == spec.k.block == 4
    assert spec.q.scale == spec.k.scale == 0.5
    assert spec.kwarg_name in ("cache", "past_key_values")
    other = hf_hadamard_kq.apply_r3(tm.fresh("llama"), _config(4))  # the same rotation
    assert _slots(other) == {slot}
    assert set(specs.SPECS) - set(before) == {slot}
    hf_hadamard_kq.remove_r3(model)
    assert not _attention_modules(model)
    assert slot in specs.SPECS  # still used by `other`
    hf_hadamard_kq.remove_r3(other)
    assert slot not in specs.SPECS
    assert specs.SPECS == before


def test_garbage_collected_model_releases_its_entries():
    before = _settled()
    model = hf_hadamard_kq.apply_r3(tm.fresh("llama"), _config(4))
    slot = next(iter(_slots(model)))
    assert slot in specs.SPECS and slot not in before
    del model
    assert _settled() == before


def test_deep_copy_keeps_working_after_the_original_is_removed():
    """A deep copy holds its own reference to the entry (the modules' tickets are copied)."""
    before = _settled()
    model = hf_hadamard_kq.apply_r3(tm.fresh("llama"), _config(4))
    twin = copy.deepcopy(model)
    ids, mask = tm.prompt()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    hf_hadamard_kq.remove_r3(model)
    del model
    gc.collect()
    assert _slots(twin) and _slots(twin) <= set(specs.SPECS)
    with torch.no_grad():
        assert torch.equal(twin(ids, attention_mask=mask).logits, want)
    del twin
    assert _settled() == before


def test_installed_model_refuses_pickling_with_a_clear_error():
    import pickle

    model = hf_hadamard_kq.apply_r3(tm.fresh("llama"), _config(4))
    with pytest.raises(TypeError, match="save_r3_pretrained"):
        pickle.dumps(model)


def test_different_rotations_get_different_entries():
    a = hf_hadamard_kq.apply_r3(tm.fresh("llama"), _config(4))
    b = hf_hadamard_kq.apply_r3(tm.fresh("llama"), _config(8))
    assert len(_slots(a)) == len(_slots(b)) == 1 and _slots(a) != _slots(b)
    assert specs.SPECS[next(iter(_slots(b)))].q.block == 8


def test_attention_on_a_model_without_a_plan_refuses_to_run():
    """The attention function never runs unrotated on a module that has no slot."""
    from hf_hadamard_kq.attention import HadamardKQNotInstalledError

    model = tm.fresh("llama")
    model.set_attn_implementation("hadamard_kq")
    ids, mask = tm.prompt()
    with pytest.raises(HadamardKQNotInstalledError, match="no rotation plan installed"):
        model(ids, attention_mask=mask)


def _guard_lines(layers: int, rotated: bool) -> int:
    """Lines of dynamo's guard tree for a compiled decode step of a tiny Llama."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    if rotated:
        hf_hadamard_kq.apply_r3(model)
    cache = StaticCache(config=model.config, max_cache_len=32)
    torch._dynamo.reset()
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 8)), past_key_values=cache, cache_position=torch.arange(8))
        step = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
        step(torch.tensor([[5]]), past_key_values=cache, cache_position=torch.tensor([8]))
    entries = _debug_get_cache_entry_list(type(model).forward.__code__)
    assert len(entries) == 1, "expected one compiled entry for the decode step"
    return len(str(entries[0].guard_manager).splitlines())


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_compiled_step_guards_few_lines_per_layer():
    """dynamo evaluates every guard before each call of a compiled decode step, so guards per
    layer are host time per token. With the plan read from per-layer closures and objects, a
    rotated layer added 52 guard-tree lines to the plain layer's ~216 (torch 2.13); with the
    slot table it adds one int and the pre-hook's own: 15 on the marked route (19 while the
    pre-hook read the layer's RoPE home from the module instead of its slot), and 10 more for
    the hand-off post-hook of a fused-eligible layer (fused.handoff_post_hook: the hooks dict,
    the hook's code, its always-called entry): 25."""
    try:
        plain = _guard_lines(4, False) - _guard_lines(2, False)
        ours = _guard_lines(4, True) - _guard_lines(2, True)
    finally:
        torch._dynamo.reset()
    extra_per_layer = (ours - plain) / 2
    assert 0 < extra_per_layer <= 25, (plain / 2, ours / 2)


def test_collection_while_attaching_keeps_the_shared_entry(monkeypatch):
    """A garbage collection in the middle of attaching (here: when each ticket is made) may
    collect a dropped model that held the last reference to the same entry; the new module's
    reference is taken before that, so the entry survives and the model runs."""
    before = _settled()
    dropped = hf_hadamard_kq.apply_r3(tm.fresh("llama"), _config(4))
    slot = next(iter(_slots(dropped)))
    cycle: list = [dropped]
    cycle.append(cycle)  # reachable only through a cycle: freed by the collector, not at del
    made = specs._Ticket.__init__

    def collecting_init(self, slot_):
        gc.collect()
        made(self, slot_)

    fresh = tm.fresh("llama")
    monkeypatch.setattr(specs._Ticket, "__init__", collecting_init)
    gc.disable()  # the only collection is the one in the middle of attaching
    del dropped, cycle
    try:
        model = hf_hadamard_kq.apply_r3(fresh, _config(4))
    finally:
        gc.enable()
        monkeypatch.undo()
    assert _slots(model) == {slot} and slot in specs.SPECS
    ids, mask = tm.prompt()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    hf_hadamard_kq.remove_r3(model)
    assert _settled() == before
