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
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from easytune import sharding
from easytune.models import nf4

LORA_METHODS = ("lora", "qlora", "dora")
PROMPT_METHODS = ("prompt", "ptuning", "prefix")
METHODS = LORA_METHODS + PROMPT_METHODS
ALL_LINEAR = "all-linear"


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    method: str                                  # one of METHODS
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    use_rslora: bool = False                     # scale alpha / sqrt(rank) instead of alpha / rank
    num_virtual_tokens: int = 20
    encoder_type: str = "mlp"                    # ptuning: mlp | lstm; prefix: mlp (projection) | none
    encoder_hidden_size: int = 0                 # 0: the token dim, as peft
    prompt_init: str = "sample_vocab"            # prompt tuning: sample_vocab | random | text
    modules: tuple[str, ...] = ()                # resolved LoRA targets, e.g. 'layers/attn/q'

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown --peft method {self.method!r}; use one of {', '.join(METHODS)} "
                             f"(or none for full fine-tuning).")
        if self.is_lora:
            if self.rank <= 0:
                raise ValueError(f"LoRA rank must be a positive integer, got {self.rank}; set --lora.rank.")
            if not 0.0 <= self.dropout < 1.0:
                raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}; set --lora.dropout.")
        else:
            if self.num_virtual_tokens <= 0:
                raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens}; "
                                 f"set --prompt.num_virtual_tokens.")
            encoders = {"ptuning": ("mlp", "lstm"), "prefix": ("mlp", "none"), "prompt": ("mlp", "none")}
            if self.method != "prompt" and self.encoder_type not in encoders[self.method]:
                raise ValueError(f"--prompt.encoder_type={self.encoder_type!r} is not available for {self.method}; "
                                 f"use one of {encoders[self.method]}.")

    @property
    def is_lora(self) -> bool:
        return self.method in LORA_METHODS

    @property
    def use_dora(self) -> bool:
        return self.method == "dora"

    @property
    def quantize_base(self) -> bool:
        return self.method == "qlora"

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        d = dict(d)
        for key in ("target_modules", "modules"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclasses.dataclass
class Adapter:
    """An adapter attached to a model: its config and its (trainable) parameters."""
    config: AdapterConfig
    params: dict


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


def make_config(model_config, method: str, **options) -> AdapterConfig:
    """An AdapterConfig with LoRA targets resolved against `model_config`."""
    config = AdapterConfig(method=method, **options)
    from easytune import models
    if not config.is_lora and models.is_encoder_decoder(model_config.model_type):
        raise ValueError(f"{method} adapters are implemented for decoder-only models; for "
                         f"{model_config.model_type} use lora, qlora or dora.")
    if config.is_lora:
        config = dataclasses.replace(config, modules=resolve_targets(model_config, config.target_modules))
    return config


# ----------------------------------------------------------------------------- sharding

def extend_rules(rules) -> tuple:
    """The family's sharding rules plus rules for adapter and NF4 leaves, derived from each
    kernel's rule, so adapters are sharded consistently with their base weights: `lora_a [in, r]`
    like the kernel's input dim, `lora_b [r, out]` and the DoRA magnitude like its output dim."""
    out = []
    for pattern, spec in rules:
        if pattern.endswith("kernel$"):
            stem, (spec_in, spec_out) = pattern[: -len("kernel$")], tuple(spec)
            out += [(stem + "lora_a$", P(spec_in, None)), (stem + "lora_b$", P(None, spec_out)),
                    (stem + "lora_magnitude$", P(spec_out)),
                    (stem + "nf4_(codes|absmax)$", spec), (stem + "nf4_absmax_scale$", P(spec_in, None))]
        out.append((pattern, spec))
    return tuple(out)


def rules_for(model_config) -> tuple:
    from easytune import models
    return extend_rules(models.family(model_config.model_type).SHARDING_RULES)


def shardings_for(tree, model_config, mesh):
    return sharding.tree_shardings(tree, rules_for(model_config), mesh)


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


def _kernel_shape(p) -> tuple[int, ...]:
    """`(..., in, out)` of a linear's kernel (for NF4: the padded input size)."""
    if "kernel" in p:
        return tuple(p["kernel"].shape)
    *lead, half, out = p["nf4_codes"].shape
    return (*lead, half * 2, out)


# ----------------------------------------------------------------------------- init

def _torch_linear(key, fan_in: int, fan_out: int) -> dict:
    """torch.nn.Linear's default init (kaiming-uniform weight, uniform bias), our [in, out] layout."""
    bound = 1.0 / math.sqrt(fan_in)
    k_w, k_b = jax.random.split(key)
    return {"kernel": jax.random.uniform(k_w, (fan_in, fan_out), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(k_b, (fan_out,), jnp.float32, -bound, bound)}


def init_params(config: AdapterConfig, model_config, base: dict, key: jax.Array, in_features=None,
                init_embeddings=None) -> dict:
    """Fresh adapter parameters (float32), initialised as peft does: LoRA A kaiming-uniform and B
    zero (so the adapted model starts equal to the base), DoRA magnitude = the base kernel's column
    norms, virtual tokens from `init_embeddings [n, hidden]` (prompt tuning) or N(0, 1).

    in_features: {module path: true input size} for NF4 bases (whose kernels are padded)."""
    c = model_config
    if config.is_lora:
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
    n, hidden = config.num_virtual_tokens, c.hidden_size
    k_embed, k_enc = jax.random.split(key)
    if config.method == "prompt":
        if init_embeddings is not None:
            embedding = jnp.asarray(init_embeddings, jnp.float32)
        elif config.prompt_init == "sample_vocab":
            ids = jax.random.randint(k_embed, (n,), 0, c.vocab_size)
            embedding = base["embed"]["embedding"][ids].astype(jnp.float32)
        else:
            embedding = jax.random.normal(k_embed, (n, hidden), jnp.float32)
        return {"prompt": {"embedding": embedding}}
    if config.method == "ptuning":
        width = config.encoder_hidden_size or hidden
        keys = jax.random.split(k_enc, 8)
        encoder = {"embedding": jax.random.normal(k_embed, (n, hidden), jnp.float32)}
        if config.encoder_type == "mlp":
            encoder["mlp"] = {"0": _torch_linear(keys[0], hidden, width), "1": _torch_linear(keys[1], width, width),
                              "2": _torch_linear(keys[2], width, hidden)}
        else:
            encoder["lstm"] = _init_lstm(keys[3], hidden, width, num_layers=2)
            encoder["mlp"] = {"0": _torch_linear(keys[4], 2 * width, 2 * width),
                              "1": _torch_linear(keys[5], 2 * width, hidden)}
        return {"prompt_encoder": encoder}
    # prefix: per virtual token, every layer's key and value (peft's layout)
    token_dim = c.num_kv_heads * c.head_dim
    total = c.num_layers * 2 * token_dim
    if config.encoder_type == "mlp":
        width = config.encoder_hidden_size or token_dim
        keys = jax.random.split(k_enc, 2)
        return {"prefix_encoder": {"embedding": jax.random.normal(k_embed, (n, token_dim), jnp.float32),
                                   "transform": {"0": _torch_linear(keys[0], token_dim, width),
                                                 "1": _torch_linear(keys[1], width, total)}}}
    return {"prefix_encoder": {"embedding": jax.random.normal(k_embed, (n, total), jnp.float32)}}


def _init_lstm(key, input_size: int, hidden: int, num_layers: int) -> dict:
    """torch.nn.LSTM(bidirectional=True) parameters: per layer and direction w_ih [in, 4h],
    w_hh [h, 4h], b_ih, b_hh [4h] (gate order i, f, g, o), uniform(+-1/sqrt(hidden))."""
    bound = 1.0 / math.sqrt(hidden)
    out = {}
    for layer in range(num_layers):
        size = input_size if layer == 0 else 2 * hidden
        for direction in ("forward", "backward"):
            key, *ks = jax.random.split(key, 5)
            out[f"{layer}_{direction}"] = {
                "w_ih": jax.random.uniform(ks[0], (size, 4 * hidden), jnp.float32, -bound, bound),
                "w_hh": jax.random.uniform(ks[1], (hidden, 4 * hidden), jnp.float32, -bound, bound),
                "b_ih": jax.random.uniform(ks[2], (4 * hidden,), jnp.float32, -bound, bound),
                "b_hh": jax.random.uniform(ks[3], (4 * hidden,), jnp.float32, -bound, bound)}
    return out


def _lstm_direction(p, x, reverse: bool):
    """One direction of an LSTM over `x [n, in]` -> `[n, hidden]` (torch's equations)."""
    hidden = p["w_hh"].shape[0]

    def cell(carry, x_t):
        h, c = carry
        gates = x_t @ p["w_ih"] + p["b_ih"] + h @ p["w_hh"] + p["b_hh"]
        i, f, g, o = jnp.split(gates, 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((hidden,), x.dtype)
    _, hs = jax.lax.scan(cell, (zeros, zeros), x, reverse=reverse)
    return hs


def _linear(p, x):
    return x @ p["kernel"] + p["bias"]


def virtual_embeddings(config: AdapterConfig, adapter_params: dict) -> jax.Array:
    """Prompt tuning / P-tuning: the `[n, hidden]` embeddings prepended to the input (float32);
    prefix tuning: the flattened prefix `[n, layers * 2 * kv_dim]`. What peft saves as
    `prompt_embeddings`."""
    if config.method == "prompt":
        return adapter_params["prompt"]["embedding"]
    if config.method == "ptuning":
        enc = adapter_params["prompt_encoder"]
        x = enc["embedding"]
        if "lstm" in enc:
            layer = 0
            while f"{layer}_forward" in enc["lstm"]:
                x = jnp.concatenate([_lstm_direction(enc["lstm"][f"{layer}_forward"], x, False),
                                     _lstm_direction(enc["lstm"][f"{layer}_backward"], x, True)], axis=-1)
                layer += 1
            return _linear(enc["mlp"]["1"], jax.nn.relu(_linear(enc["mlp"]["0"], x)))
        x = jax.nn.relu(_linear(enc["mlp"]["0"], x))
        x = jax.nn.relu(_linear(enc["mlp"]["1"], x))
        return _linear(enc["mlp"]["2"], x)
    enc = adapter_params["prefix_encoder"]
    if "transform" in enc:
        return _linear(enc["transform"]["1"], jnp.tanh(_linear(enc["transform"]["0"], enc["embedding"])))
    return enc["embedding"]


def prefix_keys_values(model_config, flat: jax.Array) -> dict:
    """`[n, layers * 2 * kv_dim]` (peft's layout: layer-major, key then value, heads, head_dim) ->
    `{k, v}: [layers, n, kv_heads, head_dim]`."""
    c = model_config
    n = flat.shape[0]
    kv = flat.reshape(n, c.num_layers, 2, c.num_kv_heads, c.head_dim).transpose(2, 1, 0, 3, 4)
    return {"k": kv[0], "v": kv[1]}


# ----------------------------------------------------------------------------- apply / merge

def apply(base: dict, adapter_params: dict, config: AdapterConfig, model_config, rng=None) -> dict:
    """The parameter tree the model functions take: `base` with the adapter attached. With `rng`
    (training) LoRA dropout is active; without it (eval, generation) it is off."""
    if config.is_lora:
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
    embeddings = virtual_embeddings(config, adapter_params)
    if config.method == "prefix":
        return {**base, "prefix": prefix_keys_values(model_config, embeddings)}
    return {**base, "virtual_tokens": embeddings}


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
    full = apply(base, adapter.params, adapter.config, model_config)
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


def _replace(tree: dict, path, node) -> dict:
    if len(path) == 1:
        return {**tree, path[0]: node}
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], node)}


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
