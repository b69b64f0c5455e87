"""A/B of one of the fused Q/K kernel's constexprs: ``ROPE_FENCE`` (``qk_kernel._fence``, the
default; off / on) or ``QSPLIT`` (the Sylvester halves split once more in registers,
``qk_kernel._pairs`` / ``_quarters``; ``--values`` parts per half, default 1 / 4).

Why: the fence is a code-generation workaround (triton moved the MMA-layout conversion above
the RoPE) and the split halves trade tensor-core work and a resident ``H_{D/2}`` for register
splits and a butterfly; this measures what each buys, per shape, and checks every build
against float64. GPU time per call inside a CUDA graph of 100 calls (bench_op's
``graph_us``), the builds alternating (``--reps`` rounds, the order reversed every other
round), next to ``torch.clone`` of q and k; error against float64 (tune_qk's reference: RoPE
rounded once, then the Sylvester product). Llama-3-8B heads (32 q, 8 kv), the projections'
transposed views, decode and prefill shapes, d = 64, 128, 256 (bf16) and 128 (fp16) unless
``--d`` narrows them. ``--warps``: also time the last value's build with these warp counts (the
plan's own count otherwise). Nothing in the package changes: the plan builder is wrapped here.

Usage (GPU): ``python benchmarks/qk_fence_ab.py OUT.json [--knob QSPLIT --values 1 2 4]
[--d 256] [--warps 2 4 8] [--decode-only]``
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


def _allowed(knob: str, value, meta: dict):
    """``value`` where the kernel can take it, else the knob's "off" (the fence: on only
    where the plan asks for it; the split: 16-bit Sylvester launches, parts >= 16 wide)."""
    if knob == "QSPLIT":
        if value not in (1, 2, 4):
            raise SystemExit(f"--values: QSPLIT takes 1, 2 or 4 parts per half, not {value}")
        ok = meta["SYLVESTER"] and not meta["DOT_F32"] and meta["HALF"] // value >= 16
        return value if ok else 1
    return bool(value) and meta[knob]


def _plan(*args, **kwargs):
    """The package's plan with the knob forced to ``VARIANT``'s value (where
    :func:`_allowed`) and, if given, its warp count."""
    plan = _ORIGINAL(*args, **kwargs)
    knob, value, warps = VARIANT
    meta = dict(plan.meta)
    if value is not None:
        meta[knob] = _allowed(knob, value, meta)
    num_warps = warps or plan.num_warps
    return plan._replace(meta=meta, num_warps=num_warps,
                         key=(tuple(meta.values()),) + plan.key[1:3] + (num_warps,)
                         + plan.key[4:])


def run(q, k, cos, sin):
    qk_kernel.clear_plans()
    return qk_kernel.rotate_qk(q, k, 1 / math.sqrt(q.shape[-1]), None, cos, sin)


def measure(d: int, dtype: torch.dtype, b: int, s: int, knob: str, values, warps,
            reps: int) -> dict:
    q, k, cos, sin = inputs = tune_qk.make_inputs(b, s, d, "cuda", dtype=dtype)
    row = dict(d=d, dtype=str(dtype), batch=b, tokens=s, knob=knob,
               clone_us=round(graph_us(lambda: (q.clone(), k.clone())), 3))
    builds = [(v, None) for v in values] + [(values[-1], w) for w in warps]
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
    p.add_argument("--knob", choices=["ROPE_FENCE", "QSPLIT"], default="ROPE_FENCE")
    p.add_argument("--values", type=int, nargs="+", default=None,
                   help="the knob's values to compare (default: 0 1 for the fence, 1 4 for QSPLIT)")
    p.add_argument("--d", type=int, nargs="+", default=None, help="only these head dims")
    p.add_argument("--warps", type=int, nargs="*", default=[])
    p.add_argument("--decode-only", action="store_true")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    values = args.values or ([1, 4] if args.knob == "QSPLIT" else [0, 1])
    if args.knob == "ROPE_FENCE":
        values = [bool(v) for v in values]
    qk_kernel._make_plan = _plan
    rows = []
    for d, dtype in CASES:
        if args.d and d not in args.d:
            continue
        for b, s in DECODE_SHAPES if args.decode_only else SHAPES:
            rows.append(measure(d, dtype, b, s, args.knob, values, args.warps, args.reps))
            print({k: v for k, v in rows[-1].items() if not k.startswith("runs_")}, flush=True)
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__)
    args.out.write_text(json.dumps(dict(env, rows=rows), indent=1))


if __name__ == "__main__":
    main()
