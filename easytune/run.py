"""The one run driver: every trainer (SFT, DPO family, reward models, PPO/GRPO/RLOO) is a recipe
run by `run(recipe, cfg)`, which owns the skeleton they share:

    start        jax.distributed, the output directory
    model        easytune.load with the shared flags; the recipe checks it; the chat template
                 (--chat_template) adopted; the adapter (--peft ...) attached
    job          recipe.setup(...): the recipe's data, Trainer(s) and figures, as a `Job`
    run files    tokenizer and resolved config beside the checkpoints
    resume       the newest readable checkpoint and the data position (--resume)
    loop         `steps.advance()` to total_steps under a progress bar, with the log, eval,
                 held-out and save cadence; throughput and MFU
    finish       final checkpoint and eval, held-out accuracy, the recipe's report, exports,
                 summary.json

A recipe (`easytune.recipe.Recipe`) declares its flags and turns data into a `Job`. A dataset
job's rows and loss become a Trainer over a batch iterator (`BatchSteps`: one optimizer step per
advance); an RL job brings its own step source (`easytune.rl.RLSteps`: rollout, record,
advantages and updates per advance), so RL has the same cadence, resume and logging code as SFT.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import sys
import time
from typing import Callable

from absl import flags

from easytune import run_dir, run_record, storage
from easytune.preemption import EXIT_STATUS as PREEMPTED_EXIT_STATUS
from easytune.preemption import Preempted, PreemptionWatch
from easytune.recipe import METHOD_FAMILIES, Context, Job, Recipe, method_family
from easytune.storage_errors import StorageFull

logger = logging.getLogger("easytune")
# absl attributes flags this module declares key to the module that calls it: the entry point
# (`python -m easytune.train_sft`), so that its --help lists every flag of its recipe
flags.disclaim_key_flags()


# ----------------------------------------------------------------------------- step sources

class BatchSteps:
    """A Trainer's optimizer steps over `batches` (host rows; `state()`/`restore()` give the
    data position saved with every checkpoint), each batch first through `resample` if given
    (`Job.resample`)."""

    def __init__(self, trainer, batches, resample=None):
        self.trainer, self.batches, self.resample = trainer, batches, resample

    @property
    def step(self) -> int:
        return self.trainer.step

    def advance(self) -> tuple[dict, int]:
        import jax

        from easytune import train
        rows = next(self.batches)
        extra = {}
        if self.resample is not None:
            self.trainer.publish()  # the weights the new rows are sampled from
            rows, extra = self.resample(rows, self.trainer.step)
        with jax.set_mesh(self.trainer.mesh):
            batch = train.global_batch(self.trainer.mesh, rows, self.trainer.config.grad_accum_steps)
            return {**self.trainer.train_step(batch), **extra}, train.count_tokens(rows)

    def learning_rate(self) -> float:
        return self.trainer.learning_rate()

    def save(self) -> None:
        self.trainer.save(self.batches.state())

    def restore(self) -> bool:
        state = self.trainer.restore_latest()
        if state is not None:
            self.batches.restore(state)
        return state is not None

    def save_best(self, metric: str, value: float, mode: str) -> None:
        self.trainer.save_best(metric, value, mode)

    def publish(self) -> None:
        self.trainer.publish()


# ----------------------------------------------------------------------------- pieces

class Diverged(RuntimeError):
    """A non-finite loss or gradient norm: the run stops without saving or exporting that state."""


def start(recipe: Recipe, cfg) -> tuple[bool, run_dir.RunLock]:
    """Initialize jax.distributed from `--jax_distributed.*`, check the recipe's flags, check that
    the output directory may be written (`run_dir.check_start`, after the recipe has completed
    its flags, so a resume compares what the saved run used) and take its lock (process 0);
    returns whether this is process 0 and the lock."""
    from easytune import distributed
    dist = cfg.jax_distributed
    distributed.initialize(dist.coordinator_address or None, dist.num_processes or None,
                           dist.process_id if dist.process_id >= 0 else None)
    import jax
    is_main = jax.process_index() == 0
    if cfg.log_steps < 1:
        raise ValueError(f"--log_steps must be >= 1, got {cfg.log_steps}.")
    complete(recipe, cfg)
    check_hub_push(cfg)
    recipe.check_data(cfg)  # before the model loads, and before anything is written
    storage.check_writable(cfg.output_dir)  # a URL: reachable, with credentials that may write there
    run_dir.check_start(cfg)
    os.makedirs(storage.run_files(cfg.output_dir), exist_ok=True)
    lock = run_dir.RunLock(storage.run_files(cfg.output_dir), enabled=is_main)
    lock.acquire()
    if is_main and storage.is_remote(cfg.output_dir):  # the local mirror holds exactly the bucket's run files
        storage.clear_mirror(cfg.output_dir, keep=(run_dir.LOCK_FILE,))
        if cfg.resume:
            storage.fetch_run_files(cfg.output_dir)  # metrics, TensorBoard, W&B id so far
    return is_main, lock


def complete(recipe: Recipe, cfg) -> None:
    """Check the recipe's flags and fill in what they leave to it (e.g. RL's default --reward_fn;
    --optimizer.lr=0: the recipe's learning rate for the method the flags train), so the run's
    saved config and a resume's comparison hold the values used."""
    recipe.validate(cfg)
    if cfg.optimizer.lr == 0:
        cfg.optimizer.lr = recipe.learning_rate(cfg)
        logger.info("--optimizer.lr=%g (%s's default for %s)", cfg.optimizer.lr, recipe.name,
                    METHOD_FAMILIES[method_family(cfg)])


