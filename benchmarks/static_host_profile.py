"""Host time inside the compiled decode call for one label in its own process, and a cProfile
of 60 compiled calls (static cache, CUDA graphs, Llama-3-8B shapes, 32 layers, batch 1).

Why: ``static_forms_ab.py`` keeps several copies of the model in one process; their compiled
entries share code objects, so each copy's call may first evaluate another copy's guards and
the host time inside the call differs by copy, not only by model (BENCHMARKS.md, session 9).
One label per process removes that; the profile shows where the host time goes.

Usage (GPU): ``python benchmarks/static_host_profile.py sdpa|fused|native OUT.json``
"""

import cProfile
import io
import json
import pstats
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import static_step_profile as ssp
from bench_generate import build_model, timed_generate

import hf_hadamard_kq


def main() -> None:
    label, out = sys.argv[1], sys.argv[2]
    model = build_model(32)
    if label != "sdpa":
        hf_hadamard_kq.apply_r3(model)
        if label == "native":
            hf_hadamard_kq.set_compile_rotation("native")
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 128000, (1, 512), generator=gen).cuda()
    timed_generate(model, prompt, ssp.NEW, "static")  # compile and record
    res = {"label": label, "host_median": []}
    for _ in range(3):
        times = ssp.host_times(model, prompt)
        res["host_median"].append(round(statistics.median(times[5:]), 1))
    prof = cProfile.Profile()

    def on_call(i, run):
        if 20 <= i < 80:
            prof.enable()
            try:
                return run()
            finally:
                prof.disable()
        return run()

    ssp.generate_with(model, prompt, on_call)
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    res["profile"] = text.getvalue()
    print(label, res["host_median"])
    Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
