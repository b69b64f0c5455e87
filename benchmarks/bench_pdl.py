"""Programmatic dependent launch (PDL) on and off, side by side in one process (issue 6,
target 2: a decode-sized rotation's GPU time in a CUDA graph, and its host cost).

Why a separate benchmark: PDL changes how a kernel overlaps the kernel *before* it, so its
effect depends on that neighbour. Three views, each with PDL on (``HF_HADAMARD_KQ_PDL=1``, set
by this script: PDL is opt-in) and off (``pdl_enabled`` patched where triton_kernel and
qk_kernel use it), every plan, closure and C++ launch rebuilt at each switch:

* ``b2b``: a CUDA graph of 100 back-to-back calls (what ``bench_op.py`` and ``tune_rows.py``
  report as GPU time per call), against ``torch.clone`` of the same tensor;
* ``after_gemm``: a graph of 100 (projection GEMM, rotation of its output) pairs, minus a
  graph of the GEMMs alone: the rotation's marginal GPU time behind the kernel that really
  precedes it in a decode step (``clone`` in the same place for scale);
* ``host``: eager host time per call, 2000 back-to-back calls and one sync (the C++ launch:
  ``cuLaunchKernelEx`` with PDL, ``cuLaunchKernel`` without).

Shapes: the query ``(1, 32, T, d)`` as the projection's transposed view (single-tensor
rotation, ``op.hadamard_apply``) and the fused layer's RoPE + rotation of q (32 heads) and
k (8 heads) in one launch (``qk_kernel.rotate_qk``), bf16, T = 1 / 16 / 64 tokens. Rounds
alternate on / off; medians are reported. Every output is compared bit for bit between on
and off (the run stops if they differ) and with a float64 reference: the single-tensor
rotation must be within 1.05x the single-rounding floor (the run stops otherwise); the fused
one's error against float64 RoPE + rotation is recorded (its RoPE is rounded in fp32 first).

Usage (GPU machine)::

    python benchmarks/bench_pdl.py --out results/bench_pdl.json [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_op import graph_us
from host_breakdown import per_call_us, set_pdl_decision
from tune_rows import err_vs_floor

from hf_hadamard_kq.ops import op as op_mod
from hf_hadamard_kq.ops import pdl
from hf_hadamard_kq.ops import qk_kernel as qk
from hf_hadamard_kq.ops import triton_kernel as tk

_PDL_ON = pdl.pdl_enabled


def set_pdl(on: bool) -> None:
    """PDL on (the package's own decision) or off, with every cached launch rebuilt."""
    set_pdl_decision(_PDL_ON if on else (lambda device: False))
    tk.clear_plans()
    qk.clear_plans()


def host_us(fn, n: int = 2000) -> float:
    """Host time per call over ``n`` back-to-back eager calls and one sync (issue 6's method),
    after 50 calls of warm-up."""
    for _ in range(50):
        fn()
    return per_call_us(fn, n)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' RoPE in float64, rounded to x.dtype (the fused kernel computes it in
    fp32 and rounds there: its error against this may exceed the floor by one RoPE rounding;
    the on/off comparison is the bit-for-bit one)."""
    c, s = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    xd = x.double()
    half = x.shape[-1] // 2
    rot = torch.cat((-xd[..., half:], xd[..., :half]), -1)
    return (xd * c + rot * s).to(x.dtype)


def case(d: int, tokens: int, batch: int = 1, hidden: int = 4096) -> dict:
    """The callables of one (d, batch, T) case: inputs built once, shared by on and off."""
    dtype = torch.bfloat16
    s = 1 / math.sqrt(d)
    h = torch.randn(batch * tokens, hidden, device="cuda", dtype=dtype)
    wq = torch.randn(32 * d, hidden, device="cuda", dtype=dtype) / math.sqrt(hidden)
    wk = torch.randn(8 * d, hidden, device="cuda", dtype=dtype) / math.sqrt(hidden)
    angle = torch.rand(batch, tokens, d // 2, device="cuda") * 100
    cos = torch.cat([angle.cos()] * 2, -1).to(dtype)
    sin = torch.cat([angle.sin()] * 2, -1).to(dtype)

    def proj_q():
        return torch.nn.functional.linear(h, wq).view(batch, tokens, 32, d).transpose(1, 2)

    def proj_k():
        return torch.nn.functional.linear(h, wk).view(batch, tokens, 8, d).transpose(1, 2)

    q, k = proj_q(), proj_k()
    return {
        "s": s, "q": q, "k": k, "cos": cos, "sin": sin,
        "single": lambda: op_mod.hadamard_apply(q, s, None, d),
        "fused": lambda: qk.rotate_qk(q, k, s, None, cos, sin),
        "clone": lambda: q.clone(),
        "clone_qk": lambda: (q.clone(), k.clone()),
        "gemm": proj_q,
        "gemm_single": lambda: op_mod.hadamard_apply(proj_q(), s, None, d),
        "gemm_clone": lambda: proj_q().clone(),
        "gemm2": lambda: (proj_q(), proj_k()),
        "gemm2_fused": lambda: qk.rotate_qk(proj_q(), proj_k(), s, None, cos, sin),
    }  # fmt: skip


def check(c: dict, d: int) -> dict:
    """Errors against float64 references (single rounding) for the current PDL setting."""
    q, k = c["q"], c["k"]
    single = c["single"]()
    fq, fk = c["fused"]()
    torch.cuda.synchronize()
    return {
        "single": single,
        "fused": (fq, fk),
        "single_err": err_vs_floor(single, q, d),
        "fused_q_err": err_vs_floor(fq, rope_ref(q, c["cos"], c["sin"]), d),
        "fused_k_err": err_vs_floor(fk, rope_ref(k, c["cos"], c["sin"]), d),
    }


def measure(c: dict) -> dict:
    """One round of every timing of a case under the current PDL setting."""
    g = {name: graph_us(c[name]) for name in
         ("single", "fused", "clone", "clone_qk", "gemm", "gemm_single", "gemm_clone", "gemm2",
          "gemm2_fused")}
    return {
        "b2b_single_us": g["single"],
        "b2b_fused_us": g["fused"],
        "b2b_clone_us": g["clone"],
        "b2b_clone_qk_us": g["clone_qk"],
        "after_gemm_single_us": g["gemm_single"] - g["gemm"],
        "after_gemm_clone_us": g["gemm_clone"] - g["gemm"],
        "after_gemm2_fused_us": g["gemm2_fused"] - g["gemm2"],
        "host_single_us": host_us(c["single"]),
        "host_fused_us": host_us(c["fused"]),
        "host_clone_us": host_us(c["clone"]),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--d", type=int, nargs="+", default=[128, 64, 256])
    parser.add_argument("--shapes", nargs="+", default=["1x1", "1x16", "1x64"],
                        help="BATCHxTOKENS of each case (decode: 32 query heads, 8 kv heads)")
    args = parser.parse_args(argv)
    os.environ[pdl.ENV] = "1"  # opt-in: the "on" side of every comparison
    pdl.pdl_enabled.cache_clear()
    if not _PDL_ON(torch.device("cuda", torch.cuda.current_device())):
        raise SystemExit("PDL is not available here (pdl.pdl_enabled is False): nothing to compare")
    import triton

    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "rounds": args.rounds, "rows": []}
    for d in args.d:
        for shape in args.shapes:
            batch, tokens = (int(v) for v in shape.split("x"))
            c = case(d, tokens, batch)
            outs = {}
            for on in (True, False):
                set_pdl(on)
                outs[on] = check(c, d)
            same = (torch.equal(outs[True]["single"], outs[False]["single"])
                    and all(torch.equal(a, b) for a, b in zip(outs[True]["fused"],
                                                              outs[False]["fused"])))
            rounds: dict[bool, list[dict]] = {True: [], False: []}
            for r in range(args.rounds):
                for on in ((True, False) if r % 2 == 0 else (False, True)):
                    set_pdl(on)
                    for _ in range(3):  # plans, compiled kernels, C++ launches
                        c["single"]()
                        c["fused"]()
                    rounds[on].append(measure(c))
            row = {"d": d, "batch": batch, "tokens": tokens, "bit_identical_on_off": same}
            for on, label in ((True, "pdl"), (False, "nopdl")):
                for key in rounds[on][0]:
                    row[f"{label}_{key}"] = round(statistics.median(m[key] for m in rounds[on]), 3)
                row[f"{label}_single_err"] = outs[on]["single_err"]
                row[f"{label}_fused_q_err"] = outs[on]["fused_q_err"]
                row[f"{label}_fused_k_err"] = outs[on]["fused_k_err"]
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            if not same:
                raise SystemExit(f"PDL on and off disagree at d={d}, {batch}x{tokens}")
            worst = max(outs[on]["single_err"] for on in (True, False))
            if not worst <= 1.05:
                raise SystemExit(f"single-tensor error {worst:.3f}x the floor at d={d}, "
                                 f"{batch}x{tokens}")
    set_pdl(True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