def check_finite(record: dict, step: int, last_finite: int, cfg) -> None:
    """Raise `Diverged` when a step's loss or gradient norm is not finite, unless
    --skip_nonfinite_steps=N skipped that step's update (at most N in a row: the weights are intact)."""
    bad = [(name, value) for name, value in record.items()
           if (name == "loss" or name.endswith(("/loss", "grad_norm"))) and not math.isfinite(value)]
    if not bad:
        return
    limit = cfg.get("skip_nonfinite_steps", 0)
    streaks = [value for name, value in record.items() if name.endswith("nonfinite_streak")]
    if limit > 0 and streaks and all(0 < value <= limit for value in streaks):
        logger.warning("step %d: %s is %s; its update was skipped (%d in a row, --skip_nonfinite_steps=%d)",
                       step, bad[0][0], bad[0][1], max(streaks), limit)
        return
    name, value = bad[0]
    skipping = (f"more than --skip_nonfinite_steps={limit} steps in a row were not finite; " if limit > 0 else
                "")
    raise Diverged(f"training diverged: {name} is {value} at step {step} (finite at step {last_finite}); {skipping}"
                   f"nothing from the diverged state was saved or exported. Lower --optimizer.lr (now "
                   f"{cfg.optimizer.lr:g}), warm up longer (--optimizer.warmup_steps), keep "
                   f"--optimizer.clip_grad_norm on, compute in float32 (--dtype), or ride out rare bad batches with "
                   f"--skip_nonfinite_steps=N.")


