"""Preference optimization: DPO (with cDPO label smoothing), IPO, hinge, robust DPO, ORPO, SimPO.

Pure functions in layers, so each can be checked against TRL on identical tensors:

    token_logps(logits, target_ids)              -> [batch, seq] log p(target)
    sequence_logps(token_logps, mask)            -> (sum over the response [batch], response tokens [batch])
    preference_losses(options, policy/reference logps, lengths) -> (loss, chosen reward, rejected reward) [pairs]
    make_loss(options, precomputed)              -> the training loss (`easytune.recipe.Loss`)
    RECIPE                                       -> `python -m easytune.train_dpo` (flags, rows, figures)

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
import hashlib
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from easytune import recipe, storage
from easytune.algos.logprobs import model_logprobs, token_logps  # noqa: F401 (token_logps: this module's API too)
from easytune.data.packing import ROW_KEYS

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "orpo", "simpo")
REFERENCE_FREE_LOSSES = ("orpo", "simpo")  # these never use a reference policy
SIDES = ("chosen", "rejected")
logger = logging.getLogger("easytune")


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


def make_loss(options: PreferenceConfig, precomputed: bool = False) -> recipe.Loss:
    """The training loss: `fn(model_config, params, batch, reference_params=None) -> (sum of pair
    losses, number of pairs, {metric: sum over pairs})`, per pair. Reference log-probs come from
    the batch (`ref_chosen_logps`, `precomputed`) or from a forward of `reference_params` (then the
    Loss `needs_reference`); rows with no response token (eval padding) count for nothing."""

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
                                 f"(make_loss(precomputed=False)) or precomputed ref_chosen_logps/ref_rejected_logps.")
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

    return recipe.Loss(loss_fn, "pairs", needs_reference=options.uses_reference and not precomputed)


# ----------------------------------------------------------------------------- precomputed reference

def batched_logps(compute, params, rows: dict[str, np.ndarray], mesh, batch_size: int) -> dict[str, np.ndarray]:
    """`compute(params, batch) -> {name: [batch]}` (jitted, outputs replicated) over every row of
    `rows`, in one pass of `batch_size` rows at a time: `{name: [num_rows, 1]}` float32, e.g. the
    reference policy's log-probs to add to the rows (then the loss needs no reference model)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from easytune import data, sharding
    jitted = jax.jit(compute, out_shardings=NamedSharding(mesh, P()))
    num_rows = len(next(iter(rows.values())))
    out: dict[str, list] = {}
    with jax.set_mesh(mesh):
        for host_rows in data.eval_batches(rows, batch_size):
            batch = {k: v[0] for k, v in sharding.global_batch(mesh, host_rows, 1).items()}
            for name, value in jax.device_get(jitted(params, batch)).items():
                out.setdefault(name, []).append(np.asarray(value, np.float32))
    return {name: np.concatenate(values)[:num_rows, None] for name, values in out.items()}


def reference_logps(model_config, params, rows: dict[str, np.ndarray], mesh, batch_size: int
                    ) -> dict[str, np.ndarray]:
    """The reference policy's summed response log-probs for every pair of `rows` (`batched_logps`):
    `{"ref_chosen_logps", "ref_rejected_logps"}` `[num_pairs, 1]` float32."""
    model_rows = {k: v for k, v in rows.items() if k.startswith(SIDES)}
    return batched_logps(lambda p, b: {f"ref_{side}_logps": logps for side, logps in pair_logps(model_config, p, b)
                                       .items() if side in SIDES}, params, model_rows, mesh, batch_size)


def cached_reference_logps(path: str, rows: dict, compute,
                           fingerprint_keys=("chosen_input_ids", "chosen_loss_mask", "rejected_input_ids",
                                             "rejected_loss_mask")) -> dict:
    """Reference log-probs for `rows` from `path` if it holds them for these very rows (the
    arrays `fingerprint_keys` name), else `compute()` (saved to `path`)."""
    digest = hashlib.sha256()
    for key in fingerprint_keys:
        digest.update(np.ascontiguousarray(rows[key]).tobytes())
    fingerprint = digest.hexdigest()
    hit = None
    if os.path.exists(path):
        with np.load(path) as cached:
            if str(cached["fingerprint"]) == fingerprint:
                hit = {k: cached[k] for k in cached.files if k != "fingerprint"}
    if _on_every_process(hit is not None):
        logger.info("reference log-probs from %s", path)
        return hit
    values = compute()
    if jax.process_index() == 0:
        np.savez(path, fingerprint=np.array(fingerprint), **values)
    return values


