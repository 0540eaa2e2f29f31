"""Hugging Face <-> easytune: config mapping, weight maps, streaming load and export.

Each family (LLaMA/Mistral, T5) has its section: config_from_hf, config_to_hf and weight_map,
registered in HF_MAPPINGS by model_type; the public functions of the same names dispatch on it.

Loading builds each parameter with `jax.make_array_from_callback`: every device's shard is read
straight from the memory-mapped safetensors, so no process ever holds a full copy of a sharded
parameter. Export streams one (per-layer) tensor at a time.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from easytune import models, sharding
from easytune.dtypes import dtype_name, parse_dtype
from easytune.models.llama import LlamaConfig
from easytune.models.t5 import T5Config
from easytune.safetensors_io import SafetensorsCheckpoint, write_safetensors

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
COMPUTE_FIELDS = ("dtype", "param_dtype", "remat", "attention", "head_chunk_size")


# ----------------------------------------------------------------------------- config and weight entries

def read_json(path: str) -> dict:
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}).") from None


def _set_torch_dtype(hf: dict, torch_dtype: str | None) -> dict:
    if torch_dtype is not None:  # transformers 5 reads "dtype", 4 reads "torch_dtype"
        for key in [k for k in ("dtype", "torch_dtype") if k in hf] or ["torch_dtype"]:
            hf[key] = torch_dtype
    return hf


def checkpoint_dtype(hf: dict) -> str:
    """The dtype the HF checkpoint declares (float32 if it declares none)."""
    name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return dtype_name(name) if name in ("float32", "bfloat16", "float16") else "float32"


@dataclasses.dataclass(frozen=True)
class WeightEntry:
    path: tuple[str, ...]   # our parameter path
    hf_name: str            # HF tensor name; '{layer}' filled in for stacked parameters
    stacked: bool           # has a leading [num_layers] axis
    transpose: bool         # HF stores [out, in]; we store [in, out]


# ----------------------------------------------------------------------------- LLaMA / Mistral

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# models with a score head (num_labels > 0), e.g. reward models
CLASSIFIER_ARCHITECTURES = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification"}
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """`(rope_theta, rope_scaling)` from either transformers layout: v4 `rope_theta` +
    `rope_scaling`, or v5 `rope_parameters`. Plain RoPE gives `rope_scaling=None`."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = params["rope_theta"]
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return float(theta), None
    return float(theta), scaling


def llama_config_from_hf(hf: dict, directory: str | None = None, **compute: Any) -> LlamaConfig:
    """LlamaConfig from an HF `config.json` dict; `compute` sets dtype, param_dtype, remat, attention."""
    model_type = hf.get("model_type")
    models.family(model_type)  # unknown model_type -> clear error
    missing = [key for key in REQUIRED_FIELDS if key not in hf]
    if missing:
        raise ValueError(f"config.json lacks {missing[0]!r}" + (f" (and {missing[1:]})" if missing[1:] else "")
                         + f"; a {model_type} config needs {list(REQUIRED_FIELDS)}.")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported for {model_type}; only 'silu' is.")
    num_heads = hf["num_attention_heads"]
    theta, scaling = rope_from_hf(hf)
    sliding_window = hf.get("sliding_window") if model_type == "mistral" else None
    if hf.get("use_sliding_window") is False:
        sliding_window = None
    compute = {k: v for k, v in compute.items() if v is not None}
    num_labels = 0
    if any(str(a).endswith("ForSequenceClassification") for a in hf.get("architectures") or []):
        num_labels = int(hf.get("num_labels") or len(hf.get("id2label") or {}) or 2)  # transformers' default: 2
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=None if scaling is None else tuple(sorted(scaling.items())),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=sliding_window,
        model_type=model_type,
        num_labels=num_labels,
        **compute,
    )