def strict_json(value):
    """`value` with non-finite floats as None (JSON has no NaN; strict parsers reject it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def load_model(cfg, head_chunk_size: int | None = None, **options):
    """`easytune.load` of `--model` with the shared compute flags."""
    import easytune
    chunk = cfg.get("head_chunk_size", 0) if head_chunk_size is None else head_chunk_size
    return easytune.load(cfg.model, dtype=cfg.dtype, param_dtype=cfg.param_dtype, mesh_dim=cfg.mesh_dim,
                         remat=cfg.remat, attention=cfg.attention, head_chunk_size=chunk,
                         layer_loop=training_layer_loop(cfg), **options)


def training_layer_loop(cfg) -> str:
    """`--layer_loop`, with `auto` a scan when only an adapter trains (`--peft`, `--peft_adapter`).

    Unrolling pays on CPU by sparing the scan's stacked per-layer weight-gradient buffers
    (`common.scan_layers`); an adapter run has none of those to spare. SmolLM2-135M LoRA, batch
    4 x 96, on the 2-core AVX2 CPU: 2.80 s/step scanned, 2.83 s/step unrolled, and the unrolled
    step compiles 35 s longer (4 steps: 25 s against 57 s in all)."""
    adapter_only = cfg.get("peft", "none") != "none" or bool(cfg.get("peft_adapter", ""))
    return "scan" if cfg.layer_loop == "auto" and adapter_only else cfg.layer_loop


def attach_adapter(model, cfg, seed: int = 0):
    """Attach the adapter the flags ask for (`--peft`, `--lora.*`, `--prompt.*`, `--peft_adapter`);
    returns it, or None for full fine-tuning."""
    import dataclasses as dc

    import jax
    import numpy as np

    from easytune import adapters
    if cfg.peft_adapter:
        if cfg.peft != "none":
            adapters.AdapterConfig(method=cfg.peft)  # an unknown method gets its clear error
        adapter = model.load_adapter(cfg.peft_adapter)
        family = {"qlora": "lora", "dora": "lora"}
        if cfg.peft != "none" and family.get(cfg.peft, cfg.peft) != family.get(adapter.config.method,
                                                                                  adapter.config.method):
            raise ValueError(f"--peft={cfg.peft} but --peft_adapter {cfg.peft_adapter} holds a "
                             f"{adapter.config.method} adapter; drop --peft or make them agree.")
        if cfg.peft == "qlora":  # continue a LoRA adapter on an NF4 base
            model.params = adapters.quantize_base(model.params, model.config, model.mesh)
            adapter.config = dc.replace(adapter.config, method="qlora")
        return adapter
    if cfg.peft == "none":
        return None
    if cfg.peft in adapters.LORA_METHODS:
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


def total_steps(cfg, batches) -> int:
    """`--total_steps`, or `--num_epochs` over the batches."""
    if not cfg.total_steps and batches.steps_per_epoch is None:
        raise ValueError("streamed data needs --total_steps: its length, and so an epoch's steps, is not known ahead.")
    steps = cfg.total_steps or cfg.num_epochs * batches.steps_per_epoch
    if steps < 1:
        raise ValueError(f"nothing to do: total_steps={steps} (from --total_steps or --num_epochs) must be >= 1.")
    return steps


def export(cfg, model, summary: dict, default_job: bool, recipe_name: str = "") -> tuple[str, str] | None:
    """The exports the run asks for (--export_hf, --export_peft); the default job also writes
    <output_dir>/hf (adapters merged, unless a prompt-learning adapter, which cannot be) and, with
    an adapter, <output_dir>/peft. The HF export gets a model card (README.md); the peft adapter
    names the base model as the user gave it (`base_model_name_or_path`), so it loads elsewhere.
    With --push_to_hub (on process 0): returns `(local folder, export path)` to push."""
    adapter = model.adapter
    mergeable = adapter is None or adapter.config.is_lora
    push = cfg.get("push_to_hub")
    hf_dir = cfg.export_hf or (os.path.join(cfg.output_dir, "hf") if (default_job or push) and mergeable else None)
    peft_dir = cfg.get("export_peft") or (os.path.join(cfg.output_dir, "peft")
                                          if (default_job or (push and not mergeable)) and adapter else None)
    import jax
    main = jax.process_index() == 0
    pushed = None
    if hf_dir:
        with storage.writable_dir(hf_dir, upload_from_this_process=main) as local:  # a URL: uploaded after
            model.save_pretrained(local)
            summary["export_hf"] = hf_dir
            if main:
                with open(os.path.join(local, "README.md"), "w") as f:
                    f.write(run_record.model_card(recipe_name, cfg, summary))
            pushed = local
    if peft_dir:
        model.save_peft(peft_dir, base_model=run_record.base_model_name(cfg))
        summary["export_peft"] = peft_dir
        if push and main and pushed is None:
            pushed = storage.local_copy(peft_dir)  # the export just written (uploaded, for a URL)
    return (pushed, hf_dir or peft_dir) if push and main else None


def check_hub_push(cfg) -> None:
    """--push_to_hub needs a Hugging Face token (HF_TOKEN, or `hf auth login`): checked before the
    model loads, so a missing login does not cost a training run."""
    repo = cfg.get("push_to_hub")
    if not repo:
        return
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"--push_to_hub={repo} must name a Hub repository as owner/name.")
    from huggingface_hub import get_token
    if not get_token():
        raise ValueError(f"--push_to_hub={repo} needs a Hugging Face token with write access: set HF_TOKEN or run "
                         f"`hf auth login` first.")


class HubPushFailed(RuntimeError):
    """The upload to the Hub failed after the run and its export completed (a user's error to fix)."""


def push_to_hub(repo: str, folder: str, export: str) -> str:
    """Upload the export `folder` to the Hub model repository `repo` (created if missing, private
    only if the user makes it so); returns the repository's URL. A failed upload is one sentence
    that says the export is intact and how to push it later."""
    from huggingface_hub import HfApi
    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=folder, repo_type="model",
                                   commit_message="Upload model trained with easytune")
    except Exception as e:  # noqa: BLE001 (network, permissions, the Hub's own errors)
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise HubPushFailed(f"pushing {export} to the Hub repository {repo} failed ({type(e).__name__}: {reason}); "
                           f"the export is intact: push it later with `hf upload {repo} {folder}`.") from None
    return getattr(commit, "repo_url", None) or f"https://huggingface.co/{repo}"


