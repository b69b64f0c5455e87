"""GPU kernel time per compiled decode step inside ``generate`` (static cache, CUDA graphs).

Why: under torch.compile a rotation costs GPU time either as our op's kernel (plus the cache
write that inductor then no longer fuses into the RoPE kernel) or as extra work inside the
fused RoPE kernel (the ``native`` form). This sums the device time of every kernel over 6
decode steps (compiled calls 20-25 of a 128-token ``generate``) and lists the largest, so
the forms and sdpa can be compared kernel by kernel; then it times 3 plain ``generate`` calls.

One label per process. Llama-3-8B shapes, random weights (bench_generate.py), batch 1.

Usage (GPU): ``python benchmarks/static_step_kernels.py LABEL FORM LAYERS OUT.json`` with
LABEL ``sdpa`` or ``hadamard_kq`` and FORM ``auto``, ``op`` or ``native``.
"""

import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_generate import build_model

import hf_hadamard_kq
from hf_hadamard_kq.cache import KV_STORE

STEPS = 6
FIRST = 20  # the first profiled compiled call


def main() -> None:
    label, form, layers, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    hf_hadamard_kq.set_compile_rotation(form)
    model = build_model(layers)
    if label == "hadamard_kq":
        hf_hadamard_kq.apply_r3(model)
    prompt = torch.randint(3, 128000, (1, 512), generator=torch.Generator().manual_seed(1))
    prompt = prompt.cuda()
    kw = dict(max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    model.generate(prompt, **kw)  # compile, record the CUDA graphs
    model.generate(prompt, **kw)
    inner = model._compiled_call
    calls = [0]
    prof = profile(activities=[ProfilerActivity.CUDA])

    def call(*a, **k):
        calls[0] += 1
        if calls[0] == FIRST:
            torch.cuda.synchronize()
            prof.start()
        o = inner(*a, **k)
        if calls[0] == FIRST + STEPS - 1:
            torch.cuda.synchronize()
            prof.stop()
        return o

    model._compiled_call = call
    model.generate(prompt, **kw)
    model._compiled_call = inner
    rows = sorted(((e.key, e.device_time_total / STEPS, e.count / STEPS)
                   for e in prof.key_averages() if e.device_time_total > 0),
                  key=lambda r: -r[1])
    total = sum(t for _, t, _ in rows)
    walls = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, **kw)
        torch.cuda.synchronize()
        walls.append(round(128 / (time.perf_counter() - start), 2))
    res = dict(label=label, form=form, pkg=hf_hadamard_kq.__file__, kv_store=KV_STORE,
               kernel_us_per_step=round(total, 1), tok_s=walls,
               kernels=[(k[:100], round(t, 2), c) for k, t, c in rows[:40]])
    print(label, form, "kv_store", KV_STORE, "kernel us/step", round(total, 1), "tok/s", walls,
          flush=True)
    for k, t, c in rows[:14]:
        print(f"   {t:9.2f} us  x{c:5.1f}  {k[:110]}")
    Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
