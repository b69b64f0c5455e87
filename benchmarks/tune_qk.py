"""Sweep the fused Q/K kernel's tiling (ops/qk_kernel.py), so that ``qk_kernel.TUNED_QK`` can
be set from measurements.

The kernel rotates a layer's query and key (with RoPE folded in) in one launch: in eager
decode and prefill it replaces transformers' RoPE (fused.py), so its GPU time is what a fused
layer pays for RoPE and both rotations (issue 6, targets 2 and 3).

For Llama-3-8B heads (32 q, 8 kv) and each ``d`` in ``--d``, shapes (batch, tokens):
decode ``(1, 1)``, ``(1, 16)``, ``(1, 64)``, ``(8, 1)``, ``(32, 1)`` and prefill ``(1, 512)``,
``(1, 4096)``, the q/k views of the projections ``(B, S, H, d).transpose(1, 2)`` with RoPE
(bf16; ``--dtype`` float16 / float32 for the other operand types). Every ``(BLOCK_M,
num_warps, num_stages)`` in ``--block-m`` x ``--warps`` x
``--stages`` is timed inside a CUDA
graph of 100 calls (bench_op's ``graph_us``) next to ``torch.clone`` of q and k (the data
movement floor, two kernels) and transformers' own eager RoPE, and checked against a float64
reference: RoPE rounded once to bf16, then the Sylvester product (``err_vs_floor``: max error
over the error of one rounding of the exact result; the kernel rounds RoPE in fp32 first, so
up to 2 is expected). ``LOADS_FIRST`` follows from the grid, as in the package. Nothing in
the package changes; the current defaults are marked ``default``. Each configuration's first
call is timed too (``first_call_s``: triton compiles it there unless its cache already holds
it; set ``TRITON_CACHE_DIR`` to an empty folder to time compilation), and per shape the
general path's GPU time (``rope_then_rows_us``: transformers' RoPE, then one rotation per
tensor), what a layer runs where the fused kernel is not used.

Usage (GPU machine)::

    python benchmarks/tune_qk.py --out results/

``--interpret`` (CPU, ``TRITON_INTERPRET=1``) runs every configuration once on small shapes
and checks it, without timing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tune_rows

import hf_hadamard_kq as hadamard_kq
from hf_hadamard_kq.ops import qk_kernel

SHAPES = [(1, 1), (1, 16), (1, 64), (8, 1), (32, 1), (1, 512), (1, 4096)]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: error bound: RoPE rounded to fp32 then bf16, then the product rounded once
MAX_ERR_VS_FLOOR = 2.0
#: fp32 outputs: max error over the largest magnitude (tests/reference.py's bound)
MAX_REL_ERR_F32 = 1e-5


def make_inputs(b: int, s: int, d: int, device: str, dtype=torch.bfloat16, hq=32, hk=8):
    g = torch.Generator(device=device).manual_seed(b * 1000 + s)
    q = torch.randn(b, s, hq, d, generator=g, device=device).to(dtype).transpose(1, 2)
    k = torch.randn(b, s, hk, d, generator=g, device=device).to(dtype).transpose(1, 2)
    angle = torch.rand(b, s, d // 2, generator=g, device=device) * 100
    cos = torch.cat([angle.cos()] * 2, -1).to(dtype)
    sin = torch.cat([angle.sin()] * 2, -1).to(dtype)
    return q, k, cos, sin


def rope_ref(x, cos, sin):
    """RoPE in float64, rounded once to x.dtype (the dot operand the kernel should see)."""
    xd, c, s = x.double(), cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    half = x.shape[-1] // 2
    rot = torch.cat((-xd[..., half:], xd[..., :half]), -1)
    return (xd * c + rot * s).to(x.dtype)


def rel_err(out, x, cos, sin) -> float:
    """max |out - ref| / max |ref| (fp32 outputs: their floor is tiny and the accumulation
    order dominates, so they are held to 1e-5 of the largest magnitude, as in the tests)."""
    ref = tune_rows.reference(rope_ref(x, cos, sin), x.shape[-1])
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def err_vs_floor(out, x, cos, sin) -> float:
    """tune_rows' measure against the Sylvester product of the once-rounded RoPE."""
    return tune_rows.err_vs_floor(out, rope_ref(x, cos, sin), x.shape[-1])