# ----------------------------------------------------------------------------- the run

def _host_floats(metrics: dict) -> dict:
    import jax
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def loop(job: Job, steps, total: int, cfg, evaluate, metrics_logger, on_heldout: Callable[[int], dict],
         on_figures: Callable[[int, dict], None], preemption=None) -> list[dict]:
    """Advance `steps` to `total`: log every --log_steps (and at the end), evaluate
    every --eval_steps, held-out accuracy every `job.heldout_every` (not at the end: the run's
    final figure is taken after), checkpoint every --save_steps (and at the end). Returns the
    logged records. When `preemption` (`preemption.PreemptionWatch`) reports a preemption at a step
    boundary, the step is checkpointed and `Preempted` raised."""
    import jax

    from easytune import logging_utils
    peak_flops = logging_utils.job_peak_flops(cfg) if job.flops_per_token else None
    progress = logging_utils.ProgressBar(total, initial=steps.step)
    history = []
    last_finite = steps.step
    window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
    try:
        while steps.step < total:
            step_start = time.perf_counter()
            metrics, tokens = steps.advance()
            step = steps.step
            window_steps += 1
            window_tokens += tokens or 0
            log_now = step % cfg.log_steps == 0 or step == total
            eval_now = evaluate is not None and cfg.get("eval_steps", 0) > 0 and step % cfg.eval_steps == 0
            heldout_now = job.heldout is not None and job.heldout_every > 0 and step % job.heldout_every == 0 \
                and step < total
            preempted = preemption is not None and step < total and preemption.reached(step)
            save_now = preempted or cfg.save_steps > 0 and (step % cfg.save_steps == 0 or step == total)
            if save_now and not (log_now or eval_now or heldout_now):  # never save a diverged state
                check_finite(_host_floats(metrics), step, last_finite, cfg)
                last_finite = step
            if log_now or eval_now or heldout_now:
                record = {"step": step, **_host_floats(metrics)}  # waits for the step: then the clock
                elapsed = time.perf_counter() - window_start
                check_finite(record, step, last_finite, cfg)
                last_finite = step
                learning_rate = steps.learning_rate()
                if learning_rate is not None:
                    record["learning_rate"] = learning_rate
                if tokens is not None:
                    record["tokens_per_second"] = window_tokens / elapsed
                record["step_seconds"] = elapsed / window_steps
                if step == 1:
                    record["first_step_seconds"] = time.perf_counter() - step_start
                if tokens is not None and job.flops_per_token and peak_flops:
                    record["mfu"] = record["tokens_per_second"] * job.flops_per_token / peak_flops
                if eval_now:
                    record.update(evaluate())
                if heldout_now:
                    record.update(on_heldout(step))
                if job.derive is not None:
                    record = job.derive(record)
                if eval_now or heldout_now:
                    on_figures(step, record)
                history.append(record)
                metrics_logger.log(step, {k: v for k, v in record.items() if k != "step"})
                progress.update(step, {**record, "loss": record.get(job.progress)})
                window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
            if save_now:
                steps.save()
                if jax.process_index() == 0 and storage.is_remote(cfg.output_dir):
                    metrics_logger.flush()
                    try:  # metrics and TensorBoard beside the checkpoint; what fails goes at the next save
                        storage.sync_run_files(cfg.output_dir)
                    except Exception as error:  # noqa: BLE001 (a transient store error must not stop training)
                        logger.warning("uploading the run's files to %s failed (%s); retrying at the next save.",
                                       cfg.output_dir, error)
                window_start, window_tokens, window_steps = time.perf_counter(), 0, 0  # not training throughput
            if preempted:  # its checkpoint just saved
                from easytune import train
                train.wait_for_saves()  # written, not only started, before the process ends
                raise Preempted(f"stopped by a preemption signal (SIGTERM) after step {step} of {total}; its "
                                f"checkpoint is saved in {os.path.join(cfg.output_dir, 'checkpoints')}: run the same "
                                f"command with --resume to continue.")
    finally:  # an error's sentence then starts on a line of its own
        progress.close()
    return history


