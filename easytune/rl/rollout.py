"""RL iterations as a step source of the run driver (`easytune.run`): each `advance()` is one
iteration of rollouts, scoring, advantages and PPO epochs over minibatches, so RL gets the
driver's log/eval/save cadence, resume and logging like any other recipe.

One iteration:
1. **generate**: `rollout_batch_size` completions (each prompt `rollouts_per_prompt` times, a
   prompt's completions consecutive) with the one generation call (`easytune.generate.generate`:
   one prefill and a `lax.while_loop`, inputs sharded over the mesh's batch axes, no host round
   trip per token), sampling at `temperature` from the current policy;
2. **record**: in one jitted pass over the rollout batch, in the training step's micro-batch
   shape, the policy's log-probs and entropy, the reference's log-probs (adapters off, or the
   frozen copy) and, for PPO, the critic's values (with `--critic=shared`, the value head's, from
   the forward that gives the policy's log-probs). These are the "old" log-probs and values: they
   are not recomputed after updates, so the first update's ratio is exactly 1 and later ones are not;
3. **score**: the reward function or reward model on the decoded completions (every process
   scores the same gathered batch), minus `missing_eos_penalty` for completions without EOS, plus
   DAPO's soft overlong penalty with `overlong_buffer`;
4. **advantages**: the algorithm's registered estimator (`easytune.algos.ppo.ADVANTAGE_ESTIMATORS`:
   GAE for PPO, group-relative for GRPO and its family, leave-one-out for RLOO), the rewards
   charged the KL where the registered KL placement says so (`--kl_in`). With dynamic sampling
   (DAPO) the prompt groups whose scores are all equal are dropped, not by changing the batch's
   shape (the jitted update would recompile for every count, and DAPO's refill by sampling more
   is not done): their rows train with an all-zero response mask, so they weigh nothing in the
   loss and count in none of its normalizers, as if they were not in the batch;
5. **train**: `ppo_epochs` passes over the batch in `num_minibatches` shuffled minibatches, one
   optimizer step each for the policy (and the critic) through `train.Trainer`'s jitted step.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from easytune import generate, sharding, train
from easytune.algos import ppo
from easytune.distributed import host_array

logger = logging.getLogger("easytune")


# ----------------------------------------------------------------------------- prompts

def prompt_batches(records: Sequence[dict], prompts_per_iteration: int, seed: int):
    """Indices into `records`, `prompts_per_iteration` at a time, in a seeded shuffled order epoch
    after epoch (resumable: the data iterator of the training loop)."""
    from easytune.data import BatchIterator
    return BatchIterator({"index": np.arange(len(records))[:, None]}, prompts_per_iteration, seed)


# ----------------------------------------------------------------------------- rollout rows

def response_rows(prompt_tokens, prompt_positions, prompt_segments, responses, eos_ids) -> dict[str, np.ndarray]:
    """Rows for scoring and training from left-padded prompts `[batch, prompt]` and generated
    responses `[batch, response]`: `input_ids`, `positions`, `segment_ids` over prompt + response,
    `response_mask` (1 up to and including the first EOS), `has_eos` `[batch, 1]`."""
    responses = np.asarray(responses, np.int32)
    batch, length = responses.shape
    is_eos = np.isin(responses, np.asarray(list(eos_ids), np.int32))
    has_eos = is_eos.any(axis=1)
    last = np.where(has_eos, is_eos.argmax(axis=1), length - 1)
    mask = (np.arange(length)[None, :] <= last[:, None]).astype(np.int32)
    prompt_lengths = prompt_segments.sum(axis=1, keepdims=True)
    return {
        "input_ids": np.concatenate([prompt_tokens, np.where(mask > 0, responses, 0)], axis=1).astype(np.int32),
        "positions": np.concatenate([prompt_positions, prompt_lengths + np.arange(length)[None, :]],
                                    axis=1).astype(np.int32),
        "segment_ids": np.concatenate([prompt_segments, mask], axis=1).astype(np.int32),
        "response_mask": mask,
        "has_eos": has_eos[:, None].astype(np.int32),
    }


def minibatch_rows(rows: dict[str, np.ndarray], index, keys) -> dict[str, np.ndarray]:
    """The rollout rows `index` with the fields `keys` the losses read; the rows of a prompt group
    dynamic sampling dropped (`keep` 0) stay, with an all-zero `response_mask`: nothing to train on
    and nothing counted, in a batch of the same shape (no recompile)."""
    minibatch = {k: rows[k][index] for k in keys}
    mask = minibatch["response_mask"]
    minibatch["response_mask"] = mask * rows["keep"][index].astype(mask.dtype)
    return minibatch


def completion_ids(rows: dict[str, np.ndarray]) -> list[list[int]]:
    response_length = rows["response_mask"].shape[1]
    responses = rows["input_ids"][:, -response_length:]
    return [row[mask > 0].tolist() for row, mask in zip(responses, rows["response_mask"])]


# ----------------------------------------------------------------------------- the iterations

@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """The shape of an iteration: completions per iteration, their length, optimizer passes over
    them, what completions without EOS pay, and DAPO's soft overlong penalty: over the last
    `overlong_buffer` tokens (L_cache; 0 = off) before `overlong_max_length` (L_max; 0 =
    max_new_tokens) (`ppo.overlong_penalty`)."""
    rollout_batch_size: int
    max_new_tokens: int
    ppo_epochs: int = 1
    num_minibatches: int = 1
    grad_accum_steps: int = 1
    missing_eos_penalty: float = 0.0
    overlong_buffer: int = 0
    overlong_max_length: int = 0
    seed: int = 0

    def __post_init__(self):
        for name in ("rollout_batch_size", "max_new_tokens", "ppo_epochs", "num_minibatches", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.rollout_batch_size % self.num_minibatches:
            raise ValueError(f"--rollout_batch_size ({self.rollout_batch_size}) must divide into --num_minibatches "
                             f"({self.num_minibatches}).")
        if self.overlong_buffer < 0 or self.overlong_max_length < 0:
            raise ValueError(f"--overlong_buffer and --overlong_max_length must be >= 0, got {self.overlong_buffer} "
                             f"and {self.overlong_max_length}.")
        if self.overlong_max_length and not self.overlong_buffer:
            raise ValueError(f"--overlong_max_length={self.overlong_max_length} sets where DAPO's overlong penalty "
                             f"ends, which only applies with --overlong_buffer > 0 (its length in tokens).")
        if self.overlong_buffer > self.overlong_limit:
            raise ValueError(f"--overlong_buffer ({self.overlong_buffer}) must be at most the length it ends at, "
                             f"{self.overlong_limit} (--overlong_max_length, else --max_new_tokens).")

    @property
    def overlong_limit(self) -> int:
        """L_max of the overlong penalty."""
        return self.overlong_max_length or self.max_new_tokens

    @property
    def minibatch(self) -> int:
        return self.rollout_batch_size // self.num_minibatches

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps per iteration."""
        return self.ppo_epochs * self.num_minibatches


