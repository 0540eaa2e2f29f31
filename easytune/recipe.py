"""What an algorithm declares to the run driver (`easytune.run`): its flags, its loss as a small
value, and what a run of it is (`Job`). Declarations only: an algorithm's file imports this
module, never the loop (`easytune.train`, `easytune.run`), so algorithms stay below the loop.

    class MyRecipe(Recipe):
        name = "KTO"
        flag_groups = ("data", "lm_head", "peft")     # shared flag groups (easytune.config)
        defaults = {"output_dir": "outputs/kto", "beta": 0.1}
        docs = {"beta": "..."}
        adapters = LORA_METHODS                       # adapters it can train
        def setup(self, ctx: Context) -> Job:         # data -> rows, the loss, the figures
            return Job(model=ctx.model, rows=..., loss=Loss(fn, unit="sequences"), ...)

A dataset recipe returns rows and a `Loss`; the driver builds the Trainer, the batches, the eval
and the cadence. A recipe whose steps are not batches of fixed rows (RL: each step generates its
data) returns its own `steps` (a `StepSource`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Mapping, Protocol

LossFn = Callable[..., tuple]  # -> (loss_sum, count) or (loss_sum, count, {name: per-unit sum})


@dataclasses.dataclass(frozen=True)
class Loss:
    """What an algorithm trains: `fn(model_config, params, batch[, reference_params])` ->
    `(loss_sum, count[, {name: per-unit sum}])`; `unit` names what `count` counts in the metrics
    (`trained_tokens`, `pairs`, `sequences`); `needs_reference`: `fn` also takes the reference
    policy's parameters; `perplexity`: eval reports exp(eval_loss) (a per-token cross-entropy)."""

    fn: LossFn
    unit: str = "trained_tokens"
    needs_reference: bool = False
    perplexity: bool = False

    def __call__(self, model_config, params, batch, reference=None):  # params: see `Heads` when a job has them
        if self.needs_reference:
            return self.fn(model_config, params, batch, reference)
        return self.fn(model_config, params, batch)


class StepSource(Protocol):
    """What the loop drives. `step`: steps done (optimizer steps, or RL iterations)."""

    step: int

    def advance(self) -> tuple[dict, int | None]:
        """One step: `(metrics, tokens)`, metrics as device or host scalars, tokens the real tokens
        it trained on (for tokens/s and MFU) or None."""

    def learning_rate(self) -> float | None:
        """The learning rate of the last step (None: not one optimizer)."""

    def save(self) -> None:
        """Checkpoint the step's state (weights, optimizer, data position)."""

    def restore(self) -> bool:
        """Restore the newest readable checkpoint; False when there is none."""

    def save_best(self, metric: str, value: float, mode: str) -> None:
        """Offer the current weights as the best checkpoint by `metric` (see `Trainer.save_best`)."""

    def publish(self) -> None:
        """Hand the trained weights to the model handle (generation, eval, export)."""


@dataclasses.dataclass
class Heads:
    """Parameters a recipe trains beside the model's (ILQL's value and Q heads), in one optimizer
    with them. With a job's `heads`, the loss's `params` is `{"model": the model's parameters,
    "heads": these}`; the checkpoint holds them as the item `heads` beside `params` (the model's),
    so every step still loads with `easytune.load` and exports as the plain model.

    params: the tree, placed on the model's mesh; the Trainer hands the trained values back here
    (`Trainer.publish`). frozen(path) -> bool: leaves (by their path in `params`, e.g.
    "target_q/0/out/kernel") the optimizer leaves alone: no update, no optimizer state (target
    copies). after_step(params, step_index) -> params: run inside the jitted step after each
    optimizer update (step_index counts from 0; e.g. ILQL's Polyak update of its targets).
    rules: sharding rules `(regex, PartitionSpec)` matched before the model's against paths
    "heads/<path>" (and the optimizer state's paths that end in them). lr: the heads' peak
    learning rate, on the optimizer's schedule and under its clipping (None: `--optimizer.lr`;
    e.g. PPO's shared value head at `--value_lr`, a fresh MLP beside an adapter's small updates)."""

    params: dict
    frozen: Callable[[str], bool] | None = None
    after_step: Callable | None = None
    rules: tuple = ()
    lr: float | None = None


