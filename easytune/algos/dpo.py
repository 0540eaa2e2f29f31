"""Preference optimization: DPO (with cDPO label smoothing), IPO, hinge, robust DPO, ORPO, SimPO.

Pure functions in layers, so each can be checked against TRL on identical tensors:

    token_logps(logits, target_ids)              -> [batch, seq] log p(target)
    sequence_logps(token_logps, mask)            -> (sum over the response [batch], response tokens [batch])
    preference_losses(options, policy/reference logps, lengths) -> (loss, chosen reward, rejected reward) [pairs]
    make_loss(options)                           -> loss_fn(model_config, params, batch[, reference]) for train.Trainer

With Δ = (π_c − ref_c) − (π_r − ref_r), the difference of summed response log-prob ratios, n the
response lengths and avg = summed log-probs / n:

    sigmoid  −(1−ε) logσ(βΔ) − ε logσ(−βΔ)                    DPO; ε = --label_smoothing gives cDPO
    ipo      ((Δ_c / n_c − Δ_r / n_r) − 1/(2β))²               IPO, length-normalized as TRL (β is τ)
    hinge    max(0, 1 − βΔ)                                     SLiC
    robust   ((1−ε)(−logσ(βΔ)) + ε logσ(−βΔ)) / (1 − 2ε)       robust DPO, ε the label-flip rate
    orpo     −avg_c − β logσ(log odds(avg_c) − log odds(avg_r)),  odds(p) = p / (1 − p)
             ORPO as in the paper: the NLL of the chosen *response* (per pair, mean over its tokens)
             plus β (the paper's λ) times the odds-ratio term. TRL's ORPOTrainer differs in the NLL
             only: it averages over the prompt and response tokens of the whole chosen batch.
    simpo    −(1−ε) logσ(β(avg_c − avg_r) − γ) − ε logσ(−β(avg_c − avg_r) + γ)   SimPO, no NLL term

ORPO and SimPO need no reference; `reference_free` makes the DPO family use reference log-probs
of 0. The logged rewards are β(π − ref) (DPO family) or β·avg (ORPO, SimPO), as TRL logs them.

A batch holds a pair per row: `chosen_<key>` and `rejected_<key>` for every key of
`easytune.data.make_rows` (`[batch, seq]`), and optionally `ref_chosen_logps` /
`ref_rejected_logps` `[batch, 1]` (precomputed reference). Chosen and rejected go through one
forward, interleaved on the batch axis (which keeps each device's rows on that device).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from easytune.algos.logprobs import model_logprobs, token_logps  # noqa: F401 (token_logps: this module's API too)
from easytune.data.packing import ROW_KEYS

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "orpo", "simpo")
REFERENCE_FREE_LOSSES = ("orpo", "simpo")  # these never use a reference policy
SIDES = ("chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_free: bool = False
    simpo_gamma: float = 0.5

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown --loss_type {self.loss_type!r}; use one of {', '.join(LOSS_TYPES)}.")
        if self.beta <= 0:
            raise ValueError(f"--beta must be positive, got {self.beta}.")
        if self.loss_type == "robust" and not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"the robust loss needs 0 <= --label_smoothing < 0.5 (the label-flip rate), got "
                             f"{self.label_smoothing}.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"--label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if self.label_smoothing and self.loss_type in ("ipo", "hinge", "orpo"):
            raise ValueError(f"--label_smoothing has no meaning for the {self.loss_type} loss; it applies to "
                             f"sigmoid (cDPO), robust and simpo.")

    @property
    def uses_reference(self) -> bool:
        """Whether the loss compares against a reference policy."""
        return self.loss_type not in REFERENCE_FREE_LOSSES and not self.reference_free

    @property
    def length_normalized(self) -> bool:
        return self.loss_type in ("orpo", "simpo")


# ----------------------------------------------------------------------------- log-probs

def sequence_logps(per_token: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(sum of per_token over mask, mask count)`, each `[batch]` float32."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_token * mask, axis=-1), jnp.sum(mask, axis=-1)


def both_sides(batch, key: str) -> jax.Array:
    """`chosen_<key>` and `rejected_<key>` `[batch, seq]` interleaved into `[2 * batch, seq]` (rows
    2i and 2i + 1 are pair i): one forward for both, and each device keeps its own pairs' rows."""
    chosen, rejected = batch[f"chosen_{key}"], batch[f"rejected_{key}"]
    return jnp.stack([chosen, rejected], axis=1).reshape(2 * chosen.shape[0], *chosen.shape[1:])


def pair_logps(model_config, params, batch) -> dict[str, jax.Array]:
    """Summed response log-probs and response lengths of both sides, from ONE forward over the
    chosen and rejected rows (`both_sides`): `{chosen, rejected, chosen_count, rejected_count}`,
    each `[batch]`."""
    rows = {key: both_sides(batch, key) for key in ROW_KEYS}
    per_token = model_logprobs(model_config, params, rows["input_ids"], rows["positions"], rows["segment_ids"],
                               rows["target_ids"])
    sums, counts = sequence_logps(per_token, rows["loss_mask"])
    sums, counts = sums.reshape(-1, 2), counts.reshape(-1, 2)
    return {"chosen": sums[:, 0], "rejected": sums[:, 1], "chosen_count": counts[:, 0], "rejected_count": counts[:, 1]}


# ----------------------------------------------------------------------------- losses

