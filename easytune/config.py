"""Flags shared by every entry point: one ml_collections tree of defaults, each leaf an absl flag.

Nested fields are set with dotted flags (`--optimizer.lr=2e-5`), a preset with
`--config=configs/<preset>.py` (a file whose `get_config()` returns a dict or ConfigDict of
overrides) or `--config=<run>/easytune_config.json` (a run's flags, replayed; its --resume,
--resume_override, --config and --jax_distributed.* are not). Precedence: command line > preset > defaults.
`--help` lists every field with its doc.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Mapping

from absl import flags
from ml_collections import ConfigDict


def leaves(tree: Mapping, prefix: str = ""):
    """`(dotted name, value)` of every leaf of a nested mapping."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from leaves(value, name + ".")
        else:
            yield name, value


def define_flags(defaults: Mapping, docs: Mapping[str, str], flag_values=flags.FLAGS) -> None:
    """Register one absl flag per leaf of `defaults` (dotted names for nested fields).

    A leaf whose default is None becomes a string flag where '' means None.

    A flag another entry point already defined in this process (tests import several) is kept:
    `read_config` takes every value that is not on the command line from its own `defaults`, so
    only that flag's --help text would differ.
    """
    if "config" not in flag_values:
        flags.DEFINE_string("config", None, "preset file (python, get_config() -> overrides); "
                            "command-line flags override it", flag_values=flag_values)
    for name, value in leaves(defaults):
        doc = docs.get(name, "")
        if name not in docs:
            raise ValueError(f"flag {name!r} has no documentation; add it to the docs table.")
        if name in flag_values:
            continue
        if isinstance(value, bool):
            flags.DEFINE_boolean(name, value, doc, flag_values=flag_values)
        elif isinstance(value, int):
            flags.DEFINE_integer(name, value, doc, flag_values=flag_values)
        elif isinstance(value, float):
            flags.DEFINE_float(name, value, doc, flag_values=flag_values)
        else:
            flags.DEFINE_string(name, "" if value is None else str(value), doc, flag_values=flag_values)


# a run's recorded flags that say how that run was started, not what it computes: not replayed
REPLAY_SKIPS = ("resume", "resume_override", "config", "jax_distributed")  # + this process's launch


