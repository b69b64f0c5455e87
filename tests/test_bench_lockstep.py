"""benchmarks/bench_lockstep.py: two copies' generate calls alternated at every token.

The method is only worth its numbers if the copies really alternate one token at a time,
the waits are left out of each copy's time, a failure in one copy stops the other instead
of hanging, and bench_balanced.py runs it in both orders. Checked on CPU with a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_balanced  # noqa: E402
import bench_lockstep  # noqa: E402

TINY = ["--device", "cpu", "--tiny", "--layers", "2", "--prompt", "8", "--new-tokens", "5",
        "--warmup", "1"]


def test_runs_alternate_token_by_token_and_exclude_the_waits(tmp_path):
    bench_lockstep.main([*TINY, "--reps", "2", "--modes", "eager", "static",
                         "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_lockstep.json").read_text())
    assert data["env"]["method"] == "lockstep" and data["env"]["control"] is False
    assert data["env"]["cpu"] == max(os.sched_getaffinity(0))  # both workers pinned there
    assert [(r["mode"], r["batch"]) for r in data["rows"]] == [("eager", 1), ("static", 1)]
    for row in data["rows"]:
        assert len(row["runs"]) == 2
        for run in row["runs"]:
            for label in bench_lockstep.LABELS:
                part = run[label]
                assert len(part["steps_us"]) == 4  # new_tokens - 1 decode steps
                # the active time is the sum of its parts, never the wall time of both copies
                assert part["prefill_ms"] + sum(part["steps_us"]) / 1e3 < part["active_ms"]
        for key in ("ratio_tok_s", "ratio_decode", "ratio_step_paired_median",
                    "ratio_prefill"):
            assert row[key] > 0


def test_alternation_check_rejects_a_copy_running_alone_or_at_once():
    good = {"sdpa": {"spans": [(0, 1), (2, 3)]}, "hadamard_kq": {"spans": [(1, 2), (3, 4)]}}
    bench_lockstep.check_alternation(good, "sdpa")
    with pytest.raises(RuntimeError, match="did not alternate"):
        bench_lockstep.check_alternation(good, "hadamard_kq")
    alone = {"sdpa": {"spans": [(0, 1), (1, 2)]}, "hadamard_kq": {"spans": [(2, 3), (3, 4)]}}
    with pytest.raises(RuntimeError, match="did not alternate"):
        bench_lockstep.check_alternation(alone, "sdpa")
    # the right order of starts, but the second copy began before the first's turn ended
    overlap = {"sdpa": {"spans": [(0, 1.5), (2, 3)]}, "hadamard_kq": {"spans": [(1, 2), (3, 4)]}}
    with pytest.raises(RuntimeError, match="same time"):
        bench_lockstep.check_alternation(overlap, "sdpa")


def test_hand_over_excludes_the_other_copys_time():
    """A copy's step interval never contains the other copy's work (here a 50 ms sleep)."""
    lockstep = bench_lockstep.Lockstep()
    batons = {lb: bench_lockstep.Baton(lb, lockstep) for lb in bench_lockstep.LABELS}

    def copy(label: str, work: float) -> None:
        lockstep.wait_turn(label)
        for _ in range(3):
            time.sleep(work)
            batons[label](None, None)
        lockstep.finish(label)

    threads = [threading.Thread(target=copy, args=("sdpa", 0.0)),
               threading.Thread(target=copy, args=("hadamard_kq", 0.05))]
    lockstep.start("sdpa")
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
    fast = batons["sdpa"]
    waits = [r - m for m, r in zip(fast.marks, fast.resumes)]
    assert min(waits[:2]) >= 0.045  # sdpa waited while the other copy slept 50 ms
    steps = [m - r for m, r in zip(fast.marks[1:], fast.resumes[:-1])]
    assert max(steps) < min(waits[:2]) / 2, (steps, waits)  # and its steps hold none of it


class _Failing:
    def generate(self, *args, **kwargs):
        raise ValueError("boom")


class _Endless:
    """Stands in for a model: one token per hand-off, forever (until the other fails)."""

    def generate(self, prompt, logits_processor, **kwargs):
        while True:
            logits_processor[0](None, None)


def test_a_failing_copy_stops_the_other(monkeypatch):
    lockstep = bench_lockstep.Lockstep()
    monkeypatch.setattr(bench_lockstep, "sync", lambda: None)
    workers = {"sdpa": bench_lockstep.Worker("sdpa", _Endless(), lockstep),
               "hadamard_kq": bench_lockstep.Worker("hadamard_kq", _Failing(), lockstep)}
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="boom"):  # the cause, not the other copy's stop
        bench_lockstep.lockstep_pair(workers, lockstep, "sdpa", (prompt, 4, False), timeout=30)
    for w in workers.values():
        w.jobs.put(None)
        w.thread.join(timeout=30)
        assert not w.thread.is_alive()


def test_balanced_runs_lockstep_in_both_orders(tmp_path, monkeypatch):
    """bench_balanced.py --script lockstep: one bench_lockstep run per order (run in-process
    here in place of the child processes), combined with the lockstep ratios."""
    calls = []

    def run(cmd, check):
        assert cmd[1].endswith("bench_lockstep.py") and "--two-models" not in cmd
        calls.append(cmd[cmd.index("--first") + 1])
        bench_lockstep.main(cmd[2:])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bench_balanced.subprocess, "run", run)
    out = tmp_path / "bal"
    bench_balanced.main(["--out", str(out), "--script", "lockstep", "--",
                         *TINY, "--reps", "1", "--modes", "eager"])
    assert calls == ["sdpa", "hadamard_kq"]
    data = json.loads((out / "bench_balanced.json").read_text())
    assert data["env"]["script"] == "bench_lockstep.py"
    (row,) = data["rows"]
    assert [r["first"] for r in row["runs"]] == ["sdpa", "hadamard_kq"]
    for name in ("ratio_decode", "ratio_step_paired_median", "ratio_tok_s"):
        per = [r[name] for r in row["runs"]]
        assert row[f"balanced_{name}"] == round((per[0] * per[1]) ** 0.5, 4)


class _Stuck:
    def generate(self, *args, **kwargs):
        time.sleep(3)
        raise ValueError("late")


def test_a_stuck_pair_times_out_with_the_stacks(monkeypatch, capfd):
    lockstep = bench_lockstep.Lockstep()
    workers = {lb: bench_lockstep.Worker(lb, _Stuck(), lockstep)
               for lb in bench_lockstep.LABELS}
    with pytest.raises(TimeoutError, match="not done after"):
        bench_lockstep.lockstep_pair(workers, lockstep, "sdpa",
                                     (torch.zeros(1, 2, dtype=torch.long), 4, False), 0.5)
    err = capfd.readouterr().err
    assert "most recent call first" in err and "in generate" in err  # the stuck frame
    for w in workers.values():
        w.jobs.put(None)


def test_the_compiled_call_is_timed_once_wrapped():
    class Model:
        pass

    model = Model()
    assert bench_lockstep.time_compiled_call(model) is None  # eager: nothing to wrap
    model._compiled_call = lambda x: time.sleep(0.01) or x + 1
    timed = bench_lockstep.time_compiled_call(model)
    assert bench_lockstep.time_compiled_call(model) is timed  # never wrapped twice
    assert model._compiled_call(1) == 2
    ((start, end),) = timed.spans
    assert end - start >= 0.009


def _extra_work():
    return sum(range(100))


class _FakeCompiled:
    """A model whose generate runs ``_compiled_call`` once per decode step, as transformers'
    static-cache generate does; the hadamard_kq one does extra Python in that call."""

    def __init__(self, extra: bool, sleep: float = 0.0) -> None:
        self._compiled_call = _extra_work if extra else (lambda: 0)
        if sleep:
            self._compiled_call = lambda: time.sleep(sleep)

    def generate(self, prompt, logits_processor, max_new_tokens, **kwargs):
        logits_processor[0](None, None)  # the prefill's token
        for _ in range(max_new_tokens - 1):
            self._compiled_call()
            logits_processor[0](None, None)
        return torch.zeros(prompt.shape[0], prompt.shape[1] + max_new_tokens)


def test_cprofile_names_the_python_only_one_copy_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_lockstep, "sync", lambda: None)
    lockstep = bench_lockstep.Lockstep()
    models = {"sdpa": _FakeCompiled(False), "hadamard_kq": _FakeCompiled(True)}
    workers = {lb: bench_lockstep.Worker(lb, models[lb], lockstep) for lb in models}
    job = (torch.zeros(1, 2, dtype=torch.long), 5, True)
    result = bench_lockstep.lockstep_pair(workers, lockstep, "sdpa", job, timeout=30)
    assert len(result["hadamard_kq"]["call_host"]) == 4  # one compiled call per decode step
    report = bench_lockstep.profile_calls(models, workers, lockstep, "sdpa", job, 30, tmp_path)
    (row,) = [r for r in report["count_differs"] if "_extra_work" in r["function"]]
    assert (row["ncalls_sdpa"], row["ncalls_hadamard_kq"]) == (0, 4)
    assert (tmp_path / "cprofile_hadamard_kq.prof").exists()
    for w in workers.values():
        w.jobs.put(None)


def test_a_kept_cache_generates_what_generates_own_cache_does():
    """--persistent-cache resets and reuses one StaticCache per copy: the tokens must be
    those of generate's own fresh cache, run after run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_generate import build_model

    import hf_hadamard_kq

    models = {lb: build_model(2, "cpu", tiny=True) for lb in bench_lockstep.LABELS}
    hf_hadamard_kq.apply_r3(models["hadamard_kq"])
    lockstep = bench_lockstep.Lockstep()
    workers = {lb: bench_lockstep.Worker(lb, models[lb], lockstep) for lb in models}
    prompt = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(1))
    fresh = bench_lockstep.lockstep_pair(workers, lockstep, "sdpa", (prompt, 5, True, False),
                                         timeout=60)
    seen = set()
    for _ in range(2):
        kept = bench_lockstep.lockstep_pair(workers, lockstep, "sdpa", (prompt, 5, True, True),
                                            timeout=60)
        for lb in bench_lockstep.LABELS:
            assert kept[lb]["tokens"] == fresh[lb]["tokens"]
        cache = models["hadamard_kq"]._lockstep_cache[1]
        seen.add((id(cache), cache.layers[0].keys.data_ptr()))
    assert len(seen) == 1  # one cache, its tensors at one address, reused by both runs
    for w in workers.values():
        w.jobs.put(None)


