"""Tensor parallelism: ``from_pretrained(path, tp_plan="auto", attn_implementation="hadamard_kq")``
in two real processes on CPU (torch.distributed's gloo backend).

Why a real two-process run and not a simulation with split tensors: transformers 5.17 and
5.24 both support ``tp_plan="auto"`` on CPU. Their distributed init
(``transformers/distributed/utils.py``) maps the device type ``"cpu"`` to the ``gloo`` backend
and reads ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` (+ ``MASTER_ADDR``/``MASTER_PORT``) from the
environment; Llama's ``base_model_tp_plan`` shards q/k/v_proj column-wise (by head) and o_proj
row-wise, with the weights as DTensors and the activations between them as plain local
tensors. So the code under test -- our key pre-hook, cache view, attention function, stored
matrix buffers and the load probe -- runs exactly as on GPUs, only the collectives are gloo
instead of NCCL.

Why rotation commutes with head sharding: R3 rotates each head's ``head_dim`` vector by the
same matrix, so rank r, which computes kv heads ``[r*Hkv/2, (r+1)*Hkv/2)``, must cache exactly
that slice of the single-process rotated keys. The test checks this against an independent
float64 reference: the unrotated checkpoint run in one process with plain sdpa, its post-RoPE
keys sliced to the rank's heads and multiplied by the explicit normalised matrix (Sylvester from
compressed-tensors, or the stored random-Hadamard matrix of that layer).

The workers are this file run as a script (``python -m tests.test_tensor_parallel --worker``),
started as two subprocesses with the environment torchrun would set. They only load, run and
dump raw results (``torch.save``); every assertion is made here, in the pytest process.
``CUDA_VISIBLE_DEVICES`` is emptied for them so that a GPU machine also runs this test on CPU
(transformers picks the backend from the current accelerator).

``test_tp_check_script_cpu`` runs ``benchmarks/tp_check.py`` -- the multi-GPU check with
Llama-3-8B shapes -- end to end with 2 CPU ranks and a tiny model, so that script is exercised
in CI. The ``gpu``-marked tests at the end need >= 2 CUDA devices (skipped otherwise, with that
reason): ``device_map="auto"`` split over cuda:0 and cuda:1, and tp_check.py with NCCL.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":  # worker: make ``tests`` and ``hf_hadamard_kq`` importable
    sys.path.insert(0, str(ROOT))

import hf_hadamard_kq  # noqa: E402
from hf_hadamard_kq import checkpoint as ckpt  # noqa: E402
from tests import tiny_models as tm  # noqa: E402
from tests.oracles import load_unrotated, with_cache  # noqa: E402
from tests.reference import ct_hadamard  # noqa: E402

WORLD = 2
BLOCK = tm.HEAD_DIM  # 16; the tiny Llama has 4 heads / 2 kv heads, so 1 kv head per rank
NEW_TOKENS = 4
LOADERS = ("tp_plan", "distributed_config")
#: fp32: max |TP - reference| <= ATOL * max(1, max |reference|), for keys and logits.
#: Measured (transformers 5.24 and 5.17, keys up to |2.3|): TP keys differ from the float64
#: reference by <= 2.1e-7 in layer 0 and <= 4.2e-7 in layer 1 -- the same as the
#: single-process hadamard_kq run (2.1e-7 / 4.1e-7): one fp32 rounding of the rotation, plus,
#: in layer 1, the row-parallel o_proj/down_proj all-reduce summing in another order. 1e-5 is
#: the suite's fp32 tolerance (~50x the measurement); an unrotated or wrongly sliced key
#: differs by O(1) (asserted > 1e-2).
ATOL = 1e-5
TIMEOUT_S = 180


# ---------------------------------------------------------------- checkpoints (pytest process)


def _write_checkpoints(root: Path) -> dict[str, dict]:
    """Two tiny R3 checkpoints of the same weights.

    ``hadamard``: what llm-compressor writes by default (Sylvester, nothing kept at run time).
    ``random-hadamard``: one stored +-1 matrix per layer (q and k of a layer share it, so q.k^T
    is preserved; layers differ), kept as ``_hadamard_kq_q``/``_hadamard_kq_k`` buffers of each
    attention module -- the case where a per-layer tensor must reach every rank.
    """
    from compressed_tensors.transform.utils.hadamard import random_hadamard_matrix

    out = {}
    path = root / "hadamard"
    hf_hadamard_kq.save_r3_pretrained(tm.rotated("llama"), path)
    sylvester = ct_hadamard(BLOCK)
    layers = tm.COMMON["num_hidden_layers"]
    out["hadamard"] = dict(path=path, matrices=[sylvester] * layers)

    path = root / "random-hadamard"
    tm.base_model("llama").save_pretrained(path)
    gen = torch.Generator().manual_seed(11)
    mats, tensors = [], {}
    for i in range(layers):
        m = random_hadamard_matrix(BLOCK, torch.float64, torch.device("cpu"), gen)
        mats.append(m)
        for loc in ("q_attn", "k_cache"):
            tensors[f"model.layers.{i}.self_attn.R3_{loc}.weight"] = m.clone()
    assert not torch.equal(mats[0], mats[1])
    ckpt.write_r3_extras(path, hf_hadamard_kq.default_r3_config("random-hadamard", BLOCK),
                         tensors)
    out["random-hadamard"] = dict(path=path, matrices=mats)
    return out


def _single_process_reference(path: Path) -> dict:
    """Tokens and logits of the same checkpoint in one process with hadamard_kq, and the
    unrotated post-RoPE keys (plain sdpa, no hf_hadamard_kq code on the key path)."""
    from transformers import DynamicCache

    ids, mask = tm.prompt()
    ours = _load(path)
    plain = load_unrotated(path)
    with torch.no_grad():
        tokens = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                               do_sample=False, pad_token_id=0)
        logits = ours(ids, attention_mask=mask).logits
        cache = DynamicCache(config=plain.config)
        plain(ids, attention_mask=mask, **with_cache(plain, cache))
    return dict(tokens=tokens, logits=logits, keys=[layer.keys for layer in cache.layers])


def _load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        # 5.17/5.24: "Passing `tp_plan` directly to `from_pretrained` is deprecated"
        warnings.simplefilter("ignore", FutureWarning)
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation="hadamard_kq",
                                                    **kwargs)


# ---------------------------------------------------------------- worker (one per rank)


def _worker(out: Path, paths: list[str]) -> None:
    """Load each checkpoint with tensor parallelism (both spellings), record what every test
    assertion needs, and dump it to ``out/rank{r}.pt``."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers import DistributedConfig, DynamicCache

    ids, mask = tm.prompt()
    results: dict = {}
    for path in paths:
        for loader in LOADERS:
            if loader == "tp_plan":
                model = _load(path, tp_plan="auto")
            else:
                model = _load(path, distributed_config=DistributedConfig(tp_plan="auto"))
            rank = dist.get_rank()  # initialised by transformers from the environment
            rec: dict = {"world": dist.get_world_size(), "backend": dist.get_backend()}
            attn = [layer.self_attn for layer in model.model.layers]
            w = attn[0].k_proj.weight
            rec["k_proj_is_dtensor"] = isinstance(w, DTensor)
            rec["k_proj_local_rows"] = (w.to_local() if isinstance(w, DTensor) else w).shape[0]
            rec["buffers"] = [
                {n: (type(b).__name__, str(b.device), b.detach().clone())
                 for n, b in a.named_buffers(recurse=False) if n.startswith("_hadamard_kq_")}
                for a in attn
            ]
            rec["rotation_table"] = hf_hadamard_kq.rotation_table(model)

            def keys_now(model):
                cache = DynamicCache(config=model.config)
                with torch.no_grad():
                    logits = model(ids, attention_mask=mask, **with_cache(model, cache)).logits
                keys = [layer.keys for layer in cache.layers]
                return logits, [(type(k).__name__, k.detach().clone()) for k in keys]

            rec["logits"], rec["keys"] = keys_now(model)
            with torch.no_grad():
                rec["tokens"] = model.generate(ids, attention_mask=mask,
                                               max_new_tokens=NEW_TOKENS, do_sample=False,
                                               pad_token_id=0)
                rec["tokens_static"] = model.generate(ids, attention_mask=mask,
                                                      max_new_tokens=NEW_TOKENS,
                                                      do_sample=False, pad_token_id=0,
                                                      cache_implementation="static")
            if loader == "tp_plan" and Path(path).name == "random-hadamard":
                # every rank calls it; transformers gathers the shards, we add the R3 tensors
                model.save_pretrained(out / "saved-random-hadamard")
            if loader == "tp_plan" and Path(path).name == "hadamard":
                # what benchmarks/bench_generate.py --tp does: toggle R3 on the sharded model
                hf_hadamard_kq.remove_r3(model)
                rec["keys_removed"] = keys_now(model)[1]
                hf_hadamard_kq.apply_r3(model)
                rec["keys_reapplied"] = keys_now(model)[1]
            results[(Path(path).name, loader)] = rec
            del model
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out: Path, paths: list[Path]) -> tuple[list[dict], float]:
    """Start WORLD worker processes with torchrun's environment; return their dumps and the
    wall time. A failing or hanging worker fails the test with its stderr."""
    port = _free_port()
    procs = []
    start = time.perf_counter()
    for rank in range(WORLD):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                   HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.test_tensor_parallel", "--worker", str(out),
             *map(str, paths)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError(f"TP workers did not finish within {TIMEOUT_S} s") from None
    seconds = time.perf_counter() - start
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{log[-6000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], seconds


# ---------------------------------------------------------------- the test


def _rotate64(keys: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Per-head ``keys @ matrix / sqrt(n)`` in float64 (head_dim == n here)."""
    return keys.double() @ matrix.double() / math.sqrt(matrix.shape[0])


def _max_err(got: torch.Tensor, want: torch.Tensor, valid: torch.Tensor) -> float:
    """Max |got - want| over non-padded positions (padded positions of layers > 0 come from
    fully masked attention rows, whose output is backend-defined)."""
    keep = valid[:, None, :, None]
    return ((got.double() - want.double()) * keep).abs().max().item()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return _write_checkpoints(tmp_path_factory.mktemp("tp_ckpts"))


def test_tp_plan_auto_two_gloo_processes(checkpoints, tmp_path):
    """tp_plan="auto" (and DistributedConfig(tp_plan="auto")) over 2 CPU processes:

    * the model really is sharded (k_proj is a DTensor, each rank holds half its rows) and
      every rank has our plan installed (the load probe ran under TP on every rank);
    * greedy tokens (DynamicCache and static cache) equal the single-process run of the same
      checkpoint, on every rank;
    * each rank's cached keys are plain local tensors equal to its kv-head slice of the
      unrotated keys times the explicit matrix (float64 reference), and not the unrotated slice;
    * per-layer stored matrices are buffers of their own layer's module on every rank (plain
      tensors, not DTensors, on the module's device), equal to the checkpoint's matrix;
    * remove_r3 / apply_r3 on the sharded model (what bench_generate.py --tp does) switch the
      cached keys to unrotated and back;
    * save_pretrained of the sharded model writes a checkpoint that loads in one process with
      the same per-layer matrices and tokens.
    """
    ckpts = checkpoints
    refs = {name: _single_process_reference(c["path"]) for name, c in ckpts.items()}
    dumps, seconds = _run_workers(tmp_path, [c["path"] for c in ckpts.values()])
    print(f"2-process TP run: {seconds:.1f} s")

    valid = tm.prompt()[1].bool()
    kv = tm.COMMON["num_key_value_heads"]
    per_rank = kv // WORLD
    errors, logit_errors = [], []
    for name, c in ckpts.items():
        ref = refs[name]
        for loader in LOADERS:
            for rank, dump in enumerate(dumps):
                rec = dump[(name, loader)]
                where = f"{name}/{loader}/rank {rank}"
                assert rec["world"] == WORLD and rec["backend"] == "gloo", where
                assert rec["k_proj_is_dtensor"], f"{where}: model not sharded"
                assert rec["k_proj_local_rows"] == per_rank * BLOCK, where
                assert len(rec["rotation_table"]) == tm.COMMON["num_hidden_layers"], where
                # tokens: the single-process hadamard_kq run's, on every rank
                for key in ("tokens", "tokens_static"):
                    assert torch.equal(rec[key], ref["tokens"]), (
                        f"{where} {key}: {rec[key].tolist()} != {ref['tokens'].tolist()}")
                full = ((rec["logits"] - ref["logits"]).abs() * valid[..., None]).max().item()
                logit_errors.append(full)
                assert full < ATOL * max(1.0, ref["logits"].abs().max().item()), (where, full)
                # keys: the rank's head slice of the unrotated keys, rotated (float64)
                heads = slice(rank * per_rank, (rank + 1) * per_rank)
                for layer, (kind, got) in enumerate(rec["keys"]):
                    assert kind == "Tensor", f"{where} layer {layer}: cached keys are {kind}"
                    plain = ref["keys"][layer][:, heads]
                    want = _rotate64(plain, c["matrices"][layer])
                    assert got.shape == want.shape, (where, layer, got.shape, want.shape)
                    scale = max(1.0, want.abs().max().item())
                    err = _max_err(got, want, valid)
                    errors.append((where, layer, err))
                    assert err <= ATOL * scale, f"{where} layer {layer}: keys off by {err}"
                    assert _max_err(got, plain, valid) > 1e-2 * scale, (
                        f"{where} layer {layer}: keys were left unrotated")
                # stored matrices: per-layer buffers, local and on the module's device
                for layer, bufs in enumerate(rec["buffers"]):
                    if name == "hadamard":
                        assert bufs == {}, f"{where}: Sylvester needs no stored matrix"
                        continue
                    assert set(bufs) == {"_hadamard_kq_q", "_hadamard_kq_k"}, (where, bufs)
                    for buf, (kind, device, value) in bufs.items():
                        assert kind == "Tensor" and device == "cpu", (where, buf, kind, device)
                        assert torch.equal(value.double(), c["matrices"][layer]), (
                            f"{where} layer {layer} {buf}: not this layer's stored matrix")
                if name == "hadamard" and loader == "tp_plan":
                    for layer, (_, got) in enumerate(rec["keys_removed"]):
                        plain = ref["keys"][layer][:, heads]
                        assert _max_err(got, plain, valid) <= ATOL * max(
                            1.0, plain.abs().max().item()), f"{where}: remove_r3"
                    for layer, (_, got) in enumerate(rec["keys_reapplied"]):
                        want = _rotate64(ref["keys"][layer][:, heads], c["matrices"][layer])
                        assert _max_err(got, want, valid) <= ATOL * max(
                            1.0, want.abs().max().item()), f"{where}: apply_r3 again"
    # save_pretrained of the sharded model: a full R3 checkpoint again (weights gathered, the
    # per-layer matrices written back), loading in one process to the same model
    saved = _load(tmp_path / "saved-random-hadamard")
    for layer, attn in enumerate(a.self_attn for a in saved.model.layers):
        for buf in ("_hadamard_kq_q", "_hadamard_kq_k"):
            assert torch.equal(getattr(attn, buf).double(),
                               ckpts["random-hadamard"]["matrices"][layer]), (layer, buf)
    ids, mask = tm.prompt()
    with torch.no_grad():
        tokens = saved.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, refs["random-hadamard"]["tokens"])
    print(f"max |logits - single process| = {max(logit_errors):.2e}; max key error per layer:",
          [f"{w} L{i}: {e:.2e}" for w, i, e in errors])


def _torchrun(nproc: int, script: str, args: list[str], timeout: int) -> str:
    """``torchrun --nproc-per-node nproc benchmarks/<script> args`` on a free port; returns the
    output, failing the test with it on a non-zero exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
           str(ROOT / "benchmarks" / script), *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} exited with {proc.returncode}:\n{out[-6000:]}"
    return out


def _assert_tp_check_report(out_dir: Path, world: int) -> None:
    report = json.loads((out_dir / "tp_check.json").read_text())
    assert report["env"]["world"] == world
    assert len(report["ranks"]) == world
    for r in report["ranks"]:
        assert r["checks"] == {"sharded": True, "keys": True, "buffers": True, "tokens": True}
        assert len(r["layers"]) == report["env"]["layers"] and all(x["ok"] for x in r["layers"])
    assert report["ok"]


def test_tp_check_script_cpu(tmp_path):
    """benchmarks/tp_check.py -- the multi-GPU check -- end to end on CPU (2 gloo ranks, tiny
    bf16 model): its checkpoint build, single-process reference, TP load and every check run
    and pass, so the GPU script cannot rot unnoticed."""
    _torchrun(WORLD, "tp_check.py", ["--tiny", "--device", "cpu", "--out", str(tmp_path),
                                     "--prompt", "16", "--new-tokens", "4"], TIMEOUT_S)
    _assert_tp_check_report(tmp_path, WORLD)


# ---------------------------------------------------------------- GPU (marker gpu, >= 2 GPUs)

two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs >= 2 CUDA devices (TP / device_map across GPUs)")


@pytest.mark.gpu
@two_gpus
def test_tp_check_script_two_gpus(tmp_path):
    """tp_check.py with NCCL on 2 GPUs, tiny bf16 model (the Llama-3-8B-shaped run is
    ``torchrun --nproc-per-node N benchmarks/tp_check.py --out DIR``)."""
    _torchrun(2, "tp_check.py", ["--tiny", "--device", "cuda", "--out", str(tmp_path)], 600)
    _assert_tp_check_report(tmp_path, 2)


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("name", ["hadamard", "random-hadamard"])
def test_device_map_auto_two_gpus(checkpoints, name):
    """device_map="auto" over cuda:0 and cuda:1 (accelerate's balanced map splits the layers;
    asserted, not assumed): the same greedy tokens as the model on one GPU; each layer's stored
    matrices live on that layer's device; each layer's cached keys are on its device and are
    the float64 rotation of the unrotated (CPU, fp32) keys."""
    from transformers import DynamicCache

    c = checkpoints[name]
    ids, mask = tm.prompt()
    single = _load(c["path"], device_map={"": 0})
    split = _load(c["path"], device_map="auto", max_memory={0: "10GiB", 1: "10GiB"})
    attn = [layer.self_attn for layer in split.model.layers]
    devices = [a.q_proj.weight.device for a in attn]
    assert {d.type for d in devices} == {"cuda"}
    assert {d.index for d in devices} == {0, 1}, f"not split: {split.hf_device_map}"
    for i, a in enumerate(attn):
        bufs = {n: b for n, b in a.named_buffers(recurse=False) if n.startswith("_hadamard_kq_")}
        if name == "hadamard":
            assert bufs == {}
        else:
            assert set(bufs) == {"_hadamard_kq_q", "_hadamard_kq_k"}, (i, set(bufs))
        for buf, value in bufs.items():
            assert value.device == devices[i] == a.k_proj.weight.device, (i, buf, value.device)
            assert torch.equal(value.double().cpu(), c["matrices"][i]), (i, buf)
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    x, m = ids.to("cuda:0"), mask.to("cuda:0")
    with torch.no_grad():
        want = single.generate(x, attention_mask=m, **gen).cpu()
        got = split.generate(x, attention_mask=m, **gen).cpu()
    assert torch.equal(got, want), (got.tolist(), want.tolist())
    ref = _single_process_reference(c["path"])
    cache = DynamicCache(config=split.config)
    with torch.no_grad():
        split(x, attention_mask=m, **with_cache(split, cache))
    valid = mask.bool()
    for i, layer in enumerate(cache.layers):
        assert layer.keys.device == devices[i], (i, layer.keys.device, devices[i])
        expected = _rotate64(ref["keys"][i], c["matrices"][i])
        err = _max_err(layer.keys.cpu(), expected, valid)
        assert err <= ATOL * max(1.0, expected.abs().max().item()), (i, err)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", type=Path, required=True)
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args()
    _worker(args.worker, args.paths)
