"""``generate`` of two model copies alternated at every decode step: hadamard_kq vs plain sdpa.

Why: at batch 1 with a static cache and ``torch.compile`` a decode step waits for the host,
and the lent GPU hosts slow down in stretches (single ``generate`` runs of one model varied
by up to 17 % within a process, BENCHMARKS.md sessions 11 and 13). Alternating whole
``generate`` runs (``bench_generate.py``) then leaves ~±1 % of noise in a median of 16 runs,
twice the 0.5 % the issue asks to resolve. Here each copy runs the real ``model.generate``
in its own long-lived thread, and a logits processor hands control to the other copy at
every generated token: only one copy runs at a time, strictly alternating, so a slow stretch
of the host falls on both copies' steps alike. Each copy's time is measured between the
hand-offs (after a CUDA sync), without the time it waits for the other.

Per run and label: ``active`` time (the ``generate`` call's wall time less its waits; tok/s =
batch * new tokens / active, what ``bench_generate.py`` reports for a run alone), the decode
steps (the ``new_tokens - 1`` intervals between consecutive hand-offs: one iteration of
generate's loop, compiled forward included) and the prefill part (``generate`` start to its
first token). Ratios are hadamard_kq relative to sdpa (> 1: hadamard_kq faster):
``ratio_tok_s`` (medians), ``ratio_tok_s_paired_median`` (per run), ``ratio_decode`` (all
decode steps of all runs, summed) and ``ratio_step_paired_median`` (each step of ours
against the sdpa step next to it). The copy built and compiled first is ``--first``'s; the
order bias between two compiled copies (session 10's A/A runs) is not a time-varying noise,
so this method does not cancel it: ``bench_balanced.py --script lockstep`` runs both orders.

Both worker threads are pinned to one CPU core (``--cpu``, default the last core this process
may use): the first lockstep runs on an H200 host (session 14) showed the copies' steps
differing by up to 8 % *within* one run, for several runs in a row, mostly in one process; a
per-thread difference that persists over stretches is presumably where the OS put each
thread, and two threads on one core share that placement (pinned, the per-run ratios mostly
stayed within ±1 %).

cudagraph trees keep one tree manager per thread; each copy always runs in its own worker
thread (warm-up and compile included), so a copy's graphs are never recorded again because
the other copy ran. They are recorded again for a new set of static-input addresses:
transformers' ``generate`` (5.17, 5.24) allocates a new StaticCache per call, and every replay
then checks the recordings in turn; ``--persistent-cache`` passes a cache kept per copy instead
(per run: recordings in ``cudagraph_events``, root graphs per copy in ``graph_roots``). In an
A/A run (``--control``) the two copies have one structure, dynamo's guards let both run one
compiled entry, and its tree holds a root per copy.

Usage (GPU machine): ``python benchmarks/bench_lockstep.py --out results/x --batch 1``;
``--device cpu --tiny`` checks the script on CPU.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import faulthandler
import itertools
import json
import os
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import (
    CudagraphEvents,
    add_pointwise_autotune,
    apply_pointwise_autotune,
    build_model,
    sync,
)

import hf_hadamard_kq
from hf_hadamard_kq import cache as hkq_cache
from hf_hadamard_kq.research import cache_kwarg

LABELS = ("sdpa", "hadamard_kq")


def other_label(label: str) -> str:
    return LABELS[1 - LABELS.index(label)]


class OtherCopyFailed(RuntimeError):
    """Raised in a copy's thread when the other copy's ``generate`` failed."""


class Lockstep:
    """Whose turn it is; a copy that finished its ``generate`` never takes the turn again."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.turn: str | None = None
        self.finished: set[str] = set()
        self.stopped = False  # set when a worker failed: the other stops waiting

    def start(self, first: str) -> None:
        with self.cond:
            self.turn, self.finished, self.stopped = first, set(), False
            self.cond.notify_all()

    def wait_turn(self, label: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == label or self.stopped)
            if self.stopped:
                raise OtherCopyFailed("the other copy's generate failed")

    def hand_over(self, label: str) -> None:
        """Give the turn to the other copy (unless it finished) and wait for it back."""
        other = other_label(label)
        with self.cond:
            if other not in self.finished:
                self.turn = other
                self.cond.notify_all()
        self.wait_turn(label)

    def finish(self, label: str, failed: bool = False) -> None:
        with self.cond:
            self.finished.add(label)
            self.turn = other_label(label)
            self.stopped = self.stopped or failed
            self.cond.notify_all()


