"""The simulated quantized KV cache used by ``eval`` and the research notebook."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import hf_hadamard_kq
from hf_hadamard_kq.kv_quant import (
    FakeQuantCache,
    KVQuantSpec,
    attention_errors,
    fake_quant,
    outlier_stats,
    relative_error,
)
from hf_hadamard_kq.research import builtin_text, cache_kwarg, perplexity
from tests.conftest import FIXTURES


def test_int_grid_levels_and_exact_endpoints():
    x = torch.randn(3, 2, 64, 16)
    for bits in (2, 4, 8):
        y = fake_quant(x, f"int{bits}", "token")
        for row_x, row_y in zip(x.reshape(-1, 16), y.reshape(-1, 16)):
            assert row_y.unique().numel() <= 2**bits
            assert torch.isclose(row_y.min(), row_x.min())
            assert torch.isclose(row_y.max(), row_x.max())
        y = fake_quant(x, f"int{bits}", "channel", channel_group=16)
        assert y.reshape(3, 2, 4, 16, 16)[0, 0, 0, :, 3].unique().numel() <= 2**bits
    sym = fake_quant(x, "int2", "token", symmetric=True)
    ratio = sym.reshape(-1, 16) / (x.reshape(-1, 16).abs().amax(-1, keepdim=True))
    assert set(torch.round(ratio, decimals=5).unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_error_shrinks_with_bits_and_fp8_is_relative():
    x = torch.randn(4, 128, 32)
    errors = [relative_error(fake_quant(x, f, "token"), x) for f in ("int2", "int4", "int8")]
    assert errors[0] > errors[1] > errors[2] > 0
    fp8 = fake_quant(x, "fp8", "token")
    assert relative_error(fp8, x) < 2e-3
    assert torch.equal(fake_quant(x * 2.0**-10, "fp8", "token"), fp8 * 2.0**-10)


def test_per_channel_isolates_an_outlier_channel_per_token_does_not():
    x = torch.randn(1, 256, 32)
    x[..., 7] *= 20
    small = x[..., :7]
    token = fake_quant(x, "int4", "token")[..., :7]
    channel = fake_quant(x, "int4", "channel", channel_group=64)[..., :7]
    assert relative_error(channel, small) * 10 < relative_error(token, small)


def test_fake_quant_rejects_bad_arguments():
    x = torch.randn(2, 10, 16)
    with pytest.raises(ValueError):
        fake_quant(x, "int3")
    with pytest.raises(ValueError):
        fake_quant(x, "int4", "channel", channel_group=4)
    with pytest.raises(ValueError):
        KVQuantSpec(fmt="int4", key_granularity="row")


def test_cache_quantizes_on_write_and_closes_channel_groups():
    spec = KVQuantSpec("int4", key_granularity="channel", channel_group=4, quantize_values=False)
    cache = FakeQuantCache(spec)
    k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    keys, values = cache.update(k, v, 0)
    assert torch.equal(values, v)  # values untouched
    assert torch.equal(keys[..., 4:, :], k[..., 4:, :])  # residual of 2 tokens in fp
    assert torch.allclose(keys[..., :4, :], fake_quant(k[..., :4, :], "int4", "channel",
                                                       channel_group=4))
    k2 = torch.randn(1, 2, 3, 8)
    keys, _ = cache.update(k2, torch.randn(1, 2, 3, 8), 0)
    both = torch.cat([k, k2], -2)
    assert torch.allclose(keys[..., 4:8, :], fake_quant(both[..., 4:8, :], "int4", "channel",
                                                        channel_group=4))
    assert torch.equal(keys[..., 8:, :], both[..., 8:, :])


def test_cache_per_tensor_scale_is_frozen():
    cache = FakeQuantCache(KVQuantSpec("int8", key_granularity="tensor",
                                       value_granularity="tensor"))
    k = torch.rand(1, 1, 4, 8)  # in [0, 1)
    cache.update(k, k, 0)
    keys, _ = cache.update(torch.full((1, 1, 1, 8), 5.0), torch.zeros(1, 1, 1, 8), 0)
    assert keys[..., -1, :].max() <= k.max() + 1e-6  # clipped to the first write's range


def test_r3_model_writes_rotated_keys_into_the_quantized_cache():
    path = FIXTURES / "llama_r3_hadamard_hd16"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="hadamard_kq")
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    ref, cache = DynamicCache(), FakeQuantCache(KVQuantSpec("int8"))
    with torch.no_grad():
        model(ids, use_cache=True, **{cache_kwarg(model): ref})
        model(ids, use_cache=True, **{cache_kwarg(model): cache})
    expected = fake_quant(ref.layers[0].keys, "int8", "token")  # ref holds rotated keys
    assert torch.allclose(cache.layers[0].keys, expected, atol=1e-6)


def test_perplexity_full_precision_is_rotation_invariant():
    path = FIXTURES / "llama_r3_hadamard_hd16"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    ids = torch.tensor(list(builtin_text("eval").encode()[:1024]))
    base = perplexity(model, ids, None, context=256)
    quant = perplexity(model, ids, KVQuantSpec("int2"), context=256)
    hf_hadamard_kq.apply_r3(model)
    assert perplexity(model, ids, None, context=256) == pytest.approx(base, rel=1e-5)
    assert quant != base


def test_stats_and_attention_errors():
    g = torch.randn(4096, 64, dtype=torch.float64)
    stats = outlier_stats(g)
    assert 2.8 < stats["kurtosis"] < 3.2 and stats["channel_rms_ratio"] < 1.2
    g[:, 3] *= 10
    assert outlier_stats(g)["channel_rms_ratio"] > 8
    q, k, v = torch.randn(3, 2, 32, 16).unbind(0)
    assert attention_errors(q, k, v, k) == {"score": 0.0, "output": 0.0}
    err = attention_errors(q, k, v, fake_quant(k, "int2"), causal=True)
    assert err["score"] > 0 and err["output"] > 0


def test_builtin_text_splits_are_disjoint_english():
    train, held_out = builtin_text("train"), builtin_text("eval")
    assert len(train) > 5 * len(held_out) > 100_000
    assert held_out[:200] not in train and " the " in held_out


def test_generate_with_a_fake_quant_cache():
    path = FIXTURES / "llama_r3_hadamard_hd16"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="hadamard_kq")
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    for spec in (KVQuantSpec("int8"), KVQuantSpec("int8", "channel", channel_group=4)):
        cache = FakeQuantCache(spec, config=model.config)
        out = model.generate(ids, max_new_tokens=6, do_sample=False,
                             **{cache_kwarg(model): cache})
        assert out.shape == ref.shape and cache.get_seq_length() == 13
    assert cache._done == {(0, "k"): 12, (1, "k"): 12}  # 3 complete groups of 4 tokens