@dataclasses.dataclass
class Job:
    """What a recipe hands the driver: a run of it.

    model: the handle trained and exported (the recipe may replace the loaded one, e.g. by a
    reward model). summary: figures known before training (data sizes, options).

    A dataset job gives `rows` (host arrays `[num_rows, ...]`, `--batch_size` at a time) and
    `loss`; `eval_rows` are evaluated every --eval_steps and at the end (`eval_*`), and also
    before training with `eval_before` (`eval_*_before`). A job that makes its own data gives
    `steps` and `total_steps` instead.

    heldout: exact-match accuracy of the model's answers on held-out tasks, before training,
    every `heldout_every` steps and after (`heldout_accuracy_before/after`, `heldout_curve`); or a
    dict of figures whose `accuracy` is the headline (`heldout_reward`: a reward function's mean
    on held-out prompts), the others logged beside it (`heldout_<name>_before/after`).
    heldout_before: False skips the figures before training (the caller knows the start model's).
    heldout_name: what the headline is, for the printed lines.
    report(history, summary): the recipe's figures at the end, from the logged records.
    flops_per_token: for MFU. progress: the metric the progress bar shows as its loss.
    derive(record) -> record: the figures logged from a step's or an eval's metrics, where a
    per-unit mean is not the figure (e.g. KTO's means over the desirable examples only); it must
    leave a record it already derived as it is.
    reference: the frozen parameters a `needs_reference` loss gets when they are another model's
    (a distillation teacher; sharded on the model's mesh), instead of the model's initial weights.
    heads: parameters trained beside the model's (`Heads`).
    resample(rows, step) -> (rows, metrics): replaces a step's host rows before it trains, after the
    trained weights are handed to the model handle (on-policy data: GKD's student samples); a
    function of (rows, step) only, so a resumed run sees the same data. Its metrics (host floats)
    join the step's."""

    model: object
    summary: dict = dataclasses.field(default_factory=dict)
    rows: dict | None = None
    loss: Loss | None = None
    eval_rows: dict | None = None
    eval_before: bool = False
    steps: StepSource | None = None
    total_steps: int = 0
    heldout: Callable[[], float | dict] | None = None
    heldout_every: int = 0
    heldout_before: bool = True
    heldout_name: str = "exact-match accuracy"
    report: Callable[[list, dict], dict] | None = None
    flops_per_token: float | None = None
    progress: str = "loss"
    derive: Callable[[dict], dict] | None = None
    reference: object = None
    heads: Heads | None = None
    resample: Callable[[dict, int], tuple[dict, dict]] | None = None


@dataclasses.dataclass
class Context:
    """What `Recipe.setup` gets: the flags, the loaded model (adapter attached), the training chat
    template (None for encoder-decoders), and whether this is process 0."""

    cfg: object
    model: object
    template: str | None
    is_main: bool

    def write_jsonl(self, name: str, records) -> None:
        """Records the run generated (pairs, prompts) into the output directory (process 0)."""
        if self.is_main:
            from easytune import storage
            # into the run's files (a URL's local mirror: uploaded with them)
            with open(os.path.join(storage.run_files(self.cfg.output_dir), name), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)


