"""Every transform compressed-tensors can write, against compressed-tensors' own runtime.

Checkpoints are built on the fly with compressed-tensors (its ``apply_transform_config`` on a
tiny random Llama, saved by transformers' ``save_pretrained``, which stores the tied transform
tensors once, exactly as for llm-compressor checkpoints; ``transform_config`` is added to
config.json). The reference is compressed-tensors' runtime on the *same checkpoint*: the
unrotated weights, its runtime transforms, the stored matrices loaded into them
(``tests.oracles.ct_runtime_model``).

Matrix: type x head_dim {16, 64, 80, 96, 128, 256} (where compressed-tensors can build the
type: ``hadamard`` needs a power of two) x randomize x inverse (none / k_cache only / both
locations) x dtype, plus two sizes above 256 (320, 512). ``random-matrix`` ignores
``randomize`` in compressed-tensors (one case checks we ignore it too).

Tolerances. fp32: atol 1e-5 on logits and cached keys (measured ~1e-7; compressed-tensors
computes in the scheme precision, float64, we accumulate in fp32). bf16: both sides round to
bf16 at every layer, and where they round differently the difference propagates; we use the
project's idiom ``|ours - ref32| <= 2 |ct_bf16 - ref32| + atol`` with ``ref32`` the fp32
compressed-tensors logits and atol 1e-3 (measured: ours is as close to fp32 as
compressed-tensors' own bf16 run is), and layer-0 cached keys within 1 bf16 ulp of
compressed-tensors' (both are one rounding of nearly the same product).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import types
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

import hf_hadamard_kq
from hf_hadamard_kq import HadamardKQConfigError
from hf_hadamard_kq import checkpoint as ckpt
from tests.conftest import FIXTURES
from tests.oracles import (
    _teach_ct_cache_kwarg,
    ct_runtime_model,
    load_stored_transforms,
    load_unrotated,
    rotate64,
    with_cache,
)

ATOL = 1e-5
BF16_ATOL = 1e-3
HEAD_DIMS = (16, 64, 80, 96, 128, 256)
INVERSES = ("none", "k", "both")
Q_NAME = "model.layers.0.self_attn.R3_q_attn"


def _cases():
    for hd in HEAD_DIMS:
        for inverse in INVERSES:
            for randomize in (False, True):
                if hd & (hd - 1) == 0:
                    yield ("hadamard", hd, randomize, inverse)
                yield ("random-hadamard", hd, randomize, inverse)
            yield ("random-matrix", hd, False, inverse)
    yield ("random-matrix", 16, True, "none")  # randomize is a no-op for random-matrix
    # explicit matrices above the Triton limit (256): the torch path, as on CPU
    yield ("random-hadamard", 320, True, "k")
    yield ("hadamard", 512, True, "none")


CASES = list(_cases())


def case_id(case):
    t, hd, randomize, inverse = case
    return f"{t}-hd{hd}{'-rand' if randomize else ''}-inv_{inverse}"


def r3_config(transform_type, head_dim, randomize=False, inverse="none", precision="torch.float64"):
    return {
        "config_groups": {
            "R3": {
                "type": transform_type,
                "head_dim": head_dim,
                "randomize": randomize,
                "precision": precision,
                "apply": [
                    {"targets": ["re:.*self_attn$"], "location": "q_attn",
                     "inverse": inverse == "both"},
                    {"targets": ["re:.*self_attn$"], "location": "k_cache",
                     "inverse": inverse in ("k", "both")},
                ],
            }
        }
    }


def tiny_llama(head_dim, seed=0):
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=head_dim, num_hidden_layers=2, intermediate_size=64,
                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger q/k so that a wrong rotation changes the logits visibly
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return model


def write_ct_checkpoint(path, transform_config, head_dim, seed=0):
    """A checkpoint exactly as compressed-tensors writes it: apply_transform_config on the
    model, then save_pretrained (which stores each tied transform tensor once)."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    _teach_ct_cache_kwarg()
    model = tiny_llama(head_dim, seed)
    apply_transform_config(model, TransformConfig.model_validate(transform_config))
    model.save_pretrained(path)
    ckpt.write_r3_extras(path, transform_config, {})
    return path


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """case -> checkpoint folder, built once per case (the fp32 and bf16 tests share it)."""
    built = {}

    def get(case):
        if case not in built:
            t, hd, randomize, inverse = case
            path = tmp_path_factory.mktemp(case_id(case))
            built[case] = write_ct_checkpoint(path, r3_config(t, hd, randomize, inverse), hd)
        return built[case]
    return get


