"""Where a decode-sized rotation's GPU time goes (issue 6, target 2: <= 2 us in a CUDA graph;
target 4: where the remaining gap is): a ladder of kernels, each adding one step of the
rotation's latency chain, side by side with the shipped rotation and ``torch.clone``.

Rungs (d = 128; the tile copies use the row kernel's decode grid, 16-row tiles):

* ``empty_tl``: a triton kernel that does nothing (the launch in a graph);
* ``copy_tl``: a triton tile copy, 16-byte loads and stores;
* ``copy_l{0,1}s{0,1}_w{1,4}``: the same copy in Gluon with 1 or 4 warps, loaded as 16-byte
  vectors (``l0``) or straight into the tensor cores' A-operand registers (``l1``), stored as
  16-byte vectors (``s0``) or from the accumulator registers (``s1``);
* ``g_bn{BN}_m{WM}n{WN}_l{0,1}s{0,1}``: the rotation in Gluon (``gluon_decode.decode_rows``:
  H_d = H_{d/BN} ⊗ H_BN with H_BN generated in the B-operand registers, never in shared
  memory; ``WM x WN`` warps), for d = 64 / 128 / 256;
* ``shipped_view`` / ``shipped_flat``: ``op.hadamard_apply`` on the query view ``(1, 32, T, d)``
  of the projection (what target 2 measures) and on the same data as contiguous rows;
* ``clone_view`` / ``clone_flat``: ``torch.clone`` of the same tensors.

GPU time per call inside a CUDA graph of 100 calls (``bench_op.graph_us``), ``--rounds``
rounds in alternating order, medians. Every rotation is checked against the float64 product
first (max error at most 1.05x the single-rounding floor, else the run stops).

Usage (GPU machine, a triton with ``triton.experimental.gluon``)::

    python benchmarks/decode_ladder.py --out results/decode_ladder.json [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gluon_decode as g
import triton
from bench_op import graph_us
from tune_rows import err_vs_floor

from hf_hadamard_kq.ops import op

HEADS = 32
#: Warp arrangements of the Gluon rotation (rows x columns of the MMA tile).
WARPS = ((1, 1), (1, 2), (1, 4), (2, 1), (4, 1))


def gluon_rotation(xq: torch.Tensor, d: int, bn: int, wm: int, wn: int, lf: bool, sf: bool):
    """``decode_rows`` on the query view ``xq`` (read in memory order, written transposed)."""
    tokens = xq.shape[2]
    rows = xq.numel() // d
    out = torch.empty((1, HEADS, tokens, d), dtype=xq.dtype, device=xq.device)
    grid = (triton.cdiv(rows, 16 * wm),)
    scale = 1 / math.sqrt(d)

    def fn():
        g.decode_rows[grid](xq, out, rows, HEADS, tokens, scale, D=d, BN=bn, WM=wm, WN=wn,
                            TRANSPOSED=True, LOAD_FRAG=lf, STORE_FRAG=sf, num_warps=wm * wn)
        return out
    return fn


def case(d: int, tokens: int) -> dict[str, tuple]:
    """``name -> (callable, input or None)``: the input is what a rotation's output is checked
    against (None for copies and clones)."""
    base = torch.randn(1, tokens, HEADS, d, device="cuda", dtype=torch.bfloat16)
    xq = base.transpose(1, 2)  # the projection's view
    flat = base.reshape(tokens * HEADS, d)
    rows = tokens * HEADS
    scale = 1 / math.sqrt(d)
    var: dict[str, tuple] = {
        "clone_view": (lambda: xq.clone(), None),
        "clone_flat": (lambda: flat.clone(), None),
        "shipped_view": (lambda: op.hadamard_apply(xq, scale, None, d), xq),
        "shipped_flat": (lambda: op.hadamard_apply(flat, scale, None, d), flat),
    }
    if d == 128:
        out = torch.empty_like(flat)
        grid = (triton.cdiv(rows, 16),)
        var["empty_tl"] = (lambda: g.empty_tl[grid](flat, out, rows), None)
        var["copy_tl"] = (lambda: g.copy_tl[grid](flat, out, rows, D=d, BLOCK_M=16,
                                                  num_warps=4), None)
        for lf in (False, True):
            for sf in (False, True):
                for wn in (1, 4):
                    var[f"copy_l{int(lf)}s{int(sf)}_w{wn}"] = (
                        lambda lf=lf, sf=sf, wn=wn: g.copy_tile[grid](
                            flat, out, rows, D=d, WN=wn, LOAD_FRAG=lf, STORE_FRAG=sf,
                            num_warps=wn), None)
    for bn in (d, d // 2, d // 4):
        if not 32 <= bn <= 128:
            continue
        for wm, wn in WARPS:
            if bn < 8 * wn or 16 * wm > rows or (d != 128 and wm * wn == 4):
                continue
            for lf in (False, True):
                for sf in (False, True):
                    var[f"g_bn{bn}_m{wm}n{wn}_l{int(lf)}s{int(sf)}"] = (
                        gluon_rotation(xq, d, bn, wm, wn, lf, sf), xq)
    return var


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__}
    print(env, flush=True)
    cases = [(d, t, case(d, t)) for d in args.d for t in args.tokens]
    errors: dict[str, float] = {}
    for d, t, var in cases:
        for name, (fn, src) in var.items():
            if src is None:
                continue
            out = fn()
            torch.cuda.synchronize()
            errors[f"{d}/{t}/{name}"] = err = err_vs_floor(out.reshape(src.shape), src, d)
            if not err <= 1.05:
                raise SystemExit(f"{name} at d={d}, T={t}: max error {err:.3f}x the floor")
    times: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for d, t, var in cases:
            names = list(var) if r % 2 == 0 else list(reversed(var))
            for name in names:
                times.setdefault(f"{d}/{t}/{name}", []).append(graph_us(var[name][0]))
    rows = [{"d": int(k.split("/")[0]), "tokens": int(k.split("/")[1]),
             "name": k.split("/", 2)[2], "us": round(statistics.median(v), 3),
             "runs": [round(u, 3) for u in v], "err_vs_floor": errors.get(k)}
            for k, v in times.items()]
    for d, t, _ in cases:
        print(f"--- d={d} T={t}")
        for row in sorted((r for r in rows if r["d"] == d and r["tokens"] == t),
                          key=lambda r: r["us"]):
            print(f"{row['name']:28s} {row['us']:7.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**env, "rounds": args.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