class Recipe:
    """One algorithm as the driver runs it. A subclass sets:

    name:            what it trains, for errors ("SFT", "preference optimization", ...)
    flag_groups:     the shared flag groups it takes (`easytune.config.FLAG_GROUPS`)
    defaults, docs:  its own flags, and its values for shared ones (e.g. optimizer.lr)
    adapters:        the adapter methods it can train (empty: all weights only)
    encoder_decoder: it also trains encoder-decoders (T5)
    score_head:      it may start from a model with a score head (a reward model)
    and implements `setup(ctx) -> Job`; it may override `validate(cfg)` (flag checks that run
    before the model loads) and `check_model(cfg, model)`."""

    name: str = ""
    flag_groups: tuple[str, ...] = ()
    defaults: Mapping = {}
    docs: Mapping = {}
    adapters: tuple[str, ...] = ()
    encoder_decoder: bool = False
    score_head: bool = False
    learning_rates: Mapping[str, float] = {"full": 1e-4, "lora": 1e-3, "prompt": 3e-2}
    data_flags: tuple[str, ...] = ("train_data", "eval_data")

    def flags(self) -> tuple[dict, dict]:
        """`(defaults, docs)` of every flag the recipe takes; --optimizer.lr's doc names the
        recipe's default per method."""
        from easytune import config
        defaults, docs = config.recipe_flags(self.flag_groups, self.defaults, self.docs)
        if defaults["optimizer"]["lr"] == 0:
            methods = [f"{METHOD_FAMILIES[family]} {lr:g}" for family, lr in self.learning_rates.items()
                       if family == "full" or family in map(family_of, self.adapters)]
            docs["optimizer.lr"] = f"{docs['optimizer.lr']}; 0 = the default for the method: {', '.join(methods)}"
        return defaults, docs

    def validate(self, cfg) -> None:
        """Flag checks that need no model."""

    def learning_rate(self, cfg) -> float:
        """The default --optimizer.lr for the method the flags train (`learning_rates`)."""
        return self.learning_rates[method_family(cfg)]

    def check_data(self, cfg) -> None:
        """Read the local data files named by `data_flags` and check each record
        (`check_record`) before the model loads, so a malformed or empty file is reported in
        seconds; the records are kept for the recipe's own read (`easytune.data.prefetch`)."""
        from easytune import data
        for name in self.data_flags:
            source = cfg.get(name)
            if not source:
                continue
            located = data.prefetch(source)
            if located is None:  # a dataset name: read (and checked) in setup
                continue
            if not located:
                raise ValueError(f"--{name}={source} holds no records; give a file with at least one.")
            for record, where in located:
                self.check_record(cfg, record, where)

    def check_record(self, cfg, record: dict, where: str) -> None:
        """Raise ValueError naming `where` if `record` cannot be used (no tokenizer needed)."""

    def check_model(self, cfg, model) -> None:
        if model.tokenizer is None:
            raise ValueError(f"{cfg.model} has no tokenizer; {self.name} needs one to read and format the data.")
        if model.is_encoder_decoder and not self.encoder_decoder:
            raise ValueError(f"{self.name} trains a decoder-only causal LM (LLaMA/Mistral/Qwen/Gemma); {cfg.model} "
                             f"is an encoder-decoder.")
        if getattr(model.config, "num_labels", 0) and not self.score_head:
            raise ValueError(f"{self.name} trains a causal LM; {cfg.model} is a reward model.")

    def setup(self, ctx: Context) -> Job:
        raise NotImplementedError


# The method families a recipe's `learning_rates` are keyed by, as users read them.
METHOD_FAMILIES = {"full": "all weights", "lora": "LoRA/QLoRA/DoRA", "prompt": "prompt/prefix/p-tuning"}


def family_of(method: str) -> str:
    """The family of an adapter method (`easytune.adapters.METHODS`) or of "none" (all weights)."""
    from easytune.adapters.config import LORA_METHODS, PROMPT_METHODS
    return "lora" if method in LORA_METHODS else "prompt" if method in PROMPT_METHODS else "full"


