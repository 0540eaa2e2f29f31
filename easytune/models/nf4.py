"""4-bit NormalFloat (NF4) weights with double quantization, as in QLoRA (Dettmers et al., 2023).

A kernel `[..., in, out]` is cut into blocks of 64 consecutive input rows per output column; each
block is scaled by its absolute maximum and every value is replaced by the index of the nearest of
16 NF4 levels, two indices per byte. The block maxima are quantized again ("double
quantization"): minus their mean, to int8 in groups of 256 along the output axis with one float32
scale per group. That is 4 + 8/64 + 32/(64*256) ≈ 4.127 bits per weight, 0.258x of bf16.

Stored leaves (they replace `kernel` in a linear's parameter dict, see `layers.linear`):
  nf4_codes         uint8 `[..., in_padded / 2, out]`  (low nibble: even row, high nibble: odd row)
  nf4_absmax        int8  `[..., in_padded / 64, out]`
  nf4_absmax_scale  float32 `[..., in_padded / 64, ceil(out / 256)]`
  nf4_absmax_offset float32 `[..., 1, 1]`
The input dim is padded to a multiple of 64 with zeros; `dequantize` trims it back to `in_features`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BLOCK_SIZE = 64          # weights per absmax, as in the QLoRA paper
ABSMAX_GROUP_SIZE = 256  # absmax values per second-level scale, as in the QLoRA paper
KEYS = ("nf4_codes", "nf4_absmax", "nf4_absmax_scale", "nf4_absmax_offset")

# The NF4 data type: quantiles of N(0, 1) normalized to [-1, 1] with an exact zero (the table
# bitsandbytes uses, so our codes mean the same levels).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)


def is_quantized(p) -> bool:
    return "nf4_codes" in p


def _repeat_groups(values: jax.Array, group: int, length: int) -> jax.Array:
    """`[..., n_groups]` -> `[..., length]`, each value repeated `group` times (last group trimmed)."""
    return jnp.repeat(values, group, axis=-1, total_repeat_length=values.shape[-1] * group)[..., :length]


def quantize(kernel: jax.Array) -> dict[str, jax.Array]:
    """NF4-quantize `kernel [..., in, out]` (any float dtype); jit it to keep memory to the outputs."""
    kernel = kernel.astype(jnp.float32)
    *lead, in_features, out_features = kernel.shape
    padded = -(-in_features // BLOCK_SIZE) * BLOCK_SIZE
    if padded != in_features:
        kernel = jnp.pad(kernel, [(0, 0)] * len(lead) + [(0, padded - in_features), (0, 0)])
    blocks = kernel.reshape(*lead, padded // BLOCK_SIZE, BLOCK_SIZE, out_features)
    absmax = jnp.max(jnp.abs(blocks), axis=-2)                                   # [..., nb, out]
    normalized = blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None, :]
    # nearest level: count the midpoints below each value
    midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    codes = jnp.searchsorted(midpoints, normalized.reshape(*lead, padded, out_features)).astype(jnp.uint8)
    codes = codes.reshape(*lead, padded // 2, 2, out_features)
    packed = codes[..., 0, :] | (codes[..., 1, :] << 4)

    offset = jnp.mean(absmax, axis=(-2, -1), keepdims=True)
    centered = absmax - offset
    num_groups = -(-out_features // ABSMAX_GROUP_SIZE)
    group_pad = num_groups * ABSMAX_GROUP_SIZE - out_features
    grouped = jnp.pad(centered, [(0, 0)] * (centered.ndim - 1) + [(0, group_pad)])
    grouped = grouped.reshape(*centered.shape[:-1], num_groups, ABSMAX_GROUP_SIZE)
    scale = jnp.max(jnp.abs(grouped), axis=-1) / 127.0                          # [..., nb, groups]
    absmax_q = jnp.round(centered / _repeat_groups(jnp.where(scale == 0, 1.0, scale), ABSMAX_GROUP_SIZE,
                                                   out_features))
    return {"nf4_codes": packed, "nf4_absmax": jnp.clip(absmax_q, -127, 127).astype(jnp.int8),
            "nf4_absmax_scale": scale, "nf4_absmax_offset": offset}


def dequantize(p, in_features: int, dtype) -> jax.Array:
    """The kernel `[..., in_features, out]` in `dtype` from the NF4 leaves of `p`."""
    packed = p["nf4_codes"]
    *lead, half, out_features = packed.shape
    absmax = (p["nf4_absmax"].astype(jnp.float32)
              * _repeat_groups(p["nf4_absmax_scale"], ABSMAX_GROUP_SIZE, out_features)
              + p["nf4_absmax_offset"])                                         # [..., nb, out]
    levels = jnp.asarray(NF4_LEVELS)
    codes = jnp.stack([packed & 15, packed >> 4], axis=-2)                      # [..., half, 2, out]
    values = levels[codes.astype(jnp.int32)].reshape(*lead, half * 2 // BLOCK_SIZE, BLOCK_SIZE, out_features)
    kernel = (values * absmax[..., None, :]).reshape(*lead, half * 2, out_features)
    return kernel[..., :in_features, :].astype(dtype)


def nbytes(p) -> int:
    return sum(int(np.prod(p[k].shape)) * p[k].dtype.itemsize for k in KEYS)