def _on_every_process(flag: bool) -> bool:
    """Whether `flag` holds on every process (called by all of them). The cache is used only when
    every process holds it: computing the reference needs all of them (the hosts of a run in a
    bucket each have their own local mirror; on a shared filesystem they all see one file)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.array([flag], np.int32))))


def attach_reference_logps(cfg, named_rows: dict, compute,
                           fingerprint_keys=("chosen_input_ids", "chosen_loss_mask", "rejected_input_ids",
                                             "rejected_loss_mask")) -> None:
    """Add `compute(rows)` (the reference log-probs) to each of `named_rows` (name -> rows, or
    None), cached in `<output_dir>/reference_logps_<name>.npz` (`cached_reference_logps`)."""
    for name, rows in named_rows.items():
        if rows is not None:
            rows.update(cached_reference_logps(os.path.join(storage.run_files(cfg.output_dir),
                                                            f"reference_logps_{name}.npz"), rows,
                                               lambda rows=rows: compute(rows), fingerprint_keys))


# ----------------------------------------------------------------------------- the recipe

PAIR_DATA_DOCS = {
    "train_data": "preference pairs: .jsonl/.json/.parquet or a `datasets` name; {prompt, chosen, rejected} as "
                  "strings, or chosen/rejected as message lists (whole conversations incl. the prompt turn, as "
                  "UltraFeedback-binarized, or the assistant turns only) (default: pairs from generated tasks)",
    "eval_data": "evaluation pairs, same layouts (default: none)",
    "total_steps": "optimizer steps; 0 = num_epochs over the training pairs",
    "num_epochs": "epochs when total_steps is 0",
    "batch_size": "global batch in preference pairs (each is a chosen and a rejected sequence)",
    "seq_length": "maximum tokens per sequence (prompt + response), truncated on the right; rows are as long "
                  "as the longest pair needs, up to this",
    "loss_reduction": "mean: per pair over the global batch; sum: per micro-batch pair sum averaged over "
                      "accumulation steps",
    "tasks.num_train": "default job: generated training tasks (one preference pair each)",
    "tasks.max_new_tokens": "default job: generation budget per answer (held-out and the model's own answers)",
    "tasks.rejected": "default job: the rejected answer: model (the model's own greedy answer when wrong, else "
                      "a perturbed one) or perturb (a nearby number, a mis-sorted list, ...)",
}


def pair_data(ctx: recipe.Context, source: str, records, locations=None):
    """`(rows, stats)` of preference pairs, the drop count said on stderr."""
    from easytune import data
    cfg = ctx.cfg
    rows, stats = data.pair_rows(records, ctx.model.tokenizer, ctx.template, cfg.seq_length, source, locations)
    if stats.num_dropped:
        recipe.dropped(ctx.is_main, f"dropped {stats.num_dropped} of {stats.num_records} pairs whose chosen "
                                    f"({stats.num_dropped_chosen}) or rejected ({stats.num_dropped_rejected}) "
                                    f"response is empty after truncation to seq_length={cfg.seq_length}")
    return rows, stats


def eval_pair_rows(ctx: recipe.Context):
    """Rows of --eval_data's pairs, or None."""
    from easytune import data
    if not ctx.cfg.eval_data:
        return None
    records, locations = data.load_pairs(ctx.cfg.eval_data)
    return data.pair_rows(records, ctx.model.tokenizer, ctx.template, ctx.cfg.seq_length, ctx.cfg.eval_data,
                          locations)[0]


