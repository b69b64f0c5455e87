"""``hf-hadamard-kq``: inspect | demo | eval | bench.

* ``inspect PATH``  what an R3 checkpoint asks for and whether hadamard_kq would load it, from
  config.json, the safetensors headers and the few R3 tensors (no weights are loaded; the
  model is built on the meta device only to resolve the transform targets to layer names).
* ``demo``          builds a small R3 checkpoint, loads it with hadamard_kq, generates.
* ``eval PATH``     perplexity with a simulated quantized KV cache, R3 on and off side by side.
* ``bench``         the GPU benchmarks (benchmarks/bench_op.py); refuses on a machine without GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

DEFAULT_DEMO_DIR = Path(".demo") / "tiny-llama-r3"
KV_CHOICES = ("none", "fp8", "int8", "int4", "int2")
EXIT_NO_GPU = 3
BUILTIN_TEXT = "built-in (pydoc_data topics, eval split)"


def build_demo_checkpoint(path: Path, seed: int = 0) -> None:
    """A small random Llama with R3 (deterministic Hadamard, head_dim 64), saved like
    llm-compressor's output: transform_config in config.json and the R3 matrix stored once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_hadamard_kq

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, num_hidden_layers=4,
                         intermediate_size=512, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    hf_hadamard_kq.apply_r3(model)
    hf_hadamard_kq.save_r3_pretrained(model, path)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' logging and Python warnings (expected ones: an R3 checkpoint
    loaded unrotated on purpose, meta-device construction)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def demo(checkpoint: Optional[Path], new_tokens: int) -> None:
    from transformers import AutoModelForCausalLM

    import hf_hadamard_kq

    path = checkpoint or DEFAULT_DEMO_DIR
    if checkpoint is None and not (path / "config.json").exists():
        print(f"building a small random R3 checkpoint in {path} ...", flush=True)
        build_demo_checkpoint(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="hadamard_kq")
    # The unrotated reference: the load hook warns that Q/K are not rotated and transformers
    # lists the R3 matrix as unexpected; both are intended here, so keep them quiet.
    with _quiet_transformers():
        plain = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    print(hf_hadamard_kq.describe(model))
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(prompt).logits - plain(prompt).logits).abs().max().item()
    print(f"max |logit difference| vs the unrotated model: {diff:.3g} "
          "(rotating Q and K by the same orthonormal matrix preserves q.k)")
    results = {}
    for label, m in (("hadamard_kq", model), ("sdpa (unrotated)", plain)):
        m.generate(prompt, max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False)
        seconds = time.perf_counter() - start
        results[label] = out
        print(f"{label:>18}: {new_tokens / seconds:7.1f} tokens/s on {prompt.device}")
    same = torch.equal(*results.values())
    print(f"greedy tokens identical: {same}")
    print("generated ids:", results["hadamard_kq"][0, prompt.shape[1]:].tolist())
    if not same:
        raise SystemExit("greedy tokens differ from the unrotated model")


# --------------------------------------------------------------------------------- inspect


def compress_names(names: list[str]) -> list[str]:
    """``model.layers.0.self_attn``, ``model.layers.1.self_attn`` ->
    ``model.layers.{0-1}.self_attn`` (the first number becomes a list of ranges)."""
    groups: dict[tuple[str, str], list[int]] = {}
    singles: list[str] = []
    for name in names:
        m = re.match(r"^(.*?\.)(\d+)(\..*|)$", name)
        if m is None:
            singles.append(name)
        else:
            groups.setdefault((m[1], m[3]), []).append(int(m[2]))
    out = list(singles)
    for (prefix, suffix), numbers in groups.items():
        numbers = sorted(set(numbers))
        if len(numbers) == 1:
            out.append(f"{prefix}{numbers[0]}{suffix}")
            continue
        ranges, start = [], numbers[0]
        for prev, cur in zip(numbers, [*numbers[1:], None]):
            if cur != prev + 1:
                ranges.append(f"{start}" if start == prev else f"{start}-{prev}")
                start = cur
        out.append(f"{prefix}{{{','.join(ranges)}}}{suffix}")
    return out


