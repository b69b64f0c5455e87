"""Shared by bench_generate.py and tp_check.py: Llama configs (Llama-3-8B shapes or tiny), a
random-weight R3 checkpoint on disk, and torch.distributed setup under torchrun.

Why a checkpoint on disk for multi-GPU runs: transformers applies tensor parallelism
(``tp_plan="auto"``) only in ``from_pretrained`` (``_from_config`` takes no plan), so a TP run
needs a checkpoint to load. It is built once, by rank 0 only (the other ranks wait at a
barrier), and reused when it already exists (``.r3_complete`` records its settings).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch

import hf_hadamard_kq

#: Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json), without the layer count.
LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
    num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
    rms_norm_eps=1e-5, tie_word_embeddings=False,
)
#: A CPU-sized Llama whose 8 heads / 4 kv heads split over 2 or 4 ranks (head_dim 16).
TINY = dict(
    vocab_size=256, hidden_size=128, intermediate_size=256, num_attention_heads=8,
    num_key_value_heads=4, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
COMPLETE = ".r3_complete"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def llama_config(layers: int, tiny: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, **(TINY if tiny else LLAMA3_8B))


def build_r3_checkpoint(path: Path, config, dtype: torch.dtype, device: str,
                        transform: str = "hadamard", seed: int = 0) -> Path:
    """Write a random-weight R3 checkpoint (llm-compressor layout) to ``path`` unless one with
    the same settings is already there. Random init with ``seed`` on ``device``; R3 via
    ``apply_r3`` (``transform`` "hadamard" or "random-hadamard", block = head_dim)."""
    from transformers import LlamaForCausalLM

    path = Path(path)
    settings = dict(config=config.to_diff_dict(), dtype=str(dtype), transform=transform,
                    seed=seed)
    settings = json.loads(json.dumps(settings, default=str))
    marker = path / COMPLETE
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return path
    if path.exists():  # stale or partial: remove what a previous build wrote
        marker.unlink(missing_ok=True)
        for file in [*path.glob("*.safetensors"), *path.glob("*.safetensors.index.json")]:
            file.unlink()
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    transform_config = hf_hadamard_kq.default_r3_config(transform, head_dim=head_dim)
    hf_hadamard_kq.apply_r3(model.eval(), transform_config, seed=seed)
    hf_hadamard_kq.save_r3_pretrained(model, path)
    del model
    marker.write_text(json.dumps(settings))
    return path


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device). Under torchrun (``WORLD_SIZE`` > 1) the process
    group is created here -- gloo on CPU, NCCL bound to ``LOCAL_RANK``'s GPU -- with a long
    timeout, because rank 0 may spend minutes building a checkpoint while the others wait.
    transformers' TP loading then reuses this group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world == 1:
        return 0, 1, dev
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device == "cuda" else "gloo",
            device_id=dev if device == "cuda" else None,
            timeout=timedelta(minutes=30),
        )
    return dist.get_rank(), dist.get_world_size(), dev


def barrier() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()