class DPORecipe(recipe.Recipe):
    """Preference optimization on (prompt, chosen, rejected) pairs with the DPO family, ORPO or
    SimPO. The reference policy: the base with the adapter off (an adapter run: no copy), a frozen
    copy of the initial weights (--peft=none), or log-probs precomputed in one pass."""

    name = "preference optimization"
    flag_groups = ("data", "lm_head", "peft", "lm_eval")
    adapters = ("lora", "qlora", "dora", "prompt", "prefix", "ptuning")
    # LoRA's suits the embedded job (the default method); all weights as TRL's range for DPO
    learning_rates = {"full": 5e-6, "lora": 5e-4, "prompt": 1e-2}
    defaults = {
        "output_dir": "outputs/dpo",
        "seq_length": 512,
        "loss_type": "sigmoid",
        "beta": 0.1,
        "label_smoothing": 0.0,
        "reference_free": False,
        "simpo_gamma": 0.5,
        "precompute_reference": False,
        "optimizer": {"warmup_ratio": 0.1},
        "tasks": {"num_train": 192, "num_heldout": 100, "max_new_tokens": 16, "rejected": "model"},
        "peft": "lora",
    }
    docs = {
        **PAIR_DATA_DOCS,
        "model": "HF directory, hub id, or easytune checkpoint/run directory, e.g. an SFT run (default: bundled "
                 "SmolLM2-135M-Instruct)",
        "loss_type": "sigmoid (DPO), ipo (length-normalized), hinge, robust, orpo (chosen-response NLL + beta * "
                     "odds-ratio term), simpo (length-averaged, margin simpo_gamma, no NLL)",
        "beta": "DPO beta (ipo: tau; orpo: lambda; simpo: beta, the paper uses 2.0-2.5)",
        "label_smoothing": "sigmoid: conservative DPO (cDPO) label noise; robust: label-flip rate in [0, 0.5); "
                           "simpo: label smoothing",
        "reference_free": "DPO family: reference log-probs of 0 (no reference policy)",
        "simpo_gamma": "SimPO target reward margin gamma",
        "precompute_reference": "compute the reference log-probs in one pass before training (cached in "
                                "<output_dir>/reference_logps_*.npz) instead of holding a reference during training",
        "optimizer.lr": "peak learning rate (AdamW); full DPO of 7B+ models usually wants 5e-7 to 5e-6",
        "seed": "data order and adapter init seed",
        "tasks.num_heldout": "default job: held-out tasks for exact-match accuracy",
        "peft": "parameter-efficient fine-tuning: lora (default: the reference is the base, no copy), qlora, dora, "
                "prompt, prefix, ptuning, or none (all weights; the reference is a frozen copy unless "
                "--precompute_reference)",
    }

    @staticmethod
    def options(cfg) -> PreferenceConfig:
        return PreferenceConfig(loss_type=cfg.loss_type, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                                reference_free=cfg.reference_free, simpo_gamma=cfg.simpo_gamma)

    def validate(self, cfg) -> None:
        if cfg.precompute_reference and not self.options(cfg).uses_reference:
            raise ValueError(f"--precompute_reference has nothing to compute: the {cfg.loss_type} loss"
                             f"{' with --reference_free' if cfg.reference_free else ''} uses no reference policy.")

    def check_record(self, cfg, record: dict, where: str) -> None:
        from easytune.data.preference import parse_pair
        parse_pair(record, where)

    def setup(self, ctx: recipe.Context) -> recipe.Job:
        from easytune import data
        cfg, model = ctx.cfg, ctx.model
        options = self.options(cfg)
        heldout = None
        if cfg.train_data is None:
            task_records, heldout = data.train_and_heldout(cfg.tasks.num_train, cfg.tasks.num_heldout, seed=cfg.seed)
            records = data.task_pairs_from_model(model, task_records, cfg.tasks.rejected, cfg.tasks.max_new_tokens,
                                                 cfg.seed)
            source, locations = f"generated task pairs ({len(records)} train, {len(heldout)} held out)", None
            ctx.write_jsonl("train_pairs.jsonl", records)
        else:
            source = cfg.train_data
            records, locations = data.load_pairs(source)
        rows, stats = pair_data(ctx, source, records, locations)
        logger.info("train data %s: %s; rows of %d tokens", source, stats.summary(), rows["chosen_input_ids"].shape[1])
        eval_rows = eval_pair_rows(ctx)
        precomputed = cfg.precompute_reference and options.uses_reference
        if precomputed:  # the reference: the initial model, adapters off
            micro_batch = cfg.batch_size // max(cfg.grad_accum_steps, 1)
            attach_reference_logps(cfg, {"train": rows, "eval": eval_rows}, lambda these: reference_logps(
                model.config, model.params, these, model.mesh, micro_batch))
        reference = ("none" if not options.uses_reference else "precomputed" if precomputed
                     else "base (adapter off)" if model.adapter is not None else "copy")

        def report(history, summary):
            return {k: v for k, v in history[-1].items() if k.startswith("rewards/")} if history else {}

        return recipe.Job(
            model=model, rows=rows, eval_rows=eval_rows, loss=make_loss(options, precomputed),
            summary={"train_pairs": stats.num_records, "train_pairs_dropped": stats.num_dropped,
                     "loss_type": cfg.loss_type, "reference": reference},
            heldout=(None if heldout is None else
                     lambda: recipe.heldout_accuracy(model, heldout, cfg.tasks.max_new_tokens)),
            report=report)


RECIPE = DPORecipe()
