"""Architecture matrix: every decoder in tests/tiny_models.ARCHS, rotated two ways.

* ``apply_r3`` on the loaded model (default targets derived from its attention modules);
* ``save_r3_pretrained`` -> ``from_pretrained(..., attn_implementation="hadamard_kq[_eager]")``.

For each: prefill logits (left-padded batch, prompt longer than the sliding window) and two
greedy decode steps equal the unrotated model and compressed-tensors' runtime transforms
(fp32, atol 1e-5), and the cached keys equal the float64 rotation of the unrotated model's
cached keys. Architectures with another attention design are refused at load, naming the
class. README's architecture table is generated from the same table (tests/gen_arch_table.py)
and checked here to be current.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import hf_hadamard_kq
from hf_hadamard_kq import HadamardKQConfigError
from hf_hadamard_kq.install import attention_modules, installed_plan
from tests import tiny_models as tm

ATOL = 1e-5
NAMES = list(tm.ARCHS)


def assert_same_logits(got, want, atol=ATOL):
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want)):
        assert tm.max_diff(a, b) < atol, f"step {step}: max diff {tm.max_diff(a, b):.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_apply_r3_matches_unrotated_and_compressed_tensors(name):
    plain = tm.base_model(name)
    ours = tm.rotated(name)
    plan = installed_plan(ours)
    # every attention module of the model is rotated, and the default targets name them
    assert sorted(plan.layers) == sorted(attention_modules(ours))
    assert len(plan.layers) == tm.COMMON["num_hidden_layers"]
    leaf = next(iter(plan.layers)).rsplit(".", 1)[-1]
    targets = plan.transform_config["config_groups"]["R3"]["apply"][0]["targets"]
    assert targets == [f"re:.*{leaf}$"]
    ct = tm.ct_model(name, plan.transform_config)

    ids, mask = tm.prompt()
    want, c_plain = tm.prefill_and_decode(plain, ids, mask)
    got, c_ours = tm.prefill_and_decode(ours, ids, mask)
    ref, c_ct = tm.prefill_and_decode(ct, ids, mask)
    assert_same_logits(got, want)
    assert_same_logits(got, ref)
    tm.assert_keys_rotated(c_ours, c_plain)
    for a, b in zip(tm.cache_keys(c_ours), tm.cache_keys(c_ct)):
        assert tm.max_diff(a, b) < ATOL * max(1.0, b.abs().max().item())
    # without a cache (training / scoring): keys rotated by the cache-less view
    valid = mask.bool()
    with torch.no_grad():
        no_cache = ours(ids, attention_mask=mask, use_cache=False).logits[valid]
        assert tm.max_diff(no_cache, plain(ids, attention_mask=mask,
                                           use_cache=False).logits[valid]) < ATOL


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip(name, tmp_path):
    arch = tm.ARCHS[name]
    plain = tm.base_model(name)
    hf_hadamard_kq.save_r3_pretrained(tm.rotated(name), tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "transform_config" in saved["quantization_config"]
    loaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation=tm.hkq_impl(arch), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert sorted(installed_plan(loaded).layers) == sorted(attention_modules(loaded))

    ids, mask = tm.prompt(seed=1)
    want, c_plain = tm.prefill_and_decode(plain, ids, mask)
    got, c_ours = tm.prefill_and_decode(loaded, ids, mask)
    assert_same_logits(got, want)
    tm.assert_keys_rotated(c_ours, c_plain)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(ids, attention_mask=mask, **kw),
                       plain.generate(ids, attention_mask=mask, **kw))


def test_default_targets_fall_back_to_exact_names():
    """If ``re:.*<leaf>$`` would also match a non-attention module, apply_r3's default targets
    are the exact attention module names."""
    from hf_hadamard_kq.api import r3_targets

    model = tm.fresh("llama")
    model.model.add_module("extra_self_attn", torch.nn.Identity())
    assert r3_targets(model) == sorted(attention_modules(model))
    hf_hadamard_kq.apply_r3(model)
    assert sorted(installed_plan(model).layers) == sorted(attention_modules(model))


def test_partial_rotary_is_really_partial():
    """GPT-NeoX / StableLM run with RoPE on 25% of head_dim; R3 rotates all of it."""
    neox = tm.base_model("gpt_neox")
    attn = next(iter(attention_modules(neox).values()))
    assert attn.rotary_ndims == tm.HEAD_DIM // 4
    stablelm = tm.base_model("stablelm")
    rope = stablelm.model.rotary_emb
    assert rope.inv_freq.numel() * 2 == tm.HEAD_DIM // 4


def test_sdpa_refused_where_the_model_does_not_support_it():
    """Gemma2's softcap needs the eager (or flex) inner backend; sdpa is refused by name."""
    model = tm.fresh("gemma2")
    # 5.24: Gemma2 declares no sdpa support -> refused before installing; 5.17 declares it
    # (and its sdpa silently drops softcap) -> the load probe sees softcap and refuses
    with pytest.raises(HadamardKQConfigError,
                       match="Gemma2.*(does not support sdpa|passes softcap).*hadamard_kq_eager"):
        hf_hadamard_kq.apply_r3(model, attn_implementation="hadamard_kq")
    assert installed_plan(model) is None and model.config._attn_implementation == "eager"


# ---------------------------------------------------------------- refused architectures


def _refused_model(name):
    cls_name, kwargs, _ = tm.REFUSED[name]
    cls = tm.config_class(cls_name)
    if cls is None:
        pytest.skip(f"this transformers version has no {cls_name}")
    auto = AutoModelForSeq2SeqLM if name in tm.SEQ2SEQ else AutoModelForCausalLM
    torch.manual_seed(0)
    return auto, auto.from_config(cls(**kwargs), attn_implementation="eager").eval()


@pytest.mark.parametrize("explicit_config", [False, True])
@pytest.mark.parametrize("name", list(tm.REFUSED))
def test_refused_by_apply_r3(name, explicit_config):
    _, model = _refused_model(name)
    config = hf_hadamard_kq.default_r3_config(head_dim=tm.HEAD_DIM) if explicit_config else None
    with pytest.raises(HadamardKQConfigError,
                       match=f"{type(model).__name__} is not supported.*{tm.REFUSED[name][2]}"):
        hf_hadamard_kq.apply_r3(model, config, attn_implementation="hadamard_kq_eager")
    assert installed_plan(model) is None


@pytest.mark.parametrize("name", ["deepseek_v3", "gemma3n", "bart"])
def test_refused_at_load(name, tmp_path):
    """An R3 checkpoint of an unsupported architecture fails at load naming the class."""
    auto, model = _refused_model(name)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "transform_config": hf_hadamard_kq.default_r3_config(head_dim=tm.HEAD_DIM),
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(HadamardKQConfigError,
                           match=f"{type(model).__name__} is not supported.*"
                                 f"{tm.REFUSED[name][2]}"):
            auto.from_pretrained(tmp_path, attn_implementation="hadamard_kq_eager")


# ---------------------------------------------------------------- README


def test_readme_architecture_table_is_current():
    from tests.gen_arch_table import README, render, section

    assert section(README.read_text()) == render(), (
        "README's architecture table is stale: run `python -m tests.gen_arch_table`")
