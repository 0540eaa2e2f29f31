"""The one training loop. An algorithm supplies a loss over `(model_config, params, batch)` that
returns `(sum of per-unit losses, number of units)` (units: trained tokens for SFT, preference
pairs for DPO), optionally with a dict of further per-unit sums to log as means (`rewards/chosen`,
`accuracy`, ...); this module owns everything else: the sharded train state, the jitted step
(gradient accumulation, clipping, AdamW, donation), evaluation, logging, orbax checkpoints and
exact resume.

A loss that compares against a reference policy (DPO) is built with `Trainer(..., reference=True)`
and called as `loss_fn(model_config, params, batch, reference_params)`. The reference is the
frozen input of the jitted step: with an adapter it is the base model itself (adapters off, no
copy); without one it is a copy of the initial parameters, sharded like them, without optimizer
state.

Checkpoint layout: `<output_dir>/checkpoints/<step>/` with orbax items `params`, `opt_state`,
`data` (the data iterator's position) and `model` (config, HF config, generation config), so any
step loads with `easytune.load` and exports with `easytune.export_hf`.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from easytune import adapters, checkpoint, sharding

logger = logging.getLogger("easytune")

LossFn = Callable[..., tuple]  # -> (loss_sum, count) or (loss_sum, count, {name: per-unit sum})
# Batches are [grad_accum_steps, micro_batch, seq]: micro-batch rows over the data-parallel axes.
BATCH_SPEC = P(None, ("dp", "fsdp"), None)


# ----------------------------------------------------------------------------- optimizer

def make_schedule(opt, total_steps: int) -> optax.Schedule:
    """Warmup (steps or ratio of total) to `opt.lr`, then cosine, linear or constant to lr * min_lr_ratio."""
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
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


DECAYED = ("kernel", "embedding", "lora_a", "lora_b", "w_ih", "w_hh")


def _decay_mask(params):
    """Weight decay on matrices only (not norms, biases, DoRA magnitudes)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(name in sharding.path_name(path) for name in DECAYED), params)


def make_optimizer(opt, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(opt, total_steps)
    parts = []
    if opt.clip_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(opt.clip_grad_norm))
    parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                             mask=_decay_mask))
    return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------- the step

def split_loss_output(output) -> tuple[jax.Array, jax.Array, dict]:
    """`(loss_sum, count, extra sums)` from a loss's `(loss_sum, count[, extra])`."""
    if len(output) == 3:
        return output[0], output[1], dict(output[2])
    loss_sum, count = output
    return loss_sum, count, {}


