"""Pieces every model family shares: remat policies, the scan over stacked layers, random init.

A family file (`decoder.py`, `t5.py`) builds its blocks from `layers` and these; nothing here
knows a family.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from easytune.dtypes import parse_dtype

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# Config fields chosen at load time, not stored with a checkpoint's architecture.
COMPUTE_FIELDS = ("dtype", "param_dtype", "remat", "attention", "head_chunk_size", "layer_loop")


class ComputeDtypes:
    """`compute_dtype` and `weight_dtype` of a config with `dtype` and `param_dtype` fields."""

    @property
    def compute_dtype(self):
        return parse_dtype(self.dtype)

    @property
    def weight_dtype(self):
        return parse_dtype(self.param_dtype)


def compute_options(compute: dict) -> dict:
    """The compute options that were set (None: the config's default)."""
    return {k: v for k, v in compute.items() if v is not None}


def architecture(config) -> dict:
    """A config's fields minus the compute options: what two configs of one model share."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in COMPUTE_FIELDS}


def check_remat(remat: str) -> None:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose one of {sorted(REMAT_POLICIES)}.")


LAYER_LOOPS = ("auto", "scan", "unroll")


def check_layer_loop(layer_loop: str) -> None:
    if layer_loop not in LAYER_LOOPS:
        raise ValueError(f"unknown layer_loop {layer_loop!r}; choose one of {list(LAYER_LOOPS)}.")


def scan_layers(remat: str, body, carry, xs, layer_loop: str = "scan"):
    """`jax.lax.scan(body, carry, xs)` over the stacked layers, each layer rematerialized under the
    named policy (`REMAT_POLICIES`).

    layer_loop: "scan" keeps one `lax.scan` (compile time flat in depth); "unroll" runs the same
    body once per layer in Python, on slices of the stacked weights; "auto" unrolls on CPU and scans
    elsewhere. Why unroll on CPU: differentiating a scan stacks every residual into a `[layers, ...]`
    buffer written one layer per iteration, and XLA:CPU upcasts a bf16 dynamic-update-slice to
    float32, so each write converted the whole buffer both ways (1.5 s of a 6.9 s SmolLM2 bf16
    step; the float32 step also gains, issue 21); the cost is compile time (about 1.7x). The weights
    are split with `jnp.split`, whose gradient is one concatenate (per-layer `x[i]` slices would add
    up `layers` zero-padded gradients). GPU/TPU keep the scan: their compilers handle the buffers in
    place and compile time matters more there.
    """
    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    if layer_loop == "auto":
        layer_loop = "unroll" if jax.default_backend() == "cpu" else "scan"
    if layer_loop == "scan":
        return jax.lax.scan(body, carry, xs)
    count = jax.tree.leaves(xs)[0].shape[0]
    per_layer = jax.tree.map(lambda x: [part[0] for part in jnp.split(x, count)], xs)
    outputs = []
    for i in range(count):
        carry, y = body(carry, jax.tree.map(lambda parts: parts[i], per_layer, is_leaf=lambda v: isinstance(v, list)))
        outputs.append(y)
    stacked = None if outputs[0] is None else jax.tree.map(lambda *ys: jnp.stack(ys), *outputs)
    return carry, stacked


def init_from_shapes(shapes, key: jax.Array, init: Callable[[str, jax.Array, tuple, object], jax.Array]):
    """Parameters for a pytree of `jax.ShapeDtypeStruct`: `init(path, key, shape, dtype)` per leaf
    (path: the leaf's `keystr`), each leaf with its own key split from `key`."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    out = [init(jax.tree_util.keystr(path), k, s.shape, s.dtype) for (path, s), k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, out)


def normal(std: float, key: jax.Array, shape, dtype) -> jax.Array:
    """normal(0, std) drawn in float32, stored in `dtype`."""
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