class Baton:
    """Logits processor: sync, note the time, hand the turn over, note when it comes back."""

    def __init__(self, label: str, lockstep: Lockstep) -> None:
        self.label, self.lockstep = label, lockstep
        self.marks: list[float] = []
        self.resumes: list[float] = []
        self.sync_starts: list[float] = []

    def __call__(self, input_ids, scores):
        self.sync_starts.append(time.perf_counter())
        sync()
        self.marks.append(time.perf_counter())
        self.lockstep.hand_over(self.label)
        self.resumes.append(time.perf_counter())
        return scores


class TimedCall:
    """Wraps a model's compiled call (``model._compiled_call``, what ``generate`` runs for
    each decode step with a static cache) to note when each call starts and returns: the
    host time of the compiled call (guards, cudagraph-tree bookkeeping, the graph launch)
    apart from generate's own Python and from the wait for the GPU."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.spans: list[tuple[float, float]] = []
        self.profiler = None  # a cProfile.Profile for --cprofile's extra run
        self.cache_ptrs: tuple[int, ...] | None = None  # where this generate's cache lives

    def __call__(self, *args, **kwargs):
        if not self.spans:  # a static input of the graphs: a new address is a new recording
            cache = kwargs.get("past_key_values", kwargs.get("cache"))  # 5.17 / 5.24 name
            self.cache_ptrs = cache_pointers(cache)
        start = time.perf_counter()
        # read once: the main thread may reset it after a timeout. Per thread: a profiler
        # enabled here sees only this copy's calls
        profiler = self.profiler
        with profiler if profiler is not None else contextlib.nullcontext():
            out = self.fn(*args, **kwargs)
        self.spans.append((start, time.perf_counter()))
        return out


def cache_pointers(cache) -> tuple[int, ...]:
    """Data pointers of the first and last layers' key and value tensors (cudagraph trees
    treat a static cache's tensors as static inputs: a new address means a new recording,
    and every recorded sibling is checked in turn on each replay)."""
    layers = getattr(cache, "layers", None) or ()
    out = []
    for layer in (layers[0], layers[-1]) if layers else ():
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            out.append(t.data_ptr() if isinstance(t, torch.Tensor) else 0)
    return tuple(out)


def cudagraph_roots() -> int | None:
    """How many root graphs this thread's cudagraph tree holds (one per recorded set of
    static-input addresses of the decode step; each replay checks them in turn)."""
    try:
        from torch._inductor import cudagraph_trees as ct

        manager = ct.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    except Exception:  # no CUDA, no inductor, or another torch's internals
        return None
    roots = getattr(manager, "roots", None)
    return None if roots is None else sum(len(v) for v in roots.values())


def time_compiled_call(model) -> TimedCall | None:
    """Wrap ``model._compiled_call`` once it exists (after the first static generate)."""
    call = model.__dict__.get("_compiled_call")
    if call is None:
        return None
    if not isinstance(call, TimedCall):
        call = model._compiled_call = TimedCall(call)
    return call


def run_generate(model, label: str, lockstep: Lockstep, prompt, new_tokens: int,
                 static: bool, persistent: bool = False) -> dict:
    """One ``generate`` in lockstep with the other copy; its timings (seconds).

    ``persistent`` (static mode): pass the model's own StaticCache, made once per (batch,
    length) and reset before each call, instead of letting ``generate`` allocate a new one
    per call (what transformers 5.17 and 5.24 do): its tensors then keep their addresses, so
    cudagraph trees record the decode step once. A new address for a static input is a new
    recording, and each replay checks every recorded sibling in turn.

    Everything before the timed ``generate`` (the cache reset's kernels included) runs in
    this copy's turn, never while the other copy is timed."""
    from transformers import LogitsProcessorList, StaticCache

    lockstep.wait_turn(label)
    timed = time_compiled_call(model)
    if timed is not None:
        timed.spans.clear()
        timed.cache_ptrs = None
    baton = Baton(label, lockstep)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0, logits_processor=LogitsProcessorList([baton]))
    if static and persistent:
        shape = (prompt.shape[0], prompt.shape[1] + new_tokens)
        made_for, cache = model.__dict__.get("_lockstep_cache", (None, None))
        if made_for != shape:
            cache = StaticCache(config=model.config, max_cache_len=shape[1])
            model._lockstep_cache = (shape, cache)
        cache.reset()  # in place: the tensors keep their addresses
        kwargs[cache_kwarg(model)] = cache  # "cache" on transformers >= 5.24
    elif static:
        kwargs["cache_implementation"] = "static"
    sync()
    start = time.perf_counter()
    out = model.generate(prompt, **kwargs)
    sync()
    end = time.perf_counter()
    if out.shape[1] != prompt.shape[1] + new_tokens or len(baton.marks) != new_tokens:
        raise RuntimeError(f"{label}: {out.shape[1] - prompt.shape[1]} tokens, "
                           f"{len(baton.marks)} hand-offs; expected {new_tokens} of each")
    steps = [m - r for m, r in zip(baton.marks[1:], baton.resumes[:-1])]
    prefill = baton.marks[0] - start
    tail = end - baton.resumes[-1]
    result = dict(active=prefill + sum(steps) + tail, steps=steps, prefill=prefill, tail=tail,
                  marks=baton.marks, tokens=out[:, prompt.shape[1]:].tolist(),
                  spans=[(start, baton.marks[0]),
                         *zip(baton.resumes[:-1], baton.marks[1:]),
                         (baton.resumes[-1], end)],
                  sync_waits=[m - s for m, s in zip(baton.marks[1:], baton.sync_starts[1:])])
    if timed is not None and len(timed.spans) == new_tokens - 1:  # one per decode step
        result["call_host"] = [b - a for a, b in timed.spans]
        result["cache_ptrs"] = timed.cache_ptrs
        result["graph_roots"] = cudagraph_roots()
    return result


