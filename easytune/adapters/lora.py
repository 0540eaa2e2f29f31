"""LoRA, DoRA and QLoRA, as in `peft`: which linears an adapter targets, its fresh parameters, how
they attach to the base tree, how they fold back into plain kernels, and the NF4 base of QLoRA.

A targeted linear's dict gains `lora_a [.., in, r]`, `lora_b [.., r, out]`, `lora_scale` (and
`lora_magnitude [.., out]` for DoRA); `layers.linear` understands them. Stacked modules carry a
leading `[layers]` axis on every leaf.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from easytune import sharding
from easytune.adapters.config import ALL_LINEAR, Adapter, AdapterConfig
from easytune.adapters.sharding_rules import rules_for
from easytune.models import nf4

# ----------------------------------------------------------------------------- targets

@dataclasses.dataclass(frozen=True)
class LinearModule:
    path: tuple[str, ...]     # our module path, e.g. ('layers', 'attn', 'q')
    hf_module: str            # e.g. 'model.layers.{layer}.self_attn.q_proj'
    stacked: bool


def linear_modules(model_config) -> list[LinearModule]:
    """Every dense projection of the model with its HF module name (from the HF weight map)."""
    from easytune import hf
    out = []
    for entry in hf.weight_map(model_config):
        if entry.transpose and entry.path[-1] == "kernel":
            out.append(LinearModule(entry.path[:-1], entry.hf_name[: -len(".weight")], entry.stacked))
    return out


def module_names(model_config, module: LinearModule) -> list[str]:
    """The HF module name of every layer of `module` (one name for an unstacked one)."""
    if module.stacked:
        from easytune import models
        shapes = models.family(model_config.model_type).param_shapes(model_config)
        num_layers = _get(shapes, module.path)["kernel"].shape[0]  # T5's decoder depth may differ
        return [module.hf_module.format(layer=i) for i in range(num_layers)]
    return [module.hf_module]


def resolve_targets(model_config, target_modules) -> tuple[str, ...]:
    """Module paths (`'layers/attn/q'`) selected by `target_modules`, with peft's semantics:
    `all-linear` (every linear but the output head); names, each matching a module whose HF name
    is it or ends with `.<name>` (`q_proj`), or whose easytune path ends with it (`attn/q`); or one
    `re:<regex>` matched in full against HF module names (`model.layers.3.self_attn.q_proj`).
    A pattern that matches nothing is an error, so a typo never trains the wrong thing."""
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    target_modules = tuple(t.strip() for t in target_modules if t.strip())
    modules = linear_modules(model_config)
    available = ", ".join(sorted({m.hf_module.rsplit(".", 1)[-1] for m in modules}))
    if not target_modules:
        raise ValueError(f"no LoRA target modules given; set --lora.target_modules (e.g. all-linear or {available}).")
    chosen: dict[tuple[str, ...], None] = {}
    for pattern in target_modules:
        matched = []
        for module in modules:
            names = module_names(model_config, module)
            ours = "/".join(module.path)
            if pattern == ALL_LINEAR:
                hit = [module.path[0] != "lm_head"] * len(names)
            elif pattern.startswith("re:"):
                hit = [re.fullmatch(pattern[3:], n) is not None for n in names]
            else:
                hit = [n == pattern or n.endswith("." + pattern) or ours == pattern or ours.endswith("/" + pattern)
                       for n in names]
            if any(hit) and not all(hit):
                raise ValueError(f"target pattern {pattern!r} selects only some layers of {module.hf_module}; easytune "
                                 f"adapts a module in every layer or in none (peft's layers_to_transform is not "
                                 f"supported).")
            if all(hit):
                matched.append(module.path)
        if not matched:
            raise ValueError(f"LoRA target pattern {pattern!r} matches no linear module of this "
                             f"{model_config.model_type} model; its modules are: {available} (or all-linear).")
        chosen.update(dict.fromkeys(matched))
    return tuple("/".join(path) for path in chosen)


# ----------------------------------------------------------------------------- tree helpers

def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _with(tree: dict, path, update: dict) -> dict:
    """A copy of `tree` (dicts copied along `path` only) whose node at `path` gains `update`."""
    if not path:
        return {**tree, **update}
    return {**tree, path[0]: _with(tree[path[0]], path[1:], update)}


def _replace(tree: dict, path, node) -> dict:
    """A copy of `tree` (dicts copied along `path` only) whose node at `path` is `node`."""
    if len(path) == 1:
        return {**tree, path[0]: node}
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], node)}


def _kernel_shape(p) -> tuple[int, ...]:
    """`(..., in, out)` of a linear's kernel (for NF4: the padded input size)."""
    if "kernel" in p:
        return tuple(p["kernel"].shape)
    *lead, half, out = p["nf4_codes"].shape
    return (*lead, half * 2, out)


# ----------------------------------------------------------------------------- init

