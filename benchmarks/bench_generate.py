"""End-to-end ``generate`` throughput: hadamard_kq vs plain sdpa, same weights, same process.

Builds a random-weight model with the exact shapes of Llama-3-8B (bf16, no download), and
alternates runs between the unrotated model (``attn_implementation="sdpa"``) and the same
model with R3 applied online (``hf_hadamard_kq.apply_r3``: Q rotated in attention, K rotated
before the cache), so both see the same GPU state. Reports tokens/s (batch * new tokens /
wall time of ``generate`` with a fixed number of new tokens), prefill latency (one forward
over the prompt), and the ratio hadamard_kq / sdpa. Modes: ``eager`` (DynamicCache),
``static`` (``cache_implementation="static"``; transformers compiles the decode step on CUDA)
and ``fp8kv`` (eager with hf_hadamard_kq.kv_quant's simulated fp8 KV cache, per-layer scales
frozen at the prefill: it quantizes and dequantizes on write, so it measures the rotation's
cost next to a quantized cache, not an fp8 memory saving).

Usage (GPU machine): ``python benchmarks/bench_generate.py --out results/``

Tensor parallel (``--tp N``, under ``torchrun --nproc-per-node N``)::

    torchrun --nproc-per-node 2 benchmarks/bench_generate.py --tp 2 --out results/

transformers applies ``tp_plan="auto"`` only in ``from_pretrained``, so rank 0 first writes a
random-weight R3 checkpoint with the same shapes (``--ckpt``, default ``OUT/ckpt``; reused when
present, the other ranks wait), every rank loads it with ``tp_plan="auto",
attn_implementation="hadamard_kq"``, and the sdpa baseline is the same sharded model after
``remove_r3`` (alternating as above). Every rank runs ``generate`` on the same prompt; rank 0
reports (its wall time; the ranks run in lockstep through the all-reduces) and writes
``bench_generate_tp{N}.json``. ``--device cpu --tiny`` runs the same code on CPU (gloo) with a
tiny model, to check the script, not to measure.

Order matters at the 0.5 % level with ``--two-models``: see ``--first`` and
``benchmarks/bench_balanced.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1:][:1] == ["cpu"]:
    # before torch is imported: transformers picks the TP backend / device mesh from the
    # current accelerator, so a CPU (gloo) run on a GPU machine must hide the GPUs
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_r3 import barrier, build_r3_checkpoint, init_distributed, llama_config

import hf_hadamard_kq
from hf_hadamard_kq.inspect_model import FUSED_PATH
from hf_hadamard_kq.kv_quant import KVQuantSpec, make_cache
from hf_hadamard_kq.research import cache_kwarg

#: ``--modes fp8kv``: eager generate with a simulated fp8 (e4m3) KV cache, one scale per layer
#: for K and for V frozen at the prefill (like a static-scale fp8 cache); keys reach it rotated.
FP8_KV = KVQuantSpec(fmt="fp8", key_granularity="tensor", value_granularity="tensor")


def build_model(layers: int, device: str = "cuda", tiny: bool = False):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(llama_config(layers, tiny), dtype=torch.bfloat16,
                                              attn_implementation="sdpa")
    return model.eval()


def load_tp_model(args, device: torch.device):
    """The R3 checkpoint (built by rank 0 if absent) loaded with tp_plan="auto"."""
    from transformers import AutoModelForCausalLM

    if int(os.environ.get("RANK", "0")) == 0:
        build_r3_checkpoint(args.ckpt, llama_config(args.layers, args.tiny), torch.bfloat16,
                            str(device))
    barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # tp_plan= is "deprecated" (5.17-5.24)
        model = AutoModelForCausalLM.from_pretrained(
            args.ckpt, tp_plan="auto", attn_implementation="hadamard_kq", dtype=torch.bfloat16)
    return model.eval()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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
    elif mode == "fp8kv":
        kwargs[cache_kwarg(model)] = make_cache(FP8_KV, model.config)  # 5.24 renamed it
    sync()
    barrier()  # TP: all ranks start together
    start = time.perf_counter()
    out = model.generate(prompt, **kwargs)
    sync()
    seconds = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return prompt.shape[0] * new_tokens / seconds


class CudagraphEvents:
    """Counts cudagraph-tree recordings, eager warm-up runs and replays (static mode): a
    recording after the warm-up means a compiled step's graph was captured again, which would
    make that label's timed run slower for a reason unrelated to its kernels."""

    NAMES = (("record_function", "record"), ("run_eager", "eager"), ("execute_node", "execute"))

    def __init__(self) -> None:
        self.counts = {key: 0 for _, key in self.NAMES}
        try:
            from torch._inductor import cudagraph_trees
        except ImportError:  # pragma: no cover - torch builds without inductor
            return
        manager = cudagraph_trees.CUDAGraphTreeManager
        for method, key in self.NAMES:
            orig = getattr(manager, method, None)
            if orig is not None:
                setattr(manager, method, self._counting(orig, key))

    def _counting(self, orig, key: str):
        def wrapper(*args, **kwargs):
            self.counts[key] += 1
            return orig(*args, **kwargs)

        return wrapper

    def take(self) -> dict:
        """The counts since the last call, then reset."""
        out = dict(self.counts)
        for key in self.counts:
            self.counts[key] = 0
        return out