def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 − exp(x)) for x < 0, stable on both sides of −log 2."""
    return jnp.where(x < -np.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def preference_losses(options: PreferenceConfig, policy_chosen: jax.Array, policy_rejected: jax.Array,
                      chosen_lengths: jax.Array, rejected_lengths: jax.Array,
                      reference_chosen: jax.Array | None = None, reference_rejected: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair `(loss, chosen reward, rejected reward)` `[pairs]` from summed response log-probs
    `[pairs]` of the policy (and the reference, for losses that use one; None = 0) and the
    response lengths `[pairs]` (in tokens). See the module doc for the definitions."""
    o = options
    beta, eps = o.beta, o.label_smoothing
    chosen_lengths = jnp.maximum(chosen_lengths, 1.0)
    rejected_lengths = jnp.maximum(rejected_lengths, 1.0)
    if o.length_normalized:
        chosen_avg, rejected_avg = policy_chosen / chosen_lengths, policy_rejected / rejected_lengths
        if o.loss_type == "orpo":
            log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
            losses = -chosen_avg - beta * jax.nn.log_sigmoid(log_odds)
        else:  # simpo
            logits = beta * (chosen_avg - rejected_avg) - o.simpo_gamma
            losses = -(1 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)
        rewards = beta * chosen_avg, beta * rejected_avg
        return losses, jax.lax.stop_gradient(rewards[0]), jax.lax.stop_gradient(rewards[1])

    if not o.uses_reference or reference_chosen is None:
        reference_chosen = reference_rejected = jnp.zeros_like(policy_chosen)
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    delta = chosen_ratio - rejected_ratio
    if o.loss_type == "sigmoid":
        losses = -(1 - eps) * jax.nn.log_sigmoid(beta * delta) - eps * jax.nn.log_sigmoid(-beta * delta)
    elif o.loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * delta)
    elif o.loss_type == "ipo":
        losses = (chosen_ratio / chosen_lengths - rejected_ratio / rejected_lengths - 1 / (2 * beta)) ** 2
    else:  # robust
        losses = ((1 - eps) * -jax.nn.log_sigmoid(beta * delta)
                  + eps * jax.nn.log_sigmoid(-beta * delta)) / (1 - 2 * eps)
    return (losses, jax.lax.stop_gradient(beta * chosen_ratio), jax.lax.stop_gradient(beta * rejected_ratio))


def make_loss(options: PreferenceConfig):
    """The training loop's loss: `loss_fn(model_config, params, batch, reference_params=None) ->
    (sum of pair losses, number of pairs, {metric: sum over pairs})`. Reference log-probs come
    from the batch (`ref_chosen_logps`, precomputed) or from a forward of `reference_params`;
    rows with no response token (eval padding) count for nothing."""

    def loss_fn(model_config, params, batch, reference_params=None):
        policy = pair_logps(model_config, params, batch)
        valid = (policy["chosen_count"] > 0) & (policy["rejected_count"] > 0)
        # padding rows: finite stand-ins (log1mexp(0) is -inf), weighted 0 below
        safe = lambda x: jnp.where(valid, x, -1.0)  # noqa: E731
        reference = {"chosen": None, "rejected": None}
        if options.uses_reference:
            if "ref_chosen_logps" in batch:
                reference = {side: batch[f"ref_{side}_logps"][:, 0] for side in SIDES}
            elif reference_params is not None:
                reference = jax.lax.stop_gradient(pair_logps(model_config, reference_params, batch))
            else:
                raise ValueError(f"the {options.loss_type} loss needs reference log-probs: a reference model "
                                 f"(Trainer(reference=True)) or precomputed ref_chosen_logps/ref_rejected_logps.")
        losses, chosen_rewards, rejected_rewards = preference_losses(
            options, safe(policy["chosen"]), safe(policy["rejected"]),
            jnp.where(valid, policy["chosen_count"], 1.0), jnp.where(valid, policy["rejected_count"], 1.0),
            reference["chosen"], reference["rejected"])
        weight = valid.astype(jnp.float32)
        total = lambda x: jnp.sum(jnp.where(valid, x, 0.0))  # noqa: E731
        metrics = {"rewards/chosen": total(chosen_rewards), "rewards/rejected": total(rejected_rewards),
                   "rewards/accuracy": total((chosen_rewards > rejected_rewards).astype(jnp.float32)),
                   "rewards/margin": total(chosen_rewards - rejected_rewards),
                   "logps/chosen": total(jax.lax.stop_gradient(policy["chosen"])),
                   "logps/rejected": total(jax.lax.stop_gradient(policy["rejected"]))}
        return total(losses), jnp.sum(weight), metrics

    return loss_fn


# ----------------------------------------------------------------------------- precomputed reference

def reference_logps(model_config, params, rows: dict[str, np.ndarray], mesh, batch_size: int
                    ) -> dict[str, np.ndarray]:
    """The reference policy's summed response log-probs for every pair of `rows`, in one pass of
    `batch_size` pairs at a time: `{"ref_chosen_logps", "ref_rejected_logps"}` `[num_pairs, 1]`
    float32, to add to the rows (then the loss needs no reference model)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from easytune import train
    replicated = NamedSharding(mesh, P())
    compute = jax.jit(lambda p, b: pair_logps(model_config, p, b), out_shardings=replicated)
    num_pairs = len(rows["chosen_input_ids"])
    model_rows = {k: v for k, v in rows.items() if k.startswith(SIDES)}
    out = {side: [] for side in SIDES}
    with jax.set_mesh(mesh):
        for host_rows in train.eval_batches(model_rows, batch_size):
            batch = {k: v[0] for k, v in train.global_batch(mesh, host_rows, 1).items()}
            logps = jax.device_get(compute(params, batch))
            for side in SIDES:
                out[side].append(np.asarray(logps[side], np.float32))
    return {f"ref_{side}_logps": np.concatenate(out[side])[:num_pairs, None] for side in SIDES}
