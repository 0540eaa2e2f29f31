"""The Trainer: the sharded train state of one model and its jitted step, evaluation and orbax
checkpoints with exact resume. The run driver (`easytune.run`) owns the loop around it.

An algorithm supplies a `Loss`: a function over `(model_config, params, batch)` that returns
`(sum of per-unit losses, number of units)` (units: trained tokens for SFT, preference pairs for
DPO), optionally with a dict of further per-unit sums to log as means (`rewards/chosen`,
`accuracy`, ...). A loss with `needs_reference` compares against a reference policy and is
called as `fn(model_config, params, batch, reference_params)`. The reference is the frozen input
of the jitted step: with an adapter it is the base model itself (adapters off, no copy); without
one it is a copy of the initial parameters, sharded like them, without optimizer state.

The Trainer takes a typed `TrainConfig` (the driver builds it from the flags), never the flag tree.

Checkpoint layout: `<output_dir>/checkpoints/<step>/` with orbax items `params`, `opt_state`,
`data` (the data iterator's position) and `model` (config, HF config, generation config), so any
step loads with `easytune.load` and exports with `easytune.export_hf`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import weakref
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding

from easytune import adapters, checkpoint, sharding, storage, storage_errors
from easytune.data.batching import count_tokens, eval_batches  # noqa: F401 (the loop's batch helpers)
from easytune.recipe import Loss
from easytune.sharding import BATCH_SPEC, global_batch

logger = logging.getLogger("easytune")

@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup and decay (`--optimizer.*`)."""
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_grad_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What a Trainer needs: where its checkpoints go, the global batch (in the loss's units of
    rows: sequences or pairs) and its accumulation, the loss reduction, the optimizer, the seed
    (adapter dropout), how many checkpoints to keep and whether resuming is intended."""
    output_dir: str
    batch_size: int
    grad_accum_steps: int = 1
    loss_reduction: str = "mean"
    optimizer: OptimizerConfig = OptimizerConfig()
    seed: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    skip_nonfinite_steps: int = 0
    async_checkpoints: bool = False  # the run driver's --async_checkpoints (default on) sets it

    @classmethod
    def from_flags(cls, cfg, **changes) -> "TrainConfig":
        """From a run's flag tree (`--output_dir`, `--batch_size`, `--optimizer.*`, ...), with `changes`."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"optimizer"}
        values = {name: cfg[name] for name in fields if name in cfg}
        values["optimizer"] = OptimizerConfig(**{f.name: cfg.optimizer[f.name]
                                                 for f in dataclasses.fields(OptimizerConfig)})
        return cls(**{**values, **changes})


# ----------------------------------------------------------------------------- optimizer

def make_schedule(opt, total_steps: int) -> optax.Schedule:
    """Warmup (steps or ratio of total) to `opt.lr`, then cosine, linear or constant to lr * min_lr_ratio.

    Warmup step i (0-based) uses lr * (i + 1) / (warmup + 1): no step is spent at learning rate 0
    (transformers' linear warmup starts at 0, which wastes the first update)."""
    warmup = opt.warmup_steps if opt.warmup_steps > 0 else int(round(opt.warmup_ratio * total_steps))
    warmup = min(warmup, max(total_steps - 1, 0))
    peak, end = opt.lr, opt.lr * opt.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt.min_lr_ratio)
    elif opt.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif opt.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"unknown --optimizer.schedule {opt.schedule!r}; use cosine, linear or constant.")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(peak / (warmup + 1), peak, warmup), decay], [warmup])


DECAYED = ("kernel", "embedding", "lora_a", "lora_b", "w_ih", "w_hh")


def _by_path(label):
    """`params -> tree of label(path name) per leaf`: the mask/label function optax's `masked`,
    `adamw(mask=)` and `multi_transform` take."""
    return lambda params: jax.tree_util.tree_map_with_path(lambda path, _: label(sharding.path_name(path)), params)


# weight decay on matrices only (not norms, biases, DoRA magnitudes)
_decay_mask = _by_path(lambda name: any(part in name for part in DECAYED))


