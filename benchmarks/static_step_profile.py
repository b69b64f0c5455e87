"""Where the static-cache + torch.compile gap is: both labels in one process, step by step.

Why: ``bench_generate.py --modes static --two-models`` alternates sdpa and hadamard_kq runs in
one process (an A/A run of that method, ``--control``, gives 1.000), but one ratio does not say
whether the difference is GPU work or host time. ``generate`` waits for every step, so a step
is the host time inside the compiled call (dynamo's guards, the cudagraph replay) plus the GPU
time of the replayed graph plus generate's own Python; host time is not overlapped.

This builds the two models like bench_generate's ``--two-models`` (same weights; R3 on the
second), compiles both, then for each label, alternating: times plain ``generate`` calls,
times every compiled call on the host (a wrapper around ``model._compiled_call``, no
profiler), and profiles 8 decode steps (CPU + CUDA) for the GPU side: the sum of kernel
times, the kernel count, the gaps between kernels shorter than 30 us (inside a replayed graph)
and longer ones (the GPU waiting for the host). Profiling inflates host time, so host numbers
come from the unprofiled runs.

Usage (GPU): ``python benchmarks/static_step_profile.py OUT.json [--batch 1] [--reps 3]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_generate import build_model, timed_generate

import hf_hadamard_kq

NEW = 128
STEPS, FIRST = 8, 20  # profiled compiled calls FIRST .. FIRST + STEPS - 1 of a generate
SMALL_GAP_US = 30.0


def generate_with(model, prompt, on_call) -> None:
    """One static-cache ``generate`` whose compiled steps go through ``on_call(index, run)``
    (``run()`` performs the step; index counts from 1); the model's step is restored after."""
    inner = model._compiled_call
    count = [0]

    def call(*args, **kwargs):
        count[0] += 1
        return on_call(count[0], lambda: inner(*args, **kwargs))

    model._compiled_call = call
    try:
        timed_generate(model, prompt, NEW, "static")
    finally:
        model._compiled_call = inner


def host_times(model, prompt) -> list[float]:
    """Host microseconds of every compiled call of one generate (no profiler)."""
    times = []

    def on_call(_, run):
        start = time.perf_counter()
        out = run()
        times.append((time.perf_counter() - start) * 1e6)
        return out

    generate_with(model, prompt, on_call)
    return times


def gpu_profile(model, prompt) -> dict:
    """Kernel statistics per decode step over compiled calls FIRST .. FIRST + STEPS - 1."""
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    def on_call(i, run):
        if i == FIRST:
            torch.cuda.synchronize()
            prof.start()
        out = run()
        if i == FIRST + STEPS - 1:
            torch.cuda.synchronize()
            prof.stop()
        return out

    generate_with(model, prompt, on_call)
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    small = large = 0.0
    by_name: dict[str, list] = {}
    end = None
    for s, e, name in kernels:
        if end is not None and s > end:
            if s - end < SMALL_GAP_US:
                small += s - end
            else:
                large += s - end
        end = e if end is None else max(end, e)
        entry = by_name.setdefault(name[:100], [0, 0.0])
        entry[0] += 1
        entry[1] += e - s
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:40]
    return dict(
        kernel_us=round(sum(e - s for s, e, _ in kernels) / STEPS, 1),
        kernels=round(len(kernels) / STEPS, 2),
        gaps_in_graph_us=round(small / STEPS, 1),
        gaps_waiting_us=round(large / STEPS, 1),
        top=[(name, round(c / STEPS, 2), round(t / STEPS, 2)) for name, (c, t) in top],
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--layers", type=int, default=32)
    args = p.parse_args(argv)
    models = {"sdpa": build_model(args.layers), "hadamard_kq": build_model(args.layers)}
    hf_hadamard_kq.apply_r3(models["hadamard_kq"])
    gen = torch.Generator().manual_seed(args.batch)
    prompt = torch.randint(3, 128000, (args.batch, 512), generator=gen).cuda()
    for model in models.values():  # compile and record the CUDA graphs
        timed_generate(model, prompt, NEW, "static")
    res = {label: dict(tok_s=[], call_host_us=[]) for label in models}
    for rep in range(args.reps):
        order = list(models) if rep % 2 == 0 else list(models)[::-1]
        for label in order:
            res[label]["tok_s"].append(round(timed_generate(models[label], prompt, NEW,
                                                            "static"), 2))
            res[label]["call_host_us"].append(round(statistics.median(
                host_times(models[label], prompt)), 1))
    for label, model in models.items():
        res[label]["gpu"] = gpu_profile(model, prompt)
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               transformers=__import__("transformers").__version__, batch=args.batch,
               layers=args.layers, form=hf_hadamard_kq.ops.native.MODE)
    for label, r in res.items():
        print(label, r["tok_s"], "call host us", r["call_host_us"],
              {k: v for k, v in r["gpu"].items() if k != "top"}, flush=True)
    args.out.write_text(json.dumps(dict(env=env, **res), indent=1))


if __name__ == "__main__":
    main()
