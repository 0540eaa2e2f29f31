"""RL for language models: PPO, GRPO and its family (DAPO, Dr. GRPO, GSPO) and RLOO, as pure
functions over `[batch, response]` arrays.

Each piece matches TRL's definition on identical tensors (tests/test_ppo_trl.py):

    masked_mean / masked_var / masked_whiten         TRL's (unbiased variance, rsqrt(var + 1e-8))
    kl_penalty(logprobs, ref_logprobs, estimator)    k1 = log π − log π_ref; k2 = ½(log ratio)²;
                                                     k3 = exp(log π_ref − log π) − 1 − (log π_ref − log π)
    penalize_missing_eos(scores, has_eos, penalty)   scores − penalty for completions without EOS
    overlong_penalty(lengths, max_length, buffer)    DAPO's soft overlong punishment: 0, linear to −1 over
                                                     the last `buffer` tokens before max_length, −1 past it
    token_rewards(scores, kl, end_index, kl_coef)    −β·KL per token, the sequence score added at end_index
    gae(rewards, values, gamma, lam)                 generalized advantage estimation -> (advantages, returns)
    group_advantages(rewards, group_size, scale)     GRPO: (r − group mean) / (std + 1e-4); Dr. GRPO: no std
    uniform_groups(scores, group_size)               the prompt groups DAPO's dynamic sampling drops
    leave_one_out_advantages(rewards, group_size)    RLOO: r − mean of the other completions of the prompt
    clipped_policy_loss(...)                         max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high)), per token or
                                                     per sequence (GSPO's ρ = exp(mean log ratio))
    clipped_value_loss(...)                          ½·max((v − R)², (clip(v, v_old ± ε_v) − R)²) per token
    AdaptiveKLController                             Ziegler et al. 2019's proportional controller

An algorithm (`ALGORITHMS`: ppo, grpo, dapo, dr_grpo, gspo, rloo) names its registered pieces
(`easytune.algos.registry`, as google/tunix): an advantage estimator (`ADVANTAGE_ESTIMATORS`: gae,
group, leave_one_out), a policy loss (`POLICY_LOSSES`: per_token, per_sequence, sequence_ratio),
the KL placements it takes (`KL_PLACEMENTS`: reward, loss, none) and the loss types it takes
(`LOSS_TYPES`, TRL GRPOTrainer's `loss_type` names: dapo and bnpo = Σ over the minibatch's tokens /
their number, grpo = mean over sequences of each one's token mean, dr_grpo = Σ / (sequences ×
max_new_tokens)), the first of each its default; and its defaults for the upper clip epsilon and
dynamic sampling. The RL loop and the losses look the pieces up by name and never ask which
algorithm runs, so a variant is one function registered with `@advantage_estimator(...)`,
`@policy_loss(...)` or `@loss_type(...)` and one `ALGORITHMS.add(name, Algorithm(...))` line:

    grpo     group (--scale_rewards), per_token, KL loss|reward|none, loss dapo|bnpo|grpo|dr_grpo
    dapo     as grpo, with clip-higher (ε_high 0.28), dynamic sampling and no KL by default; its
             overlong penalty is a reward term of the rollout (--overlong_buffer)
    dr_grpo  as grpo, with --scale_rewards=none only and --loss_type=dr_grpo by default
    gspo     group, sequence_ratio, KL loss|reward|none, --loss_type=grpo by default (TRL's
             importance_sampling_level="sequence"; with dapo, bnpo or dr_grpo each sequence's
             loss then weighs by its length, as with TRL, which warns about it)

The losses the training loop runs (`policy_loss_fn`, `value_loss_fn`) read a rollout
batch: `input_ids`, `positions`, `segment_ids` `[batch, prompt + response]` (prompt left-padded,
response right-padded) and per-response-token `[batch, response]` arrays: `response_mask` (1 up to
and including the EOS; all 0 for a row dynamic sampling dropped), `old_logprobs` and `old_values`
(recorded at rollout time, before any update), `ref_logprobs`, `advantages`, `returns`; and
`kl_coef` `[batch, 1]`, the iteration's KL coefficient (a traced input, so the adaptive
controller's value reaches the loss).

Conventions (where TRL's PPOTrainer is tied to its own padding, ours are stated):
- A response's tokens run up to and including its first EOS; a response with no EOS runs to
  max_new_tokens (and may pay --missing_eos_penalty).
- The score is added to the reward of the response's last token (the EOS), and values are 0 past
  it, so GAE's bootstrap ends there.
- Log-probs are of logits / temperature, at rollout and in training alike.
- The loss types normalize per minibatch (over its micro-batches): TRL's "dapo" divides by the
  generation batch's tokens / optimizer steps per generation and "bnpo" by each micro-batch's
  tokens; they equal ours with one minibatch per iteration and no accumulation respectively.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from easytune import models, recipe
from easytune.algos.logprobs import entropy_from_logits, model_logprobs  # noqa: F401 (entropy_from_logits: this module's API too)
from easytune.algos.registry import Registry

KL_ESTIMATORS = ("k1", "k2", "k3")
WHITEN_EPS = 1e-8       # TRL's masked_whiten
GROUP_STD_EPS = 1e-4    # TRL's GRPO/RLOO advantage scaling


# ----------------------------------------------------------------------------- variants by name

@dataclasses.dataclass(frozen=True)
class AdvantageEstimator:
    """`estimate(options, scores, kl, kl_coef, mask, values) -> (advantages, returns, metrics)`.

    scores `[batch]` (a prompt's completions consecutive); kl `[batch, response]` the per-token KL
    the rewards are charged (0 where the placement charges it in the loss, or past a response);
    kl_coef the controller's beta; mask `[batch, response]`; values `[batch, response]` the
    critic's at rollout time (zeros without a critic). advantages and returns `[batch, response]`,
    0 past each response; metrics: name -> scalar, logged with the iteration."""

    estimate: Callable
    uses_critic: bool = False   # reads values: a critic is trained beside the policy
    min_group_size: int = 1     # compares a prompt's completions: --rollouts_per_prompt >= this


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    """`losses(options, logps, old_logprobs, advantages, mask, kl) -> (losses, ratio, clipped, weight)`.

    logps, old_logprobs, advantages, mask `[batch, response]`; kl `[batch, response]` the per-token
    in-loss KL term (beta already applied) or None when the placement puts none in the loss.
    `losses` is per token `[batch, response]` (a sequence-level loss is put on each of its tokens,
    as TRL broadcasts its `(B, 1)` losses), for the --loss_type to aggregate; `ratio`, `clipped`
    (where the clip was active) and `weight` (0 for padding) are per ratio unit: `[batch, response]`
    for a token ratio, `[batch]` for a sequence ratio, and the clip fraction and mean ratio are
    reported over those units."""

    losses: Callable


@dataclasses.dataclass(frozen=True)
class LossType:
    """How a minibatch's per-token losses become one number (TRL GRPOTrainer's `loss_type`):
    `weights(mask) -> (weight [batch, response], count)`, the loss being Σ loss·weight / Σ count over
    the minibatch's micro-batches. A row whose mask is all 0 (a group dynamic sampling dropped) is
    in neither. `unit` names what count counts in the metrics."""

    weights: Callable
    unit: str
    description: str            # what it does, for errors


@dataclasses.dataclass(frozen=True)
class KLPlacement:
    """Where beta * KL(π || π_ref) is charged: folded into the rewards before the advantages
    (per token, with --kl_estimator), and/or added to the policy loss per token with
    `loss_estimator` (beta the batch's traced `kl_coef`)."""

    in_reward: bool
    loss_estimator: str | None
    description: str            # what it does, for errors


GROUP_LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """An RL algorithm as the names of its registered pieces and the choices it takes: the KL
    placements (--kl_in), loss types (--loss_type) and advantage scalings (--scale_rewards; () when
    its estimator reads none), the first of each its default; its default upper clip epsilon (0:
    --cliprange) and whether it drops prompt groups that all scored the same (DAPO's dynamic
    sampling)."""

    advantage_estimator: str
    policy_loss: str
    kl_placements: tuple[str, ...]
    loss_types: tuple[str, ...] = GROUP_LOSS_TYPES
    scale_rewards: tuple[str, ...] = SCALE_REWARDS
    cliprange_high: float = 0.0
    dynamic_sampling: bool = False

    def __post_init__(self):  # a misspelt piece fails at registration, not in the first iteration
        ADVANTAGE_ESTIMATORS.get(self.advantage_estimator)
        POLICY_LOSSES.get(self.policy_loss)
        for name in self.kl_placements:
            KL_PLACEMENTS.get(name)
        for name in self.loss_types:
            LOSS_TYPES.get(name)
        if not set(self.scale_rewards) <= set(SCALE_REWARDS):
            raise ValueError(f"unknown scale_rewards in {self.scale_rewards}; use {', '.join(SCALE_REWARDS)}.")


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")
LOSS_TYPES: Registry[LossType] = Registry("--loss_type")
KL_PLACEMENTS: Registry[KLPlacement] = Registry("--kl_in")
ALGORITHMS: Registry[Algorithm] = Registry("--algo")


def advantage_estimator(name: str, *, uses_critic: bool = False, min_group_size: int = 1):
    """Registers the decorated `estimate` (see `AdvantageEstimator`) as advantage estimator `name`."""
    def register(estimate):
        ADVANTAGE_ESTIMATORS.add(name, AdvantageEstimator(estimate, uses_critic, min_group_size))
        return estimate
    return register


def policy_loss(name: str):
    """Registers the decorated `losses` (see `PolicyLoss`) as policy loss `name`."""
    def register(losses):
        POLICY_LOSSES.add(name, PolicyLoss(losses))
        return losses
    return register


def loss_type(*names: str, unit: str, description: str):
    """Registers the decorated `weights` (see `LossType`) as each of the loss types `names`."""
    def register(weights):
        for name in names:
            LOSS_TYPES.add(name, LossType(weights, unit, description))
        return weights
    return register


def _listed(names, conjunction: str = "and") -> str:
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {conjunction} {names[-1]}"


def _algorithm_choice(algo: str, flag: str, value, field: str, takes: str):
    """`value` of --`flag`, or the algorithm's default (the first of its `field`) when None; one
    the algorithm does not take is an error that says what it takes (`takes`) and which
    algorithms take `value`."""
    accepted = getattr(ALGORITHMS.get(algo), field)
    if value is None:
        return accepted[0] if accepted else None
    if value not in accepted:
        takers = [name for name in ALGORITHMS if value in getattr(ALGORITHMS.get(name), field)]
        raise ValueError(f"{algo.upper()} {takes}; --{flag}={value} is for {_listed(takers)}.")
    return value


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """What the losses and advantages need; the entry point's flags fill it (see train_ppo --help).
    None (and cliprange_high 0) is the algorithm's choice; __post_init__ fills it in and refuses a
    choice the algorithm does not take."""

    algo: str = "ppo"
    temperature: float = 1.0
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    kl_in: str | None = None          # a KL_PLACEMENTS name
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    whiten_advantages: bool = True    # PPO
    cliprange: float = 0.2
    cliprange_high: float = 0.0       # 0 = the algorithm's (DAPO's clip-higher 0.28), else cliprange
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    scale_rewards: str | None = None  # group estimators: group, batch or none
    normalize_advantages: bool = False  # RLOO: whiten over the batch after the baseline
    group_size: int = 1               # completions per prompt
    loss_type: str | None = None      # a LOSS_TYPES name (TRL's loss_type)
    dynamic_sampling: bool | None = None  # drop prompt groups that all scored the same (DAPO)
    exact_ratio: bool = True          # the loss's forward under jax.checkpoint (`loss_forward`)

    def __post_init__(self):
        algorithm = ALGORITHMS.get(self.algo)
        name = self.algo.upper()
        resolve = lambda field, value: object.__setattr__(self, field, value)  # noqa: E731 (frozen)
        KL_PLACEMENTS.get(self.kl_in or algorithm.kl_placements[0])
        resolve("kl_in", _algorithm_choice(self.algo, "kl_in", self.kl_in, "kl_placements",
                                           KL_PLACEMENTS.get(algorithm.kl_placements[0]).description))
        if self.loss_type is not None:
            LOSS_TYPES.get(self.loss_type)
        default_loss = LOSS_TYPES.get(algorithm.loss_types[0])
        resolve("loss_type", _algorithm_choice(self.algo, "loss_type", self.loss_type, "loss_types",
                                               f"{default_loss.description} (--loss_type={algorithm.loss_types[0]})"))
        if self.scale_rewards is not None and self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"--scale_rewards must be group, batch or none, got {self.scale_rewards!r}.")
        resolve("scale_rewards", _algorithm_choice(
            self.algo, "scale_rewards", self.scale_rewards, "scale_rewards",
            "has no group advantages to scale" if not algorithm.scale_rewards
            else "does not divide its advantages by a standard deviation (--scale_rewards=none)"
            if algorithm.scale_rewards == ("none",)
            else f"takes --scale_rewards={' or '.join(algorithm.scale_rewards)}"))
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown --kl_estimator {self.kl_estimator!r}; use k1, k2 or k3.")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0 for RL rollouts (sampling), got {self.temperature}.")
        minimum = self.advantage_estimator.min_group_size
        if self.group_size < minimum:
            raise ValueError(f"{self.algo} compares the completions of a prompt: --rollouts_per_prompt must be "
                             f">= {minimum}, got {self.group_size}.")
        if self.dynamic_sampling is None:
            resolve("dynamic_sampling", algorithm.dynamic_sampling)
        if self.dynamic_sampling and minimum < 2:
            groups = [n for n in ALGORITHMS if ADVANTAGE_ESTIMATORS.get(ALGORITHMS.get(n).advantage_estimator)
                      .min_group_size >= 2]
            raise ValueError(f"--dynamic_sampling drops prompt groups whose completions all scored the same, and "
                             f"{name} has no prompt groups (use {_listed(groups, 'or')}).")
        if not 0 < self.cliprange < 1:
            raise ValueError(f"--cliprange must be in (0, 1), got {self.cliprange}.")
        if self.cliprange_high < 0:
            raise ValueError(f"--cliprange_high must be >= 0 (0 = the algorithm's), got {self.cliprange_high}.")
        if self.kl_coef < 0:
            raise ValueError(f"--kl_coef must be >= 0, got {self.kl_coef}.")

    @property
    def clip_high(self) -> float:
        return self.cliprange_high or ALGORITHMS.get(self.algo).cliprange_high or self.cliprange

    @property
    def advantage_estimator(self) -> AdvantageEstimator:
        return ADVANTAGE_ESTIMATORS.get(ALGORITHMS.get(self.algo).advantage_estimator)

    @property
    def policy_loss(self) -> PolicyLoss:
        return POLICY_LOSSES.get(ALGORITHMS.get(self.algo).policy_loss)

    @property
    def loss_aggregation(self) -> LossType:
        return LOSS_TYPES.get(self.loss_type)

    @property
    def kl_placement(self) -> KLPlacement:
        return KL_PLACEMENTS.get(self.kl_in)

    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator.uses_critic


# ----------------------------------------------------------------------------- masked statistics

def masked_mean(values, mask, axis=None):
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask, axis=axis) / jnp.sum(mask, axis=axis)


def masked_var(values, mask, unbiased: bool = True):
    """Variance over `mask` (Bessel-corrected when `unbiased`, as TRL)."""
    centered = values - masked_mean(values, mask)
    variance = masked_mean(centered ** 2, mask)
    if unbiased:
        count = jnp.sum(mask.astype(values.dtype))
        variance = variance * count / jnp.maximum(count - 1, 1)
    return variance


def masked_whiten(values, mask, shift_mean: bool = True):
    """(values − mean) / sqrt(var + 1e-8) over `mask`; with shift_mean=False the mean is kept."""
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * jax.lax.rsqrt(variance + WHITEN_EPS)
    return whitened if shift_mean else whitened + mean


def explained_variance(values, returns, mask):
    """1 − Var(returns − values) / Var(returns) over `mask`: how much of the return the critic predicts."""
    return 1.0 - masked_var(returns - values, mask) / jnp.maximum(masked_var(returns, mask), 1e-12)


# ----------------------------------------------------------------------------- KL and rewards

def kl_penalty(logprobs, ref_logprobs, estimator: str = "k1"):
    """Per-token KL(π || π_ref) estimate from sampled tokens' log-probs `[batch, response]`
    (Schulman's k1, k2, k3)."""
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return jnp.exp(log_ratio) - 1.0 - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3.")


