"""Where a PDL-launched kernel's programs land behind a GEMM (issue 6; why programmatic
dependent launch is slower behind some projection GEMMs, see BENCHMARKS.md session 21).

A probe kernel with the fused Q/K kernel's decode shape (2 warps; 3, 40, 80 or 160 programs:
16-row tiles of 32 query + 8 key heads at 1, 16, 32, 64 tokens) records each program's SM
(``%smid``) and start time (``%globaltimer``), launched right behind a projection GEMM
(``linear`` of ``(M, 4096)`` by ``(N, 4096)``) in a CUDA graph, with PDL (it waits with
``griddepcontrol.wait`` first, as the package's kernels do) and without. Reported per case,
medians over 20 replays: how many distinct SMs ran the programs, the most programs on one SM,
and the spread of their start times.

Usage (GPU machine, sm_90+)::

    python benchmarks/pdl_placement.py --out results/pdl_placement.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
from pathlib import Path

import torch
import triton
import triton.language as tl

#: (M rows of the GEMM, N, probe programs): the k projection of a d = 128 model (N = 1024)
#: at 1 / 16 / 32 / 64 tokens with the fused launch's grid, a q projection (N = 4096) at 32
#: tokens, and a d = 256 q projection (N = 8192) with a single-tensor rotation's 2 programs.
CASES = ((1, 1024, 3), (16, 1024, 40), (32, 1024, 80), (64, 1024, 160), (32, 4096, 64),
         (1, 8192, 2))


@triton.jit
def _probe(out_ptr, one_ptr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
    one = tl.load(one_ptr)  # (the inline asm needs an operand)
    sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [one], dtype=tl.int32,
                                   is_pure=False, pack=1)
    now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [one],
                                    dtype=tl.int64, is_pure=False, pack=1)
    pid = tl.program_id(0)
    tl.store(out_ptr + pid * 2, sm.to(tl.int64))
    tl.store(out_ptr + pid * 2 + 1, now)


def placement(m: int, n: int, grid: int, pdl: bool, replays: int = 20) -> dict:
    h = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16) / 64
    one = torch.ones(1, device="cuda", dtype=torch.int32)
    out = torch.zeros(grid * 2, device="cuda", dtype=torch.int64)
    _probe[(grid,)](out, one, PDL=pdl, launch_pdl=pdl, num_warps=2)  # compile
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.nn.functional.linear(h, w)  # cuBLAS warm-up outside the capture
        with torch.cuda.graph(graph, stream=stream):
            torch.nn.functional.linear(h, w)
            _probe[(grid,)](out, one, PDL=pdl, launch_pdl=pdl, num_warps=2)
    torch.cuda.current_stream().wait_stream(stream)
    sms, most, spread = [], [], []
    for _ in range(replays):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        rows = out.view(grid, 2).cpu()
        count = collections.Counter(rows[:, 0].tolist())
        sms.append(len(count))
        most.append(max(count.values()))
        spread.append(int(rows[:, 1].max() - rows[:, 1].min()))
    return {"distinct_sms": statistics.median(sms), "most_programs_per_sm": statistics.median(most),
            "start_spread_ns": statistics.median(spread)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__,
              "sms": torch.cuda.get_device_properties(0).multi_processor_count, "rows": []}
    for m, n, grid in CASES:
        row = {"M": m, "N": n, "programs": grid,
               "pdl": placement(m, n, grid, True), "nopdl": placement(m, n, grid, False)}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
