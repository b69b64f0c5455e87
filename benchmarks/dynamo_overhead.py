"""Host cost that torch.compile adds per call of a compiled decode step: plain vs rotated.

Why: with CUDA graphs (static cache + ``mode="reduce-overhead"``) ``generate`` waits for each
step, so host time inside the compiled call adds to every step (BENCHMARKS.md, session 5), and
part of it is dynamo's per-call work: evaluating the guards of the compiled frame (our
per-layer pre-hook and the layer's slot in hf_hadamard_kq/specs.py add guards; before session
5, the hook's closure and the rotation plan's fields) and rebuilding the outputs. This script
isolates that part: the compiled frame's backend returns the first call's outputs without
running anything, so a call costs only dynamo's own work.

Each label runs in its own process (a shared process would put both models' compiled entries
on the same code object, and each call would first try the other's guards). CPU is enough (the
guard work is host-side and device-independent); a tiny Llama with ``--layers`` layers.

Usage: ``python benchmarks/dynamo_overhead.py [--layers 32] [--compile-rotation native]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def first_outputs(gm, example_inputs):
    """A dynamo backend whose compiled frame returns the first call's outputs without running
    anything again: a call then costs only dynamo's own work (guards, argument handling)."""
    first = []

    def run(*args):
        if not first:
            first.append(gm.forward(*args))
        return first[0]

    return run


def measure(label: str, layers: int, form: str, calls: int, reps: int) -> float:
    """Median microseconds of dynamo's work per call of the compiled decode step."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    import hf_hadamard_kq

    hf_hadamard_kq.set_compile_rotation(form)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    if label == "hadamard_kq":
        hf_hadamard_kq.apply_r3(model)

    cache = StaticCache(config=model.config, max_cache_len=64)
    ids, pos = torch.tensor([[5]]), torch.tensor([8])
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 8)), past_key_values=cache, cache_position=torch.arange(8))
        step = torch.compile(model, backend=first_outputs, fullgraph=True, dynamic=False)
        step(ids, past_key_values=cache, cache_position=pos)
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(calls):
                step(ids, past_key_values=cache, cache_position=pos)
            samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--compile-rotation", choices=["auto", "op", "native"], default="native")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rounds", type=int, default=2, help="alternating process pairs")
    p.add_argument("--child", choices=["sdpa", "hadamard_kq"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.layers, args.compile_rotation, args.calls,
                                 args.reps)))
        return
    results: dict[str, list[float]] = {"sdpa": [], "hadamard_kq": []}
    for _ in range(args.rounds):
        for label in results:
            cmd = [sys.executable, __file__, "--child", label, "--layers", str(args.layers),
                   "--compile-rotation", args.compile_rotation, "--calls", str(args.calls),
                   "--reps", str(args.reps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[label].append(round(json.loads(out.strip().splitlines()[-1]), 1))
    extra = statistics.median(results["hadamard_kq"]) - statistics.median(results["sdpa"])
    print(json.dumps(dict(layers=args.layers, compile_rotation=args.compile_rotation,
                          us_per_call=results, extra_us_per_call=round(extra, 1),
                          extra_us_per_layer=round(extra / args.layers, 2))))


if __name__ == "__main__":
    main()
