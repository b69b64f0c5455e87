"""Run bench_op.py with another row-kernel tiling table, for an A/B of a tiling change in one
device call (alternate the variants, one process each, and compare within the call).

Variants:

* ``new``: the tables as they are in ``ops/triton_kernel.py``;
* ``session11``: the tables before session 12 (every tiling at triton's default pipelining
  depth, 3; d = 64 prefill on a persistent grid, d = 128 decode with 2 warps);
* ``nomedium``: as ``new`` without the medium size class (``TUNED_16BIT_MEDIUM`` emptied).

Usage (GPU machine)::

    python benchmarks/bench_op_variant.py session11 -- --out results/op_old --only all
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_hadamard_kq.ops import triton_kernel as tk

#: ``TUNED_16BIT`` and ``TUNED_16BIT_MEDIUM`` as of session 11 (commit e756314).
SESSION11 = {
    (64, False): (64, 64, 4, 4, 3), (64, True): (32, 16, 4, 0, 3),
    (128, False): (64, 64, 4, 0, 3), (128, True): (32, 16, 2, 0, 3),
    (256, False): (64, 16, 4, 0, 3), (256, True): (64, 16, 4, 0, 3),
}  # fmt: skip
SESSION11_MEDIUM = {256: (64, 32, 4, 4, 3)}


def apply(variant: str) -> None:
    """Patch the module's tables for ``variant`` and drop every cached tiling and plan."""
    if variant == "session11":
        tk.TUNED_16BIT.update(SESSION11)
        tk.TUNED_16BIT_MEDIUM.clear()
        tk.TUNED_16BIT_MEDIUM.update(SESSION11_MEDIUM)
    elif variant == "nomedium":
        tk.TUNED_16BIT_MEDIUM.clear()
    elif variant != "new":
        raise SystemExit(f"unknown variant {variant!r}: new, session11 or nomedium")
    tk.rows_config.cache_clear()
    tk.clear_plans()


def main(argv: list[str]) -> None:
    if len(argv) < 1 or (len(argv) > 1 and argv[1] != "--"):
        raise SystemExit("usage: bench_op_variant.py VARIANT [-- bench_op arguments]")
    apply(argv[0])
    print("variant", argv[0], dict(tk.TUNED_16BIT), dict(tk.TUNED_16BIT_MEDIUM), flush=True)
    import bench_op

    bench_op.main(argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
