"""Rotary position embedding: inverse frequencies for each ``rope_type`` and their use.

The formulas follow transformers' ``modeling_rope_utils`` step by step (same dtypes,
same order of operations), so a model rotates exactly as it did when it was trained.
"""

from __future__ import annotations

import math

import torch

from kubetrain.core.hf_config import Rope


def _exponents(head_dim: int) -> torch.Tensor:
    # Explicit CPU device: models are built under torch.device("meta") before their
    # weights are loaded, and these buffers are computed, not loaded.
    return torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim


def inverse_frequencies(rope: Rope, head_dim: int) -> tuple[torch.Tensor, float]:
    """The (head_dim/2,) inverse frequencies and the factor cos and sin are scaled by.

    For ``dynamic`` these are the frequencies up to the trained context;
    :func:`dynamic_frequencies` stretches them for longer inputs.
    """
    base = rope.theta
    inv_freq = 1.0 / (base ** _exponents(head_dim))
    if rope.type in ("default", "dynamic"):
        return inv_freq, 1.0
    if rope.type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.type == "llama3":
        return _llama3(rope, inv_freq), 1.0
    return _yarn(rope, head_dim)


def _llama3(rope: Rope, inv_freq: torch.Tensor) -> torch.Tensor:
    assert rope.original_max_positions is not None  # checked when the config was read
    old_context = rope.original_max_positions
    low_wavelen = old_context / rope.low_freq_factor
    high_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rope: Rope, head_dim: int) -> tuple[torch.Tensor, float]:
    assert rope.original_max_positions is not None  # checked when the config was read
    base, factor, original = rope.theta, rope.factor, rope.original_max_positions

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = torch.clamp(
        (torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1
    )
    pos_freqs = base ** _exponents(head_dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (
        1.0 / pos_freqs
    ) * extrapolation
    return inv_freq, float(attention_factor)


def dynamic_frequencies(
    rope: Rope,
    head_dim: int,
    max_positions: int,
    inv_freq: torch.Tensor,
    position_ids: torch.Tensor,
) -> torch.Tensor:
    """Dynamic NTK scaling: the base grows once the input reaches past ``max_positions``.

    Tensor operations only (no ``.item()``), so ``torch.compile`` traces it without a
    graph break; within the trained context the frequencies are exactly ``inv_freq``.
    """
    seq_len = position_ids.max() + 1
    stretched = torch.clamp(seq_len, min=max_positions)
    base = rope.theta * ((rope.factor * stretched / max_positions) - (rope.factor - 1)) ** (
        head_dim / (head_dim - 2)
    )
    dynamic = 1.0 / (base ** _exponents(head_dim).to(position_ids.device))
    return torch.where(seq_len > max_positions, dynamic, inv_freq)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, T, head_dim) for ``position_ids`` (B, T), computed in float32."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, heads, T, head_dim) by the angles in cos/sin (B, T, head_dim)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin
