"""The RL recipe (`python -m easytune.train_ppo`): PPO, GRPO and its family (DAPO, Dr. GRPO, GSPO)
and RLOO from a policy, prompts and a reward, as an iteration step source
(`easytune.rl.rollout.RLSteps`) of the one run driver.

- **ppo**: a policy, a frozen reference, a critic (the value model: `--value_model`, else the reward
  model, else the policy's initial weights with a fresh value head; or with `--critic=shared`
  trlx's value head on the policy itself, trained in its loss), the per-token KL penalty
  folded into the rewards (`--kl_estimator=k1|k3`, fixed or `--adaptive_kl`), GAE(γ, λ), whitened
  advantages, clipped policy and value losses, `--ppo_epochs` over `--num_minibatches`.
- **grpo**: no critic; each prompt's `--rollouts_per_prompt` completions are compared with their
  group's mean (divided by the std, `--scale_rewards`); KL as k3 in the loss (`--kl_in=loss`, the
  default) or in the reward.
- **dapo** (Yu et al. 2025): grpo with clip-higher (`--cliprange_high` defaults to 0.28), the
  token-level loss (`--loss_type=dapo`), dynamic sampling (prompt groups whose scores are all equal
  are dropped: zero weight, same shapes; `reward/dropped_groups`) and no KL (`--kl_in=none`); add its
  soft overlong penalty with `--overlong_buffer`.
- **dr_grpo** (Liu et al. 2025): grpo without the std scaling (`--scale_rewards=none`) and with the loss
  sum divided by sequences x max_new_tokens (`--loss_type=dr_grpo`).
- **gspo** (Zheng et al. 2025): grpo with one importance ratio per sequence, the geometric mean of its
  token ratios, and each sequence's loss averaged alike (`--loss_type=grpo`); the paper clips tightly
  (`--cliprange=3e-4 --cliprange_high=4e-4`).
- **rloo**: no critic; leave-one-out baselines, a sequence-level clipped ratio; KL in the reward (the
  default) or, with `--kl_in=loss`, each sequence's summed k3 in the loss.
`--loss_type` takes TRL GRPOTrainer's names (grpo, bnpo, dr_grpo, dapo), so a TRL config carries over:
TRL's `importance_sampling_level="sequence"` is `--algo=gspo`, `scale_rewards` and `epsilon`/
`epsilon_high` are `--scale_rewards` and `--cliprange`/`--cliprange_high`, `beta` is `--kl_coef`.
The algorithms are names of registered pieces (`easytune.algos.ppo.ALGORITHMS`); this recipe never
asks which one runs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

from easytune import recipe

logger = logging.getLogger("easytune")


def prompt_of(record: dict, where: str):
    """A record's prompt: `prompt` (text or messages) or `messages` without a final assistant turn."""
    if "prompt" in record:
        prompt = record["prompt"]
    elif "messages" in record:
        prompt = record["messages"]
        ends_with_answer = isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) \
            and prompt[-1].get("role") == "assistant"
        if ends_with_answer:
            prompt = prompt[:-1]
    else:
        raise ValueError(f"{where}: a prompt record needs a `prompt` (text or chat messages) or `messages` field; "
                         f"it has {sorted(record)}.")
    if isinstance(prompt, str) and prompt:
        return prompt
    if (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                      and isinstance(m.get("content"), str) for m in prompt)):
        return prompt
    raise ValueError(f"{where}: the prompt must be a non-empty string or a list of {{role, content}} messages, got "
                     f"{json.dumps(prompt)[:80]}.")


def load_prompt_records(ctx: recipe.Context):
    """(prompt records, held-out task records or None, source name)."""
    from easytune import data
    cfg = ctx.cfg
    if cfg.train_data:
        located = data.load_located_records(cfg.train_data)
        records = []
        for record, where in located:
            prompt_of(record, where)  # validate every record before the first compile
            records.append(record)
        if not records:
            raise ValueError(f"{cfg.train_data} holds no prompt records.")
        return records, None, cfg.train_data
    names = tuple(n.strip() for n in cfg.tasks.names.split(",") if n.strip())
    records, heldout = data.train_and_heldout(cfg.tasks.num_train, cfg.tasks.num_heldout, seed=cfg.seed, tasks=names)
    # the solved examples are drawn with their own seed, the same ones for training and held-out prompts
    records = data.with_examples(records, cfg.tasks.shots, seed=10_000 + cfg.seed)
    heldout = data.with_examples(heldout, cfg.tasks.shots, seed=10_000 + cfg.seed)
    ctx.write_jsonl("train_prompts.jsonl", records)
    return records, heldout, f"verifiable tasks {','.join(names)} ({len(records)} train, {len(heldout)} held out)"


