"""GPU time of a static cache layer's decode write: ``kv_store`` against the two writes it
replaces.

Why: ``kv_store`` (hf_hadamard_kq/ops/kv_store.py) exists to save one small kernel per layer
in a CUDA-graphed decode step; this measures that kernel next to the pair of ``index_copy_``
it replaces, both as ATen's eager kernels and as the kernels inductor generates for them (what
a compiled step runs), each inside a CUDA graph of 100 calls (bench_op.graph_us).

Shapes: Llama-3-8B's 8 KV heads of 128, a 640-position cache, one new token, batch 1 and 32,
bf16.

Usage (GPU): ``python benchmarks/bench_kv_store.py --out results/kv_store.json``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_op import graph_us

import hf_hadamard_kq  # noqa: F401  (registers the op)
from hf_hadamard_kq.ops import kv_store


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    pair = kv_store._index_copy  # StaticLayer.update's two writes
    compiled_pair = torch.compile(pair)
    rows = []
    for batch in (1, 32):
        gen = torch.Generator(device="cuda").manual_seed(batch)
        keys, values = (torch.randn(batch, 8, 640, 128, generator=gen, device="cuda")
                        .bfloat16() for _ in range(2))
        k, v = (torch.randn(batch, 1, 8, 128, generator=gen, device="cuda").bfloat16()
                .transpose(1, 2) for _ in range(2))
        start = torch.tensor(512, device="cuda")
        assert kv_store.kernel_takes(keys, values, k, v, start)
        row = {"batch": batch}
        tensors = (keys, values, k, v, start)
        for name, op in (("kv_store", torch.ops.hadamard_kq.kv_store),
                         ("index_copy_pair_eager", pair),
                         ("index_copy_pair_inductor", compiled_pair)):
            op(*tensors)
            row[name + "_us"] = round(min(graph_us(lambda op=op, t=tensors: op(*t))
                                          for _ in range(5)), 3)
        rows.append(row)
        print(row, flush=True)
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "method": "GPU time per call, CUDA graph of 100 calls replayed 10 times, best of 5"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
