"""Building blocks shared by every model family: norm, RoPE, the one linear, attention dispatch.

Shapes follow `jax.nn.dot_product_attention`: activations are `[batch, seq, heads, head_dim]`.
Every function is pure; parameters arrive as nested dicts of arrays.
"""
from __future__ import annotations

import functools
import logging
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


def gemma_rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm: `x * (1 + w)`, all in float32, cast back to the input dtype at the end."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (x32 * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """`cap * tanh(x / cap)` (Gemma 2's logit soft-capping); x itself when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def dot_f32(a, b, contract_a: int = 1, contract_b: int = 0) -> jax.Array:
    """2-D dot with float32 accumulation, contracting the given dims (no transposed copy)."""
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


def _row_major_transpose(a: jax.Array) -> jax.Array:
    """`a.T` for a 2-D `a` with an even first dim, as a row-major copy in memory.

    XLA lowers a plain transpose feeding a dot as a column-major view (layout {0,1}) and folds it
    into the dot; XLA:CPU's native bf16 dots (YNNPACK) take only a row-major left operand, so a
    dot with a transposed left operand is upcast to float32 first and runs at float32 speed. The
    reshape through `[rows/2, 2, cols]` is not a bitcast of a column-major view, so XLA gives the
    result the default row-major layout and writes the copy.
    """
    rows, cols = a.shape
    return a.reshape(rows // 2, 2, cols).transpose(2, 0, 1).reshape(cols, rows)


def transposed_dot_f32(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a.T @ b` for `a [n, i]`, `b [n, o]` -> `[i, o]` float32: a weight gradient (tokens contracted).

    On CPU in bf16 (or fp16) the left operand is copied row-major first, so the dot runs as a
    native bf16 dot (about 2x the float32-upcast one on avx512_bf16; issue 21) at the cost of one
    copy of `a`, which is small beside the dot. On GPU/TPU, and in float32, it is the plain dot:
    their dot emitters take a transposed operand as it is.
    """
    def plain(a, b):
        return dot_f32(a, b, 0, 0)

    if a.dtype not in (jnp.bfloat16, jnp.float16) or a.shape[0] % 2:
        return plain(a, b)
    return jax.lax.platform_dependent(a, b, cpu=lambda a, b: dot_f32(_row_major_transpose(a), b, 1, 0),
                                      default=plain)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dot_2d(x, w, w_rows_out, out_dtype):
    """`x [n, in] @ w` (w `[in, out]`, or `[out, in]` with `w_rows_out`), w cast to x's dtype,
    accumulated in float32, returned in `out_dtype`; the backward's dots in x's dtype."""
    return dot_f32(x, w.astype(x.dtype), 1, 1 if w_rows_out else 0).astype(out_dtype)


def _dot_2d_fwd(x, w, w_rows_out, out_dtype):
    return _dot_2d(x, w, w_rows_out, out_dtype), (x, w)


def _dot_2d_bwd(w_rows_out, out_dtype, residuals, d_y):
    x, w = residuals
    d_y = d_y.astype(x.dtype)
    d_x = dot_f32(d_y, w.astype(x.dtype), 1, 0 if w_rows_out else 1).astype(x.dtype)
    d_w = transposed_dot_f32(d_y, x) if w_rows_out else transposed_dot_f32(x, d_y)
    return d_x, d_w.astype(w.dtype)


_dot_2d.defvjp(_dot_2d_fwd, _dot_2d_bwd)


def logits_matmul(x: jax.Array, w: jax.Array, *, w_rows_out: bool = False) -> jax.Array:
    """`x [..., hidden] @ w [hidden, vocab]` -> float32 `[..., vocab]`: an output head; with
    `w_rows_out`, w is `[vocab, hidden]` (a tied embedding) and used as it is stored.

    Like `matmul`, one 2-D dot with float32 accumulation; the float32 cotangent of the logits is
    cast to x's dtype for the backward's dots, as PyTorch's autocast does (in float32, exactly the
    einsum it replaces), so in bf16 the head's gradient dots are bf16 dots. A tied embedding is not
    transposed first: XLA makes `embedding.T` a column-major view, which XLA:CPU's bf16 dots do
    not take, so the forward and both gradient dots ran upcast to float32 (issue 21).
    """
    lead = x.shape[:-1]
    out = w.shape[0] if w_rows_out else w.shape[-1]
    return _dot_2d(x.reshape(-1, x.shape[-1]), w, w_rows_out, jnp.float32).reshape(*lead, out)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x [..., in] @ w [in, out]` -> `[..., out]` in x's dtype, as one 2-D dot over all tokens with
    float32 accumulation, forward and backward.

    Why not `einsum("...i,io->...o")`: on XLA:CPU the backward of the 3-D contraction materialises
    transposed copies of the activation gradients (`[b, s, out] -> [out, b*s]` read with a large
    stride); on `[tokens, in]` operands the gradients are plain dots (issue 21's profile: a fifth of
    an SFT step on SmolLM2). `preferred_element_type=float32` makes bf16 x bf16 dots accumulate in
    fp32, and on CPUs with avx512_bf16 run as native bf16 dots (without it XLA:CPU converts both
    operands to fp32 first). The custom VJP keeps the backward's operands in the compute dtype (the
    cotangent is cast back to it), so on GPU/TPU the gradient dots stay bf16 x bf16 with fp32
    accumulation, as einsum's were, instead of fp32 x bf16 ones; fp32 models compute exactly the same.
    w may be kept in another dtype (float32 master weights): it is cast to x's dtype inside, and its
    gradient comes back in w's dtype straight from the float32 accumulator, so a bf16 model's weight
    gradients are never rounded to bf16 and cast back (on XLA:CPU that cast, fused with the layer
    scan's write of the gradient, copied the whole stacked gradient each layer: issue 21).
    """
    lead = x.shape[:-1]
    return _dot_2d(x.reshape(-1, x.shape[-1]), w, False, x.dtype).reshape(*lead, w.shape[-1])


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
        kernel = p["kernel"]  # cast to x's dtype inside `matmul`: its gradient comes back in the kernel's
    else:
        kernel = nf4.dequantize(p, x.shape[-1], x.dtype)
    y = matmul(x, kernel)
    if "lora_a" in p:
        scale = p["lora_scale"].astype(x.dtype)
        adapter_input = x
        if "lora_dropout_key" in p:
            rate = p["lora_dropout_rate"]
            keep = jax.random.bernoulli(p["lora_dropout_key"], 1.0 - rate, x.shape)
            adapter_input = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros((), x.dtype))
        a, b = p["lora_a"].astype(x.dtype), p["lora_b"].astype(x.dtype)
        delta = matmul(matmul(adapter_input, a), b) * scale
        if "lora_magnitude" in p:
            combined = kernel.astype(jnp.float32) + scale.astype(jnp.float32) * (
                a.astype(jnp.float32) @ b.astype(jnp.float32))
            norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(jnp.square(combined), axis=0)))
            ratio = (p["lora_magnitude"].astype(jnp.float32) / norm).astype(x.dtype)
            # with dropout, peft rescales the dropped-out input's base output (DoRA paper, eq. 5)
            dropped_base = y if adapter_input is x else matmul(adapter_input, kernel)
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


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | None = None,
                  logit_softcap: float | None = None) -> jax.Array:
    """Reference attention. q `[b, s, h, d]`, k/v `[b, t, kv_h, d]`, mask `[b, s, t]` -> `[b, s, h, d]`.

    GQA without repeating K/V: query heads are grouped per KV head. Scores times `scale` (default
    1/sqrt(head_dim)), soft-capped by `logit_softcap` if given, then masked; softmax in float32.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    groups = num_heads // num_kv_heads
    q = q.reshape(batch, q_len, num_kv_heads, groups, head_dim)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = soft_cap(scores * (1 / math.sqrt(head_dim) if scale is None else scale), logit_softcap)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(batch, q_len, num_heads, head_dim)


# Query block of causal self-attention on CPU (`causal_blocks`).
CPU_QUERY_BLOCK = 128


def causal_blocks(q, k, v, mask, scale=None, logit_softcap=None, block: int = CPU_QUERY_BLOCK) -> jax.Array:
    """`xla_attention` of causal self-attention, the queries taken in blocks (at most 8), each block
    against the keys up to its own end only.

    The keys after a block's last query are never attended when positions rise with the index
    within a segment (the assumption the fused kernels make too, see `attention`), so the result is
    `xla_attention`'s; the work is (n + 1) / 2n of it for n blocks, and each block's scores are
    smaller. On XLA:CPU, which materialises the scores, that is what counts: SmolLM2 attention
    forward + backward at 4 x 512 tokens went from 4.4 s to 2.7 s per step (PyTorch's SDPA: 2.0 s;
    issue 21). GPUs and TPUs use their fused kernels instead.
    """
    q_len = q.shape[1]
    count = min(8, max(1, q_len // block))
    size = -(-q_len // count)
    outs = []
    for start in range(0, q_len, size):
        end = min(start + size, q_len)
        outs.append(xla_attention(q[:, start:end], k[:, :end], v[:, :end], mask[:, start:end, :end], scale,
                                  logit_softcap))
    return jnp.concatenate(outs, axis=1)


def _xla(q, k, v, *, q_positions, q_segment_ids, kv_positions, kv_segment_ids, causal, sliding_window,
         scale=None, logit_softcap=None):
    """The reference: a boolean mask from positions and segment ids, then `xla_attention` (on CPU,
    causal self-attention over 2 or more query blocks: `causal_blocks`, the same result)."""
    self_attention = kv_positions is None
    if q_segment_ids is None:
        q_segment_ids = jnp.ones(q_positions.shape, jnp.int32)
    if kv_positions is None:
        kv_positions, kv_segment_ids = q_positions, q_segment_ids
    elif kv_segment_ids is None:
        kv_segment_ids = jnp.ones(kv_positions.shape, jnp.int32)
    mask = attention_mask(q_positions, q_segment_ids, kv_positions, kv_segment_ids,
                          causal=causal, sliding_window=sliding_window)
    if self_attention and causal and q.shape[1] >= 2 * CPU_QUERY_BLOCK:
        return jax.lax.platform_dependent(
            q, k, v, mask, cpu=lambda q, k, v, mask: causal_blocks(q, k, v, mask, scale, logit_softcap),
            default=lambda q, k, v, mask: xla_attention(q, k, v, mask, scale, logit_softcap))
    return xla_attention(q, k, v, mask, scale, logit_softcap)


def _pallas(q, k, v, *, q_positions, q_segment_ids, kv_positions, kv_segment_ids, causal, sliding_window,
            scale=None, logit_softcap=None):
    """easytune's fused kernel (`easytune.kernels.flash_attention`) for self-attention. Attention
    over a KV cache falls back to xla: a decode step has one query row, nothing for a flash kernel
    to tile, and chunked prefill into a used cache is rare."""
    if kv_positions is not None:
        return _xla(q, k, v, q_positions=q_positions, q_segment_ids=q_segment_ids, kv_positions=kv_positions,
                    kv_segment_ids=kv_segment_ids, causal=causal, sliding_window=sliding_window, scale=scale,
                    logit_softcap=logit_softcap)
    from easytune import kernels
    return kernels.flash_attention(q, k, v, causal=causal, segment_ids=q_segment_ids, sliding_window=sliding_window,
                                   scale=scale, logit_softcap=logit_softcap)


def _splash(q, k, v, *, q_positions, q_segment_ids, kv_positions, kv_segment_ids, causal, sliding_window,
            scale=None, logit_softcap=None):
    """JAX's Pallas TPU splash attention with easytune's semantics (`easytune.kernels.
    tpu_flash_attention`) for self-attention; attention over a KV cache falls back to xla, as pallas."""
    if kv_positions is not None:
        return _xla(q, k, v, q_positions=q_positions, q_segment_ids=q_segment_ids, kv_positions=kv_positions,
                    kv_segment_ids=kv_segment_ids, causal=causal, sliding_window=sliding_window, scale=scale,
                    logit_softcap=logit_softcap)
    from easytune import kernels
    return kernels.tpu_flash_attention(q, k, v, causal=causal, segment_ids=q_segment_ids,
                                       sliding_window=sliding_window, scale=scale, logit_softcap=logit_softcap)


def _cudnn(q, k, v, *, q_positions, q_segment_ids, kv_positions, kv_segment_ids, causal, sliding_window,
           scale=None, logit_softcap=None):
    """cuDNN's fused attention through `jax.nn.dot_product_attention` for self-attention (KV-cache
    attention falls back to xla). That API has no segment-id input, so packed or padded batches pass
    the segment part of the mask densely (`[batch, 1, seq, seq]` booleans, applied as a bias);
    causality and the window stay cuDNN's own, so it still skips the masked-out blocks. cuDNN has
    no logit soft-capping: a soft-capped attention (Gemma 2) runs the xla reference instead."""
    if logit_softcap is not None:
        _log_fallback_once("attention='cudnn' has no logit soft-capping: this model's attention runs xla instead.")
    if kv_positions is not None or logit_softcap is not None:
        return _xla(q, k, v, q_positions=q_positions, q_segment_ids=q_segment_ids, kv_positions=kv_positions,
                    kv_segment_ids=kv_segment_ids, causal=causal, sliding_window=sliding_window, scale=scale,
                    logit_softcap=logit_softcap)
    if jax.default_backend() != "gpu":
        raise ValueError(f"attention='cudnn' needs an NVIDIA GPU with cuDNN, but the backend is "
                         f"{jax.default_backend()}; use attention='xla' or 'auto'.")
    check_attention("cudnn", dtype=q.dtype)
    mask = None
    if q_segment_ids is not None:
        mask = attention_mask(q_positions, q_segment_ids, q_positions, q_segment_ids, causal=False)[:, None]
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal, local_window_size=window,
                                        implementation="cudnn")


@functools.lru_cache(maxsize=None)
def _log_fallback_once(reason: str) -> None:
    logging.getLogger(__name__).warning(reason)


def check_attention(implementation: str, head_dim: int | None = None, dtype=None) -> None:
    """Raise a one-sentence ValueError for an unknown implementation, for 'pallas' with a head_dim
    the kernel does not support, or for 'cudnn' with a compute dtype cuDNN's fused attention does
    not take (float32) (checked when a model config is made)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"choose one of {sorted(ATTENTION_IMPLEMENTATIONS)}.")
    if implementation == "cudnn" and dtype is not None and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention='cudnn' computes in bfloat16 or float16, not {jnp.dtype(dtype).name}; "
                         f"use --dtype=bfloat16, or attention='pallas' (or 'auto') for float32.")
    if implementation == "splash":
        from easytune.kernels import tpu_attention
        tpu_attention.check_platform(jax.default_backend())
    if implementation == "pallas" and head_dim is not None:
        from easytune import kernels
        if head_dim not in kernels.SUPPORTED_HEAD_DIMS:
            raise ValueError(f"attention='pallas' supports head_dim {kernels.SUPPORTED_HEAD_DIMS}, not {head_dim}; "
                             f"use attention='xla' (or 'auto', which falls back to it).")


def resolve_attention(implementation: str, head_dim: int | None = None) -> str:
    """The implementation `attention()` runs for `implementation` on this backend: 'auto' is
    easytune's Pallas kernel on GPU (when it supports `head_dim`), splash on TPU, and xla elsewhere
    (interpret mode on CPU is for tests, not speed). Unknown names raise."""
    check_attention(implementation)
    if implementation != "auto":
        return implementation
    from easytune import kernels
    if jax.default_backend() == "gpu" and (head_dim is None or head_dim in kernels.SUPPORTED_HEAD_DIMS):
        return "pallas"
    if jax.default_backend() == "tpu":
        return "splash"
    return "xla"


def _auto(q, k, v, **kwargs):
    return ATTENTION_IMPLEMENTATIONS[resolve_attention("auto", q.shape[-1])](q, k, v, **kwargs)


ATTENTION_IMPLEMENTATIONS = {"xla": _xla, "pallas": _pallas, "splash": _splash, "cudnn": _cudnn, "auto": _auto}


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    scale: float | None = None,
    logit_softcap: float | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Dispatch point for every attention in every model (`--attention=xla|pallas|splash|cudnn|auto`).

    q `[batch, q_len, heads, head_dim]`, k/v `[batch, kv_len, kv_heads, head_dim]` -> like q.
    Positions and segment ids are `[batch, len]` ints (segment 0 = padding; None = all ones). With
    `kv_positions=None` the keys are the queries' own tokens (self-attention: training, eval, a
    prefill into an empty cache), which pallas, splash and cudnn serve; otherwise the keys come from a
    KV cache and every implementation computes the xla reference. The masking rule is
    `attention_mask`'s; the kernels apply causality and the window by index in the sequence,
    the same thing whenever positions rise by one per token within a segment (packing and
    left-padded prompts do). Scores are `q k^T * scale` (default 1/sqrt(head_dim)), soft-capped
    to `logit_softcap * tanh(scores / logit_softcap)` when that is given (Gemma 2), then masked.
    """
    check_attention(implementation)
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"the number of query heads ({q.shape[2]}) must be a multiple of the number of "
                         f"key/value heads ({k.shape[2]}).")
    return ATTENTION_IMPLEMENTATIONS[implementation](
        q, k, v, q_positions=q_positions, q_segment_ids=q_segment_ids, kv_positions=kv_positions,
        kv_segment_ids=kv_segment_ids, causal=causal, sliding_window=sliding_window, scale=scale,
        logit_softcap=logit_softcap)
