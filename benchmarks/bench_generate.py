"""End-to-end ``generate`` throughput: hadamard_kq vs plain sdpa, same weights, same process.

Builds a random-weight model with the exact shapes of Llama-3-8B (bf16, no download), and
alternates runs between the unrotated model (``attn_implementation="sdpa"``) and the same
model with R3 applied online (``hf_hadamard_kq.apply_r3``: Q rotated in attention, K rotated
before the cache), so both see the same GPU state. Reports tokens/s (batch * new tokens /
wall time of ``generate`` with a fixed number of new tokens), prefill latency (one forward
over the prompt), and the ratio hadamard_kq / sdpa. Modes: ``eager`` (DynamicCache) and
``static`` (``cache_implementation="static"``; transformers compiles the decode step on CUDA).

Usage (GPU machine): ``python benchmarks/bench_generate.py --out results/``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_hadamard_kq


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, num_hidden_layers=layers, rope_theta=500000.0,
        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16,
                                              attn_implementation="sdpa")
    return model.eval()


def set_rotation(model, on: bool) -> None:
    rotated = hf_hadamard_kq.rotation_table(model) and any(
        r["q"] for r in hf_hadamard_kq.rotation_table(model))
    if on and not rotated:
        hf_hadamard_kq.apply_r3(model)
    elif not on and rotated:
        hf_hadamard_kq.remove_r3(model, "sdpa")


def timed_generate(model, prompt, new_tokens: int, mode: str) -> float:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0)
    if mode == "static":
        kwargs["cache_implementation"] = "static"
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(prompt, **kwargs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return prompt.shape[0] * new_tokens / seconds


def timed_prefill(model, prompt) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model(prompt, use_cache=False, logits_to_keep=1)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--modes", nargs="+", default=["eager", "static"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_generate.py needs a GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers

    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               transformers=transformers.__version__, layers=args.layers,
               prompt=args.prompt, new_tokens=args.new_tokens)
    print(env, flush=True)
    model = build_model(args.layers)
    results = []
    for mode in args.modes:
        for batch in args.batch:
            prompt = torch.randint(3, 128000, (batch, args.prompt), device="cuda")
            samples = {"sdpa": [], "hadamard_kq": []}
            prefill = {"sdpa": [], "hadamard_kq": []}
            for label in ("sdpa", "hadamard_kq"):  # warm-up (and compile, in static mode)
                set_rotation(model, label == "hadamard_kq")
                timed_generate(model, prompt, 8, mode)
                timed_prefill(model, prompt)
            for _ in range(args.reps):
                for label in ("sdpa", "hadamard_kq"):
                    set_rotation(model, label == "hadamard_kq")
                    samples[label].append(timed_generate(model, prompt, args.new_tokens, mode))
                    prefill[label].append(timed_prefill(model, prompt))
            row = dict(mode=mode, batch=batch)
            for label in samples:
                row[f"{label}_tok_s"] = round(statistics.median(samples[label]), 2)
                row[f"{label}_prefill_ms"] = round(statistics.median(prefill[label]), 2)
            row["ratio_tok_s"] = round(row["hadamard_kq_tok_s"] / row["sdpa_tok_s"], 4)
            row["ratio_prefill"] = round(row["sdpa_prefill_ms"] / row["hadamard_kq_prefill_ms"], 4)
            results.append(row)
            print(row, flush=True)
    (args.out / "bench_generate.json").write_text(
        json.dumps({"env": env, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