def _meta_model(path: Path):
    """The model built on the meta device from config.json alone (no weights read)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    with _quiet_transformers():
        config = AutoConfig.from_pretrained(path)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # build the bare architecture, no quantizer
        with torch.device("meta"):
            try:
                return AutoModelForCausalLM.from_config(config, attn_implementation="eager")
            except ValueError:
                return AutoModel.from_config(config, attn_implementation="eager")


def _matrix_facts(t: torch.Tensor) -> dict[str, Any]:
    facts: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
    if t.dim() == 2 and t.shape[0] == t.shape[1] and t.is_floating_point():
        w = t.double()
        n = w.shape[0]
        facts["entries_pm1"] = bool(torch.all(w.abs() == 1))
        facts["orthogonal"] = bool(torch.allclose(w @ w.T, n * torch.eye(n, dtype=w.dtype),
                                                  atol=1e-6 * n))
    return facts


def inspect_checkpoint(path: Path) -> dict[str, Any]:
    """Everything ``inspect`` reports, as a JSON-ready dict (see the module docstring)."""
    from . import checkpoint as ckpt
    from . import plan as plan_mod
    from .install import attention_modules
    from .loading import verify_stored_tensors
    from .plan import (
        HadamardKQConfigError,
        build_plan,
        has_r3,
        model_head_dim,
        parse_transform_config,
    )

    path = Path(path)
    config = ckpt.read_config(path)
    files = ckpt.weight_files(path)
    qc = config.get("quantization_config") or {}
    report: dict[str, Any] = {
        "path": str(path),
        "architectures": config.get("architectures"),
        "model_type": config.get("model_type"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "weights": {
            "files": sorted({Path(f).name for f in files.values()}),
            "sharded": (path / ckpt.SAFE_INDEX).exists(),
            "tensors": len(files),
        },
        "quantization": {
            "quant_method": qc.get("quant_method"),
            "config_groups": sorted(qc.get("config_groups") or {}),
            "kv_cache_scheme": qc.get("kv_cache_scheme"),
        },
        "transform_groups": [],
        "stored_tensors": [],
        "rotated_layers": [],
        "hadamard_kq": {"loads": False, "refusal": None},
    }
    refusal: Optional[str] = None
    raw = ckpt.transform_config_of(config)
    parsed = None
    if raw is None:
        refusal = ("no quantization_config.transform_config: nothing to rotate; load with "
                   "attn_implementation='sdpa' and use hf_hadamard_kq.apply_r3(model) to add R3")
    else:
        try:
            parsed = parse_transform_config(raw)
            if not has_r3(parsed):
                refusal = "transform_config has no q_attn/k_cache transform: nothing to rotate"
        except HadamardKQConfigError as exc:
            refusal = str(exc)

    model = None
    if parsed is not None:
        try:
            model = _meta_model(path)
        except Exception as exc:  # unknown architecture to this transformers
            refusal = refusal or f"cannot build the model from config.json: {exc}"
    if model is not None:
        from compressed_tensors.utils.match import match_named_modules

        attn = attention_modules(model)
        report["attention_modules"] = compress_names(list(attn))
        for group, scheme in parsed.config_groups.items():
            entry = {
                "group": group,
                "type": scheme.type,
                "head_dim": scheme.head_dim,
                "randomize": bool(scheme.randomize),
                "precision": str(scheme.precision).replace("torch.", ""),
                "apply": [],
            }
            for args in scheme.apply:
                names = [n for n, _ in match_named_modules(model, args.targets, args.ignore)]
                head_dims = sorted({model_head_dim(model.get_submodule(n), model.config)
                                    for n in names})
                entry["apply"].append({
                    "location": str(getattr(args.location, "value", args.location)),
                    "targets": list(args.targets),
                    "ignore": list(args.ignore),
                    "inverse": bool(args.inverse),
                    "matched": compress_names(names),
                    "matched_count": len(names),
                    "model_head_dim": head_dims,
                })
            report["transform_groups"].append(entry)

    plan = None
    if model is not None and refusal is None:
        try:
            plan = build_plan(model, raw)
        except HadamardKQConfigError as exc:
            refusal = str(exc)

    names = ckpt.transform_tensor_names(files)
    stored = ckpt.read_tensors(files, names) if names else {}
    all_verified = True
    for name in names:
        row = {"name": name, "file": Path(files[name]).name, **_matrix_facts(stored[name])}
        if plan is None:
            row["verified"] = None
            row["detail"] = "not checked: the transform_config is refused"
        else:
            try:
                verify_stored_tensors(plan, {name: stored[name]})
                row["verified"] = True
                row["detail"] = ("a permutation of 0..n-1" if name.endswith(".perm")
                                 else "the matrix the config describes")
            except HadamardKQConfigError as exc:
                row["verified"], row["detail"] = False, str(exc)
                all_verified = False
                refusal = refusal or str(exc)
        report["stored_tensors"].append(row)

    resolve = getattr(plan_mod, "resolve_matrices", None)
    if plan is not None and all_verified and resolve is not None:
        # what loading does next: every needed random matrix / permutation present, the
        # effective matrices attached, a warning if the q and k rotations change q.k
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                resolve(plan, stored)
            except HadamardKQConfigError as exc:
                refusal = refusal or str(exc)
        report["warnings"] = [str(w.message) for w in caught]
    if plan is not None:
        for name, layer in plan.layers.items():
            report["rotated_layers"].append({
                "module": name,
                "head_dim": layer.head_dim,
                "q": None if layer.q is None else layer.q.describe(),
                "k_before_cache": None if layer.k is None else layer.k.describe(),
            })

    report["hadamard_kq"] = {"loads": refusal is None, "refusal": refusal}
    if refusal is None:
        report["hadamard_kq"]["note"] = (
            "at load, a 2-token probe also checks that every layer rotates its keys once, "
            "before the cache")
    return report


def format_inspect(r: dict[str, Any]) -> str:
    lines = [f"checkpoint   {r['path']}"]
    arch = ", ".join(r["architectures"] or []) or "?"
    lines.append(f"model        {arch} (model_type {r['model_type']}, "
                 f"{r['num_hidden_layers']} layers)")
    w = r["weights"]
    lines.append(f"weights      {w['tensors']} tensors in {len(w['files'])} file(s)"
                 f"{' (sharded, index)' if w['sharded'] else ''}: {', '.join(w['files'])}")
    q = r["quantization"]
    quant = "none" if q["quant_method"] is None else (
        f"{q['quant_method']}; config_groups: "
        f"{', '.join(q['config_groups']) or '- (transforms only)'}; "
        f"kv_cache_scheme: "
        + ("-" if not q["kv_cache_scheme"] else
           f"{q['kv_cache_scheme'].get('type')}{q['kv_cache_scheme'].get('num_bits')} "
           f"{q['kv_cache_scheme'].get('strategy')}"))
    lines.append(f"quantization {quant}")
    if "attention_modules" in r:
        lines.append(f"attention    {', '.join(r['attention_modules']) or '-'}")
    for g in r["transform_groups"]:
        lines.append(f"transform    group {g['group']}: type {g['type']}, head_dim "
                     f"{g['head_dim']}, randomize {str(g['randomize']).lower()}, precision "
                     f"{g['precision']}")
        for a in g["apply"]:
            matched = ", ".join(a["matched"]) or "NO MODULE"
            inv = " inverse" if a["inverse"] else ""
            ignore = f" ignore {a['ignore']}" if a["ignore"] else ""
            lines.append(f"  {a['location']:<8} {a['targets']}{ignore}{inv} -> {matched} "
                         f"({a['matched_count']} modules, model head_dim "
                         f"{'/'.join(map(str, a['model_head_dim'])) or '-'})")
    if r["rotated_layers"]:
        lines.append("rotated      (module: Q | K before the cache)")
        for layer in r["rotated_layers"]:
            lines.append(f"  {layer['module']:<28} {layer['q'] or '-'} | "
                         f"{layer['k_before_cache'] or '-'}")
    if r["stored_tensors"]:
        lines.append("stored R3 tensors")
        for t in r["stored_tensors"]:
            status = {True: "verified", False: "MISMATCH", None: "unchecked"}[t["verified"]]
            facts = ""
            if "orthogonal" in t:
                facts = (f", +-1 entries: {'yes' if t['entries_pm1'] else 'no'}, "
                         f"orthogonal: {'yes' if t['orthogonal'] else 'no'}")
            lines.append(f"  {t['name']}  {tuple(t['shape'])} {t['dtype']} in {t['file']}"
                         f"{facts}: {status} ({t['detail']})")
    else:
        lines.append("stored R3 tensors: none")
    for warning in r.get("warnings", []):
        lines.append(f"WARNING      {warning}")
    h = r["hadamard_kq"]
    if h["loads"]:
        lines.append(f"hadamard_kq  loads: Q and K rotated in {len(r['rotated_layers'])} layers "
                     f"({h['note']})")
    else:
        lines.append(f"hadamard_kq  REFUSED: {h['refusal']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ eval


def _load_for_eval(path: Path, rotated: bool, dtype: torch.dtype):
    """(model, how) for one arm. An R3 checkpoint's rotated arm goes through the real load
    path (stored matrices verified); a plain checkpoint gets apply_r3 with the default R3."""
    from transformers import AutoModelForCausalLM

    import hf_hadamard_kq

    from . import checkpoint as ckpt
    from .plan import has_r3

    is_r3 = has_r3(ckpt.transform_config_of(ckpt.read_config(path)))
    if rotated and is_r3:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="hadamard_kq",
                                                     dtype=dtype)
        how = "R3 checkpoint loaded with attn_implementation='hadamard_kq'"
    else:
        with _quiet_transformers():  # an R3 checkpoint unrotated on purpose
            model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa",
                                                         dtype=dtype)
        how = ("R3 checkpoint loaded unrotated (sdpa)" if is_r3 else
               "loaded with sdpa (no R3 in the checkpoint)")
        if rotated:
            hf_hadamard_kq.apply_r3(model)
            how = "hf_hadamard_kq.apply_r3 (deterministic Hadamard, block = head_dim)"
    return model.eval(), how


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from . import checkpoint as ckpt
    from .kv_quant import KVQuantSpec
    from .research import load_text, perplexity

    path = Path(args.path)
    qc = ckpt.read_config(path).get("quantization_config") or {}
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or path)
    text = load_text(args.text_file, split="eval")
    with _quiet_transformers():  # "sequence longer than the model's maximum": we window it
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(encoded, dtype=torch.long)
    ids = ids[: args.max_tokens]
    if ids.numel() < args.context:
        raise SystemExit(f"only {ids.numel()} tokens of text; need at least --context "
                         f"{args.context}")
    kv_list = list(dict.fromkeys(["none", *args.kv]))
    specs = {
        kv: None if kv == "none" else KVQuantSpec(
            fmt=kv, key_granularity=args.granularity,
            value_granularity=args.value_granularity, token_group=args.token_group,
            channel_group=args.channel_group, quantize_values=not args.keys_only,
            symmetric=args.symmetric)
        for kv in kv_list
    }
    arms = [True, False] if args.rotate is None else [args.rotate]
    dtype = getattr(torch, args.dtype)
    results: dict[str, Any] = {
        "path": str(path),
        "text": str(args.text_file) if args.text_file else BUILTIN_TEXT,
        "tokens": int(ids.numel() // args.context * args.context),
        "context": args.context,
        "dtype": args.dtype,
        "kv": {kv: (None if s is None else s.describe()) for kv, s in specs.items()},
        "checkpoint_kv_cache_scheme": qc.get("kv_cache_scheme"),
        "ppl": {},
        "how": {},
    }
    from tqdm.auto import tqdm

    bar = tqdm(total=len(arms) * len(kv_list), desc="eval", unit="run", file=sys.stderr,
               disable=args.quiet)
    for rotated in arms:
        arm = "r3" if rotated else "unrotated"
        model, how = _load_for_eval(path, rotated, dtype)
        results["how"][arm] = how
        results["ppl"][arm] = {}
        for kv in kv_list:
            bar.set_postfix_str(f"{arm} kv={kv}")
            results["ppl"][arm][kv] = perplexity(
                model, ids, specs[kv], context=args.context, batch_size=args.batch_size)
            bar.update(1)
        del model
    bar.close()
    return results


def format_eval(r: dict[str, Any]) -> str:
    arms = list(r["ppl"])
    lines = [f"checkpoint {r['path']}",
             f"text       {r['text']}: {r['tokens']} tokens in windows of {r['context']}, "
             f"{r['dtype']}"]
    for arm in arms:
        lines.append(f"{arm:<10} {r['how'][arm]}")
    header = f"{'kv cache':<10}" + "".join(f"{a + ' ppl':>16}" for a in arms)
    if len(arms) == 2:
        header += f"{'r3 / unrotated':>16}"
    lines += ["", header]
    for kv in r["kv"]:
        row = f"{kv:<10}" + "".join(f"{r['ppl'][a][kv]:>16.4f}" for a in arms)
        if len(arms) == 2:
            row += f"{r['ppl']['r3'][kv] / r['ppl']['unrotated'][kv]:>16.4f}"
        lines.append(row)
    lines.append("")
    for kv, desc in r["kv"].items():
        if desc:
            lines.append(f"{kv}: {desc}")
    scheme = r.get("checkpoint_kv_cache_scheme")
    if scheme:
        lines.append(
            f"note: the checkpoint has its own kv_cache_scheme ({scheme.get('type')}"
            f"{scheme.get('num_bits')} {scheme.get('strategy')}), which compressed-tensors may "
            "apply as well (depending on the arm and the transformers version); 'none' means "
            "no simulated quantization on top of it")
    elif len(arms) == 2:
        a, b = r["ppl"]["r3"]["none"], r["ppl"]["unrotated"]["none"]
        lines.append(f"full precision: r3 and unrotated agree to {abs(a - b) / b:.2e} (relative);"
                     " R3 only changes what a quantized cache stores")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- bench


def _bench_script() -> Path:
    return Path(__file__).resolve().parents[1] / "benchmarks" / "bench_op.py"


def run_bench(extra: list[str]) -> int:
    if not torch.cuda.is_available():
        print("hf-hadamard-kq bench: needs a CUDA or ROCm GPU (torch.cuda.is_available() is "
              f"False on this machine, torch {torch.__version__}). The benchmarks time the "
              "Triton kernel against torch.clone bandwidth; run them on a GPU machine.",
              file=sys.stderr)
        return EXIT_NO_GPU
    script = _bench_script()
    if not script.exists():
        print(f"hf-hadamard-kq bench: {script} not found; bench runs from a source checkout "
              "of hf_hadamard_kq (benchmarks/ is not part of the installed package)",
              file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *extra])


def build_launcher() -> int:
    """The ``build-launcher`` command: build the C++ launcher into the cache now; 0 when it
    is built and loads, 1 (with the reason on stderr) when not."""
    from .ops import cpp_launch

    try:
        report = cpp_launch.prebuild()
    except cpp_launch.CppLaunchError as err:
        print(f"hf-hadamard-kq build-launcher: {err}", file=sys.stderr)
        return 1
    how = "already built" if report["cached"] else f"built in {report['seconds']:.1f} s"
    print(f"C++ launcher {how}: {report['path']}")
    if not report["driver"]:
        print("no CUDA driver (libcuda.so.1) on this machine: the launcher is cached for a "
              "machine with one (same torch, Python and compiler, same cache directory)")
    return 0


# ------------------------------------------------------------------------------------ main


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-hadamard-kq",
        description="SpinQuant-R3 (online Hadamard rotation of Q and K) for transformers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "inspect", help="what an R3 checkpoint rotates, and whether hadamard_kq loads it",
        description="Reads config.json, the safetensors headers and the R3 tensors only (no "
        "weights; the model is built on the meta device to resolve targets to layer names). "
        "Prints the transform groups, the layers rotated at q_attn / k_cache, head_dim, type, "
        "the stored matrices and whether they verify, and what hadamard_kq would refuse and "
        "why. Works on single-file and sharded checkpoints. Exit status 1 when refused.")
    p.add_argument("path", type=Path, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser(
        "demo", help="load an R3 checkpoint with attn_implementation='hadamard_kq' and generate",
        description="Builds (or reuses) a small random R3 checkpoint, loads it with "
        "attn_implementation='hadamard_kq', prints the rotated layers, the logit difference "
        "against the unrotated model, and tokens/s.")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"an R3 checkpoint directory (default: build {DEFAULT_DEMO_DIR})")
    p.add_argument("--new-tokens", type=_positive, default=32)

    p = sub.add_parser(
        "eval", help="perplexity with a quantized KV cache, R3 on and off side by side",
        description="Perplexity of a causal LM with a simulated quantized KV cache "
        "(hf_hadamard_kq.kv_quant.FakeQuantCache: values are quantized and dequantized on "
        "their way into the cache, so attention reads what a low-bit cache returns), with the "
        "R3 rotation on and off. An R3 checkpoint's rotated arm is loaded with "
        "attn_implementation='hadamard_kq' and its unrotated arm with sdpa; a plain "
        "checkpoint gets hf_hadamard_kq.apply_r3 for the rotated arm. The full-precision "
        "row ('none') is always included as the reference. A checkpoint's own "
        "kv_cache_scheme (e.g. calibrated fp8) may be applied by compressed-tensors in "
        "addition; the output says so.")
    p.add_argument("path", type=Path, help="causal LM checkpoint directory")
    p.add_argument("--kv", nargs="+", choices=KV_CHOICES, default=["int4"],
                   help="KV cache format(s) (default: int4; 'none' = full precision)")
    p.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                   help="only the R3 arm (--rotate) or only the unrotated arm (--no-rotate); "
                   "default: both side by side")
    p.add_argument("--text-file", type=Path, default=None,
                   help="UTF-8 text to score (default: the built-in English text, the held-out "
                   "split of Python's pydoc_data topics)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--granularity", choices=("token", "channel", "tensor"), default="token",
                   help="key scales: per-token (one per token and head, over --token-group "
                   "channels), per-channel (one per channel over --channel-group tokens, "
                   "KIVI-style) or per-tensor (frozen at the first write); default token")
    p.add_argument("--value-granularity", choices=("token", "channel", "tensor"),
                   default="token", help="value scales (default token)")
    p.add_argument("--token-group", type=_positive, default=None,
                   help="channels per scale for per-token (default: head_dim)")
    p.add_argument("--channel-group", type=_positive, default=64,
                   help="tokens per scale for per-channel (default 64; --context should be a "
                   "multiple, the last partial group stays in full precision)")
    p.add_argument("--keys-only", action="store_true",
                   help="leave values in full precision (isolates keys, the only thing R3 "
                   "changes)")
    p.add_argument("--symmetric", action="store_true",
                   help="symmetric integer grid (absmax) instead of asymmetric min/max")
    p.add_argument("--context", type=_positive, default=256, help="window length (default 256)")
    p.add_argument("--max-tokens", type=_positive, default=8192,
                   help="score at most this many tokens (default 8192)")
    p.add_argument("--batch-size", type=_positive, default=8, help="windows per forward")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "bench", help="GPU benchmarks of the op (benchmarks/bench_op.py); needs a GPU",
        description="Runs benchmarks/bench_op.py from the source checkout (the op against "
        "torch.clone bandwidth, a dense matmul and Dao-AILab's kernel when installed; decode "
        f"host overhead). On a machine without a CUDA/ROCm GPU it says so and exits "
        f"{EXIT_NO_GPU}. Every other argument is passed on to bench_op.py (e.g. --out DIR, "
        "--reps N; see python benchmarks/bench_op.py --help).")

    sub.add_parser(
        "build-launcher", help="build the C++ launcher of eager CUDA rotations now",
        description="Compiles the small C++ module that launches the Triton kernels in eager "
        "CUDA decode (hf_hadamard_kq/ops/cpp_launch.cpp) into its cache "
        "($HF_HADAMARD_KQ_CACHE_DIR, default ~/.cache/hf_hadamard_kq), as the first eager "
        "CUDA rotation otherwise does (10-15 s on an H100 host); e.g. in a container's build "
        "step. Needs a C++ compiler ($CXX, else c++, g++ or clang++), not a GPU or the CUDA "
        "toolkit. Exit status 1 when it cannot be built.")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "demo":
        demo(args.checkpoint, args.new_tokens)
    elif args.command == "inspect":
        report = inspect_checkpoint(args.path)
        print(json.dumps(report, indent=2) if args.json else format_inspect(report))
        if not report["hadamard_kq"]["loads"]:
            raise SystemExit(1)
    elif args.command == "eval":
        results = run_eval(args)
        if args.json:
            print(json.dumps(results, indent=2, allow_nan=True))
        else:
            print(format_eval(results))
        if any(not math.isfinite(v) for arm in results["ppl"].values() for v in arm.values()):
            raise SystemExit(1)
    elif args.command == "bench":
        raise SystemExit(run_bench(extra))
    elif args.command == "build-launcher":
        raise SystemExit(build_launcher())


if __name__ == "__main__":
    main()
