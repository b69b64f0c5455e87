"""Inner backends (sdpa, the model's eager, flex) and caches (dynamic, static, sliding/hybrid,
quantized with every installed backend, offloaded, beam search, crop / assisted decoding).

References: the unrotated model (same logits, fp32 atol 1e-5; same greedy tokens), the float64
rotation of its cached keys, and, for quantized caches (where rotated and unrotated keys
quantize differently), compressed-tensors' runtime transforms with the same cache.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import QuantizedCache

from hf_hadamard_kq.install import installed_plan
from tests import tiny_models as tm

ATOL = 1e-5
GEN = dict(do_sample=False, pad_token_id=0)


def assert_same_logits(got, want, atol=ATOL):
    for step, (a, b) in enumerate(zip(got, want)):
        assert tm.max_diff(a, b) < atol, f"step {step}: {tm.max_diff(a, b):.3g}"


# ---------------------------------------------------------------- backends


def _flex_available() -> str | None:
    """Why flex_attention cannot run here, or None."""
    try:
        from transformers.utils import is_torch_flex_attn_available
    except ImportError:
        return "this transformers has no flex_attention integration"
    if not is_torch_flex_attn_available():
        return "torch flex_attention is unavailable"
    import shutil

    if not torch.cuda.is_available() and shutil.which("g++") is None:
        return "flex_attention on CPU compiles with inductor, which needs a C++ compiler"
    return None


BACKEND_CASES = [
    # (architecture, our attn_implementation); the reference is the plain model on the same
    # inner backend
    ("llama", "hadamard_kq"),
    ("llama", "hadamard_kq_eager"),
    ("mistral", "hadamard_kq"),  # sliding window through sdpa's mask
    ("mistral", "hadamard_kq_eager"),  # ... and eager's
    ("gemma2", "hadamard_kq_eager"),  # softcap, hybrid sliding/full
    ("gemma3", "hadamard_kq"),  # hybrid sliding/full
    ("gemma3", "hadamard_kq_eager"),
    ("gpt_neox", "hadamard_kq_eager"),
]
INNER = {"hadamard_kq": "sdpa", "hadamard_kq_eager": "eager"}


@pytest.mark.parametrize("name,impl", BACKEND_CASES)
def test_backend(name, impl):
    plain = tm.plain_with(name, INNER[impl])
    ours = tm.rotated(name, impl)
    ids, mask = tm.prompt(seq=9)
    want, c_plain = tm.prefill_and_decode(plain, ids, mask)
    got, c_ours = tm.prefill_and_decode(ours, ids, mask)
    assert_same_logits(got, want)
    tm.assert_keys_rotated(c_ours, c_plain)


def test_flex_backend_cpu():
    """flex_attention on CPU (inductor-compiled). Only an unpadded full-attention model: with a
    padding mask, a sliding window or softcap, torch 2.13's CPU flex template fails to compile
    (CppCompileError) for plain transformers flex_attention as well; those cases run in
    test_flex_backend_gpu."""
    if why := _flex_available():
        pytest.skip(why)
    plain, ours = tm.base_model("llama"), tm.rotated("llama", "hadamard_kq_flex")
    ids, mask = tm.prompt(seq=9)
    mask = torch.ones_like(mask)
    want, c_plain = tm.prefill_and_decode(plain, ids, mask, steps=1)
    got, c_ours = tm.prefill_and_decode(ours, ids, mask, steps=1)
    assert_same_logits(got, want)
    tm.assert_keys_rotated(c_ours, c_plain)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gemma3"])
def test_flex_backend_gpu(name):
    """flex_attention with padding, sliding windows and Gemma2's softcap, on CUDA."""
    plain = tm.fresh(name).to("cuda")
    ours = tm.rotated(name, "hadamard_kq_flex").to("cuda")
    ids, mask = (t.to("cuda") for t in tm.prompt(seq=9))
    want, c_plain = tm.prefill_and_decode(plain, ids, mask)
    got, c_ours = tm.prefill_and_decode(ours, ids, mask)
    assert_same_logits(got, want, atol=1e-4)  # flex's fp32 GPU accumulation order
    valid = torch.cat([mask, torch.ones_like(mask[:, :2])], dim=1).bool()  # + 2 decode steps
    tm.assert_keys_rotated(c_ours, c_plain, atol=1e-4, valid=valid)


def test_sliding_window_layers_are_exercised():
    """The sliding-window models really build sliding cache layers and prompts longer than
    the window (otherwise the backend tests above would not test windows)."""
    for name in ("mistral", "gemma2", "gemma3"):
        model = tm.base_model(name)
        layers = DynamicCache(config=model.config).layers
        assert any("Sliding" in type(layer).__name__ for layer in layers), name
        assert model.config.sliding_window == tm.WINDOW < tm.prompt()[0].shape[1]


# ---------------------------------------------------------------- caches


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gemma3", "gpt_neox"])
def test_static_cache(name):
    """StaticCache (sliding/hybrid layers for Mistral and Gemma2/3): logits, keys, generate."""
    plain, ours = tm.base_model(name), tm.rotated(name)
    ids, mask = tm.prompt(seq=9)
    caches = [StaticCache(config=m.config, max_cache_len=16) for m in (plain, ours)]
    want, c_plain = tm.prefill_and_decode(plain, ids, mask, cache=caches[0])
    got, c_ours = tm.prefill_and_decode(ours, ids, mask, cache=caches[1])
    assert_same_logits(got, want)
    for a, b in zip(tm.cache_keys(c_ours), tm.cache_keys(c_plain)):
        scale = max(1.0, b.abs().max().item())
        assert tm.max_diff(a, tm.rotate64(b, tm.HEAD_DIM)) < ATOL * scale
    kw = dict(max_new_tokens=6, cache_implementation="static", **GEN)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kw),
                       plain.generate(ids, attention_mask=mask, **kw))


