"""easytune checkpoints: orbax-saved parameters plus the model's config, HF config and tokenizer.

A model checkpoint (`Model.save`, `import_hf`):
    easytune.json    {"format": "easytune", "version": 1, "config": {...}, "hf_config": {...},
                      "generation_config": {...}}
    params/          orbax PyTree checkpoint (written to a temporary name, then renamed: atomic)
    tokenizer files  as `tokenizer.save_pretrained` writes them
A training run (`easytune.train`): `<run>/checkpoints/<step>/` holds orbax items `params/`,
`opt_state/`, `data/` and `model/` (the same metadata as easytune.json); the tokenizer is in
`<run>/`. `locate` finds the parameters of any of these.
"""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from easytune import models, sharding, storage
from easytune.models import common

MARKER = "easytune.json"
FORMAT_VERSION = 1
# Host memory orbax may use for arrays in flight; its default (96 GB) copies a whole model to host
# at once. 1 GB bounds a conversion's peak to about one copy of the model plus this.
CONCURRENT_GB = 1


def bounded_handler() -> ocp.StandardCheckpointHandler:
    """The orbax handler for array trees, with host memory in flight bounded by CONCURRENT_GB."""
    return ocp.StandardCheckpointHandler(save_concurrent_gb=CONCURRENT_GB, restore_concurrent_gb=CONCURRENT_GB)


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(bounded_handler())


def abstract_target(tree, shardings):
    """ShapeDtypeStructs carrying `shardings`: tells orbax to restore each array into its shards."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def architecture_dict(config) -> dict:
    """The config's fields minus the compute options (those are chosen at load time)."""
    out = common.architecture(config)
    out["param_dtype"] = config.param_dtype  # the stored dtype: what `load` restores by default
    for name in ("rope_scaling", "local_rope_scaling"):  # (key, value) pairs, written as the dicts they are
        if out.get(name) is not None:
            out[name] = dict(out[name])
    return out


def model_meta(config, hf_config: dict | None = None, generation_config: dict | None = None) -> dict:
    """What a checkpoint records about its model besides the weights."""
    return {"format": "easytune", "version": FORMAT_VERSION, "config": architecture_dict(config),
            "hf_config": hf_config or {}, "generation_config": generation_config or {}}


def save_model(directory: str, config, params, hf_config: dict | None = None,
               generation_config: dict | None = None, tokenizer=None) -> None:
    """Write an easytune checkpoint of `params` (sharded arrays are saved shard by shard)."""
    directory = storage.absolute(directory)
    if not storage.is_remote(directory):
        os.makedirs(directory, exist_ok=True)
    _checkpointer().save(os.path.join(directory, "params"), ocp.args.StandardSave(params), force=True)
    main = jax.process_index() == 0
    with storage.writable_dir(directory, upload_from_this_process=main) as files:  # a URL: uploaded after
        if main:
            meta = model_meta(config, hf_config, generation_config)
            tmp = os.path.join(files, MARKER + ".tmp")
            with open(tmp, "w") as f:
                json.dump(meta, f, indent=2)
            os.replace(tmp, os.path.join(files, MARKER))
            if tokenizer is not None:
                tokenizer.save_pretrained(files)


def _read_meta(path: str) -> dict:
    meta = json.loads(storage.read_text(path))
    if meta.get("format") != "easytune" or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not easytune v{FORMAT_VERSION} checkpoint metadata.")
    return meta


def _training_steps(run_dir: str) -> list[int]:
    checkpoints = os.path.join(run_dir, "checkpoints")
    if not storage.isdir(checkpoints):
        return []
    # in a bucket orbax writes into <step>/ itself and marks it complete last (commit_success.txt);
    # locally it renames a finished temporary folder to <step>
    complete = ("model/metadata", "commit_success.txt") if storage.is_remote(run_dir) else ("model/metadata",)
    return sorted(int(d) for d in storage.listdir(checkpoints)
                  if d.isdigit() and all(storage.exists(os.path.join(checkpoints, d, name)) for name in complete))


def locate(path: str) -> tuple[dict, str, str] | None:
    """`(metadata, params directory, tokenizer directory)` for a model checkpoint, a training
    step directory, or a training run directory (its latest step); None if `path` is none of them."""
    if storage.isfile(os.path.join(path, MARKER)):
        return _read_meta(os.path.join(path, MARKER)), os.path.join(path, "params"), path
    if storage.isfile(os.path.join(path, "model", "metadata")) and storage.isdir(os.path.join(path, "params")):
        run_dir = os.path.dirname(os.path.dirname(storage.absolute(path).rstrip("/")))
        return _read_meta(os.path.join(path, "model", "metadata")), os.path.join(path, "params"), run_dir
    steps = _training_steps(path)
    if steps:
        return locate(os.path.join(path, "checkpoints", str(steps[-1])))
    kept = [d for d in storage.listdir(path) if d.isdigit()] if storage.isdir(path) else []
    if len(kept) == 1 and storage.isfile(os.path.join(path, kept[0], "model", "metadata")):
        return locate(os.path.join(path, kept[0]))  # <run>/best: the one step kept there
    return None


def stored_param_dtype(meta: dict) -> str:
    return meta["config"].get("param_dtype", "float32")


def config_from_meta(meta: dict, **compute):
    arch = dict(meta["config"])
    family = models.family(arch.get("model_type"))
    arch.update(common.compute_options(compute))
    return family.Config(**arch)  # the config makes its JSON lists and dicts hashable itself


def restore_tree(path: str, shapes, shardings):
    """An array tree from an orbax directory, each array restored straight into its shards.
    shapes: the tree's `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`); shardings: a matching
    tree. An array the checkpoint lacks is a clear error before anything is read."""
    directory = storage.absolute(path)  # orbax wants absolute paths (or URLs)
    stored = _checkpointer().metadata(directory)
    stored_tree = getattr(stored, "item_metadata", stored)
    stored_tree = getattr(stored_tree, "tree", stored_tree)
    want = {sharding.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    have = {sharding.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(dict(stored_tree))[0]}
    missing = sorted(want - have)
    if missing:
        raise ValueError(f"easytune checkpoint {path} is missing parameter {missing[0]!r} "
                         f"({len(missing)} missing in all); it does not match its config.")
    return _checkpointer().restore(directory, ocp.args.StandardRestore(abstract_target(shapes, shardings)))


def restore_params(params_path: str, config, mesh):
    """Parameters from an orbax `params` directory, restored straight into their shards on `mesh`."""
    family = models.family(config.model_type)
    shapes = family.param_shapes(config)
    return restore_tree(params_path, shapes, sharding.tree_shardings(shapes, family.SHARDING_RULES, mesh))
