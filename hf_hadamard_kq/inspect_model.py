"""A readable view of what is rotated where, for users checking a loaded model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .fused import FUSED_ATTR
from .install import attention_modules, installed_plan
from .specs import SLOT_ATTR, SPECS

#: ``rotation_table`` "path" values.
FUSED_PATH = "fused at RoPE (q and k in one call; general path where a call does not qualify)"
GENERAL_PATH = "general (K in cache.update, Q in the attention function)"
#: ``rotation_table`` "compiled" values: the path under torch.compile.
MARKED_PATH = "fused at RoPE (the marked route: one rope_rotate_qk op per layer)"


def _compute(rotation, module: nn.Module) -> str:
    """How the op computes this rotation (mirrors cache.rotate and the op's dtype rules)."""
    if rotation.cast is not None:
        return f"input and result rounded to {rotation.cast} (the scheme's precision)"
    buffer = module._buffers.get(rotation.buffer) if rotation.buffer else None
    if buffer is not None and buffer.dtype == torch.float64:
        return "float64 matmul (torch), one rounding to the activation dtype"
    return "fp32 accumulate, one rounding to the activation dtype"


def rotation_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row per attention module: which of q / k it rotates, the type, block and matrix,
    and (rotated layers) which path rotates them in eager code (``path``: ``FUSED_PATH`` /
    ``GENERAL_PATH``; the fused path still falls back per call, e.g. under autograd) and
    under torch.compile (``compiled``: ``MARKED_PATH`` / ``GENERAL_PATH``; fused.py, "Under
    torch.compile")."""
    plan = installed_plan(model)
    rows = []
    for name, module in attention_modules(model).items():
        layer = plan.layers.get(name) if plan is not None else None
        row: dict[str, Any] = {"module": name, "class": type(module).__name__}
        if layer is not None:
            row["path"] = FUSED_PATH if FUSED_ATTR in module.__dict__ else GENERAL_PATH
            slot = module.__dict__.get(SLOT_ATTR)
            traced = slot is not None and SPECS[slot].traced
            row["compiled"] = MARKED_PATH if traced else GENERAL_PATH
        for slot in ("q", "k"):
            rot = getattr(layer, slot) if layer is not None else None
            row[slot] = None if rot is None else {
                "group": rot.group,
                "type": rot.transform_type,
                "block": rot.block,
                "matrix": "sylvester (in-kernel)" if rot.matrix is None else (
                    f"stored {tuple(rot.matrix.shape)} {rot.matrix.dtype}"
                ),
                "inverse": rot.inverse,
                "compute": _compute(rot, module),
            }
        rows.append(row)
    return rows


def describe(model: nn.Module) -> str:
    """A table of every attention layer and what hf_hadamard_kq rotates in it."""
    rows = rotation_table(model)
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    lines = [f"{type(model).__name__} attn_implementation={impl!r}"]
    if installed_plan(model) is None:
        lines.append("  no hf_hadamard_kq rotation installed")
    for row in rows:
        parts = []
        for slot, label in (("q", "Q"), ("k", "K (before cache)")):
            r = row[slot]
            parts.append(f"{label}: " + ("-" if r is None else f"{r['type']} b={r['block']} "
                                          f"[{r['matrix']}]"))
        if "path" in row:
            parts.append(("fused" if row["path"] == FUSED_PATH else "general") + ", compiled: "
                         + ("fused" if row["compiled"] == MARKED_PATH else "general"))
        lines.append(f"  {row['module']:<32} " + " | ".join(parts))
    return "\n".join(lines)
