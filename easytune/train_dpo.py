"""Preference optimization: `python -m easytune.train_dpo --model=... --train_data=pairs.jsonl`.

Losses: --loss_type=sigmoid (DPO; --label_smoothing gives cDPO), ipo, hinge, robust, orpo, simpo
(definitions in `easytune.algos.dpo`). The reference policy is, by what the run trains:
- an adapter (--peft=lora, the default here; qlora, dora, ...): the base model with the adapter
  off: no second copy;
- all weights (--peft=none): a frozen copy of the initial weights, sharded like them, without
  optimizer state;
- either, with --precompute_reference: reference log-probs computed in one pass before training
  and cached in <output_dir>/reference_logps_{train,eval}.npz (reused on --resume); then no
  reference model is held during training.
ORPO and SimPO (and --reference_free) use no reference.

With no flags it runs the embedded default: SmolLM2-135M-Instruct (bundled) with LoRA on
preference pairs built from verifiable tasks (chosen = the exact answer, rejected = the model's
own wrong greedy answer, or a perturbed one), with held-out exact-match accuracy before and after.
Every flag: `python -m easytune.train_dpo --help`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys

from absl import app, flags

from easytune import config as config_lib, entry
from easytune.adapters import FLAG_DEFAULTS as PEFT_DEFAULTS, FLAG_DOCS as PEFT_DOCS

DEFAULTS = {
    "model": None,
    "train_data": None,
    "eval_data": None,
    "output_dir": "outputs/dpo",
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
    "head_chunk_size": 0,
    "chat_template": None,
    "loss_reduction": "mean",
    "loss_type": "sigmoid",
    "beta": 0.1,
    "label_smoothing": 0.0,
    "reference_free": False,
    "simpo_gamma": 0.5,
    "precompute_reference": False,
    "optimizer": {
        "lr": 5e-4, "schedule": "cosine", "warmup_steps": 0, "warmup_ratio": 0.1, "min_lr_ratio": 0.1,
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
    "tasks": {"num_train": 192, "num_heldout": 100, "max_new_tokens": 16, "rejected": "model"},
    "jax_distributed": {"coordinator_address": None, "num_processes": 0, "process_id": -1},
    **PEFT_DEFAULTS,
    "peft": "lora",
}

DOCS = {
    **config_lib.COMMON_DOCS,
    **config_lib.LM_HEAD_DOCS,
    "model": "HF directory, hub id, or easytune checkpoint/run directory, e.g. an SFT run (default: bundled "
             "SmolLM2-135M-Instruct)",
    "train_data": "preference pairs: .jsonl/.json/.parquet or a `datasets` name; {prompt, chosen, rejected} as "
                  "strings, or chosen/rejected as message lists (whole conversations incl. the prompt turn, as "
                  "UltraFeedback-binarized, or the assistant turns only) (default: pairs from generated tasks)",
    "eval_data": "evaluation pairs, same layouts (default: none)",
    "total_steps": "optimizer steps; 0 = num_epochs over the training pairs",
    "num_epochs": "epochs when total_steps is 0",
    "batch_size": "global batch in preference pairs (each is a chosen and a rejected sequence)",
    "seq_length": "maximum tokens per sequence (prompt + response), truncated on the right; rows are as long "
                  "as the longest pair needs, up to this",
    "chat_template": "tokenizer (default: the tokenizer's own), chatml, or tulu; a builtin one is written into "
                     "the run's and the exports' tokenizer",
    "loss_reduction": "mean: per pair over the global batch; sum: per micro-batch pair sum averaged over "
                      "accumulation steps",
    "loss_type": "sigmoid (DPO), ipo (length-normalized), hinge, robust, orpo (chosen-response NLL + beta * "
                 "odds-ratio term), simpo (length-averaged, margin simpo_gamma, no NLL)",
    "beta": "DPO beta (ipo: tau; orpo: lambda; simpo: beta, the paper uses 2.0-2.5)",
    "label_smoothing": "sigmoid: conservative DPO (cDPO) label noise; robust: label-flip rate in [0, 0.5); "
                       "simpo: label smoothing",
    "reference_free": "DPO family: reference log-probs of 0 (no reference policy)",
    "simpo_gamma": "SimPO target reward margin gamma",
    "precompute_reference": "compute the reference log-probs in one pass before training (cached in "
                            "<output_dir>/reference_logps_*.npz) instead of holding a reference during training",
    "optimizer.lr": "peak learning rate (AdamW); the default suits LoRA on the embedded job, full DPO "
                    "usually wants 5e-7 to 5e-6",
    "seed": "data order and adapter init seed",
    "eval_steps": "evaluate on eval_data every N steps (0 = only at the end)",
    "export_hf": "write a Hugging Face directory here at the end, adapters merged (default job: <output_dir>/hf)",
    "tasks.num_train": "default job: generated training tasks (one preference pair each)",
    "tasks.num_heldout": "default job: held-out tasks for exact-match accuracy",
    "tasks.max_new_tokens": "default job: generation budget per answer (held-out and the model's own answers)",
    "tasks.rejected": "default job: the rejected answer: model (the model's own greedy answer when wrong, else "
                      "a perturbed one) or perturb (a nearby number, a mis-sorted list, ...)",
    **PEFT_DOCS,
    "peft": "parameter-efficient fine-tuning: lora (default: the reference is the base, no copy), qlora, dora, "
            "prompt, prefix, ptuning, or none (all weights; the reference is a frozen copy unless "
            "--precompute_reference)",
}

config_lib.define_flags(DEFAULTS, DOCS)
flags.adopt_module_key_flags(config_lib)  # so that --help (not only --helpfull) lists them
logger = logging.getLogger("easytune")


def cached_reference_logps(path: str, rows: dict, compute) -> dict:
    """Reference log-probs for `rows` from `path` if it holds them for these very rows, else
    `compute()` (saved to `path`)."""
    import numpy as np
    digest = hashlib.sha256()
    for key in ("chosen_input_ids", "chosen_loss_mask", "rejected_input_ids", "rejected_loss_mask"):
        digest.update(np.ascontiguousarray(rows[key]).tobytes())
    fingerprint = digest.hexdigest()
    if os.path.exists(path):
        with np.load(path) as cached:
            if str(cached["fingerprint"]) == fingerprint:
                logger.info("reference log-probs from %s", path)
                return {k: cached[k] for k in ("ref_chosen_logps", "ref_rejected_logps")}
    values = compute()
    import jax
    if jax.process_index() == 0:
        np.savez(path, fingerprint=np.array(fingerprint), **values)
    return values


def run(cfg) -> dict:
    """Train on preference pairs as `cfg` says; returns a summary (also <output_dir>/summary.json)."""
    from easytune import adapters, data, train
    from easytune.algos import dpo

    start, is_main = entry.start(cfg)
    options = dpo.PreferenceConfig(loss_type=cfg.loss_type, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                                   reference_free=cfg.reference_free, simpo_gamma=cfg.simpo_gamma)
    if cfg.precompute_reference and not options.uses_reference:
        raise ValueError(f"--precompute_reference has nothing to compute: the {cfg.loss_type} loss"
                         f"{' with --reference_free' if cfg.reference_free else ''} uses no reference policy.")
    model = entry.load_causal_lm(cfg, "preference optimization", "preference training needs one to format the pairs")
    template = data.adopt_chat_template(model.tokenizer, cfg.chat_template)
    adapter = adapters.attach_from_flags(model, cfg, seed=cfg.seed)
    prompt_learning = adapter is not None and not adapter.config.is_lora
    if prompt_learning and cfg.export_hf:
        raise ValueError(f"--export_hf merges the adapter into the weights, which a {adapter.config.method} adapter "
                         f"cannot be; use --export_peft.")
    if adapter is not None:
        info = adapters.summary(adapter.config, adapter.params, model.config)
        logger.info("peft %s: %d trainable parameters (%.3f%% of %d)", info["method"], info["trainable_params"],
                    100 * info["trainable_fraction"], info["base_params"])

    default_job = cfg.train_data is None
    heldout = None
    if default_job:
        task_records, heldout = data.train_and_heldout(cfg.tasks.num_train, cfg.tasks.num_heldout, seed=cfg.seed)
        train_records = data.task_pairs_from_model(model, task_records, cfg.tasks.rejected,
                                                   cfg.tasks.max_new_tokens, cfg.seed)
        source = f"generated task pairs ({len(train_records)} train, {len(heldout)} held out)"
        locations = None
        if is_main:
            with open(os.path.join(cfg.output_dir, "train_pairs.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in train_records)
    else:
        source = cfg.train_data
        train_records, locations = data.load_pairs(source)
    rows, stats = data.pair_rows(train_records, model.tokenizer, template, cfg.seq_length, source, locations)
    logger.info("train data %s: %s; rows of %d tokens", source, stats.summary(), rows["chosen_input_ids"].shape[1])
    if stats.num_dropped and is_main:
        print(f"dropped {stats.num_dropped} of {stats.num_records} pairs whose chosen ({stats.num_dropped_chosen}) "
              f"or rejected ({stats.num_dropped_rejected}) response is empty after truncation to "
              f"seq_length={cfg.seq_length}", file=sys.stderr)
    eval_rows = None
    if cfg.eval_data:
        eval_records, eval_locations = data.load_pairs(cfg.eval_data)
        eval_rows, _ = data.pair_rows(eval_records, model.tokenizer, template, cfg.seq_length, cfg.eval_data,
                                      eval_locations)

    micro_batch = cfg.batch_size // max(cfg.grad_accum_steps, 1)
    precomputed = cfg.precompute_reference and options.uses_reference
    if precomputed:  # the reference: the initial model, adapters off
        for name, these in (("train", rows), ("eval", eval_rows)):
            if these is not None:
                these.update(cached_reference_logps(
                    os.path.join(cfg.output_dir, f"reference_logps_{name}.npz"), these,
                    lambda these=these: dpo.reference_logps(model.config, model.params, these, model.mesh,
                                                            micro_batch)))
    batches = data.BatchIterator(rows, cfg.batch_size, seed=cfg.seed)
    eval_batches = None
    if eval_rows is not None:
        eval_batches = lambda: train.eval_batches(eval_rows, micro_batch)  # noqa: E731

    total_steps = entry.total_steps(cfg, batches)
    entry.write_run_files(cfg, model, is_main)
    trainer = train.Trainer(cfg, model, dpo.make_loss(options), total_steps,
                            reference=options.uses_reference and not precomputed, count_name="pairs")
    summary = {"train_pairs": stats.num_records, "train_pairs_dropped": stats.num_dropped,
               "total_steps": total_steps, "loss_type": cfg.loss_type,
               "reference": ("none" if not options.uses_reference else "precomputed" if precomputed
                             else "base (adapter off)" if adapter is not None else "copy"),
               "train_state_bytes": trainer.state_bytes()}
    entry.resume_and_open_metrics(cfg, trainer, batches)
    if adapter is not None:
        summary.update({"peft": adapter.config.method, "trainable_params": adapters.count(adapter.params)})
    if heldout is not None and trainer.step == 0:
        summary["heldout_accuracy_before"] = entry.heldout_accuracy(
            model, heldout, cfg.tasks.max_new_tokens, "before", is_main)

    history = entry.train(trainer, batches, eval_batches, total_steps, summary)
    if history:
        summary.update({k: history[-1][k] for k in history[-1] if k.startswith("rewards/")})
    entry.save_and_evaluate(cfg, trainer, batches, eval_batches, history, summary)
    if heldout is not None:
        summary["heldout_accuracy_after"] = entry.heldout_accuracy(
            model, heldout, cfg.tasks.max_new_tokens, "after", is_main)
    entry.export(cfg, model, summary, default_job)
    return entry.finish(cfg, trainer, summary, start, is_main)


main = entry.make_main(DEFAULTS, run)


if __name__ == "__main__":
    app.run(main)
