"""Reward models: `python -m easytune.train_reward --model=... --train_data=pairs.jsonl`.

A scalar `score` head [hidden, 1] replaces the LM head of the starting model (or continues a reward
model's) and is read at each sequence's last token; the loss is Bradley–Terry on (chosen,
rejected) pairs, with the data's optional `margin` field subtracted and optional reward centering
(`--center_rewards_coefficient`), as TRL's RewardTrainer (`easytune.algos.reward`). Pairs use the
layouts of `train_dpo` (`easytune.data.preference`). Eval reports pairwise accuracy.
`--export_hf` writes transformers' `LlamaForSequenceClassification` (or Mistral's) with
`num_labels=1`; `easytune.load` of that directory or of the run gives a model whose `.score(...)`
returns the rewards.

With no flags it runs the embedded default: SmolLM2-135M-Instruct (bundled) trained on preference
pairs from verifiable tasks (as train_dpo's default job), with held-out pairwise accuracy before
and after. Every flag: `python -m easytune.train_reward --help`.
"""
from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags

from easytune import config as config_lib, entry, models

DEFAULTS = {
    "model": None,
    "train_data": None,
    "eval_data": None,
    "output_dir": "outputs/reward",
    "mesh_dim": "1,-1,1",
    "total_steps": 0,
    "num_epochs": 1,
    "batch_size": 8,
    "seq_length": 512,
    "grad_accum_steps": 1,
    "dtype": "float32",
    "param_dtype": "float32",
    "remat": "none",
    "attention": "xla",
    "chat_template": None,
    "loss_reduction": "mean",
    "center_rewards_coefficient": 0.0,
    "optimizer": {
        "lr": 5e-5, "schedule": "cosine", "warmup_steps": 0, "warmup_ratio": 0.1, "min_lr_ratio": 0.1,
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
    "tasks": {"num_train": 128, "num_heldout": 100, "max_new_tokens": 16, "rejected": "model"},
    "jax_distributed": {"coordinator_address": None, "num_processes": 0, "process_id": -1},
}

DOCS = {
    **config_lib.COMMON_DOCS,
    "model": "HF directory, hub id, or easytune checkpoint/run directory: a causal LM (its LM head is replaced by "
             "a new score head) or a reward model to continue (default: bundled SmolLM2-135M-Instruct)",
    "train_data": "preference pairs (the layouts of train_dpo), optionally with a numeric `margin` field "
                  "(default: pairs from generated tasks)",
    "eval_data": "evaluation pairs, same layouts; eval_accuracy is the pairwise accuracy (default job: the "
                 "held-out task pairs)",
    "total_steps": "optimizer steps; 0 = num_epochs over the training pairs",
    "num_epochs": "epochs when total_steps is 0",
    "batch_size": "global batch in preference pairs (each is a chosen and a rejected sequence)",
    "seq_length": "maximum tokens per sequence (prompt + response), truncated on the right; rows are as long "
                  "as the longest pair needs, up to this",
    "chat_template": "tokenizer (default: the tokenizer's own), chatml, or tulu; a builtin one is written into "
                     "the run's and the exports' tokenizer",
    "loss_reduction": "mean: per pair over the global batch; sum: per micro-batch pair sum averaged over "
                      "accumulation steps",
    "center_rewards_coefficient": "reward centering: adds c * mean((r_chosen + r_rejected)^2) (0 = off; "
                                  "the paper suggests 0.01)",
    "optimizer.lr": "peak learning rate (AdamW; all weights and the score head train)",
    "seed": "data order and score head init seed",
    "eval_steps": "evaluate on eval_data every N steps (0 = only at the end)",
    "export_hf": "write a Hugging Face *ForSequenceClassification directory here at the end (default job: "
                 "<output_dir>/hf)",
    "tasks.num_train": "default job: generated training tasks (one preference pair each)",
    "tasks.num_heldout": "default job: held-out tasks (pairs) for pairwise accuracy",
    "tasks.max_new_tokens": "default job: generation budget of the model's own answers",
    "tasks.rejected": "default job: the rejected answer: model (the model's own greedy answer when wrong, else "
                      "a perturbed one) or perturb (a nearby number, a mis-sorted list, ...)",
}

config_lib.define_flags(DEFAULTS, DOCS)
flags.adopt_module_key_flags(config_lib)  # so that --help (not only --helpfull) lists them
logger = logging.getLogger("easytune")


def run(cfg) -> dict:
    """Train a reward model as `cfg` says; returns a summary (also <output_dir>/summary.json)."""
    import easytune
    from easytune import data, logging_utils, train
    from easytune.algos import reward

    start, is_main = entry.start(cfg)
    model = easytune.load(cfg.model, dtype=cfg.dtype, param_dtype=cfg.param_dtype, mesh_dim=cfg.mesh_dim,
                          remat=cfg.remat, attention=cfg.attention)
    if model.tokenizer is None:
        raise ValueError(f"{cfg.model} has no tokenizer; reward training needs one to format the pairs.")
    if model.is_encoder_decoder:
        raise ValueError(f"reward models here are decoder-only (LLaMA/Mistral); {cfg.model} is an encoder-decoder.")
    template = data.adopt_chat_template(model.tokenizer, cfg.chat_template)

    default_job = cfg.train_data is None
    eval_rows = None
    if default_job:  # pairs from the causal LM's own answers, before it becomes a reward model
        if getattr(model.config, "num_labels", 0):
            raise ValueError("the default job builds its pairs from a causal LM's answers; give --train_data to "
                             "continue training a reward model.")
        task_records, heldout_tasks = data.train_and_heldout(cfg.tasks.num_train, cfg.tasks.num_heldout,
                                                             seed=cfg.seed)
        train_records, heldout_records = (
            data.task_pairs_from_model(model, records, cfg.tasks.rejected, cfg.tasks.max_new_tokens, cfg.seed)
            for records in (task_records, heldout_tasks))
        source = f"generated task pairs ({len(train_records)} train, {len(heldout_records)} held out)"
        rows, stats = data.pair_rows(train_records, model.tokenizer, template, cfg.seq_length, source)
        eval_rows, _ = data.pair_rows(heldout_records, model.tokenizer, template, cfg.seq_length, "held-out task pairs")
        if is_main:
            for name, records in (("train", train_records), ("heldout", heldout_records)):
                with open(os.path.join(cfg.output_dir, f"{name}_pairs.jsonl"), "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
    else:
        source = cfg.train_data
        records, locations = data.load_pairs(source)
        rows, stats = data.pair_rows(records, model.tokenizer, template, cfg.seq_length, source, locations)
    if cfg.eval_data:
        eval_records, eval_locations = data.load_pairs(cfg.eval_data)
        eval_rows, _ = data.pair_rows(eval_records, model.tokenizer, template, cfg.seq_length, cfg.eval_data,
                                      eval_locations)
    logger.info("train data %s: %s; rows of %d tokens", source, stats.summary(), rows["chosen_input_ids"].shape[1])
    if stats.num_dropped and is_main:
        print(f"dropped {stats.num_dropped} of {stats.num_records} pairs whose chosen ({stats.num_dropped_chosen}) "
              f"or rejected ({stats.num_dropped_rejected}) response is empty after truncation to "
              f"seq_length={cfg.seq_length}", file=sys.stderr)
    model = reward.with_score_head(model, seed=cfg.seed)

    batches = data.BatchIterator(rows, cfg.batch_size, seed=cfg.seed)
    micro_batch = cfg.batch_size // max(cfg.grad_accum_steps, 1)
    eval_batches = None
    if eval_rows is not None:
        eval_batches = lambda: train.eval_batches(eval_rows, micro_batch)  # noqa: E731
    total_steps = entry.total_steps(cfg, batches)
    entry.write_run_files(cfg, model, is_main)
    trainer = train.Trainer(cfg, model, reward.make_loss(cfg.center_rewards_coefficient), total_steps,
                            count_name="pairs")
    summary = {"train_pairs": stats.num_records, "train_pairs_dropped": stats.num_dropped, "total_steps": total_steps,
               "train_state_bytes": trainer.state_bytes()}
    entry.resume_and_open_metrics(cfg, trainer, batches)
    if eval_batches is not None and trainer.step == 0:
        summary["eval_accuracy_before"] = trainer.evaluate(eval_batches())["eval_accuracy"]
        if is_main:
            print(f"pairwise accuracy on the eval pairs before: {summary['eval_accuracy_before']:.3f}")

    history = entry.train(trainer, batches, eval_batches, total_steps, summary,
                            flops_per_token=models.flops_per_token(model.config, cfg.seq_length),
                            peak_flops=logging_utils.peak_flops_per_device())
    if history:
        summary["last_accuracy"] = history[-1]["accuracy"]
    entry.save_and_evaluate(cfg, trainer, batches, eval_batches, history, summary)
    if eval_batches is not None and is_main:
            print(f"pairwise accuracy on the eval pairs after: {summary['eval_accuracy']:.3f}")
    entry.export(cfg, model, summary, default_job)
    return entry.finish(cfg, trainer, summary, start, is_main)


main = entry.make_main(DEFAULTS, run)


if __name__ == "__main__":
    app.run(main)