def build_train_step(model_config, loss_fn: LossFn, optimizer, reduction: str, grad_accum_steps: int,
                     combine=None, seed: int = 0, reference: bool = False, count_name: str = "trained_tokens"):
    """`step(params, opt_state, frozen, batch, step_index) -> (params, opt_state, metrics)`; batch
    leaves are `[grad_accum_steps, micro_batch, ...]`.

    `params` are what is trained (all weights, or an adapter's); `combine(frozen, params, rng)`
    builds the model's parameter tree from them (default: `params` itself). rng is
    `fold_in(key(seed), step_index)` per micro-batch, for adapter dropout. With `reference`, the
    loss also gets `frozen` (the reference policy's parameters) as a fourth argument.

    The loss's extra sums (if any) are logged as means per unit: `sum / count` over the global
    batch, whatever the reduction. metrics[count_name] is the number of units.

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
            output = (loss_fn(model_config, model_params, micro_batch, frozen) if reference
                      else loss_fn(model_config, model_params, micro_batch))
            loss_sum, count, extras = split_loss_output(output)
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
        metrics = {"loss": loss_sum / denominator, "grad_norm": optax.tree.norm(grads), count_name: count,
                   **{name: value / jnp.maximum(count, 1.0) for name, value in extras.items()}}
        return params, opt_state, metrics

    return step


# ----------------------------------------------------------------------------- batches

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


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_manager(directory: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep if keep > 0 else None, create=True,
                                           enable_async_checkpointing=False)
    array_items = {name: checkpoint.bounded_handler() for name in ("params", "opt_state")}
    json_items = {name: ocp.JsonCheckpointHandler() for name in ("data", "model")}
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_handlers={**array_items, **json_items})


class Trainer:
    """Runs `loss_fn` over batches from `train_batches` with everything a run needs.

    cfg: the entry point's ConfigDict (optimizer.*, total_steps, batch_size, grad_accum_steps,
    loss_reduction, save_steps, keep_checkpoints, eval_steps, log_steps, output_dir, resume).
    """

    def __init__(self, cfg, model, loss_fn: LossFn, total_steps: int, metrics_logger=None, *,
                 reference: bool = False, count_name: str = "trained_tokens"):
        """reference: the loss takes the reference policy (see the module doc). count_name: what
        the loss's count is called in the metrics (`trained_tokens`, `pairs`); eval perplexity is
        reported only for per-token losses (`trained_tokens`)."""
        self.cfg, self.model, self.loss_fn = cfg, model, loss_fn
        self.reference, self.count_name = reference, count_name
        self.mesh, self.model_config = model.mesh, model.config
        self.total_steps = total_steps
        if cfg.batch_size % cfg.grad_accum_steps:
            raise ValueError(f"--batch_size ({cfg.batch_size}) must be a multiple of --grad_accum_steps "
                             f"({cfg.grad_accum_steps}).")
        micro = cfg.batch_size // cfg.grad_accum_steps
        data_parallel = sharding.data_parallel_size(self.mesh)
        if micro % data_parallel:
            raise ValueError(f"the micro-batch ({cfg.batch_size} / {cfg.grad_accum_steps} accumulation steps = "
                             f"{micro}) must divide over dp x fsdp = {data_parallel} devices; change "
                             f"--batch_size, --grad_accum_steps or --mesh_dim.")
        self.optimizer, self.schedule = make_optimizer(cfg.optimizer, total_steps)
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
        if reference and self.adapter is None:
            # the reference policy: a copy of the initial weights (training donates and replaces
            # the originals), in the same shards, never updated and without optimizer state
            with jax.set_mesh(self.mesh):
                self.frozen = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=self.param_shardings)(
                    self.params)
        frozen_shardings = None if self.frozen is None else sharding.tree_shardings(self.frozen, rules, self.mesh)
        opt_shapes = jax.eval_shape(self.optimizer.init, self.params)
        self.opt_shardings = sharding.tree_shardings(opt_shapes, rules, self.mesh)
        with jax.set_mesh(self.mesh):
            self.opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(self.params)
        step = build_train_step(self.model_config, loss_fn, self.optimizer, cfg.loss_reduction, cfg.grad_accum_steps,
                                combine, seed=cfg.seed, reference=reference, count_name=count_name)
        batch_sharding = NamedSharding(self.mesh, BATCH_SPEC)
        self._step = jax.jit(step, in_shardings=(self.param_shardings, self.opt_shardings, frozen_shardings,
                                                 batch_sharding, None),
                             out_shardings=(self.param_shardings, self.opt_shardings, None),
                             donate_argnums=(0, 1))
        combine = combine or (lambda frozen, params, rng: params)

        def evaluate(params, frozen, batch):
            model_params = combine(frozen, params, None)
            output = (loss_fn(self.model_config, model_params, batch, frozen) if reference
                      else loss_fn(self.model_config, model_params, batch))
            return split_loss_output(output)

        self._eval = jax.jit(evaluate)
        self.step = 0
        self.metrics_logger = metrics_logger
        self.manager = checkpoint_manager(os.path.join(cfg.output_dir, "checkpoints"), cfg.keep_checkpoints)
        if not cfg.resume and self.manager.all_steps():
            raise ValueError(f"{self.manager.directory} already holds checkpoints (steps "
                             f"{list(self.manager.all_steps())}); pass --resume to continue that run, or choose a "
                             f"new --output_dir.")

    def state_bytes(self) -> dict[str, int]:
        """Bytes of the live train state (global array sizes): trained `params`, `optimizer` state,
        and `frozen` inputs (an adapter's base model, or a reference copy)."""
        def nbytes(tree):
            return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))
        return {"params": nbytes(self.params), "optimizer": nbytes(self.opt_state), "frozen": nbytes(self.frozen)}

    # ------------------------------------------------------------------ checkpoints

    def save(self, data_state: dict) -> None:
        meta = checkpoint.model_meta(self.model_config, self.model.hf_config, self.model.generation_config)
        if self.adapter is not None:  # the checkpoint's params are the adapter's; the base is referenced
            meta["adapter"] = self.adapter.config.to_dict()
            meta["base_model"] = os.path.abspath(self.model.source) if self.model.source else None
        saved = self.manager.save(self.step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(self.params),
            opt_state=ocp.args.StandardSave(self.opt_state),
            data=ocp.args.JsonSave(data_state),
            model=ocp.args.JsonSave(meta),
        ))
        self.manager.wait_until_finished()
        if not saved and self.step not in self.manager.all_steps():
            raise RuntimeError(f"orbax declined to save step {self.step} in {self.manager.directory} "
                               f"(it holds {list(self.manager.all_steps())}).")

    def restore_latest(self) -> dict | None:
        """Restore the newest readable checkpoint; a corrupt one is skipped with a warning.
        Returns the data iterator state, or None when there is nothing to resume."""
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(checkpoint.abstract_target(self.params, self.param_shardings)),
                    opt_state=ocp.args.StandardRestore(checkpoint.abstract_target(self.opt_state, self.opt_shardings)),
                    data=ocp.args.JsonRestore(),
                ))
            except Exception as e:  # a torn or corrupted checkpoint: fall back to the one before
                failures.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
                logger.warning("checkpoint at step %d in %s is unreadable (%s); trying the previous one.",
                               step, self.manager.directory, failures[-1][1])
                continue
            for bad_step, _ in failures:  # so this run's own saves at those steps are not refused
                self.manager.delete(bad_step)
            self.params, self.opt_state, self.step = restored["params"], restored["opt_state"], step
            self._publish()
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
        if self.count_name == "trained_tokens":
            out["eval_perplexity"] = math.exp(min(loss, 50.0))
        out.update({f"eval_{name}": value / max(count, 1.0) for name, value in extras.items()})
        return out

    def train_step(self, batch: dict) -> dict:
        """One optimizer step on a global batch (see `global_batch`); returns the step's metrics
        (device arrays). Call inside `jax.set_mesh(self.mesh)`."""
        self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, self.frozen, batch,
                                                          np.int32(self.step))
        self.step += 1
        return metrics

    def train(self, train_batches, eval_batches: Callable[[], Iterator[dict]] | None = None,
              progress=None, flops_per_token: float | None = None, peak_flops: float | None = None) -> list[dict]:
        """Run until `total_steps`. `train_batches` yields host rows `[batch_size, seq]` and has
        `state()` (saved with each checkpoint). Returns the logged metrics."""
        cfg = self.cfg
        history = []
        window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
        with jax.set_mesh(self.mesh):
            while self.step < self.total_steps:
                rows = next(train_batches)
                batch = global_batch(self.mesh, rows, cfg.grad_accum_steps)
                step_start = time.perf_counter()
                metrics = self.train_step(batch)
                window_steps += 1
                window_tokens += count_tokens(rows)
                log_now = self.step % cfg.log_steps == 0 or self.step == self.total_steps
                eval_now = (eval_batches is not None and cfg.eval_steps > 0 and self.step % cfg.eval_steps == 0)
                if log_now or eval_now:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    elapsed = time.perf_counter() - window_start
                    record = {"step": self.step, **metrics,
                              "learning_rate": float(self.schedule(self.step - 1)),
                              "tokens_per_second": window_tokens / elapsed,
                              "step_seconds": elapsed / window_steps}
                    if self.step == 1:
                        record["first_step_seconds"] = time.perf_counter() - step_start
                    if flops_per_token and peak_flops:
                        record["mfu"] = record["tokens_per_second"] * flops_per_token / (peak_flops * jax.device_count())
                    if eval_now:
                        record.update(self.evaluate(eval_batches()))
                    history.append(record)
                    if self.metrics_logger is not None:
                        self.metrics_logger.log(self.step, {k: v for k, v in record.items() if k != "step"})
                    if progress is not None:
                        progress.update(self.step, record)
                    window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
                if cfg.save_steps > 0 and (self.step % cfg.save_steps == 0 or self.step == self.total_steps):
                    self.save(train_batches.state())
                    # checkpoint time is not training throughput
                    window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
        self._publish()
        return history

    def _publish(self) -> None:
        """Hand the trained weights back to the model handle (for generation and export)."""
        if self.adapter is not None:
            self.adapter.params = self.params
        else:
            self.model.params = self.params


def count_tokens(rows: dict[str, np.ndarray]) -> int:
    """Real (non-padding) tokens in host rows: every `segment_ids` array (SFT's, or a preference
    pair's `chosen_segment_ids` and `rejected_segment_ids`)."""
    return sum(int((v > 0).sum()) for k, v in rows.items() if k == "segment_ids" or k.endswith("_segment_ids"))


def eval_batches(rows: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """All eval rows in order, `batch_size` at a time; the last batch is padded with rows whose
    loss_mask is 0 (so every device gets a full batch and padding adds nothing). Rows: any dict of
    `[num_rows, k]` arrays (SFT's, or preference pairs')."""
    num_rows = len(next(iter(rows.values())))
    for start in range(0, num_rows, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in rows.items()}
        missing = batch_size - len(next(iter(batch.values())))
        if missing:
            batch = {k: np.concatenate([v, np.zeros((missing, v.shape[1]), v.dtype)]) for k, v in batch.items()}
        yield batch