def timed_prefill(model, prompt) -> float:
    sync()
    barrier()
    start = time.perf_counter()
    with torch.no_grad():
        model(prompt, use_cache=False, logits_to_keep=1)
    sync()
    return (time.perf_counter() - start) * 1e3


def add_pointwise_autotune(parser: argparse.ArgumentParser) -> None:
    """``--pointwise-autotune on|off`` (this script and bench_lockstep.py)."""
    parser.add_argument("--pointwise-autotune", choices=["on", "off"], default="on",
                        help="inductor's timing of launch configurations for each pointwise "
                             "kernel at compile time (static mode). 'on' is torch's default; "
                             "each compilation then picks its own configurations, so two "
                             "compiled copies of one model can differ by ~1 %% (BENCHMARKS.md, "
                             "sessions 10 and 15). 'off' takes inductor's heuristic "
                             "configuration, the same for both labels: a deterministic "
                             "comparison")


def apply_pointwise_autotune(args: argparse.Namespace) -> None:
    if args.pointwise_autotune == "off":
        import torch._inductor.config as inductor_config

        inductor_config.triton.autotune_pointwise = False


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--modes", nargs="+", default=["eager", "static"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel size; run under torchrun --nproc-per-node TP")
    parser.add_argument("--ckpt", type=Path, default=None,
                        help="--tp: R3 checkpoint dir (default OUT/ckpt; built if absent)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny Llama (script check on CPU)")
    parser.add_argument("--two-models", action="store_true",
                        help="build a second copy of the model (same seed, same weights) that "
                             "keeps R3 applied, instead of applying / removing R3 on one model "
                             "between runs: compiled graphs then never see a re-installed "
                             "rotation (twice the GPU memory; not with --tp)")
    parser.add_argument("--compile-rotation", choices=["auto", "op", "native"], default="auto",
                        help="form of the rotation in compiled graphs (static mode): the "
                             "package default 'auto' (plain torch ops for small tensors, the "
                             "custom op for large ones), always our custom op, or always plain "
                             "torch ops inductor can fuse (ops/native.py)")
    parser.add_argument("--control", action="store_true",
                        help="with --two-models: leave the second copy unrotated too (an A/A "
                             "run: both labels are plain sdpa), to measure what the method "
                             "itself does to the ratio")
    parser.add_argument("--first", choices=["sdpa", "hadamard_kq"], default="sdpa",
                        help="which label warms up (and, in static mode, compiles) first, "
                             "and with --two-models whose copy is built first; the timed runs "
                             "alternate either way. Static mode with --two-models keeps two "
                             "compiled models in one process, and the second-built, "
                             "second-compiled copy runs slower even when both are plain sdpa: "
                             "benchmarks/bench_balanced.py runs both orders")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed generate runs per label before the timed ones (the "
                             "first compiles, in static mode; the others alternate like the "
                             "timed runs). In session 13's first A/A run both processes began "
                             "with a slower stretch (99-107 tok/s for the first 2-7 static "
                             "runs, ~110 later); four warm-up runs did not remove the slow "
                             "runs (call 2; BENCHMARKS.md)")
    add_pointwise_autotune(parser)
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first warm-up run compiles)")
    apply_pointwise_autotune(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_generate.py needs a GPU (or --device cpu --tiny to check it)")
    args.ckpt = args.ckpt or args.out / "ckpt"
    hf_hadamard_kq.set_compile_rotation(args.compile_rotation)
    rank, world, device = init_distributed(args.device)
    if world != args.tp:
        raise SystemExit(f"--tp {args.tp} needs torchrun --nproc-per-node {args.tp} "
                         f"(WORLD_SIZE is {world})")
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers

    env = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               tp=args.tp, torch=torch.__version__, transformers=transformers.__version__,
               layers=args.layers, tiny=args.tiny, prompt=args.prompt,
               new_tokens=args.new_tokens, compile_rotation=args.compile_rotation,
               two_models=args.two_models, first=args.first, control=args.control,
               pointwise_autotune=args.pointwise_autotune, warmup=args.warmup)
    if rank == 0:
        print(env, flush=True)
    if args.two_models and args.tp > 1:
        raise SystemExit("--two-models is for single-device runs")
    if args.control and not args.two_models:
        raise SystemExit("--control needs --two-models")
    model = load_tp_model(args, device) if args.tp > 1 else build_model(
        args.layers, args.device, args.tiny)
    rotated = None
    if args.two_models:
        # the copy built first is --first's: with two compiled copies in one process, the
        # copy built second and the copy compiled second each measured ~0.5 % slower in A/A
        # runs (BENCHMARKS.md, session 10), so bench_balanced.py runs both orders
        second = build_model(args.layers, args.device, args.tiny)
        for a, b in zip(model.state_dict().values(), second.state_dict().values()):
            if not torch.equal(a, b):
                raise SystemExit("--two-models: the two copies differ; cannot compare them")
        model, rotated = (model, second) if args.first == "sdpa" else (second, model)
        if not args.control:
            hf_hadamard_kq.apply_r3(rotated)

    def pick(label: str):
        """The model to run for ``label`` (a second copy, or the one model toggled)."""
        if rotated is not None:
            return rotated if label == "hadamard_kq" else model
        set_rotation(model, label == "hadamard_kq")
        return model

    vocab = model.config.vocab_size
    labels = ("sdpa", "hadamard_kq") if args.first == "sdpa" else ("hadamard_kq", "sdpa")
    graphs = CudagraphEvents() if "static" in args.modes and args.device == "cuda" else None
    results = []
    for mode in args.modes:
        for batch in args.batch:
            gen = torch.Generator().manual_seed(batch)  # the same prompt on every rank
            prompt = torch.randint(3, min(128000, vocab - 1), (batch, args.prompt),
                                   generator=gen).to(device)
            samples = {"sdpa": [], "hadamard_kq": []}
            prefill = {"sdpa": [], "hadamard_kq": []}
            row = dict(mode=mode, batch=batch)
            events = {"sdpa": [], "hadamard_kq": []}
            try:
                # warm-up (and compile, in static mode) at full length: with 8 new tokens the
                # first timed run of each label was still ~2x slower (TP, 32 layers)
                for label in labels:
                    m = pick(label)
                    timed_generate(m, prompt, args.new_tokens, mode)
                    timed_prefill(m, prompt)
                for i in range(args.warmup - 1):  # then alternating, as the timed runs
                    for label in labels if i % 2 else labels[::-1]:
                        timed_generate(pick(label), prompt, args.new_tokens, mode)
                for rep in range(args.reps):
                    # alternate which goes first, so a drift within a pair cancels out
                    order = labels if rep % 2 == 0 else labels[::-1]
                    for label in order:
                        m = pick(label)
                        if graphs is not None:
                            graphs.take()
                        samples[label].append(timed_generate(m, prompt, args.new_tokens, mode))
                        if graphs is not None and mode == "static":
                            events[label].append(graphs.take())
                        prefill[label].append(timed_prefill(m, prompt))
            except Exception as e:  # e.g. a mode this transformers cannot run under TP
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                results.append(row)
                if rank == 0:
                    print(row, flush=True)
                continue
            if args.control:
                row["control"] = "A/A: both labels ran plain sdpa"
            elif mode != "static":  # compiled graphs take the general path (fused.py)
                row["fused_layers"] = sum(r.get("path") == FUSED_PATH
                                          for r in hf_hadamard_kq.rotation_table(
                                              pick("hadamard_kq")))
            for label in samples:
                row[f"{label}_samples"] = [round(v, 2) for v in samples[label]]
                row[f"{label}_tok_s"] = round(statistics.median(samples[label]), 2)
                row[f"{label}_prefill_ms"] = round(statistics.median(prefill[label]), 2)
            if mode == "static" and graphs is not None:
                row["cudagraph_events"] = events
            row["ratio_tok_s"] = round(row["hadamard_kq_tok_s"] / row["sdpa_tok_s"], 4)
            # each hadamard_kq run against the sdpa run of the same rep (robust to drift)
            row["ratio_tok_s_paired_median"] = round(statistics.median(
                h / s for h, s in zip(samples["hadamard_kq"], samples["sdpa"])), 4)
            row["ratio_prefill"] = round(row["sdpa_prefill_ms"] / row["hadamard_kq_prefill_ms"], 4)
            results.append(row)
            if rank == 0:
                print(row, flush=True)
    if rank == 0:
        name = f"bench_generate_tp{args.tp}.json" if args.tp > 1 else "bench_generate.json"
        (args.out / name).write_text(json.dumps({"env": env, "rows": results}, indent=1))
    if world > 1:
        import torch.distributed as dist

        barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # see tp_check.py: skip the interpreter teardown that occasionally aborts with gloo
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