def init_params(config: AdapterConfig, base: dict, key: jax.Array, in_features=None) -> dict:
    """Fresh LoRA/DoRA parameters (float32), initialised as peft does: A kaiming-uniform and B zero
    (so the adapted model starts equal to the base), DoRA magnitude = the base kernel's column norms.

    in_features: {module path: true input size} for NF4 bases (whose kernels are padded)."""
    out: dict = {}
    for index, module in enumerate(config.modules):
        path = tuple(module.split("/"))
        p = _get(base, path)
        *lead, fan_in, fan_out = _kernel_shape(p)
        if in_features and module in in_features:
            fan_in = in_features[module]
        bound = 1.0 / math.sqrt(fan_in)
        node = {"lora_a": jax.random.uniform(jax.random.fold_in(key, index), (*lead, fan_in, config.rank),
                                             jnp.float32, -bound, bound),
                "lora_b": jnp.zeros((*lead, config.rank, fan_out), jnp.float32)}
        if config.use_dora:
            kernel = p["kernel"] if "kernel" in p else nf4.dequantize(p, fan_in, jnp.float32)
            node["lora_magnitude"] = jnp.sqrt(jnp.sum(jnp.square(kernel.astype(jnp.float32)), axis=-2))
        parent = out
        for name in path[:-1]:
            parent = parent.setdefault(name, {})
        parent[path[-1]] = node
    return out


# ----------------------------------------------------------------------------- apply / merge

def apply(base: dict, adapter_params: dict, config: AdapterConfig, rng=None) -> dict:
    """`base` with every targeted linear's LoRA/DoRA leaves attached (and `lora_scale`). With `rng`
    (training) LoRA dropout is active: each linear gains its dropout key and rate."""
    out = base
    for index, module in enumerate(config.modules):
        path = tuple(module.split("/"))
        node = dict(_get(adapter_params, path))
        lead = node["lora_a"].shape[:-2]
        node["lora_scale"] = jnp.full(lead, config.scale, jnp.float32)
        if rng is not None and config.dropout > 0:
            count = int(np.prod(lead)) if lead else 1
            keys = jax.random.split(jax.random.fold_in(rng, index), count)
            node["lora_dropout_key"] = keys.reshape(lead) if lead else keys[0]
            node["lora_dropout_rate"] = jnp.full(lead, config.dropout, jnp.float32)
        out = _with(out, path, node)
    return out


def merged_kernel(p: dict, in_features: int, dtype) -> jax.Array:
    """One linear's effective kernel `[..., in, out]` with its LoRA/DoRA delta folded in."""
    kernel = (p["kernel"] if "kernel" in p else nf4.dequantize(p, in_features, jnp.float32)).astype(jnp.float32)
    if "lora_a" in p:
        scale = p["lora_scale"].astype(jnp.float32)[..., None, None]
        combined = kernel + scale * jnp.matmul(p["lora_a"].astype(jnp.float32), p["lora_b"].astype(jnp.float32))
        if "lora_magnitude" in p:
            norm = jnp.sqrt(jnp.sum(jnp.square(combined), axis=-2, keepdims=True))
            combined = combined * (p["lora_magnitude"].astype(jnp.float32)[..., None, :] / norm)
        kernel = combined
    return kernel.astype(dtype)


def merge(base: dict, adapter: Adapter, model_config) -> dict:
    """Plain parameters (no adapter keys, no NF4) equal to base + adapter, in the model's
    param_dtype: what an HF export writes. Prompt-type adapters cannot be merged."""
    if not adapter.config.is_lora:
        raise ValueError(f"a {adapter.config.method} adapter cannot be merged into the base weights (it adds "
                         f"virtual tokens); export it with --export_peft and load it with peft.")
    full = apply(base, adapter.params, adapter.config)
    return dequantize_all(full, model_config)


def dequantize_all(params: dict, model_config) -> dict:
    """Replace every NF4 or adapted linear by a plain kernel in the model's param_dtype."""
    dtype = model_config.weight_dtype
    fold = jax.jit(merged_kernel, static_argnums=(1, 2))
    out = params
    for module in linear_modules(model_config):
        p = _get(params, module.path)
        if "kernel" in p and "lora_a" not in p:
            continue
        keep = {k: v for k, v in p.items() if k == "bias"}
        kernel = fold(p, in_features(model_config, module.path), dtype)
        out = _replace(out, module.path, {**keep, "kernel": kernel})
    return out


def in_features(model_config, path) -> int:
    """True input size of the linear at `path`, from the family's parameter shapes."""
    from easytune import models
    shapes = models.family(model_config.model_type).param_shapes(model_config)
    return _get(shapes, tuple(path))["kernel"].shape[-2]


# ----------------------------------------------------------------------------- QLoRA base

def quantize_base(params: dict, model_config, mesh) -> dict:
    """Every transformer-block kernel as NF4 (embeddings and the output head stay as they are,
    as bitsandbytes' 4-bit loading does). Each original kernel is freed once quantized, so the peak
    is the unquantized model plus one kernel's codes."""
    rules = rules_for(model_config)
    out = params
    for module in linear_modules(model_config):
        if not module.stacked:
            continue
        p = _get(out, module.path)
        kernel = p["kernel"]
        shapes = jax.eval_shape(nf4.quantize, kernel)
        name = "/".join(module.path)
        shardings = {k: jax.sharding.NamedSharding(mesh, sharding.spec_for(f"{name}/{k}", v.shape, rules, mesh))
                     for k, v in shapes.items()}
        quantized = jax.jit(nf4.quantize, out_shardings=shardings)(kernel)
        kernel.delete()
        out = _replace(out, module.path, {**{k: v for k, v in p.items() if k != "kernel"}, **quantized})
    return out

