"""torch.profiler summary of one prefill and one decode step, hadamard_kq vs sdpa.

Same Llama-3-8B shapes as bench_generate.py (``--layers`` to shorten). Prints, per
implementation, the top operators by self CPU time and by self CUDA time, and the share of
CUDA time spent in the Hadamard kernels (Triton ``_rows_kernel`` / fused ``_qk_kernel``, which
also does the RoPE on fused layers), so the rotation's cost and
the remaining gap (host vs device) can be read off.

Usage (GPU machine): ``python benchmarks/profile_step.py --out results/``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_generate import build_model, set_rotation
from transformers import DynamicCache

from hf_hadamard_kq.research import cache_kwarg


def step(model, prompt):
    """One prefill (filling a cache) and one single-token decode step."""
    cache = {cache_kwarg(model): DynamicCache(config=model.config)}  # 5.24 renamed it
    with torch.no_grad():
        out = model(prompt, **cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        model(nxt, **cache, use_cache=True)
    torch.cuda.synchronize()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.layers)
    prompt = torch.randint(3, 128000, (args.batch, args.prompt), device="cuda")
    report = []
    for label in ("sdpa", "hadamard_kq"):
        set_rotation(model, label == "hadamard_kq")
        for _ in range(3):
            step(model, prompt)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(model, prompt)
        events = prof.key_averages()
        cuda_total = sum(e.self_device_time_total for e in events)
        hadamard = sum(e.self_device_time_total for e in events if "rows_kernel" in e.key
                       or "qk_kernel" in e.key or "hadamard" in e.key.lower())
        cpu_total = sum(e.self_cpu_time_total for e in events)
        report.append(f"=== {label}: self CPU total {cpu_total / 1e3:.1f} ms, self CUDA total "
                      f"{cuda_total / 1e3:.2f} ms, Hadamard kernels {hadamard / 1e3:.3f} ms "
                      f"({100 * hadamard / max(cuda_total, 1):.2f}% of CUDA time)")
        report.append(events.table(sort_by="self_cpu_time_total", row_limit=18))
        report.append(events.table(sort_by="self_device_time_total", row_limit=12))
    text = "\n".join(report)
    print(text)
    (args.out / "profile_step.txt").write_text(text)


if __name__ == "__main__":
    main()
