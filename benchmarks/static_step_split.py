"""Where a compiled decode step's time goes inside ``generate`` (static cache, CUDA graphs).

Why: end to end, static cache + torch.compile ran 8 % behind sdpa (BENCHMARKS.md, session 4)
with equal GPU kernel time per step. ``generate`` waits for each step's result before the
next, so host work inside the compiled call does not overlap the GPU and adds to every step.
This splits a step into host time inside the compiled call (dynamo guards, cudagraph-tree
bookkeeping, replay launch) and the time between calls (mostly waiting for the GPU), and
counts cudagraph-tree recordings / replays per ``generate`` (a re-recording per ``generate``
would show as ``record`` > 0 after the warm-up).

One label per process (dynamo's caches are per process): run it once for ``sdpa`` and once
for ``hadamard_kq`` and compare. Llama-3-8B shapes, random weights (bench_generate.py).

Usage (GPU): ``python benchmarks/static_step_split.py LABEL FORM LAYERS BATCH REPS OUT.json``
with LABEL ``sdpa`` or ``hadamard_kq`` and FORM ``auto``, ``op`` or ``native``.
"""
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_generate import build_model

import hf_hadamard_kq

label, form, layers, batch, reps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(
    sys.argv[4]), int(sys.argv[5]), sys.argv[6]
hf_hadamard_kq.set_compile_rotation(form)
model = build_model(layers)
if label == "hadamard_kq":
    hf_hadamard_kq.apply_r3(model)
gen = torch.Generator().manual_seed(batch)
prompt = torch.randint(3, 128000, (batch, 512), generator=gen).cuda()
NEW = 128

# --- cudagraph tree events
from torch._inductor import cudagraph_trees as ct  # noqa: E402

events = {"record": 0, "eager": 0, "execute": 0}


def wrap(name, key):
    orig = getattr(ct.CUDAGraphTreeManager, name)

    def f(self, *a, **k):
        events[key] += 1
        return orig(self, *a, **k)

    setattr(ct.CUDAGraphTreeManager, name, f)


wrap("record_function", "record")
wrap("run_eager", "eager")
wrap("execute_node", "execute")


class Stamp:
    """LogitsProcessor: a CUDA event and a host timestamp per step (no sync added)."""

    def __init__(self):
        self.ev, self.host = [], []

    def __call__(self, input_ids, scores):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.ev.append(e)
        self.host.append(time.perf_counter())
        return scores


def run(stamp=None):
    from transformers import LogitsProcessorList

    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    if stamp is not None:
        kw["logits_processor"] = LogitsProcessorList([stamp])
    torch.cuda.synchronize()
    start_ev = torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start_ev.record()
    model.generate(prompt, **kw)
    end_ev = torch.cuda.Event(enable_timing=True)
    end_ev.record()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return t0, t1, t2, start_ev, end_ev


from torch._dynamo.utils import counters  # noqa: E402

t = time.perf_counter()
run()
compile_s = time.perf_counter() - t
run()
calls = []  # (host start, host end) of each compiled-forward call
inner = model._compiled_call


def timed_call(*a, **k):
    s = time.perf_counter()
    out = inner(*a, **k)
    calls.append((s, time.perf_counter()))
    return out


model._compiled_call = timed_call
exec_host = []
orig_exec = ct.CUDAGraphTreeManager.execute_node


def exec_timed(self, *a, **k):
    s = time.perf_counter()
    out = orig_exec(self, *a, **k)
    exec_host.append(time.perf_counter() - s)
    return out


ct.CUDAGraphTreeManager.execute_node = exec_timed
res = dict(label=label, form=form, layers=layers, batch=batch, compile_s=round(compile_s, 1),
           runs=[])
for _ in range(reps):
    for k in events:
        events[k] = 0
    st = Stamp()
    calls.clear()
    exec_host.clear()
    t0, t1, t2, s_ev, e_ev = run(st)
    gpu_steps = [st.ev[i].elapsed_time(st.ev[i + 1]) for i in range(len(st.ev) - 1)]
    host_steps = [(st.host[i + 1] - st.host[i]) * 1e3 for i in range(len(st.host) - 1)]
    row = dict(
        wall_ms=round((t2 - t0) * 1e3, 2),
        host_return_ms=round((t1 - t0) * 1e3, 2),
        prefill_gpu_ms=round(s_ev.elapsed_time(st.ev[0]), 2),
        prefill_host_ms=round((st.host[0] - t0) * 1e3, 2),
        tail_gpu_ms=round(st.ev[-1].elapsed_time(e_ev), 3),
        step_gpu_med=round(statistics.median(gpu_steps), 4),
        step_gpu_mean=round(statistics.mean(gpu_steps), 4),
        step_gpu_max=round(max(gpu_steps), 3),
        step_gpu_first3=[round(x, 3) for x in gpu_steps[:3]],
        step_host_med=round(statistics.median(host_steps), 4),
        step_host_mean=round(statistics.mean(host_steps), 4),
        step_host_max=round(max(host_steps), 3),
        cg_events=dict(events),
        n_compiled_calls=len(calls),
        call_host_med_us=round(statistics.median(e - s for s, e in calls) * 1e6, 1),
        between_calls_med_us=round(statistics.median(
            calls[i + 1][0] - calls[i][1] for i in range(len(calls) - 1)) * 1e6, 1),
        execute_node_host_med_us=(round(statistics.median(exec_host) * 1e6, 1)
                                  if exec_host else None),
    )
    res["runs"].append(row)
    print(label, form, row, flush=True)
# without the stamp processor, plain wall time
walls = []
for _ in range(reps):
    t0, t1, t2, _, _ = run()
    walls.append(round(batch * NEW / (t2 - t0), 2))
res["tok_s_plain"] = walls
res["counters"] = {k: dict(v) for k, v in counters.items()
                   if k in ("stats", "inductor", "recompiles")}
res["counters"]["inductor"] = {k: v for k, v in res["counters"].get("inductor", {}).items()
                               if "cudagraph" in k}
print(label, form, "tok/s", walls, flush=True)
json.dump(res, open(out, "w"), indent=1)
