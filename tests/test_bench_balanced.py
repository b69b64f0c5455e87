"""benchmarks/bench_balanced.py: the order-balanced ratio of two bench_generate processes.

The combination must cancel an order bias exactly (it is what lets a same-process benchmark
resolve 0.5 %), refuse an unbalanced design, never combine around a failed row, and the
script must really run both orders (checked end to end on CPU with a tiny model)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_balanced  # noqa: E402


def _row(ratio: float, paired: float, prefill: float, **extra) -> dict:
    return dict(mode="static", batch=1, ratio_tok_s=ratio, ratio_tok_s_paired_median=paired,
                ratio_prefill=prefill, sdpa_tok_s=100.0, hadamard_kq_tok_s=100.0 * ratio,
                **extra)


def test_an_order_bias_cancels():
    true, bias = 0.997, 1.006
    got = bench_balanced.balanced({"sdpa": [true / bias], "hadamard_kq": [true * bias]})
    assert got == pytest.approx(true, rel=1e-12)
    # more processes of one order do not outweigh the other order
    got = bench_balanced.balanced({"sdpa": [true / bias] * 3, "hadamard_kq": [true * bias]})
    assert got == pytest.approx(true, rel=1e-12)
    # a plain mean of the four would lean towards sdpa-first's biased value
    assert (3 * true / bias + true * bias) / 4 < true - 1e-3


def test_unbalanced_or_invalid_is_refused():
    with pytest.raises(ValueError, match="hadamard_kq first"):
        bench_balanced.balanced({"sdpa": [1.0], "hadamard_kq": []})
    with pytest.raises(ValueError, match="positive"):
        bench_balanced.balanced({"sdpa": [1.0], "hadamard_kq": [0.0]})


def test_combine_reports_each_run_and_never_combines_around_an_error():
    runs = [("sdpa", {"rows": [_row(0.99, 0.98, 1.01)]}),
            ("hadamard_kq", {"rows": [_row(1.01, 1.02, 0.99)]})]
    (row,) = bench_balanced.combine(runs)
    assert [r["first"] for r in row["runs"]] == ["sdpa", "hadamard_kq"]
    assert row["balanced_ratio_tok_s"] == round(math.sqrt(0.99 * 1.01), 4)
    assert row["balanced_ratio_tok_s_paired_median"] == round(math.sqrt(0.98 * 1.02), 4)
    assert row["balanced_ratio_prefill"] == round(math.sqrt(1.01 * 0.99), 4)
    runs[1] = ("hadamard_kq", {"rows": [dict(mode="static", batch=1, error="OOM")]})
    (row,) = bench_balanced.combine(runs)
    assert row["error"] == "OOM" and "balanced_ratio_tok_s" not in row


def test_script_rejects_its_own_flags_in_the_pass_through():
    with pytest.raises(SystemExit, match="--first"):
        bench_balanced.main(["--out", "x", "--", "--first", "sdpa"])


def test_script_runs_both_orders_on_cpu(tmp_path):
    out = tmp_path / "bal"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_balanced.py"), "--out", str(out), "--",
         "--device", "cpu", "--tiny", "--layers", "2", "--modes", "static", "--batch", "1",
         "--reps", "1", "--new-tokens", "2", "--prompt", "8"],
        check=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    data = json.loads((out / "bench_balanced.json").read_text())
    (row,) = data["rows"]
    assert [r["first"] for r in row["runs"]] == ["sdpa", "hadamard_kq"]
    per = {}
    for first in ("sdpa", "hadamard_kq"):
        run = json.loads((out / f"pair0_{first}_first" / "bench_generate.json").read_text())
        assert run["env"]["first"] == first and run["env"]["two_models"] is True
        assert run["env"]["control"] is False
        per[first] = run["rows"][0]["ratio_tok_s"]
    assert row["balanced_ratio_tok_s"] == round(math.sqrt(per["sdpa"] * per["hadamard_kq"]), 4)