def _load_preset(path: str) -> dict:
    """A preset's overrides: a `.py` file's `get_config()`, or a `.json` file of flags (a run's
    `easytune_config.json`, which replays that run)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config preset {path} does not exist.")
    if path.endswith(".json"):
        with open(path) as f:
            try:
                preset = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"--config {path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
        if not isinstance(preset, dict):
            raise ValueError(f"--config {path} must hold a JSON object of flags.")
        return {k: v for k, v in preset.items() if k not in REPLAY_SKIPS}
    spec = importlib.util.spec_from_file_location("easytune_preset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config preset {path} must define get_config() returning the overrides.")
    preset = module.get_config()
    return preset.to_dict() if isinstance(preset, ConfigDict) else dict(preset)


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree[key]
    tree[leaf] = value


def read_config(defaults: Mapping, flag_values=flags.FLAGS) -> ConfigDict:
    """The merged configuration after absl has parsed the command line."""
    tree = ConfigDict(dict(defaults)).to_dict()
    known = dict(leaves(defaults))
    if flag_values["config"].value:
        for name, value in leaves(_load_preset(flag_values["config"].value)):
            if name not in known:
                raise ValueError(f"preset {flag_values['config'].value} sets unknown field {name!r}.")
            _set(tree, name, value)
    for name, default in known.items():
        flag = flag_values[name]
        if flag.present:
            value = flag.value
            _set(tree, name, None if (default is None and value == "") else value)
    return ConfigDict(tree)


# ----------------------------------------------------------------------------- the shared flags
# Every recipe's flags are SHARED plus the groups it names (`Recipe.flag_groups`) plus its own
# (`Recipe.defaults`, which may also change a shared default, e.g. the learning rate), merged by
# `recipe_flags`. A shared flag is declared and documented here once.

SHARED_DEFAULTS = {
    "model": None,
    "train_data": None,
    "output_dir": "outputs/run",
    "mesh_dim": "1,-1,1",
    "grad_accum_steps": 1,
    "dtype": "float32",
    "param_dtype": "float32",
    "remat": "none",
    "layer_loop": "auto",
    "attention": "xla",
    "loss_reduction": "mean",
    "optimizer": {
        "lr": 0.0, "schedule": "cosine", "warmup_steps": 0, "warmup_ratio": 0.05, "min_lr_ratio": 0.1,
        "weight_decay": 0.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "clip_grad_norm": 1.0,
    },
    "seed": 0,
    "skip_nonfinite_steps": 0,
    "log_steps": 1,
    "peak_flops": 0.0,
    "save_steps": 0,
    "keep_checkpoints": 2,
    "async_checkpoints": True,
    "resume": False,
    "export_hf": None,
    "push_to_hub": "",
    "keep_best": None,
    "keep_best_mode": "max",
    "logger": "tensorboard",
    "wandb": {"project": "", "entity": "", "name": "", "tags": "", "group": ""},
    "resume_override": "",
    "debug": False,
    "jax_distributed": {"coordinator_address": None, "num_processes": 0, "process_id": -1},
}

SHARED_DOCS = {
    "model": "HF directory, hub id, or easytune checkpoint/run directory (default: bundled SmolLM2-135M-Instruct)",
    "train_data": "training data: .jsonl/.json/.parquet or a `datasets` name (default: generated verifiable tasks)",
    "output_dir": "where checkpoints, metrics.jsonl, TensorBoard logs and the tokenizer go",
    "mesh_dim": "device mesh dp,fsdp,mp (one may be -1) or dp:2,fsdp:-1,mp:1, over all devices of all hosts",
    "grad_accum_steps": "micro-batches accumulated per optimizer step (batch_size must divide by it)",
    "dtype": "compute dtype (float32, bfloat16)",
    "param_dtype": "stored (master) weight dtype",
    "remat": "rematerialization per layer: none, full, dots, dots_no_batch",
    "layer_loop": "the training forward's loop over layers: scan (compile time flat in depth), unroll (faster on "
                  "CPU, compiles longer) or auto (unroll on CPU when all weights train, scan for --peft runs and on GPU/TPU)",
    "attention": "attention implementation: xla (reference), pallas (easytune's fused GPU kernel; interpret mode "
                 "on CPU), splash (JAX's TPU kernel; interpret mode on CPU), cudnn (NVIDIA GPUs) or auto (pallas on "
                 "GPU, splash on TPU, xla elsewhere)",
    "loss_reduction": "mean: per unit (trained token, pair, ...) over the global batch; sum: per micro-batch sum "
                      "averaged over accumulation steps (open-instruct's --reduce_loss sum)",
    "optimizer.lr": "peak learning rate (AdamW); 0 = the command's default for the method trained (all weights, "
                    "LoRA family, prompt learning: see its --help)",
    "optimizer.schedule": "cosine, linear or constant after warmup",
    "optimizer.warmup_steps": "warmup steps (0 = use warmup_ratio)",
    "optimizer.warmup_ratio": "warmup as a fraction of total_steps",
    "optimizer.min_lr_ratio": "final learning rate as a fraction of lr",
    "optimizer.weight_decay": "AdamW weight decay (matrices only)",
    "optimizer.b1": "AdamW beta1",
    "optimizer.b2": "AdamW beta2",
    "optimizer.eps": "AdamW epsilon",
    "optimizer.clip_grad_norm": "clip gradients to this global norm (0 = off)",
    "seed": "data order and initialization seed",
    "skip_nonfinite_steps": "ride out up to N consecutive steps whose gradients are not finite by skipping their "
                            "update (optax.apply_if_finite); 0 = a non-finite loss or gradient stops the run",
    "log_steps": "log every N steps (progress bar, metrics.jsonl, TensorBoard)",
    "peak_flops": "the whole job's peak FLOP/s that MFU is measured against (0 = the accelerators' data-sheet "
                  "peak x devices; on CPU a matmul in --dtype timed at start-up x hosts)",
    "save_steps": "checkpoint every N steps and at the end (0 = only at the end)",
    "keep_checkpoints": "keep the newest N checkpoints (0 = all)",
    "async_checkpoints": "write checkpoints in the background while training goes on (the arrays are copied to "
                         "host memory first); the run waits for the last one before it exports or exits",
    "resume": "continue from the newest readable checkpoint in output_dir",
    "export_hf": "write a Hugging Face directory here at the end, adapters merged (default job: <output_dir>/hf)",
    "push_to_hub": "owner/name: upload the HF export (<output_dir>/hf unless --export_hf; the peft export for "
                   "adapters that cannot merge) to this Hub model repository at the end (needs HF_TOKEN or "
                   "`hf auth login`)",
    "keep_best": "also keep the best checkpoint by this evaluated figure (eval_loss, eval_accuracy, "
                 "eval_<task>/<metric> of --eval_tasks, heldout_accuracy) in <output_dir>/best/<step>, loadable with "
                 "easytune.load(<output_dir>/best)",
    "keep_best_mode": "max or min: which end of --keep_best is best",
    "logger": "tensorboard, wandb, both (tensorboard,wandb) or none (metrics.jsonl is always written)",
    "wandb.project": "W&B project (default: $WANDB_PROJECT, else easytune)",
    "wandb.entity": "W&B entity, a user or team (default: $WANDB_ENTITY, else wandb's default)",
    "wandb.name": "W&B run name (default: $WANDB_NAME, else wandb's generated one)",
    "wandb.tags": "comma-separated W&B tags (default: $WANDB_TAGS)",
    "wandb.group": "W&B run group (default: $WANDB_RUN_GROUP)",
    "resume_override": "comma-separated flags that --resume may change although they change what the run computes "
                       "(total_steps, batch_size, optimizer.lr, train_data, ...); without it such a change is refused",
    "debug": "show the traceback of an error (also EASYTUNE_DEBUG=1); without it an error is one sentence",
    "jax_distributed.coordinator_address": "host:port of process 0 (multi-host; auto-detected on TPU pods and SLURM)",
    "jax_distributed.num_processes": "number of processes (0 = auto)",
    "jax_distributed.process_id": "this process's index (-1 = auto)",
}

# Trainers over a fixed dataset, stepped in epochs (SFT, DPO family, reward models).
DATA_DEFAULTS = {
    "eval_data": None,
    "total_steps": 0,
    "num_epochs": 1,
    "batch_size": 8,
    "seq_length": 256,
    "eval_steps": 0,
    "chat_template": None,
}

DATA_DOCS = {
    "eval_data": "evaluation data, the training data's formats (default: none)",
    "total_steps": "optimizer steps; 0 = num_epochs over the training data",
    "num_epochs": "epochs when total_steps is 0",
    "batch_size": "global batch in sequences, across all hosts and accumulation steps",
    "seq_length": "tokens per row; longer samples are truncated on the right",
    "eval_steps": "evaluate on eval_data every N steps (0 = only at the end)",
    "chat_template": "tokenizer (default: the tokenizer's own), chatml, or tulu; a builtin one is written into "
                     "the run's and the exports' tokenizer",
}

# Trainers whose data is tokenized once into the cache (`easytune.data.cache`): SFT, distillation.
TOKENIZED_DATA_DEFAULTS = {"data_num_proc": 0, "data_cache_dir": ""}

TOKENIZED_DATA_DOCS = {
    "data_num_proc": "processes per host that tokenize the data (0 = one per 5,000 records, at most the CPUs)",
    "data_cache_dir": "where tokenized data is cached and reused by later runs (default: $EASYTUNE_CACHE/data; "
                      "none = no cache); on a pod, storage every host mounts makes each record tokenized once",
}

# Trainers whose loss reads the LM head (SFT, DPO family, RL).
LM_HEAD_DEFAULTS = {"head_chunk_size": 0}

LM_HEAD_DOCS = {
    "head_chunk_size": "tokens per chunk of the fused LM head + log-softmax in the loss (0 = off: full logits); "
                       "saves the [tokens, vocab] logits' memory at large vocabularies, costs one more head matmul",
}

# Trainers that can train an adapter instead of all weights (`easytune.run.attach_adapter` reads them).
PEFT_DEFAULTS = {
    "peft": "none",
    "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": "all-linear", "use_rslora": False},
    "prompt": {"num_virtual_tokens": 20, "encoder_type": "mlp", "encoder_hidden_size": 0, "init_text": ""},
    "peft_adapter": None,
    "export_peft": None,
}

PEFT_DOCS = {
    "peft": "parameter-efficient fine-tuning: none (full), lora, qlora (NF4 base + LoRA), dora, prompt, "
            "prefix, ptuning",
    "lora.rank": "LoRA rank r (lora, qlora, dora)",
    "lora.alpha": "LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)",
    "lora.dropout": "dropout on the LoRA input during training",
    "lora.target_modules": "comma-separated module names (q_proj,v_proj or attn/q), all-linear (every linear "
                           "but the output head), or re:<regex> over HF module names",
    "lora.use_rslora": "rank-stabilized scaling alpha / sqrt(r)",
    "prompt.num_virtual_tokens": "virtual tokens (prompt, prefix, ptuning)",
    "prompt.encoder_type": "ptuning: mlp or lstm reparameterization; prefix: mlp (prefix projection) or none",
    "prompt.encoder_hidden_size": "hidden size of the ptuning/prefix encoder (0 = the token dim, as peft)",
    "prompt.init_text": "prompt tuning: initialise the virtual tokens from this text's embeddings "
                        "(default: embeddings of random vocabulary tokens)",
    "peft_adapter": "start from this peft adapter directory (LoRA/DoRA/prompt/prefix) instead of a fresh one",
    "export_peft": "write the trained adapter here as a peft adapter directory (adapter_config.json + "
                   "adapter_model.safetensors)",
}

# Trainers of a causal LM: lm-evaluation-harness tasks during training, and the best checkpoint by a figure.
LM_EVAL_DEFAULTS = {
    "eval_tasks": "",
    "eval_include_path": None,
    "eval_limit": 0.0,
    "eval_num_fewshot": -1,
    "eval_batch_size": 8,
    "eval_max_gen_toks": 256,
    "eval_apply_chat_template": False,
}

LM_EVAL_DOCS = {
    "eval_tasks": "comma-separated lm-evaluation-harness tasks run on the model every --eval_steps and at the end, "
                  "logged as eval_<task>/<metric> (as `python -m easytune.eval --tasks`)",
    "eval_include_path": "a folder of local lm-eval task YAMLs for --eval_tasks",
    "eval_limit": "examples per --eval_tasks task (a fraction if < 1; 0 = all)",
    "eval_num_fewshot": "few-shot examples for --eval_tasks (-1 = each task's own)",
    "eval_batch_size": "requests per batch for --eval_tasks",
    "eval_max_gen_toks": "generation budget of --eval_tasks generative tasks",
    "eval_apply_chat_template": "render --eval_tasks prompts with the chat template",
}

FLAG_GROUPS = {
    "data": (DATA_DEFAULTS, DATA_DOCS),
    "tokenized_data": (TOKENIZED_DATA_DEFAULTS, TOKENIZED_DATA_DOCS),
    "lm_eval": (LM_EVAL_DEFAULTS, LM_EVAL_DOCS),
    "lm_head": (LM_HEAD_DEFAULTS, LM_HEAD_DOCS),
    "peft": (PEFT_DEFAULTS, PEFT_DOCS),
}


def _merge(base: Mapping, override: Mapping) -> dict:
    """`base` with `override` laid over it; nested dicts merge key by key."""
    out = dict(base)
    for key, value in override.items():
        nested = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merge(out[key], value) if nested else value
    return out


def recipe_flags(groups, defaults: Mapping, docs: Mapping) -> tuple[dict, dict]:
    """`(defaults, docs)` of a recipe: the shared flags, its `groups` (names in FLAG_GROUPS), then its
    own `defaults` and `docs`, each layer overriding the ones before."""
    all_defaults, all_docs = dict(SHARED_DEFAULTS), dict(SHARED_DOCS)
    for name in groups:
        group_defaults, group_docs = FLAG_GROUPS[name]
        all_defaults, all_docs = _merge(all_defaults, group_defaults), {**all_docs, **group_docs}
    return _merge(all_defaults, defaults), {**all_docs, **docs}