def test_run_generate_steps_hold_only_their_own_copys_work(monkeypatch):
    """The script's own step formula: with the other copy sleeping 40 ms per step, sdpa's
    steps stay far below 40 ms, its active time leaves the other's out, and the sleeping
    copy's steps hold its sleep."""
    monkeypatch.setattr(bench_lockstep, "sync", lambda: None)
    lockstep = bench_lockstep.Lockstep()
    models = {"sdpa": _FakeCompiled(False), "hadamard_kq": _FakeCompiled(False, sleep=0.04)}
    workers = {lb: bench_lockstep.Worker(lb, models[lb], lockstep) for lb in models}
    job = (torch.zeros(1, 2, dtype=torch.long), 5, True)
    t0 = time.perf_counter()
    result = bench_lockstep.lockstep_pair(workers, lockstep, "sdpa", job, timeout=30)
    wall = time.perf_counter() - t0
    slow, fast = result["hadamard_kq"], result["sdpa"]
    assert min(slow["steps"]) >= 0.039 and len(fast["steps"]) == 4
    assert max(fast["steps"]) < min(slow["steps"]) / 2, (fast["steps"], slow["steps"])
    assert fast["active"] < wall - slow["active"] + 0.005  # the two never counted twice
    for w in workers.values():
        w.jobs.put(None)


def test_a_kept_cache_is_made_per_batch_size():
    """--persistent-cache with several batch sizes: each gets its own cache (the shape)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_generate import build_model

    model = build_model(1, "cpu", tiny=True)
    lockstep = bench_lockstep.Lockstep()
    for batch in (1, 2):
        prompt = torch.randint(3, 200, (batch, 4), generator=torch.Generator().manual_seed(0))
        lockstep.start("sdpa")
        lockstep.finished.add("hadamard_kq")  # no other copy: never wait for it
        out = bench_lockstep.run_generate(model, "sdpa", lockstep, prompt, 3, True, True)
        assert len(out["tokens"]) == batch
        assert model._lockstep_cache[0] == (batch, 7)
