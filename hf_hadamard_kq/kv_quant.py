"""Simulated ("fake-quant") KV-cache quantization, for measuring what R3 buys.

R3 only changes the numbers stored in the KV cache (rotated keys); in full precision the model
is unchanged. To measure its effect we quantize and immediately dequantize what is written to
the cache, so every attention read sees exactly the values a real low-bit cache would return,
while the arithmetic stays in the activation dtype. This is a measuring instrument, not a
memory saving: nothing is stored in low precision.

Formats (``fmt``):

* ``int8`` / ``int4`` / ``int2``: uniform integer grid. Asymmetric by default (min/max of the
  group map to the ends of the grid, ``2**bits`` levels, float zero point, as KIVI and the
  transformers quanto/HQQ caches do); ``symmetric=True`` uses ``absmax / (2**(bits-1) - 1)``
  and the levels ``-(2**(bits-1) - 1) .. 2**(bits-1) - 1`` (int2 symmetric = {-1, 0, 1}).
* ``fp8``: float8 e4m3 (``torch.float8_e4m3fn``) after scaling the group's absmax to 448.

Granularity (where one scale is shared), for K and V separately:

* ``token``: one scale per (batch, head, token) over ``token_group`` channels of the head
  (default: the whole head_dim). Causal: a token's value depends only on that token.
* ``channel``: one scale per (batch, head, channel) over ``channel_group`` consecutive tokens
  (KIVI's key quantization). Tokens wait in full precision until a group of ``channel_group``
  is complete, then the group is quantized in place (so in a teacher-forced forward of S
  tokens, the last ``S % channel_group`` tokens stay unquantized; use S a multiple of it).
  Within a group, a token's scale depends on the other tokens of its group.
* ``tensor``: one scale per layer for K (and one for V), taken from the absmax of the first
  write (the prefill) and then frozen, like transformers' ``Fp8QuantizedLayer`` and static
  ``k_scale``/``v_scale`` checkpoints. Later values beyond the range are clipped.

With R3 installed (``apply_r3`` or an R3 checkpoint loaded with ``hadamard_kq``), the keys that
reach :class:`FakeQuantCache` are already rotated: the rotation happens in the per-call cache
view before ``update`` (see ``hf_hadamard_kq.cache``), so the same cache measures both arms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

FORMATS = ("fp8", "int8", "int4", "int2")
GRANULARITIES = ("token", "channel", "tensor")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class KVQuantSpec:
    """How a simulated quantized KV cache stores keys and values.

    ``key_granularity`` / ``value_granularity``: ``token``, ``channel`` or ``tensor`` (see the
    module docstring). ``token_group``: channels per scale for ``token`` (None = head_dim).
    ``channel_group``: tokens per scale for ``channel``. ``quantize_values``: False leaves V
    in full precision (isolates the effect on keys, the only thing R3 changes).
    """

    fmt: str = "int4"
    key_granularity: str = "token"
    value_granularity: str = "token"
    token_group: Optional[int] = None
    channel_group: int = 64
    quantize_values: bool = True
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {self.fmt!r}")
        for name in ("key_granularity", "value_granularity"):
            if getattr(self, name) not in GRANULARITIES:
                raise ValueError(f"{name} must be one of {GRANULARITIES}, got "
                                 f"{getattr(self, name)!r}")
        if self.channel_group < 1 or (self.token_group is not None and self.token_group < 1):
            raise ValueError("group sizes must be positive")

    def describe(self) -> str:
        def one(gran: str) -> str:
            if gran == "token":
                return f"per-token (group {self.token_group or 'head_dim'} channels)"
            if gran == "channel":
                return f"per-channel (group {self.channel_group} tokens)"
            return "per-tensor (scale frozen at the first write)"

        kind = "symmetric" if self.symmetric and self.fmt != "fp8" else (
            "e4m3" if self.fmt == "fp8" else "asymmetric")
        values = one(self.value_granularity) if self.quantize_values else "full precision"
        return f"{self.fmt} {kind}; K {one(self.key_granularity)}; V {values}"


def _bits(fmt: str) -> int:
    return int(fmt[3:])


def _quant_dequant(x: torch.Tensor, fmt: str, reduce_dims: tuple[int, ...],
                   symmetric: bool) -> torch.Tensor:
    """Round ``x`` (float32) to ``fmt`` with one scale per slice over ``reduce_dims``."""
    if fmt == "fp8":
        scale = x.abs().amax(dim=reduce_dims, keepdim=True).div(FP8_MAX).clamp_min(_TINY)
        return (x / scale).to(FP8_DTYPE).to(torch.float32) * scale
    bits = _bits(fmt)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = x.abs().amax(dim=reduce_dims, keepdim=True).div(qmax).clamp_min(_TINY)
        return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale
    levels = 2**bits - 1
    lo = x.amin(dim=reduce_dims, keepdim=True)
    hi = x.amax(dim=reduce_dims, keepdim=True)
    scale = (hi - lo).div(levels).clamp_min(_TINY)
    return torch.clamp(torch.round((x - lo) / scale), 0, levels) * scale + lo


def fake_quant(x: torch.Tensor, fmt: str, granularity: str = "token", *,
               token_group: Optional[int] = None, channel_group: int = 64,
               symmetric: bool = False) -> torch.Tensor:
    """Quantize and dequantize ``x`` of shape (..., S, D) (tokens, channels); same dtype back.

    ``token``: one scale per token per ``token_group`` channels (None = all D). ``channel``:
    one scale per channel per ``channel_group`` tokens (S must be a multiple of it).
    ``tensor``: one scale for all of ``x``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    dtype = x.dtype
    xf = x.to(torch.float32)
    *lead, s, d = xf.shape
    if granularity == "token":
        g = token_group or d
        if d % g:
            raise ValueError(f"token_group {g} does not divide the last dim {d}")
        out = _quant_dequant(xf.reshape(*lead, s, d // g, g), fmt, (-1,), symmetric)
    elif granularity == "channel":
        if s % channel_group:
            raise ValueError(f"channel_group {channel_group} does not divide {s} tokens")
        out = _quant_dequant(xf.reshape(*lead, s // channel_group, channel_group, d), fmt,
                             (-2,), symmetric)
    elif granularity == "tensor":
        out = _quant_dequant(xf, fmt, tuple(range(xf.dim())), symmetric)
    else:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return out.reshape(x.shape).to(dtype)


def _quant_with_scale(x: torch.Tensor, fmt: str, scale: torch.Tensor, lo: Optional[torch.Tensor],
                      symmetric: bool) -> torch.Tensor:
    """Quantize with a frozen (per-tensor) scale; values outside the range are clipped."""
    xf = x.to(torch.float32)
    if fmt == "fp8":
        out = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(torch.float32) * scale
    elif symmetric:
        qmax = 2 ** (_bits(fmt) - 1) - 1
        out = torch.clamp(torch.round(xf / scale), -qmax, qmax) * scale
    else:
        levels = 2 ** _bits(fmt) - 1
        out = torch.clamp(torch.round((xf - lo) / scale), 0, levels) * scale + lo
    return out.to(x.dtype)


def _frozen_scale(x: torch.Tensor, fmt: str, symmetric: bool):
    xf = x.to(torch.float32)
    if fmt == "fp8":
        return xf.abs().amax().div(FP8_MAX).clamp_min(_TINY), None
    if symmetric:
        return xf.abs().amax().div(2 ** (_bits(fmt) - 1) - 1).clamp_min(_TINY), None
    lo, hi = xf.amin(), xf.amax()
    return (hi - lo).div(2 ** _bits(fmt) - 1).clamp_min(_TINY), lo


class FakeQuantCache(DynamicCache):
    """A DynamicCache whose stored K/V go through :func:`fake_quant` on the way in.

    Every read (including the attention of the tokens just written) sees the dequantized
    values, as a real quantized cache would return them. Works with ``model(...)`` and
    ``model.generate(past_key_values=...)``. Per-token and per-tensor work with every
    DynamicCache layer type; per-channel needs plain (full-attention) layers and supports
    appends only (no ``crop`` / beam reordering: its group bookkeeping would go stale).
    """

    def __init__(self, spec: KVQuantSpec, config=None) -> None:
        super().__init__(config=config)
        self.spec = spec
        self._done: dict[tuple[int, str], int] = {}  # (layer, "k"/"v") -> tokens quantized
        self._frozen: dict[tuple[int, str], tuple] = {}

    def _on_write(self, x: torch.Tensor, layer_idx: int, which: str, granularity: str):
        spec = self.spec
        if granularity == "token":
            return fake_quant(x, spec.fmt, "token", token_group=spec.token_group,
                              symmetric=spec.symmetric)
        if granularity == "tensor":
            key = (layer_idx, which)
            if key not in self._frozen:
                self._frozen[key] = _frozen_scale(x, spec.fmt, spec.symmetric)
            scale, lo = self._frozen[key]
            return _quant_with_scale(x, spec.fmt, scale, lo, spec.symmetric)
        return x  # channel: quantized after the append, once a group is complete

    def _close_groups(self, stored: torch.Tensor, layer_idx: int, which: str) -> None:
        """Quantize, in place, every complete ``channel_group`` of tokens not yet quantized."""
        g = self.spec.channel_group
        key = (layer_idx, which)
        done = self._done.get(key, 0)
        full = (stored.shape[-2] - done) // g * g
        if full:
            segment = stored[..., done:done + full, :]
            stored[..., done:done + full, :] = fake_quant(
                segment, self.spec.fmt, "channel", channel_group=g, symmetric=self.spec.symmetric)
            self._done[key] = done + full

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs):
        spec = self.spec
        v_gran = spec.value_granularity if spec.quantize_values else None
        key_states = self._on_write(key_states, layer_idx, "k", spec.key_granularity)
        if v_gran is not None:
            value_states = self._on_write(value_states, layer_idx, "v", v_gran)
        super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        if "channel" in (spec.key_granularity, v_gran):
            if type(layer) is not DynamicLayer:
                raise NotImplementedError(
                    f"FakeQuantCache: per-channel quantization needs plain DynamicLayer layers, "
                    f"layer {layer_idx} is {type(layer).__name__}"
                )
            if spec.key_granularity == "channel":
                self._close_groups(layer.keys, layer_idx, "k")
            if v_gran == "channel":
                self._close_groups(layer.values, layer_idx, "v")
        return layer.keys, layer.values


def make_cache(spec: Optional[KVQuantSpec], config=None) -> DynamicCache:
    """A FakeQuantCache for ``spec``, or a plain DynamicCache for None (no quantization)."""
    return DynamicCache(config=config) if spec is None else FakeQuantCache(spec, config=config)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact||^2 / ||exact||^2`` in float64 (a relative MSE)."""
    a, e = approx.double(), exact.double()
    return float((a - e).pow(2).sum() / e.pow(2).sum().clamp_min(1e-300))


def outlier_stats(x: torch.Tensor) -> dict[str, float]:
    """Outlier statistics of activations ``x`` (..., tokens, channels), pooled over the rest.

    * ``max_over_rms``: the largest |value| of any channel divided by the RMS of all values
      (how far the worst channel sticks out; ~4-5 for Gaussian data of this size).
    * ``channel_rms_ratio``: the largest per-channel RMS divided by the median per-channel RMS
      (1 = all channels alike; large = outlier channels).
    * ``kurtosis``: E[(x - mean)^4] / var^2 of all entries (3 for a Gaussian).
    """
    xf = x.double().reshape(-1, x.shape[-1])
    rms = xf.pow(2).mean().sqrt()
    channel_rms = xf.pow(2).mean(0).sqrt()
    centred = xf - xf.mean()
    var = centred.pow(2).mean()
    return {
        "max_over_rms": float(xf.abs().max() / rms),
        "channel_rms_ratio": float(channel_rms.max() / channel_rms.median()),
        "kurtosis": float(centred.pow(4).mean() / var.pow(2)),
    }


def attention_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_hat: torch.Tensor,
                     v_hat: Optional[torch.Tensor] = None, *, causal: bool = False,
                     scaling: Optional[float] = None) -> dict[str, float]:
    """Relative errors of attention scores and outputs when K (and V) are replaced by
    their quantized versions. Shapes (..., S, D); ``scaling`` defaults to 1/sqrt(D)."""
    scaling = 1.0 / math.sqrt(q.shape[-1]) if scaling is None else scaling
    qd, kd, vd, khd = q.double(), k.double(), v.double(), k_hat.double()
    vhd = vd if v_hat is None else v_hat.double()
    s = qd @ kd.transpose(-1, -2) * scaling
    s_hat = qd @ khd.transpose(-1, -2) * scaling
    if causal:
        n = s.shape[-1]
        mask = torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
        s_hat = s_hat.masked_fill(mask, float("-inf"))
        finite = ~mask
        score_err = float((s_hat - s)[..., finite].pow(2).sum() / s[..., finite].pow(2).sum())
    else:
        score_err = relative_error(s_hat, s)
    out = torch.softmax(s, -1) @ vd
    out_hat = torch.softmax(s_hat, -1) @ vhd
    return {"score": score_err, "output": relative_error(out_hat, out)}
