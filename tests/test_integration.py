"""from_pretrained(..., attn_implementation="hadamard_kq") on real llm-compressor checkpoints.

References: the unrotated checkpoint (R3 preserves q.k^T, so logits must match), a float64
hand rotation (tests/oracles.py) and compressed-tensors' own runtime transforms.
fp32 tolerance: atol 1e-5 on logits (measured differences are ~1e-7).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DynamicCache

import hf_hadamard_kq
from hf_hadamard_kq import HadamardKQConfigError
from tests.conftest import FIXTURES
from tests.oracles import (
    ct_runtime_model,
    hand_rotated_model,
    load_unrotated,
    rotate64,
    with_cache,
)

ATOL = 1e-5


def load_r3(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="hadamard_kq", **kwargs)


def ids(batch=2, seq=9, seed=0):
    return torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name,block", [("llama_r3_hadamard_hd16", 16),
                                        ("llama_r3_hadamard_hd64", 64)])
def test_logits_match_unrotated_hand_rotation_and_compressed_tensors(name, block):
    path = FIXTURES / name
    x = ids()
    ours = load_r3(path)
    with torch.no_grad():
        got = ours(x).logits
        plain = load_unrotated(path)(x).logits
        hand = hand_rotated_model(path, block)(x).logits
        ct = ct_runtime_model(path)(x).logits
    # the rotation really happens: our logits equal the rotated references...
    assert max_diff(got, hand) < ATOL
    assert max_diff(got, ct) < ATOL
    # ...and R3 preserves q.k^T, so they also equal the unrotated model
    assert max_diff(got, plain) < ATOL


def test_load_is_quiet_and_drops_r3_tensors(r3_hd16):
    model, info = load_r3(r3_hd16, output_loading_info=True)
    assert info["unexpected_keys"] == set() or not info["unexpected_keys"]
    assert not info["missing_keys"]
    assert not any("R3" in k for k in model.state_dict())


def filled_cache(model, x):
    """A DynamicCache after one forward of ``x``."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(x, **with_cache(model, cache))
    return cache


def test_cached_keys_are_rotated_unrotated_keys(r3_hd16):
    x = ids()
    c_ours, c_plain = filled_cache(load_r3(r3_hd16), x), filled_cache(load_unrotated(r3_hd16), x)
    for i, (layer_ours, layer_plain) in enumerate(zip(c_ours.layers, c_plain.layers)):
        expected = rotate64(layer_plain.keys, 16)
        assert max_diff(layer_ours.keys, expected) < ATOL
        assert max_diff(layer_ours.keys, layer_plain.keys) > 1e-2  # really rotated
        # values are never rotated (layer 0 bit-exact; later layers see ~1e-7 input noise)
        assert max_diff(layer_ours.values, layer_plain.values) <= (0.0 if i == 0 else ATOL)


def test_compressed_tensors_cached_keys_match(r3_hd16):
    """compressed-tensors' runtime puts the same rotated keys in the cache as we do."""
    x = ids()
    c_ours, c_ct = filled_cache(load_r3(r3_hd16), x), filled_cache(ct_runtime_model(r3_hd16), x)
    for a, b in zip(c_ours.layers, c_ct.layers):
        assert max_diff(a.keys, b.keys) < ATOL


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "general"])
def test_decode_rotates_only_new_rows(r3_hd16, monkeypatch, fused):
    """Per layer and step: one rotation of the new K rows and one of the new Q rows, never of
    the cache — on the fused path (both at RoPE time) and on the general path (K in
    cache.update, Q in the attention function)."""
    import hf_hadamard_kq.attention as attention_mod
    import hf_hadamard_kq.cache as cache_mod
    import hf_hadamard_kq.fused as fused_mod

    if not fused:
        monkeypatch.setenv(fused_mod.DISABLE_ENV, "1")
    model = load_r3(r3_hd16)
    seen = []
    rotate, apply = cache_mod.rotate, fused_mod.hadamard_apply

    def spy(where, fn):
        def wrapped(x, *args):
            seen.append((where, tuple(x.shape)))
            return fn(x, *args)
        return wrapped

    monkeypatch.setattr(cache_mod, "rotate", spy("k", rotate))
    monkeypatch.setattr(attention_mod, "rotate", spy("q", rotate))
    monkeypatch.setattr(fused_mod, "hadamard_apply", spy("rope", apply))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids(batch=2, seq=7), **with_cache(model, cache))
        seen.clear()
        model(ids(batch=2, seq=1, seed=1), **with_cache(model, cache))
    # one decode step: per layer one K row per kv head and one Q row, never the whole cache
    if fused:
        want = [("rope", (2, 4, 1, 16)), ("rope", (2, 2, 1, 16))] * 2
    else:
        want = [("k", (2, 2, 1, 16)), ("q", (2, 4, 1, 16))] * 2
    assert seen == want


