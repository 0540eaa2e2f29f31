"""Reward models: a scalar `score` head read at the last token, trained with a Bradley–Terry loss.

    with_score_head(model, seed)                  a causal LM handle -> a new reward-model handle (no LM head)
    sequence_scores(model_config, params, ...)    [batch, num_labels] at each row's last real token
    bradley_terry_losses(chosen, rejected, ...)   [pairs]
    make_loss(center_rewards_coefficient)         the training loss (`easytune.recipe.Loss`, per pair)
    RECIPE                                        `python -m easytune.train_reward` (flags, rows, figures)

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
import logging

import jax
import jax.numpy as jnp

from easytune import models, recipe
from easytune.algos.dpo import both_sides
from easytune.data.packing import ROW_KEYS

logger = logging.getLogger("easytune")
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


def make_loss(center_rewards_coefficient: float = 0.0) -> recipe.Loss:
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

    return recipe.Loss(loss_fn, "pairs")


# ----------------------------------------------------------------------------- the recipe

class RewardRecipe(recipe.Recipe):
    """A reward model on preference pairs: a score head on the starting causal LM (or a reward
    model's, continued), Bradley–Terry loss, pairwise accuracy as the eval figure."""

    name = "reward training"
    flag_groups = ("data",)
    score_head = True
    learning_rates = {"full": 5e-5}
    defaults = {
        "output_dir": "outputs/reward",
        "seq_length": 512,
        "center_rewards_coefficient": 0.0,
        "optimizer": {"warmup_ratio": 0.1},
        "tasks": {"num_train": 128, "num_heldout": 100, "max_new_tokens": 16, "rejected": "model"},
    }

    @property
    def docs(self):
        from easytune.algos.dpo import PAIR_DATA_DOCS
        return {
            **PAIR_DATA_DOCS,
            "model": "HF directory, hub id, or easytune checkpoint/run directory: a causal LM (its LM head is "
                     "replaced by a new score head) or a reward model to continue (default: bundled "
                     "SmolLM2-135M-Instruct)",
            "train_data": "preference pairs (the layouts of train_dpo), optionally with a numeric `margin` field "
                          "(default: pairs from generated tasks)",
            "eval_data": "evaluation pairs, same layouts; eval_accuracy is the pairwise accuracy (default job: the "
                         "held-out task pairs)",
            "center_rewards_coefficient": "reward centering: adds c * mean((r_chosen + r_rejected)^2) (0 = off; "
                                          "the paper suggests 0.01)",
            "optimizer.lr": "peak learning rate (AdamW; all weights and the score head train)",
            "seed": "data order and score head init seed",
            "export_hf": "write a Hugging Face *ForSequenceClassification directory here at the end (default job: "
                         "<output_dir>/hf)",
            "tasks.num_heldout": "default job: held-out tasks (pairs) for pairwise accuracy",
            "tasks.max_new_tokens": "default job: generation budget of the model's own answers",
        }

    def check_record(self, cfg, record: dict, where: str) -> None:
        from easytune.data.preference import parse_pair
        parse_pair(record, where)

    def setup(self, ctx: recipe.Context) -> recipe.Job:
        from easytune import data
        from easytune.algos.dpo import eval_pair_rows, pair_data
        cfg, model = ctx.cfg, ctx.model
        eval_rows = None
        if cfg.train_data is None:  # pairs from the causal LM's own answers, before it becomes a reward model
            if getattr(model.config, "num_labels", 0):
                raise ValueError("the default job builds its pairs from a causal LM's answers; give --train_data to "
                                 "continue training a reward model.")
            task_records, heldout_tasks = data.train_and_heldout(cfg.tasks.num_train, cfg.tasks.num_heldout,
                                                                 seed=cfg.seed)
            records, heldout_records = (
                data.task_pairs_from_model(model, these, cfg.tasks.rejected, cfg.tasks.max_new_tokens, cfg.seed)
                for these in (task_records, heldout_tasks))
            source = f"generated task pairs ({len(records)} train, {len(heldout_records)} held out)"
            rows, stats = pair_data(ctx, source, records)
            eval_rows = data.pair_rows(heldout_records, model.tokenizer, ctx.template, cfg.seq_length,
                                       "held-out task pairs")[0]
            ctx.write_jsonl("train_pairs.jsonl", records)
            ctx.write_jsonl("heldout_pairs.jsonl", heldout_records)
        else:
            source = cfg.train_data
            rows, stats = pair_data(ctx, source, *data.load_pairs(source))
        eval_rows = eval_pair_rows(ctx) if cfg.eval_data else eval_rows
        logger.info("train data %s: %s; rows of %d tokens", source, stats.summary(), rows["chosen_input_ids"].shape[1])

        def report(history, summary):
            return {"last_accuracy": history[-1]["accuracy"]} if history else {}

        reward_model = with_score_head(model, seed=cfg.seed)
        return recipe.Job(
            model=reward_model, rows=rows, eval_rows=eval_rows, eval_before=True,
            loss=make_loss(cfg.center_rewards_coefficient), report=report,
            summary={"train_pairs": stats.num_records, "train_pairs_dropped": stats.num_dropped},
            flops_per_token=models.flops_per_token(reward_model.config, cfg.seq_length))


RECIPE = RewardRecipe()
