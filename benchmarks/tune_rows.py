"""Sweep the row kernel's launch parameters (issue 6), so that ``triton_kernel.rows_config``'s
measured table ``TUNED_16BIT`` can be set from measurements.

Prefill (target 1: >= 97% of ``torch.clone``): for each (tokens, heads, d, dtype) of at least
``--min-mib`` it times, like bench_op.py (CUDA events, cold L2, GPU time only), ``torch.clone``
and the row kernel under every combination of

* ``bn``: a resident ``H_d`` or the SPLIT2 / SPLIT4 / SPLIT8 forms (``H_d = H_2 ⊗ H_{d/2}``,
  ``H_4 ⊗ H_{d/4}``, ``H_8 ⊗ H_{d/8}``; ``bn = d / 2``, ``d / 4``, ``d / 8``),
* ``BLOCK_M`` (tile rows) and ``num_warps`` -- each (bn, BLOCK_M, warps) is one compiled kernel,
* programs per SM of the persistent grid (``0`` = one program per tile, not persistent),
* ``--stages``: triton's software-pipelining depth (1 = none; 3 = triton's CUDA default).

Decode (target 2: <= 2 us of GPU time in a CUDA graph): the query view ``(1, 32, T, d)`` of
the projection for ``T`` in ``--decode-tokens``, GPU time per call inside a CUDA graph of 100
calls, against clone's in the same graph form (``pct_base``).

Every result is checked against a float64 Sylvester product (max error at most 1.05x the
single-rounding floor, the issue's bound); all rows plus the best configuration per shape go
to ``OUT/tune_rows.json``. Nothing in the package changes; the current defaults are marked
``default``.

Usage (GPU machine)::

    python benchmarks/tune_rows.py --out results/ [--d 128 256] [--dtypes bfloat16]

``--interpret`` (CPU, ``TRITON_INTERPRET=1`` set by the script) runs every configuration once
on small tensors of both size classes and checks the result, without timing: a check of the
sweep itself (the interpreter runs bf16 through the fp32-operand dot, see triton_kernel.py,
and has no SMs, so programs-per-SM values other than 0 behave alike there).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
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


def configs(n: int, small: bool, block_ms, warps, programs_per_sm, stages=(1, 2, 3)):
    """(RowsConfig candidate, default RowsConfig) for a Sylvester block ``n`` with 16-bit
    operands: a resident ``H_n`` (n <= 128), or the SPLIT2 / SPLIT4 / SPLIT8 forms
    ``bn = n / 2``, ``n / 4``, ``n / 8`` (bn >= 16)."""
    default = tk.rows_config.__wrapped__(n, False, True, small)
    np2 = max(16, n)
    bns = [b for b in (np2, np2 // 2, np2 // 4, np2 // 8) if 16 <= b <= 128]
    for bn, block_m, num_warps, pps, st in itertools.product(bns, block_ms, warps,
                                                            programs_per_sm, stages):
        yield tk.RowsConfig(bn, np2 // bn, block_m, num_warps, default.log2n, pps, st), default


def run_config(x: torch.Tensor, n: int, cfg) -> torch.Tensor:
    """The kernel with ``cfg`` (the module's config function patched for the call, and its
    per-layout plan cache emptied so that the patched function is consulted)."""
    saved = tk.rows_config
    tk.rows_config = lambda *_: cfg
    tk.clear_plans()
    try:
        return tk.hadamard_triton(x, 1 / math.sqrt(n), None, n)
    finally:
        tk.rows_config = saved
        tk.clear_plans()


def reference(x: torch.Tensor, n: int) -> torch.Tensor:
    """The exact rotation of ``x``'s ``n``-blocks: float64, normalised Sylvester matrix."""
    return (x.double().reshape(-1, n) @ sylvester(n, torch.float64, x.device)
            / math.sqrt(n)).reshape(x.shape)


