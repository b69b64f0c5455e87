"""Compiled static-cache decode: plain sdpa against hadamard_kq in several compile forms, all
in one process.

Why: ``bench_generate.py --two-models`` compares sdpa with one form of the rotation; comparing
two forms across processes or device calls mixes in machine-to-machine differences larger than
the effect (BENCHMARKS.md: identical code measured 0.96-0.99 on different hosts). Here every
label is its own copy of the same random-weight Llama-3-8B-shaped model (bf16), compiled once,
and the timed ``generate`` runs alternate between labels (order reversed every other rep).
The compile form is global and dynamo guards it, so it is set before each label's calls; each
compiled model keeps the graph of its own form (no recompilation: ``generate`` would
otherwise re-record its CUDA graphs, which the tok/s of the later runs would show).

Labels: ``sdpa`` (plain), ``fused`` (the default form, ``auto``: fused layers take the marked
route, one ``rope_rotate_qk`` node each), ``native`` (plain torch ops: the marked route then
runs the model's RoPE and two native rotations, the general path's graph) and ``op`` (the
single-tensor custom op). Sessions 7 and 8 measured earlier, reverted designs of the fused
label (BENCHMARKS.md).
Per label: tok/s per rep, then (static_step_profile.py's helpers) the median host time inside
the compiled call and the GPU kernel time per decode step from a profile of 8 steps.

Usage (GPU): ``python benchmarks/static_forms_ab.py OUT.json --batch 1 --reps 8
--labels sdpa native fused``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import static_step_profile as ssp
from bench_generate import build_model, timed_generate

import hf_hadamard_kq

FORMS = {"sdpa": "auto", "fused": "auto", "native": "native", "op": "op"}
NEW = 128


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--labels", nargs="+", choices=sorted(FORMS), default=["sdpa", "native",
                                                                          "fused"])
    args = p.parse_args(argv)
    labels = args.labels
    if labels[0] != "sdpa":
        raise SystemExit("the first label must be sdpa (the reference of the ratios)")
    models = {label: build_model(args.layers) for label in labels}
    for label in labels[1:]:
        hf_hadamard_kq.apply_r3(models[label])
    gen = torch.Generator().manual_seed(args.batch)
    prompt = torch.randint(3, 128000, (args.batch, 512), generator=gen).cuda()

    def use(label: str):
        hf_hadamard_kq.set_compile_rotation(FORMS[label])
        return models[label]

    start = time.time()
    for label in labels:  # compile and record the CUDA graphs
        timed_generate(use(label), prompt, NEW, "static")
        print("compiled", label, round(time.time() - start), "s", flush=True)
    res = {label: dict(tok_s=[]) for label in labels}
    for rep in range(args.reps):
        for label in labels if rep % 2 == 0 else labels[::-1]:
            res[label]["tok_s"].append(round(timed_generate(use(label), prompt, NEW,
                                                            "static"), 2))
        print(rep, {label: res[label]["tok_s"][-1] for label in labels}, flush=True)
    for label in labels:
        res[label]["call_host_us"] = round(statistics.median(ssp.host_times(use(label),
                                                                            prompt)), 1)
        res[label]["gpu"] = ssp.gpu_profile(use(label), prompt)
        print(label, statistics.median(res[label]["tok_s"]), res[label]["call_host_us"],
              {k: v for k, v in res[label]["gpu"].items() if k != "top"}, flush=True)
    base = res["sdpa"]["tok_s"]
    for label in labels[1:]:
        ours = res[label]["tok_s"]
        res[label]["ratio"] = round(statistics.median(ours) / statistics.median(base), 4)
        res[label]["ratio_paired_median"] = round(statistics.median(
            a / b for a, b in zip(ours, base)), 4)
        print("ratio", label, res[label]["ratio"], "paired", res[label]["ratio_paired_median"],
              flush=True)
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               transformers=__import__("transformers").__version__, batch=args.batch,
               reps=args.reps, layers=args.layers)
    args.out.write_text(json.dumps(dict(env=env, **res), indent=1))


if __name__ == "__main__":
    main()