def test_padded_batch_and_multi_token_continuation(r3_hd16):
    ours, plain = load_r3(r3_hd16), load_unrotated(r3_hd16)
    x = ids(batch=3, seq=10)
    mask = torch.ones_like(x)
    mask[0, :4] = 0  # left padding
    mask[1, :1] = 0
    with torch.no_grad():
        assert max_diff(ours(x, attention_mask=mask).logits[mask.bool()],
                        plain(x, attention_mask=mask).logits[mask.bool()]) < ATOL
        # prefill 6 tokens, then 4 at once on the filled cache
        results = []
        for model in (ours, plain):
            cache = DynamicCache(config=model.config)
            model(x[:, :6], attention_mask=mask[:, :6], **with_cache(model, cache))
            out = model(x[:, 6:], attention_mask=mask, **with_cache(model, cache))
            results.append(out.logits)
    assert max_diff(*results) < ATOL


GEN_CASES = {
    "greedy": dict(do_sample=False),
    "greedy_no_cache": dict(do_sample=False, use_cache=False),
    "static": dict(do_sample=False, cache_implementation="static"),
    "beam": dict(do_sample=False, num_beams=3),
    "sample": dict(do_sample=True, top_k=20, temperature=0.8),
    "quantized_fp8": dict(do_sample=False, cache_implementation="quantized",
                          cache_config={"backend": "fp8"}),
}


@pytest.mark.parametrize("case", list(GEN_CASES))
def test_generate_matches_unrotated_and_ct(r3_hd16, case):
    if case == "quantized_fp8":
        from transformers.cache_utils import QuantizedCache

        if "fp8" not in (QuantizedCache.__init__.__doc__ or "") + (QuantizedCache.__doc__ or ""):
            pytest.skip("this transformers version has no fp8 QuantizedCache backend")
    kwargs = dict(max_new_tokens=8, pad_token_id=0, **GEN_CASES[case])
    x = ids(batch=2, seq=6)
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    outs = {}
    for label, model in (("ours", load_r3(r3_hd16)), ("plain", load_unrotated(r3_hd16)),
                         ("ct", ct_runtime_model(r3_hd16))):
        torch.manual_seed(1234)
        outs[label] = model.generate(x, attention_mask=mask, **kwargs)
    if case == "quantized_fp8":
        # fp8 keys: rotated and unrotated caches quantize differently, so only the
        # rotated-cache references (compressed-tensors) must agree token for token
        assert torch.equal(outs["ours"], outs["ct"])
    else:
        assert torch.equal(outs["ours"], outs["plain"])
        assert torch.equal(outs["ours"], outs["ct"])


def test_save_round_trip(r3_hd16, tmp_path):
    model = load_r3(r3_hd16)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((r3_hd16 / "config.json").read_text())
    assert (config["quantization_config"]["transform_config"]
            == original["quantization_config"]["transform_config"])
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = f.get_tensor("model.layers.0.self_attn.R3_q_attn.weight")
    with safe_open(str(r3_hd16 / "model.safetensors"), "pt") as f:
        assert torch.equal(stored, f.get_tensor("model.layers.0.self_attn.R3_q_attn.weight"))
    x = ids()
    with torch.no_grad():
        assert max_diff(load_r3(tmp_path)(x).logits, model(x).logits) == 0.0
        # compressed-tensors' runtime reads the re-saved checkpoint too
        assert max_diff(ct_runtime_model(tmp_path)(x).logits, model(x).logits) < ATOL


def test_describe_lists_every_layer(r3_hd16):
    text = hf_hadamard_kq.describe(load_r3(r3_hd16))
    assert text.count("hadamard b=16") == 4
    rows = hf_hadamard_kq.rotation_table(load_r3(r3_hd16))
    assert [r["module"] for r in rows] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(r["q"]["block"] == 16 and r["k"]["block"] == 16 for r in rows)


