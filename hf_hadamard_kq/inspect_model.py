"""A readable view of what is rotated where, for users checking a loaded model."""

from __future__ import annotations

from typing import Any

from torch import nn

from .install import attention_modules, installed_plan


def rotation_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row per attention module: which of q / k it rotates, the type, block and matrix."""
    plan = installed_plan(model)
    rows = []
    for name, module in attention_modules(model).items():
        layer = plan.layers.get(name) if plan is not None else None
        row: dict[str, Any] = {"module": name, "class": type(module).__name__}
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
                "compute": "fp32 accumulate, one rounding to the activation dtype",
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
        lines.append(f"  {row['module']:<32} " + " | ".join(parts))
    return "\n".join(lines)
