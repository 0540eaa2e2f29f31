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