class Worker:
    """A long-lived thread running one copy's ``generate`` calls (cudagraph trees are
    per thread: a new thread per run would record every graph again)."""

    def __init__(self, label: str, model, lockstep: Lockstep, cpu: int | None = None) -> None:
        self.label, self.model, self.lockstep, self.cpu = label, model, lockstep, cpu
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name=f"lockstep-{label}",
                                       daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})  # this thread only (Linux: 0 = caller)
        setup_error = None
        try:
            _init_cudagraph_tls()
        except BaseException as e:  # reported with the first job, never a silent dead thread
            setup_error = e
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                if setup_error is not None:
                    raise setup_error
                result = run_generate(self.model, self.label, self.lockstep, *job)
            except BaseException as e:  # reported by the main thread
                self.lockstep.finish(self.label, failed=True)
                self.results.put(e)
            else:
                self.lockstep.finish(self.label)
                self.results.put(result)


def _init_cudagraph_tls() -> None:
    """Give this thread its own cudagraph-tree state: torch 2.11 sets it up only in the
    importing thread (and autograd's threads, which inherit it), later versions on first
    use in any thread."""
    try:
        from torch._inductor import cudagraph_trees as ct
    except ImportError:  # pragma: no cover - torch builds without inductor
        return
    if hasattr(ct.local, "tree_manager_containers") or torch._C._is_key_in_tls(
            "tree_manager_containers"):
        return
    if hasattr(ct, "_initialize_tls"):
        ct._initialize_tls(ct.local)
    else:  # what torch 2.11 does at import, for this thread's threading.local
        ct.local.tree_manager_containers = {}
        ct.local.tree_manager_locks = collections.defaultdict(threading.Lock)