def make_scorer(cfg, policy_model, reward_model):
    """score(records, completion_ids) -> float32 scores from the reward function or model."""
    from easytune import rewards
    tokenizer = policy_model.tokenizer
    if cfg.reward_fn:
        fn = rewards.load_reward_fn(cfg.reward_fn)

        def score(records, ids):
            completions = [tokenizer.decode(i, skip_special_tokens=True) for i in ids]
            prompts = [prompt_of(r, "prompt record") for r in records]
            columns = {key: [r.get(key) for r in records] for key in records[0] if key not in ("prompt", "messages")}
            return rewards.call_reward_fn(fn, prompts, completions, ids, columns)
        return score

    def score(records, ids):
        sequences = []
        for record, completion_ids in zip(records, ids):
            prompt = prompt_of(record, "prompt record")
            completion = tokenizer.decode(completion_ids, skip_special_tokens=True)
            sequences.append(prompt + completion if isinstance(prompt, str)
                             else list(prompt) + [{"role": "assistant", "content": completion}])
        import numpy as np
        return np.asarray(reward_model.score(sequences), np.float32)
    return score


def shared_value_head(model, seed: int, lr: float | None = None) -> recipe.Heads:
    """PPO's value head on the policy (`--critic=shared`), created in its shards on the model's mesh,
    trained in the policy's optimizer at peak learning rate `lr` (None: the policy's)."""
    import jax
    from easytune import sharding
    from easytune.algos import ilql, ppo
    make = lambda key: ppo.init_value_head(key, model.config.hidden_size)  # noqa: E731
    key = jax.random.key(seed)
    shardings = sharding.tree_shardings({"heads": jax.eval_shape(make, key)}, ilql.HEAD_RULES, model.mesh)["heads"]
    with jax.set_mesh(model.mesh):
        params = jax.jit(make, out_shardings=shardings)(key)
    return recipe.Heads(params=params, rules=ilql.HEAD_RULES, lr=lr)


