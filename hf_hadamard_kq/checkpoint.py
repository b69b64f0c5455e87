"""Reading and writing the R3 parts of a checkpoint directory, without loading the weights.

Why header-level access: the stored R3 matrices are tiny, but a checkpoint can be tens of GB
in many shards. Reading ``config.json`` and the safetensors headers (plus the few R3 tensors)
lets the load hook verify the matrices, and ``inspect`` describe a checkpoint, without a
second pass over the weights.

Why writing adds a shard instead of rewriting one: ``save_pretrained`` of a loaded model has
no R3 tensors (they are verified and dropped at load) and transformers drops
``transform_config`` from the config. Putting them back by renaming a single
``model.safetensors`` to a two-shard layout with an index is O(1) in the model size.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG_NAME = "config.json"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
R3_SHARD = "model-r3-transforms.safetensors"

#: ``<module>.<group>_<location>.<weight|perm>`` as compressed-tensors names transform tensors.
TRANSFORM_KEY = re.compile(r"^(?P<module>.+)\.(?P<group>[^.]+)_(?P<location>q_attn|k_cache)"
                           r"\.(?P<kind>weight|perm)$")

PathLike = Union[str, os.PathLike]


def read_config(path: PathLike) -> dict[str, Any]:
    with open(Path(path) / CONFIG_NAME, encoding="utf-8") as f:
        return json.load(f)


def transform_config_of(config: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The raw transform_config of a config.json dict, or None."""
    qc = config.get("quantization_config") or {}
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        return None
    return qc.get("transform_config")


def tensor_files(files: Iterable[PathLike]) -> dict[str, str]:
    """tensor name -> file, from the safetensors headers of ``files`` (no tensor data read;
    other formats are skipped)."""
    found: dict[str, str] = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            continue
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                found[name] = str(file)
    return found


def weight_files(path: PathLike) -> dict[str, str]:
    """tensor name -> safetensors file (absolute), for a single-file or sharded checkpoint."""
    path = Path(path)
    index = path / SAFE_INDEX
    if index.exists():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {name: str(path / shard) for name, shard in weight_map.items()}
    single = path / SAFE_SINGLE
    return tensor_files([single]) if single.exists() else {}


def transform_tensor_names(names: Iterable[str]) -> list[str]:
    """The names that are compressed-tensors q_attn/k_cache transform tensors."""
    return [n for n in names if TRANSFORM_KEY.match(n)]


def read_tensors(files: dict[str, str], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read only ``names`` (grouped by file) from a checkpoint."""
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for file, wanted in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name in wanted:
                out[name] = f.get_tensor(name)
    return out


def write_r3_extras(
    save_dir: PathLike,
    transform_config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
) -> None:
    """Restore ``transform_config`` in config.json and add the R3 ``tensors`` as a shard.

    A single ``model.safetensors`` becomes ``model-00001-of-00001.safetensors`` plus the R3
    shard, with an index (transformers prefers a single file when both exist, so the rename is
    required for the extra shard to be seen).
    """
    save_dir = Path(save_dir)
    config_path = save_dir / CONFIG_NAME
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    qc = config.get("quantization_config") or {}
    qc["quant_method"] = "compressed-tensors"
    qc["transform_config"] = transform_config
    config["quantization_config"] = qc
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    if not tensors:
        return
    index_path = save_dir / SAFE_INDEX
    if index_path.exists():
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    else:
        single = save_dir / SAFE_SINGLE
        if not single.exists():
            raise FileNotFoundError(f"{save_dir} has neither {SAFE_SINGLE} nor {SAFE_INDEX}")
        renamed = "model-00001-of-00001.safetensors"
        with safe_open(str(single), framework="pt") as f:
            names = list(f.keys())
        os.replace(single, save_dir / renamed)
        index = {"metadata": {}, "weight_map": {n: renamed for n in names}}
    shard = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(shard, str(save_dir / R3_SHARD), metadata={"format": "pt"})
    for name in shard:
        index["weight_map"][name] = R3_SHARD
    total = index.setdefault("metadata", {}).get("total_size")
    if total is not None:
        extra = sum(t.numel() * t.element_size() for t in shard.values())
        index["metadata"]["total_size"] = total + extra
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