def dataset_steps(job: Job, cfg):
    """`(steps, total_steps, evaluate, trainer)` of a dataset job: a Trainer over its rows,
    `--batch_size` at a time, and its eval on `job.eval_rows` in micro-batches (eval logits must fit
    wherever training's do)."""
    from easytune import data, train
    if hasattr(job.rows, "batches"):  # a stream (`data.StreamingRows`): batches built as training goes
        batches = job.rows.batches(cfg.batch_size, seed=cfg.seed)
    else:
        batches = data.BatchIterator(job.rows, cfg.batch_size, seed=cfg.seed)
    total = total_steps(cfg, batches)
    trainer = train.Trainer(train.TrainConfig.from_flags(cfg), job.model, job.loss, total,
                            reference=job.reference, heads=job.heads)
    evaluate = None
    if job.eval_rows is not None:
        micro_batch = cfg.batch_size // max(cfg.grad_accum_steps, 1)
        evaluate = lambda: trainer.evaluate(data.eval_batches(job.eval_rows, micro_batch))  # noqa: E731
        if job.derive is not None:
            evaluate = lambda plain=evaluate: job.derive(plain())  # noqa: E731
    return BatchSteps(trainer, batches, job.resample), total, evaluate, trainer


def combine_evaluations(first, second, steps):
    """One `evaluate()` returning both evaluations' figures (either may be None); the weights are
    handed to the model handle first, which an evaluation on the handle reads."""
    def evaluate() -> dict:
        steps.publish()
        return {**(first() if first is not None else {}), **(second() if second is not None else {})}
    return evaluate


