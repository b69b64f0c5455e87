"""Tiny random decoders of many architectures, and the references the breadth tests use.

One table (``ARCHS``) drives tests/test_architectures.py, the backend/cache/compile tests and
tests/gen_arch_table.py (the README's architecture list is generated from it, so the README
only lists what the tests run).

Every model: 2 layers, hidden 64, 4 heads / 2 kv heads (GQA) where the architecture has them,
head_dim 16, vocab 128, fp32. ``boost_qk`` scales the query/key path by 4 so that a missing or
doubled rotation would change the logits visibly (q.k^T grows 16x).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import hf_hadamard_kq
from tests.oracles import _teach_ct_cache_kwarg, rotate64, with_cache

VOCAB = 128
HEAD_DIM = 16
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
WINDOW = 4  # sliding window of the sliding-window models: the test prompts are longer


@dataclass(frozen=True)
class Arch:
    """One architecture of the matrix."""

    config: str  # transformers config class name
    kwargs: dict[str, Any] = field(default_factory=dict)
    backend: str = "sdpa"  # the plain backend; "eager" where sdpa is unsupported (Gemma2)
    features: str = ""  # what this architecture exercises (for the README table)
    moe: bool = False


MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)

ARCHS: dict[str, Arch] = {
    "llama": Arch("LlamaConfig", features="GQA"),
    "mistral": Arch("MistralConfig", dict(sliding_window=WINDOW), features="sliding window"),
    "mixtral": Arch("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2,
                                          sliding_window=None), features="MoE", moe=True),
    "qwen2": Arch("Qwen2Config", features="qkv bias"),
    "qwen2_moe": Arch("Qwen2MoeConfig", dict(num_experts=4, shared_expert_intermediate_size=32,
                                             **MOE), features="MoE + shared expert",
                      moe=True),
    "qwen3": Arch("Qwen3Config", dict(head_dim=HEAD_DIM), features="q/k norm"),
    "qwen3_moe": Arch("Qwen3MoeConfig", dict(head_dim=HEAD_DIM, num_experts=4, **MOE),
                      features="MoE, q/k norm", moe=True),
    "gemma": Arch("GemmaConfig", dict(head_dim=HEAD_DIM), features="(1+w) norms"),
    "gemma2": Arch("Gemma2Config", dict(head_dim=HEAD_DIM, sliding_window=WINDOW,
                                        attn_logit_softcapping=5.0, query_pre_attn_scalar=32),
                   backend="eager",
                   features="attention softcap (eager), hybrid sliding/full layers, "
                            "non-default scaling"),
    "gemma3": Arch("Gemma3TextConfig", dict(head_dim=HEAD_DIM, sliding_window=WINDOW,
                                            layer_types=["sliding_attention", "full_attention"],
                                            query_pre_attn_scalar=32),
                   features="q/k norm, hybrid sliding/full layers, per-layer RoPE"),
    "phi3": Arch("Phi3Config", features="fused qkv_proj"),
    "granite": Arch("GraniteConfig", dict(attention_multiplier=0.5),
                    features="non-default scaling"),
    "olmo2": Arch("Olmo2Config", features="q/k norm over all heads"),
    "cohere": Arch("CohereConfig", dict(use_qk_norm=True),
                   features="interleaved RoPE, q/k LayerNorm"),
    "stablelm": Arch("StableLmConfig", features="partial rotary (25%)"),
    "gpt_neox": Arch("GPTNeoXConfig", dict(rotary_pct=0.25),
                     features="partial rotary (25%), fused query_key_value, `layer_past`, "
                              "`attention` module name"),
}

#: One architecture per attention feature that changes what a compiled rotation sits next to:
#: GQA (llama), sliding window with logit softcapping (gemma2), partial rotary with a fused QKV
#: projection (gpt_neox), q/k norms before RoPE (qwen3), interleaved RoPE with q/k LayerNorm
#: (cohere). The compile sweeps run on all of :data:`ARCHS` by default and on these with
#: ``--compile-archs representative`` (conftest.py).
COMPILE_REPRESENTATIVES = ("llama", "gemma2", "gpt_neox", "qwen3", "cohere")

#: Architectures refused at load, and the words the error must contain.
REFUSED: dict[str, tuple[str, dict[str, Any], str]] = {
    "deepseek_v3": ("DeepseekV3Config", dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=32,
        n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
        n_group=1, topk_group=1), "multi-head latent attention"),
    "deepseek_v2": ("DeepseekV2Config", dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=32,
        n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=None,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
        n_group=1, topk_group=1), "multi-head latent attention"),
    "gemma3n": ("Gemma3nTextConfig", dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=HEAD_DIM, intermediate_size=64, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=WINDOW,
        laurel_rank=8, altup_num_inputs=2, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=VOCAB, activation_sparsity_pattern=[0.0] * 4),
        "KV sharing"),
    "bart": ("BartConfig", dict(
        vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64), "encoder-decoder"),
    "t5": ("T5Config", dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=64, num_layers=1,
                            num_heads=4, decoder_start_token_id=0), "encoder-decoder"),
}


#: Refused models built with AutoModelForSeq2SeqLM (the others with AutoModelForCausalLM).
SEQ2SEQ = ("bart", "t5")


def config_class(name: str):
    """The transformers config class, or None if this transformers version lacks it."""
    return getattr(transformers, name, None)


def make_config(arch: Arch):
    cls = config_class(arch.config)
    if cls is None:
        return None
    return cls(**{**COMMON, **arch.kwargs})


def hkq_impl(arch: Arch) -> str:
    """Our attn_implementation matching the architecture's plain backend."""
    return {"sdpa": "hadamard_kq", "eager": "hadamard_kq_eager"}[arch.backend]


