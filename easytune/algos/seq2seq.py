"""Seq2seq (encoder-decoder) fine-tuning loss: teacher-forced cross-entropy on the target tokens.

A batch is a dict of int32 arrays (see `easytune.data.make_seq2seq_rows`): the encoder's
input_ids, segment_ids, positions `[batch, input_length]` and the decoder's decoder_input_ids
(targets shifted right), target_ids, loss_mask, decoder_segment_ids, decoder_positions
`[batch, target_length]`. Matching segment ids pair a packed target with its input.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from easytune import models, recipe
from easytune.data.seq2seq import SEQ2SEQ_ROW_KEYS

BATCH_KEYS = SEQ2SEQ_ROW_KEYS


def token_cross_entropy(config, params, batch) -> jax.Array:
    """Cross-entropy of every decoder target `[batch, target_length]` (float32), not yet masked."""
    logits = models.family(config.model_type).forward(
        config, params, batch["input_ids"], batch["decoder_input_ids"], batch["segment_ids"],
        batch["decoder_segment_ids"], batch["positions"], batch["decoder_positions"])
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, batch["target_ids"][..., None], axis=-1)[..., 0]
    return log_normalizer - target_logits


def loss_sums(config, params, batch) -> tuple[jax.Array, jax.Array]:
    """`(sum of cross-entropy over target tokens, number of target tokens)` for the training loop."""
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(token_cross_entropy(config, params, batch) * mask), jnp.sum(mask)


LOSS = recipe.Loss(loss_sums, "trained_tokens", perplexity=True)


def per_segment_losses(config, params, batch, max_segments: int) -> jax.Array:
    """Mean cross-entropy of each packed example `[batch, max_segments]` (index = segment id - 1)."""
    mask = batch["loss_mask"].astype(jnp.float32)
    ce = token_cross_entropy(config, params, batch) * mask
    one_hot = jax.nn.one_hot(batch["decoder_segment_ids"] - 1, max_segments, dtype=jnp.float32)
    sums = jnp.einsum("bs,bsk->bk", ce, one_hot)
    counts = jnp.einsum("bs,bsk->bk", mask, one_hot)
    return sums / jnp.maximum(counts, 1.0)
