"""Flags shared by every entry point: one ml_collections tree of defaults, each leaf an absl flag.

Nested fields are set with dotted flags (`--optimizer.lr=2e-5`), a preset with
`--config=configs/<preset>.py` (a file whose `get_config()` returns a dict or ConfigDict of
overrides). Precedence: command line > preset > defaults. `--help` lists every field with its doc.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

from absl import flags
from ml_collections import ConfigDict


def _leaves(tree: Mapping, prefix: str = ""):
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _leaves(value, name + ".")
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
    for name, value in _leaves(defaults):
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


def _load_preset(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config preset {path} does not exist.")
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
    known = dict(_leaves(defaults))
    if flag_values["config"].value:
        for name, value in _leaves(_load_preset(flag_values["config"].value)):
            if name not in known:
                raise ValueError(f"preset {flag_values['config'].value} sets unknown field {name!r}.")
            _set(tree, name, value)
    for name, default in known.items():
        flag = flag_values[name]
        if flag.present:
            value = flag.value
            _set(tree, name, None if (default is None and value == "") else value)
    return ConfigDict(tree)


# Flag docs of the trainers whose loss reads the LM head (SFT, DPO family, RL).
LM_HEAD_DOCS = {
    'head_chunk_size': "tokens per chunk of the fused LM head + log-softmax in the loss (0 = off: full logits); "
                       "saves the [tokens, vocab] logits' memory at large vocabularies, costs one more head matmul",
}

# Flag docs shared by every training entry point; an entry point's own DOCS override them.
COMMON_DOCS = {
    'output_dir': 'where checkpoints, metrics.jsonl, TensorBoard logs and the tokenizer go',
    'mesh_dim': 'device mesh dp,fsdp,mp (one may be -1) or dp:2,fsdp:-1,mp:1, over all devices of all hosts',
    'grad_accum_steps': 'micro-batches accumulated per optimizer step (batch_size must divide by it)',
    'dtype': 'compute dtype (float32, bfloat16)',
    'param_dtype': 'stored (master) weight dtype',
    'remat': 'rematerialization per layer: none, full, dots, dots_no_batch',
    'attention': 'attention implementation: xla, pallas (GPU kernel), splash (TPU kernel), cudnn or auto',
    'optimizer.schedule': 'cosine, linear or constant after warmup',
    'optimizer.warmup_steps': 'warmup steps (0 = use warmup_ratio)',
    'optimizer.warmup_ratio': 'warmup as a fraction of total_steps',
    'optimizer.min_lr_ratio': 'final learning rate as a fraction of lr',
    'optimizer.weight_decay': 'AdamW weight decay (matrices only)',
    'optimizer.b1': 'AdamW beta1',
    'optimizer.b2': 'AdamW beta2',
    'optimizer.eps': 'AdamW epsilon',
    'optimizer.clip_grad_norm': 'clip gradients to this global norm (0 = off)',
    'log_steps': 'log every N steps (progress bar, metrics.jsonl, TensorBoard)',
    'save_steps': 'checkpoint every N steps and at the end (0 = only at the end)',
    'keep_checkpoints': 'keep the newest N checkpoints (0 = all)',
    'resume': 'continue from the newest readable checkpoint in output_dir',
    'logger': 'tensorboard, wandb or none (metrics.jsonl is always written)',
    'jax_distributed.coordinator_address': 'host:port of process 0 (multi-host; auto-detected on TPU pods and SLURM)',
    'jax_distributed.num_processes': 'number of processes (0 = auto)',
    'jax_distributed.process_id': "this process's index (-1 = auto)",
}