def llama_config_to_hf(config: LlamaConfig, base: dict | None = None, torch_dtype: str | None = None) -> dict:
    """An HF `config.json` dict for `config`. Fields of `base` (the imported config) are kept, so
    an import/export round trip returns the same config; architecture fields are set from ours."""
    c = config
    hf = dict(base or {})
    fields = {
        "architectures": [(CLASSIFIER_ARCHITECTURES if c.num_labels else ARCHITECTURES)[c.model_type]],
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "mlp_bias": c.mlp_bias,
    }
    if c.model_type == "mistral":
        fields["sliding_window"] = c.sliding_window
    if rope_from_hf(hf) != (c.rope_theta, c.rope_scaling_dict):  # else keep the rope keys as written
        hf.pop("rope_parameters", None)
        fields["rope_theta"] = c.rope_theta
        fields["rope_scaling"] = c.rope_scaling_dict
    # Values transformers assumes when a key is absent: leave them absent, so a round trip
    # returns the imported config.json unchanged.
    implied = {"head_dim": c.hidden_size // c.num_heads, "attention_bias": False, "mlp_bias": False,
               "rope_scaling": None, "tie_word_embeddings": False}
    for key, value in fields.items():
        if key in hf or key not in implied or implied[key] != value:
            hf[key] = value
    if c.num_labels:  # transformers derives num_labels from id2label
        hf.pop("num_labels", None)
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(c.num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(c.num_labels)}
    return _set_torch_dtype(hf, torch_dtype)


def llama_weight_map(config: LlamaConfig) -> list[WeightEntry]:
    """Every parameter of `config` with the HF tensor(s) it comes from."""
    entries = [WeightEntry(("embed", "embedding"), "model.embed_tokens.weight", False, False)]
    prefix = "model.layers.{layer}."
    entries.append(WeightEntry(("layers", "attn_norm", "scale"), prefix + "input_layernorm.weight", True, False))
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
        entries.append(WeightEntry(("layers", "attn", ours, "kernel"), prefix + f"self_attn.{theirs}.weight", True, True))
        if config.attention_bias:
            entries.append(WeightEntry(("layers", "attn", ours, "bias"), prefix + f"self_attn.{theirs}.bias", True, False))
    entries.append(WeightEntry(("layers", "mlp_norm", "scale"), prefix + "post_attention_layernorm.weight", True, False))
    for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        entries.append(WeightEntry(("layers", "mlp", ours, "kernel"), prefix + f"mlp.{theirs}.weight", True, True))
        if config.mlp_bias:
            entries.append(WeightEntry(("layers", "mlp", ours, "bias"), prefix + f"mlp.{theirs}.bias", True, False))
    entries.append(WeightEntry(("final_norm", "scale"), "model.norm.weight", False, False))
    if config.num_labels:  # *ForSequenceClassification: score [num_labels, hidden], no LM head
        entries.append(WeightEntry(("score", "kernel"), "score.weight", False, True))
    elif not config.tie_word_embeddings:
        entries.append(WeightEntry(("lm_head", "kernel"), "lm_head.weight", False, True))
    return entries


# ----------------------------------------------------------------------------- T5

T5_ARCHITECTURE = "T5ForConditionalGeneration"
T5_REQUIRED_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")


def t5_config_from_hf(hf: dict, directory: str | None = None, **compute: Any) -> T5Config:
    """T5Config from an HF `config.json` dict, read as transformers reads it.

    The lm_head is untied when the config says `tie_word_embeddings: false` or when the checkpoint
    in `directory` holds an `lm_head.weight` (transformers 5 writes `tie_word_embeddings: true`
    for every T5 and unties by content). The v1.0 rescale follows `scale_decoder_outputs`, or
    else `tie_word_embeddings` (absent = true).
    """
    missing = [key for key in T5_REQUIRED_FIELDS if key not in hf]
    if missing:
        raise ValueError(f"config.json lacks {missing[0]!r}" + (f" (and {missing[1:]})" if missing[1:] else "")
                         + f"; a t5 config needs {list(T5_REQUIRED_FIELDS)}.")
    if hf.get("is_encoder_decoder") is False or hf.get("is_decoder") is True:
        raise ValueError("this T5 config is not an encoder-decoder (an encoder-only or decoder-only T5); "
                         "easytune supports T5ForConditionalGeneration.")
    tie = hf.get("tie_word_embeddings", True) is not False
    if tie and directory is not None and "lm_head.weight" in SafetensorsCheckpoint(directory):
        tie = False
    scale = hf.get("scale_decoder_outputs")
    if scale is None:
        scale = hf.get("tie_word_embeddings", True) is not False
    start = hf.get("decoder_start_token_id")
    compute = {k: v for k, v in compute.items() if v is not None}
    return T5Config(
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        d_kv=hf["d_kv"],
        d_ff=hf["d_ff"],
        num_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        num_heads=hf["num_heads"],
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=hf.get("feed_forward_proj", "relu"),
        dense_act_fn=hf.get("dense_act_fn"),
        tie_word_embeddings=tie,
        scale_decoder_outputs=bool(scale),
        decoder_start_token_id=int(start if start is not None else hf.get("pad_token_id") or 0),
        **compute,
    )