def ids(batch=2, seq=7, seed=0):
    return torch.randint(3, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def load_r3(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the q.k^T warning, tested separately
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation="hadamard_kq",
                                                    **kwargs)


def run_with_cache(model, x):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        prefill = model(x, **with_cache(model, cache)).logits
        step = model(x[:, -1:], **with_cache(model, cache)).logits  # one decode step
    return torch.cat([prefill, step], dim=1), [layer.keys for layer in cache.layers]


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def close(a, b, atol=ATOL):
    """fp32 agreement: ``atol`` relative to the magnitude when that exceeds 1 (random-matrix
    keys reach ~50, where 1e-5 is a few fp32 ulps of the fp32-vs-float64 accumulation)."""
    return max_diff(a, b) <= atol * max(1.0, b.float().abs().max().item())


# ------------------------------------------------------------------ the matrix


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fp32_equals_compressed_tensors(case, ckpt_dir):
    path = ckpt_dir(case)
    x = ids()
    ours, info = load_r3(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    got, got_keys = run_with_cache(ours, x)
    want, want_keys = run_with_cache(ct_runtime_model(path), x)
    assert close(got, want)
    for a, b in zip(got_keys, want_keys):
        assert close(a, b)
    # the stored matrix really is used (a Sylvester / unrotated run would differ)
    if case[0] != "hadamard" or case[2]:
        attn = ours.model.layers[1].self_attn
        assert any(n.startswith("_hadamard_kq_") for n, _ in attn.named_buffers())
        assert not any("R3" in k or "_hadamard_kq" in k for k in ours.state_dict())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bf16_matches_compressed_tensors(case, ckpt_dir):
    path = ckpt_dir(case)
    x = ids()
    got, got_keys = run_with_cache(load_r3(path, dtype=torch.bfloat16), x)
    ct16, ct16_keys = run_with_cache(ct_runtime_model(path, dtype=torch.bfloat16), x)
    ref32, _ = run_with_cache(ct_runtime_model(path), x)
    assert got.dtype == torch.bfloat16
    assert max_diff(got, ref32) <= 2 * max_diff(ct16, ref32) + BF16_ATOL
    a, b = got_keys[0].float(), ct16_keys[0].float()
    ulp = b.abs().clamp_min(torch.finfo(torch.bfloat16).tiny) * 2.0**-7
    assert bool(((a - b).abs() <= ulp).all())


# ------------------------------------------------------------------ what is verified / refused


@pytest.mark.parametrize("hd", [80, 96])
def test_hadamard_non_power_of_two_names_random_hadamard(hd, tmp_path):
    path = tmp_path / "m"
    tiny_llama(hd).save_pretrained(path)
    ckpt.write_r3_extras(path, r3_config("hadamard", hd), {})
    with pytest.raises(HadamardKQConfigError, match=f"power-of-two.*{hd}.*random-hadamard"):
        load_r3(path)


def test_random_hadamard_block_diagonal(tmp_path):
    """scheme head_dim 16 on a head_dim-64 model: block-diagonal, as compressed-tensors does."""
    path = write_ct_checkpoint(tmp_path / "m", r3_config("random-hadamard", 16, True), 64)
    x = ids()
    got, got_keys = run_with_cache(load_r3(path), x)
    want, want_keys = run_with_cache(ct_runtime_model(path), x)
    assert max_diff(got, want) < ATOL
    assert all(max_diff(a, b) < ATOL for a, b in zip(got_keys, want_keys))


def _edit(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def randhad16(ckpt_dir):
    return ckpt_dir(("random-hadamard", 16, True, "none"))


def test_error_random_matrix_absent_names_tensor(randhad16, tmp_path):
    path = _edit(randhad16, tmp_path / "m", lambda t: t.pop(f"{Q_NAME}.weight"))
    with pytest.raises(HadamardKQConfigError,
                       match=rf"needs the stored tensor '{Q_NAME}\.weight'.*cannot be regenerated"):
        load_r3(path)


def test_error_not_plus_minus_one(randhad16, tmp_path):
    def corrupt(t):
        t[f"{Q_NAME}.weight"][2, 3] = 0.5

    path = _edit(randhad16, tmp_path / "m", corrupt)
    with pytest.raises(HadamardKQConfigError, match=rf"'{Q_NAME}\.weight' is not a \+-1 matrix"):
        load_r3(path)


def test_error_not_orthogonal(randhad16, tmp_path):
    def corrupt(t):
        t[f"{Q_NAME}.weight"][2, 3] *= -1

    path = _edit(randhad16, tmp_path / "m", corrupt)
    with pytest.raises(HadamardKQConfigError, match=rf"'{Q_NAME}\.weight' is a \+-1 matrix but W"):
        load_r3(path)


def test_error_perm_not_a_permutation(randhad16, tmp_path):
    def corrupt(t):
        t[f"{Q_NAME}.perm"][0] = t[f"{Q_NAME}.perm"][1]

    path = _edit(randhad16, tmp_path / "m", corrupt)
    with pytest.raises(HadamardKQConfigError, match=rf"'{Q_NAME}\.perm'.*not a permutation"):
        load_r3(path)


def test_randomize_perm_folded_into_matrix(ckpt_dir, tmp_path):
    """hadamard + randomize: a stored .perm, or the permutation folded into the matrix (no
    .perm) -- both load to the same model; without either the permutation is missing."""
    src = ckpt_dir(("hadamard", 16, True, "none"))

    def fold(t):
        perm = t.pop(f"{Q_NAME}.perm")
        t[f"{Q_NAME}.weight"] = t[f"{Q_NAME}.weight"][perm][:, perm].contiguous()

    folded = _edit(src, tmp_path / "folded", fold)
    x = ids()
    want, _ = run_with_cache(load_r3(src), x)
    got, _ = run_with_cache(load_r3(folded), x)
    assert max_diff(got, want) == 0.0
    missing = _edit(src, tmp_path / "missing", lambda t: t.pop(f"{Q_NAME}.perm"))
    with pytest.raises(HadamardKQConfigError, match=rf"needs the stored tensor '{Q_NAME}\.perm'"):
        load_r3(missing)


def test_error_random_matrix_inverse_absent(ckpt_dir, tmp_path):
    """random-matrix + inverse: compressed-tensors stores the inverse as its own tensor."""
    src = ckpt_dir(("random-matrix", 16, False, "k"))
    k_name = "model.layers.0.self_attn.R3_k_cache.weight"
    names = set(load_file(str(src / "model.safetensors")))
    assert k_name in names and f"{Q_NAME}.weight" in names
    path = _edit(src, tmp_path / "m", lambda t: t.pop(k_name))
    with pytest.raises(HadamardKQConfigError, match=rf"'{k_name}'.*inverse=true.*own"):
        load_r3(path)


def test_per_layer_tensors_are_used_per_layer(tmp_path):
    """Other producers may store one matrix per layer and location; each is used for its own
    layer (checked against a float64 hand rotation)."""
    from compressed_tensors.transform.utils.hadamard import random_hadamard_matrix

    model = tiny_llama(16)
    model.save_pretrained(tmp_path)
    gen = torch.Generator().manual_seed(7)
    mats = {}
    for i in range(2):
        for loc in ("q_attn", "k_cache"):
            mats[f"model.layers.{i}.self_attn.R3_{loc}.weight"] = random_hadamard_matrix(
                16, torch.float64, torch.device("cpu"), gen)
    tc = r3_config("random-hadamard", 16)
    ckpt.write_r3_extras(tmp_path, tc, mats)
    with pytest.warns(UserWarning, match="do not satisfy R_q R_k"):  # q and k differ
        ours = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="hadamard_kq")
    x = ids()
    _, got_keys = run_with_cache(ours, x)
    plain = load_unrotated(tmp_path)
    plain_cache = DynamicCache(config=plain.config)
    with torch.no_grad():
        plain(x, **with_cache(plain, plain_cache))
    w = mats["model.layers.0.self_attn.R3_k_cache.weight"]
    expected = (plain_cache.layers[0].keys.double() @ w / 4.0).float()
    assert max_diff(got_keys[0][:, :, : x.shape[1]], expected) < ATOL
    for i in range(2):
        attn = ours.model.layers[i].self_attn
        for slot, loc in (("q", "q_attn"), ("k", "k_cache")):
            stored = mats[f"model.layers.{i}.self_attn.R3_{loc}.weight"]
            assert torch.equal(getattr(attn, f"_hadamard_kq_{slot}").double(), stored)


def test_scores_warning_only_when_qk_changes(ckpt_dir):
    for case, warns in [(("random-hadamard", 16, True, "none"), False),
                        (("random-hadamard", 16, False, "both"), False),
                        (("hadamard", 16, False, "k"), False),  # Sylvester is symmetric
                        (("random-hadamard", 16, False, "k"), True),
                        (("random-matrix", 16, False, "none"), True)]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            AutoModelForCausalLM.from_pretrained(ckpt_dir(case), attn_implementation="hadamard_kq")
        hit = [w for w in caught if "R_q R_k" in str(w.message)]
        assert bool(hit) == warns, case


def test_buffers_follow_dtype_and_are_not_saved(randhad16, tmp_path):
    model = load_r3(randhad16)
    attn = model.model.layers[0].self_attn
    assert attn._hadamard_kq_qk.dtype == torch.float32
    model.to(torch.bfloat16)  # +-1 entries: exact in bf16, the op needs no conversion
    assert attn._hadamard_kq_qk.dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert not any("_hadamard_kq" in k for k in saved)
    assert torch.equal(saved[f"{Q_NAME}.perm"], load_file(
        str(randhad16 / "model.safetensors"))[f"{Q_NAME}.perm"])


def test_buffer_dtypes_follow_precision_semantics(ckpt_dir):
    """+-1 matrices in a bf16 model's dtype (exact; tensor cores on GPU); a float64
    random-matrix stays float64 (it is computed in float64, like compressed-tensors)."""
    had = load_r3(ckpt_dir(("random-hadamard", 16, False, "none")), dtype=torch.bfloat16)
    assert had.model.layers[0].self_attn._hadamard_kq_qk.dtype == torch.bfloat16
    rm = load_r3(ckpt_dir(("random-matrix", 16, False, "k")), dtype=torch.bfloat16)
    attn = rm.model.layers[0].self_attn
    assert attn._hadamard_kq_q.dtype == attn._hadamard_kq_k.dtype == torch.float64


def test_narrow_precision_rounds_like_compressed_tensors(tmp_path):
    """precision bf16 on an fp32 model: compressed-tensors rounds input and output to bf16."""
    tc = r3_config("random-hadamard", 16, precision="torch.bfloat16")
    path = write_ct_checkpoint(tmp_path / "m", tc, 16)
    x = ids()
    got, got_keys = run_with_cache(load_r3(path), x)
    want, want_keys = run_with_cache(ct_runtime_model(path), x)
    # the keys are bf16 values (one rounding; compressed-tensors divides by sqrt(16) = 4 in
    # bf16, exact), so layer-0 keys are identical
    assert torch.equal(got_keys[0], want_keys[0])
    assert torch.equal(got_keys[0], got_keys[0].to(torch.bfloat16).float())
    assert max_diff(got, want) < ATOL


@pytest.mark.parametrize("compile_form", ["op", "auto"], indirect=True)
def test_explicit_matrix_compiles_fullgraph(compile_form):
    """The buffer read on the hot path compiles in both forms (``auto`` traces these small
    tensors as plain torch ops): no graph break, same logits."""
    model = load_r3(FIXTURES / "llama_r3_randomize_hd16")
    x = ids()
    with torch.no_grad():
        eager = model(x).logits
        torch._dynamo.reset()
        assert torch._dynamo.explain(model)(x).graph_break_count == 0
        compiled = torch.compile(model, fullgraph=True)(x).logits
    assert max_diff(compiled, eager) < ATOL


def test_disk_offload_keeps_buffers_on_execution_device(randhad16, tmp_path):
    """device_map with a layer offloaded to disk: the matrices are buffers on the execution
    device and the model equals the plain load."""
    model = load_r3(randhad16, offload_folder=tmp_path, device_map={
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
        "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"})
    attn = model.model.layers[1].self_attn
    assert attn.q_proj.weight.device.type == "meta"  # really offloaded
    assert attn._hadamard_kq_qk.device.type == "cpu"
    x = ids()
    assert close(run_with_cache(model, x)[0], run_with_cache(load_r3(randhad16), x)[0])


# ------------------------------------------------------------------ apply_r3 / save


@pytest.mark.parametrize("case", [("random-hadamard", 80, True, "none"),
                                  ("random-matrix", 16, False, "k"),
                                  ("hadamard", 16, True, "none")], ids=case_id)
def test_apply_r3_random_types_match_ct_and_round_trip(case, tmp_path):
    """apply_r3 builds the matrices with compressed-tensors' factories (torch's default
    generator seed, as apply_transform_config uses), so it equals compressed-tensors' runtime on
    the same model; save_r3_pretrained writes them in its layout."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    t, hd, randomize, inverse = case
    tc = r3_config(t, hd, randomize, inverse)
    model = tiny_llama(hd)
    ct = copy.deepcopy(model)
    _teach_ct_cache_kwarg()
    apply_transform_config(ct, TransformConfig.model_validate(tc))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_hadamard_kq.apply_r3(model, tc)
    x = ids()
    got, got_keys = run_with_cache(model, x)
    want, want_keys = run_with_cache(ct, x)
    assert close(got, want)
    assert all(close(a, b) for a, b in zip(got_keys, want_keys))
    hf_hadamard_kq.save_r3_pretrained(model, tmp_path)
    index = json.loads((tmp_path / ckpt.SAFE_INDEX).read_text())
    ct_saved = tmp_path / "ct"
    ct.save_pretrained(ct_saved)
    assert ({k for k in index["weight_map"] if "R3" in k}
            == {k for k in load_file(str(ct_saved / "model.safetensors")) if "R3" in k})
    reloaded, _ = run_with_cache(load_r3(tmp_path), x)
    assert max_diff(reloaded, got) == 0.0
    assert close(run_with_cache(ct_runtime_model(tmp_path), x)[0], got)


# ------------------------------------------------------------------ R3 + FP8 KV cache

FP8KV = FIXTURES / "llama_r3_fp8kv_hd16"


def _disable_query_quantization(model):
    """compressed-tensors' hooked attention minus its query fake-quantization: the checkpoint
    has no q_scale (transformers 5.17 + compressed-tensors would use uninitialised memory)."""
    from compressed_tensors.modeling.attention import QuantizedAttentionImpl
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def forward(self, module, query, key, value, *args, **kwargs):
        impl = ALL_ATTENTION_FUNCTIONS[QuantizedAttentionImpl._original_impl]
        return impl(module, query, key, value, *args, **kwargs)

    for module in model.modules():
        if isinstance(module, QuantizedAttentionImpl):
            module.forward = types.MethodType(forward, module)


def ct_kv_runtime_model(path):
    """compressed-tensors' runtime for R3 + KV-cache quantization on the same checkpoint.

    transformers 5.17 / compressed-tensors 0.19: loading attaches its KV quantization itself.
    transformers 5.24 / compressed-tensors 0.20: it skips attention modules whose forward takes
    ``cache`` (``is_cached_attention_module``); we run its ``_apply_kv_cache_scheme`` with that
    one check (and its hook, ``_teach_ct_cache_kwarg``) taught the new name, give every attention
    module its hooked attention as the config group does on 5.17, then load the scales. Query
    quantization is disabled (no q_scale in the checkpoint).
    """
    import inspect

    from compressed_tensors.modeling.attention import initialize_hooked_attention
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle import apply as ct_apply
    from compressed_tensors.quantization.lifecycle import initialize as ct_init
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    _teach_ct_cache_kwarg()
    model = load_unrotated(path)
    attn = model.model.layers[0].self_attn
    if not hasattr(attn, "kv_cache"):
        qc = QuantizationConfig.model_validate(
            {k: v for k, v in ckpt.read_config(path)["quantization_config"].items()
             if k != "transform_config"})
        original = ct_init.is_cached_attention_module

        def cached(module):
            return original(module) or (
                ct_init._is_attention_module(module)
                and "cache" in inspect.signature(module.forward).parameters)

        ct_apply.is_cached_attention_module = ct_init.is_cached_attention_module = cached
        try:
            ct_apply._apply_kv_cache_scheme(model, qc.kv_cache_scheme, qc.quantization_status)
            # what its group_0 (attention input_activations) does on 5.17: hooked attention
            # (``impl``) on every attention module; its query quantization is disabled below
            for module in model.modules():
                if cached(module):
                    initialize_hooked_attention(model, module)
        finally:
            ct_apply.is_cached_attention_module = ct_init.is_cached_attention_module = original
        stored = load_file(str(path / "model.safetensors"))
        with torch.no_grad():
            for name, tensor in stored.items():
                if name.endswith(("k_scale", "v_scale")):
                    model.get_parameter(name).copy_(tensor)
    tc = ckpt.transform_config_of(ckpt.read_config(path))
    apply_transform_config(model, TransformConfig.model_validate(tc))
    load_stored_transforms(model, path)
    _disable_query_quantization(model)
    return model


def test_fp8kv_loads_quietly_with_static_scales():
    model, info = load_r3(FP8KV, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    stored = load_file(str(FP8KV / "model.safetensors"))
    for i in range(2):
        attn = model.model.layers[i].self_attn
        assert torch.equal(attn.k_scale, stored[f"model.layers.{i}.self_attn.k_scale"])
        assert torch.equal(attn.v_scale, stored[f"model.layers.{i}.self_attn.v_scale"])
        assert not hasattr(attn, "q_scale")  # the query is never quantized with garbage
        assert "q_scale" not in str(list(model.state_dict()))


def test_fp8kv_keys_rotated_then_quantized():
    """Layer 0's cache holds fake_quant(rotate(k)) with the stored static k_scale: the
    rotation comes *before* the quantizer (the scales were calibrated on rotated keys)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    x = ids()
    ours = load_r3(FP8KV)
    plain = load_unrotated(FP8KV)
    for module in plain.modules():  # transformers 5.17: compressed-tensors quantizes here too
        module.quantization_enabled = False
    _, keys = run_with_cache(ours, x)
    c_plain = DynamicCache(config=plain.config)
    with torch.no_grad():
        plain(x, **with_cache(plain, c_plain))
    args = QuantizationArgs.model_validate(
        ckpt.read_config(FP8KV)["quantization_config"]["kv_cache_scheme"])
    k_scale = ours.model.layers[0].self_attn.k_scale
    expected = fake_quantize(rotate64(c_plain.layers[0].keys, 16), k_scale, None, args)
    assert max_diff(keys[0][:, :, : x.shape[1]], expected) < ATOL
    wrong_order = rotate64(fake_quantize(c_plain.layers[0].keys, k_scale, None, args), 16)
    assert max_diff(keys[0][:, :, : x.shape[1]], wrong_order) > 1e-3


def test_fp8kv_equals_compressed_tensors_runtime():
    x = ids()
    ours = load_r3(FP8KV)
    ct = ct_kv_runtime_model(FP8KV)
    got, got_keys = run_with_cache(ours, x)
    want, want_keys = run_with_cache(ct, x)
    assert max_diff(got, want) < ATOL
    for a, b in zip(got_keys, want_keys):
        assert max_diff(a, b) < ATOL
    # and it differs from an unquantized R3 run (the quantizer really runs)
    assert max_diff(got, run_with_cache(ct_runtime_model(FP8KV), x)[0]) > 1e-4
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(x, **kwargs), ct.generate(x, **kwargs))


def test_fp8kv_unrotated_layer_still_kv_quantized(tmp_path):
    """R3 on layer 0 only: layer 1's cache is still quantized (kv_cache_scheme applies to every
    attention module, as in compressed-tensors), with no rotation."""
    path = tmp_path / "m"
    shutil.copytree(FP8KV, path)
    cfg = json.loads((path / "config.json").read_text())
    for args in cfg["quantization_config"]["transform_config"]["config_groups"]["R3"]["apply"]:
        args["ignore"] = [r"re:.*layers\.1\.self_attn$"]
    (path / "config.json").write_text(json.dumps(cfg))
    ours = load_r3(path)
    assert ours.model.layers[1].self_attn.k_scale is not None
    x = ids()
    got, got_keys = run_with_cache(ours, x)
    want, want_keys = run_with_cache(ct_kv_runtime_model(path), x)
    assert max_diff(got, want) < ATOL
    assert all(max_diff(a, b) < ATOL for a, b in zip(got_keys, want_keys))
    # layer 1's keys are fake-quantized (on the fp8 grid of its k_scale), not rotated
    k_scale = ours.model.layers[1].self_attn.k_scale
    grid = (got_keys[1] / k_scale).to(torch.float8_e4m3fn).float() * k_scale
    assert max_diff(got_keys[1], grid) < 1e-6


def test_fp8kv_use_cache_false_quantizes_like_ct():
    x = ids()
    with torch.no_grad():
        got = load_r3(FP8KV)(x, use_cache=False).logits
        want = ct_kv_runtime_model(FP8KV)(x, use_cache=False).logits
    assert max_diff(got, want) < ATOL


def test_fp8kv_save_round_trip(tmp_path):
    model = load_r3(FP8KV)
    model.save_pretrained(tmp_path)
    reloaded, info = load_r3(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = ids()
    assert max_diff(run_with_cache(reloaded, x)[0], run_with_cache(model, x)[0]) == 0.0


def test_error_query_quantization_is_refused(tmp_path):
    """A stored q_scale means real query quantization, which hadamard_kq does not run yet."""
    def add_q_scale(t):
        for i in range(2):
            t[f"model.layers.{i}.self_attn.q_scale"] = torch.tensor([0.01])

    path = _edit(FP8KV, tmp_path / "m", add_q_scale)
    with pytest.raises(HadamardKQConfigError, match=r"q_scale' \(query quantization\)"):
        load_r3(path)


# ------------------------------------------------------------------ GPU (Triton) path


@pytest.mark.gpu
@pytest.mark.parametrize("block", [16, 64, 80, 96, 128, 256, 512])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_explicit_matrix_equals_cpu(block, dtype, monkeypatch):
    """The op's explicit-matrix path on CUDA (Triton up to block 256, torch above, as
    documented) equals the CPU path, for a +-1 random-hadamard matrix (in x's dtype and in
    fp32, as the buffers are kept) and a dense random matrix."""
    from compressed_tensors.transform.utils.hadamard import random_hadamard_matrix

    from hf_hadamard_kq.ops import op as op_mod
    from tests.reference import assert_single_rounding, reference_transform

    gen = torch.Generator().manual_seed(block)
    if block <= 256:
        had = random_hadamard_matrix(block, torch.float64, torch.device("cpu"), gen)
    else:
        had = hf_hadamard_kq.ops.matrices.sylvester(block, torch.float64)
    dense = torch.rand(block, block, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 4, 37, 2 * block, generator=gen).to(dtype)
    calls = []
    original = op_mod.torch_hadamard
    monkeypatch.setattr(op_mod, "torch_hadamard",
                        lambda *a: calls.append(a[0].device.type) or original(*a))
    for matrix, scale in ((had, 1 / math.sqrt(block)), (dense, 1.0)):
        for mdtype in {dtype, torch.float32}:
            m = matrix.to(mdtype)
            cpu = original(x, scale, m, block)
            gpu = torch.ops.hadamard_kq.hadamard_transform(x.cuda(), scale, m.cuda(), block)
            assert gpu.dtype == dtype
            ref = reference_transform(x, block=block, matrix=m, scale=scale)
            assert_single_rounding(gpu.cpu(), ref)
            assert_single_rounding(cpu, ref)
            # both are one rounding of (nearly) the same fp32-accumulated product
            floor = (ref.to(dtype).double() - ref).abs().max().item()
            bound = 2 * floor + 1e-5 * ref.abs().max().item()
            assert max_diff(gpu.cpu(), cpu) <= bound
    assert ("cuda" in calls) == (block > 256)  # Triton serves explicit blocks up to 256


@pytest.mark.gpu
@pytest.mark.parametrize("case", [("random-hadamard", 128, True, "none"),
                                  ("random-hadamard", 96, False, "k"),
                                  ("random-matrix", 64, False, "k")], ids=case_id)
def test_gpu_model_equals_cpu(case, ckpt_dir):
    path = ckpt_dir(case)
    x = ids()
    cpu, cpu_keys = run_with_cache(load_r3(path), x)
    gpu_model = load_r3(path, device_map="cuda")
    assert gpu_model.model.layers[0].self_attn.get_buffer(
        next(n for n, _ in gpu_model.model.layers[0].self_attn.named_buffers()
             if n.startswith("_hadamard_kq"))).is_cuda
    gpu, gpu_keys = run_with_cache(gpu_model, x.cuda())
    # fp32 model: GPU and CPU matmuls round differently (~1e-6 relative), amplified by the
    # ill-conditioned random-matrix inverses in the keys
    assert close(gpu.cpu(), cpu, atol=1e-4)
    assert all(close(a.cpu(), b, atol=1e-4) for a, b in zip(gpu_keys, cpu_keys))
