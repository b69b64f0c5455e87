"""The Triton kernel (``hf_hadamard_kq/ops/triton_kernel.py``) run on the CPU by the interpreter.

How it runs: ``TRITON_INTERPRET=1`` must be in the environment *before* triton decorates the
kernels (when the kernel module is imported), and a pytest process may already have imported
triton or the kernel module without it. So this module has two faces:

* In a normal ``pytest tests/`` run (``TRITON_INTERPRET`` unset) it holds one test,
  ``test_interpreter_suite``, which re-runs this file in a child ``python -m pytest`` with
  ``TRITON_INTERPRET=1`` and fails with the child's output if any child test fails.
  The outer run also compiles the kernels ahead of time for an H100 (sm_90) — no GPU needed —
  and fails on a compile error, a shared-memory overflow or a register spill.
* With ``TRITON_INTERPRET=1`` already set (the child, or by hand:
  ``TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_triton_interpret.py``) it holds the
  real tests, one report line each. The suite passes under triton 3.9 (dev/CI) and 3.6 (with
  numpy 2.2; triton 3.6's interpreter cannot run runtime-bound loops under numpy 2.4, and the
  outer test skips, naming that, when it sees the error).

The kernel module is loaded from its file path (it has no package imports), so these tests
exercise the kernel alone, independent of the op layer and of import-time registration.

References are independent of the kernel: the Sylvester matrix comes from compressed-tensors'
``deterministic_hadamard_matrix`` (checked against ``(-1)**popcount(i & j)``), products are
float64 matmuls; for n > 4096 a float64 fast Walsh-Hadamard butterfly (checked against the dense
matrix at smaller n) avoids the 8 GiB dense matrix.

Tolerance idiom (DESIGN.md section 6), :func:`assert_matches`: ``max|ours - ref64| <=
2 * max|torch - ref64| + atol``, where ``torch`` is the same computation done by torch in the
kernel's precision (``x`` and ``W`` as float32, fp32 matmuls — for n > 4096 with the kernel's
Kronecker split — times ``scale``, rounded once to ``x.dtype``). For 16-bit outputs that
baseline is the single-rounding floor (half an ulp at the largest magnitude) and ``atol`` is
``finfo.tiny``: an extra 16-bit rounding anywhere would break the bound. For fp32 outputs fp32
accumulation order dominates and ``atol = eps * max|ref64|`` (one ulp at the largest magnitude)
absorbs a different summation order.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import os
import pathlib
import re
import subprocess
import sys
import time
from types import ModuleType

import pytest
import torch

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parent.parent
KERNEL_FILE = ROOT / "hf_hadamard_kq" / "ops" / "triton_kernel.py"
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


if not IN_INTERPRETER:
    # Older interpreters call int() on 1-element arrays, which numpy >= 2.4 refuses.
    _OLD_INTERPRETER_NEW_NUMPY = "only 0-dimensional arrays can be converted to Python scalars"

    def test_interpreter_suite() -> None:
        """Run this file's interpreter tests in a child process with TRITON_INTERPRET=1."""
        pytest.importorskip("triton")
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "pytest", str(HERE), "-q", "-p", "no:cacheprovider"]
        start = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
        )
        elapsed = time.perf_counter() - start
        tail = (proc.stdout[-20000:] + "\n" + proc.stderr[-5000:]).strip()
        if proc.returncode != 0 and _OLD_INTERPRETER_NEW_NUMPY in proc.stdout:
            pytest.skip(
                "this triton's interpreter cannot run loops with runtime bounds under this numpy "
                "(seen with triton 3.6 + numpy 2.4; fine with numpy 2.2 or triton 3.9)"
            )
        assert proc.returncode == 0, f"interpreter suite failed ({elapsed:.0f}s):\n{tail}"
        # rc 5 would mean "nothing collected": make sure the child really ran tests.
        assert " passed" in proc.stdout, tail

    # Ahead-of-time compilation for an H100 (sm_90) without a GPU: catches kernels that the
    # interpreter accepts but the compiler rejects, shared-memory overflows and register
    # spills. (rows kernel cases: n, x dtype, W dtype or None for Sylvester, strided -- False,
    # True (x through its strides) or "out" (x in memory order, STRIDED_OUT) --, wide, and
    # optionally the output dtype when it is not x's.)
    AOT_ROWS = [
        (16, "bf16", None, False, False),
        (64, "bf16", None, False, False),
        (64, "fp16", None, True, False),
        (128, "bf16", None, False, False),
        (128, "fp16", "fp16", False, False),
        (256, "bf16", None, True, False),
        (128, "bf16", None, True, True),
        (128, "bf16", None, "out", False),
        (256, "bf16", None, "out", True),
        (8, "fp32", None, False, False),
        (96, "bf16", "fp32", False, False),
        (256, "fp32", "fp32", False, False),
        (256, "fp32", None, False, False),
        (256, "bf16", "bf16", False, False),
        (256, "bf16", None, False, False),  # flat d = 256 (decode: SPLIT8's 16-byte vectors)
        (256, "bf16", None, False, False, "fp32"),  # the two-pass row pass into the fp32 buffer
    ]
    AOT_MID = [(16, "bf16"), (128, "fp32")]
    # fused Q/K kernel cases: d, x dtype, W dtype or None, RoPE, BLOCK_M, decode-sized call
    # (the size class whose tuned warps apply when BLOCK_M is the tuned one)
    AOT_QK = [
        (128, "bf16", None, True, 16, True),
        (64, "bf16", None, True, 16, True),  # decode, d = 64 (32-wide halves)
        (128, "bf16", None, True, 64, False),
        (128, "bf16", None, True, 32, False),  # the tuned prefill tiling (session 10)
        (256, "bf16", None, True, 16, True),
        (256, "bf16", None, True, 64, False),
        (256, "bf16", None, True, 32, False),
        (64, "fp16", None, False, 128, False),
        (128, "bf16", "bf16", True, 64, False),
        (128, "bf16", "fp32", True, 64, False),
        # explicit matrices at decode size: PDL waits before loading them
        (128, "bf16", "bf16", True, 16, True),
        (128, "bf16", "fp32", True, 16, True),
        # fp32 tensors: the TUNED_QK_F32 tilings (session 16), decode and prefill
        (128, "fp32", None, True, 16, True),
        (128, "fp32", None, True, 16, False),
        (256, "fp32", None, True, 16, True),
    ]
    SMEM_LIMIT_SM90 = 232448  # bytes of shared memory one block may use on an H100

    from tests.aot import compile_sm90 as _aot_compile

    def _waits_before_memory(ptx: str) -> bool:
        """A PDL kernel's ``griddepcontrol.wait`` comes before its first global load, store or
        asynchronous copy in the code (a software-pipelined prologue hoisted above it would
        read the previous kernel's output before it is written)."""
        wait = ptx.find("griddepcontrol.wait")
        first = min((m.start() for m in re.finditer(
            r"\b(ld\.global|st\.global|cp\.async|red\.global|atom\.global)", ptx)),
            default=len(ptx))
        return 0 <= wait < first

    def _aot_qk(d: int, xdt: str, wdt: str | None, block_m: int, loads_first: bool, align: int,
                warps: int, rope: bool, fence: bool, stages: int | None = None,
                pdl: bool = False, qsplit: int = 1):
        """The fused Q/K kernel compiled for sm_90 with these constexprs (aligned pointers)."""
        from hf_hadamard_kq.ops import qk_kernel

        ty = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
        sig = {f"{n}_ptr": ty[xdt] for n in ("q", "k", "qo", "ko", "c", "s")}
        sig.update(w_ptr=ty[wdt or xdt], scale="fp32")
        const = dict(
            D=d, HALF=d // 2, LOG2HALF=(d // 2).bit_length() - 1, BLOCK_M=block_m, ROPE=rope,
            SYLVESTER=wdt is None, DOT_F32=xdt == "fp32" or wdt == "fp32", EMULATE_RTNE=False,
            LOADS_FIRST=loads_first, ALIGN=align, ROPE_FENCE=fence, QSPLIT=qsplit, PDL=pdl,
        )  # fmt: skip
        return _aot_compile(qk_kernel._qk_kernel, sig, const, warps, aligned_ptrs=True,
                            stages=stages)

    def _local_bytes(cubin: bytes) -> int | None:
        """Spill (local memory) bytes per thread, from the bundled cuobjdump, if present."""
        import shutil
        import tempfile

        import triton

        tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if not tool.exists() and shutil.which("cuobjdump") is None:
            return None
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            exe = str(tool) if tool.exists() else "cuobjdump"
            res = subprocess.run(
                [exe, "--dump-resource-usage", f.name], capture_output=True, text=True, check=False
            )
        import re

        m = re.search(r"LOCAL:(\d+)", res.stdout)
        return int(m.group(1)) if m else None

    def _kernel_module_compiled() -> ModuleType:
        spec = importlib.util.spec_from_file_location("_hkq_triton_kernel_aot", KERNEL_FILE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def test_launcher_key_mirrors_triton_specialisation() -> None:
        """launch.CachedLauncher keys compiled kernels by what triton specialises on; check
        our int / pointer rules against this triton's own specialisation function."""
        pytest.importorskip("triton")
        try:
            from triton._C.libtriton import native_specialize_impl
            from triton.backends.compiler import BaseBackend
        except ImportError:
            pytest.skip("this triton has no native_specialize_impl to compare with")
        from hf_hadamard_kq.ops.launch import int_spec

        for v in (0, 1, 2, 15, 16, 17, 32, 4096, 2**31 - 1, 2**31, 2**31 + 16, -1, -16):
            kind, hint = native_specialize_impl(BaseBackend, v, False, True, True)
            code = int_spec(v)
            assert (kind == "constexpr") == bool(code & 1), v
            if kind != "constexpr":
                assert (hint == "D") == bool(code & 2), v
                assert (kind == "i64") == bool(code & 4), v
        buf = torch.zeros(64, dtype=torch.bfloat16)
        for offset in range(9):
            view = buf[offset:]
            _, hint = native_specialize_impl(BaseBackend, view, False, True, True)
            assert (hint == "D") == (view.data_ptr() % 16 == 0), offset

    @pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
    def test_kernels_compile_for_sm90() -> None:
        pytest.importorskip("triton")
        tk = _kernel_module_compiled()
        ty = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
        results = []
        seen = set()
        classes = ((False, False), (True, False), (False, True))  # large, small, medium
        for (n, xdt, wdt, strided, wide, *odt), (small, medium) in itertools.product(AOT_ROWS,
                                                                                     classes):
            sylvester = wdt is None
            dot_f32 = xdt == "fp32" or wdt == "fp32"
            cfg = tk.rows_config(n, dot_f32, sylvester, small, medium)
            resident = tk.has_resident_w(cfg, sylvester)
            for loads_first in (False, True) if resident else (False,):
                if (n, xdt, wdt, strided, wide, *odt, cfg, loads_first) in seen:
                    continue
                seen.add((n, xdt, wdt, strided, wide, *odt, cfg, loads_first))
                sig = {"x_ptr": ty[xdt], "w_ptr": ty[wdt or xdt], "out_ptr": ty[(odt or [xdt])[0]],
                       "scale": "fp32"}
                if wide:
                    sig.update(s0="i64", s1="i64", s2="i64")
                const = dict(
                    N=n, BN=cfg.bn, NB=cfg.nb, BLOCK_M=cfg.block_m, LOG2N=cfg.log2n,
                    SYLVESTER=sylvester, STRIDED=bool(strided), STRIDED_OUT=strided == "out",
                    SPLIT2=sylvester and cfg.nb == 2,
                    SPLIT4=sylvester and cfg.nb == 4, SPLIT8=sylvester and cfg.nb == 8,
                    LOADS_FIRST=loads_first,
                    WIDE=wide, DOT_F32=dot_f32,
                    WHOLE_ROWS=tk.takes_whole_rows(cfg, sylvester, small),  # as _rows_plan
                    EMULATE_RTNE=False, PDL=small,  # decode-sized launches use PDL on sm_90
                )  # fmt: skip
                k = _aot_compile(tk._rows_kernel, sig, const, cfg.num_warps,
                                 stages=cfg.num_stages)
                if const["WHOLE_ROWS"] and not strided:  # the point of the form: 16-byte
                    # vectors for every load and store (given 16-byte aligned pointers, as
                    # triton specialises them at run time)
                    ptx = _aot_compile(tk._rows_kernel, sig, const, cfg.num_warps,
                                       aligned_ptrs=True, stages=cfg.num_stages).asm["ptx"]
                    narrow = [a for a in re.findall(r"\b(?:ld|st)\.global[.\w]*", ptx)
                              if ".v4" not in a]
                    assert not narrow, (n, xdt, cfg, narrow)
                # PDL: the programs wait for the previous kernel (before any load or store)
                assert ("griddepcontrol.wait" in k.asm["ptx"]) == small, (n, xdt, small)
                assert not small or _waits_before_memory(k.asm["ptx"]), (n, xdt, cfg)
                results.append((f"rows n={n} {xdt} W={wdt} strided={strided} {cfg} "
                                f"loads_first={loads_first}", k))
        for m, odt in AOT_MID:
            cfg = tk.mid_config(m, 256)
            sig = {"buf_ptr": "*fp32", "out_ptr": ty[odt], "scale": "fp32"}
            const = dict(M=m, LOG2M=m.bit_length() - 1, BLOCK_I=cfg.block_i, EMULATE_RTNE=False)
            k = _aot_compile(tk._mid_kernel, sig, const, cfg.num_warps)
            results.append((f"mid m={m} {odt}", k))
        from hf_hadamard_kq.ops import qk_kernel

        for d, xdt, wdt, rope, block_m, decode in AOT_QK:
            dot_f32 = xdt == "fp32" or wdt == "fp32"
            unit = 16 // (4 if xdt == "fp32" else 2)
            tuned = qk_kernel.qk_config(d, 32 if decode else 1 << 20, xdt == "fp32")
            warps, stages = tuned[1:] if tuned[0] == block_m else (4, None)
            # the tuned launch (W built after the loads, 16-byte rows), and for the first case
            # also W before the loop with unaligned rows
            variants = [(True, unit, warps)] + ([(False, 1, 4)] if (d, xdt, wdt) == (
                128, "bf16", None) and block_m == 16 else [])
            # the quarter form, where _make_plan takes it
            qsplit = qk_kernel.QSPLIT_PARTS.get(d, 1) if wdt is None and not dot_f32 else 1
            for loads_first, align, nw in variants:
                fence = rope and not dot_f32  # what _make_plan passes on CUDA
                k = _aot_qk(d, xdt, wdt, block_m, loads_first, align, nw, rope, fence, stages,
                            pdl=decode, qsplit=qsplit)
                name = (f"qk d={d} {xdt} W={wdt} rope={rope} BLOCK_M={block_m} "
                        f"loads_first={loads_first} align={align} warps={nw} stages={stages} "
                        f"qsplit={qsplit}")
                assert ("griddepcontrol.wait" in k.asm["ptx"]) == decode, name
                assert not decode or _waits_before_memory(k.asm["ptx"]), name
                results.append((name, k))
                # ALIGN is what lets the compiler use vector accesses (the strides are not
                # specialised): without it every element is a separate 2- or 4-byte access.
                # With it *every* access of q, k, cos and sin is a vector (a trial with a
                # tile-uniform cos/sin row offset, session 22, compiled them to 2-byte loads):
                # 16-byte ones where a thread's share of a half-row allows (8-byte at d = 64)
                accesses = re.findall(r"\b(?:ld|st)\.global[.\w]*", k.asm["ptx"])
                vector = all(".v" in a for a in accesses) and any(
                    a.startswith("st.") for a in accesses)
                assert vector == (align > 1), (name, accesses)
                wide = d >= 128 or xdt == "fp32"
                assert align == 1 or not wide or (
                    "ld.global.v4" in k.asm["ptx"] and "st.global.v4" in k.asm["ptx"]), name
                if fence:
                    # the fence keeps the MMA-layout conversion after the RoPE: as many
                    # barriers as the same kernel without RoPE (without the fence triton
                    # converted the six RoPE inputs, measured 44 vs 20 at d = 128)
                    unfenced, no_rope = (
                        _aot_qk(d, xdt, wdt, block_m, loads_first, align, nw, r, False, stages,
                                qsplit=qsplit).asm["ptx"].count("bar.sync") for r in (True, False))
                    fenced = k.asm["ptx"].count("bar.sync")
                    assert fenced <= no_rope, (name, fenced, no_rope)
                    assert unfenced > fenced, (name, "the fence no longer changes the code",
                                               unfenced, fenced)
        from hf_hadamard_kq.ops import kv_store

        for dt, dk, dv in (("bf16", 128, 128), ("fp32", 64, 96)):
            sig = {n: ty[dt] for n in ("k_ptr", "v_ptr", "keys_ptr", "values_ptr")}
            sig["start_ptr"] = "*i64"
            bdk, bdv = 1 << (dk - 1).bit_length(), 1 << (dv - 1).bit_length()
            const = dict(DK=dk, DV=dv, BLOCK_DK=bdk, BLOCK_DV=bdv, BLOCK_MK=2048 // bdk,
                         BLOCK_MV=2048 // bdv)
            k = _aot_compile(kv_store._kv_store_kernel, sig, const, 4, aligned_ptrs=True)
            results.append((f"kv_store {dt} DK={dk} DV={dv}", k))
        for name, k in results:
            assert k.metadata.shared <= SMEM_LIMIT_SM90, (name, k.metadata.shared)
            spill = _local_bytes(k.asm["cubin"])
            assert not spill, f"{name}: {spill} bytes of local memory (register spills)"

else:
    triton = pytest.importorskip("triton")
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    def _load_kernel_module() -> ModuleType:
        spec = importlib.util.spec_from_file_location("_hkq_triton_kernel", KERNEL_FILE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    tk = _load_kernel_module()

    DTYPES = [torch.float16, torch.bfloat16, torch.float32]
    DENSE_REF_MAX = 4096

    @functools.cache
    def ct_sylvester(n: int) -> torch.Tensor:
        """compressed-tensors' unnormalised Sylvester matrix, float64."""
        return deterministic_hadamard_matrix(n, torch.float64)

    def popcount_sylvester(n: int) -> torch.Tensor:
        idx = torch.arange(n)
        bits = idx[:, None] & idx[None, :]
        parity = torch.zeros_like(bits)
        while bool(bits.any()):
            parity ^= bits & 1
            bits >>= 1
        return (1 - 2 * parity).to(torch.float64)

    def fwht(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Unnormalised Walsh-Hadamard transform of the last dim (natural order) in ``dtype``."""
        y = x.to(dtype)
        n = y.shape[-1]
        lead = y.shape[:-1]
        h = 1
        while h < n:
            v = y.reshape(*lead, n // (2 * h), 2, h)
            a, b = v[..., 0, :], v[..., 1, :]
            y = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
            h *= 2
        return y

    def reference(
        x: torch.Tensor, block: int, matrix: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        """float64 ``x_chunk @ W * scale`` per chunk of ``block`` along the last dim."""
        d = x.shape[-1]
        xs = x.to(torch.float64).reshape(*x.shape[:-1], d // block, block)
        if matrix is not None:
            y = xs @ matrix.to(torch.float64)
        elif block <= DENSE_REF_MAX:
            y = xs @ ct_sylvester(block)
        else:
            y = fwht(xs)
        return (y * scale).reshape(x.shape)

    def torch_same_precision(
        x: torch.Tensor, block: int, matrix: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        """The computation torch would do in the kernel's precision: fp32 matmul, one rounding."""
        d = x.shape[-1]
        xs = x.to(torch.float32).reshape(*x.shape[:-1], d // block, block)
        if matrix is not None:
            y = xs @ matrix.to(torch.float32)
        elif block <= DENSE_REF_MAX:
            y = xs @ ct_sylvester(block).to(torch.float32)
        else:
            # the same Kronecker split as the kernel: H_m X H_b with fp32 matmuls
            b, m = tk._plan_passes(block)
            xk = xs.reshape(*xs.shape[:-1], m, b)
            hm, hb = ct_sylvester(m).to(torch.float32), ct_sylvester(b).to(torch.float32)
            y = (hm @ (xk @ hb)).reshape(xs.shape)
        return (y * scale).to(x.dtype).reshape(x.shape)

    def assert_matches(
        out: torch.Tensor,
        x: torch.Tensor,
        block: int,
        matrix: torch.Tensor | None,
        scale: float,
    ) -> None:
        """Tolerance idiom: err(ours) <= 2 * err(torch, same precision) + atol (module doc)."""
        assert out.shape == x.shape and out.dtype == x.dtype
        if out.numel() == 0:
            return
        ref = reference(x, block, matrix, scale)
        ours = (out.to(torch.float64) - ref).abs().max().item()
        base = (torch_same_precision(x, block, matrix, scale).to(torch.float64) - ref).abs()
        if x.dtype == torch.float32:
            atol = torch.finfo(x.dtype).eps * ref.abs().max().item()
        else:
            atol = torch.finfo(x.dtype).tiny
        bound = 2 * base.max().item() + atol
        assert math.isfinite(ours) and ours <= bound, (
            f"{x.dtype} block={block}: max error {ours:.3g} > bound {bound:.3g}"
        )

    def rand(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)

    def ids(v: object) -> str:
        return str(v).replace("torch.", "")

    # ------------------------------------------------------------------------------------------

    def test_runs_interpreted() -> None:
        assert tk.INTERPRET and tk.triton_available()
        assert isinstance(tk._rows_kernel, triton.runtime.interpreter.InterpretedFunction)

    @pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 64, 256, 1024])
    def test_reference_matrix_is_popcount_sylvester(n: int) -> None:
        w = ct_sylvester(n)
        assert torch.equal(w, popcount_sylvester(n))
        x = rand(3, n, dtype=torch.float64)
        torch.testing.assert_close(fwht(x), x @ w, rtol=0, atol=1e-9)

    SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]

    @pytest.mark.parametrize("dtype", DTYPES, ids=ids)
    @pytest.mark.parametrize("n", SIZES)
    def test_sylvester_sizes(n: int, dtype: torch.dtype) -> None:
        d = max(n, 64)  # block-diagonal when n < 64
        rows = 37 if n <= 256 else 5  # not a multiple of any BLOCK_M
        x = rand(rows, d, dtype=dtype, seed=n) * 3
        scale = 1 / math.sqrt(n)
        out = tk.hadamard_triton(x, scale, None, n)
        assert_matches(out, x, n, None, scale)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=ids)
    def test_sylvester_largest_block(dtype: torch.dtype) -> None:
        n = tk.MAX_SYLVESTER
        x = rand(2, n, dtype=dtype, seed=7)
        out = tk.hadamard_triton(x, n**-0.5, None, n)
        assert_matches(out, x, n, None, n**-0.5)

    @pytest.mark.parametrize("dtype", DTYPES, ids=ids)
    @pytest.mark.parametrize(
        ("shape", "block"),
        [
            ((3, 5, 64), 16),
            ((2, 3, 5, 128), 32),
            ((2, 4, 3, 64), 64),
            ((1, 32, 1, 128), 128),  # decode-shaped
            ((2, 2, 7, 96), 32),
            ((3, 1024), 512),  # two blocks of the two-pass path
            ((4, 24), 8),  # n < 16: padded tile
        ],
    )
    def test_shapes_and_block_diagonal(
        shape: tuple[int, ...], block: int, dtype: torch.dtype
    ) -> None:
        x = rand(*shape, dtype=dtype, seed=len(shape) + block)
        out = tk.hadamard_triton(x, 0.5, None, block)
        assert_matches(out, x, block, None, 0.5)

    @pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64), (3, 0), (0, 4, 1024)])
    def test_zero_size(shape: tuple[int, ...]) -> None:
        x = torch.empty(shape, dtype=torch.float16)
        block = 16 if shape[-1] in (0, 64) else 1024
        out = tk.hadamard_triton(x, 1.0, None, block)
        assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()

    def _views(dtype: torch.dtype, d: int) -> dict[str, torch.Tensor]:
        base = rand(2, 5, 3, d, dtype=dtype, seed=d)
        wide = rand(4, 6, 2 * d, dtype=dtype, seed=d + 1)
        return {
            # prefill layout: (B, S, H, d) -> (B, H, S, d): dense, permuted (strided path)
            "transposed": base.transpose(1, 2),
            # a slice of a wider last dim: rows at stride 2d
            "last_dim_slice": wide[..., d:],
            # three non-collapsible leading dims
            "three_levels": base[:, 1:4, ::2],
            # four non-collapsible leading dims: contiguous fallback
            "four_levels": rand(3, 4, 5, 3, d, dtype=dtype, seed=2)[:, 1:3, 1:4, ::2],
            # last dim not innermost: contiguous fallback
            "last_dim_strided": rand(d, 6, dtype=dtype, seed=3).t(),
            # broadcast (stride 0) leading dim
            "expanded": rand(1, 3, d, dtype=dtype, seed=4).expand(4, 3, d),
        }

    @pytest.mark.parametrize("dtype", DTYPES, ids=ids)
    @pytest.mark.parametrize("block", [8, 16, 64, 512])
    @pytest.mark.parametrize(
        "view",
        [
            "transposed",
            "last_dim_slice",
            "three_levels",
            "four_levels",
            "last_dim_strided",
            "expanded",
        ],
    )
    def test_non_contiguous(view: str, block: int, dtype: torch.dtype) -> None:
        d = max(block, 64)
        x = _views(dtype, d)[view]
        assert not x.is_contiguous()
        expect_strided = view in ("transposed", "last_dim_slice", "three_levels", "expanded")
        assert (tk._row_layout(x) is not None) == expect_strided
        before = x.clone()
        out = tk.hadamard_triton(x, 1 / math.sqrt(block), None, block)
        assert out.is_contiguous()
        assert torch.equal(x, before)
        assert_matches(out, x, block, None, 1 / math.sqrt(block))
        # identical to the contiguous path, bit for bit
        ref = tk.hadamard_triton(x.contiguous(), 1 / math.sqrt(block), None, block)
        assert torch.equal(out, ref)

    @pytest.mark.parametrize("block", [16, 128, 1024])
    def test_strided_int64_index_math(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
        """The WIDE (int64) strided variant, forced: real >= 2**31 offsets don't fit a test."""
        monkeypatch.setattr(tk, "_WIDE_OFFSETS", 0)
        x = _views(torch.float16, max(block, 64))["three_levels"]
        out = tk.hadamard_triton(x, 0.5, None, block)
        assert_matches(out, x, block, None, 0.5)

    def _permuted(perm: tuple[int, ...], shape: tuple[int, ...], d: int, seed: int):
        """A dense tensor of logical shape ``shape + (d,)`` whose memory order is ``perm``
        (a permutation of the leading dims): what a model's ``.view(...).transpose(...)``
        gives."""
        mem_shape = tuple(shape[i] for i in perm) + (d,)
        base = rand(*mem_shape, dtype=torch.float16, seed=seed)
        inverse = [perm.index(i) for i in range(len(perm))] + [len(perm)]
        return base.permute(*inverse)

    def test_dense_layout_addresses_the_output_in_memory_order() -> None:
        """Which inputs are read in memory order (STRIDED_OUT), and the output offsets of
        their rows: the decode/prefill projection view, other dense permutations; None for
        contiguous, gapped, overlapping or broadcast inputs and a strided last dim."""
        x = rand(2, 5, 3, 64, dtype=torch.float16).transpose(1, 2)  # (B, S, H, d) -> (B, H, S, d)
        layout = tk._dense_layout(x)
        # memory order (b, s, h); the contiguous output's strides are (3*5*64, 5*64, 64)
        assert type(layout) is tk._OutRows and tuple(layout) == (5, 3, 3 * 5 * 64, 64, 5 * 64)
        # never equal to the plain tuple that would address x with the same values
        assert layout != tuple(layout) and hash(layout) != hash(tuple(layout))
        assert layout == tk._OutRows(tuple(layout))
        one_token = rand(1, 1, 32, 128, dtype=torch.float16).transpose(1, 2)  # decode, T = 1
        assert tk._dense_layout(one_token) is None  # size-1 dims: effectively contiguous
        for not_dense in ("last_dim_slice", "three_levels", "four_levels", "last_dim_strided",
                          "expanded"):
            assert tk._dense_layout(_views(torch.float16, 64)[not_dense]) is None, not_dense
        assert tk._dense_layout(rand(4, 64, dtype=torch.float16)) is None
        # four leading dims in an order that does not collapse to three
        assert tk._dense_layout(_permuted((3, 1, 0, 2), (2, 3, 4, 5), 16, 0)) is None

    @pytest.mark.parametrize("block", [16, 64, 512])
    @pytest.mark.parametrize(
        "perm,shape",
        [((0, 2, 1), (2, 5, 3)), ((1, 0), (3, 7)), ((2, 0, 1), (3, 4, 5)),
         ((0, 2, 1, 3), (2, 3, 4, 1))],
    )
    def test_dense_permuted_input_read_in_memory_order(perm, shape, block: int,
                                                       monkeypatch) -> None:
        """Dense inputs whose memory order is a permutation of their dims take the
        STRIDED_OUT form (x read flat, output rows scattered): the float64 rotation, bit for
        bit the contiguous path's result, a contiguous output, x untouched; also with int64
        offsets (WIDE, forced) and through the two-pass path (block 512)."""
        d = max(block, 64)
        x = _permuted(perm, shape, d, seed=block + len(shape))
        layout = tk._dense_layout(x)
        assert not x.is_contiguous() and type(layout) is tk._OutRows
        plan = tk._rows_plan(x, x, x.dtype, min(block, tk.MAX_ONE_PASS), True, False, layout)
        assert plan.meta["STRIDED"] and plan.meta["STRIDED_OUT"]
        before = x.clone()
        ref = tk.hadamard_triton(x.contiguous(), block**-0.5, None, block)
        for wide in (False, True):
            if wide:
                monkeypatch.setattr(tk, "_WIDE_OFFSETS", 0)
            monkeypatch.setattr(tk, "_ROW_PLANS", {})
            out = tk.hadamard_triton(x, block**-0.5, None, block)
            assert out.is_contiguous() and torch.equal(x, before)
            assert_matches(out, x, block, None, block**-0.5)
            assert torch.equal(out, ref)

    @pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
    @pytest.mark.parametrize("d", [64, 128, 256])
    def test_whole_rows(d: int, layout: str) -> None:
        """Decode-sized split forms with 32-wide parts (d = 64: H_2 ⊗ H_32, d = 128:
        H_4 ⊗ H_32, d = 256: H_8 ⊗ H_32) load and store whole rows (``WHOLE_ROWS``), prefill
        sizes (d = 256: H_4 ⊗ H_64) part by part; the whole-row form is bit for bit the
        part-wise one where that exists (``SPLIT8`` has none), and every form matches the
        float64 rotation, in the three addressings (flat, STRIDED_OUT, strided)."""
        for tokens in (1, 5, 200):
            base = rand(1, tokens, 12, d, dtype=torch.float16, seed=d + tokens)
            x = {"contiguous": base, "transposed": base.transpose(1, 2),
                 "sliced": base[:, :, 2:9].transpose(1, 2)}[layout]
            layout_arg = (None if x.is_contiguous() else
                          tk._dense_layout(x) or tk._row_layout(x))
            assert (layout_arg is None) == (layout == "contiguous" or tokens == 1)
            plan = tk._rows_plan(x, x, x.dtype, d, True, False, layout_arg)
            small = x.numel() // d <= tk.SMALL_ROWS
            assert plan.meta["WHOLE_ROWS"] == small, (d, tokens, plan.meta)
            assert plan.meta["SPLIT8"] == (small and d == 256), (d, tokens, plan.meta)
            outs = []
            for whole in (True, False) if not plan.meta["SPLIT8"] else (True,):
                out = torch.empty(x.shape, dtype=x.dtype)  # every addressing: contiguous out
                meta = dict(plan.meta, WHOLE_ROWS=whole and plan.meta["WHOLE_ROWS"])
                tk._rows_kernel[(plan.grid,)](x, x, out, *plan.scalars, d**-0.5, **meta,
                                              num_warps=plan.num_warps)
                outs.append(out)
            assert_matches(outs[0], x, d, None, d**-0.5)
            if len(outs) == 2:  # SPLIT8 has no part-wise form to compare with
                assert torch.equal(outs[0], outs[1])

    def test_dense_permuted_input_with_an_explicit_matrix() -> None:
        """The explicit-matrix kernel forms (a resident W, and W wider than 128 in sub-tiles)
        read a transposed input in memory order too, exactly."""
        for block in (96, 160):
            g = torch.Generator().manual_seed(block)
            w = torch.randn(block, block, generator=g)
            x = rand(2, 5, 3, block, dtype=torch.float16, seed=block).transpose(1, 2)
            assert type(tk._dense_layout(x)) is tk._OutRows
            out = tk.hadamard_triton(x, 0.5, w, block)
            assert_matches(out, x, block, w, 0.5)
            assert torch.equal(out, tk.hadamard_triton(x.contiguous(), 0.5, w, block))

    @pytest.mark.parametrize("dtype", DTYPES, ids=ids)
    @pytest.mark.parametrize("block", [4, 16, 80, 96, 160, 256])
    @pytest.mark.parametrize("scale", [1.0, 0.3, None])
    def test_explicit_fp32_matrix(block: int, scale: float | None, dtype: torch.dtype) -> None:
        g = torch.Generator().manual_seed(block)
        w = torch.randn(block, block, generator=g)
        scale = 1 / math.sqrt(block) if scale is None else scale
        x = rand(2, 9, 2 * block, dtype=dtype, seed=block)
        out = tk.hadamard_triton(x, scale, w, block)
        assert_matches(out, x, block, w, scale)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=ids)
    @pytest.mark.parametrize("block", [16, 96, 128])
    def test_explicit_16bit_matrix(block: int, dtype: torch.dtype) -> None:
        g = torch.Generator().manual_seed(block)
        w = torch.randn(block, block, generator=g).to(dtype)  # used as a 16-bit dot operand
        x = rand(3, 4, block, dtype=dtype, seed=block).transpose(0, 1)
        out = tk.hadamard_triton(x, 0.25, w, block)
        assert_matches(out, x, block, w, 0.25)

    @pytest.mark.parametrize(
        ("xdtype", "wdtype"),
        [
            (torch.float16, torch.bfloat16),
            (torch.bfloat16, torch.float16),
            (torch.float32, torch.float16),
            (torch.float16, torch.float64),
        ],
        ids=ids,
    )
    def test_explicit_mixed_dtypes_use_fp32(xdtype: torch.dtype, wdtype: torch.dtype) -> None:
        g = torch.Generator().manual_seed(1)
        w = torch.randn(32, 32, generator=g).to(wdtype)
        x = rand(5, 64, dtype=xdtype, seed=1)
        out = tk.hadamard_triton(x, 0.5, w, 32)
        assert_matches(out, x, 32, w.to(torch.float32), 0.5)

    def test_non_contiguous_matrix() -> None:
        g = torch.Generator().manual_seed(2)
        w = torch.randn(32, 32, generator=g)
        x = rand(6, 32, dtype=torch.float32, seed=2)
        out = tk.hadamard_triton(x, 1.0, w.t(), 32)
        assert_matches(out, x, 32, w.t(), 1.0)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=ids)
    @pytest.mark.parametrize("n", [8, 64, 256])
    def test_loaded_sylvester_equals_generated(n: int, dtype: torch.dtype) -> None:
        """The in-kernel ±1 tile and a loaded 16-bit Sylvester matrix give identical bits."""
        x = rand(33, n, dtype=dtype, seed=n)
        gen = tk.hadamard_triton(x, n**-0.5, None, n)
        loaded = tk.hadamard_triton(x, n**-0.5, ct_sylvester(n).to(dtype), n)
        assert torch.equal(gen, loaded)

    @pytest.mark.parametrize("dtype", DTYPES, ids=ids)
    def test_new_tensor_shape_dtype(dtype: torch.dtype) -> None:
        x = rand(2, 3, 4, 128, dtype=dtype)
        before = x.clone()
        out = tk.hadamard_triton(x, 1.0, None, 128)
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
        assert out.data_ptr() != x.data_ptr()
        assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        assert torch.equal(x, before)
        # involution: H (H x) / n == x, exactly for small integers
        xi = torch.randint(-8, 8, (4, 128)).to(dtype)
        twice = tk.hadamard_triton(tk.hadamard_triton(xi, 1.0, None, 128), 1 / 128, None, 128)
        assert torch.equal(twice, xi)

    def test_scale_applied_after_fp32_accumulation() -> None:
        """scale folds into nothing: fp16 sums beyond 65504 before scaling must not overflow."""
        x = torch.full((2, 256), 1000.0, dtype=torch.float16)
        out = tk.hadamard_triton(x, 1 / 256, None, 256)  # row sum 256000 > fp16 max
        assert torch.equal(out[:, 0], torch.full((2,), 1000.0, dtype=torch.float16))
        assert torch.equal(out[:, 1:], torch.zeros(2, 255, dtype=torch.float16))

    @pytest.mark.parametrize("dtype", DTYPES, ids=ids)
    @pytest.mark.parametrize("scale", [1 + 2**-8, 1 + 2**-11, 0.7])
    def test_final_rounding_is_round_to_nearest_even(scale: float, dtype: torch.dtype) -> None:
        """block 1 is ``x * scale`` in fp32, rounded once: bit-identical to torch, ties included.

        ``1 + 2**-8`` makes every bf16 product an exact tie, ``1 + 2**-11`` every fp16 one.
        """
        x = rand(64, 32, dtype=dtype, seed=5)
        out = tk.hadamard_triton(x, scale, None, 1)
        expected = (x.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)).to(dtype)
        assert torch.equal(out, expected)

    @pytest.mark.parametrize(
        ("block", "matrix_size"),
        [(4, None), (8, 8), (80, 80), (256, None), (160, 160), (512, None)],
    )
    def test_non_finite_stays_in_its_chunk(block: int, matrix_size: int | None) -> None:
        """inf/NaN in one chunk must not leak into other chunks (0 * inf = NaN in a dot)."""
        w = None
        if matrix_size is not None:
            w = torch.randn(matrix_size, matrix_size, generator=torch.Generator().manual_seed(0))
        x = rand(6, 4 * block, dtype=torch.float16, seed=block)
        x[2, block + 1] = float("inf")
        x[4, 2 * block] = float("nan")
        out = tk.hadamard_triton(x, 1.0, w, block)
        bad = torch.zeros(6, 4, dtype=torch.bool)
        bad[2, 1] = bad[4, 2] = True
        finite = out.reshape(6, 4, block).isfinite().all(dim=-1)
        assert torch.equal(finite, ~bad)
        clean = x.clone()
        clean[2, block + 1] = clean[4, 2 * block] = 0
        ref = tk.hadamard_triton(clean, 1.0, w, block).reshape(6, 4, block)
        assert torch.equal(out.reshape(6, 4, block)[~bad], ref[~bad])

    def test_errors() -> None:
        x = rand(2, 64, dtype=torch.float16)
        with pytest.raises(ValueError):
            tk.hadamard_triton(x, 1.0, None, 48)  # not a power of two
        with pytest.raises(ValueError):
            tk.hadamard_triton(x, 1.0, None, 128)  # not a divisor of d
        with pytest.raises(ValueError):
            tk.hadamard_triton(x, 1.0, torch.eye(16), 32)  # matrix shape mismatch
        with pytest.raises(ValueError):
            tk.hadamard_triton(rand(2, 512, dtype=torch.float16), 1.0, torch.eye(512), 512)
        with pytest.raises(TypeError):
            tk.hadamard_triton(x.double(), 1.0, None, 16)

    def test_interpreter_bf16_workaround_is_needed() -> None:
        """Canary for the interpreter bug the kernel works around (module docstring).

        If this starts failing, triton fixed bf16 ``tl.dot`` in the interpreter and the
        ``INTERPRET`` upcast in ``hadamard_triton`` can go.
        """
        x = rand(16, 64, dtype=torch.bfloat16, seed=3)
        raw = torch.empty_like(x)
        tk._run(x, raw, x, 0.125, 64, True, False, tk._FLAT)  # bf16 dot operands, no upcast
        err = (raw.to(torch.float64) - reference(x, 64, None, 0.125)).abs().max().item()
        assert not err < 0.1

    @pytest.mark.parametrize("rows", [37, 350])  # 222 and 2100 chunks: both size classes
    @pytest.mark.parametrize(
        ("n", "bn"),
        [(32, 32), (32, 16), (64, 64), (64, 32), (64, 16), (128, 128), (128, 64), (128, 32),
         (128, 16), (256, 128), (256, 64), (256, 32)],
    )
    def test_tuned_tilings(n: int, bn: int, rows: int, monkeypatch) -> None:
        """Every tiling the measured table can select (TUNED_16BIT: a resident H_n, or the
        SPLIT2 / SPLIT4 / SPLIT8 forms with bn = n / 2, n / 4, n / 8; grid bounded or one
        program per tile) is
        exact, in both size classes and through the strided (projection-view) layout."""
        small = rows * 6 <= tk.SMALL_ROWS  # x below has rows * 3 * 2 chunks of n
        # one program per tile (small), or the persistent loop: 4 interpreter programs (large)
        pps = 0 if small else 1
        stages = 1 if small else 3  # pipelining depth: carried to the launch (the
        # interpreter itself ignores it)
        monkeypatch.setitem(tk.TUNED_16BIT, (n, small), (bn, 16, 4, pps, stages))
        tk.rows_config.cache_clear()
        try:
            cfg = tk.rows_config(n, False, True, small)
            assert (cfg.bn, cfg.nb, cfg.programs_per_sm, cfg.num_stages) == (
                bn, n // bn, pps, stages)
            x = rand(rows, 3, 2 * n, dtype=torch.float16, seed=n + rows) * 3
            for view in (x, x.transpose(0, 1)):
                layout = None if view.is_contiguous() else tk._row_layout(view)
                plan = tk._rows_plan(view, view, view.dtype, n, True, False, layout)
                assert (plan.meta["BN"], plan.meta["BLOCK_M"], plan.num_stages) == (
                    bn, 16, stages)  # the entry is used
                # one tile per program (small: a program per tile): W is built after the loads;
                # the persistent loop (4 interpreter programs, more tiles) builds it once before
                assert plan.meta["LOADS_FIRST"] == small
                out = tk.hadamard_triton(view, n**-0.5, None, n)
                assert_matches(out, view, n, None, n**-0.5)
        finally:
            monkeypatch.delitem(tk.TUNED_16BIT, (n, small))
            tk.rows_config.cache_clear()

    def test_medium_size_class(monkeypatch) -> None:
        """Calls whose chunk count is in MEDIUM_ROWS take TUNED_16BIT_MEDIUM's tiling (d = 256:
        32-row tiles, persistent grid), exactly; blocks without a medium entry, and calls
        outside the band, keep the large class's tiling. The band is narrowed here so that the
        interpreter runs it on small tensors."""
        monkeypatch.setattr(tk, "MEDIUM_ROWS", (200, 300))
        monkeypatch.setattr(tk, "_ROW_PLANS", {})
        tk.rows_config.cache_clear()
        try:
            assert tk.rows_config(256, False, True, False, True) == tk.RowsConfig(
                *(64, 4, 32, 4, 8, 4, 3))  # the medium table: depth 3
            assert tk.rows_config(128, False, True, False, True) == tk.rows_config(128, False, True)
            assert tk.rows_config(256, True, True, False, True) == tk.rows_config(256, True, True)
            for rows, block_m in ((240, 32), (180, 16), (320, 16)):  # in / below / above band
                x = rand(rows // 2, 2, 256, dtype=torch.float16, seed=rows) * 3
                for view in (x, x.transpose(0, 1)):
                    layout = None if view.is_contiguous() else tk._row_layout(view)
                    plan = tk._rows_plan(view, view, view.dtype, 256, True, False, layout)
                    assert plan.meta["BLOCK_M"] == block_m, rows
                    out = tk.hadamard_triton(view, 256**-0.5, None, 256)
                    assert_matches(out, view, 256, None, 256**-0.5)
        finally:
            tk.rows_config.cache_clear()

    def test_row_plan_cache(monkeypatch) -> None:
        """The per-layout plan cache (decode host cost): a repeated layout skips validation and
        planning but launches exactly what the first call did; another layout (strides,
        dtype, size class) gets its own plan, and every result is the float64 rotation."""
        launches = []

        class Recording:  # stands in for the CUDA launcher; runs the kernel interpreted
            int_key = staticmethod(lambda scalars: tuple(type(v).__name__ for v in scalars))

            def launch(self, grid, key, device, tensors, scalars, meta, num_warps, int_key,
                       num_stages, pdl=False):
                assert not pdl and not meta["PDL"]  # never under the interpreter
                launches.append((grid, key, scalars, tuple(meta.items()), num_warps, int_key,
                                 num_stages))
                tk._rows_kernel[(grid,)](*tensors, *scalars, **meta, num_warps=num_warps,
                                         num_stages=num_stages)

        monkeypatch.setattr(tk, "_ROWS", Recording())
        monkeypatch.setattr(tk, "_ROW_PLANS", {})
        monkeypatch.setattr(torch.cuda, "current_device", lambda: -1)  # CPU "device" here
        built = []
        make_plan = tk._rows_plan
        monkeypatch.setattr(tk, "_rows_plan", lambda *a: built.append(make_plan(*a)) or built[-1])
        base = rand(3, 40, 2, 128, dtype=torch.float16, seed=5)
        views = [base, base.transpose(1, 2), base[:, :5].transpose(1, 2),
                 rand(2, 1100, 128, dtype=torch.float16, seed=6),  # 2200 rows: large class
                 base.float()]  # another dtype, same shape and strides
        for i, view in enumerate(views):
            for _ in range(2):
                out = tk.hadamard_triton(view, 128**-0.5, None, 128)
                assert_matches(out, view, 128, None, 128**-0.5)
            assert len(built) == i + 1  # the repeat was launched from the cached plan
            assert launches[-1] == launches[-2]
        assert len(tk._ROW_PLANS) == len(views)
        plans = list(tk._ROW_PLANS.values())
        assert plans == built
        assert [p.meta["STRIDED"] for p in plans] == [False, True, True, False, False]
        assert plans[-1].meta["DOT_F32"] and not plans[0].meta["DOT_F32"]
        # another current device does not take the plan (the slow path re-plans under
        # torch.cuda.device in real use; here only the lookup is checked)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(tk, "_dispatch", lambda *a: built.append("dispatched"))
        tk.hadamard_triton(base, 128**-0.5, None, 128)
        assert built[-1] == "dispatched"
        assert plans[0].key != plans[-1].key  # both flat: 240 rows (small) vs 2200 (large)
        # a matrix, or a block the plan was not made for, does not take a cached plan
        monkeypatch.undo()  # the real _dispatch / current_device / _rows_plan again
        monkeypatch.setattr(tk, "_ROWS", Recording())
        monkeypatch.setattr(tk, "_ROW_PLANS", {})
        monkeypatch.setattr(torch.cuda, "current_device", lambda: -1)
        tk.hadamard_triton(base, 1.0, None, 64)
        assert len(tk._ROW_PLANS) == 1
        w = torch.eye(128, dtype=torch.float16)
        out = tk.hadamard_triton(base, 1.0, w, 128)
        assert torch.equal(out, base) and len(tk._ROW_PLANS) == 1

    def test_launch_configs() -> None:
        for n in [1, 2, 4, 8, 16, 32, 64, 80, 96, 128, 160, 192, 256]:
            for dot_f32 in (False, True):
                for sylvester in (False, True):
                    for small, medium in ((False, False), (True, False), (False, True)):
                        cfg = tk.rows_config(n, dot_f32, sylvester, small, medium)
                        np2 = cfg.bn * cfg.nb
                        assert np2 >= 16 and np2 >= n and cfg.bn >= 16
                        assert cfg.bn <= 128 and np2 == max(16, 1 << (n - 1).bit_length())
                        assert 16 <= cfg.block_m <= 256 and cfg.num_warps in (2, 4, 8)
                        assert cfg.programs_per_sm >= 0
        for m in (16, 32, 64, 128):
            mcfg = tk.mid_config(m, 256)
            assert 16 <= mcfg.block_i <= 128 and mcfg.num_warps in (4, 8)
        for k in range(9, 16):
            b, m = tk._plan_passes(1 << k)
            assert b * m == 1 << k and 32 <= b <= 256 and 16 <= m <= 128

    # ------------------------------------------------------------------------------------------
    # The fused Q/K kernel (hf_hadamard_kq/ops/qk_kernel.py): RoPE + Hadamard, one launch.

    from tests.reference import rope_once as torch_rope

    def qk_inputs(dtype, d, b, s, layout, seed=0):
        """q (b, 4, s, d), k (b, 2, s, d) in a model's layouts; cos/sin (b or 1, s, d)."""
        g = torch.Generator().manual_seed(seed)
        if layout == "transposed":  # (B, S, H, D).transpose(1, 2), the projection's view
            q = torch.randn(b, s, 4, d, generator=g).to(dtype).transpose(1, 2)
            k = torch.randn(b, s, 2, d, generator=g).to(dtype).transpose(1, 2)
        elif layout == "contiguous":
            q = torch.randn(b, 4, s, d, generator=g).to(dtype)
            k = torch.randn(b, 2, s, d, generator=g).to(dtype)
        elif layout == "sliced":  # heads of a fused qkv projection, rows longer than d
            qkv = torch.randn(b, s, 8, d, generator=g).to(dtype)
            q, k = qkv[:, :, :4].transpose(1, 2), qkv[:, :, 4:6].transpose(1, 2)
        else:  # "padded": heads d + 2 apart, so rows are not 16-byte aligned (ALIGN = 1)
            qkv = torch.randn(b, s, 8, d + 2, generator=g).to(dtype)[..., :d]
            q, k = qkv[:, :, :4].transpose(1, 2), qkv[:, :, 4:6].transpose(1, 2)
        angle = torch.randn(1 if b == 1 else b, s, d // 2, generator=g) * 3
        cos = torch.cat([angle.cos(), angle.sin() * 0.5 + 0.3], -1).to(dtype)  # halves differ
        sin = torch.cat([angle.sin(), angle.cos() * 0.7], -1).to(dtype)
        return q, k, cos, sin

    def signed_permutation(d: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        h = ct_sylvester(d)[torch.randperm(d, generator=g)]
        return h * (torch.randint(0, 2, (d, 1), generator=g) * 2 - 1)

    @pytest.mark.parametrize("layout", ["transposed", "contiguous", "sliced", "padded"])
    @pytest.mark.parametrize("d", [32, 64, 128, 256])
    @pytest.mark.parametrize("dtype", DTYPES, ids=ids)
    def test_qk_rope_sylvester(dtype: torch.dtype, d: int, layout: str) -> None:
        from hf_hadamard_kq.ops import qk_kernel

        for b, s in ((1, 1), (2, 5), (3, 40)):
            q, k, cos, sin = qk_inputs(dtype, d, b, s, layout, seed=d + s)
            assert qk_kernel.qk_supported(q, k, None, cos, sin)
            plan = qk_kernel._make_plan(q, k, q, k, cos, 1.0, q)
            assert plan.meta["ALIGN"] == (1 if layout == "padded" else 16 // q.element_size())
            qo, ko = qk_kernel.rotate_qk(q, k, d**-0.5, None, cos, sin)
            for x, out in ((q, qo), (k, ko)):
                # reference: torch's RoPE in x.dtype (what the model computes), then float64 H
                assert_matches(out, torch_rope(x, cos, sin), d, None, d**-0.5)
                if layout in ("transposed", "contiguous"):
                    assert out.stride() == x.stride()  # the input's memory layout is kept

    @pytest.mark.parametrize("rope", [True, False])
    @pytest.mark.parametrize("layout", ["transposed", "contiguous", "padded"])
    @pytest.mark.parametrize(("d", "parts"), [(128, 2), (128, 4), (256, 2), (256, 4)])
    @pytest.mark.parametrize("dtype", DTYPES, ids=ids)
    def test_qk_split_halves(dtype: torch.dtype, d: int, parts: int, layout: str, rope: bool,
                             monkeypatch) -> None:
        """The split halves (``QSPLIT = P``: each half through ``H_P ⊗ H_{D/2P}``, split in
        registers, a ``P``-point butterfly) match the float64 rotation in every layout, with
        and without RoPE, and are taken exactly where ``QSPLIT_PARTS`` asks for them
        (Sylvester launches with 16-bit tensor-core operands, decode and prefill sizes; the
        interpreter runs bf16 through fp32 operands, so there they are launched directly)."""
        from hf_hadamard_kq.ops import qk_kernel

        monkeypatch.setattr(qk_kernel, "QSPLIT_PARTS", {d: parts})
        for b, s in ((1, 1), (2, 5)):
            q, k, cos, sin = qk_inputs(dtype, d, b, s, layout, seed=d + s)
            if not rope:
                cos = sin = None
            qo, ko = torch.empty_like(q), torch.empty_like(k)
            plan = qk_kernel._make_plan(q, k, qo, ko, cos, d**-0.5, q)
            assert plan.meta["QSPLIT"] == (1 if plan.meta["DOT_F32"] else parts), plan.meta
            big = torch.empty(1, 4, tk.SMALL_ROWS // 4 + 1, d, dtype=dtype)  # prefill-sized
            assert qk_kernel._make_plan(big, q, big, qo, None, 1.0, big).meta["QSPLIT"] == (
                plan.meta["QSPLIT"])
            monkeypatch.setattr(qk_kernel, "QSPLIT_PARTS", {})
            assert qk_kernel._make_plan(big, q, big, qo, None, 1.0, big).meta["QSPLIT"] == 1
            monkeypatch.setattr(qk_kernel, "QSPLIT_PARTS", {d: parts})
            eye = torch.eye(d, dtype=dtype)  # an explicit matrix never takes it
            assert qk_kernel._make_plan(q, k, qo, ko, cos, 1.0, eye).meta["QSPLIT"] == 1
            meta = dict(plan.meta, QSPLIT=parts)
            c, sn = (q, q) if cos is None else (cos, sin)
            qk_kernel._qk_kernel[(plan.grid,)](q, k, qo, ko, c, sn, q, *plan.scalars, **meta,
                                               num_warps=plan.num_warps)
            for x, out in ((q, qo), (k, ko)):
                assert_matches(out, x if cos is None else torch_rope(x, cos, sin), d, None,
                               d**-0.5)

    def test_qk_split_parts_are_checked(monkeypatch) -> None:
        """A ``QSPLIT_PARTS`` entry the kernel cannot take (parts narrower than 16, or not
        1, 2 or 4) is refused when the plan is made, naming the table and the head dim."""
        from hf_hadamard_kq.ops import qk_kernel

        q, k, cos, _ = qk_inputs(torch.float16, 64, 1, 1, "contiguous")
        for table in ({64: 4}, {64: 3}):
            monkeypatch.setattr(qk_kernel, "QSPLIT_PARTS", table)
            with pytest.raises(ValueError, match=r"QSPLIT_PARTS\[64\]"):
                qk_kernel._make_plan(q, k, q, k, cos, 1.0, q)
        monkeypatch.setattr(qk_kernel, "QSPLIT_PARTS", {64: 2})
        assert qk_kernel._make_plan(q, k, q, k, cos, 1.0, q).meta["QSPLIT"] == 2

    @pytest.mark.parametrize("d", [32, 64, 128])
    @pytest.mark.parametrize("dtype", DTYPES, ids=ids)
    def test_qk_rope_is_bit_exact(dtype: torch.dtype, d: int) -> None:
        """With W = I and scale 1 the kernel's output is its RoPE alone: bit-identical to
        the fp32 RoPE rounded once (torch's eager RoPE in x.dtype rounds three times)."""
        from hf_hadamard_kq.ops import qk_kernel

        q, k, cos, sin = qk_inputs(dtype, d, 2, 9, "transposed", seed=d)
        eye = torch.eye(d, dtype=dtype)
        qo, ko = qk_kernel.rotate_qk(q, k, 1.0, eye, cos, sin)
        assert torch.equal(qo, torch_rope(q, cos, sin))
        assert torch.equal(ko, torch_rope(k, cos, sin))
        # ...and at least as close to the exact (float64) RoPE as torch's eager RoPE in x.dtype
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        half = d // 2
        eager = q * c + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * s
        q64, c64, s64 = q.double(), c.double(), s.double()
        exact = q64 * c64 + torch.cat((-q64[..., half:], q64[..., :half]), dim=-1) * s64
        ours_err = (qo.double() - exact).abs()
        assert bool((ours_err <= (eager.double() - exact).abs()).all())

    @pytest.mark.parametrize("wdtype", ["same", torch.float32], ids=ids)
    @pytest.mark.parametrize("d", [32, 64, 128])
    @pytest.mark.parametrize("dtype", DTYPES, ids=ids)
    def test_qk_explicit_matrix(dtype: torch.dtype, d: int, wdtype) -> None:
        from hf_hadamard_kq.ops import qk_kernel

        w64 = signed_permutation(d, seed=d) @ ct_sylvester(d) / d  # orthogonal, entries != +-1
        w = w64.to(dtype if wdtype == "same" else wdtype)
        q, k, cos, sin = qk_inputs(dtype, d, 2, 7, "transposed", seed=1)
        qo, ko = qk_kernel.rotate_qk(q, k, 1.5, w, cos, sin)
        for x, out in ((q, qo), (k, ko)):
            assert_matches(out, torch_rope(x, cos, sin), d, w, 1.5)
        qo, ko = qk_kernel.rotate_qk(q, k, 1.5, w)  # no RoPE
        assert_matches(qo, q, d, w, 1.5)
        assert_matches(ko, k, d, w, 1.5)

    @pytest.mark.parametrize("d", [128, 256])
    def test_qk_tiling_follows_the_operand_type(d: int) -> None:
        """fp32 tensors take TUNED_QK_F32's tiling, 16-bit ones TUNED_QK's (also with a
        stored fp32 matrix, whose FMA tiling was not measured): on an H100 the 16-bit tiling
        ran the fp32 kernel 2x (d = 128, one token) to 45x (d = 256, 4096 tokens) slower
        (session 16). The interpreter's own fp32 dot for bf16 must not count as fp32."""
        from hf_hadamard_kq.ops import qk_kernel

        for s, decode in ((1, True), (4096, False)):
            for dtype, wdtype, fp32 in ((torch.float32, None, True),
                                        (torch.bfloat16, torch.float32, False),
                                        (torch.bfloat16, None, False),
                                        (torch.float16, None, False)):
                q, k, cos, _ = qk_inputs(dtype, d, 1, s, "contiguous", seed=0)
                w = q if wdtype is None else torch.eye(d, dtype=wdtype)
                plan = qk_kernel._make_plan(q, k, q, k, cos, 1.0, w)
                table = qk_kernel.TUNED_QK_F32 if fp32 else qk_kernel.TUNED_QK
                assert (plan.meta["BLOCK_M"], plan.num_warps) == table[decode, d][:2], \
                    (dtype, wdtype, s)
                assert plan.meta["DOT_F32"] == (fp32 or wdtype is not None
                                                or dtype is torch.bfloat16)

    def test_qk_supported_refuses() -> None:
        from hf_hadamard_kq.ops import qk_kernel

        q, k, cos, sin = qk_inputs(torch.bfloat16, 64, 2, 3, "transposed")
        assert qk_kernel.qk_supported(q, k, None, cos, sin)
        assert not qk_kernel.qk_supported(q[..., :48], k[..., :48], None, None, None)  # not 2^k
        assert not qk_kernel.qk_supported(q, k.float(), None, None, None)  # dtypes differ
        assert not qk_kernel.qk_supported(q, k, None, cos[..., :32], sin[..., :32])  # partial
        assert not qk_kernel.qk_supported(q, k, None, cos.float(), sin.float())  # promotes
        assert not qk_kernel.qk_supported(q, k[:1], None, None, None)  # batch differs
        big = torch.zeros(256, 256)
        assert not qk_kernel.qk_supported(q, k, big, None, None)  # matrix size != d
        q2, k2, _, _ = qk_inputs(torch.bfloat16, 256, 1, 1, "contiguous")
        assert not qk_kernel.qk_supported(q2, k2, torch.eye(256), None, None)  # explicit > 128
        w = torch.randn(64, 64).to(torch.bfloat16)
        assert qk_kernel.qk_supported(q, k, w, cos, sin)
        assert not qk_kernel.qk_supported(q, k, w.t(), cos, sin)  # the kernel reads W row-major
        assert qk_kernel.qk_supported(q, k, w.t().contiguous(), cos, sin)
        assert not qk_kernel.qk_supported(q, k, None, cos.to("meta"), sin.to("meta"))  # device
        wide = q[:, :1].expand(-1, 4, -1, -1)  # stride-0 heads: overlapping input
        assert not qk_kernel.qk_supported(wide, k, None, None, None)
        assert qk_kernel.try_rotate_qk(q, k, 0.125, w.t(), cos, sin) is None
        with pytest.raises(ValueError, match="not supported by the fused kernel"):
            qk_kernel.rotate_qk(q, k, 0.125, w.t(), cos, sin)

    # ------------------------------------------------------------------------------------------
    # kv_store (ops/kv_store.py): a static cache layer's key and value writes in one kernel

    def _kv_case(dtype, b, h, hv, length, s, dk, dv, layout, seed):
        g = torch.Generator().manual_seed(seed)

        def new(heads, d):
            if layout == "transposed":  # (B, S, H, D).transpose(1, 2), as the projections give
                return torch.randn(b, s, heads, d, generator=g).to(dtype).transpose(1, 2)
            return torch.randn(b, heads, s, d, generator=g).to(dtype)

        keys = torch.randn(b, h, length, dk, generator=g).to(dtype)
        values = torch.randn(b, hv, length, dv, generator=g).to(dtype)
        return keys, values, new(h, dk), new(hv, dv)

    @pytest.mark.parametrize("layout", ["contiguous", "transposed"])
    @pytest.mark.parametrize("dtype", DTYPES, ids=ids)
    def test_kv_store_equals_index_copy(dtype: torch.dtype, layout: str) -> None:
        """The kernel writes exactly what StaticLayer.update's two index_copy_ write (decode,
        prefill-sized, several batches and heads, a value head dim that is not a power of
        two, a start past 0), and nothing else of the cache."""
        from hf_hadamard_kq.ops import kv_store

        cases = [(1, 8, 8, 16, 1, 128, 128, 5), (2, 3, 3, 12, 5, 32, 48, 4),
                 (3, 2, 4, 40, 33, 64, 64, 0)]
        for i, (b, h, hv, length, s, dk, dv, start) in enumerate(cases):
            keys, values, k, v = _kv_case(dtype, b, h, hv, length, s, dk, dv, layout, seed=i)
            pos = torch.tensor(start, dtype=torch.int64)
            assert kv_store.kernel_takes(keys, values, k, v, pos)
            want_k, want_v = keys.clone(), values.clone()
            index = torch.arange(s) + start
            want_k.index_copy_(2, index, k)
            want_v.index_copy_(2, index, v)
            kv_store._launch(keys, values, k, v, pos)
            assert torch.equal(keys, want_k), (i, "keys")
            assert torch.equal(values, want_v), (i, "values")

    def test_kv_store_outside_the_cache_writes_nothing_there() -> None:
        """Positions past the cache's end, or before its start (a negative length after too
        large a ``crop``), are masked: the positions inside are written, no memory around the
        cache is touched (the cache is a view into a larger buffer)."""
        from hf_hadamard_kq.ops import kv_store

        buf = torch.zeros(2, 2, 12, 32)
        keys, values = buf[:, :, 3:9], torch.zeros(2, 2, 6, 32)
        k, v = torch.ones(2, 2, 4, 32), torch.full((2, 2, 4, 32), 2.0)
        kv_store._launch(keys, values, k, v, torch.tensor(4))
        assert bool((keys[:, :, 4:] == 1).all()) and bool((values[:, :, 4:] == 2).all())
        assert bool((keys[:, :, :4] == 0).all()) and bool((buf[:, :, 9:] == 0).all())
        keys.zero_()
        values.zero_()
        kv_store._launch(keys, values, k, v, torch.tensor(-2))
        assert bool((keys[:, :, :2] == 1).all()) and bool((values[:, :, :2] == 2).all())
        assert bool((keys[:, :, 2:] == 0).all()) and bool((buf[:, :, :3] == 0).all())

    def test_kv_store_refuses() -> None:
        from hf_hadamard_kq.ops import kv_store

        keys, values, k, v = _kv_case(torch.float32, 1, 2, 2, 8, 1, 32, 32, "contiguous", 0)
        pos = torch.tensor(3)
        assert kv_store.kernel_takes(keys, values, k, v, pos)
        assert not kv_store.kernel_takes(keys, values, k.half(), v, pos)  # dtype
        assert not kv_store.kernel_takes(keys, values, k, v, pos.int())  # int32 start
        assert not kv_store.kernel_takes(keys, values, k[:, :1], v, pos)  # heads
        assert not kv_store.kernel_takes(keys, values, k, v[..., :16], pos)  # head dim
        assert not kv_store.kernel_takes(keys, values, k[0], v, pos)  # 3-d
        assert not kv_store.kernel_takes(keys, values, k, v[:, :, :0], pos)  # lengths differ
        strided = torch.randn(1, 2, 1, 64)[..., ::2]
        assert not kv_store.kernel_takes(keys, values, strided, v, pos)  # last stride 2