def t5_config_to_hf(config: T5Config, base: dict | None = None, torch_dtype: str | None = None) -> dict:
    """An HF `config.json` dict for `config`, keeping the fields of `base` (the imported config) so
    that a round trip returns it unchanged."""
    c = config
    hf = dict(base or {})
    fields = {
        "architectures": [T5_ARCHITECTURE],
        "model_type": "t5",
        "is_encoder_decoder": True,
        "vocab_size": c.vocab_size,
        "d_model": c.d_model,
        "d_kv": c.d_kv,
        "d_ff": c.d_ff,
        "num_layers": c.num_layers,
        "num_decoder_layers": c.num_decoder_layers,
        "num_heads": c.num_heads,
        "relative_attention_num_buckets": c.relative_attention_num_buckets,
        "relative_attention_max_distance": c.relative_attention_max_distance,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "feed_forward_proj": c.feed_forward_proj,
        "decoder_start_token_id": c.decoder_start_token_id,
    }
    if c.dense_act_fn is not None:
        fields["dense_act_fn"] = c.dense_act_fn
    # Values transformers assumes when a key is absent: leave them absent.
    implied = {"num_decoder_layers": c.num_layers, "relative_attention_num_buckets": 32,
               "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "relu",
               "decoder_start_token_id": hf.get("pad_token_id", 0), "is_encoder_decoder": True}
    for key, value in fields.items():
        if key in hf or key not in implied or implied[key] != value:
            hf[key] = value
    # An exported lm_head.weight unties by itself (see t5_config_from_hf); only a new config needs the flag.
    if "tie_word_embeddings" not in hf and not c.tie_word_embeddings:
        hf["tie_word_embeddings"] = False
    if "scale_decoder_outputs" in hf or c.scale_decoder_outputs != (hf.get("tie_word_embeddings", True) is not False):
        hf["scale_decoder_outputs"] = c.scale_decoder_outputs
    return _set_torch_dtype(hf, torch_dtype)


def t5_weight_map(config: T5Config) -> list[WeightEntry]:
    """Every parameter of a T5 config with the HF tensor it comes from. The relative attention
    bias lives in block 0 of each stack (later blocks reuse it)."""
    entries = [WeightEntry(("embed", "embedding"), "shared.weight", False, False)]
    for stack in ("encoder", "decoder"):
        prefix = f"{stack}.block.{{layer}}.layer."
        entries.append(WeightEntry((stack, "relative_attention_bias", "embedding"),
                                   f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False, False))
        sublayers = [("attn", "0", "SelfAttention")]
        if stack == "decoder":
            sublayers.append(("cross_attn", "1", "EncDecAttention"))
        for ours, index, theirs in sublayers:
            entries.append(WeightEntry((stack, "layers", f"{ours}_norm", "scale"), prefix + f"{index}.layer_norm.weight",
                                       True, False))
            for proj in ("q", "k", "v", "o"):
                entries.append(WeightEntry((stack, "layers", ours, proj, "kernel"),
                                           prefix + f"{index}.{theirs}.{proj}.weight", True, True))
        ff = "2" if stack == "decoder" else "1"
        entries.append(WeightEntry((stack, "layers", "mlp_norm", "scale"), prefix + f"{ff}.layer_norm.weight", True, False))
        mlp = (("gate", "wi_0"), ("up", "wi_1"), ("down", "wo")) if config.is_gated else (("up", "wi"), ("down", "wo"))
        for ours, theirs in mlp:
            entries.append(WeightEntry((stack, "layers", "mlp", ours, "kernel"),
                                       prefix + f"{ff}.DenseReluDense.{theirs}.weight", True, True))
        entries.append(WeightEntry((stack, "final_norm", "scale"), f"{stack}.final_layer_norm.weight", False, False))
    if not config.tie_word_embeddings:
        entries.append(WeightEntry(("lm_head", "kernel"), "lm_head.weight", False, True))
    return entries


