"""Supervised fine-tuning: `python -m easytune.train_sft --mesh_dim=1,-1,1 --model=... --train_data=...`.

With no flags it runs the embedded default: SmolLM2-135M-Instruct (bundled) fine-tuned on
verifiable tasks easytune generates, with held-out exact-match accuracy before and after, and an
HF export. Every flag: `python -m easytune.train_sft --help`.

Encoder-decoder models (T5) train on `{"input": ..., "target": ...}` records (`--seq2seq.*` names
the fields) with the seq2seq loss: `--seq_length` is the encoder's row length and
`--seq2seq.target_length` the decoder's.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags

from easytune import config as config_lib, entry, models
from easytune.adapters import FLAG_DEFAULTS as PEFT_DEFAULTS, FLAG_DOCS as PEFT_DOCS

DEFAULTS = {
    "model": None,
    "train_data": None,
    "eval_data": None,
    "output_dir": "outputs/sft",
    "mesh_dim": "1,-1,1",
    "total_steps": 0,
    "num_epochs": 1,
    "batch_size": 8,
    "seq_length": 256,
    "grad_accum_steps": 1,
    "dtype": "float32",
    "param_dtype": "float32",
    "remat": "none",
    "attention": "xla",
    "head_chunk_size": 0,
    "chat_template": None,
    "pack": True,
    "loss_reduction": "mean",
    "optimizer": {
        "lr": 1e-4, "schedule": "cosine", "warmup_steps": 0, "warmup_ratio": 0.05, "min_lr_ratio": 0.1,
        "weight_decay": 0.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "clip_grad_norm": 1.0,
    },
    "seed": 0,
    "log_steps": 1,
    "eval_steps": 0,
    "save_steps": 0,
    "keep_checkpoints": 2,
    "resume": False,
    "export_hf": None,
    "logger": "tensorboard",
    "tasks": {"num_train": 640, "num_heldout": 100, "max_new_tokens": 16},
    "seq2seq": {"input_field": "input", "target_field": "target", "target_length": 0},
    "jax_distributed": {"coordinator_address": None, "num_processes": 0, "process_id": -1},
    **PEFT_DEFAULTS,
}

DOCS = {
    **config_lib.COMMON_DOCS,
    **config_lib.LM_HEAD_DOCS,
    "model": "HF directory, hub id, or easytune checkpoint/run directory (default: bundled SmolLM2-135M-Instruct)",
    "train_data": "training data: .jsonl/.json/.parquet or a `datasets` name; formats: messages, "
                  "instruction/input/output, prompt/completion, text (default: generated verifiable tasks)",
    "eval_data": "evaluation data, same formats (default: none; the default job uses its held-out tasks)",
    "total_steps": "optimizer steps; 0 = num_epochs over the training data",
    "num_epochs": "epochs when total_steps is 0",
    "batch_size": "global batch in sequences (rows of seq_length), across all hosts and accumulation steps",
    "seq_length": "tokens per row; longer samples are truncated on the right",
    "attention": "attention implementation: xla (reference), pallas (easytune's fused GPU kernel; interpret mode "
                 "on CPU), splash (JAX's TPU kernel; interpret mode on CPU), cudnn (NVIDIA GPUs) or auto (pallas on "
                 "GPU, splash on TPU, xla elsewhere)",
    "chat_template": "tokenizer (default: the tokenizer's own), chatml, or tulu; a builtin one is written into "
                     "the run's and the exports' tokenizer",
    "pack": "pack several samples per row (best fit; attention never crosses samples)",
    "loss_reduction": "mean: per trained token over the global batch; sum: per micro-batch token sum "
                      "averaged over accumulation steps (open-instruct's --reduce_loss sum)",
    "optimizer.lr": "peak learning rate (AdamW); the default suits the embedded 135M job, full fine-tuning "
                    "of 7B+ models usually wants 1e-5 to 2e-5",
    "seed": "data order seed",
    "eval_steps": "evaluate on eval_data every N steps (0 = only at the end)",
    "export_hf": "write a Hugging Face directory here at the end, adapters merged (default job: <output_dir>/hf)",
    "tasks.num_train": "default job: generated training tasks",
    "tasks.num_heldout": "default job: held-out tasks for exact-match accuracy",
    "tasks.max_new_tokens": "default job: generation budget per held-out answer",
    "seq2seq.input_field": "encoder-decoder models (T5): the record field holding the encoder's input text",
    "seq2seq.target_field": "encoder-decoder models (T5): the record field holding the target text (trained, plus eos)",
    "seq2seq.target_length": "encoder-decoder models (T5): decoder tokens per row (0 = seq_length, the encoder's)",
    **PEFT_DOCS,
}

config_lib.define_flags(DEFAULTS, DOCS)
flags.adopt_module_key_flags(config_lib)  # so that --help (not only --helpfull) lists them
logger = logging.getLogger("easytune")


def training_rows(cfg, model, template, source: str, records=None, pack: bool | None = None):
    """`(rows, stats)` of the data at `source` (or of `records`, named `source`), laid out for the
    model: chat/text SFT rows, or paired encoder/decoder rows for an encoder-decoder."""
    from easytune import data
    pack = cfg.pack if pack is None else pack
    if not model.is_encoder_decoder:
        records = data.load_records(source) if records is None else records
        examples, stats = data.tokenize_records(records, model.tokenizer, template, cfg.seq_length, source)
        return data.make_rows(examples, cfg.seq_length, pack=pack), stats
    fields = cfg.seq2seq
    if records is None:
        located = data.load_located_records(source)
    else:  # generated tasks: a single question and its answer
        located = [({fields.input_field: r["messages"][-2]["content"], fields.target_field: r["messages"][-1]["content"]},
                    f"{source} record {i}") for i, r in enumerate(records, start=1)]
    target_length = fields.target_length or cfg.seq_length
    examples, stats = data.tokenize_seq2seq_records(located, model.tokenizer, fields.input_field, fields.target_field,
                                                    cfg.seq_length, target_length)
    rows = data.make_seq2seq_rows(examples, cfg.seq_length, target_length, model.config.decoder_start_token_id,
                                  pack=pack)
    return rows, stats


def run(cfg) -> dict:
    """Fine-tune as `cfg` says; returns a summary (also written to <output_dir>/summary.json)."""
    import easytune
    from easytune import adapters, data, logging_utils, train
    from easytune.algos import seq2seq, sft

    start, is_main = entry.start(cfg)
    model = easytune.load(cfg.model, dtype=cfg.dtype, param_dtype=cfg.param_dtype, mesh_dim=cfg.mesh_dim,
                          remat=cfg.remat, attention=cfg.attention, head_chunk_size=cfg.head_chunk_size)
    if model.tokenizer is None:
        raise ValueError(f"{cfg.model} has no tokenizer; SFT needs one to format and tokenize the data.")
    template = None if model.is_encoder_decoder else data.adopt_chat_template(model.tokenizer, cfg.chat_template)
    adapter = adapters.attach_from_flags(model, cfg, seed=cfg.seed)
    prompt_learning = adapter is not None and not adapter.config.is_lora
    if prompt_learning and cfg.export_hf:
        raise ValueError(f"--export_hf merges the adapter into the weights, which a {adapter.config.method} adapter "
                         f"cannot be; use --export_peft.")
    pack = cfg.pack and not prompt_learning  # virtual tokens belong to one example per row
    if adapter is not None:
        info = adapters.summary(adapter.config, adapter.params, model.config)
        logger.info("peft %s: %d trainable parameters (%.3f%% of %d)", info["method"], info["trainable_params"],
                    100 * info["trainable_fraction"], info["base_params"])

    default_job = cfg.train_data is None
    heldout = None
    if default_job:
        train_records, heldout = data.train_and_heldout(cfg.tasks.num_train, cfg.tasks.num_heldout, seed=cfg.seed)
        source = f"generated tasks ({len(train_records)} train, {len(heldout)} held out)"
        rows, stats = training_rows(cfg, model, template, source, train_records, pack=pack)
    else:
        source = cfg.train_data
        rows, stats = training_rows(cfg, model, template, source, pack=pack)
    batches = data.BatchIterator(rows, cfg.batch_size, seed=cfg.seed)
    logger.info("train data %s: %s; %d rows of %d tokens", source, stats.summary(), len(rows["input_ids"]), cfg.seq_length)
    if stats.num_dropped_no_trainable_tokens and is_main:
        print(f"dropped {stats.num_dropped_no_trainable_tokens} of {stats.num_records} samples with no trainable "
              f"tokens after truncation to seq_length={cfg.seq_length}", file=sys.stderr)

    eval_batches = None
    if cfg.eval_data:
        eval_rows, _ = training_rows(cfg, model, template, cfg.eval_data, pack=pack)
        # micro-batches: eval logits must fit wherever training's do
        eval_batches = lambda: train.eval_batches(eval_rows, cfg.batch_size // cfg.grad_accum_steps)  # noqa: E731

    total_steps = entry.total_steps(cfg, batches)
    entry.write_run_files(cfg, model, is_main)
    loss_fn = seq2seq.loss_sums if model.is_encoder_decoder else sft.loss_sums
    trainer = train.Trainer(cfg, model, loss_fn, total_steps)
    summary = {"train_samples": stats.num_records, "train_samples_dropped": stats.num_dropped_no_trainable_tokens,
               "total_steps": total_steps}
    entry.resume_and_open_metrics(cfg, trainer, batches)
    if adapter is not None:
        summary.update({"peft": adapter.config.method, "trainable_params": adapters.count(adapter.params)})
    if heldout is not None and trainer.step == 0:
        summary["heldout_accuracy_before"] = entry.heldout_accuracy(
            model, heldout, cfg.tasks.max_new_tokens, "before", is_main)

    # (None for encoder-decoders: their FLOPs per token depend on the input/target split, so no MFU yet)
    flops_per_token = models.flops_per_token(model.config, cfg.seq_length)
    history = entry.train(trainer, batches, eval_batches, total_steps, summary, flops_per_token=flops_per_token,
                            peak_flops=logging_utils.peak_flops_per_device())
    entry.save_and_evaluate(cfg, trainer, batches, eval_batches, history, summary)
    if heldout is not None:
        summary["heldout_accuracy_after"] = entry.heldout_accuracy(
            model, heldout, cfg.tasks.max_new_tokens, "after", is_main)
    entry.export(cfg, model, summary, default_job)
    return entry.finish(cfg, trainer, summary, start, is_main)


main = entry.make_main(DEFAULTS, run)


if __name__ == "__main__":
    app.run(main)
