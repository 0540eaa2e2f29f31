"""Supervised fine-tuning loss: next-token cross-entropy on the trained (assistant) tokens.

A batch is a dict of int32 `[batch, seq]` arrays (see `easytune.data.make_rows`): input_ids,
target_ids (the next token of the same segment), loss_mask (1 where target_ids is trained),
segment_ids (0 = padding) and positions (restarting at 0 in every packed segment).
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from easytune import recipe
from easytune.algos import logprobs

logger = logging.getLogger("easytune")

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


LOSS = recipe.Loss(loss_sums, "trained_tokens", perplexity=True)


def per_segment_losses(config, params, batch, max_segments: int) -> jax.Array:
    """Mean cross-entropy of each packed segment `[batch, max_segments]` (index = segment id - 1);
    lets tests check that packing does not change any example's loss."""
    mask = batch["loss_mask"].astype(jnp.float32)
    ce = token_cross_entropy(config, params, batch) * mask
    one_hot = jax.nn.one_hot(batch["segment_ids"] - 1, max_segments, dtype=jnp.float32)  # [b, s, k]
    sums = jnp.einsum("bs,bsk->bk", ce, one_hot)
    counts = jnp.einsum("bs,bsk->bk", mask, one_hot)
    return sums / jnp.maximum(counts, 1.0)


# ----------------------------------------------------------------------------- the recipe

class SFTRecipe(recipe.Recipe):
    """Supervised fine-tuning: next-token cross-entropy on the assistant turns (decoder-only) or
    on the targets of input/target records (encoder-decoders, `easytune.algos.seq2seq`). The
    default job (no --train_data): generated verifiable tasks, with held-out exact-match accuracy
    before and after."""

    name = "SFT"
    flag_groups = ("data", "tokenized_data", "lm_head", "peft", "lm_eval")
    adapters = ("lora", "qlora", "dora", "prompt", "prefix", "ptuning")
    encoder_decoder = True
    defaults = {
        "output_dir": "outputs/sft",
        "pack": True,
        "train_on": "assistant",
        "streaming": False,
        "streaming_buffer": 10000,
        "tasks": {"num_train": 640, "num_heldout": 100, "max_new_tokens": 16},
        "seq2seq": {"input_field": "input", "target_field": "target", "target_length": 0},
    }
    docs = {
        "train_data": "training data: .jsonl/.json/.parquet or a `datasets` name; formats: messages, "
                      "instruction/input/output, prompt/completion, text (default: generated verifiable tasks)",
        "eval_data": "evaluation data, same formats (default: none; the default job uses its held-out tasks)",
        "batch_size": "global batch in sequences (rows of seq_length), across all hosts and accumulation steps",
        "pack": "pack several samples per row (best fit; attention never crosses samples)",
        "train_on": "assistant: the loss covers the assistant turns only; all: every token of the conversation "
                    "(system, user and template tokens too)",
        "streaming": "read, tokenize and pack --train_data as training goes (one .jsonl file or dataset split; "
                     "needs --total_steps), instead of tokenizing it all first into the cache",
        "streaming_buffer": "--streaming: records tokenized and packed together; rows are shuffled within one",
        "loss_reduction": "mean: per trained token over the global batch; sum: per micro-batch token sum "
                          "averaged over accumulation steps (open-instruct's --reduce_loss sum)",
        "optimizer.lr": "peak learning rate (AdamW); full fine-tuning of 7B+ models usually wants 1e-5 to 2e-5",
        "seed": "data order seed",
        "tasks.num_train": "default job: generated training tasks",
        "tasks.num_heldout": "default job: held-out tasks for exact-match accuracy",
        "tasks.max_new_tokens": "default job: generation budget per held-out answer",
        "seq2seq.input_field": "encoder-decoder models (T5): the record field holding the encoder's input text",
        "seq2seq.target_field": "encoder-decoder models (T5): the record field holding the target text (trained, "
                                "plus eos)",
        "seq2seq.target_length": "encoder-decoder models (T5): decoder tokens per row (0 = seq_length, the "
                                 "encoder's)",
    }

    def validate(self, cfg) -> None:
        from easytune.data.tokenize import TRAIN_ON
        if cfg.train_on not in TRAIN_ON:
            raise ValueError(f"--train_on must be one of {', '.join(TRAIN_ON)}, got {cfg.train_on!r}.")
        if cfg.streaming and not cfg.train_data:
            raise ValueError("--streaming reads --train_data; name a .jsonl file or a dataset split.")
        if cfg.streaming and not cfg.total_steps:
            raise ValueError("--streaming needs --total_steps: a stream's length, and so an epoch's steps, is not "
                             "known ahead.")

    def check_record(self, cfg, record: dict, where: str) -> None:
        """A decoder's layout (`data.formats`), or else an encoder-decoder's input/target record
        (which model it is, is known only after the load)."""
        from easytune import data
        from easytune.data.seq2seq import record_text
        fields = cfg.seq2seq
        try:
            fmt = data.detect_format(record, where)
        except ValueError:
            if fields.input_field not in record and fields.target_field not in record:
                raise
            for field in (fields.input_field, fields.target_field):
                record_text(record, field, where, fields.input_field, fields.target_field)
            return
        if fields.input_field in record and fields.target_field in record:
            return  # an encoder-decoder's record that also has a decoder field: checked when tokenized
        data.to_messages(record, fmt, where)

    def setup(self, ctx: recipe.Context) -> recipe.Job:
        from easytune import data, models
        from easytune.algos import seq2seq
        cfg, model = ctx.cfg, ctx.model
        heldout, records, source = None, None, cfg.train_data
        if cfg.train_data is None:
            records, heldout = data.train_and_heldout(cfg.tasks.num_train, cfg.tasks.num_heldout, seed=cfg.seed)
            source = f"generated tasks ({len(records)} train, {len(heldout)} held out)"
        rows, eval_rows, stats = train_and_eval_rows(ctx, source, records)
        return recipe.Job(
            model=model, rows=rows, eval_rows=eval_rows, loss=seq2seq.LOSS if model.is_encoder_decoder else LOSS,
            summary={} if stats is None else {"train_samples": stats.num_records,
                                              "train_samples_dropped": stats.num_dropped_no_trainable_tokens},
            heldout=(None if heldout is None else
                     lambda: recipe.heldout_accuracy(model, heldout, cfg.tasks.max_new_tokens)),
            # None for encoder-decoders: their FLOPs per token depend on the input/target split
            flops_per_token=models.flops_per_token(model.config, cfg.seq_length))