def penalize_missing_eos(scores, has_eos, penalty: float):
    """Scores `[batch]` minus `penalty` where the completion ended without EOS (`has_eos` False),
    as TRL's `missing_eos_penalty`; penalty 0 changes nothing."""
    return scores - penalty * (1.0 - has_eos.astype(scores.dtype))


def overlong_penalty(lengths, max_length: int, buffer: int):
    """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13; TRL's `get_soft_overlong_punishment`)
    per completion, from its length in tokens `[batch]` (EOS included, as TRL's completion_ids):
    0 up to L_max − L_cache, then falling linearly, ((L_max − L_cache) − length) / L_cache, to −1 at
    L_max, and −1 beyond. `max_length` is L_max, `buffer` L_cache (> 0). A reward term: it is
    added to the scores, so a completion is told it ran long before it is cut off."""
    lengths = jnp.asarray(lengths, jnp.float32)
    start = max_length - buffer
    return jnp.where(lengths <= start, 0.0, jnp.where(lengths <= max_length, (start - lengths) / buffer, -1.0))


def uniform_groups(scores, group_size: int):
    """`[batch]` bool: True for the completions whose prompt group all scored exactly the same,
    the groups DAPO's dynamic sampling drops (their group-relative advantages are all 0: they teach
    nothing and only dilute the token average). scores `[batch]`, a prompt's completions consecutive."""
    grouped = jnp.asarray(scores).reshape(-1, group_size)
    return jnp.repeat(jnp.max(grouped, axis=1) == jnp.min(grouped, axis=1), group_size)


