"""Time dynamo's guard evaluation per compiled decode call: plain sdpa vs hadamard_kq, one process.

Why: a static-cache ``generate`` step waits for the host, and every compiled call first
evaluates the guards of its cache entry; our pre-hooks, slots, RoPE wrapper and attention
function add guards (BENCHMARKS.md, session 11). ``dynamo_overhead.py`` times whole compiled
calls in separate processes, whose differences are within the noise of a shared 2-core
machine. Here both models are compiled in one process and each entry's guard manager is
called directly on its own frame locals, alternating, so the two numbers share the machine's
state and neither call tries the other entry's guards first.

Both models are built (and R3 applied to one) before either is compiled, as in
``bench_generate.py --two-models``: installing R3 wraps the modeling module's
``apply_rotary_pos_emb``, which the plain model's entry then guards too. CPU is enough (guard
evaluation is host-side); a tiny Llama with ``--layers`` layers.

Usage: ``python benchmarks/guard_eval.py [--layers 32] [--rounds 15]``
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

LABELS = ("sdpa", "hadamard_kq")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--head-dim", type=int, default=16,
                        help="32 or more puts the layers on the fused Q/K op (and, with a "
                             "static cache, kv_store); 16 (the default) on the native form")
    args = parser.parse_args(argv)

    import torch
    from dynamo_overhead import first_outputs  # the graph is not run: guards are measured
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    import hf_hadamard_kq
    from hf_hadamard_kq.cache import KV_STORE

    cfg = LlamaConfig(vocab_size=128, hidden_size=4 * args.head_dim, intermediate_size=128,
                      num_hidden_layers=args.layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=args.head_dim,
                      max_position_embeddings=64)
    torch.set_grad_enabled(False)

    models = {}
    for label in LABELS:
        torch.manual_seed(0)
        model = LlamaForCausalLM(copy.deepcopy(cfg)).eval()  # apply_r3 edits its config
        if label == "hadamard_kq":
            hf_hadamard_kq.apply_r3(model)
        models[label] = model
    forward = type(models["sdpa"]).forward
    ids, pos = torch.tensor([[5]]), torch.tensor([8])
    entries = {}
    for label, model in models.items():
        cache = StaticCache(config=model.config, max_cache_len=32)
        model(torch.randint(0, 128, (1, 8)), past_key_values=cache,
              cache_position=torch.arange(8))
        step = torch.compile(model, backend=first_outputs, fullgraph=True, dynamic=False)
        step(ids, past_key_values=cache, cache_position=pos)
        manager = _debug_get_cache_entry_list(forward.__code__)[0].guard_manager
        # the compiled frame's locals at entry: the call bound to the function's own
        # signature (a decorator's ``*args, **kwargs`` or the real parameters), defaults
        # included, plus its closure cells
        bound = inspect.signature(forward, follow_wrapped=False).bind(
            model, ids, past_key_values=cache, cache_position=pos)
        bound.apply_defaults()
        frame = dict(bound.arguments)
        frame.update({name: cell.cell_contents for name, cell in zip(
            forward.__code__.co_freevars, forward.__closure__ or ())})
        entries[label] = (manager, frame, cache)
    for label, (manager, frame, _) in entries.items():
        if not manager.check(frame):  # a failing check returns early: it would time nothing
            raise SystemExit(f"{label}: its guards fail on its own call; cannot time them")
    times: dict[str, list[float]] = {label: [] for label in LABELS}
    for _ in range(args.rounds):
        for label in LABELS:
            manager, frame, _ = entries[label]
            start = time.perf_counter()
            for _ in range(args.calls):
                ok = manager.check(frame)
            times[label].append((time.perf_counter() - start) / args.calls * 1e6)
            assert ok, label
    lines = {label: len(str(entries[label][0]).splitlines()) for label in LABELS}
    median = {label: round(statistics.median(v), 1) for label, v in times.items()}
    print(json.dumps({
        "layers": args.layers, "head_dim": args.head_dim, "torch": torch.__version__,
        "kv_store": KV_STORE, "guard_lines": lines,
        "us_per_call_median": median,
        "us_per_call_range": {k: [round(min(v), 1), round(max(v), 1)] for k, v in times.items()},
        "extra_us_per_call": round(median["hadamard_kq"] - median["sdpa"], 1),
    }))


if __name__ == "__main__":
    main()