def train_and_eval_rows(ctx: recipe.Context, source: str, records=None):
    """`(rows, eval rows or None, stats)`: `training_rows` of the training data (`source`, or
    `records` named `source`) and of --eval_data, packed unless a prompt-learning adapter's virtual
    tokens need one example per row; the counts logged, the drops said on stderr."""
    from easytune import data
    cfg, model = ctx.cfg, ctx.model
    pack = cfg.pack and (model.adapter is None or model.adapter.config.is_lora)
    if cfg.get("streaming") and records is None:
        if model.is_encoder_decoder:
            raise ValueError("--streaming reads decoder-only chat/text data; encoder-decoder (T5) data is read whole: "
                             "drop --streaming.")
        rows, stats = data.StreamingRows(source, model.tokenizer, ctx.template, cfg.seq_length, cfg.streaming_buffer,
                                         pack, cfg.get("train_on", "assistant")), None
        logger.info("train data %s: streamed, %d records per buffer", source, cfg.streaming_buffer)
    else:
        rows, stats = training_rows(cfg, model, ctx.template, source, records, pack=pack)
        logger.info("train data %s: %s; %d rows of %d tokens", source, stats.summary(), data.num_rows(rows),
                    cfg.seq_length)
        if stats.num_dropped_no_trainable_tokens:
            recipe.dropped(ctx.is_main, f"dropped {stats.num_dropped_no_trainable_tokens} of {stats.num_records} "
                                        f"samples with no trainable tokens after truncation to "
                                        f"seq_length={cfg.seq_length}")
    eval_rows = training_rows(cfg, model, ctx.template, cfg.eval_data, pack=pack)[0] if cfg.eval_data else None
    return rows, eval_rows, stats


def training_rows(cfg, model, template, source: str, records=None, pack: bool | None = None):
    """`(rows, stats)` of the data at `source` (or of `records`, named `source`), laid out for the
    model: chat/text SFT rows, or paired encoder/decoder rows for an encoder-decoder."""
    from easytune import data
    pack = cfg.pack if pack is None else pack
    if not model.is_encoder_decoder:
        train_on = cfg.get("train_on", "assistant")
        if records is None:  # tokenized in parallel, cached, rows laid out per batch
            cache_dir = cfg.get("data_cache_dir", "")
            return data.tokenized_rows(source, model.tokenizer, template, cfg.seq_length, pack, train_on=train_on,
                                       num_proc=cfg.get("data_num_proc", 0),
                                       cache_dir="" if cache_dir == "none" else (cache_dir or None))
        examples, stats = data.tokenize_records(records, model.tokenizer, template, cfg.seq_length, source,
                                                train_on=train_on)
        return data.make_rows(examples, cfg.seq_length, pack=pack), stats
    fields = cfg.seq2seq
    if records is None:
        located = data.load_located_records(source)
    else:  # generated tasks: a single question and its answer
        located = [({fields.input_field: r["messages"][-2]["content"],
                     fields.target_field: r["messages"][-1]["content"]}, f"{source} record {i}")
                   for i, r in enumerate(records, start=1)]
    target_length = fields.target_length or cfg.seq_length
    examples, stats = data.tokenize_seq2seq_records(located, model.tokenizer, fields.input_field, fields.target_field,
                                                    cfg.seq_length, target_length)
    rows = data.make_seq2seq_rows(examples, cfg.seq_length, target_length, model.config.decoder_start_token_id,
                                  pack=pack)
    return rows, stats


RECIPE = SFTRecipe()