# ---------------------------------------------------------------- model construction


_QK_LINEARS = ("q_proj", "k_proj", "qkv_proj", "query_key_value")
_QK_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


def boost_qk(model: torch.nn.Module) -> None:
    """Scale the query/key path by ~4 so a missing rotation would show.

    Projections are multiplied by 4; q/k norms (which would normalise that away) get +3 on
    their weight, which is x4 both for ``w`` norms (init 1) and Gemma's ``1 + w`` (init 0).
    """
    from hf_hadamard_kq.install import attention_modules

    with torch.no_grad():
        for attn in attention_modules(model).values():
            for name, child in attn.named_children():
                if name in _QK_LINEARS:
                    child.weight.mul_(4)
                elif name in _QK_NORMS and getattr(child, "weight", None) is not None:
                    child.weight.add_(3)


_BASE: dict[str, torch.nn.Module] = {}


def base_model(name: str) -> torch.nn.Module:
    """The plain (unrotated) tiny model of ``name``, built once per process. Do not mutate:
    use :func:`fresh` for a copy."""
    if name not in _BASE:
        arch = ARCHS[name]
        config = make_config(arch)
        if config is None:
            import pytest

            pytest.skip(f"transformers {transformers.__version__} has no {arch.config}")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=arch.backend)
        boost_qk(model)
        _BASE[name] = model.eval()
    return _BASE[name]


def fresh(name: str) -> torch.nn.Module:
    """An independent copy of the plain model (its config copied too: attention
    implementations are set on the config)."""
    return copy.deepcopy(base_model(name))


_PLAIN: dict[tuple[str, str], torch.nn.Module] = {}


def plain_with(name: str, backend: str) -> torch.nn.Module:
    """The plain model running ``backend`` (a reference for our same inner backend: layer-1
    inputs then agree to the last bit instead of to sdpa-vs-eager rounding). Do not mutate."""
    if backend == ARCHS[name].backend:
        return base_model(name)
    if (name, backend) not in _PLAIN:
        model = fresh(name)
        model.set_attn_implementation(backend)
        _PLAIN[name, backend] = model
    return _PLAIN[name, backend]


def rotated(name: str, attn_implementation: str | None = None) -> torch.nn.Module:
    """A copy with hf_hadamard_kq.apply_r3 (default targets and head_dim)."""
    impl = attn_implementation or hkq_impl(ARCHS[name])
    return hf_hadamard_kq.apply_r3(fresh(name), attn_implementation=impl)


# ---------------------------------------------------------------- compressed-tensors runtime


def _model_eager(module, *args, **kwargs):
    """The module's own eager attention (softcap etc.), under a registered name so that
    compressed-tensors' hooked attention (which looks its inner backend up in
    ALL_ATTENTION_FUNCTIONS, where "eager" is absent) can delegate to it."""
    fn = sys.modules[type(module).__module__].eager_attention_forward
    return fn(module, *args, **kwargs)


AttentionInterface.register("model_eager_test", _model_eager)
AttentionMaskInterface.register("model_eager_test", ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def ct_model(name: str, transform_config: dict) -> torch.nn.Module:
    """A copy with compressed-tensors' own runtime R3 transforms (``apply_transform_config``)."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    _teach_ct_cache_kwarg()
    model = fresh(name)
    if ARCHS[name].backend == "eager":
        model.set_attn_implementation("model_eager_test")
    apply_transform_config(model, TransformConfig.model_validate(transform_config))
    return model


# ---------------------------------------------------------------- running


def prompt(batch: int = 2, seq: int = 7, seed: int = 0):
    """Random ids (longer than the sliding window) and a left-padded attention mask."""
    ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :2] = 0
    return ids, mask


def prefill_and_decode(model, ids, mask, steps: int = 2, cache=None):
    """Logits of a prefill and ``steps`` single-token decode steps (greedy), and the cache.

    Returns (list of logits [prefill (valid positions only), step 1, ...], cache).
    """
    cache = DynamicCache(config=model.config) if cache is None else cache
    out_logits = []
    with torch.no_grad():
        out = model(ids, attention_mask=mask, **with_cache(model, cache))
        out_logits.append(out.logits[mask.bool()])
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(nxt, attention_mask=mask, **with_cache(model, cache))
            out_logits.append(out.logits[:, -1])
    return out_logits, cache


def max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def cache_keys(cache) -> list[torch.Tensor]:
    """Per-layer cached keys of a DynamicCache/StaticCache (5.17 and 5.24 both have layers)."""
    return [layer.keys for layer in cache.layers]


def assert_keys_rotated(ours_cache, plain_cache, block: int = HEAD_DIM, atol: float = 1e-5,
                        valid=None):
    """Our cached keys are the float64 rotation of the plain model's cached keys.

    ``valid`` (batch, positions) bool: compare only non-padded positions. Keys of padded
    positions in layers > 0 come from fully masked attention rows, whose output is
    backend-defined (flex on CUDA differs there between two runs of the same math).
    """
    for i, (a, b) in enumerate(zip(cache_keys(ours_cache), cache_keys(plain_cache))):
        assert a.shape == b.shape, (i, a.shape, b.shape)
        if valid is not None and a.shape[2] <= valid.shape[1]:
            keep = valid[:, -a.shape[2]:].to(a.device)[:, None, :, None]
            a, b = a * keep, b * keep
        scale = max(1.0, b.abs().max().item())
        assert max_diff(a, rotate64(b, block)) < atol * scale, f"layer {i} keys not rotated"
        assert max_diff(a, b) > 1e-2 * scale, f"layer {i}: keys were left unrotated"
