"""Supervised fine-tuning loss: next-token cross-entropy on the trained (assistant) tokens.

A batch is a dict of int32 `[batch, seq]` arrays (see `easytune.data.make_rows`): input_ids,
target_ids (the next token of the same segment), loss_mask (1 where target_ids is trained),
segment_ids (0 = padding) and positions (restarting at 0 in every packed segment).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from easytune.algos import logprobs

BATCH_KEYS = ("input_ids", "target_ids", "loss_mask", "segment_ids", "positions")


def token_cross_entropy(config, params, batch) -> jax.Array:
    """Cross-entropy of every target `[batch, seq]` (float32), not yet masked."""
    return -logprobs.model_logprobs(config, params, batch["input_ids"], batch["positions"], batch["segment_ids"],
                                    batch["target_ids"])


def loss_sums(config, params, batch) -> tuple[jax.Array, jax.Array]:
    """`(sum of cross-entropy over trained tokens, number of trained tokens)`: sums, so that
    gradient accumulation and data parallelism can normalize over the whole global batch."""
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(token_cross_entropy(config, params, batch) * mask), jnp.sum(mask)


def per_segment_losses(config, params, batch, max_segments: int) -> jax.Array:
    """Mean cross-entropy of each packed segment `[batch, max_segments]` (index = segment id - 1);
    lets tests check that packing does not change any example's loss."""
    mask = batch["loss_mask"].astype(jnp.float32)
    ce = token_cross_entropy(config, params, batch) * mask
    one_hot = jax.nn.one_hot(batch["segment_ids"] - 1, max_segments, dtype=jnp.float32)  # [b, s, k]
    sums = jnp.einsum("bs,bsk->bk", ce, one_hot)
    counts = jnp.einsum("bs,bsk->bk", mask, one_hot)
    return sums / jnp.maximum(counts, 1.0)
