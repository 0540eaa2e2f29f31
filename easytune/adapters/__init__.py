"""Parameter-efficient fine-tuning as tree transformations: LoRA, QLoRA (NF4 base), DoRA, prompt
tuning, P-tuning and prefix tuning, defined as in `peft` so adapters move both ways.

An adapter is a small pytree of trainable arrays plus a frozen `AdapterConfig`. `apply(base,
adapter_params, config)` returns the parameter tree the model functions take:
- LoRA/DoRA: each targeted linear's dict gains `lora_a [.., in, r]`, `lora_b [.., r, out]`,
  `lora_scale` (and `lora_magnitude [.., out]` for DoRA); `layers.linear` understands them.
- QLoRA: `quantize_base` first replaces every transformer-block kernel by NF4 leaves.
- prompt / P-tuning: `virtual_tokens [n, hidden]`, prepended to the input embeddings by the model.
- prefix: `prefix = {k, v}: [layers, n, kv_heads, head_dim]`, prepended to every layer's keys and
  values by the model.
The base is never copied or changed; the training loop differentiates only the adapter tree.

Modules: `config` (AdapterConfig, Adapter, the methods), `lora` (LoRA, DoRA, QLoRA), `prompt`
(prompt tuning, P-tuning, prefix tuning), `sharding_rules` (adapter leaves sharded like their base
kernel), `peft_format` (peft adapter directories). This file dispatches by method and re-exports
their public names, so `adapters.X` is the one way in.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from easytune.adapters import lora, prompt
from easytune.adapters.config import ALL_LINEAR, LORA_METHODS, METHODS, PROMPT_METHODS, Adapter, AdapterConfig
from easytune.adapters.lora import (LinearModule, _get, _kernel_shape, dequantize_all, in_features, linear_modules,
                                    merge, merged_kernel, module_names, quantize_base, resolve_targets)
from easytune.adapters.prompt import prefix_keys_values, virtual_embeddings
from easytune.adapters.sharding_rules import rules_for, shardings_for, with_adapter_rules

__all__ = [
    "ALL_LINEAR", "LORA_METHODS", "METHODS", "PROMPT_METHODS", "Adapter", "AdapterConfig",
    "LinearModule", "dequantize_all", "in_features", "linear_modules", "merge", "merged_kernel", "module_names",
    "quantize_base", "resolve_targets", "prefix_keys_values", "virtual_embeddings",
    "rules_for", "shardings_for", "with_adapter_rules",
    "make_config", "init_params", "apply", "count", "nbytes", "summary",
    "_get", "_kernel_shape",  # tree helpers that peft_format, tests and scripts reach for
]


# ----------------------------------------------------------------------------- by method

def make_config(model_config, method: str, **options) -> AdapterConfig:
    """An AdapterConfig checked against `model_config`, with LoRA targets resolved."""
    config = AdapterConfig(method=method, **options)
    if config.is_lora:
        return dataclasses.replace(config, modules=resolve_targets(model_config, config.target_modules))
    prompt.check_supported(config, model_config)
    return config


def init_params(config: AdapterConfig, model_config, base: dict, key: jax.Array, in_features=None,
                init_embeddings=None) -> dict:
    """Fresh adapter parameters (float32), initialised as peft does: LoRA A kaiming-uniform and B
    zero (so the adapted model starts equal to the base), DoRA magnitude = the base kernel's column
    norms, virtual tokens from `init_embeddings [n, hidden]` (prompt tuning) or N(0, 1).

    in_features: {module path: true input size} for NF4 bases (whose kernels are padded)."""
    if config.is_lora:
        return lora.init_params(config, base, key, in_features)
    return prompt.init_params(config, model_config, base, key, init_embeddings)


def apply(base: dict, adapter_params: dict, config: AdapterConfig, model_config, rng=None) -> dict:
    """The parameter tree the model functions take: `base` with the adapter attached. With `rng`
    (training) LoRA dropout is active; without it (eval, generation) it is off."""
    if config.is_lora:
        return lora.apply(base, adapter_params, config, rng)
    return prompt.apply(base, adapter_params, config, model_config)


# ----------------------------------------------------------------------------- accounting

def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def summary(config: AdapterConfig, adapter_params: dict, model_config) -> dict[str, Any]:
    from easytune import models
    trainable = count(adapter_params)
    frozen = count(models.family(model_config.model_type).param_shapes(model_config))
    return {"method": config.method, "trainable_params": trainable, "base_params": frozen,
            "trainable_fraction": trainable / max(frozen, 1)}


# ----------------------------------------------------------------------------- entry-point flags

FLAG_DEFAULTS = {
    "peft": "none",
    "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": ALL_LINEAR, "use_rslora": False},
    "prompt": {"num_virtual_tokens": 20, "encoder_type": "mlp", "encoder_hidden_size": 0, "init_text": ""},
    "peft_adapter": None,
    "export_peft": None,
}

FLAG_DOCS = {
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


def attach_from_flags(model, cfg, seed: int = 0):
    """Attach the adapter the entry point's flags ask for (`--peft`, `--lora.*`, `--prompt.*`,
    `--peft_adapter`); returns it, or None for full fine-tuning."""
    if cfg.peft_adapter:
        if cfg.peft != "none":
            AdapterConfig(method=cfg.peft)  # an unknown method gets its clear error
        adapter = model.load_adapter(cfg.peft_adapter)
        family = {"qlora": "lora", "dora": "lora"}
        if cfg.peft != "none" and family.get(cfg.peft, cfg.peft) != family.get(adapter.config.method,
                                                                                  adapter.config.method):
            raise ValueError(f"--peft={cfg.peft} but --peft_adapter {cfg.peft_adapter} holds a "
                             f"{adapter.config.method} adapter; drop --peft or make them agree.")
        if cfg.peft == "qlora":  # continue a LoRA adapter on an NF4 base
            model.params = quantize_base(model.params, model.config, model.mesh)
            adapter.config = dataclasses.replace(adapter.config, method="qlora")
        return adapter
    if cfg.peft == "none":
        return None
    if cfg.peft in LORA_METHODS:
        targets = tuple(t for t in str(cfg.lora.target_modules).split(",") if t.strip())
        if len(targets) == 1 and targets[0].startswith("re:"):
            targets = (str(cfg.lora.target_modules),)  # a regex may hold commas
        return model.add_adapter(cfg.peft, seed=seed, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                                 dropout=cfg.lora.dropout, target_modules=targets, use_rslora=cfg.lora.use_rslora)
    init_embeddings = None
    if cfg.peft == "prompt" and cfg.prompt.init_text:
        ids = model.tokenizer(cfg.prompt.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("--prompt.init_text tokenizes to nothing; give some text or leave it empty.")
        n = cfg.prompt.num_virtual_tokens
        ids = (ids * (n // len(ids) + 1))[:n]  # tiled to n tokens, as peft's TEXT init
        init_embeddings = np.asarray(jax.device_get(model.params["embed"]["embedding"]))[ids].astype(np.float32)
    return model.add_adapter(cfg.peft, seed=seed, num_virtual_tokens=cfg.prompt.num_virtual_tokens,
                             encoder_type=cfg.prompt.encoder_type, encoder_hidden_size=cfg.prompt.encoder_hidden_size,
                             prompt_init="text" if init_embeddings is not None else "sample_vocab",
                             init_embeddings=init_embeddings)
