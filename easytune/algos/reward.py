"""Reward models: a scalar `score` head read at the last token, trained with a Bradley–Terry loss.

    with_score_head(model, seed)                  a causal LM handle -> a new reward-model handle (no LM head)
    sequence_scores(model_config, params, ...)    [batch, num_labels] at each row's last real token
    bradley_terry_losses(chosen, rejected, ...)   [pairs]
    make_loss(center_rewards_coefficient)         loss_fn(model_config, params, batch) for train.Trainer

The model is `DecoderConfig(num_labels=1)`: `score.kernel [hidden, 1]` on the final hidden states,
exported as transformers' `LlamaForSequenceClassification` / `MistralForSequenceClassification`,
which read the score at the rightmost token that is not `pad_token_id`: the same token as ours as
long as a sequence does not end in the pad token (a chat turn ends with its template's closing
tokens, e.g. `<|im_end|>\\n`).

Loss per pair, as TRL's RewardTrainer: `−logσ(r_c − r_r − margin) + c·(r_c + r_r)²`, with the
margin from the data's `margin` field (0 without one) and c = --center_rewards_coefficient
(reward centering, Eisenstein et al. 2023; TRL averages (r_c + r_r)² over pairs, so does the mean
of this sum).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from easytune import models
from easytune.algos.dpo import both_sides
from easytune.data.packing import ROW_KEYS

SCORE_INIT_STD = 0.02  # transformers' initializer_range for a fresh score head


def with_score_head(model, seed: int = 0):
    """A reward (or value) model made from a causal-LM `easytune.Model`: a new handle with
    `num_labels=1`, a fresh `score.kernel [hidden, 1]` ~ N(0, 0.02²) (as
    `AutoModelForSequenceClassification` initializes it) and no LM head. `model` is left as it
    is; the two handles share every other array. A model that already has a one-label score head
    is returned as it is."""
    from easytune import sharding
    if model.is_encoder_decoder:
        raise ValueError(f"reward models here are decoder-only (LLaMA/Mistral); {model.config.model_type} is an "
                         f"encoder-decoder.")
    if model.config.num_labels:
        if model.config.num_labels != 1:
            raise ValueError(f"this model has a {model.config.num_labels}-label score head; a reward model has one.")
        return model
    if model.adapter is not None:
        raise ValueError("reward models train all weights here (the score head is new); drop --peft.")
    config = dataclasses.replace(model.config, num_labels=1)
    shape = (config.hidden_size, 1)
    spec = sharding.tree_shardings({"score": {"kernel": jax.ShapeDtypeStruct(shape, config.weight_dtype)}},
                                   models.family(config.model_type).SHARDING_RULES, model.mesh)
    init = jax.jit(lambda key: (SCORE_INIT_STD * jax.random.normal(key, shape, jnp.float32)).astype(
        config.weight_dtype), out_shardings=spec["score"]["kernel"])
    params = {k: v for k, v in model.params.items() if k != "lm_head"}
    params["score"] = {"kernel": init(jax.random.key(seed))}
    hf_config = model.hf_config
    if not isinstance(hf_config.get("pad_token_id"), int):  # transformers finds the last token by it
        hf_config = {**hf_config, "pad_token_id": model.pad_token_id}
    return model.replace(config=config, params=params, hf_config=hf_config)


def last_token_index(segment_ids: jax.Array) -> jax.Array:
    """`[batch]` index of each row's last real token (segment id > 0); 0 for an all-padding row."""
    positions = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    return jnp.argmax(positions * (segment_ids > 0), axis=-1)


def sequence_scores(model_config, params, input_ids, positions=None, segment_ids=None) -> jax.Array:
    """Scores `[batch, num_labels]` (float32) of right-padded rows `[batch, seq]` at each row's
    last real token (segment_ids: 1 on tokens, 0 on padding; default: no padding)."""
    if segment_ids is None:
        segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    per_token = models.family(model_config.model_type).forward(model_config, params, input_ids, positions, segment_ids)
    index = last_token_index(segment_ids)
    return jnp.take_along_axis(per_token, index[:, None, None], axis=1)[:, 0]


def bradley_terry_losses(chosen: jax.Array, rejected: jax.Array, margin: jax.Array | None = None,
                         center_rewards_coefficient: float = 0.0) -> jax.Array:
    """Per-pair Bradley–Terry loss `[pairs]` from chosen and rejected rewards `[pairs]`."""
    difference = chosen - rejected if margin is None else chosen - rejected - margin
    losses = -jax.nn.log_sigmoid(difference)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses


def pair_scores(model_config, params, batch) -> tuple[jax.Array, jax.Array]:
    """`(chosen, rejected)` rewards `[batch]` from ONE forward over both sides' rows."""
    rows = {key: both_sides(batch, key) for key in ROW_KEYS}
    scores = sequence_scores(model_config, params, rows["input_ids"], rows["positions"], rows["segment_ids"])
    scores = scores[:, 0].reshape(-1, 2)
    return scores[:, 0], scores[:, 1]


def make_loss(center_rewards_coefficient: float = 0.0):
    """The training loop's loss: `(sum of pair losses, number of pairs, {metric: sum over pairs})`
    with metrics accuracy (chosen scored above rejected), margin, rewards/chosen and
    rewards/rejected. All-padding rows (eval padding) count for nothing."""

    def loss_fn(model_config, params, batch):
        chosen, rejected = pair_scores(model_config, params, batch)
        valid = (batch["chosen_segment_ids"].max(axis=-1) > 0) & (batch["rejected_segment_ids"].max(axis=-1) > 0)
        margin = batch["margin"][:, 0] if "margin" in batch else None
        losses = bradley_terry_losses(chosen, rejected, margin, center_rewards_coefficient)
        total = lambda x: jnp.sum(jnp.where(valid, x, 0.0))  # noqa: E731
        chosen, rejected = jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)
        metrics = {"accuracy": total((chosen > rejected).astype(jnp.float32)), "margin": total(chosen - rejected),
                   "rewards/chosen": total(chosen), "rewards/rejected": total(rejected)}
        return total(losses), jnp.sum(valid.astype(jnp.float32)), metrics

    return loss_fn

