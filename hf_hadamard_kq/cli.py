"""``hf-hadamard-kq``: command-line entry point (``demo`` today; more commands to come)."""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

DEFAULT_DEMO_DIR = Path(".demo") / "tiny-llama-r3"


def build_demo_checkpoint(path: Path, seed: int = 0) -> None:
    """A small random Llama with R3 (deterministic Hadamard, head_dim 64), saved like
    llm-compressor's output: transform_config in config.json and the R3 matrix stored once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_hadamard_kq

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, num_hidden_layers=4,
                         intermediate_size=512, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    hf_hadamard_kq.apply_r3(model)
    hf_hadamard_kq.save_r3_pretrained(model, path)


def demo(checkpoint: Optional[Path], new_tokens: int) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import hf_hadamard_kq

    path = checkpoint or DEFAULT_DEMO_DIR
    if checkpoint is None and not (path / "config.json").exists():
        print(f"building a small random R3 checkpoint in {path} ...", flush=True)
        build_demo_checkpoint(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="hadamard_kq")
    # The unrotated reference: the load hook warns that Q/K are not rotated and transformers
    # lists the R3 matrix as unexpected; both are intended here, so keep them quiet.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    finally:
        hf_logging.set_verbosity(verbosity)
    print(hf_hadamard_kq.describe(model))
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(prompt).logits - plain(prompt).logits).abs().max().item()
    print(f"max |logit difference| vs the unrotated model: {diff:.3g} "
          "(rotating Q and K by the same orthonormal matrix preserves q.k)")
    results = {}
    for label, m in (("hadamard_kq", model), ("sdpa (unrotated)", plain)):
        m.generate(prompt, max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False)
        seconds = time.perf_counter() - start
        results[label] = out
        print(f"{label:>18}: {new_tokens / seconds:7.1f} tokens/s on {prompt.device}")
    same = torch.equal(*results.values())
    print(f"greedy tokens identical: {same}")
    print("generated ids:", results["hadamard_kq"][0, prompt.shape[1]:].tolist())
    if not same:
        raise SystemExit("greedy tokens differ from the unrotated model")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="hf-hadamard-kq",
        description="SpinQuant-R3 (online Hadamard rotation of Q and K) for transformers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser(
        "demo",
        help="load an R3 checkpoint with attn_implementation='hadamard_kq' and generate",
        description="Builds (or reuses) a small random R3 checkpoint, loads it with "
        "attn_implementation='hadamard_kq', prints the rotated layers, the logit difference "
        "against the unrotated model, and tokens/s.",
    )
    p_demo.add_argument("--checkpoint", type=Path, default=None,
                        help=f"an R3 checkpoint directory (default: build {DEFAULT_DEMO_DIR})")
    p_demo.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.checkpoint, args.new_tokens)


if __name__ == "__main__":
    main()