def make_optimizer(opt, total_steps: int, skip_nonfinite_steps: int = 0, frozen=None, scaled=None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (clipped, scheduled); with `skip_nonfinite_steps` N > 0 wrapped in
    `optax.apply_if_finite`, which skips an update whose gradients are not finite (weights and
    moments untouched) unless more than N in a row were, and counts them in its state.
    `frozen(path) -> bool`: leaves of the trained tree that get no update and no optimizer state
    (`optax.multi_transform` with `set_to_zero`; e.g. ILQL's target heads).
    `scaled`: `(selected(path) -> bool, factor)`: the selected leaves' updates times `factor`,
    which for AdamW (decay included) is a peak learning rate of `factor * lr` on the same schedule,
    clipped by the same global norm (e.g. PPO's shared value head, `--value_lr`)."""
    if opt.lr <= 0:
        raise ValueError(f"--optimizer.lr must be > 0, got {opt.lr}.")
    schedule = make_schedule(opt, total_steps)
    parts = []
    if opt.clip_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(opt.clip_grad_norm))
    parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                             mask=_decay_mask))
    if scaled is not None:
        selected, factor = scaled
        parts.append(optax.masked(optax.scale(factor), _by_path(lambda name: bool(selected(name)))))
    optimizer = optax.chain(*parts)
    if frozen is not None:
        labels = _by_path(lambda name: "frozen" if frozen(name) else "trained")
        optimizer = optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)
    if skip_nonfinite_steps > 0:
        optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=skip_nonfinite_steps)
    return optimizer, schedule


# ----------------------------------------------------------------------------- the step

def split_loss_output(output) -> tuple[jax.Array, jax.Array, dict]:
    """`(loss_sum, count, extra sums)` from a loss's `(loss_sum, count[, extra])`."""
    if len(output) == 3:
        return output[0], output[1], dict(output[2])
    loss_sum, count = output
    return loss_sum, count, {}


def build_train_step(model_config, loss: Loss, optimizer, reduction: str, grad_accum_steps: int,
                     combine=None, seed: int = 0, after_step=None):
    """`step(params, opt_state, frozen, batch, step_index) -> (params, opt_state, metrics)`; batch
    leaves are `[grad_accum_steps, micro_batch, ...]`.

    `params` are what is trained (all weights, or an adapter's); `combine(frozen, params, rng)`
    builds the model's parameter tree from them (default: `params` itself). rng is
    `fold_in(key(seed), step_index)` per micro-batch, for adapter dropout. A loss that
    `needs_reference` also gets `frozen` (the reference policy's parameters). `after_step(params,
    step_index) -> params` runs after the update (e.g. a Polyak update of target parameters).

    The loss's extra sums (if any) are logged as means per unit: `sum / count` over the global
    batch, whatever the reduction. metrics[loss.unit] is the number of units.

    reduction 'mean': every trained token of the global batch weighs the same (sum / tokens).
    reduction 'sum': token losses summed per micro-batch and averaged over accumulation steps
    (open-instruct's `--reduce_loss sum`).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"unknown loss reduction {reduction!r}; use mean or sum.")
    combine = combine or (lambda frozen, params, rng: params)

    def step(params, opt_state, frozen, batch, step_index):
        step_key = jax.random.fold_in(jax.random.key(seed), step_index)

        def loss_and_extras(p, micro_batch, rng):
            model_params = combine(frozen, p, rng)
            loss_sum, count, extras = split_loss_output(loss(model_config, model_params, micro_batch, frozen))
            return loss_sum, (count, extras)

        def micro(carry, xs):
            grads_acc, loss_acc, count_acc, extras_acc = carry
            micro_batch, micro_index = xs
            rng = jax.random.fold_in(step_key, micro_index)
            (loss_sum, (count, extras)), grads = jax.value_and_grad(loss_and_extras, has_aux=True)(
                params, micro_batch, rng)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grads_acc, grads)
            extras_acc = jax.tree.map(lambda a, e: a + e.astype(jnp.float32), extras_acc, extras)
            return (grads_acc, loss_acc + loss_sum, count_acc + count, extras_acc), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        first_micro = jax.tree.map(lambda x: x[0], batch)
        _, (_, extra_shapes) = jax.eval_shape(loss_and_extras, params, first_micro, step_key)
        extra_zeros = jax.tree.map(lambda e: jnp.zeros(e.shape, jnp.float32), extra_shapes)
        (grads, loss_sum, count, extras), _ = jax.lax.scan(
            micro, (zeros, jnp.float32(0), jnp.float32(0), extra_zeros), (batch, jnp.arange(grad_accum_steps)))
        denominator = jnp.maximum(count, 1.0) if reduction == "mean" else float(grad_accum_steps)
        grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if after_step is not None:
            params = after_step(params, step_index)
        metrics = {"loss": loss_sum / denominator, "grad_norm": optax.tree.norm(grads), loss.unit: count,
                   **{name: value / jnp.maximum(count, 1.0) for name, value in extras.items()}}
        if isinstance(opt_state, optax.ApplyIfFiniteState):  # --skip_nonfinite_steps
            metrics["nonfinite_streak"] = opt_state.notfinite_count.astype(jnp.float32)
            metrics["nonfinite_skipped"] = opt_state.total_notfinite.astype(jnp.float32)
        return params, opt_state, metrics

    return step


# ----------------------------------------------------------------------------- checkpoints

_TRAINERS = weakref.WeakSet()  # every live Trainer, for `wait_for_saves`


def wait_for_saves() -> None:
    """Wait until every Trainer's background checkpoint write is complete (the run driver calls
    this before it exports, reports or exits)."""
    for trainer in list(_TRAINERS):
        trainer.wait_for_saves()


def checkpoint_manager(directory: str, keep: int, async_saves: bool = False) -> ocp.CheckpointManager:
    """async_saves: orbax copies the arrays to host memory, returns, and writes them in a thread
    while training goes on (`Trainer.wait_for_saves` waits; the step directory appears, renamed
    from orbax's temporary one, only when complete)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep if keep > 0 else None, create=True,
                                           enable_async_checkpointing=async_saves)
    array_items = {name: checkpoint.bounded_handler() for name in ("params", "opt_state", "heads")}
    json_items = {name: ocp.JsonCheckpointHandler() for name in ("data", "model")}
    return ocp.CheckpointManager(storage.absolute(directory), options=options,
                                 item_handlers={**array_items, **json_items})


