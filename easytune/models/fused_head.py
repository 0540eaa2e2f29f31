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

from easytune.models import layers

DEFAULT_CHUNK = 2048  # tokens per chunk: [2048, 128256] float32 logits are 1 GB


def _chunk_stats(hidden, kernel, targets, inverse_temperature, with_entropy):
    """For one chunk `[c, h]`: log p(target), the entropy (zeros unless `with_entropy`), softmax
    probabilities and log-probabilities `[c, vocab]` (float32)."""
    logits = layers.dot_f32(hidden, kernel) * inverse_temperature
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    log_probs = logits - log_normalizer[:, None]
    probs = jnp.exp(log_probs)
    entropy = -jnp.sum(probs * log_probs, axis=-1) if with_entropy else jnp.zeros_like(target)
    return target - log_normalizer, entropy, probs, log_probs


def _split(hidden, targets, chunk_size):
    """Flatten to `[tokens, h]`, pad to whole chunks: `[chunks, chunk, h]`, `[chunks, chunk]`."""
    tokens = targets.size
    chunk = max(1, min(chunk_size, tokens))
    padded = -(-tokens // chunk) * chunk
    hidden = hidden.reshape(tokens, hidden.shape[-1])
    targets = targets.reshape(tokens)
    if padded != tokens:
        hidden = jnp.pad(hidden, [(0, padded - tokens), (0, 0)])
        targets = jnp.pad(targets, [(0, padded - tokens)])
    return hidden.reshape(-1, chunk, hidden.shape[-1]), targets.reshape(-1, chunk), tokens


def _fused(hidden, kernel, targets, *, inverse_temperature, chunk_size, with_entropy):
    return _fused_vjp(hidden, kernel, targets, inverse_temperature, chunk_size, with_entropy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused_vjp(hidden, kernel, targets, inverse_temperature, chunk_size, with_entropy):
    chunks, chunk_targets, tokens = _split(hidden, targets, chunk_size)

    def step(_, xs):
        logp, entropy, _, _ = _chunk_stats(xs[0], kernel, xs[1], inverse_temperature, with_entropy)
        return None, (logp, entropy)

    _, (logp, entropy) = jax.lax.scan(step, None, (chunks, chunk_targets))
    shape = targets.shape
    return logp.reshape(-1)[:tokens].reshape(shape), entropy.reshape(-1)[:tokens].reshape(shape)


def _fused_fwd(hidden, kernel, targets, inverse_temperature, chunk_size, with_entropy):
    out = _fused_vjp(hidden, kernel, targets, inverse_temperature, chunk_size, with_entropy)
    return out, (hidden, kernel, targets, out[1])


def _fused_bwd(inverse_temperature, chunk_size, with_entropy, residuals, cotangents):
    hidden, kernel, targets, entropy = residuals
    d_logp, d_entropy = cotangents
    chunks, chunk_targets, tokens = _split(hidden, targets, chunk_size)
    pad = chunks.size // chunks.shape[-1] - tokens

    def per_chunk(x):
        return jnp.pad(x.reshape(-1), [(0, pad)]).reshape(chunk_targets.shape)

    d_logp, d_entropy, entropy = per_chunk(d_logp), per_chunk(d_entropy), per_chunk(entropy)

    def step(d_kernel, xs):
        h, t, g_logp, g_entropy, ent = xs
        _, _, probs, log_probs = _chunk_stats(h, kernel, t, inverse_temperature, False)
        # s = logits / T:  d logp / d s = onehot(t) - p;  d entropy / d s = -p (log p + entropy)
        weight = g_logp[:, None]
        if with_entropy:
            weight = weight + g_entropy[:, None] * (log_probs + ent[:, None])
        d_scaled = (-probs * weight).at[jnp.arange(t.shape[0]), t].add(g_logp)
        d_logits = (d_scaled * inverse_temperature).astype(kernel.dtype)
        return d_kernel + layers.transposed_dot_f32(h, d_logits), layers.dot_f32(d_logits, kernel, 1, 1).astype(h.dtype)

    d_kernel, d_hidden = jax.lax.scan(step, jnp.zeros(kernel.shape, jnp.float32),
                                      (chunks, chunk_targets, d_logp, d_entropy, entropy))
    d_hidden = d_hidden.reshape(-1, hidden.shape[-1])[:tokens].reshape(hidden.shape)
    return d_hidden, d_kernel.astype(kernel.dtype), None


_fused_vjp.defvjp(_fused_fwd, _fused_bwd)


BATCH_AXES = ("dp", "fsdp")


def target_logprobs(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, *, temperature: float = 1.0,
                    chunk_size: int = DEFAULT_CHUNK, with_entropy: bool = False):
    """`log softmax(hidden @ kernel / temperature)[target]` per token `[...]` (float32), and with
    `with_entropy` the softmax's entropy per token, computed `chunk_size` tokens at a time; both
    differentiable in hidden and kernel (custom VJP, logits recomputed in the backward pass).

    Under a ('dp','fsdp',...) mesh (`jax.set_mesh`) with hidden `[batch, seq, hidden]` it runs per
    shard of the batch (`shard_map`): each device walks only its own rows' chunks against the whole
    head (gathered once), and the head's gradient is summed over the shards once, after the loop.
    (Scanning one flattened token axis under GSPMD would instead gather every row to every device.)
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}.")
    kernel = kernel.astype(hidden.dtype)
    fn = functools.partial(_fused, inverse_temperature=1.0 / float(temperature), chunk_size=int(chunk_size),
                           with_entropy=bool(with_entropy))
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty or not all(a in mesh.axis_names for a in BATCH_AXES) else (
        mesh.shape["dp"] * mesh.shape["fsdp"])
    if shards > 1 and hidden.ndim == 3 and hidden.shape[0] % shards == 0:
        from jax.sharding import PartitionSpec as P
        rows = P(BATCH_AXES, None)
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(BATCH_AXES, None, None), P(), rows), out_specs=(rows, rows),
                           check_vma=False)
    logp, entropy = fn(hidden, kernel, targets.astype(jnp.int32))
    return (logp, entropy) if with_entropy else logp
