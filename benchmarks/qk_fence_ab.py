"""A/B of one of the fused Q/K kernel's boolean constexprs: ``ROPE_FENCE`` (``qk_kernel._fence``,
the default) or ``QSPLIT4`` (the quarter form of the Sylvester halves, ``qk_kernel._quarters``).

Why: the fence is a code-generation workaround (triton moved the MMA-layout conversion above
the RoPE) and the quarter form trades tensor-core work and a resident ``H_{D/2}`` for register
splits and a butterfly; this measures what each buys, per shape, and checks every build
against float64. GPU time per call inside a CUDA graph of 100 calls (bench_op's
``graph_us``), the builds alternating (``--reps`` rounds, the order reversed every other
round), next to ``torch.clone`` of q and k; error against float64 (tune_qk's reference: RoPE
rounded once, then the Sylvester product). Llama-3-8B heads (32 q, 8 kv), the projections'
transposed views, decode and prefill shapes, d = 64, 128, 256 (bf16) and 128 (fp16) unless
``--d`` narrows them. ``--warps``: also time the "on" build with these warp counts (the plan's
own count otherwise). Nothing in the package changes: the plan builder is wrapped here.

Usage (GPU): ``python benchmarks/qk_fence_ab.py OUT.json [--knob QSPLIT4] [--d 256]
[--warps 2 4 8] [--decode-only]``
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tune_qk
from bench_op import graph_us

from hf_hadamard_kq.ops import qk_kernel

SHAPES = [(1, 1), (1, 16), (1, 64), (8, 1), (32, 1), (1, 512), (1, 4096)]
DECODE_SHAPES = SHAPES[:5]
CASES = [(128, torch.bfloat16), (64, torch.bfloat16), (256, torch.bfloat16),
         (128, torch.float16)]
_ORIGINAL = qk_kernel._make_plan
#: The build the wrapped plan gives: (knob, value or None for the plan's own, warps or None).
VARIANT: list = ["ROPE_FENCE", None, None]


def _allowed(knob: str, meta: dict) -> bool:
    """Where the kernel can take the knob at all (the fence: where the plan asks for it)."""
    if knob == "QSPLIT4":
        return meta["SYLVESTER"] and not meta["DOT_F32"] and meta["HALF"] // 4 >= 16
    return meta[knob]


def _plan(*args, **kwargs):
    """The package's plan with the knob forced to ``VARIANT``'s value (on only where
    :func:`_allowed`) and, if given, its warp count."""
    plan = _ORIGINAL(*args, **kwargs)
    knob, value, warps = VARIANT
    meta = dict(plan.meta)
    if value is not None:
        meta[knob] = value and _allowed(knob, meta)
    num_warps = warps or plan.num_warps
    return plan._replace(meta=meta, num_warps=num_warps,
                         key=(tuple(meta.values()),) + plan.key[1:3] + (num_warps,)
                         + plan.key[4:])


def run(q, k, cos, sin):
    qk_kernel.clear_plans()
    return qk_kernel.rotate_qk(q, k, 1 / math.sqrt(q.shape[-1]), None, cos, sin)


def measure(d: int, dtype: torch.dtype, b: int, s: int, knob: str, warps, reps: int) -> dict:
    q, k, cos, sin = inputs = tune_qk.make_inputs(b, s, d, "cuda", dtype=dtype)
    row = dict(d=d, dtype=str(dtype), batch=b, tokens=s, knob=knob,
               clone_us=round(graph_us(lambda: (q.clone(), k.clone())), 3))
    builds = [(False, None), (True, None)] + [(True, w) for w in warps]
    for rep in range(reps):
        for value, w in builds if rep % 2 == 0 else builds[::-1]:
            VARIANT[:] = [knob, value, w]
            name = f"{value}" if w is None else f"{value}_w{w}"
            qo, ko = run(*inputs)
            err = max(tune_qk.err_vs_floor(qo, q, cos, sin), tune_qk.err_vs_floor(ko, k, cos, sin))
            row.setdefault(f"err_{name}", round(err, 3))
            row.setdefault(f"runs_{name}", []).append(round(graph_us(lambda: run(*inputs)), 3))
    VARIANT[:] = ["ROPE_FENCE", None, None]
    for name in [key[5:] for key in row if key.startswith("runs_")]:
        row[f"us_{name}"] = round(statistics.median(row[f"runs_{name}"]), 3)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--knob", choices=["ROPE_FENCE", "QSPLIT4"], default="ROPE_FENCE")
    p.add_argument("--d", type=int, nargs="+", default=None, help="only these head dims")
    p.add_argument("--warps", type=int, nargs="*", default=[])
    p.add_argument("--decode-only", action="store_true")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    qk_kernel._make_plan = _plan
    rows = []
    for d, dtype in CASES:
        if args.d and d not in args.d:
            continue
        for b, s in DECODE_SHAPES if args.decode_only else SHAPES:
            rows.append(measure(d, dtype, b, s, args.knob, args.warps, args.reps))
            print({k: v for k, v in rows[-1].items() if not k.startswith("runs_")}, flush=True)
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__)
    args.out.write_text(json.dumps(dict(env, rows=rows), indent=1))


if __name__ == "__main__":
    main()