class Trainer:
    """Trains `loss` on one model: the trained params (all weights, or the attached adapter's),
    their optimizer state and the frozen inputs (an adapter's base, or a reference copy), the
    jitted step, evaluation and checkpoints in `<config.output_dir>/checkpoints`."""

    def __init__(self, config: TrainConfig, model, loss: Loss, total_steps: int, reference=None, heads=None):
        """`reference`: the parameters a `needs_reference` loss gets, when they are not the model's
        own (e.g. a distillation teacher, already sharded): a frozen input beside the adapter's base,
        never trained and without optimizer state. None: the adapter's base, or a copy of the
        initial weights. `heads` (`easytune.recipe.Heads`): parameters trained beside the model's;
        the trained tree is then `{"model": ..., "heads": ...}`, and so is the loss's `params`."""
        self.config, self.model, self.loss = config, model, loss
        self.mesh, self.model_config = model.mesh, model.config
        self.total_steps = total_steps
        if config.batch_size % config.grad_accum_steps:
            raise ValueError(f"--batch_size ({config.batch_size}) must be a multiple of --grad_accum_steps "
                             f"({config.grad_accum_steps}).")
        micro = config.batch_size // config.grad_accum_steps
        data_parallel = sharding.data_parallel_size(self.mesh)
        if micro % data_parallel:
            raise ValueError(f"the micro-batch ({config.batch_size} / {config.grad_accum_steps} accumulation steps = "
                             f"{micro}) must divide over dp x fsdp = {data_parallel} devices; change "
                             f"--batch_size, --grad_accum_steps or --mesh_dim.")
        self.heads = heads
        frozen_heads = None
        if heads is not None and heads.frozen is not None:
            frozen_heads = lambda name: name.startswith("heads/") and heads.frozen(name[len("heads/"):])  # noqa: E731
        scaled_heads = None
        if heads is not None and heads.lr is not None:
            if heads.lr <= 0:
                raise ValueError(f"a head's learning rate must be > 0, got {heads.lr}.")
            scaled_heads = (lambda name: name.startswith("heads/"), heads.lr / config.optimizer.lr)
        self.optimizer, self.schedule = make_optimizer(config.optimizer, total_steps, config.skip_nonfinite_steps,
                                                       frozen_heads, scaled_heads)
        rules = adapters.rules_for(self.model_config)
        self.adapter = model.adapter
        if self.adapter is not None:
            # only the adapter is trained and carries optimizer state; the base is an input
            adapter_config = self.adapter.config
            self.frozen = model.params
            self.params = self.adapter.params
            combine = lambda frozen, params, rng: adapters.apply(  # noqa: E731
                frozen, params, adapter_config, self.model_config, rng)
        else:
            self.frozen, self.params, combine = None, model.params, None
        self.param_shardings = sharding.tree_shardings(self.params, rules, self.mesh)
        if loss.needs_reference and self.adapter is None and reference is None:
            # the reference policy: a copy of the initial weights (training donates and replaces
            # the originals), in the same shards, never updated and without optimizer state
            with jax.set_mesh(self.mesh):
                self.frozen = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=self.param_shardings)(
                    self.params)
        frozen_shardings = None if self.frozen is None else sharding.tree_shardings(self.frozen, rules, self.mesh)
        if reference is not None:
            if not loss.needs_reference:
                raise ValueError("a reference model was given for a loss that takes none.")
            # the frozen input carries the reference beside the base (if any); arrays keep their shards
            reference_shardings = jax.tree.map(lambda x: x.sharding, reference)
            self.frozen = {"base": self.frozen, "reference": reference}
            frozen_shardings = {"base": frozen_shardings, "reference": reference_shardings}
            combine = combine and (lambda frozen, params, rng, base_combine=combine: base_combine(
                frozen["base"], params, rng))
            loss = Loss(lambda c, p, b, frozen, fn=loss.fn: fn(c, p, b, frozen["reference"]), loss.unit,
                        needs_reference=True, perplexity=loss.perplexity)
        after_step = None
        if heads is not None:  # trained beside the model's parameters, sharded by their own rules first
            model_combine = combine or (lambda frozen, params, rng: params)
            combine = lambda frozen, params, rng: {  # noqa: E731
                "model": model_combine(frozen, params["model"], rng), "heads": params["heads"]}
            self.params = {"model": self.params, "heads": heads.params}
            rules = tuple(heads.rules) + tuple(rules)
            self.param_shardings = sharding.tree_shardings(self.params, rules, self.mesh)
            if heads.after_step is not None:
                after_step = lambda params, step_index: {  # noqa: E731
                    "model": params["model"], "heads": heads.after_step(params["heads"], step_index)}
        opt_shapes = jax.eval_shape(self.optimizer.init, self.params)
        self.opt_shardings = sharding.tree_shardings(opt_shapes, rules, self.mesh)
        with jax.set_mesh(self.mesh):
            self.opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(self.params)
        step = build_train_step(self.model_config, loss, self.optimizer, config.loss_reduction,
                                config.grad_accum_steps, combine, seed=config.seed, after_step=after_step)
        batch_sharding = NamedSharding(self.mesh, BATCH_SPEC)
        self._step = jax.jit(step, in_shardings=(self.param_shardings, self.opt_shardings, frozen_shardings,
                                                 batch_sharding, None),
                             out_shardings=(self.param_shardings, self.opt_shardings, None),
                             donate_argnums=(0, 1))
        combine = combine or (lambda frozen, params, rng: params)

        def evaluate(params, frozen, batch):
            return split_loss_output(loss(self.model_config, combine(frozen, params, None), batch, frozen))

        self._eval = jax.jit(evaluate)
        self.step = 0
        self.best_manager = None
        self.manager = checkpoint_manager(os.path.join(config.output_dir, "checkpoints"), config.keep_checkpoints,
                                          config.async_checkpoints)
        self._pending_save = None  # (step, last intact step, held logs) of a save still being written
        _TRAINERS.add(self)
        if not config.resume and self.manager.all_steps():
            raise ValueError(f"{self.manager.directory} already holds checkpoints (steps "
                             f"{list(self.manager.all_steps())}); pass --resume to continue that run, or choose a "
                             f"new --output_dir.")

    def state_bytes(self) -> dict[str, int]:
        """Bytes of the live train state (global array sizes): trained `params`, `optimizer` state,
        `frozen` inputs (an adapter's base model, or a reference copy), and a recipe's `heads`."""
        def nbytes(tree):
            return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))
        model_params, heads = self._split(self.params)
        out = {"params": nbytes(model_params), "optimizer": nbytes(self.opt_state), "frozen": nbytes(self.frozen)}
        if heads is not None:
            out["heads"] = nbytes(heads)
        return out

    def _split(self, tree):
        """`(the model's part, the heads' part or None)` of a tree shaped like the trained params."""
        return (tree["model"], tree["heads"]) if self.heads is not None else (tree, None)

    def _join(self, items: dict):
        """The trained params' tree from restored checkpoint items (inverse of `_array_items`)."""
        return {"model": items["params"], "heads": items["heads"]} if self.heads is not None else items["params"]

    def _array_items(self, tree, make) -> dict:
        """Checkpoint items `params` (the model's) and, with heads, `heads`, from a tree shaped like
        the trained params; `make` wraps each (an orbax save or restore argument)."""
        model_part, heads = self._split(tree)
        return {"params": make(model_part), **({"heads": make(heads)} if heads is not None else {})}

    # ------------------------------------------------------------------ checkpoints

    def _model_meta(self) -> dict:
        meta = checkpoint.model_meta(self.model_config, self.model.hf_config, self.model.generation_config)
        if self.adapter is not None:  # the checkpoint's params are the adapter's; the base is referenced
            meta["adapter"] = self.adapter.config.to_dict()
            meta["base_model"] = storage.absolute(self.model.source) if self.model.source else None
        return meta

    def save(self, data_state: dict) -> None:
        """Checkpoint the train state at this step. With `TrainConfig.async_checkpoints` the
        write goes on in the background after the arrays are copied to host memory (the next
        step may donate them), and the next save, `wait_for_saves` or the run's end waits for it.
        A full disk is one `StorageFull` sentence (the space needed, the last intact step); the
        partial write is removed."""
        self.wait_for_saves()  # one save in flight at a time; the previous one's failure is reported now
        intact = self.manager.latest_step()
        hold = contextlib.ExitStack()  # orbax's log lines held until the write is done (see storage_errors)
        hold.enter_context(storage_errors.held_library_logs())
        try:
            saved = self.manager.save(self.step, args=ocp.args.Composite(
                **self._array_items(self.params, ocp.args.StandardSave),
                opt_state=ocp.args.StandardSave(self.opt_state),
                data=ocp.args.JsonSave(data_state),
                model=ocp.args.JsonSave(self._model_meta()),
            ))
        except BaseException as error:
            with hold:
                self._raise_storage_failure(error, self.step, intact)
        self._pending_save = (self.step, intact, hold)
        if not self.config.async_checkpoints or not saved:
            self.wait_for_saves()
        if not saved and self.step not in self.manager.all_steps():
            raise RuntimeError(f"orbax declined to save step {self.step} in {self.manager.directory} "
                               f"(it holds {list(self.manager.all_steps())}).")

    def wait_for_saves(self) -> None:
        """Block until the checkpoint being written in the background is complete (a no-op when
        none is); its failure (a full disk: `StorageFull`) is raised here."""
        pending, self._pending_save = self._pending_save, None
        if pending is None:
            return
        step, intact, hold = pending
        with hold:
            try:
                self.manager.wait_until_finished()
            except BaseException as error:
                self._raise_storage_failure(error, step, intact)

    def _raise_storage_failure(self, error: BaseException, step: int, intact: int | None) -> None:
        if not storage_errors.is_no_space(error):
            raise error
        storage_errors.settle(self.manager)
        storage_errors.remove_temporary(str(self.manager.directory), step)
        needed = sum(self.state_bytes().get(k, 0) for k in ("params", "optimizer", "heads"))
        raise storage_errors.StorageFull(storage_errors.no_space_message(
            f"the checkpoint of step {step}", str(self.manager.directory), needed,
            self.config.keep_checkpoints, intact)) from None

    def save_best(self, metric: str, value: float, mode: str) -> None:
        """Offer the current weights as the best checkpoint by `metric` (`value` now; `mode` max or
        min): orbax keeps the best one offered, across resumes, in `<output_dir>/best/<step>`."""
        if self.best_manager is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, best_fn=lambda m: m[metric],
                                                   best_mode=mode, enable_async_checkpointing=False)
            self.best_manager = ocp.CheckpointManager(
                storage.absolute(os.path.join(self.config.output_dir, "best")), options=options,
                item_handlers={"params": checkpoint.bounded_handler(), "heads": checkpoint.bounded_handler(),
                               "model": ocp.JsonCheckpointHandler()})
        if self.step in self.best_manager.all_steps():
            return
        self.best_manager.save(self.step, args=ocp.args.Composite(
            **self._array_items(self.params, ocp.args.StandardSave), model=ocp.args.JsonSave(self._model_meta())),
            metrics={metric: float(value)})
        self.best_manager.wait_until_finished()

    def restore_latest(self) -> dict | None:
        """Restore the newest readable checkpoint; a corrupt one is skipped with a warning.
        Returns the data iterator state, or None when there is nothing to resume."""
        failures = []
        target = checkpoint.abstract_target(self.params, self.param_shardings)
        opt_target = checkpoint.abstract_target(self.opt_state, self.opt_shardings)
        with storage_errors.quiet_read_failures(failures):  # one warning line per torn step, not tracebacks
            for step in sorted(self.manager.all_steps(), reverse=True):
                try:
                    restored = self.manager.restore(step, args=ocp.args.Composite(
                        **self._array_items(target, ocp.args.StandardRestore),
                        opt_state=ocp.args.StandardRestore(opt_target), data=ocp.args.JsonRestore()))
                    break
                except Exception as e:  # a torn or corrupted checkpoint: fall back to the one before
                    failures.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
                    logger.warning("checkpoint at step %d in %s is unreadable (%s); trying the previous one.",
                                   step, self.manager.directory, failures[-1][1])
            else:
                restored = None
        if restored is not None:
            for bad_step, _ in failures:  # so this run's own saves at those steps are not refused
                self.manager.delete(bad_step)
            self.params, self.opt_state, self.step = self._join(restored), restored["opt_state"], step
            self.publish()
            logger.info("resumed from step %d", step)
            return dict(restored["data"])
        if failures:  # nothing restores: a different model or optimizer, not a torn file
            raise ValueError(f"none of the checkpoints in {self.manager.directory} (steps "
                             f"{[s for s, _ in failures]}) can be restored into this run's model and optimizer; the "
                             f"newest failed with {failures[0][1]}. Resume with the settings of that run, or start a "
                             f"new --output_dir.")
        return None

    # ------------------------------------------------------------------ loop

    def evaluate(self, batches: Iterator[dict]) -> dict[str, float]:
        """Mean loss per unit over `batches` (host rows `[batch, seq]`), as `eval_loss`, with
        perplexity for per-token losses and the loss's extra metrics as `eval_<name>` means."""
        total, count, extras = 0.0, 0.0, {}
        with jax.set_mesh(self.mesh):
            for rows in batches:
                batch = {k: v[0] for k, v in global_batch(self.mesh, rows, 1).items()}
                loss_sum, batch_count, batch_extras = jax.device_get(self._eval(self.params, self.frozen, batch))
                total, count = total + float(loss_sum), count + float(batch_count)
                for name, value in batch_extras.items():
                    extras[name] = extras.get(name, 0.0) + float(value)
        loss = total / max(count, 1.0)
        out = {"eval_loss": loss}
        if self.loss.perplexity:
            out["eval_perplexity"] = math.exp(min(loss, 50.0))
        out.update({f"eval_{name}": value / max(count, 1.0) for name, value in extras.items()})
        return out

    def learning_rate(self) -> float:
        """The learning rate of the last step taken."""
        return float(self.schedule(max(self.step - 1, 0)))

    def train_step(self, batch: dict) -> dict:
        """One optimizer step on a global batch (see `global_batch`); returns the step's metrics
        (device arrays). Call inside `jax.set_mesh(self.mesh)`."""
        self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, self.frozen, batch,
                                                          np.int32(self.step))
        self.step += 1
        return metrics

    def publish(self) -> None:
        """Hand the trained weights back to the model handle (for generation and export), and the
        heads' to the recipe's `Heads`."""
        model_params, heads = self._split(self.params)
        if self.adapter is not None:
            self.adapter.params = model_params
        else:
            self.model.params = model_params
        if heads is not None:
            self.heads.params = heads
