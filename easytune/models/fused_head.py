"""The output head and its log-softmax fused and chunked over tokens: log p(target) (and the
entropy) from final hidden states without ever holding the `[tokens, vocab]` logits.

At vocab 128k the float32 logits of 8 x 4096 tokens are 16.8 GB, and their softmax and gradient
as much again: the largest arrays of an SFT step on an accelerator. Here the tokens go through the
head `chunk_size` at a time (`lax.scan`); each chunk's logits live only inside its step, and a
custom VJP recomputes them in the backward pass instead of saving them, accumulating the head's
gradient in float32 across chunks. Same idea as MaxText's vocab tiling, Liger's fused linear
cross-entropy and Apple's Cut Cross-Entropy; written here because none of those is a JAX library
easytune can depend on (Liger and CCE are PyTorch/Triton, MaxText's is inside its model code).

Shapes: hidden `[..., hidden]` (compute dtype), kernel `[hidden, vocab]`, targets `[...]` int.
Dots run with float32 accumulation (bf16 operands stay bf16), the softmax in float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 2048  # tokens per chunk: [2048, 128256] float32 logits are 1 GB


def _chunk_stats(hidden, kernel, targets, inverse_temperature):
    """For one chunk `[c, h]`: scaled logits' log-normalizer, the target's scaled logit, softmax
    probabilities and entropy (float32)."""
    logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32) * inverse_temperature
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    log_probs = logits - log_normalizer[:, None]
    probs = jnp.exp(log_probs)
    entropy = -jnp.sum(probs * log_probs, axis=-1)
    return target - log_normalizer, entropy, probs, log_probs


def _split(hidden, targets, chunk_size):
    """Flatten to `[tokens, h]`, pad to whole chunks: `[chunks, chunk, h]`, `[chunks, chunk]`."""
    tokens = targets.size
    chunk = min(chunk_size, tokens)
    padded = -(-tokens // chunk) * chunk
    hidden = hidden.reshape(tokens, hidden.shape[-1])
    targets = targets.reshape(tokens)
    if padded != tokens:
        hidden = jnp.pad(hidden, [(0, padded - tokens), (0, 0)])
        targets = jnp.pad(targets, [(0, padded - tokens)])
    return hidden.reshape(-1, chunk, hidden.shape[-1]), targets.reshape(-1, chunk), tokens


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(hidden, kernel, targets, inverse_temperature, chunk_size):
    chunks, chunk_targets, tokens = _split(hidden, targets, chunk_size)

    def step(_, xs):
        logp, entropy, _, _ = _chunk_stats(xs[0], kernel, xs[1], inverse_temperature)
        return None, (logp, entropy)

    _, (logp, entropy) = jax.lax.scan(step, None, (chunks, chunk_targets))
    shape = targets.shape
    return logp.reshape(-1)[:tokens].reshape(shape), entropy.reshape(-1)[:tokens].reshape(shape)


def _fused_fwd(hidden, kernel, targets, inverse_temperature, chunk_size):
    out = _fused(hidden, kernel, targets, inverse_temperature, chunk_size)
    return out, (hidden, kernel, targets, out[1])


def _fused_bwd(inverse_temperature, chunk_size, residuals, cotangents):
    hidden, kernel, targets, entropy = residuals
    d_logp, d_entropy = cotangents
    chunks, chunk_targets, tokens = _split(hidden, targets, chunk_size)
    pad = chunks.size // chunks.shape[-1] - tokens

    def per_chunk(x):
        return jnp.pad(x.reshape(-1), [(0, pad)]).reshape(chunk_targets.shape)

    d_logp, d_entropy, entropy = per_chunk(d_logp), per_chunk(d_entropy), per_chunk(entropy)

    def step(d_kernel, xs):
        h, t, g_logp, g_entropy, ent = xs
        _, _, probs, log_probs = _chunk_stats(h, kernel, t, inverse_temperature)
        # d logp / d s = onehot(t) - p;  d entropy / d s = -p (log p + entropy);  s = logits / T
        d_scaled = -probs * (g_logp[:, None] + g_entropy[:, None] * (log_probs + ent[:, None]))
        d_scaled = d_scaled.at[jnp.arange(t.shape[0]), t].add(g_logp)
        d_logits = (d_scaled * inverse_temperature).astype(kernel.dtype)
        d_h = jax.lax.dot_general(d_logits, kernel, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        d_kernel = d_kernel + jax.lax.dot_general(h, d_logits, (((0,), (0,)), ((), ())),
                                                  preferred_element_type=jnp.float32)
        return d_kernel, d_h.astype(h.dtype)

    d_kernel, d_hidden = jax.lax.scan(step, jnp.zeros(kernel.shape, jnp.float32),
                                      (chunks, chunk_targets, d_logp, d_entropy, entropy))
    d_hidden = d_hidden.reshape(-1, hidden.shape[-1])[:tokens].reshape(hidden.shape)
    return d_hidden, d_kernel.astype(kernel.dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)


def target_logprobs(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, *, temperature: float = 1.0,
                    chunk_size: int = DEFAULT_CHUNK, with_entropy: bool = False):
    """`log softmax(hidden @ kernel / temperature)[target]` per token `[...]` (float32), and with
    `with_entropy` the softmax's entropy per token, computed `chunk_size` tokens at a time; both
    differentiable in hidden and kernel (custom VJP, logits recomputed in the backward pass)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}.")
    kernel = kernel.astype(hidden.dtype)
    logp, entropy = _fused(hidden, kernel, targets.astype(jnp.int32), 1.0 / float(temperature), int(chunk_size))
    return (logp, entropy) if with_entropy else logp
