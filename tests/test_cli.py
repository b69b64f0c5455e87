"""``hf-hadamard-kq`` end to end on the llm-compressor fixtures (and copies of them made in
tmp_path: sharded, without transform_config, with a corrupted matrix).

The commands run in-process through ``main`` (output and exit status as a subprocess would
see them; each child process would import torch and transformers again, ~7 s apiece on the CI
machine); ``test_entry_point_in_a_subprocess`` runs the module as a program once."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_hadamard_kq.cli import (
    EXIT_NO_GPU,
    build_parser,
    compress_names,
    inspect_checkpoint,
    main,
)
from tests.conftest import FIXTURES

HD16 = FIXTURES / "llama_r3_hadamard_hd16"
HD64 = FIXTURES / "llama_r3_hadamard_hd64"
R3_NAME = "model.layers.0.self_attn.R3_q_attn.weight"


def cli(*args, check=True) -> subprocess.CompletedProcess:
    """``hf-hadamard-kq *args`` in this process: stdout, stderr and the exit status that
    ``python -m hf_hadamard_kq.cli`` would give (``SystemExit("text")``: status 1, the text
    on stderr, as the interpreter does)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
    proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_entry_point_in_a_subprocess():
    """The module runs as a program (``python -m``) and its help lists every command."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    top = subprocess.run([sys.executable, "-m", "hf_hadamard_kq.cli", "--help"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert top.returncode == 0, top.stderr
    for command in ("inspect", "demo", "eval", "bench"):
        assert command in top.stdout


def copy_checkpoint(src, dst, *, config_edit=None, tensors_edit=None, shards=1):
    """Copy a fixture; optionally edit config.json / the tensors and split into shards."""
    shutil.copytree(src, dst)
    if config_edit is not None:
        config = json.loads((dst / "config.json").read_text())
        config_edit(config)
        (dst / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(dst / "model.safetensors")
    if tensors_edit is not None:
        tensors_edit(tensors)
    if tensors_edit is None and shards == 1:
        return dst
    (dst / "model.safetensors").unlink()
    if shards == 1:
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
        return dst
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, dst / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return dst


def test_help_on_every_command(capsys):
    top = cli("--help")
    assert top.returncode == 0
    for command in ("inspect", "demo", "eval", "bench", "build-launcher"):
        assert command in top.stdout
    for command in ("inspect", "demo", "eval", "bench", "build-launcher"):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([command, "--help"])
        assert exc.value.code == 0
        assert f"usage: hf-hadamard-kq {command}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["inspect", str(HD16), "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_compress_names():
    names = [f"model.layers.{i}.self_attn" for i in (0, 1, 2, 5, 7, 8)]
    assert compress_names(names) == ["model.layers.{0-2,5,7-8}.self_attn"]
    assert compress_names(["model.layers.3.self_attn"]) == ["model.layers.3.self_attn"]


def test_inspect_text():
    out = cli("inspect", HD16).stdout
    assert "group R3: type hadamard, head_dim 16, randomize false" in out
    assert "q_attn   ['re:.*self_attn$'] -> model.layers.{0-1}.self_attn (2 modules" in out
    assert "k_cache" in out
    assert f"{R3_NAME}  (16, 16) float64 in model.safetensors" in out
    assert "verified" in out
    assert "hadamard_kq  loads: Q and K rotated in 2 layers" in out


def test_inspect_json_on_sharded_copy(tmp_path):
    path = copy_checkpoint(HD64, tmp_path / "sharded", shards=3)
    report = json.loads(cli("inspect", path, "--json").stdout)
    assert report["weights"]["sharded"] is True
    assert len(report["weights"]["files"]) == 3
    assert report["num_hidden_layers"] == 2
    (group,) = report["transform_groups"]
    assert group["type"] == "hadamard" and group["head_dim"] == 64
    assert [a["location"] for a in group["apply"]] == ["q_attn", "k_cache"]
    assert all(a["matched"] == ["model.layers.{0-1}.self_attn"] for a in group["apply"])
    assert all(a["model_head_dim"] == [64] for a in group["apply"])
    assert [row["module"] for row in report["rotated_layers"]] == [
        "model.layers.0.self_attn", "model.layers.1.self_attn"]
    (stored,) = report["stored_tensors"]
    assert stored["name"] == R3_NAME and stored["verified"] is True
    assert stored["shape"] == [64, 64] and stored["orthogonal"] is True
    assert stored["file"].startswith("model-0000")
    assert report["hadamard_kq"] == {
        "loads": True, "refusal": None, "note": report["hadamard_kq"]["note"]}


def test_inspect_refuses_a_corrupted_matrix(tmp_path):
    def flip(tensors):
        tensors[R3_NAME] = tensors[R3_NAME].clone()
        tensors[R3_NAME][3, 5] *= -1

    path = copy_checkpoint(HD16, tmp_path / "corrupt", tensors_edit=flip)
    proc = cli("inspect", path, check=False)
    assert proc.returncode == 1
    assert "MISMATCH" in proc.stdout
    assert "REFUSED" in proc.stdout and "not the unnormalised Sylvester Hadamard" in proc.stdout


def test_inspect_without_transform_config_and_bad_head_dim(tmp_path):
    plain = copy_checkpoint(HD16, tmp_path / "plain",
                            config_edit=lambda c: c.pop("quantization_config"))
    report = inspect_checkpoint(plain)
    assert not report["hadamard_kq"]["loads"]
    assert "apply_r3" in report["hadamard_kq"]["refusal"]

    def bad_head_dim(config):
        config["quantization_config"]["transform_config"]["config_groups"]["R3"]["head_dim"] = 32

    report = inspect_checkpoint(copy_checkpoint(HD16, tmp_path / "hd32", config_edit=bad_head_dim))
    assert not report["hadamard_kq"]["loads"]
    assert "head_dim=32" in report["hadamard_kq"]["refusal"]
    # the targeting is still shown, so the user sees which layers the config meant
    assert report["transform_groups"][0]["apply"][0]["matched_count"] == 2


@pytest.mark.parametrize("name", ["llama_r3_randhad_hd16", "llama_r3_randomize_hd16"])
def test_inspect_other_transform_types_are_consistent(name):
    """random-hadamard / randomize are being added: either refused naming the option, or
    loaded with every stored tensor verified -- never loaded with unchecked matrices."""
    report = inspect_checkpoint(FIXTURES / name)
    if report["hadamard_kq"]["loads"]:
        assert all(t["verified"] for t in report["stored_tensors"])
    else:
        assert any(word in report["hadamard_kq"]["refusal"]
                   for word in ("random-hadamard", "randomize"))
        assert all(t["verified"] is None for t in report["stored_tensors"])


def test_inspect_random_hadamard_without_its_matrix_is_never_loadable(tmp_path):
    """A random matrix cannot be regenerated: without the stored tensor, refuse."""
    path = copy_checkpoint(FIXTURES / "llama_r3_randhad_hd16", tmp_path / "nomatrix",
                           tensors_edit=lambda t: t.pop(R3_NAME))
    report = inspect_checkpoint(path)
    assert report["stored_tensors"] == []
    assert not report["hadamard_kq"]["loads"]


def test_eval_r3_checkpoint_side_by_side():
    proc = cli("eval", HD16, "--kv", "fp8", "int4", "int2", "--max-tokens", "1024", "--quiet")
    out = proc.stdout
    assert "r3 ppl" in out and "unrotated ppl" in out
    for kv in ("none", "fp8", "int4", "int2"):
        assert any(line.startswith(kv) for line in out.splitlines())
    assert "attn_implementation='hadamard_kq'" in out


def test_eval_json_plain_checkpoint_channel_and_text_file(tmp_path):
    plain = copy_checkpoint(HD16, tmp_path / "plain",
                            config_edit=lambda c: c.pop("quantization_config"))
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    proc = cli("eval", plain, "--kv", "int2", "--granularity", "channel", "--channel-group",
               "32", "--context", "128", "--text-file", text, "--json", "--quiet")
    r = json.loads(proc.stdout)
    assert r["tokens"] == 1792 and r["context"] == 128
    assert "apply_r3" in r["how"]["r3"] and "no R3" in r["how"]["unrotated"]
    assert "per-channel (group 32 tokens)" in r["kv"]["int2"]
    # full precision: the rotation changes nothing; int2 changes something
    assert r["ppl"]["r3"]["none"] == pytest.approx(r["ppl"]["unrotated"]["none"], rel=1e-5)
    assert r["ppl"]["r3"]["int2"] != r["ppl"]["r3"]["none"]


def test_eval_one_arm_reports_the_checkpoint_kv_scheme(capsys):
    main(["eval", str(FIXTURES / "llama_r3_fp8kv_hd16"), "--kv", "int4", "--no-rotate",
          "--max-tokens", "512", "--json", "--quiet"])
    r = json.loads(capsys.readouterr().out)
    assert list(r["ppl"]) == ["unrotated"]
    assert r["checkpoint_kv_cache_scheme"]["num_bits"] == 8


def test_demo_on_fixture():
    out = cli("demo", "--checkpoint", HD64, "--new-tokens", "4").stdout
    assert "greedy tokens identical: True" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_bench_refuses_without_gpu():
    proc = cli("bench", "--out", "somewhere", "--reps", "3", check=False)
    assert proc.returncode == EXIT_NO_GPU
    assert "needs a CUDA or ROCm GPU" in proc.stderr
