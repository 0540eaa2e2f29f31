"""Hugging Face <-> easytune: config mapping, weight maps, streaming load and export.

Each family maps its own configs and weights, beside its model (`models/llama.py`, `qwen.py`,
`gemma.py`, `t5.py`, registered as `FAMILY`); the public functions of the same names here dispatch
on the config's `model_type`.

Loading builds each parameter with `jax.make_array_from_callback`: every device's shard is read
straight from the memory-mapped safetensors, so no process ever holds a full copy of a sharded
parameter. Export streams one (per-layer) tensor at a time.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from easytune import models, sharding
from easytune.dtypes import dtype_name, parse_dtype
from easytune.models.registry import WeightEntry
from easytune.safetensors_io import SafetensorsCheckpoint, write_safetensors

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


# ----------------------------------------------------------------------------- config and weight entries

def read_json(path: str) -> dict:
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}).") from None


def checkpoint_dtype(hf: dict) -> str:
    """The dtype the HF checkpoint declares (float32 if it declares none)."""
    name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return dtype_name(name) if name in ("float32", "bfloat16", "float16") else "float32"


def config_from_hf(hf: dict, directory: str | None = None, **compute: Any):
    """The family config from an HF `config.json` dict; `compute` sets dtype, param_dtype, remat,
    attention. `directory` (the checkpoint) settles what the config leaves open (T5's lm_head)."""
    return models.registration(hf.get("model_type")).config_from_hf(hf, directory, **compute)


def config_to_hf(config, base: dict | None = None, torch_dtype: str | None = None) -> dict:
    """An HF `config.json` dict for `config`, keeping the fields of `base`."""
    return models.registration(config.model_type).config_to_hf(config, base, torch_dtype)


def weight_map(config) -> list[WeightEntry]:
    """Every parameter of `config` with the HF tensor(s) it comes from."""
    return models.registration(config.model_type).weight_map(config)


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
