"""``bench_generate.py --two-models`` in both orders, one process each: the order-balanced ratio.

Why: with two compiled copies of the model in one process (static cache + compile), the copy
built second and the copy compiled second each run ~0.5 % slower, even when both copies are
plain sdpa (A/A runs, BENCHMARKS.md session 10: 0.990-0.996 for identical models). One
process therefore measures the rotation's cost plus an order bias of the same size as the
issue's 0.5 % target. This script runs ``bench_generate.py --two-models`` once with sdpa built
and compiled first and once with hadamard_kq first (``--pairs N``: N such pairs, the order
inside a pair alternating), each in its own process, and reports, per mode and batch, every
process's ratios and their order-balanced combination: the geometric mean of the mean log
ratio of each order. A bias that favours whichever copy comes first multiplies one order's
ratio by ``b`` and the other's by ``1 / b``, so it cancels; the rotation's own cost does not.
``--control`` runs the same design as an A/A check (both copies plain sdpa): its balanced
ratio should be ~1. ``--script lockstep`` runs ``bench_lockstep.py`` instead (the two
copies' ``generate`` calls alternate at every token, which takes the host's slow stretches
out of the ratio; the order bias stays, hence both orders here too).

Usage (GPU machine): ``python benchmarks/bench_balanced.py --out results/balanced -- --modes
static --batch 1 --reps 14`` (everything after ``--`` goes to the script, which must not be
given ``--two-models``, ``--first`` or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDERS = ("sdpa", "hadamard_kq")
#: bench_generate.py row fields combined here (ratios: hadamard_kq relative to sdpa, > 1 is
#: hadamard_kq faster).
RATIOS = ("ratio_tok_s", "ratio_tok_s_paired_median", "ratio_prefill")
#: ``--script``: the benchmark run per process, the arguments it always gets (besides
#: ``--first`` and ``--out``), and the ratios of its rows to combine.
SCRIPTS = {
    "generate": ("bench_generate.py", ("--two-models",), RATIOS),
    "lockstep": ("bench_lockstep.py", (),
                 (*RATIOS, "ratio_decode", "ratio_step_paired_median")),
}
_OWN = ("--two-models", "--first", "--out")


def balanced(ratios_by_first: dict[str, list[float]]) -> float:
    """The order-balanced ratio: ``exp((mean log r | sdpa first + mean log r | ours first) / 2)``.

    Each order counts once however many processes ran it, so an order bias ``b`` (``r * b``
    for one order, ``r / b`` for the other) cancels exactly."""
    missing = [f for f in ORDERS if not ratios_by_first.get(f)]
    if missing:
        raise ValueError(f"no run with {missing[0]} first: the orders are not balanced")
    if any(r <= 0 for f in ORDERS for r in ratios_by_first[f]):
        raise ValueError("ratios must be positive")
    logs = [statistics.fmean(math.log(r) for r in ratios_by_first[f]) for f in ORDERS]
    return math.exp(statistics.fmean(logs))


def combine(runs: list[tuple[str, dict]], ratios: tuple[str, ...] = RATIOS) -> list[dict]:
    """Per (mode, batch): each process's ratios by order, and the balanced ratios.

    ``runs``: ``(first, bench_generate.json or bench_lockstep.json content)`` per process;
    ``ratios``: the row fields to combine. A row with an error in any process is reported
    as an error (never combined from the other order alone)."""
    table: dict[tuple, dict] = {}
    for first, data in runs:
        for row in data["rows"]:
            key = (row["mode"], row["batch"])
            entry = table.setdefault(key, {"mode": row["mode"], "batch": row["batch"],
                                           "runs": []})
            entry["runs"].append({"first": first, **{k: row.get(k) for k in (
                *ratios, "error", "sdpa_tok_s", "hadamard_kq_tok_s", "sdpa_prefill_ms",
                "hadamard_kq_prefill_ms", "sdpa_samples", "hadamard_kq_samples")}})
    out = []
    for entry in table.values():
        errors = [r["error"] for r in entry["runs"] if r.get("error")]
        if errors:
            entry["error"] = errors[0]
        else:
            for name in ratios:
                by_first = {f: [r[name] for r in entry["runs"] if r["first"] == f]
                            for f in ORDERS}
                entry[f"balanced_{name}"] = round(balanced(by_first), 4)
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    rest: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, rest = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=1, help="processes per order")
    parser.add_argument("--control", action="store_true",
                        help="A/A: both copies plain sdpa (bench_generate.py --control)")
    parser.add_argument("--script", choices=sorted(SCRIPTS), default="generate",
                        help="generate: bench_generate.py --two-models (whole generate runs "
                             "alternate); lockstep: bench_lockstep.py (the two copies' "
                             "generate calls alternate at every token)")
    args = parser.parse_args(argv)
    clash = [a for a in rest if a.split("=")[0] in _OWN]
    if clash:
        raise SystemExit(f"bench_balanced.py sets {clash[0]} itself; leave it out")
    if args.pairs < 1:
        raise SystemExit("--pairs must be >= 1")
    script, script_args, ratios = SCRIPTS[args.script]
    runs = []
    for pair in range(args.pairs):
        for first in (ORDERS if pair % 2 == 0 else ORDERS[::-1]):
            out = args.out / f"pair{pair}_{first}_first"
            cmd = [sys.executable, str(HERE / script), *script_args,
                   "--first", first, "--out", str(out), *rest]
            if args.control:
                cmd.append("--control")
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            result = out / script.replace(".py", ".json")
            runs.append((first, json.loads(result.read_text())))
    rows = combine(runs, ratios)
    env = dict(runs[0][1]["env"], first="both (balanced)", pairs=args.pairs,
               control=args.control, script=script)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_balanced.json").write_text(json.dumps({"env": env, "rows": rows},
                                                             indent=1))
    for row in rows:
        print({k: v for k, v in row.items() if k != "runs"}, flush=True)
        for run in row["runs"]:
            print("   ", {k: v for k, v in run.items() if not k.endswith("_samples")}, flush=True)


if __name__ == "__main__":
    main()