def token_rewards(scores, kl, end_index, kl_coef, mask):
    """Per-token rewards `[batch, response]`: −kl_coef·kl on the response tokens (`mask`), plus each
    row's score `[batch]` at `end_index` `[batch]`. Returns `(rewards, non_score_rewards)`."""
    non_score = jnp.where(mask > 0, -kl_coef * kl, 0.0)
    one_hot = jax.nn.one_hot(end_index, kl.shape[1], dtype=non_score.dtype)
    return non_score + one_hot * scores[:, None], non_score


def gae(rewards, values, gamma: float, lam: float):
    """Generalized advantage estimation over the response axis, bootstrapping 0 after the last
    position: `(advantages, returns = advantages + values)`, each `[batch, response]`. Rewards
    and values must be 0 past each response's end (then nothing flows back from there)."""
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def step(carry, delta):
        carry = delta + gamma * lam * carry
        return carry, carry

    _, reversed_advantages = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), deltas.T[::-1])
    advantages = reversed_advantages[::-1].T
    return advantages, advantages + values


def _nanless_std(grouped, axis):
    """Unbiased standard deviation along `axis` (TRL's nanstd on NaN-free input)."""
    count = grouped.shape[axis]
    mean = jnp.mean(grouped, axis=axis, keepdims=True)
    return jnp.sqrt(jnp.sum((grouped - mean) ** 2, axis=axis) / max(count - 1, 1))


def group_advantages(rewards, group_size: int, scale: str = "group"):
    """GRPO: each completion's reward minus its prompt group's mean, divided by the group's (or
    the batch's) standard deviation + 1e-4 unless scale='none'. rewards `[batch]` with a prompt's
    completions consecutive -> `[batch]`."""
    grouped = rewards.reshape(-1, group_size)
    advantages = (grouped - grouped.mean(axis=1, keepdims=True)).reshape(-1)
    if scale == "group":
        std = jnp.repeat(_nanless_std(grouped, axis=1), group_size)
    elif scale == "batch":
        std = _nanless_std(rewards, axis=0)
    else:
        return advantages
    return advantages / (std + GROUP_STD_EPS)