class RLSteps:
    """RL iterations, a step source of the run driver (`step` = iterations done). `policy` is a
    `train.Trainer` over the policy model whose loss `needs_reference`, so its `frozen` input is
    the reference (the base with an adapter, else a copy); `critic` a Trainer over the value model
    (PPO), or None: no values (GRPO, RLOO), or PPO's value head among the policy's heads
    (`--critic=shared`, trained by the policy's loss, `ppo.shared_loss_fn`). `score(prompt_records, completion_ids)` returns float32 scores `[batch]`;
    `prompt_ids(record)` a record's prompt as token ids. Every iteration's metrics are kept in
    `iterations` (the driver logs only every --log_steps)."""

    def __init__(self, settings: RolloutConfig, options: ppo.RLConfig, model, policy: train.Trainer,
                 critic: train.Trainer | None, score: Callable, prompt_ids: Callable[[dict], list[int]],
                 records: Sequence[dict], kl_controller):
        if settings.rollout_batch_size % options.group_size:
            raise ValueError(f"--rollout_batch_size ({settings.rollout_batch_size}) must be a multiple of "
                             f"--rollouts_per_prompt ({options.group_size}).")
        self.settings, self.options, self.model = settings, options, model
        self.policy, self.critic, self.score = policy, critic, score
        self.prompt_ids, self.records, self.kl = prompt_ids, list(records), kl_controller
        self.prompts = prompt_batches(self.records, settings.rollout_batch_size // options.group_size, settings.seed)
        self.mesh = model.mesh
        self.step = 0
        self.iterations: list[dict] = []
        self.rollout_batch = settings.rollout_batch_size
        self.minibatch = settings.minibatch
        self.micro = self.minibatch // settings.grad_accum_steps
        self.eos_ids = model.eos_token_ids
        if not self.eos_ids:
            raise ValueError("the policy has no EOS token id (generation_config / tokenizer); RL needs one to end "
                             "completions.")
        self.adapter = model.adapter
        # PPO's value head on the policy (--critic=shared): the policy Trainer trains it among its heads
        self.shared_critic = options.uses_critic and critic is None
        if self.shared_critic and (policy.heads is None or ppo.VALUE_HEAD not in policy.heads.params):
            raise ValueError(f"{options.algo} reads values: give it a critic Trainer, or a policy Trainer with the "
                             f"shared value head (heads {{{ppo.VALUE_HEAD!r}: ...}}, --critic=shared).")
        config, critic_config = model.config, (critic.model_config if critic is not None else None)
        temperature = options.temperature

        def record(policy_params, frozen, value_params, batch):
            """Old log-probs, reference log-probs, entropy and values, micro-batch by micro-batch
            (`batch` leaves `[chunks, micro, ...]`), with the training step's forward."""
            model_params = self._combine(frozen, self._model_params(policy_params))
            reference_params = frozen

            def one(micro):
                if self.shared_critic:
                    logps, entropy, values = ppo.shared_outputs(
                        config, {"model": model_params, "heads": policy_params["heads"]}, micro, temperature)
                else:
                    logps, entropy = ppo.response_logprobs(config, model_params, micro, temperature,
                                                           with_entropy=True)
                    values = (ppo.response_values(critic_config, value_params, micro) if value_params is not None
                              else jnp.zeros_like(logps))
                reference = ppo.response_logprobs(config, reference_params, micro, temperature)
                return logps, reference, entropy, values

            return jax.lax.map(one, batch)

        self._record = jax.jit(record)

    def _model_params(self, policy_params):
        """The policy model's trained parameters among the Trainer's (which hold the shared value
        head beside them with --critic=shared)."""
        return policy_params["model"] if self.shared_critic else policy_params

    def _combine(self, frozen, policy_params):
        if self.adapter is None:
            return policy_params
        from easytune import adapters
        return adapters.apply(frozen, policy_params, self.adapter.config, self.model.config)

    # ------------------------------------------------------------------ one iteration

    def generate(self, records: list[dict]) -> dict[str, np.ndarray]:
        """Completions for `records` (each repeated rollouts_per_prompt times) -> rollout rows."""
        group = self.options.group_size
        prompts = [ids for ids in map(self.prompt_ids, records) for _ in range(group)]
        # a multiple of 16, not generate's power of two: every rollout row is trained on, and
        # prompts of similar lengths still share one compiled program
        tokens, positions, segments = generate.left_pad(prompts, -(-max(map(len, prompts)) // 16) * 16)
        spec = sharding.input_sharding(self.mesh, len(prompts))
        inputs = [jax.device_put(x, spec) for x in (tokens, positions, segments)]
        key = jax.random.fold_in(jax.random.key(self.settings.seed), self.step)
        sampling = generate.SamplingConfig(self.settings.max_new_tokens, temperature=self.options.temperature)
        with jax.set_mesh(self.mesh):
            params = self._combine(self.policy.frozen, self._model_params(self.policy.params))
            responses = generate.generate(self.model.config, params, inputs, sampling, self.eos_ids,
                                          self.model.pad_token_id, key)
        return response_rows(tokens, positions, segments, host_array(responses), self.eos_ids)

    def record(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The rollout-time log-probs, reference log-probs, entropy and values `[batch, response]`."""
        chunks = self.rollout_batch // self.micro
        model_rows = {k: rows[k] for k in ("input_ids", "positions", "segment_ids", "response_mask")}
        with jax.set_mesh(self.mesh):
            batch = sharding.global_batch(self.mesh, model_rows, chunks)
            outputs = self._record(self.policy.params, self.policy.frozen,
                                   None if self.critic is None else self.critic.params, batch)
            outputs = [host_array(x).reshape(self.rollout_batch, -1) for x in outputs]
        return dict(zip(("old_logprobs", "ref_logprobs", "entropy", "old_values"), outputs))

    def shaped_scores(self, rows: dict[str, np.ndarray], scores: np.ndarray) -> tuple[np.ndarray, dict]:
        """The scores `[batch]` the advantages see: less `missing_eos_penalty` for completions
        without EOS, plus DAPO's soft overlong penalty (a function of each completion's length,
        EOS included) when `overlong_buffer` > 0; and the penalty's mean as a metric."""
        settings = self.settings
        has_eos = rows["has_eos"][:, 0] > 0
        scores = np.asarray(ppo.penalize_missing_eos(scores, has_eos, np.float32(settings.missing_eos_penalty)),
                            np.float32)
        if not settings.overlong_buffer:
            return scores, {}
        penalty = np.asarray(ppo.overlong_penalty(rows["response_mask"].sum(axis=1), settings.overlong_limit,
                                                  settings.overlong_buffer), np.float32)
        return scores + penalty, {"reward/overlong_penalty": float(penalty.mean())}

    def advantages(self, rows: dict[str, np.ndarray], scores: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
        """Advantages and returns `[batch, response]` from the algorithm's registered estimator,
        the iteration's KL coefficient `kl_coef` `[batch, 1]` (the controller's value now, read
        by the loss when the KL is placed there), `keep` `[batch, 1]` (0 for the completions of
        the prompt groups dynamic sampling drops, else 1), and the iteration's reward metrics."""
        o = self.options
        mask = jnp.asarray(rows["response_mask"], jnp.float32)
        scores = jnp.asarray(scores)
        kl = ppo.kl_penalty(jnp.asarray(rows["old_logprobs"]), jnp.asarray(rows["ref_logprobs"]),
                            o.kl_estimator) * mask
        kl_coef = self.kl.value
        charged = kl if o.kl_placement.in_reward else jnp.zeros_like(kl)
        advantages, returns, metrics = o.advantage_estimator.estimate(o, scores, charged, kl_coef, mask,
                                                                      jnp.asarray(rows["old_values"]))
        metrics = {name: float(value) for name, value in metrics.items()}
        sequence_kl = jnp.sum(kl, axis=1)
        metrics["objective/kl"] = float(jnp.mean(sequence_kl))
        metrics["objective/rlhf_reward"] = float(jnp.mean(scores - kl_coef * sequence_kl))
        metrics["kl_coef"] = kl_coef
        keep = np.ones((len(scores), 1), np.float32)
        if o.dynamic_sampling:
            keep[np.asarray(ppo.uniform_groups(scores, o.group_size))] = 0.0
            metrics["reward/dropped_groups"] = float((keep[::o.group_size] == 0).sum())
        out = {"advantages": np.asarray(advantages, np.float32), "returns": np.asarray(returns, np.float32),
               "kl_coef": np.full((len(scores), 1), kl_coef, np.float32), "keep": keep}
        return out, metrics

    def update(self, rows: dict[str, np.ndarray]) -> list[dict]:
        """PPO epochs over shuffled minibatches; returns each optimizer step's metrics (host floats)."""
        train_keys = ("input_ids", "positions", "segment_ids", "response_mask", "old_logprobs", "ref_logprobs",
                      "advantages", "returns", "old_values", "kl_coef")
        rng = np.random.default_rng([self.settings.seed, self.step])
        step_metrics = []
        with jax.set_mesh(self.mesh):
            for _ in range(self.settings.ppo_epochs):
                order = rng.permutation(self.rollout_batch)
                for start in range(0, self.rollout_batch, self.minibatch):
                    index = order[start:start + self.minibatch]
                    batch = sharding.global_batch(self.mesh, minibatch_rows(rows, index, train_keys),
                                                  self.settings.grad_accum_steps)
                    metrics = dict(self.policy.train_step(batch))
                    if self.critic is not None:
                        value_metrics = self.critic.train_step(batch)
                        metrics.update({("value/grad_norm" if k == "grad_norm" else k): v
                                        for k, v in value_metrics.items() if k not in ("loss", "trained_tokens")})
                    step_metrics.append(metrics)
        return [{k: float(v) for k, v in m.items()} for m in jax.device_get(step_metrics)]

    def advance(self) -> tuple[dict, None]:
        """One rollout batch and its updates; returns the iteration's metrics (host floats)."""
        timings = {}
        start = time.perf_counter()
        records = [self.records[i] for i in next(self.prompts)["index"][:, 0]]
        rows = self.generate(records)
        timings["time/generation"] = time.perf_counter() - start

        mark = time.perf_counter()
        rows.update(self.record(rows))
        timings["time/rollout_forward"] = time.perf_counter() - mark

        mark = time.perf_counter()
        expanded = [r for r in records for _ in range(self.options.group_size)]
        ids = completion_ids(rows)
        raw_scores = np.asarray(self.score(expanded, ids), np.float32)
        scores, shaping_metrics = self.shaped_scores(rows, raw_scores)
        has_eos = rows["has_eos"][:, 0] > 0
        timings["time/reward"] = time.perf_counter() - mark

        mark = time.perf_counter()
        advantage_rows, metrics = self.advantages(rows, scores)
        metrics.update(shaping_metrics)
        rows.update(advantage_rows)
        step_metrics = self.update(rows)
        timings["time/train"] = time.perf_counter() - mark

        mask = rows["response_mask"].astype(np.float32)
        lengths = mask.sum(axis=1)
        metrics.update({
            "reward/mean": float(raw_scores.mean()), "reward/std": float(raw_scores.std()),
            "reward/penalized_mean": float(scores.mean()),
            "objective/entropy": float((rows["entropy"] * mask).sum() / mask.sum()),
            "response/length_mean": float(lengths.mean()), "response/length_max": float(lengths.max()),
            "response/eos_fraction": float(has_eos.mean()),
        })
        for name in step_metrics[0]:
            metrics[name if "/" in name else f"policy/{name}"] = float(np.mean([m[name] for m in step_metrics]))
        metrics["policy/ratio_deviation_first_step"] = step_metrics[0]["policy/ratio_deviation"]
        self.kl.update(metrics["objective/kl"], self.rollout_batch)
        self.step += 1
        timings["time/iteration"] = time.perf_counter() - start
        metrics.update(timings)
        metrics["episodes"] = self.step * self.rollout_batch
        self.iterations.append(metrics)
        return metrics, None

    def learning_rate(self) -> float:
        return self.policy.learning_rate()

    def state_bytes(self) -> dict[str, int]:
        """The policy's live train state (`Trainer.state_bytes`), plus the critic's (`critic_*`)."""
        out = dict(self.policy.state_bytes())
        if self.critic is not None:
            out.update({f"critic_{k}": v for k, v in self.critic.state_bytes().items()})
        return out

    def state(self) -> dict:
        return {"iteration": self.step, "prompts": self.prompts.state(), "kl_coef": self.kl.value}

    def save(self) -> None:
        state = self.state()
        self.policy.save(state)
        if self.critic is not None:
            self.critic.save(state)

    def restore(self) -> bool:
        """The policy's newest checkpoint and the critic's of the same iteration."""
        state = self.policy.restore_latest()
        if state is None:
            return False
        value_state = self.critic.restore_latest() if self.critic is not None else state
        if value_state is None or value_state["iteration"] != state["iteration"]:
            raise ValueError(f"the policy checkpoint in {self.policy.manager.directory} is at iteration "
                             f"{state['iteration']} but the critic's is at "
                             f"{None if value_state is None else value_state['iteration']}; resume needs both from "
                             f"the same save.")
        self.step = int(state["iteration"])
        self.prompts.restore(state["prompts"])
        self.kl.value = float(state["kl_coef"])
        return True

    def save_best(self, metric: str, value: float, mode: str) -> None:
        """The policy (the critic is not needed to use it) as the best by `metric`."""
        self.policy.save_best(metric, value, mode)

    def publish(self) -> None:
        """Hand the trained policy back to the model handle (generation, eval, export)."""
        self.policy.publish()