def lockstep_pair(workers: dict[str, Worker], lockstep: Lockstep, first: str, job: tuple,
                  timeout: float = 900.0) -> dict[str, dict]:
    """Both copies' ``generate`` once, ``first`` starting; a pair that takes longer than
    ``timeout`` seconds prints every thread's stack and raises (never a silent hang)."""
    lockstep.start(first)
    for w in workers.values():
        w.jobs.put(job)
    deadline = time.monotonic() + timeout
    results = {}
    for label, w in workers.items():
        try:
            results[label] = w.results.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            faulthandler.dump_traceback(all_threads=True)
            cause = next((r for r in results.values() if isinstance(r, BaseException)), None)
            raise TimeoutError(f"lockstep pair not done after {timeout} s "
                               "(every thread's stack is printed above)") from cause
    errors = [r for r in results.values() if isinstance(r, BaseException)]
    if errors:  # the cause first, not the other copy's stop
        raise min(errors, key=lambda e: isinstance(e, OtherCopyFailed))
    check_alternation(results, first)
    return results


def check_alternation(results: dict[str, dict], first: str) -> None:
    """Each copy's timed spans (``generate`` start to its first hand-off, each turn, the last
    turn to its return) must alternate strictly with the other's, ``first``'s leading, and
    never overlap: else the two copies ran at once or one ran several steps alone, and
    neither the times nor the pairing mean what they say."""
    spans = sorted((a, b, label) for label, r in results.items() for a, b in r["spans"])
    order = [label for _, _, label in spans]
    second = other_label(first)
    if order != [first, second] * (len(order) // 2) or len(order) % 2:
        raise RuntimeError(f"the copies did not alternate at every token: {order[:12]}...")
    for (_, end, label), (start, _, other) in itertools.pairwise(spans):
        if start < end:
            raise RuntimeError(f"{other}'s timed span began before {label}'s ended: the "
                               "copies ran at the same time")


def summarize(mode: str, batch: int, new_tokens: int, runs: list[dict]) -> dict:
    """The row for one (mode, batch): samples per label and the ratios (ours / sdpa speed)."""
    row: dict = dict(mode=mode, batch=batch)
    tok = {lb: [batch * new_tokens / r[lb]["active"] for r in runs] for lb in LABELS}
    for lb in LABELS:
        row[f"{lb}_samples"] = [round(v, 2) for v in tok[lb]]
        row[f"{lb}_tok_s"] = round(statistics.median(tok[lb]), 2)
        row[f"{lb}_step_ms"] = round(statistics.median(
            s for r in runs for s in r[lb]["steps"]) * 1e3, 4)
        row[f"{lb}_prefill_ms"] = round(statistics.median(r[lb]["prefill"] for r in runs)
                                        * 1e3, 2)
    row["ratio_tok_s"] = round(row["hadamard_kq_tok_s"] / row["sdpa_tok_s"], 4)
    row["ratio_tok_s_paired_median"] = round(statistics.median(
        h / s for h, s in zip(tok["hadamard_kq"], tok["sdpa"])), 4)
    sums = [(sum(r["sdpa"]["steps"]), sum(r["hadamard_kq"]["steps"])) for r in runs]
    row["ratio_decode_per_run"] = [round(s / h, 4) for s, h in sums]
    # per run, the median step of each: robust to a step that recorded a CUDA graph again
    row["ratio_median_step_per_run"] = [round(
        statistics.median(r["sdpa"]["steps"]) / statistics.median(r["hadamard_kq"]["steps"]), 4)
        for r in runs]
    row["ratio_decode"] = round(sum(s for s, _ in sums) / sum(h for _, h in sums), 4)
    row["ratio_step_paired_median"] = round(statistics.median(
        s / h for r in runs for s, h in zip(r["sdpa"]["steps"], r["hadamard_kq"]["steps"])), 4)
    row["ratio_prefill"] = round(row["sdpa_prefill_ms"] / row["hadamard_kq_prefill_ms"], 4)
    # where a decode step's time goes (medians over all steps, us): the compiled call's host
    # time, the wait for the GPU at the step's end, and the rest (generate's own Python)
    for lb in LABELS:
        waits = [w for r in runs for w in r[lb]["sync_waits"]]
        row[f"{lb}_sync_wait_us"] = round(statistics.median(waits) * 1e6, 1)
        if all("call_host" in r[lb] for r in runs):
            calls = [c for r in runs for c in r[lb]["call_host"]]
            row[f"{lb}_call_host_us"] = round(statistics.median(calls) * 1e6, 1)
            rest = [s - c - w for r in runs for s, c, w in zip(
                r[lb]["steps"], r[lb]["call_host"], r[lb]["sync_waits"])]
            row[f"{lb}_other_host_us"] = round(statistics.median(rest) * 1e6, 1)
    for lb in LABELS:  # distinct cache addresses over the timed runs (1: always the same)
        row[f"{lb}_cache_addresses"] = len({r[lb].get("cache_ptrs") for r in runs})
    row["runs"] = [{lb: dict(active_ms=round(r[lb]["active"] * 1e3, 3),
                             prefill_ms=round(r[lb]["prefill"] * 1e3, 3),
                             steps_us=[round(s * 1e6, 1) for s in r[lb]["steps"]],
                             sync_wait_us=[round(s * 1e6, 1) for s in r[lb]["sync_waits"]],
                             call_host_us=[round(s * 1e6, 1)
                                           for s in r[lb].get("call_host", ())],
                             cache_ptrs=r[lb].get("cache_ptrs"),
                             graph_roots=r[lb].get("graph_roots"))
                    for lb in LABELS} for r in runs]
    return row


def profile_calls(models: dict, workers: dict, lockstep: Lockstep, first: str, job: tuple,
                  timeout: float, out: Path) -> dict:
    """One more lockstep run, each copy's compiled calls under its own cProfile: the Python
    functions (cudagraph trees, AOTAutograd's runtime wrappers, dynamo) whose time differs
    between the copies. Profiling inflates Python time; compare the copies, not the totals."""
    import cProfile
    import pstats

    timed = {lb: time_compiled_call(models[lb]) for lb in LABELS}
    if any(t is None for t in timed.values()):
        return {"error": "no compiled call to profile (not static mode on CUDA?)"}
    for t in timed.values():
        t.profiler = cProfile.Profile()
    try:
        lockstep_pair(workers, lockstep, first, job, timeout)
    finally:
        profilers = {lb: t.profiler for lb, t in timed.items()}
        for t in timed.values():
            t.profiler = None
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for lb, prof in profilers.items():
        prof.dump_stats(str(out / f"cprofile_{lb}.prof"))
        stats[lb] = {f"{Path(k[0]).name}:{k[1]}({k[2]})": (v[1], v[2], v[3])  # ncalls, tt, ct
                     for k, v in pstats.Stats(prof).stats.items()}
    calls = len(timed["sdpa"].spans)
    rows = []
    for name in set(stats["sdpa"]) | set(stats["hadamard_kq"]):
        a = stats["sdpa"].get(name, (0, 0.0, 0.0))
        b = stats["hadamard_kq"].get(name, (0, 0.0, 0.0))
        rows.append(dict(function=name, ncalls_sdpa=a[0], ncalls_hadamard_kq=b[0],
                         tottime_us_per_call_sdpa=round(a[1] / calls * 1e6, 2),
                         tottime_us_per_call_hadamard_kq=round(b[1] / calls * 1e6, 2),
                         tottime_diff_us=round((b[1] - a[1]) / calls * 1e6, 2)))
    rows.sort(key=lambda r: -abs(r["tottime_diff_us"]))
    for r in rows[:25]:
        print(r, flush=True)
    return dict(calls=calls, top=rows[:60],
                count_differs=[r for r in rows
                               if r["ncalls_sdpa"] != r["ncalls_hadamard_kq"]][:60])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--modes", nargs="+", choices=["static", "eager"], default=["static"])
    parser.add_argument("--reps", type=int, default=8, help="timed lockstep runs")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed lockstep runs first (the first compiles, static mode)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny Llama (script check on CPU)")
    parser.add_argument("--first", choices=LABELS, default="sdpa",
                        help="whose copy is built, compiled and run first (the runs "
                             "alternate who starts either way)")
    parser.add_argument("--control", action="store_true",
                        help="A/A: leave the second copy unrotated too (both plain sdpa)")
    parser.add_argument("--compile-rotation", choices=["auto", "op", "native"], default="auto")
    parser.add_argument("--cpu", type=int, default=None,
                        help="the CPU core both worker threads run on (default: the last "
                             "core this process may use; -1: no pinning)")
    parser.add_argument("--persistent-cache", action="store_true",
                        help="static mode: each copy passes its own StaticCache (made once, "
                             "reset before each call) instead of generate's new one per call")
    parser.add_argument("--cprofile", action="store_true",
                        help="static mode: one more lockstep run with each copy's compiled "
                             "calls under cProfile; writes cprofile_<label>.prof and prints "
                             "the functions whose call counts or times differ most")
    parser.add_argument("--pair-timeout", type=float, default=900.0,
                        help="seconds one lockstep pair (compile included) may take")
    add_pointwise_autotune(parser)
    args = parser.parse_args(argv)
    apply_pointwise_autotune(args)
    if args.warmup < 1 or args.reps < 1 or args.new_tokens < 2:
        parser.error("--warmup and --reps must be >= 1 and --new-tokens >= 2")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_lockstep.py needs a GPU (or --device cpu --tiny to check it)")
    hf_hadamard_kq.set_compile_rotation(args.compile_rotation)
    import transformers

    env = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               torch=torch.__version__, transformers=transformers.__version__,
               layers=args.layers, tiny=args.tiny, prompt=args.prompt,
               new_tokens=args.new_tokens, compile_rotation=args.compile_rotation,
               first=args.first, control=args.control, warmup=args.warmup, reps=args.reps,
               method="lockstep", persistent_cache=args.persistent_cache,
               kv_store=hkq_cache.KV_STORE, pointwise_autotune=args.pointwise_autotune)
    print(env, flush=True)
    built_first = build_model(args.layers, args.device, args.tiny)
    built_second = build_model(args.layers, args.device, args.tiny)
    for a, b in zip(built_first.state_dict().values(), built_second.state_dict().values()):
        if not torch.equal(a, b):
            raise SystemExit("the two copies differ; cannot compare them")
    other = other_label(args.first)
    models = {args.first: built_first, other: built_second}
    if not args.control:
        hf_hadamard_kq.apply_r3(models["hadamard_kq"])
    cpu = args.cpu
    if cpu is None:
        cpu = max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else -1
    elif cpu >= 0 and cpu not in os.sched_getaffinity(0):
        raise SystemExit(f"--cpu {cpu}: not one of this process's cores "
                         f"{sorted(os.sched_getaffinity(0))}")
    env["cpu"] = cpu
    lockstep = Lockstep()
    workers = {lb: Worker(lb, models[lb], lockstep, cpu if cpu >= 0 else None)
               for lb in (args.first, other)}
    graphs = CudagraphEvents() if args.device == "cuda" else None
    rows = []
    for mode in args.modes:
        for batch in args.batch:
            gen = torch.Generator().manual_seed(batch)
            prompt = torch.randint(3, min(128000, built_first.config.vocab_size - 1),
                                   (batch, args.prompt), generator=gen).to(args.device)
            job = (prompt, args.new_tokens, mode == "static", args.persistent_cache)
            warm = [lockstep_pair(workers, lockstep, args.first if i % 2 == 0 else other, job,
                                  args.pair_timeout) for i in range(args.warmup)]
            runs, events = [], []
            for rep in range(args.reps):
                if graphs is not None:
                    graphs.take()
                runs.append(lockstep_pair(workers, lockstep,
                                          args.first if rep % 2 == 0 else other, job,
                                          args.pair_timeout))
                if graphs is not None:
                    events.append(graphs.take())
            row = summarize(mode, batch, args.new_tokens, runs)
            if graphs is not None:
                row["cudagraph_events"] = events
            row["warmup_cache_ptrs"] = {lb: [w[lb].get("cache_ptrs") for w in warm]
                                        for lb in LABELS}
            if args.control:
                row["control"] = "A/A: both labels ran plain sdpa"
            if args.cprofile and mode == "static":
                row["cprofile"] = profile_calls(models, workers, lockstep, args.first, job,
                                                args.pair_timeout, args.out)
            rows.append(row)
            print({k: v for k, v in row.items()
                   if k != "runs" and not k.endswith(("_samples", "_events"))}, flush=True)
    for w in workers.values():
        w.jobs.put(None)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_lockstep.json").write_text(json.dumps({"env": env, "rows": rows},
                                                             indent=1))


if __name__ == "__main__":
    import signal

    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)  # `timeout` kills
    main()