class best_keeper:
    """`keep(step, figures)`: with --keep_best=<figure>, offers the weights to the step source's
    best checkpoint whenever `figures` hold that figure at a better value than this process has
    seen (orbax keeps the best one offered, across resumes)."""

    def __init__(self, cfg, steps, evaluates: bool):
        self.metric, self.mode, self.steps = cfg.get("keep_best"), cfg.get("keep_best_mode", "max"), steps
        self.best: dict | None = None
        if self.metric:
            if self.mode not in ("max", "min"):
                raise ValueError(f"--keep_best_mode must be max or min, got {self.mode!r}.")
            if not evaluates:
                raise ValueError(f"--keep_best={self.metric} needs an evaluation that reports it: --eval_data, "
                                 f"--eval_tasks or the default job's held-out tasks.")

    def __call__(self, step: int, figures: dict) -> None:
        if not self.metric or self.metric not in figures:
            return
        value = float(figures[self.metric])
        better = self.best is None or (value > self.best["value"] if self.mode == "max" else value < self.best["value"])
        if better and math.isfinite(value):
            self.steps.save_best(self.metric, value, self.mode)
            self.best = {"metric": self.metric, "value": value, "step": step}
            logger.info("best %s so far: %.6g at step %d (kept in <output_dir>/best)", self.metric, value, step)


def run(recipe: Recipe, cfg) -> dict:
    """Run `recipe` as the flags `cfg` say; returns the summary (also <output_dir>/summary.json)."""
    started = time.time()
    is_main, lock = start(recipe, cfg)
    try:
        return _run(recipe, cfg, is_main, started)
    finally:
        try:
            _finish_background_saves()
        finally:
            lock.release()


def _finish_background_saves() -> None:
    """A run that stops on an error still completes the checkpoint being written (the error it
    stopped on is what is reported; a failure of that write too is logged)."""
    from easytune import train
    try:
        train.wait_for_saves()
    except Exception as error:  # noqa: BLE001
        logger.warning("the checkpoint being written when the run stopped failed too: %s", error)


