"""Benchmark the Hadamard op on a GPU against the memory-bandwidth limit.

For each (tokens, heads, d, dtype) it times, with CUDA events and a cold L2 (a 256 MiB buffer
is overwritten before every timed call), the median of ``--reps`` calls of:

* ``ours``   - ``torch.ops.hadamard_kq.hadamard_transform`` (the Triton kernel on CUDA),
* ``clone``  - ``torch.clone``: one read + one write, the physical limit of this transform,
* ``dense``  - ``x @ (H / sqrt(d))`` with torch in the same dtype,
* ``dao``    - Dao-AILab ``fast_hadamard_transform`` when it is importable.

and reports GB/s (bytes read + written), our time as % of clone's ("% clone" = clone time /
our time), and the max error of each method divided by the single-rounding floor
(``|round(exact) - exact|``; 1.0 means as accurate as possible in that dtype).

It also measures decode-size host overhead: 2000 back-to-back eager calls with one sync
(wall time / call), and GPU time per call inside a CUDA graph, for single rotations and for a
layer's q and k together (one launch, with and without fused RoPE; see bench_decode).

Usage (GPU machine): ``python benchmarks/bench_op.py --out results/``
Writes ``bench_op.csv`` and ``bench_op.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_hadamard_kq
from hf_hadamard_kq.ops.matrices import sylvester

OP = torch.ops.hadamard_kq.hadamard_transform.default


def _dao():
    try:
        from fast_hadamard_transform import hadamard_transform as dao
    except Exception:  # not installed / not built: reported as absent
        return None
    return dao


class Timer:
    """Median CUDA-event time of a callable with L2 flushed before each call.

    A ~0.5 ms spin kernel is queued after the flush and before the start event, so the GPU is
    still busy while the host prepares the launch: the interval measures GPU time only, not
    the host overhead of the call (that is measured separately, in bench_decode).
    """

    def __init__(self, reps: int) -> None:
        self.reps = reps
        self.flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")

    def __call__(self, fn) -> float:
        fn()  # warm-up / JIT
        torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            self.flush.zero_()
            torch.cuda._sleep(1_000_000)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)  # microseconds
        times.sort()
        return times[len(times) // 2]


def _err_ratio(out: torch.Tensor, ref64: torch.Tensor) -> float:
    err = (out.double() - ref64).abs().max().item()
    floor = (ref64.to(out.dtype).double() - ref64).abs().max().item()
    return err / floor if floor > 0 else float("nan")


def _reference(x: torch.Tensor, d: int, matrix=None) -> torch.Tensor:
    h = (matrix.double() if matrix is not None else sylvester(d, torch.float64, x.device))
    return (x.double().reshape(-1, d) @ h / math.sqrt(d)).reshape(x.shape)


SIZE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def bench_sizes(timer: Timer, rows: list[dict], dtypes, min_bytes: int) -> None:
    dao = _dao()
    shapes = [(t, h, d) for d in (64, 128, 256) for h in (8, 32) for t in (1024, 4096, 16384)]
    for dtype in dtypes:
        for tokens, heads, d in shapes:
            x = torch.randn(tokens, heads, d, device="cuda").to(dtype)
            nbytes = x.numel() * x.element_size()
            if nbytes < min_bytes:
                continue
            ref = _reference(x, d)
            scale = 1 / math.sqrt(d)
            hn = (sylvester(d, torch.float32, "cuda") * scale).to(dtype)
            methods = {
                "ours": lambda x=x, d=d, s=scale: OP(x, s, None, d),
                "clone": lambda x=x: x.clone(),
                "dense": lambda x=x, hn=hn: x @ hn,
            }
            if dao is not None:
                methods["dao"] = lambda x=x, s=scale: dao(x, s)
            row = dict(kind="prefill", tokens=tokens, heads=heads, d=d,
                       dtype=str(dtype).replace("torch.", ""), MiB=round(nbytes / 2**20, 1))
            for name, fn in methods.items():
                us = timer(fn)
                row[f"{name}_us"] = round(us, 2)
                row[f"{name}_GBps"] = round(2 * nbytes / us / 1e3, 1)
                if name != "clone":
                    out = fn()
                    row[f"{name}_err_vs_floor"] = round(_err_ratio(out, ref), 3)
                    if dtype is torch.float32:  # the floor is tiny there: relative error
                        row[f"{name}_rel_err"] = float(
                            (out.double() - ref).abs().max() / ref.abs().max())
            row["ours_pct_clone"] = round(100 * row["clone_us"] / row["ours_us"], 1)
            rows.append(row)
            print(row, flush=True)


def _ours_vs_clone(timer: Timer, kind: str, x: torch.Tensor, d: int, matrix=None) -> dict:
    """One row: our op (Sylvester, or ``matrix`` in x's dtype) against clone, and its error."""
    fn_matrix = None if matrix is None else matrix.to(x.dtype)
    scale = 1 / math.sqrt(d)
    us_ours = timer(lambda: OP(x, scale, fn_matrix, d))
    us_clone = timer(lambda: x.clone())
    err = _err_ratio(OP(x, scale, fn_matrix, d), _reference(x, d, matrix=matrix))
    rows = x.numel() // x.shape[-1]
    return dict(kind=kind, tokens=x.shape[0], heads=rows // x.shape[0], d=d,
                dtype=str(x.dtype).replace("torch.", ""),
                MiB=round(x.numel() * x.element_size() / 2**20, 1), ours_us=round(us_ours, 2),
                clone_us=round(us_clone, 2), ours_pct_clone=round(100 * us_clone / us_ours, 1),
                ours_err_vs_floor=round(err, 3))


def bench_large_and_matrix(timer: Timer, rows: list[dict]) -> None:
    dtype = torch.bfloat16
    cases = []
    for d in (512, 1024, 4096, 32768):
        cases.append(("large_d", torch.randn((1 << 24) // d, d, device="cuda").to(dtype), d,
                      None))
    for d in (80, 96, 112, 160):
        gen = torch.Generator(device="cuda").manual_seed(d)
        m = torch.randint(0, 2, (d, d), device="cuda", generator=gen).float() * 2 - 1
        cases.append(("explicit_matrix", torch.randn(8192, 32, d, device="cuda").to(dtype), d, m))
    for kind, x, d, m in cases:
        row = _ours_vs_clone(timer, kind, x, d, m)
        rows.append(row)
        print(row, flush=True)


def graph_us(fn, calls: int = 100) -> float:
    """GPU time per call inside a CUDA graph of ``calls`` calls (replayed 10 times)."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (10 * calls)


def _host_and_graph_us(fn) -> tuple[float, float]:
    """(host wall time per call over 2000 back-to-back eager calls with one sync, GPU time per
    call inside a CUDA graph of 100 calls)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    host = (time.perf_counter() - t0) / n * 1e6
    return host, graph_us(fn)


def bench_decode(rows: list[dict]) -> None:
    """Decode sizes, Llama-3-8B heads (32 q, 8 kv, d=128), bf16, 1/16/64 tokens.

    Single-tensor rotations of the query ``(1, 32, T, 128)``: ``public_fn`` (validating API),
    ``ours`` (``torch.ops`` custom op: includes the dispatcher), ``hadamard_apply`` (what the
    model hooks call), ``triton_direct`` (the kernel's host function), ``torch_matmul_path``,
    ``clone``, ``dao``. Whole-layer work on q and k together: ``rope_eager`` (transformers'
    own ``apply_rotary_pos_emb``, the baseline cost), ``qk_one_launch`` (q and k rotated by one
    launch), ``qk_rope_fused`` (RoPE + rotation of q and k in one launch: what a fused layer
    runs instead of ``rope_eager``), ``rope_then_two_ops`` (the general path's work).
    """
    from transformers.models.llama import modeling_llama

    from hf_hadamard_kq.fused import ORIGINAL_ATTR
    from hf_hadamard_kq.ops.op import hadamard_apply, torch_hadamard
    from hf_hadamard_kq.ops.qk_kernel import rotate_qk
    from hf_hadamard_kq.ops.triton_kernel import hadamard_triton

    rope = modeling_llama.apply_rotary_pos_emb
    rope = getattr(rope, ORIGINAL_ATTR, rope)
    dao = _dao()
    s = 1 / math.sqrt(128)

    def methods_for(tokens: int) -> dict:
        dtype = torch.bfloat16
        q = torch.randn(1, tokens, 32, 128, device="cuda").to(dtype).transpose(1, 2)
        k = torch.randn(1, tokens, 8, 128, device="cuda").to(dtype).transpose(1, 2)
        angle = torch.rand(1, tokens, 64, device="cuda") * 100
        cos = torch.cat([angle.cos()] * 2, -1).to(dtype)
        sin = torch.cat([angle.sin()] * 2, -1).to(dtype)
        x = q

        def two_ops():
            a, b = rope(q, k, cos, sin)
            return hadamard_apply(a, s, None, 128), hadamard_apply(b, s, None, 128)

        methods = {
            "public_fn": lambda: hf_hadamard_kq.hadamard_transform(x),
            "ours": lambda: OP(x, s, None, 128),
            "hadamard_apply": lambda: hadamard_apply(x, s, None, 128),
            "triton_direct": lambda: hadamard_triton(x, s, None, 128),
            "torch_matmul_path": lambda: torch_hadamard(x, s, None, 128),
            "clone": lambda: x.clone(),
            "rope_eager": lambda: rope(q, k, cos, sin),
            "qk_one_launch": lambda: rotate_qk(q, k, s, None),
            "qk_rope_fused": lambda: rotate_qk(q, k, s, None, cos, sin),
            "rope_then_two_ops": two_ops,
        }
        if dao is not None:
            methods["dao"] = lambda: dao(x, s)
        return methods

    for tokens in (1, 16, 64):
        methods = methods_for(tokens)
        row = dict(kind="decode", tokens=tokens, heads=32, kv_heads=8, d=128, dtype="bfloat16")
        for name, fn in methods.items():
            host, graph = _host_and_graph_us(fn)
            row[f"{name}_host_us"] = round(host, 2)
            row[f"{name}_graph_us"] = round(graph, 3)
        rows.append(row)
        print(row, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--min-mib", type=float, default=4.0)
    parser.add_argument("--only", choices=["all", "decode", "prefill"], default="all")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(SIZE_DTYPES), default=None,
                        help="only the prefill size table, in these dtypes (default: the "
                             "whole benchmark, its size table in bfloat16 and float16)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_op.py needs a CUDA/ROCm GPU; on CPU run the test suite instead")
    args.out.mkdir(parents=True, exist_ok=True)
    import triton

    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
               dao_available=_dao() is not None)
    print(env, flush=True)
    timer = Timer(args.reps)
    rows: list[dict] = []
    if args.dtypes:
        bench_sizes(timer, rows, [SIZE_DTYPES[n] for n in args.dtypes],
                    int(args.min_mib * 2**20))
    elif args.only in ("all", "prefill"):
        bench_sizes(timer, rows, (torch.bfloat16, torch.float16), int(args.min_mib * 2**20))
        bench_large_and_matrix(timer, rows)
    if args.only in ("all", "decode") and not args.dtypes:
        bench_decode(rows)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in rows[0], k))
    with open(args.out / "bench_op.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "bench_op.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
