"""Per-token log-probs (and entropy) of a causal LM's next-token distribution: the one place the
losses (SFT, DPO family, PPO/GRPO/RLOO) read the model's output, either from `forward`'s logits or,
with `head_chunk_size > 0`, through the fused chunked head (`easytune.models.fused_head`), which
never holds `[tokens, vocab]` logits."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from easytune import models
from easytune.models import fused_head


def token_logps(logits: jax.Array, target_ids: jax.Array) -> jax.Array:
    """log softmax(logits)[target] `[batch, seq]` (float32) from logits `[batch, seq, vocab]`."""
    logits = logits.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, target_ids[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits):
    """Entropy of softmax(logits) over the last axis, float32."""
    logits = logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def model_logprobs(model_config, params, tokens, positions, segment_ids, targets, *, temperature=None,
                   window: slice | None = None, with_entropy: bool = False):
    """log p(targets) `[batch, len]` (float32) under the model run on `tokens [batch, seq]`, read at
    the positions `window` selects on the sequence axis (all by default; `targets` has their
    length), at `temperature` (None: the logits as they are), and the entropy per position with
    `with_entropy`. A decoder-only family read at a window computes the head on the window's
    hidden states alone (`logprobs_from_hidden`): RL reads the response positions only, and PPO's
    shared value head (`ppo.shared_outputs`) takes the same path, so its log-probs match the
    reference's bit for bit where the weights do."""
    family = models.family(model_config.model_type)
    if window is not None and hasattr(family, "hidden_states"):
        hidden, _ = family.hidden_states(model_config, params, tokens, positions, segment_ids)
        return logprobs_from_hidden(model_config, params, hidden[:, window], targets, temperature=temperature,
                                    with_entropy=with_entropy)
    fused = models.fused_head_inputs(model_config, params, tokens, positions, segment_ids)
    if fused is not None:
        hidden, kernel = fused
        if window is not None:
            hidden = hidden[:, window]
        return fused_head.target_logprobs(hidden, kernel, targets, temperature=1.0 if temperature is None else temperature,
                                          chunk_size=model_config.head_chunk_size, with_entropy=with_entropy)
    logits = models.family(model_config.model_type).forward(model_config, params, tokens, positions, segment_ids)
    if window is not None:
        logits = logits[:, window]
    logits = logits.astype(jnp.float32)
    if temperature is not None:
        logits = logits / temperature
    logps = token_logps(logits, targets)
    return (logps, entropy_from_logits(logits)) if with_entropy else logps


def logprobs_from_hidden(model_config, params, hidden, targets, *, temperature=None, with_entropy: bool = False):
    """`model_logprobs` from a decoder's final hidden states `[batch, len, hidden]` (already read at
    the positions that predict `targets`), for a loss that reads the hidden states for something
    else too (PPO's shared value head): the fused chunked head where the config asks for it, else
    the family's `logits_from_hidden`."""
    family = models.family(model_config.model_type)
    kernel = family.fused_head_kernel(model_config, params)
    if kernel is not None:
        return fused_head.target_logprobs(hidden, kernel, targets, temperature=1.0 if temperature is None else temperature,
                                          chunk_size=model_config.head_chunk_size, with_entropy=with_entropy)
    logits = family.logits_from_hidden(model_config, params, hidden).astype(jnp.float32)
    if temperature is not None:
        logits = logits / temperature
    logps = token_logps(logits, targets)
    return (logps, entropy_from_logits(logits)) if with_entropy else logps