def test_eager_inner_backend(r3_hd16):
    x = ids()
    model = AutoModelForCausalLM.from_pretrained(r3_hd16, attn_implementation="hadamard_kq_eager")
    with torch.no_grad():
        assert max_diff(model(x).logits, load_unrotated(r3_hd16)(x).logits) < ATOL


# ---------------------------------------------------------------- errors at load


def _copy_fixture(src, dst, edit_config=None, edit_tensors=None):
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        tensors = load_file(str(dst / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _r3_group(cfg):
    return cfg["quantization_config"]["transform_config"]["config_groups"]["R3"]


def test_error_no_transform_config(r3_hd16, tmp_path):
    def drop(cfg):
        cfg.pop("quantization_config")

    path = _copy_fixture(r3_hd16, tmp_path / "m", edit_config=drop)
    with pytest.raises(HadamardKQConfigError, match="nothing to rotate.*apply_r3"):
        load_r3(path)


def test_error_head_dim_mismatch(r3_hd16, tmp_path):
    path = _copy_fixture(r3_hd16, tmp_path / "m",
                         edit_config=lambda c: _r3_group(c).update(head_dim=32))
    with pytest.raises(HadamardKQConfigError, match=r"head_dim=32.*self_attn.*head_dim is 16"):
        load_r3(path)


def test_error_stored_matrix_mismatch(r3_hd16, tmp_path):
    def corrupt(t):
        t["model.layers.0.self_attn.R3_q_attn.weight"][3, 5] *= -1

    path = _copy_fixture(r3_hd16, tmp_path / "m", edit_tensors=corrupt)
    with pytest.raises(HadamardKQConfigError, match=r"R3_q_attn\.weight.*not the unnormalised"):
        load_r3(path)


@pytest.mark.parametrize("fixture", ["llama_r3_randhad_hd16", "llama_r3_randomize_hd16"])
def test_random_types_from_llm_compressor(fixture):
    """random-hadamard and randomize=true (stored .perm), as llm-compressor writes them: the
    stored matrices are kept as buffers and equal compressed-tensors' runtime (logits and
    cached keys); R3 preserves q.k^T, so the logits also equal the unrotated model's."""
    path = FIXTURES / fixture
    x = ids()
    ours, info = load_r3(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("R3" in k for k in ours.state_dict())
    attn = ours.model.layers[1].self_attn
    assert "_hadamard_kq_qk" in dict(attn.named_buffers())
    ct = ct_runtime_model(path)
    c_ours, c_ct = DynamicCache(config=ours.config), DynamicCache(config=ct.config)
    with torch.no_grad():
        got = ours(x, **with_cache(ours, c_ours)).logits
        want = ct(x, **with_cache(ct, c_ct)).logits
        plain = load_unrotated(path)(x).logits
    assert max_diff(got, want) < ATOL and max_diff(got, plain) < ATOL
    for a, b in zip(c_ours.layers, c_ct.layers):
        assert max_diff(a.keys, b.keys) < ATOL


def test_error_non_r3_location(r3_hd16, tmp_path):
    def add_r4(cfg):
        cfg["quantization_config"]["transform_config"]["config_groups"]["R4"] = {
            "type": "hadamard", "apply": [{"targets": ["re:.*down_proj$"], "location": "input"}]}

    path = _copy_fixture(r3_hd16, tmp_path / "m", edit_config=add_r4)
    with pytest.raises(HadamardKQConfigError, match="group 'R4'.*location 'input'"):
        load_r3(path)


def test_error_attention_pattern_violated(r3_hd16, monkeypatch):
    """An attention that never writes keys through cache.update is refused at load."""
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaAttention.forward

    def no_cache_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                         cache=None, past_key_values=None, **kwargs):
        return original(self, hidden_states, position_embeddings, attention_mask, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", no_cache_forward)
    with pytest.raises(HadamardKQConfigError, match="does not follow proj -> RoPE"):
        load_r3(r3_hd16)


def test_error_refuses_to_rotate_twice(r3_hd16):
    model = ct_runtime_model(r3_hd16)
    with pytest.raises(HadamardKQConfigError, match="Refusing to rotate twice"):
        hf_hadamard_kq.apply_r3(model)
    model = load_r3(r3_hd16)
    with pytest.raises(HadamardKQConfigError, match="already installed"):
        hf_hadamard_kq.apply_r3(model)


def test_warns_when_r3_checkpoint_loaded_without_hadamard_kq(r3_hd16):
    with pytest.warns(UserWarning, match="Q/K are NOT rotated"):
        AutoModelForCausalLM.from_pretrained(r3_hd16, attn_implementation="sdpa")


def test_apply_r3_on_plain_model_matches_ct():
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.oracles import _teach_ct_cache_kwarg

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=2, intermediate_size=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # make q/k large so a missing rotation would show
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    ct = LlamaForCausalLM(copy.deepcopy(cfg)).eval()  # CT switches its config's attention
    ct.load_state_dict(model.state_dict())
    x = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        ref = model(x).logits
    hf_hadamard_kq.apply_r3(model)
    _teach_ct_cache_kwarg()
    config = hf_hadamard_kq.default_r3_config(head_dim=16)
    apply_transform_config(ct, TransformConfig.model_validate(config))
    cache_a, cache_b = DynamicCache(config=cfg), DynamicCache(config=cfg)
    with torch.no_grad():
        got = model(x, **with_cache(model, cache_a)).logits
        want = ct(x, **with_cache(ct, cache_b)).logits
    assert max_diff(got, want) < ATOL and max_diff(got, ref) < ATOL
    for a, b in zip(cache_a.layers, cache_b.layers):
        assert max_diff(a.keys, b.keys) < ATOL
    hf_hadamard_kq.remove_r3(model)
    assert model.config._attn_implementation == "sdpa"


def test_failure_mid_install_leaves_nothing_and_a_retry_rotates_once(monkeypatch):
    """A failure while installing (here the second module's matrices, as out of memory
    would) removes everything installed so far: no pre-hook, slot or matrix buffer is left and
    the model runs as the plain model. A retry with another seed then uses its own matrices
    (not a leftover buffer) and passes the load probe (each key rotated once)."""
    from hf_hadamard_kq import install, specs
    from tests import tiny_models as tm

    cfg = hf_hadamard_kq.default_r3_config(transform_type="random-hadamard",
                                           head_dim=tm.HEAD_DIM)
    model, plain = tm.fresh("llama"), tm.base_model("llama")
    x, _ = tm.prompt(batch=1)
    original = install._attach_matrices
    calls = []

    def failing(module, layer):
        calls.append(layer.name)
        if len(calls) == 2:
            raise MemoryError("simulated")
        return original(module, layer)

    monkeypatch.setattr(install, "_attach_matrices", failing)
    with pytest.raises(MemoryError):
        hf_hadamard_kq.apply_r3(model, cfg, seed=1)
    assert len(calls) == 2
    for module in install.attention_modules(model).values():
        assert not module._forward_pre_hooks and not module._forward_hooks
        assert specs.SLOT_ATTR not in module.__dict__
        assert not [n for n in module._buffers if n.startswith("_hadamard_kq")]
    with torch.no_grad():
        assert torch.equal(model(x).logits, plain(x).logits)
    monkeypatch.setattr(install, "_attach_matrices", original)
    hf_hadamard_kq.apply_r3(model, cfg, seed=2)
    want = hf_hadamard_kq.apply_r3(tm.fresh("llama"), cfg, seed=2)
    for mine, theirs in zip(install.attention_modules(model).values(),
                            install.attention_modules(want).values()):
        bufs = {n: b for n, b in mine._buffers.items() if n.startswith("_hadamard_kq")}
        assert bufs and all(torch.equal(b, theirs._buffers[n]) for n, b in bufs.items())
    cache_ours, cache_plain = DynamicCache(config=model.config), DynamicCache(config=plain.config)
    with torch.no_grad():
        model(x, **tm.with_cache(model, cache_ours))
        plain(x, **tm.with_cache(plain, cache_plain))
    for layer, (k_ours, k_plain) in enumerate(zip(tm.cache_keys(cache_ours),
                                                  tm.cache_keys(cache_plain))):
        module = list(install.attention_modules(model).values())[layer]
        k_rot = specs.SPECS[module.__dict__[specs.SLOT_ATTR]].k
        w = module._buffers[k_rot.buffer].double()
        ref = (k_plain.double() @ w) * k_rot.scale  # one block: head_dim
        assert max_diff(k_ours, ref) < 1e-4, layer