def err_vs_floor(out: torch.Tensor, x: torch.Tensor, n: int) -> float:
    ref = reference(x, n)
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
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--programs-per-sm", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3],
                   help="triton pipelining depths (1: no pipelining; 3: triton's CUDA default)")
    p.add_argument("--bn", type=int, nargs="*", default=None,
                   help="only these sub-tile widths (default: every form)")
    p.add_argument("--decode-tokens", type=int, nargs="*", default=[1, 16, 64],
                   help="decode sweep: (1, 32, T, d) query views, CUDA-graph time; [] to skip")
    p.add_argument("--min-mib", type=float, default=4.0)
    p.add_argument("--reps", type=int, default=25)
    p.add_argument("--rounds", type=int, default=1,
                   help="time every configuration this many times, alternating the order "
                        "(median reported)")
    p.add_argument("--interpret", action="store_true")
    args = p.parse_args(argv)

    if args.interpret:
        device, timer = "cpu", None
        # 80 and 2200 chunks: both size classes (tk.SMALL_ROWS), partial tiles too
        shapes = [(t, 2, d) for d in args.d for t in (40, 1100)]
        args.programs_per_sm = [p for p in args.programs_per_sm if p in (0, 1)]
    else:
        from bench_op import Timer, graph_us

        device, timer = "cuda", Timer(args.reps)
        shapes = [(t, h, d) for d in args.d for h in args.heads for t in args.tokens]
    rows, best = [], {}

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                   triton=__import__("triton").__version__)
        (args.out / "tune_rows.json").write_text(json.dumps(
            dict(env=env, rows=rows, best=list(best.values())), indent=1))

    def sweep(x: torch.Tensor, shape: dict, d: int, small: bool, time_fn, base_fn) -> None:
        """Every candidate on ``x``: error vs float64, and (GPU) time vs the baseline
        ``base_fn`` (``torch.clone`` of ``x``, timed in the same rounds)."""
        pps_list = [0] if small else args.programs_per_sm  # a decode call is 1-2 tiles
        block_ms = [b for b in args.block_m if not small or b <= 64]
        timed = []  # (row, fn) of every configuration that ran and is within the bound
        for cfg, default in configs(d, small, block_ms, args.warps, pps_list, args.stages):
            if args.bn and cfg.bn not in args.bn:
                continue
            row = dict(shape, bn=cfg.bn, block_m=cfg.block_m, num_warps=cfg.num_warps,
                       programs_per_sm=cfg.programs_per_sm, num_stages=cfg.num_stages,
                       default=cfg._replace(programs_per_sm=0) == default._replace(
                           programs_per_sm=0) and (small or cfg == default))
            try:
                out = run_config(x, d, cfg)
                row["err_vs_floor"] = round(err_vs_floor(out, x, d), 3)
            except Exception as e:  # e.g. out of shared memory for this tile
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            if "error" in row or row["err_vs_floor"] > MAX_ERR_VS_FLOOR:
                print("NOT OK", row, flush=True)
            elif time_fn is not None:
                timed.append((row, lambda x=x, n=d, c=cfg: run_config(x, n, c)))
        # --rounds: the baseline and every configuration once per round, the order reversed
        # every other round (drift on the machine spreads over all of them), medians
        fns = [base_fn] + [fn for _, fn in timed]
        runs: list[list[float]] = [[] for _ in fns]
        failed: set[int] = set()
        for r in range(args.rounds if time_fn is not None else 0):
            for i in (range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))):
                if i in failed:
                    continue
                try:
                    runs[i].append(time_fn(fns[i]))
                except Exception as e:  # e.g. a launch that a CUDA graph cannot capture
                    if i == 0:
                        raise
                    timed[i - 1][0]["error"] = f"{type(e).__name__}: {e}"[:300]
                    failed.add(i)
        if time_fn is None:
            return
        base_us = statistics.median(runs[0])
        key = json.dumps(shape)
        for i, (row, _) in enumerate(timed, start=1):
            row["base_us"] = round(base_us, 3)
            if i in failed:
                print("NOT OK", row, flush=True)
                continue
            row["us"] = round(statistics.median(runs[i]), 3)
            row["runs"] = [round(u, 3) for u in runs[i]]
            row["pct_base"] = round(100 * base_us / row["us"], 1)
            if key not in best or row["pct_base"] > best[key]["pct_base"]:
                best[key] = row
        save()  # after every shape: a run cut short keeps what it has
        dflt = [r for r in rows if r["default"] and r.get("pct_base") and all(
            r[k] == v for k, v in shape.items())]
        print(shape, "base", round(base_us, 3), "us; default",
              dflt[0]["pct_base"] if dflt else None, "%; best", best.get(key), flush=True)

    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for tokens, heads, d in shapes:  # prefill: % of clone, cold L2
            x = torch.randn(tokens, heads, d, device=device).to(dtype)
            mib = x.numel() * x.element_size() / 2**20
            if timer is not None and mib < args.min_mib:
                continue
            shape = dict(kind="prefill", tokens=tokens, heads=heads, d=d, dtype=dtype_name,
                         MiB=round(mib, 1))
            small = x.numel() // d <= tk.SMALL_ROWS
            sweep(x, shape, d, small, timer, lambda x=x: x.clone())
        for tokens in ([] if args.interpret else args.decode_tokens):
            for d in args.d:  # decode: the projection's (1, T, 32, d) -> (1, 32, T, d) view
                x = torch.randn(1, tokens, 32, d, device=device).to(dtype).transpose(1, 2)
                small = x.numel() // d <= tk.SMALL_ROWS
                shape = dict(kind="decode", tokens=tokens, heads=32, d=d, dtype=dtype_name)
                sweep(x, shape, d, small, graph_us, lambda x=x: x.clone())
    bad = [r for r in rows if "error" in r or r["err_vs_floor"] > MAX_ERR_VS_FLOOR]
    if args.interpret:
        print(f"{len(rows)} configurations checked under the interpreter, {len(bad)} not ok")
        raise SystemExit(1 if bad else 0)
    save()


if __name__ == "__main__":
    main()
