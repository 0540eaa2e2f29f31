"""Device mesh from `--mesh_dim`, and parameter sharding from path rules.

`--mesh_dim` follows EasyLM: `dp,fsdp,mp` sizes, at most one `-1` (the remaining devices), or the
named form `dp:2,fsdp:-1,mp:1`. The mesh spans every device of every process.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("dp", "fsdp", "mp")


def parse_mesh_dim(mesh_dim: str | Sequence[int], num_devices: int | None = None) -> tuple[int, int, int]:
    """`'1,-1,1'` or `'dp:1,fsdp:-1,mp:1'` -> concrete `(dp, fsdp, mp)` sizes for `num_devices`."""
    if num_devices is None:
        num_devices = jax.device_count()
    if isinstance(mesh_dim, str):
        parts = [s.strip() for s in mesh_dim.split(",") if s.strip()]
        if parts and all(":" in s for s in parts):
            named = {}
            for part in parts:
                name, _, value = part.partition(":")
                name = name.strip()
                if name not in MESH_AXES or name in named:
                    raise ValueError(
                        f"mesh_dim {mesh_dim!r}: {name!r} is not a mesh axis or is repeated; "
                        f"name each of {MESH_AXES} at most once, e.g. 'dp:1,fsdp:-1,mp:1'."
                    )
                named[name] = value
            parts = [named.get(name, "1") for name in MESH_AXES]
        elif any(":" in s for s in parts):
            raise ValueError(f"mesh_dim {mesh_dim!r} mixes named and positional sizes; use one form.")
        try:
            sizes = [int(s) for s in parts]
        except ValueError:
            raise ValueError(
                f"mesh_dim {mesh_dim!r} is not a list of integers; write e.g. '1,-1,1' or 'dp:1,fsdp:-1,mp:1'."
            ) from None
    else:
        sizes = [int(s) for s in mesh_dim]
    if len(sizes) != 3:
        raise ValueError(f"mesh_dim {mesh_dim!r} must give 3 sizes (dp, fsdp, mp), got {len(sizes)}.")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh_dim {mesh_dim!r} has more than one -1; at most one axis can take the remaining "
                         f"devices.")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh_dim {mesh_dim!r}: sizes must be positive or -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh_dim {mesh_dim!r} does not fit {num_devices} devices: {num_devices} is not divisible "
                f"by the fixed axes' product {known}."
            )
        sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"mesh_dim {mesh_dim!r} needs {known} devices but {num_devices} are available; "
            f"make the sizes multiply to {num_devices} or use -1 for one axis."
        )
    return tuple(sizes)


def make_mesh(mesh_dim: str | Sequence[int] = "1,-1,1", devices=None) -> Mesh:
    """A `('dp','fsdp','mp')` mesh over all devices of all processes (or `devices`)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = parse_mesh_dim(mesh_dim, len(devices))
    if devices == jax.devices():
        # make_mesh orders devices for the physical topology (ICI rings on TPU, NVLink on GPU).
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def path_name(path) -> str:
    """`(DictKey('layers'), DictKey('attn'), ...)` -> `'layers/attn/...'`."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def rule_spec(name: str, rules) -> P:
    """The PartitionSpec of the first rule whose regex is found in `name`, as the rule states it
    (one layer's tensor, not fitted to a shape).

    A rule's spec is a PartitionSpec, or a function of `name` that returns one: a rule derived from
    another parameter's (adapter leaves take their spec from their base kernel's, see
    `easytune.adapters.sharding_rules`).
    """
    for pattern, spec in rules:
        if re.search(pattern, name):
            return spec(name) if callable(spec) else spec
    raise ValueError(f"no sharding rule matches parameter {name!r}; add a catch-all rule ('.*', P()).")


def spec_for(name: str, shape: Sequence[int], rules, mesh: Mesh | None = None) -> P:
    """The PartitionSpec of the first rule whose regex is found in `name`, fitted to `shape`.

    A rule describes the trailing dims (one layer's tensor); extra leading dims (stacked layers)
    stay unsharded. A dim whose size a mesh axis does not divide is left unsharded on that axis.
    """
    spec = tuple(rule_spec(name, rules))
    if len(spec) > len(shape):
        if len(shape) == 0:
            return P()
        raise ValueError(f"the sharding rule for {name!r} has rank {len(spec)} but the parameter has shape "
                         f"{tuple(shape)}.")
    spec = (None,) * (len(shape) - len(spec)) + spec
    if mesh is not None:
        fitted = []
        for dim, axes in zip(shape, spec):
            axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes or ())
            size = math.prod(mesh.shape[a] for a in axes_tuple)
            fitted.append(axes if axes_tuple and dim % size == 0 else None)
        spec = tuple(fitted)
    return P(*spec)


def tree_specs(tree, rules, mesh: Mesh | None = None):
    """PartitionSpecs for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: spec_for(path_name(path), np.shape(leaf), rules, mesh), tree
    )


def tree_shardings(tree, rules, mesh: Mesh):
    """NamedShardings on `mesh` for every leaf of `tree`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), tree_specs(tree, rules, mesh))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch is split: dp x fsdp."""
    return mesh.shape["dp"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a `[batch, ...]` input: batch over dp and fsdp, the rest replicated."""
    return NamedSharding(mesh, P(("dp", "fsdp"), *([None] * (ndim - 1))))


def input_sharding(mesh: Mesh, batch_size: int, ndim: int = 2) -> NamedSharding:
    """`batch_sharding` when the batch divides over dp x fsdp, else replicated (small batches)."""
    if batch_size % data_parallel_size(mesh) == 0:
        return batch_sharding(mesh, ndim)
    return NamedSharding(mesh, P())


# Batches are [grad_accum_steps, micro_batch, seq]: micro-batch rows over the data-parallel axes.
BATCH_SPEC = P(None, ("dp", "fsdp"), None)


def global_batch(mesh, rows: dict[str, np.ndarray], grad_accum_steps: int) -> dict[str, jax.Array]:
    """Host rows `[batch, seq]` (the same on every process) -> global arrays
    `[accum, batch / accum, seq]`, micro-batch rows split over dp x fsdp. Each process transfers
    only the rows its devices hold. (Any `[batch, k]` row works: per-row values such as
    precomputed reference log-probs are `[batch, 1]`.)"""
    out = {}
    spec = NamedSharding(mesh, BATCH_SPEC)
    for key, value in rows.items():
        batch, seq = value.shape
        value = value.reshape(grad_accum_steps, batch // grad_accum_steps, seq)
        out[key] = jax.make_array_from_callback(value.shape, spec, lambda index, v=value: v[index])
    return out
