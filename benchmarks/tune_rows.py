"""Sweep the row kernel's launch parameters at prefill sizes (issue 6, target 1: >= 97% of
``torch.clone``), so that ``triton_kernel.rows_config`` can be set from measurements.

For each (tokens, heads, d, dtype) of at least ``--min-mib`` it times, like bench_op.py (CUDA
events, cold L2, GPU time only), ``torch.clone`` and the row kernel under every combination of

* ``BLOCK_M`` (tile rows) and ``num_warps`` -- each pair is one compiled kernel,
* programs per SM of the persistent grid (``0`` = one program per tile, not persistent),

checks every result against a float64 Sylvester product (max error at most 1.05x the
single-rounding floor, the issue's bound), and writes all rows plus the best configuration
per shape to ``OUT/tune_rows.json``. Nothing in the package changes; the current defaults
are one of the swept points (marked ``default``).

Usage (GPU machine)::

    python benchmarks/tune_rows.py --out results/ [--d 128 256] [--dtypes bfloat16]

``--interpret`` (CPU, ``TRITON_INTERPRET=1`` set by the script) runs every configuration once
on a small tensor and checks the result, without timing: a check of the sweep itself (the
interpreter runs bf16 through the fp32-operand dot, see triton_kernel.py, and has no SMs, so
programs-per-SM values other than 0 behave alike there).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from pathlib import Path

if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_hadamard_kq.ops import triton_kernel as tk
from hf_hadamard_kq.ops.matrices import sylvester

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: Issue 6: max error <= 1.05x the single-rounding floor.
MAX_ERR_VS_FLOOR = 1.05


def configs(n: int, block_ms, warps):
    """RowsConfig candidates for a Sylvester block ``n`` with 16-bit operands."""
    default = tk.rows_config.__wrapped__(n, False, True)
    for block_m, num_warps in itertools.product(block_ms, warps):
        yield tk.RowsConfig(default.bn, default.nb, block_m, num_warps, default.log2n), default


def run_config(x: torch.Tensor, n: int, cfg, programs_per_sm: int) -> torch.Tensor:
    """The kernel with ``cfg`` and this grid policy (module functions patched for the call)."""
    saved = tk.rows_config, tk._max_programs
    tk.rows_config = lambda *_: cfg
    if programs_per_sm == 0:
        tk._max_programs = lambda _device: 2**31 - 1  # one program per tile
    elif x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        tk._max_programs = lambda _device: programs_per_sm * sms
    try:
        return tk.hadamard_triton(x, 1 / math.sqrt(n), None, n)
    finally:
        tk.rows_config, tk._max_programs = saved


def err_vs_floor(out: torch.Tensor, x: torch.Tensor, n: int) -> float:
    ref = (x.double().reshape(-1, n) @ sylvester(n, torch.float64, x.device)
           / math.sqrt(n)).reshape(x.shape)
    err = (out.double() - ref).abs().max().item()
    floor = (ref.to(out.dtype).double() - ref).abs().max().item()
    return err / floor if floor > 0 else float("nan")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--d", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bfloat16"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--heads", type=int, nargs="+", default=[8, 32])
    p.add_argument("--block-m", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--programs-per-sm", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    p.add_argument("--min-mib", type=float, default=4.0)
    p.add_argument("--reps", type=int, default=25)
    p.add_argument("--interpret", action="store_true")
    args = p.parse_args(argv)

    if args.interpret:
        device, timer = "cpu", None
        shapes = [(40, 2, d) for d in args.d]  # 40 rows per head: partial tiles too
        args.programs_per_sm = [p for p in args.programs_per_sm if p in (0, 1)]
    else:
        from bench_op import Timer

        device, timer = "cuda", Timer(args.reps)
        shapes = [(t, h, d) for d in args.d for h in args.heads for t in args.tokens]
    rows, best = [], {}
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for tokens, heads, d in shapes:
            x = torch.randn(tokens, heads, d, device=device).to(dtype)
            mib = x.numel() * x.element_size() / 2**20
            if timer is not None and mib < args.min_mib:
                continue
            shape = dict(tokens=tokens, heads=heads, d=d, dtype=dtype_name, MiB=round(mib, 1))
            clone_us = timer(lambda x=x: x.clone()) if timer else None
            for cfg, default in configs(d, args.block_m, args.warps):
                for pps in args.programs_per_sm:
                    row = dict(shape, block_m=cfg.block_m, num_warps=cfg.num_warps,
                               programs_per_sm=pps,
                               default=(cfg == default and pps == tk.PROGRAMS_PER_SM))
                    try:
                        out = run_config(x, d, cfg, pps)
                        row["err_vs_floor"] = round(err_vs_floor(out, x, d), 3)
                        if timer is not None:
                            us = timer(lambda x=x, n=d, c=cfg, q=pps: run_config(x, n, c, q))
                            row["us"] = round(us, 2)
                            row["pct_clone"] = round(100 * clone_us / us, 1)
                    except Exception as e:  # e.g. out of shared memory for this tile
                        row["error"] = f"{type(e).__name__}: {e}"[:300]
                    rows.append(row)
                    ok = "error" not in row and row["err_vs_floor"] <= MAX_ERR_VS_FLOOR
                    key = json.dumps(shape)
                    if ok and timer is not None and (
                            key not in best or row["pct_clone"] > best[key]["pct_clone"]):
                        best[key] = row
                    if not ok:
                        print("NOT OK", row, flush=True)
            if timer is not None:
                dflt = [r for r in rows if r["default"] and r.get("pct_clone") and all(
                    r[k] == v for k, v in shape.items())]
                print(shape, "clone", round(clone_us, 2), "us; default",
                      dflt[0]["pct_clone"] if dflt else None, "%; best",
                      best.get(json.dumps(shape)), flush=True)
    bad = [r for r in rows if "error" in r or r["err_vs_floor"] > MAX_ERR_VS_FLOOR]
    if args.interpret:
        print(f"{len(rows)} configurations checked under the interpreter, {len(bad)} not ok")
        raise SystemExit(1 if bad else 0)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__)
    (args.out / "tune_rows.json").write_text(json.dumps(
        dict(env=env, rows=rows, best=list(best.values())), indent=1))


if __name__ == "__main__":
    main()
