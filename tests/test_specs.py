"""The interned per-layer spec table (hf_hadamard_kq/specs.py) and why it exists: few guards
per layer in a compiled decode step."""

from __future__ import annotations

import gc

import pytest
import torch

import hf_hadamard_kq
from hf_hadamard_kq import specs
from tests import tiny_models as tm


def _attention_modules(model):
    return [m for m in model.modules() if specs.SLOT_ATTR in m.__dict__]


def test_uniform_layers_share_one_entry_and_remove_releases_it():
    before = dict(specs.SPECS)
    model = tm.rotated("llama")
    mods = _attention_modules(model)
    assert len(mods) == tm.COMMON["num_hidden_layers"]
    slots = {m.__dict__[specs.SLOT_ATTR] for m in mods}
    assert len(slots) == 1
    spec = specs.SPECS[slots.pop()]
    assert spec.q.block == spec.k.block == tm.HEAD_DIM
    assert spec.q.scale == spec.k.scale == tm.HEAD_DIM ** -0.5
    assert spec.kwarg_name in ("cache", "past_key_values")
    # a second model with the same rotation reuses the entry
    other = tm.rotated("llama")
    assert {m.__dict__[specs.SLOT_ATTR] for m in _attention_modules(other)} == {
        mods[0].__dict__[specs.SLOT_ATTR]}
    assert len(specs.SPECS) == len(before) + 1
    hf_hadamard_kq.remove_r3(model)
    assert not _attention_modules(model)
    assert len(specs.SPECS) == len(before) + 1  # still used by `other`
    hf_hadamard_kq.remove_r3(other)
    assert specs.SPECS == before


def test_garbage_collected_model_releases_its_entries():
    before = dict(specs.SPECS)
    model = tm.rotated("llama")
    assert len(specs.SPECS) > len(before)
    del model
    gc.collect()
    assert specs.SPECS == before


def test_different_rotations_get_different_entries():
    a = tm.rotated("llama")
    b = hf_hadamard_kq.apply_r3(tm.fresh("llama"), hf_hadamard_kq.default_r3_config(head_dim=8))
    slot_a = {m.__dict__[specs.SLOT_ATTR] for m in _attention_modules(a)}
    slot_b = {m.__dict__[specs.SLOT_ATTR] for m in _attention_modules(b)}
    assert len(slot_a) == len(slot_b) == 1 and slot_a != slot_b
    assert specs.SPECS[slot_b.pop()].q.block == 8


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
    slot table it adds one int and the pre-hook's own (~15)."""
    try:
        plain = _guard_lines(4, False) - _guard_lines(2, False)
        ours = _guard_lines(4, True) - _guard_lines(2, True)
    finally:
        torch._dynamo.reset()
    extra_per_layer = (ours - plain) / 2
    assert 0 < extra_per_layer <= 20, (plain / 2, ours / 2)