def _run(recipe: Recipe, cfg, is_main: bool, started: float) -> dict:
    from easytune import adapters, data, logging_utils

    model = load_model(cfg)
    recipe.check_model(cfg, model)
    template = None
    if "chat_template" in cfg and not model.is_encoder_decoder:
        template = data.adopt_chat_template(model.tokenizer, cfg.chat_template)
    if "peft" in cfg:
        adapter = attach_adapter(model, cfg, seed=cfg.seed)
        if adapter is not None:
            if adapter.config.method not in recipe.adapters:
                raise ValueError(f"{recipe.name} trains all weights or {', '.join(recipe.adapters)} adapters; "
                                 f"{adapter.config.method} is not supported.")
            if not adapter.config.is_lora and cfg.export_hf:
                raise ValueError(f"--export_hf merges the adapter into the weights, which a {adapter.config.method} "
                                 f"adapter cannot be; use --export_peft.")
            info = adapters.summary(adapter.config, adapter.params, model.config)
            logger.info("peft %s: %d trainable parameters (%.3f%% of %d)", info["method"], info["trainable_params"],
                        100 * info["trainable_fraction"], info["base_params"])

    job = recipe.setup(Context(cfg, model, template, is_main))
    model = job.model
    summary = dict(job.summary)
    if job.steps is None:
        steps, total, evaluate, trainer = dataset_steps(job, cfg)
        summary["train_state_bytes"] = trainer.state_bytes()
    else:
        steps, total, evaluate = job.steps, job.total_steps, None
        if hasattr(steps, "state_bytes"):
            summary["train_state_bytes"] = steps.state_bytes()
    if cfg.get("eval_tasks"):  # lm-eval tasks on the trained model, beside the eval loss
        from easytune.eval.during_training import task_evaluator
        evaluate = combine_evaluations(evaluate, task_evaluator(model, cfg), steps)
    keep_best = best_keeper(cfg, steps, evaluate is not None or job.heldout is not None)
    summary["total_steps"] = total
    if cfg.resume:
        steps.restore()
    files = storage.run_files(cfg.output_dir)  # the run directory, or its local mirror for a URL
    if is_main:  # after a resume is known to work: a refused one leaves the run's files as they were
        model.tokenizer.save_pretrained(files)
        run_record.save_config(files, cfg)  # easytune_config.json: --config replays it
        storage.sync_run_files(cfg.output_dir)
    summary["run"] = run_record.record(cfg, model)
    logging_utils.truncate_metrics(files, steps.step)  # before the logger opens the file
    metrics_logger = logging_utils.MetricsLogger(files, cfg.logger, config=cfg.to_dict(), project=cfg.wandb.project,
                                                 entity=cfg.wandb.entity, run_name=cfg.wandb.name,
                                                 tags=cfg.wandb.tags, group=cfg.wandb.group)
    if model.adapter is not None:
        summary.update({"peft": model.adapter.config.method, "trainable_params": adapters.count(model.adapter.params)})

    heldout_curve = []

    def heldout(step: int, when: str) -> dict:
        steps.publish()
        figures = job.heldout()
        figures = dict(figures) if isinstance(figures, dict) else {"accuracy": figures}
        heldout_curve.append({"step": step, **figures})
        if is_main:
            extra = ", ".join(f"{k} {v:.3f}" for k, v in figures.items() if k != "accuracy")
            print(f"held-out {job.heldout_name} {when}: {figures['accuracy']:.3f}" + (f" ({extra})" if extra else ""))
        return figures

    def heldout_figures(figures: dict, suffix: str = "") -> dict:
        return {f"heldout_{'accuracy' if k == 'accuracy' else k}{suffix}": v for k, v in figures.items()}

    if steps.step == 0:  # a fresh run: its starting figures
        if job.heldout is not None and job.heldout_before:
            summary.update(heldout_figures(heldout(0, "before"), "_before"))
        if (job.eval_before or cfg.get("eval_tasks")) and evaluate is not None:
            before = {f"{name}_before": value for name, value in evaluate().items()}
            logger.info("before training: %s", before)
            summary.update(before)

    train_start = time.time()
    preemption = PreemptionWatch()
    try:
        history = loop(job, steps, total, cfg, evaluate, metrics_logger,
                       lambda step: heldout_figures(heldout(step, f"at step {step}")), keep_best, preemption)
    except Preempted:
        metrics_logger.close()
        raise
    finally:
        preemption.close()
    summary["train_seconds"] = time.time() - train_start
    if history and "loss" in history[0]:
        summary["first_loss"], summary["last_loss"] = history[0]["loss"], history[-1]["loss"]
    if cfg.save_steps == 0:
        steps.save()
    from easytune import train
    train.wait_for_saves()  # the last checkpoint is complete before the exports and the summary
    steps.publish()
    final = {}
    if evaluate is not None:
        evaluated_last = history and history[-1]["step"] == total and any(k.startswith("eval_") for k in history[-1])
        final = ({k: v for k, v in history[-1].items() if k.startswith("eval_")} if evaluated_last
                 else evaluate())
        summary.update(final)
    if job.heldout is not None:
        after = heldout(total, "after")
        summary.update(heldout_figures(after, "_after"))
        final.update(heldout_figures(after))
        summary["heldout_curve"] = heldout_curve
    keep_best(total, final)
    if cfg.keep_best:
        summary["best"] = keep_best.best
    if job.report is not None:
        summary.update(job.report(history, summary))
    to_push = export(cfg, model, summary, default_job=cfg.train_data is None, recipe_name=recipe.name)

    metrics_logger.close()
    summary["wall_seconds"] = time.time() - started
    if is_main:
        def write_summary():
            with open(os.path.join(files, "summary.json"), "w") as f:
                json.dump(strict_json(summary), f, indent=2, allow_nan=False)
            storage.sync_run_files(cfg.output_dir)

        write_summary()
        if to_push is not None:  # last: a failed upload leaves the run, its summary and its export complete
            summary["push_to_hub"] = push_to_hub(cfg.push_to_hub, *to_push)
            write_summary()
        print(json.dumps(summary, indent=2))
    return summary


