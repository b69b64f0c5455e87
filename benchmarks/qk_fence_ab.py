"""A/B of the fused Q/K kernel's ``ROPE_FENCE`` constexpr (``qk_kernel._fence``).

Why: the fence is a code-generation workaround (triton moved the MMA-layout conversion above
the RoPE); this measures what it buys, per shape, and checks both builds against float64.
GPU time per call inside a CUDA graph of 100 calls (bench_op's ``graph_us``), fenced and
unfenced builds alternating (3 reps each), next to ``torch.clone`` of q and k; error against
float64 (tune_qk's reference: RoPE rounded once, then the Sylvester product). Llama-3-8B heads
(32 q, 8 kv), the projections' transposed views, decode and prefill shapes, d = 64, 128, 256
(bf16) and 128 (fp16). Nothing in the package changes: the plan builder is wrapped here.

Usage (GPU): ``python benchmarks/qk_fence_ab.py OUT.json``
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tune_qk
from bench_op import graph_us

from hf_hadamard_kq.ops import qk_kernel

SHAPES = [(1, 1), (1, 16), (1, 64), (8, 1), (32, 1), (1, 512), (1, 4096)]
CASES = [(128, torch.bfloat16), (64, torch.bfloat16), (256, torch.bfloat16),
         (128, torch.float16)]
_ORIGINAL = qk_kernel._make_plan
FENCE = [True]


def _plan(*args, **kwargs):
    """The package's plan with ``ROPE_FENCE`` forced off when ``FENCE[0]`` is False."""
    plan = _ORIGINAL(*args, **kwargs)
    meta = dict(plan.meta)
    meta["ROPE_FENCE"] = meta["ROPE_FENCE"] and FENCE[0]
    return plan._replace(meta=meta, key=(tuple(meta.values()),) + plan.key[1:])


def run(q, k, cos, sin):
    qk_kernel.clear_plans()
    return qk_kernel.rotate_qk(q, k, 1 / math.sqrt(q.shape[-1]), None, cos, sin)


def measure(d: int, dtype: torch.dtype, b: int, s: int) -> dict:
    q, k, cos, sin = inputs = tune_qk.make_inputs(b, s, d, "cuda", dtype=dtype)
    row = dict(d=d, dtype=str(dtype), batch=b, tokens=s,
               clone_us=round(graph_us(lambda: (q.clone(), k.clone())), 3))
    for rep in range(3):
        for fence in (False, True) if rep % 2 == 0 else (True, False):
            FENCE[0] = fence
            qo, ko = run(*inputs)
            err = max(tune_qk.err_vs_floor(qo, q, cos, sin), tune_qk.err_vs_floor(ko, k, cos, sin))
            row.setdefault(f"err_{fence}", round(err, 3))
            row.setdefault(f"us_{fence}", []).append(round(graph_us(lambda: run(*inputs)), 3))
    FENCE[0] = True
    return row


def main() -> None:
    qk_kernel._make_plan = _plan
    rows = []
    for d, dtype in CASES:
        for b, s in SHAPES:
            rows.append(measure(d, dtype, b, s))
            print(rows[-1], flush=True)
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__)
    Path(sys.argv[1]).write_text(json.dumps(dict(env, rows=rows), indent=1))


if __name__ == "__main__":
    main()
