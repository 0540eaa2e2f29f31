"""Building blocks shared by every model family: norm, RoPE, the one linear, attention dispatch.

Shapes follow `jax.nn.dot_product_attention`: activations are `[batch, seq, heads, head_dim]`.
Every function is pure; parameters arrive as nested dicts of arrays.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from easytune.models import nf4

# A large finite negative instead of -inf: a fully masked row (a padding query) then gives a
# uniform distribution instead of NaN, and NaN never leaks into gradients.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

BATCH_AXES = ("dp", "fsdp")


def constrain(x: jax.Array, spec: P) -> jax.Array:
    """Sharding constraint on an activation; a no-op outside a mesh context (`jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not all(name in mesh.axis_names for name in ("dp", "fsdp", "mp")):
        return x
    return jax.lax.with_sharding_constraint(x, spec)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as in LLaMA/T5: statistics in float32, then the weight in the input dtype."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * x32.astype(dtype)


def linear(x: jax.Array, p: Mapping[str, Any]) -> jax.Array:
    """The one dense projection: `x [..., in] @ kernel [in, out] (+ bias)` in x's dtype.

    Adapters extend it by the keys they add to `p` (see `easytune.adapters`); model code never
    changes for them:
      nf4_*                  the kernel stored as NF4 (QLoRA), dequantized here
      lora_a [in, r], lora_b [r, out], lora_scale []
                             LoRA: y += scale * dropout(x) @ a @ b
      lora_dropout_key, lora_dropout_rate
                             LoRA dropout on the adapter's input (training only)
      lora_magnitude [out]   DoRA: the output rescaled by magnitude / ||W + scale * a @ b|| per
                             column, the norm treated as a constant (as the DoRA paper and peft do)
    x's last dim is the kernel's true input size (NF4 pads it to a multiple of 64).
    """
    if "kernel" in p:
        kernel = p["kernel"].astype(x.dtype)
    else:
        kernel = nf4.dequantize(p, x.shape[-1], x.dtype)
    y = jnp.einsum("...i,io->...o", x, kernel)
    if "lora_a" in p:
        scale = p["lora_scale"].astype(x.dtype)
        adapter_input = x
        if "lora_dropout_key" in p:
            rate = p["lora_dropout_rate"]
            keep = jax.random.bernoulli(p["lora_dropout_key"], 1.0 - rate, x.shape)
            adapter_input = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros((), x.dtype))
        a, b = p["lora_a"].astype(x.dtype), p["lora_b"].astype(x.dtype)
        delta = jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", adapter_input, a), b) * scale
        if "lora_magnitude" in p:
            combined = kernel.astype(jnp.float32) + scale.astype(jnp.float32) * (
                a.astype(jnp.float32) @ b.astype(jnp.float32))
            norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(jnp.square(combined), axis=0)))
            ratio = (p["lora_magnitude"].astype(jnp.float32) / norm).astype(x.dtype)
            # with dropout, peft rescales the dropped-out input's base output (DoRA paper, eq. 5)
            dropped_base = y if adapter_input is x else jnp.einsum("...i,io->...o", adapter_input, kernel)
            y = y + (ratio - 1) * dropped_base + ratio * delta
        else:
            y = y + delta
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    return y


# ----------------------------------------------------------------------------- rotary embeddings

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> jax.Array:
    """Inverse frequencies `[head_dim // 2]` (float32) for plain, `linear` and `llama3` RoPE.

    Computed as transformers does, so positions map to identical angles.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(is_medium, smoothed, scaled)
    raise ValueError(
        f"rope scaling type {rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}."
    )


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate `x [batch, seq, heads, head_dim]` by `positions [batch, seq]` (rotate-half layout)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------- attention

def attention_mask(
    q_positions: jax.Array,
    q_segment_ids: jax.Array,
    kv_positions: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
) -> jax.Array:
    """Boolean mask `[batch, q_len, kv_len]`: which keys each query may attend to.

    Segment id 0 marks padding (never attended); keys of another segment are never attended, so
    packed examples stay independent. Causality and the sliding window are judged on positions,
    which makes the same rule serve training, prefill and decoding from a (ring-buffer) KV cache.
    """
    q_pos, kv_pos = q_positions[:, :, None], kv_positions[:, None, :]
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    if causal:
        mask &= kv_pos <= q_pos
    if sliding_window is not None:
        mask &= q_pos - kv_pos < sliding_window
    return mask


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference attention. q `[b, s, h, d]`, k/v `[b, t, kv_h, d]`, mask `[b, s, t]` -> `[b, s, h, d]`.

    GQA without repeating K/V: query heads are grouped per KV head. Softmax in float32.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    groups = num_heads // num_kv_heads
    q = q.reshape(batch, q_len, num_kv_heads, groups, head_dim)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(head_dim)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(batch, q_len, num_heads, head_dim)


ATTENTION_IMPLEMENTATIONS = {"xla": xla_attention}


def attention(q, k, v, mask, implementation: str = "xla"):
    """Dispatch point for every attention in every model (`--attention`)."""
    try:
        fn = ATTENTION_IMPLEMENTATIONS[implementation]
    except KeyError:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; "
            f"choose one of {sorted(ATTENTION_IMPLEMENTATIONS)}."
        ) from None
    return fn(q, k, v, mask)