# ----------------------------------------------------------------------------- per family

@dataclasses.dataclass(frozen=True)
class HFMapping:
    """How one family's configs and weights map to Hugging Face's."""

    config_from_hf: Callable[..., Any]   # (hf dict, directory=None, **compute) -> Config
    config_to_hf: Callable[..., dict]    # (config, base=None, torch_dtype=None) -> hf dict
    weight_map: Callable[[Any], list[WeightEntry]]


HF_MAPPINGS = {
    "llama": HFMapping(llama_config_from_hf, llama_config_to_hf, llama_weight_map),
    "mistral": HFMapping(llama_config_from_hf, llama_config_to_hf, llama_weight_map),
    "t5": HFMapping(t5_config_from_hf, t5_config_to_hf, t5_weight_map),
}


def config_from_hf(hf: dict, directory: str | None = None, **compute: Any):
    """The family config from an HF `config.json` dict; `compute` sets dtype, param_dtype, remat,
    attention. `directory` (the checkpoint) settles what the config leaves open (T5's lm_head)."""
    model_type = hf.get("model_type")
    models.family(model_type)  # unknown model_type -> clear error
    return HF_MAPPINGS[model_type].config_from_hf(hf, directory, **compute)


def config_to_hf(config, base: dict | None = None, torch_dtype: str | None = None) -> dict:
    """An HF `config.json` dict for `config`, keeping the fields of `base`."""
    return HF_MAPPINGS[config.model_type].config_to_hf(config, base, torch_dtype)


def weight_map(config) -> list[WeightEntry]:
    """Every parameter of `config` with the HF tensor(s) it comes from."""
    return HF_MAPPINGS[config.model_type].weight_map(config)


def _tree_get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _tree_set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------- load

def _expected_hf_shape(entry: WeightEntry, shape: tuple[int, ...]) -> tuple[int, ...]:
    per_layer = shape[1:] if entry.stacked else shape
    return tuple(reversed(per_layer)) if entry.transpose else tuple(per_layer)


def check_checkpoint(checkpoint: SafetensorsCheckpoint, config, directory: str) -> None:
    """Every expected tensor is present with the expected shape, before anything is loaded."""
    shapes = models.family(config.model_type).param_shapes(config)
    for entry in weight_map(config):
        shape = _tree_get(shapes, entry.path).shape
        want = _expected_hf_shape(entry, shape)
        layers = range(shape[0]) if entry.stacked else [None]
        for layer in layers:
            name = entry.hf_name.format(layer=layer)
            if name not in checkpoint:
                raise ValueError(
                    f"checkpoint {directory} is missing weight {name!r}; it does not match its "
                    f"config.json ({config.model_type}, {config.num_layers} layers)."
                )
            got = checkpoint.shape(name)
            if tuple(got) != want:
                raise ValueError(
                    f"checkpoint {directory}: weight {name!r} has shape {tuple(got)} but the config "
                    f"implies {want}."
                )


def _shard_reader(checkpoint: SafetensorsCheckpoint, entry: WeightEntry, dtype, layer: int | None = None):
    """Callback for make_array_from_callback: reads one device's slice of one (per-layer) tensor.

    Devices holding the same slice (replicated dims) share one read.
    """
    name = entry.hf_name.format(layer=layer)
    memo: dict[str, np.ndarray] = {}

    def read(index):
        key = repr(index)
        if key not in memo:
            block = checkpoint[name][tuple(reversed(index)) if entry.transpose else tuple(index)]
            if entry.transpose:
                block = np.ascontiguousarray(block.T)
            # Without a transpose the device copies straight from the file mapping.
            memo[key] = block.astype(dtype, copy=False)
        return memo[key]

    return read