class RLRecipe(recipe.Recipe):
    """RL fine-tuning of a causal LM (all weights or a LoRA-family adapter) against a reward
    function or reward model; each driver step is one iteration (`RLSteps`)."""

    name = "RL"
    flag_groups = ("lm_head", "peft", "lm_eval")
    adapters = ("lora", "qlora", "dora")
    learning_rates = {"full": 1e-5, "lora": 1e-4}
    data_flags = ("train_data",)
    defaults = {
        "output_dir": "outputs/ppo",
        "algo": "ppo",
        "reward_fn": None,
        "reward_model": None,
        "value_model": None,
        "critic": "model",
        "iterations": 20,
        "rollout_batch_size": 32,
        "rollouts_per_prompt": 4,
        "max_new_tokens": 8,
        "temperature": 0.7,
        "ppo_epochs": 2,
        "num_minibatches": 2,
        "kl_coef": 0.05,
        "kl_estimator": "k1",
        "kl_in": None,
        "adaptive_kl": False,
        "kl_target": 6.0,
        "kl_horizon": 10000,
        "missing_eos_penalty": 0.0,
        "overlong_buffer": 0,
        "overlong_max_length": 0,
        "gamma": 1.0,
        "lam": 0.95,
        "whiten_rewards": False,
        "cliprange": 0.2,
        "cliprange_high": 0.0,
        "cliprange_value": 0.2,
        "vf_coef": 0.1,
        "value_lr": 0.0,
        "scale_rewards": None,
        "loss_type": None,
        "dynamic_sampling": False,
        "normalize_advantages": False,
        "exact_ratio": True,
        "optimizer": {"schedule": "constant", "warmup_ratio": 0.0, "min_lr_ratio": 1.0},
        "heldout_steps": 0,
        "heldout_data": None,
        "heldout_samples": 0,
        "heldout_before": True,
        "eval_steps": 0,
        "tasks": {"num_train": 512, "num_heldout": 90, "names": "count,subtract", "shots": 2},
        "peft": "lora",
        "lora": {"dropout": 0.0},  # PPO's ratio needs the rollout's forward in training
    }
    docs = {
    "eval_steps": "run --eval_tasks every N iterations (0 = only at the end)",
    "model": "the policy: HF directory, hub id, or easytune checkpoint/run directory, e.g. an SFT run (default: "
             "bundled SmolLM2-135M-Instruct)",
    "algo": "ppo (critic, GAE, KL in the reward), grpo (group-relative baseline), dapo (grpo + clip-higher, "
            "token-level loss, dynamic sampling, no KL), dr_grpo (grpo, advantages not divided by the std, loss "
            "divided by a constant), gspo (grpo with a sequence-level ratio) or rloo (leave-one-out baseline)",
    "reward_fn": "module:function scoring completions, called as fn(prompts=, completions=, completion_ids=, "
                 "**record fields) -> one number per completion (default job: easytune.rewards:exact_match)",
    "reward_model": "an easytune reward model (train_reward run) or HF *ForSequenceClassification directory; "
                    "scores prompt + completion through the chat template",
    "value_model": "PPO's critic initialization: a reward model or causal LM directory (a fresh value head is "
                   "added to an LM) (default: --reward_model if given, else the policy's initial weights)",
    "train_data": "prompt records: .jsonl/.json/.parquet or a `datasets` name; `prompt` (string or chat "
                  "messages) or `messages` (the last assistant turn, if any, is dropped); every other field is "
                  "passed to the reward function (default: the verifiable tasks)",
    "iterations": "rollout batches (each: generate, score, then ppo_epochs x num_minibatches optimizer steps)",
    "rollout_batch_size": "completions per iteration (prompts x rollouts_per_prompt)",
    "rollouts_per_prompt": "completions sampled per prompt (the grpo family and rloo: the group size, >= 2)",
    "max_new_tokens": "completion length limit",
    "temperature": "sampling temperature at rollout; training log-probs use the same temperature",
    "ppo_epochs": "passes over each rollout batch",
    "num_minibatches": "minibatches (optimizer steps) per pass; rollout_batch_size must divide by it",
    "grad_accum_steps": "micro-batches accumulated per minibatch",
    "kl_coef": "KL coefficient beta (initial value with --adaptive_kl; 0 = no KL term)",
    "kl_estimator": "per-token KL estimator in the reward: k1 (log ratio), k2 or k3 (Schulman)",
    "kl_in": "reward (fold beta*KL into the rewards), loss (beta*k3 in the loss: per token for the grpo family, "
             "summed over each sequence for rloo) or none (no KL penalty; the grpo family) (default: none for "
             "dapo, loss for grpo, dr_grpo and gspo, reward otherwise)",
    "adaptive_kl": "adapt kl_coef towards kl_target (Ziegler et al. 2019)",
    "kl_target": "adaptive KL: target KL per completion (nats)",
    "kl_horizon": "adaptive KL: horizon in completions",
    "missing_eos_penalty": "subtracted from the score of completions that end without EOS (0 = off)",
    "overlong_buffer": "DAPO's soft overlong penalty: the last N tokens (L_cache) before --overlong_max_length, over "
                       "which a completion's score falls linearly from 0 to -1 with its length (-1 beyond) (0 = off)",
    "overlong_max_length": "where the overlong penalty reaches -1 (L_max; 0 = max_new_tokens)",
    "gamma": "PPO discount",
    "lam": "PPO GAE lambda",
    "whiten_rewards": "PPO: whiten the per-token rewards before GAE",
    "cliprange": "policy ratio clip epsilon",
    "cliprange_high": "upper clip epsilon (0 = the algorithm's: 0.28 for dapo, cliprange otherwise; larger than "
                      "cliprange is DAPO's clip-higher)",
    "cliprange_value": "PPO value clip range",
    "critic": "PPO's critic: model (a value model of its own: --value_model, else --reward_model, else the policy's "
              "initial weights, with a fresh score head; its own forward, backward and optimizer) or shared (trlx's "
              "value head, hidden -> 2 hidden -> 1, on the policy's final hidden states, trained in the policy's "
              "loss as policy loss + vf_coef x value loss: one forward and backward serve both)",
    "vf_coef": "PPO value loss coefficient",
    "value_lr": "critic learning rate (0 = optimizer.lr): the value model's AdamW, or with --critic=shared the "
                "value head's, in the policy's optimizer on its schedule",
    "scale_rewards": "grpo, dapo, gspo: divide advantages by the group's std (group, the default), the batch's "
                     "(batch) or not (none; dr_grpo's only choice)",
    "loss_type": "the grpo family's loss aggregation, by TRL GRPOTrainer's names: dapo or bnpo (over the "
                 "minibatch's tokens), grpo (each sequence's token mean, averaged over sequences) or dr_grpo (the "
                 "sum over sequences x max_new_tokens) (default: dapo for grpo and dapo, dr_grpo for dr_grpo, "
                 "grpo for gspo)",
    "dynamic_sampling": "drop the prompt groups whose completions all scored the same (their rows weigh 0; "
                        "always on for dapo; grpo family and rloo)",
    "normalize_advantages": "rloo: standardize advantages over the batch",
    "exact_ratio": "run the loss's forward under jax.checkpoint, so it rounds as the rollout's forward and the first "
                   "update's ratio is exactly 1 (false: fused with the backward, one forward fewer per minibatch; the "
                   "first ratio then starts ~1e-7 from 1)",
    "loss_reduction": "mean: per unit of the --loss_type over the minibatch (tokens, sequences, or sequences x "
                      "max_new_tokens); sum: per micro-batch",
    "optimizer.lr": "peak learning rate (AdamW)",
    "optimizer.warmup_steps": "warmup optimizer steps (0 = use warmup_ratio)",
    "optimizer.warmup_ratio": "warmup as a fraction of all optimizer steps",
    "optimizer.clip_grad_norm": "clip gradients to this global norm (0 = off), policy and critic each",
    "seed": "prompt order, sampling and adapter init seed",
    "log_steps": "log every N iterations (progress, metrics.jsonl, TensorBoard)",
    "heldout_steps": "held-out accuracy (default job) or mean reward (--heldout_data) every N iterations (0 = before "
                     "and after only)",
    "heldout_data": "held-out prompt records in --train_data's format, scored with --reward_fn before training, every "
                    "--heldout_steps and after: the greedy completions' mean reward (the headline), their distinct "
                    "share and mean length, and with --heldout_samples the mean over samples",
    "heldout_before": "score the held-out prompts before training too (false: skip it where the start model's "
                      "figures are known, as the constraint pipeline's RFT stage measured them)",
    "heldout_samples": "--heldout_data: also sample this many completions per prompt at --temperature (0 = greedy "
                       "only)",
    "save_steps": "checkpoint every N iterations and at the end (0 = only at the end)",
    "export_hf": "write a Hugging Face directory of the policy here at the end, adapters merged",
    "tasks.num_train": "default job: generated training prompts",
    "tasks.num_heldout": "default job: held-out tasks for exact-match accuracy",
    "tasks.names": "default job: comma-separated task kinds (add, subtract, multiply, sort, reverse, count); the "
                   "default ones are those the bundled model sometimes answers exactly, so a reward exists to "
                   "learn from",
    "tasks.shots": "default job: solved examples of the task before each question (few-shot prompts; the base "
                   "model answers in sentences without them, and exact match then never rewards anything)",
    "lora.dropout": "LoRA dropout; must be 0 here (the rollout log-probs must be the training forward's)",
    "peft": "the policy's adapter: lora (default; the reference is the base, no copy), qlora, dora, or none (all "
            "weights; the reference is a frozen copy)",
    }

    @staticmethod
    def options(cfg):
        from easytune.algos import ppo
        return ppo.RLConfig(
            algo=cfg.algo, temperature=cfg.temperature, kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
            kl_in=cfg.kl_in, gamma=cfg.gamma, lam=cfg.lam, whiten_rewards=cfg.whiten_rewards,
            cliprange=cfg.cliprange, cliprange_high=cfg.cliprange_high, cliprange_value=cfg.cliprange_value,
            vf_coef=cfg.vf_coef, scale_rewards=cfg.scale_rewards, normalize_advantages=cfg.normalize_advantages,
            group_size=cfg.rollouts_per_prompt, loss_type=cfg.loss_type,
            dynamic_sampling=cfg.dynamic_sampling or None,  # off: the algorithm's choice (on for dapo)
            exact_ratio=cfg.exact_ratio)

    @staticmethod
    def rollout_config(cfg):
        from easytune.rl.rollout import RolloutConfig
        return RolloutConfig(rollout_batch_size=cfg.rollout_batch_size, max_new_tokens=cfg.max_new_tokens,
                             ppo_epochs=cfg.ppo_epochs, num_minibatches=cfg.num_minibatches,
                             grad_accum_steps=cfg.grad_accum_steps, missing_eos_penalty=cfg.missing_eos_penalty,
                             overlong_buffer=cfg.overlong_buffer, overlong_max_length=cfg.overlong_max_length,
                             seed=cfg.seed)

    def validate(self, cfg) -> None:
        if not cfg.reward_fn and not cfg.reward_model and not cfg.train_data:  # the default job
            cfg.reward_fn = "easytune.rewards:exact_match"
        if bool(cfg.reward_fn) == bool(cfg.reward_model):
            raise ValueError("give the reward as exactly one of --reward_fn=module:function or --reward_model=DIR.")
        options = self.options(cfg)
        if cfg.rollout_batch_size % options.group_size:
            raise ValueError(f"--rollout_batch_size ({cfg.rollout_batch_size}) must be a multiple of "
                             f"--rollouts_per_prompt ({options.group_size}).")
        self.rollout_config(cfg)
        if cfg.iterations < 1:
            raise ValueError(f"--iterations must be >= 1, got {cfg.iterations}.")
        if cfg.heldout_data and not cfg.reward_fn:
            raise ValueError("--heldout_data is scored with --reward_fn; a reward model's scores are not a held-out "
                             "measure of the task (give the task's verifier as --reward_fn).")
        if cfg.heldout_samples < 0:
            raise ValueError(f"--heldout_samples must be >= 0, got {cfg.heldout_samples}.")
        if cfg.value_lr < 0:
            raise ValueError(f"--value_lr must be >= 0 (0: --optimizer.lr), got {cfg.value_lr}.")
        if cfg.critic not in ("model", "shared"):
            raise ValueError(f"--critic must be model (a value model of its own) or shared (a value head on the "
                             f"policy), got {cfg.critic!r}.")
        if cfg.critic == "shared":
            if not options.uses_critic:
                raise ValueError(f"--critic=shared is a value head for PPO's GAE; {cfg.algo} reads no values.")
            if cfg.value_model:
                raise ValueError(f"--critic=shared puts the value head on the policy, so --value_model "
                                 f"{cfg.value_model} would not be used; drop one of them.")

    def check_record(self, cfg, record: dict, where: str) -> None:
        prompt_of(record, where)

    def setup(self, ctx: recipe.Context) -> recipe.Job:
        import easytune
        from easytune import data, train
        from easytune.algos import ppo, reward as reward_lib
        from easytune.rl.rollout import RLSteps
        cfg, model = ctx.cfg, ctx.model
        options, settings = self.options(cfg), self.rollout_config(cfg)
        if model.adapter is not None and model.adapter.config.dropout:
            raise ValueError(f"--lora.dropout={model.adapter.config.dropout}: PPO's ratio compares the rollout's "
                             f"log-probs with the training forward's, which dropout would make differ; use "
                             f"--lora.dropout=0.")
        reward_model = None
        if cfg.reward_model:
            reward_model = easytune.load(cfg.reward_model, dtype=cfg.dtype, mesh_dim=cfg.mesh_dim,
                                         attention=cfg.attention)
            if getattr(reward_model.config, "num_labels", 0) != 1:
                raise ValueError(f"--reward_model {cfg.reward_model} has no one-label score head; train one with "
                                 f"easytune.train_reward or pass an HF *ForSequenceClassification directory.")
            if reward_model.tokenizer is None:
                raise ValueError(f"--reward_model {cfg.reward_model} has no tokenizer to read completions with.")
        records, heldout, source = load_prompt_records(ctx)
        logger.info("prompts: %s", source)
        heldout_fn, heldout_name = None, "exact-match accuracy"
        if heldout is not None:
            heldout_fn = lambda: recipe.heldout_accuracy(model, heldout, cfg.max_new_tokens)  # noqa: E731
        if cfg.heldout_data:
            from easytune import rewards
            heldout_records = []
            for record, where in data.load_located_records(cfg.heldout_data):
                prompt_of(record, where)
                heldout_records.append(record)
            if not heldout_records:
                raise ValueError(f"--heldout_data {cfg.heldout_data} holds no prompt records.")
            reward_fn = rewards.load_reward_fn(cfg.reward_fn)
            heldout_name = f"mean reward ({len(heldout_records)} prompts of {cfg.heldout_data}, greedy)"
            heldout_fn = lambda: recipe.heldout_reward(  # noqa: E731
                model, heldout_records, reward_fn, max_new_tokens=cfg.max_new_tokens, samples=cfg.heldout_samples,
                temperature=cfg.temperature, seed=cfg.seed)

        total_optimizer_steps = cfg.iterations * settings.optimizer_steps
        # With a critic, the policy and critic checkpoints of an iteration are written synchronously:
        # two background writes can finish in either order, and a kill between them would leave
        # them at different iterations, which resume refuses.
        policy_config = train.TrainConfig.from_flags(cfg, batch_size=settings.minibatch,
                                                     async_checkpoints=cfg.async_checkpoints
                                                     and not options.uses_critic)
        critic, value_source = None, None
        if options.uses_critic and cfg.critic == "shared":
            value_source = "shared value head on the policy"
            policy = train.Trainer(policy_config, model, ppo.shared_loss_fn(options), total_optimizer_steps,
                                   heads=shared_value_head(model, cfg.seed + 1, cfg.value_lr or None))
        else:
            policy = train.Trainer(policy_config, model, ppo.policy_loss_fn(options), total_optimizer_steps)
        if options.uses_critic and cfg.critic == "model":
            value_source = cfg.value_model or cfg.reward_model or model.source
            value_model = easytune.load(value_source, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                        mesh_dim=cfg.mesh_dim, remat=cfg.remat, attention=cfg.attention,
                                        layer_loop=cfg.layer_loop, tokenizer=False)
            value_model = reward_lib.with_score_head(value_model, seed=cfg.seed + 1)
            critic_optimizer = policy_config.optimizer
            if cfg.value_lr:
                critic_optimizer = dataclasses.replace(critic_optimizer, lr=cfg.value_lr)
            critic_config = dataclasses.replace(policy_config, output_dir=os.path.join(cfg.output_dir, "value"),
                                                optimizer=critic_optimizer)
            critic = train.Trainer(critic_config, value_model, ppo.value_loss_fn(options), total_optimizer_steps)

        controller = (ppo.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                      else ppo.FixedKLController(cfg.kl_coef))
        steps = RLSteps(settings, options, model, policy, critic, make_scorer(cfg, model, reward_model),
                        lambda record: data.render_ids(model.tokenizer, prompt_of(record, "prompt record"),
                                                       add_generation_prompt=True), records, controller)

        def report(history, summary):
            curve = lambda name: [m[name] for m in steps.iterations if name in m]  # noqa: E731
            figures = {}
            if steps.iterations:
                for name in ("reward/mean", "objective/kl", "response/length_mean"):
                    figures[f"{name}_first"], figures[f"{name}_last"] = curve(name)[0], curve(name)[-1]
                for name in ("time/generation", "time/rollout_forward", "time/reward", "time/train"):
                    figures[f"{name}_total"] = float(sum(curve(name)))
            return figures

        return recipe.Job(
            model=model, steps=steps, total_steps=cfg.iterations, report=report, progress="reward/mean",
            summary={"algo": cfg.algo, "loss_type": options.loss_type, "prompts": source, "iterations": cfg.iterations,
                     "rollout_batch_size": cfg.rollout_batch_size, "rollouts_per_prompt": cfg.rollouts_per_prompt,
                     "optimizer_steps": total_optimizer_steps,
                     "reference": "base (adapter off)" if model.adapter is not None else "copy",
                     "critic": value_source},
            heldout=heldout_fn, heldout_name=heldout_name, heldout_every=cfg.heldout_steps,
            heldout_before=cfg.heldout_before)


RECIPE = RLRecipe()