def run_config(q, k, cos, sin, cfg):
    """rotate_qk with ``cfg`` (the config function patched, plans emptied for the call)."""
    saved = qk_kernel.qk_config
    qk_kernel.qk_config = lambda *_: cfg
    qk_kernel.clear_plans()
    try:
        return qk_kernel.rotate_qk(q, k, 1 / math.sqrt(q.shape[-1]), None, cos, sin)
    finally:
        qk_kernel.qk_config = saved
        qk_kernel.clear_plans()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--d", type=int, nargs="+", default=[128])
    p.add_argument("--block-m", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=[None],
                   help="triton pipelining depths (1: no pipelining; default: triton's own, "
                        "what the package launches)")
    p.add_argument("--shapes", nargs="+", default=None,
                   help="(batch, tokens) pairs as B,S (default: the list above)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--interpret", action="store_true")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    if args.interpret:
        device, shapes = "cpu", [(1, 1), (2, 3)]
    else:
        from bench_op import graph_us
        from transformers.models.llama import modeling_llama

        device = "cuda"
        shapes = [tuple(map(int, v.split(","))) for v in args.shapes] if args.shapes else SHAPES
        rope = modeling_llama.apply_rotary_pos_emb
        rope = getattr(rope, "_hadamard_kq_original", rope)
    rows, best, bad = [], {}, 0
    for d, (b, s) in itertools.product(args.d, shapes):
        qkcs = make_inputs(b, s, d, device, dtype)
        q, k, cos, sin = qkcs
        shape = dict(batch=b, tokens=s, d=d, dtype=args.dtype,
                     rows=max(q.numel(), k.numel()) // d)
        default = qk_kernel.qk_config(d, shape["rows"], dtype is torch.float32)
        if not args.interpret:
            shape["clone_qk_us"] = round(graph_us(lambda t=qkcs: (t[0].clone(), t[1].clone())), 3)
            shape["rope_eager_us"] = round(graph_us(lambda t=qkcs: rope(*t)), 3)
            shape["rope_then_rows_us"] = round(graph_us(
                lambda t=qkcs: [hadamard_kq.hadamard_transform(x) for x in rope(*t)]), 3)
        for cfg in itertools.product(args.block_m, args.warps, args.stages):
            row = dict(shape, block_m=cfg[0], num_warps=cfg[1], num_stages=cfg[2],
                       default=cfg == default)
            try:
                start = time.perf_counter()
                qo, ko = run_config(q, k, cos, sin, cfg)
                if not args.interpret:
                    torch.cuda.synchronize()
                row["first_call_s"] = round(time.perf_counter() - start, 3)
                row["err_vs_floor"] = round(max(err_vs_floor(qo, q, cos, sin),
                                                err_vs_floor(ko, k, cos, sin)), 3)
                if not args.interpret:
                    row["us"] = round(graph_us(lambda c=cfg, t=qkcs: run_config(*t, c)), 3)
            except Exception as e:  # e.g. a tiling that does not compile
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            if dtype is torch.float32 and "error" not in row:
                row["rel_err"] = max(rel_err(qo, q, cos, sin), rel_err(ko, k, cos, sin))
                ok = row["rel_err"] <= MAX_REL_ERR_F32
            else:
                ok = "error" not in row and row["err_vs_floor"] <= MAX_ERR_VS_FLOOR
            bad += not ok
            key = json.dumps(shape)
            if ok and "us" in row and (key not in best or row["us"] < best[key]["us"]):
                best[key] = row
            if not ok:
                print("NOT OK", row, flush=True)
        if not args.interpret:
            save(args.out, rows, best)  # after every shape: a run cut short keeps what it has
            dflt = [r for r in rows if r["default"] and r["batch"] == b and r["tokens"] == s
                    and r["d"] == d]
            print(shape, "default", dflt[0].get("us") if dflt else None, "best",
                  best.get(json.dumps(shape)), flush=True)
    if args.interpret:
        print(f"{len(rows)} configurations checked under the interpreter, {bad} not ok")
        raise SystemExit(1 if bad else 0)


def save(out: Path, rows: list, best: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__)
    (out / "tune_qk.json").write_text(json.dumps(
        dict(env=env, rows=rows, best=list(best.values())), indent=1))


if __name__ == "__main__":
    main()
