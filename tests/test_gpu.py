"""GPU tests (marker ``gpu``; skipped without CUDA/ROCm). Run on the device machine with
``python -m pytest -m gpu``. The op must take the Triton path there (asserted), and results
are compared with float64 references computed on the GPU from compressed-tensors' matrices.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from hf_hadamard_kq import hadamard_transform
from hf_hadamard_kq.ops import op as op_mod
from tests.conftest import FIXTURES
from tests.oracles import ct_runtime_model, load_unrotated, rotate64, with_cache
from tests.reference import assert_single_rounding, reference_transform

pytestmark = pytest.mark.gpu
DEV = "cuda"
POWERS = [1 << k for k in range(16)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def test_triton_path_is_used():
    assert op_mod._load_triton(), "triton must be importable on the GPU machine"


@pytest.mark.parametrize("n", POWERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_power_of_two(n, dtype):
    x = torch.randn(max(4, min(4096, (1 << 22) // n)), n, device=DEV).to(dtype)
    out = hadamard_transform(x)
    assert out.device.type == "cuda" and out.dtype == dtype
    assert_single_rounding(out, reference_transform(x))


@pytest.mark.parametrize("n", [512, 4096, 32768])
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_blocks_at_decode_size(n, dtype):
    """A few rows of a block above 256: the two-pass path's row pass (H_b into the fp32
    buffer) runs with the decode tiling of its factor b -- for b = 256 with 16-bit inputs the
    SPLIT8 form with an fp32 output, which test_every_power_of_two (>= 16384 chunks) misses."""
    from hf_hadamard_kq.ops import triton_kernel as tk

    x = torch.randn(3, n, device=DEV).to(dtype)
    b, _ = tk._plan_passes(n)
    rows = x.reshape(-1, b)
    plan = tk._rows_plan(rows, rows, torch.float32, b, True, dtype is torch.float32, None)
    assert plan.meta["SPLIT8"] == (b == 256 and dtype is not torch.float32), (n, plan.meta)
    assert_single_rounding(hadamard_transform(x), reference_transform(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(65536, 32, 128), (8192, 8, 256), (16384, 32, 64),
                                   (1, 32, 128), (64, 8, 128), (3, 5, 7, 16)])
def test_model_shapes(shape, dtype):
    x = torch.randn(shape, device=DEV).to(dtype)
    assert_single_rounding(hadamard_transform(x), reference_transform(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_prefill_layouts(dtype):
    bshd = torch.randn(2, 37, 8, 128, device=DEV).to(dtype)
    views = [bshd.transpose(1, 2), torch.randn(64, 300, device=DEV).to(dtype)[:, :256],
             torch.randn(128, 16, device=DEV).to(dtype).T, bshd[:, :, :, :64]]
    for x in views:
        assert_single_rounding(hadamard_transform(x), reference_transform(x))


@pytest.mark.parametrize("block", [16, 80, 96, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_explicit_matrix(block, dtype):
    m = torch.randn(block, block, device=DEV)
    x = torch.randn(257, 2 * block, device=DEV).to(dtype)
    out = hadamard_transform(x, matrix=m, scale=0.3)
    assert_single_rounding(out, reference_transform(x, matrix=m, scale=0.3))


def test_block_diagonal_and_zero_size():
    x = torch.randn(10, 8, 128, device=DEV, dtype=torch.bfloat16)
    assert_single_rounding(hadamard_transform(x, block=16), reference_transform(x, block=16))
    empty = torch.randn(0, 4, 64, device=DEV, dtype=torch.bfloat16)
    assert hadamard_transform(empty).shape == empty.shape


def test_opcheck_and_compile_cuda():
    x = torch.randn(4, 8, 128, device=DEV, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.hadamard_kq.hadamard_transform.default,
                          (x, 1 / math.sqrt(128), None, 128))

    def f(q, k):
        return hadamard_transform(q) @ hadamard_transform(k).transpose(-1, -2)

    q, k = torch.randn(2, 4, 5, 128, device=DEV), torch.randn(2, 4, 9, 128, device=DEV)
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(q, k), q @ k.transpose(-1, -2), rtol=1e-4, atol=1e-4)


def test_autograd_cuda():
    x = torch.randn(3, 64, device=DEV, requires_grad=True)
    hadamard_transform(x).square().sum().backward()
    # d/dx sum((xH)^2) = 2 (xH) H^T = 2x for orthonormal symmetric H
    torch.testing.assert_close(x.grad, 2 * x.detach(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ integration on the GPU


@pytest.mark.parametrize("name,block", [("llama_r3_hadamard_hd16", 16),
                                        ("llama_r3_hadamard_hd64", 64)])
def test_bf16_model_matches_references(name, block):
    path = FIXTURES / name
    x = torch.randint(3, 256, (2, 12), device=DEV)
    kw = dict(dtype=torch.bfloat16, device_map=DEV)
    ours = AutoModelForCausalLM.from_pretrained(path, attn_implementation="hadamard_kq", **kw)
    plain = load_unrotated(path, **kw)
    ct = ct_runtime_model(path, **kw)
    exact = load_unrotated(path, dtype=torch.float32, device_map=DEV)
    with torch.no_grad():
        got, base, ref_ct = ours(x).logits, plain(x).logits, ct(x).logits
        fp32 = exact(x).logits
    # bf16 tolerance: our error vs the fp32 model stays within 3x plain bf16's own error
    floor = (base.float() - fp32).abs().max().item()
    assert (got.float() - fp32).abs().max().item() <= 3 * floor + 1e-3
    assert (got.float() - ref_ct.float()).abs().max().item() <= 3 * floor + 1e-3
    cache, c_plain = DynamicCache(config=ours.config), DynamicCache(config=plain.config)
    with torch.no_grad():
        ours(x, **with_cache(ours, cache))
        plain(x, **with_cache(plain, c_plain))
    for a, b in zip(cache.layers, c_plain.layers):
        ref = rotate64(b.keys.double(), block)
        assert (a.keys.double() - ref).abs().max().item() <= 3 * floor + 2e-2


@pytest.mark.parametrize("cache_impl", [None, "static"])
def test_fp32_generate_tokens_equal_unrotated(cache_impl):
    path = FIXTURES / "llama_r3_hadamard_hd64"
    x = torch.randint(3, 256, (2, 10), device=DEV)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    if cache_impl:
        kw["cache_implementation"] = cache_impl
    ours = AutoModelForCausalLM.from_pretrained(path, attn_implementation="hadamard_kq",
                                                device_map=DEV)
    plain = load_unrotated(path, device_map=DEV)
    assert torch.equal(ours.generate(x, **kw), plain.generate(x, **kw))