def leave_one_out_advantages(rewards, group_size: int, normalize: bool = False):
    """RLOO: each completion's reward minus the mean reward of the prompt's other completions,
    optionally standardized over the batch. rewards `[batch]` (a prompt's completions consecutive)."""
    grouped = rewards.reshape(-1, group_size)
    baselines = (grouped.sum(axis=1, keepdims=True) - grouped) / (group_size - 1)
    advantages = (grouped - baselines).reshape(-1)
    if normalize:
        advantages = (advantages - advantages.mean()) / (_nanless_std(advantages, axis=0) + GROUP_STD_EPS)
    return advantages


# ----------------------------------------------------------------------------- losses

def clipped_policy_loss(logprobs, old_logprobs, advantages, clip_low: float, clip_high: float):
    """PPO's clipped surrogate per element: `(loss, ratio, clipped)`, where clipped marks where the
    clipped term is the larger loss (TRL's clip fraction). Any matching shapes (per token, or per
    sequence for a sequence-level ratio)."""
    ratio = jnp.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return jnp.maximum(unclipped, clipped), ratio, (clipped > unclipped)


def clipped_value_loss(values, old_values, returns, cliprange_value: float):
    """PPO's clipped value loss per token: `(½·max((v − R)², (v_clipped − R)²), clipped)`."""
    values_clipped = jnp.clip(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped, clipped = (values - returns) ** 2, (values_clipped - returns) ** 2
    return 0.5 * jnp.maximum(unclipped, clipped), clipped > unclipped


def response_logprobs(model_config, params, batch, temperature: float, with_entropy: bool = False):
    """Log-probs `[batch, response]` of the response tokens under `params` at `temperature`
    (and the per-token entropy with `with_entropy`): read at the positions that predict them."""
    response_length = batch["response_mask"].shape[1]
    return model_logprobs(model_config, params, batch["input_ids"], batch["positions"], batch["segment_ids"],
                          batch["input_ids"][:, -response_length:], temperature=temperature,
                          window=slice(-response_length - 1, -1), with_entropy=with_entropy)


def response_values(model_config, params, batch):
    """The critic's value of the state before each response token: `[batch, response]` float32
    (the score head read at the position that predicts the token)."""
    response_length = batch["response_mask"].shape[1]
    values = models.family(model_config.model_type).forward(
        model_config, params, batch["input_ids"], batch["positions"], batch["segment_ids"])
    return values[:, -response_length - 1:-1, 0].astype(jnp.float32)


def policy_terms(options: RLConfig, logps, entropy, batch):
    """The policy loss of log-probs and entropy `[batch, response]` under the trained params:
    `(sum, count, {metric: sum})` as `policy_loss_fn` returns them."""
    mask = batch["response_mask"].astype(jnp.float32)
    loss_estimator = options.kl_placement.loss_estimator
    log_ratio = logps - batch["old_logprobs"]
    kl = (None if loss_estimator is None
          else batch["kl_coef"] * kl_penalty(logps, batch["ref_logprobs"], loss_estimator))
    losses, ratio, clipped, unit_weight = options.policy_loss.losses(options, logps, batch["old_logprobs"],
                                                                     batch["advantages"], mask, kl)
    weight, count = options.loss_aggregation.weights(mask)
    loss_sum = jnp.sum(losses * weight)
    # diagnostics are means over their own units (the ratio's: tokens or sequences; tokens),
    # scaled so that the loop's sum / count is that mean
    per_ratio_unit = count / jnp.maximum(jnp.sum(unit_weight), 1.0)
    per_token = count / jnp.maximum(jnp.sum(mask), 1.0)
    ratio_total = lambda x: per_ratio_unit * jnp.sum(x * unit_weight)  # noqa: E731
    token_total = lambda x: per_token * jnp.sum(x * mask)  # noqa: E731
    metrics = {
        "policy/clipfrac": ratio_total(clipped.astype(jnp.float32)),
        "policy/ratio": ratio_total(ratio),
        "policy/ratio_deviation": ratio_total(jnp.abs(ratio - 1.0)),  # mean |ratio - 1|: 0 before the first update
        "policy/approxkl": token_total(0.5 * log_ratio ** 2),
        "policy/entropy": token_total(entropy),
        "policy/kl_ref": token_total(kl_penalty(logps, batch["ref_logprobs"], "k3")),
    }
    metrics = {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}
    return loss_sum, count, metrics


def loss_forward(options: RLConfig, forward):
    """The policy losses' forward. With `exact_ratio` (the default) under `jax.checkpoint`: compiled
    as a forward of its own, which the backward recomputes, it rounds exactly as the rollout's
    forward-only pass, so the first update's ratio is exactly 1 on any mesh
    (`policy/ratio_deviation_first_step` 0), at the price of a second forward per minibatch.
    Without it the forward is fused with the backward, which keeps its activations: one forward
    fewer per minibatch (a quarter of the compiled FLOPs of the shared-head loss and gradient in
    `tests/test_ppo_trl.py`), and XLA's reordering leaves the first ratio about 1e-7 from 1."""
    return jax.checkpoint(forward) if options.exact_ratio else forward


def policy_loss_fn(options: RLConfig) -> recipe.Loss:
    """The policy's loss: `(sum, count, {metric: sum})`: the registered policy loss's per-token
    losses, aggregated by the --loss_type (`LOSS_TYPES`): over the minibatch's response tokens
    (dapo, bnpo: PPO's and GRPO's default), as the mean over its sequences of each one's token mean
    (grpo: RLOO's, GSPO's default), or divided by sequences × max_new_tokens (dr_grpo). Where the KL
    placement puts it in the loss (--kl_in=loss), the per-token term is the batch's `kl_coef`
    `[batch, 1]` times k3: an input of the jitted step rather than a constant in it, so an
    adaptive controller's current value is the one trained with, without recompiling. A row whose
    `response_mask` is all 0 (a dropped group) weighs nothing and counts nowhere."""

    def loss_fn(model_config, params, batch, reference=None):
        del reference  # reference log-probs were recorded at rollout time
        logps, entropy = loss_forward(options, lambda p: response_logprobs(
            model_config, p, batch, options.temperature, with_entropy=True))(params)
        return policy_terms(options, logps, entropy, batch)

    # needs_reference: the Trainer holds the reference policy (the rollout records its log-probs)
    return recipe.Loss(loss_fn, options.loss_aggregation.unit, needs_reference=True)


# ----------------------------------------------------------------------------- the shared value head

VALUE_HEAD = "value"  # its name among the policy Trainer's heads (`recipe.Heads`)


def init_value_head(key: jax.Array, hidden_size: int) -> dict:
    """PPO's shared value head (`--critic=shared`): trlx's `make_head(hidden, 1)` (hidden -> 2 hidden
    -> ReLU -> 1, torch `nn.Linear` initialisation), float32, as `{VALUE_HEAD: head}`."""
    from easytune.algos.ilql import init_head
    return {VALUE_HEAD: init_head(key, hidden_size, 1)}


def shared_outputs(model_config, params, batch, temperature: float):
    """`(log-probs, entropy, values)` `[batch, response]` from one forward of the policy, `params`
    `{"model": the policy's parameters, "heads": {VALUE_HEAD: head}}`: the value head reads the
    same final hidden states the LM head does (trlx's `AutoModelForCausalLMWithValueHead`), at the
    positions that predict the response tokens."""
    from easytune.algos.ilql import apply_head
    from easytune.algos.logprobs import logprobs_from_hidden
    response_length = batch["response_mask"].shape[1]
    family = models.family(model_config.model_type)
    hidden, _ = family.hidden_states(model_config, params["model"], batch["input_ids"], batch["positions"],
                                     batch["segment_ids"])
    hidden = hidden[:, -response_length - 1:-1]
    logps, entropy = logprobs_from_hidden(model_config, params["model"], hidden, batch["input_ids"][:, -response_length:],
                                          temperature=temperature, with_entropy=True)
    values = apply_head(params["heads"][VALUE_HEAD], hidden)[..., 0].astype(jnp.float32)
    return logps, entropy, values


def value_terms(options: RLConfig, values, batch):
    """`(summed clipped value loss, summed clipped indicator)` over the response tokens."""
    mask = batch["response_mask"].astype(jnp.float32)
    losses, clipped = clipped_value_loss(values, batch["old_values"], batch["returns"], options.cliprange_value)
    return jnp.sum(losses * mask), jnp.sum(clipped.astype(jnp.float32) * mask)


def shared_loss_fn(options: RLConfig) -> recipe.Loss:
    """PPO with the value head on the policy (`--critic=shared`, trlx's default architecture): one
    loss, the policy loss (`policy_loss_fn`'s) plus `vf_coef` times the clipped value loss's mean
    over the response tokens, so the value gradient reaches the policy's trained parameters (its
    adapter, or all weights) as well as the head. One forward and one backward serve both, where a
    separate critic costs a second model's forward at rollout time and its own forward, backward
    and optimizer step per minibatch. `params`: `{"model": ..., "heads": {VALUE_HEAD: ...}}`."""

    def loss_fn(model_config, params, batch, reference=None):
        del reference
        logps, entropy, values = loss_forward(
            options, lambda p: shared_outputs(model_config, p, batch, options.temperature))(params)
        loss_sum, count, metrics = policy_terms(options, logps, entropy, batch)
        value_sum, clipped_sum = value_terms(options, values, batch)
        # the value loss as a token mean whatever unit the policy loss counts in
        per_token = count / jnp.maximum(jnp.sum(batch["response_mask"].astype(jnp.float32)), 1.0)
        loss_sum = loss_sum + options.vf_coef * per_token * value_sum
        metrics["value/loss"] = jax.lax.stop_gradient(per_token * value_sum)
        metrics["value/clipfrac"] = jax.lax.stop_gradient(per_token * clipped_sum)
        return loss_sum, count, metrics

    return recipe.Loss(loss_fn, options.loss_aggregation.unit, needs_reference=True)


def value_loss_fn(options: RLConfig) -> recipe.Loss:
    """The critic's loss: vf_coef · clipped value loss, averaged over the
    minibatch's value positions (`response_mask`)."""

    def loss_fn(model_config, params, batch):
        values = response_values(model_config, params, batch)
        value_sum, clipped_sum = value_terms(options, values, batch)
        metrics = {"value/loss": jax.lax.stop_gradient(value_sum), "value/clipfrac": clipped_sum}
        return options.vf_coef * value_sum, jnp.sum(batch["response_mask"].astype(jnp.float32)), metrics

    return recipe.Loss(loss_fn, "value_tokens")


# ----------------------------------------------------------------------------- registered variants

@advantage_estimator("gae", uses_critic=True)
def gae_advantages(options: RLConfig, scores, kl, kl_coef, mask, values):
    """PPO (TRL's PPOTrainer): per-token rewards -beta·KL with the score on each response's last
    token (optionally whitened), GAE(γ, λ) over the critic's values, whitened advantages."""
    end_index = jnp.sum(mask, axis=1).astype(jnp.int32) - 1
    rewards, non_score = token_rewards(scores, kl, end_index, kl_coef, mask)
    if options.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
    values = values * mask
    advantages, returns = gae(rewards, values, options.gamma, options.lam)
    if options.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    metrics = {"objective/non_score_reward": jnp.mean(jnp.sum(non_score, axis=1)),
               "value/explained_variance": explained_variance(values, returns, mask),
               "value/mean": masked_mean(values, mask)}
    return advantages * mask, returns * mask, metrics


def _sequence_advantages(per_sequence, scores, mask, group_size: int):
    """A per-sequence advantage `[batch]` on each of its response tokens, no returns (no critic),
    and how much the scores vary within the prompt groups (a group that all scored the same
    teaches nothing)."""
    group_std = jnp.std(scores.reshape(-1, group_size), axis=1)
    metrics = {"reward/group_std": jnp.mean(group_std), "reward/zero_std_groups": jnp.mean(group_std == 0)}
    return per_sequence[:, None] * mask, jnp.zeros_like(mask), metrics


@advantage_estimator("group", min_group_size=2)
def group_relative_advantages(options: RLConfig, scores, kl, kl_coef, mask, values):
    """GRPO's, DAPO's, GSPO's and (--scale_rewards=none) Dr. GRPO's: each completion's score (less
    beta·its KL when the KL is in the reward) against its prompt group's mean, scaled per
    --scale_rewards."""
    del values
    rewards = scores - kl_coef * jnp.sum(kl, axis=1)
    return _sequence_advantages(group_advantages(rewards, options.group_size, options.scale_rewards), scores, mask,
                                options.group_size)


@advantage_estimator("leave_one_out", min_group_size=2)
def leave_one_out_sequence_advantages(options: RLConfig, scores, kl, kl_coef, mask, values):
    """RLOO: each completion's score (less beta·its KL when the KL is in the reward) against the
    mean of its prompt's other completions, optionally standardized (--normalize_advantages)."""
    del values
    rewards = scores - kl_coef * jnp.sum(kl, axis=1)
    return _sequence_advantages(leave_one_out_advantages(rewards, options.group_size, options.normalize_advantages),
                                scores, mask, options.group_size)


@policy_loss("per_token")
def per_token_clipped_losses(options: RLConfig, logps, old_logprobs, advantages, mask, kl):
    """PPO's, GRPO's and DAPO's: one clipped ratio per token (clip-higher: ε_low = --cliprange,
    ε_high = RLConfig.clip_high), the in-loss KL per token."""
    losses, ratio, clipped = clipped_policy_loss(logps, old_logprobs, advantages, options.cliprange, options.clip_high)
    return (losses if kl is None else losses + kl), ratio, clipped, mask


@policy_loss("per_sequence")
def per_sequence_clipped_losses(options: RLConfig, logps, old_logprobs, advantages, mask, kl):
    """RLOO's (TRL's RLOOTrainer): one clipped ratio per sequence, exp(Σ log ratio), with the
    sequence's advantage; the in-loss KL summed over its tokens (the sequence's KL, the scale
    --kl_in=reward charges). With --loss_type=grpo (RLOO's) the mean over the sequences."""
    losses, ratio, clipped = clipped_policy_loss(jnp.sum(logps * mask, -1), jnp.sum(old_logprobs * mask, -1),
                                                 advantages[:, 0], options.cliprange, options.clip_high)
    if kl is not None:
        losses = losses + jnp.sum(kl * mask, -1)
    return (jnp.broadcast_to(losses[:, None], mask.shape), ratio, clipped,
            (jnp.sum(mask, -1) > 0).astype(jnp.float32))


@policy_loss("sequence_ratio")
def sequence_ratio_clipped_losses(options: RLConfig, logps, old_logprobs, advantages, mask, kl):
    """GSPO's (Zheng et al. 2025; TRL's importance_sampling_level="sequence"): one ratio per
    sequence, the geometric mean of its token ratios, exp(mean over its tokens of the log ratio),
    so a long sequence's ratio is not a product of many noisy token ratios; clipped with the
    sequence's advantage, and put on each of its tokens (with the in-loss KL per token) for the
    --loss_type to aggregate. (GSPO-token, whose ratio is the same number with per-token
    gradients, differs only under per-token advantages, which no estimator here makes.)"""
    lengths = jnp.sum(mask, -1)
    mean_log_ratio = jnp.sum((logps - old_logprobs) * mask, -1) / jnp.maximum(lengths, 1.0)
    losses, ratio, clipped = clipped_policy_loss(mean_log_ratio, jnp.zeros_like(mean_log_ratio), advantages[:, 0],
                                                 options.cliprange, options.clip_high)
    losses = jnp.broadcast_to(losses[:, None], mask.shape)
    return (losses if kl is None else losses + kl), ratio, clipped, (lengths > 0).astype(jnp.float32)


@loss_type("dapo", "bnpo", unit="response_tokens", description="averages its loss over the minibatch's tokens")
def token_mean_weights(mask):
    """DAPO's token-level loss (and PPO's masked mean): Σ over the minibatch's tokens / their number,
    so every token weighs the same however long its sequence. TRL's "dapo" divides by the
    generation batch's tokens / the optimizer steps per generation, "bnpo" by each micro-batch's
    tokens: both are this with one minibatch per iteration and no accumulation (one process)."""
    return mask, jnp.sum(mask)


@loss_type("grpo", unit="sequences", description="averages each sequence's token mean over the sequences")
def sequence_mean_weights(mask):
    """The GRPO paper's: each sequence's loss is its token mean, averaged over the sequences (TRL's
    "grpo"), so a long sequence's tokens weigh less than a short one's."""
    lengths = jnp.sum(mask, -1, keepdims=True)
    return mask / jnp.maximum(lengths, 1.0), jnp.sum(lengths > 0).astype(jnp.float32)


@loss_type("dr_grpo", unit="response_slots",
           description="divides its loss sum by the sequences times max_new_tokens")
def max_length_weights(mask):
    """Dr. GRPO's (Liu et al. 2025; TRL's "dr_grpo"): Σ over the tokens / (sequences ×
    max_new_tokens), a constant per sequence, so no sequence's length rescales its tokens.
    max_new_tokens is the response width, TRL's max_completion_length."""
    return mask, jnp.sum(jnp.sum(mask, -1) > 0).astype(jnp.float32) * mask.shape[1]


KL_PLACEMENTS.add("reward", KLPlacement(in_reward=True, loss_estimator=None,
                                        description="folds the KL penalty into the rewards"))
KL_PLACEMENTS.add("loss", KLPlacement(in_reward=False, loss_estimator="k3",
                                      description="adds beta * k3 per token to the policy loss"))
KL_PLACEMENTS.add("none", KLPlacement(in_reward=False, loss_estimator=None,
                                      description="charges no KL penalty (DAPO drops it)"))

ALGORITHMS.add("ppo", Algorithm("gae", "per_token", ("reward",), loss_types=("dapo",), scale_rewards=()))
ALGORITHMS.add("grpo", Algorithm("group", "per_token", ("loss", "reward", "none")))
ALGORITHMS.add("rloo", Algorithm("leave_one_out", "per_sequence", ("reward", "loss"), loss_types=("grpo",),
                                 scale_rewards=()))
# DAPO (Yu et al. 2025): clip-higher, token-level loss, dynamic sampling, no KL; its overlong
# penalty is a reward term (--overlong_buffer, easytune.rl.rollout)
ALGORITHMS.add("dapo", Algorithm("group", "per_token", ("none", "loss", "reward"), cliprange_high=0.28,
                                 dynamic_sampling=True))
# Dr. GRPO (Liu et al. 2025): advantages not divided by the group's std, the loss by a constant
ALGORITHMS.add("dr_grpo", Algorithm("group", "per_token", ("loss", "reward", "none"),
                                    loss_types=("dr_grpo", "dapo", "bnpo", "grpo"), scale_rewards=("none",)))
# GSPO (Zheng et al. 2025): a sequence-level ratio, each sequence's loss weighed alike
ALGORITHMS.add("gspo", Algorithm("group", "sequence_ratio", ("loss", "reward", "none"),
                                 loss_types=("grpo", "dapo", "bnpo", "dr_grpo")))


# ----------------------------------------------------------------------------- KL coefficient

class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        del current_kl, n_steps


class AdaptiveKLController:
    """Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences", §2.2: move the
    coefficient towards the KL target, proportionally, clipped to ±20% of the target:
    β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n_steps/horizon)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"the adaptive KL controller needs --kl_target > 0 and --kl_horizon > 0, got "
                             f"{target} and {horizon}.")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