def method_family(cfg) -> str:
    """What the flags train (a `METHOD_FAMILIES` key); a --peft_adapter without --peft is read for
    its method (its adapter_config.json's peft_type)."""
    method = cfg.get("peft", "none") or "none"
    if method == "none" and cfg.get("peft_adapter"):
        from easytune.adapters.peft_format import CONFIG_FILE, PEFT_TYPES
        path = os.path.join(os.path.expanduser(cfg.peft_adapter), CONFIG_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                peft_type = str(json.load(f).get("peft_type", "")).upper()
            method = next((m for m, t in PEFT_TYPES.items() if t == peft_type), "none")
    return family_of(method)


def heldout_accuracy(model, records, max_new_tokens: int) -> float:
    """Greedy exact-match accuracy on verifiable-task records (prompt = all but the last turn; for
    an encoder-decoder, the question's text)."""
    from easytune import data
    if model.is_encoder_decoder:
        prompts = [r["messages"][-2]["content"] for r in records]
    else:
        prompts = [r["messages"][:-1] for r in records]
    return data.accuracy(model.generate(prompts, max_new_tokens=max_new_tokens), records)


def dropped(is_main: bool, message: str) -> None:
    """Say on stderr (process 0) what the data loading dropped."""
    if is_main:
        import sys
        print(message, file=sys.stderr)


def standard_error(values) -> float:
    """The standard error of the mean of `values`: their sample standard deviation (ddof 1) over
    sqrt(len); 0 for fewer than two values."""
    import numpy as np
    values = np.asarray(values, np.float64)
    return float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0


def heldout_reward(model, records, reward_fn, *, max_new_tokens: int, samples: int = 0, temperature: float = 1.0,
                   seed: int = 0, batch: int = 32, per_prompt: bool = False) -> dict:
    """Held-out figures of a reward function on prompt records (`prompt` or `messages`; every other
    field is a reward column): `accuracy` (the mean reward of greedy completions, the headline),
    `sampled_mean` (over `samples` completions per prompt at `temperature`; with samples > 0),
    `distinct` (the share of distinct greedy completions: 1/len(records) means one fixed response),
    `length_mean` (greedy completion tokens) and `cut` (the share that ended at max_new_tokens
    without EOS). `accuracy_stderr` and `sampled_stderr` are the standard errors of those means
    over prompts (the sample standard deviation of the per-prompt figure, a prompt's samples
    averaged first, over sqrt(prompts)): how finely this many prompts resolve a change. With
    `per_prompt`, `accuracy_per_prompt` and `sampled_per_prompt` list the per-prompt figures, for
    paired comparisons of two models on the same prompts. The same code scores training rollouts
    (`rewards.call_reward_fn`)."""
    import numpy as np
    from easytune import rewards
    from easytune.rl.recipe import prompt_of
    prompts = [prompt_of(r, "held-out record") for r in records]
    columns = {key: [r.get(key) for r in records] for key in records[0] if key not in ("prompt", "messages")}
    eos = set(model.eos_token_ids)

    def completions(prompt_list, **sampling):
        ids = []
        for start in range(0, len(prompt_list), batch):
            ids += model.generate(prompt_list[start:start + batch], max_new_tokens=max_new_tokens,
                                  return_tokens=True, seed=seed + start, **sampling)
        return ids, [model.tokenizer.decode(i, skip_special_tokens=True) for i in ids]

    ids, texts = completions(prompts, temperature=0.0)
    scores = np.asarray(rewards.call_reward_fn(reward_fn, prompts, texts, ids, columns), np.float64)
    figures = {"accuracy": float(np.mean(scores)), "accuracy_stderr": standard_error(scores),
               "distinct": len(set(texts)) / len(texts),
               "length_mean": float(np.mean([len(i) for i in ids])),
               "cut": float(np.mean([len(i) >= max_new_tokens and not set(i) & eos for i in ids]))}
    if per_prompt:
        figures["accuracy_per_prompt"] = scores.tolist()
    if samples > 0:
        repeat = lambda values: [v for v in values for _ in range(samples)]  # noqa: E731
        ids, texts = completions(repeat(prompts), temperature=temperature)
        sampled = np.asarray(rewards.call_reward_fn(reward_fn, repeat(prompts), texts, ids,
                                                    {key: repeat(values) for key, values in columns.items()}),
                             np.float64).reshape(len(prompts), samples).mean(axis=1)
        figures["sampled_mean"] = float(np.mean(sampled))
        figures["sampled_stderr"] = standard_error(sampled)
        figures["sampled_distinct"] = len(set(texts)) / len(texts)
        if per_prompt:
            figures["sampled_per_prompt"] = sampled.tolist()
    return figures