def _quantized_backends():
    out = []
    for backend, module, kw in [("fp8", None, {}),
                                ("quanto", "optimum.quanto", dict(nbits=4, q_group_size=16,
                                                                  residual_length=2)),
                                ("hqq", "hqq", dict(nbits=4, q_group_size=16,
                                                    residual_length=2))]:
        reason = None
        if module is not None and importlib.util.find_spec(module.split(".")[0]) is None:
            reason = f"{module} is not installed"
        elif backend == "fp8":
            try:
                QuantizedCache("fp8", config=tm.make_config(tm.ARCHS["llama"]))
            except (ValueError, TypeError) as exc:
                reason = f"this transformers has no fp8 QuantizedCache ({exc})"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        out.append(pytest.param(backend, kw, id=backend, marks=marks))
    return out


@pytest.mark.parametrize("backend,kw", _quantized_backends())
def test_quantized_cache(backend, kw):
    """The quantizer sees rotated keys: same logits as compressed-tensors' runtime with the same
    quantized cache, and different from the unrotated model's (its keys quantize otherwise)."""
    plain, ours = tm.base_model("llama"), tm.rotated("llama")
    ct = tm.ct_model("llama", installed_plan(ours).transform_config)
    ids, mask = tm.prompt(seq=9)
    res = {}
    for label, model in (("plain", plain), ("ours", ours), ("ct", ct)):
        cache = QuantizedCache(backend, config=model.config, **kw)
        res[label], _ = tm.prefill_and_decode(model, ids, mask, steps=4, cache=cache)
    assert_same_logits(res["ours"], res["ct"])
    # the first update returns unquantized states; decode steps read quantized keys
    assert all(tm.max_diff(a, b) > 1e-4 for a, b in zip(res["ours"][1:], res["plain"][1:]))
    if backend == "hqq":
        # HQQ's iterative quantizer amplifies float noise: measured on transformers 5.17,
        # scaling our own model's k_proj by (1 + 1e-7) moves its generate scores by 1.8e-2 at
        # the first quantized step, the same as ours-vs-compressed-tensors (1.8e-2), which
        # flips near-tied greedy tokens of this random model. Token equality is no criterion
        # there; the logits above (same inputs, same code path) are.
        return
    cache_config = {"backend": backend, **kw}
    gen = dict(max_new_tokens=6, cache_implementation="quantized", cache_config=cache_config,
               **GEN)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **gen),
                       ct.generate(ids, attention_mask=mask, **gen))


@pytest.mark.gpu
def test_offloaded_cache_gpu():
    """cache_implementation="offloaded" (needs CUDA: on CPU transformers asserts CUDA)."""
    plain = tm.fresh("llama").to("cuda")
    ours = tm.rotated("llama").to("cuda")
    ids, mask = (t.to("cuda") for t in tm.prompt(seq=9))
    kw = dict(max_new_tokens=6, cache_implementation="offloaded", **GEN)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kw),
                       plain.generate(ids, attention_mask=mask, **kw))


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt_neox"])
def test_beam_search(name):
    plain, ours = tm.base_model(name), tm.rotated(name)
    ids, mask = tm.prompt(seq=9)
    kw = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, **GEN)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kw),
                       plain.generate(ids, attention_mask=mask, **kw))


def test_crop_then_continue():
    """DynamicCache.crop (used by assisted decoding): crop to 5 and re-feed tokens 5..9."""
    plain, ours = tm.base_model("llama"), tm.rotated("llama")
    ids, _ = tm.prompt(batch=1, seq=9)
    results = []
    for model in (plain, ours):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids, **tm.with_cache(model, cache))
            cache.crop(-4)  # remove 4 tokens (5.24 takes the count to remove, negative)
            assert cache.get_seq_length() == 5
            out = model(ids[:, 5:], **tm.with_cache(model, cache))
        results.append((out.logits, cache))
    assert tm.max_diff(results[0][0], results[1][0]) < ATOL
    tm.assert_keys_rotated(results[1][1], results[0][1])


def test_assisted_decoding_crops_and_matches(monkeypatch):
    """generate(assistant_model=...) with a rotated main model and a rotated, different
    assistant: rejected drafts are cropped from both caches; greedy tokens equal plain's."""
    calls = []
    original = DynamicCache.crop

    def crop(self, max_length):
        calls.append(max_length)
        return original(self, max_length)

    monkeypatch.setattr(DynamicCache, "crop", crop)
    plain, ours = tm.base_model("llama"), tm.rotated("llama")
    assistant = tm.rotated("qwen2")
    ids, _ = tm.prompt(batch=1, seq=6)
    kw = dict(max_new_tokens=10, **GEN)
    want = plain.generate(ids, **kw)
    got = ours.generate(ids, assistant_model=assistant, **kw)
    assert calls, "assisted decoding never cropped the cache"
    assert torch.equal(got, want)
