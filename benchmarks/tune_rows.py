"""Sweep the row kernel's launch parameters at prefill sizes (GPU), to choose ``rows_config``.

For d in {64, 128, 256}, bf16, (tokens, 32 heads) with 4-64 MiB per tensor, it times the
kernel (cold L2, median of CUDA-event times, as bench_op.py) for each (BLOCK_M, num_warps,
programs per SM) candidate against ``torch.clone`` and prints % of clone. It patches the
config function and the persistent-grid size in place; nothing is written to the package.

Usage (GPU machine): ``python benchmarks/tune_rows.py --out results/``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_op import Timer

from hf_hadamard_kq.ops import triton_kernel as tk


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    timer = Timer(args.reps)
    default_cfg = tk.rows_config
    rows = []
    for d in (64, 128, 256):
        for tokens in (512, 2048, 8192):
            x = torch.randn(tokens, 32, d, device="cuda").bfloat16()
            mib = x.numel() * 2 / 2**20
            if mib < 2:
                continue
            clone = timer(lambda x=x: x.clone())
            base = default_cfg(d, False, True)
            for block_m in (32, 64, 128, 256):
                if block_m * base.bn > 32768:
                    continue
                for warps in (4, 8):
                    for per_sm in (2, 4, 8):
                        cfg = base._replace(block_m=block_m, num_warps=warps)
                        tk.rows_config = lambda n, f, s, cfg=cfg, d=d: (
                            cfg if (n, f, s) == (d, False, True) else default_cfg(n, f, s))
                        tk.PROGRAMS_PER_SM = per_sm
                        tk._max_programs.cache_clear()
                        try:
                            us = timer(lambda x=x, d=d: tk.hadamard_triton(x, d**-0.5, None, d))
                        except Exception as e:  # out of resources: report, go on
                            print(d, block_m, warps, per_sm, "failed:", type(e).__name__)
                            continue
                        row = dict(d=d, tokens=tokens, MiB=round(mib, 1), block_m=block_m,
                                   warps=warps, per_sm=per_sm, us=round(us, 2),
                                   clone_us=round(clone, 2),
                                   pct_clone=round(100 * clone / us, 1),
                                   default=cfg == base and per_sm == 4)
                        rows.append(row)
            best = max((r for r in rows if r["d"] == d and r["tokens"] == tokens),
                       key=lambda r: r["pct_clone"])
            print("best", best, flush=True)
    tk.rows_config = default_cfg
    (args.out / "tune_rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
