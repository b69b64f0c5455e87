"""Helpers for the KV-quantization measurements (``hf-hadamard-kq eval``, notebook 02).

The built-in text is real English prose that every CPython installation ships: the
documentation topics of ``pydoc_data.topics`` (the Python language reference as shown by
``help()``: ~465 kB on CPython 3.11, PSF licence). It needs no download and is the same on
every machine with the same Python version. Topics are taken in sorted order; every 10th
topic (0, 10, 20, ...) is the held-out ``eval`` split, the rest is ``train``.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .kv_quant import KVQuantSpec, make_cache

SPLITS = ("all", "train", "eval")


def builtin_text(split: str = "all") -> str:
    """English text shipped with the interpreter (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # stripped-down Python builds
        raise RuntimeError("this Python has no pydoc_data; pass a text file instead") from exc
    names = sorted(topics)
    if split == "train":
        names = [n for i, n in enumerate(names) if i % 10]
    elif split == "eval":
        names = [n for i, n in enumerate(names) if i % 10 == 0]
    return "\n\n".join(topics[n].strip() for n in names)


def load_text(path: Optional[Path], split: str = "eval") -> str:
    if path is None:
        return builtin_text(split)
    return Path(path).read_text(encoding="utf-8")


def cache_kwarg(model: nn.Module) -> str:
    """The name of the model forward's cache argument (``cache`` on transformers >= 5.24,
    ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, spec: Optional[KVQuantSpec], *,
               context: int = 256, batch_size: int = 8, progress: bool = False,
               desc: str = "") -> float:
    """Perplexity of ``model`` on the 1-D token tensor ``ids`` with a (simulated) quantized
    KV cache. Non-overlapping windows of ``context`` tokens (a trailing partial window is
    dropped), each a fresh cache and one teacher-forced forward, so every query attends to
    keys/values read back through the cache (quantized on write, see kv_quant)."""
    n_windows = ids.numel() // context
    if n_windows == 0:
        raise ValueError(f"need at least {context} tokens, got {ids.numel()}")
    windows = ids[: n_windows * context].view(n_windows, context)
    kwarg = cache_kwarg(model)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    batches = range(0, n_windows, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc or "perplexity", unit="batch", leave=False)
    for start in batches:
        batch = windows[start:start + batch_size].to(device)
        cache = make_cache(spec, config=model.config)
        logits = model(input_ids=batch, use_cache=True, **{kwarg: cache}).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
            reduction="sum")
        nll += float(loss)
        count += batch[:, 1:].numel()
    return math.exp(nll / count)