@functools.lru_cache(maxsize=None)
def _layer_writer(stacked_sharding: NamedSharding):
    """Jitted in-place `stack[i] = layer` (the stack is donated, so no second copy exists)."""
    return jax.jit(lambda stack, layer, i: jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0),
                   donate_argnums=0, out_shardings=stacked_sharding)


def _load_entry(checkpoint, entry: WeightEntry, shape: jax.ShapeDtypeStruct, array_sharding: NamedSharding):
    dtype = np.dtype(shape.dtype)
    if not entry.stacked:
        return jax.make_array_from_callback(shape.shape, array_sharding, _shard_reader(checkpoint, entry, dtype))
    # A stacked tensor is a large share of the model (all layers of one weight): allocate it in
    # its shards once and fill it layer by layer, so host memory never holds more than one layer.
    layer_sharding = NamedSharding(array_sharding.mesh, P(*tuple(array_sharding.spec)[1:]))
    stack = jax.jit(lambda: jnp.zeros(shape.shape, shape.dtype), out_shardings=array_sharding)()
    write = _layer_writer(array_sharding)
    for layer in range(shape.shape[0]):
        layer_array = jax.make_array_from_callback(
            shape.shape[1:], layer_sharding, _shard_reader(checkpoint, entry, dtype, layer))
        stack = write(stack, layer_array, jnp.int32(layer))
    return stack


def load_params(directory: str, config, mesh: Mesh) -> dict:
    """Parameters of `config` from the safetensors in `directory`, placed in their shards on `mesh`."""
    checkpoint = SafetensorsCheckpoint(directory)
    check_checkpoint(checkpoint, config, directory)
    family = models.family(config.model_type)
    shapes = family.param_shapes(config)
    shardings = sharding.tree_shardings(shapes, family.SHARDING_RULES, mesh)
    params: dict = {}
    for entry in weight_map(config):
        array = _load_entry(checkpoint, entry, _tree_get(shapes, entry.path), _tree_get(shardings, entry.path))
        _tree_set(params, entry.path, array)
    return params


# ----------------------------------------------------------------------------- export

def _to_host(x: jax.Array) -> np.ndarray:
    """Host copy of a replicated array: every process holds all of it in its first local shard."""
    return np.asarray(x.addressable_shards[0].data)


def save_params(directory: str, config, params: dict, dtype=None, max_shard_bytes: int = 5 * 1024**3):
    """Write `params` as HF safetensors in `directory`, one tensor in host memory at a time.

    dtype: on-disk dtype (default: the parameters' dtype). In a multi-process run every process
    must call this (the gathers are collective); only process 0 writes.
    """
    leaf = params["embed"]["embedding"]
    replicated = NamedSharding(leaf.sharding.mesh, P()) if isinstance(leaf.sharding, NamedSharding) else None
    # Each tensor (one layer of a stacked parameter) is gathered whole onto every device, in turn.
    take_layer = jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), out_shardings=replicated)
    replicate = jax.jit(lambda x: x, out_shardings=replicated)
    tensors, gathers = [], []
    for entry in weight_map(config):
        array = _tree_get(params, entry.path)
        out_dtype = np.dtype(parse_dtype(dtype) if dtype is not None else array.dtype)
        per_layer_shape = array.shape[1:] if entry.stacked else array.shape
        hf_shape = tuple(reversed(per_layer_shape)) if entry.transpose else tuple(per_layer_shape)
        for layer in (range(array.shape[0]) if entry.stacked else [None]):
            def gather(array=array, layer=layer):
                return replicate(array) if layer is None else take_layer(array, jnp.int32(layer))

            def produce(gather=gather, entry=entry, out_dtype=out_dtype):
                host = _to_host(gather())
                return (host.T if entry.transpose else host).astype(out_dtype, copy=False)
            tensors.append((entry.hf_name.format(layer=layer), hf_shape, out_dtype, produce))
            gathers.append(gather)
    if jax.process_index() == 0:
        os.makedirs(directory, exist_ok=True)
        return write_safetensors(directory, tensors, max_shard_bytes=max_shard_bytes)
    for gather in gathers:  # other processes only join the collective gathers, in the same order
        gather().block_until_ready()
    return []