def user_error_message(error: BaseException) -> str | None:
    """The one sentence for an error a user can cause and fix (flags, data, paths, permissions,
    a full disk, host memory, a diverged run); None for anything else (a bug: its traceback)."""
    if isinstance(error, OSError) and not isinstance(error, StorageFull) and error.errno in (errno.ENOSPC,
                                                                                          errno.EDQUOT):
        return (f"no space left on device writing {error.filename or 'a file'}; free space there or choose another "
                f"--output_dir (checkpoints already written are intact: rerun with --resume).")
    if isinstance(error, OSError) and error.errno == errno.EROFS:
        return f"{error.filename or 'the output'} is on a read-only filesystem; choose another --output_dir."
    if type(error).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and "RESOURCE_EXHAUSTED" in str(error) \
            and "memory" in str(error).lower():
        first = str(error).strip().splitlines()[0][:200]
        return (f"out of accelerator memory ({first}); lower --batch_size (raise --grad_accum_steps) or "
                f"--seq_length, shard more (--mesh_dim with a larger fsdp axis), use --remat, --head_chunk_size or "
                f"an adapter (--peft).")
    if isinstance(error, ImportError) and any(name in str(error) for name in ("gcsfs", "fsspec", "s3fs")):
        return (f"a cloud URL needs its filesystem package ({' '.join(str(error).split())}); for gs:// run "
                f"pip install 'easytune[gcs]'.")
    if isinstance(error, MemoryError):
        return (f"out of host memory{f' ({error})' if str(error) else ''}; lower --batch_size or --seq_length, "
                f"use --remat, --param_dtype=bfloat16 or an adapter (--peft), or a machine with more memory.")
    if isinstance(error, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                          StorageFull, Diverged, Preempted, HubPushFailed)):
        return " ".join(str(error).split()) or type(error).__name__
    return None


def entry_point(recipe: Recipe):
    """`(DEFAULTS, DOCS, run, main)` of a `python -m easytune.train_*` module: its flags are
    defined (absl) when this is called, `run(cfg)` runs the recipe, `main` is absl's (launch it
    with `launch(main)`). A user's error (flags, data, paths; a diverged run) ends the process with
    one sentence on stderr and exit status 2 (3 for divergence); a preempted run (SIGTERM: its
    checkpoint saved) exits with 143; --debug (or EASYTUNE_DEBUG=1) shows the traceback."""
    from absl import app

    from easytune import config as config_lib
    defaults, docs = recipe.flags()
    config_lib.define_flags(defaults, docs)
    flags.adopt_module_key_flags(config_lib)  # so that --help (not only --helpfull) lists them

    def run_recipe(cfg) -> dict:
        return run(recipe, cfg)

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; flags are --name=value.")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
        logging.getLogger("jax").setLevel(logging.WARNING)  # backend probing ("Unable to initialize backend 'tpu'")
        debug = flags.FLAGS["debug"].value or os.environ.get("EASYTUNE_DEBUG", "") not in ("", "0")
        try:
            run_recipe(config_lib.read_config(defaults))
        except Exception as error:
            message = user_error_message(error)
            if debug or message is None:
                raise
            if isinstance(error, Preempted):
                print(f"easytune: {message}", file=sys.stderr)
                sys.exit(PREEMPTED_EXIT_STATUS)
            print(f"easytune: error: {message}", file=sys.stderr)
            sys.exit(3 if isinstance(error, Diverged) else 2)

    return defaults, docs, run_recipe, main


def launch(main) -> None:
    """`absl.app.run(main)`, with --help (which absl ends with status 1) exiting 0."""
    from absl import app
    try:
        app.run(main)
    except SystemExit as exit_:
        asked_for_help = any(a in ("--help", "-h", "-?", "--helpfull", "--helpshort") for a in sys.argv[1:])
        if asked_for_help and exit_.code == 1:
            sys.exit(0)
        raise
