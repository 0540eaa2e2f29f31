"""KTO (Kahneman-Tversky optimization) on unpaired desirable/undesirable completions, as TRL's
`KTOTrainer` computes it (trl 1.16, `KTOTrainer._compute_loss`).

Pure functions in layers, so each can be checked against TRL on identical tensors:

    kto_losses(options, policy/reference logps, labels, kl, valid) -> (per-example loss, rewards)
    kl_estimate(policy KL logps, reference KL logps, valid)        -> the batch's KL estimate z
    make_loss(options, precomputed)                                 -> the training loss (`recipe.Loss`)
    RECIPE                                                          -> `python -m easytune.train_kto`

With r = log π(y|x) − log π_ref(y|x), the summed completion log-prob ratio, and
z = max(0, mean over the batch of log π(y'|x) − log π_ref(y'|x)) on mismatched pairs (x, y')
(detached: no gradient flows through it):

    kto                desirable: w_d (1 − σ(β(r − z)))    undesirable: w_u (1 − σ(β(z − r)))
    apo_zero_unpaired  desirable: w_d (1 − σ(βr))          undesirable: w_u σ(βr)          (no KL term)

and the loss is the mean over the batch's examples (weights in the numerator only, as TRL's
`losses.nanmean()`). The logged rewards are βr (mean over the desirable / undesirable examples).

The batch (`easytune.data.unpaired`): one example per row, every key of `easytune.data.make_rows`
`[batch, seq]` for the example and `kl_<key>` for its KL companion (its prompt + another
example's completion, built on the host as TRL rotates completions within a batch), `label`
`[batch, 1]`, and optionally `ref_logps` / `ref_kl_logps` `[batch, 1]` (precomputed reference).

z is the mean over the micro-batch's examples (TRL: the mean of each device's per-device batch
mean, gathered; equal for equal per-device batches), then clamped at 0.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

from easytune import recipe
from easytune.algos.dpo import attach_reference_logps, batched_logps, sequence_logps
from easytune.algos.logprobs import model_logprobs
from easytune.data.packing import ROW_KEYS

LOSS_TYPES = ("kto", "apo_zero_unpaired")
logger = logging.getLogger("easytune")


@dataclasses.dataclass(frozen=True)
class KTOConfig:
    loss_type: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown --loss_type {self.loss_type!r}; use one of {', '.join(LOSS_TYPES)}.")
        if self.beta <= 0:
            raise ValueError(f"--beta must be positive, got {self.beta}.")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")

    @property
    def uses_kl(self) -> bool:
        """Whether the loss estimates the KL term (TRL's `calculate_KL`)."""
        return self.loss_type == "kto"


# ----------------------------------------------------------------------------- losses

def kl_estimate(policy_kl: jax.Array, reference_kl: jax.Array, valid: jax.Array) -> jax.Array:
    """z: the mean over the valid examples of the KL companions' log-ratios `[batch]`, clamped at
    0 and detached (a baseline, not a target)."""
    weight = valid.astype(jnp.float32)
    mean = jnp.sum((policy_kl - reference_kl) * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def kto_losses(options: KTOConfig, policy: jax.Array, reference: jax.Array, labels: jax.Array,
               kl: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example `(weighted loss, reward βr)` `[batch]` from summed completion log-probs of the
    policy and the reference `[batch]`, labels `[batch]` (True: desirable) and z (a scalar)."""
    beta = options.beta
    logratios = policy - reference
    if options.loss_type == "kto":
        desirable = 1 - jax.nn.sigmoid(beta * (logratios - kl))
        undesirable = 1 - jax.nn.sigmoid(beta * (kl - logratios))
    else:  # apo_zero_unpaired
        desirable = 1 - jax.nn.sigmoid(beta * logratios)
        undesirable = jax.nn.sigmoid(beta * logratios)
    losses = jnp.where(labels, options.desirable_weight * desirable, options.undesirable_weight * undesirable)
    return losses, jax.lax.stop_gradient(beta * logratios)


def completion_logps(model_config, params, batch, prefix: str = "") -> tuple[jax.Array, jax.Array]:
    """Summed completion log-probs and completion lengths `[batch]` of the rows `<prefix><key>`
    (prefix "": the examples; "kl_": their KL companions)."""
    rows = {key: batch[f"{prefix}{key}"] for key in ROW_KEYS}
    per_token = model_logprobs(model_config, params, rows["input_ids"], rows["positions"], rows["segment_ids"],
                               rows["target_ids"])
    return sequence_logps(per_token, rows["loss_mask"])


def make_loss(options: KTOConfig, precomputed: bool = False) -> recipe.Loss:
    """The training loss: `fn(model_config, params, batch, reference_params=None) -> (sum of
    example losses, number of examples, {metric: sum over examples})`, per example. Reference
    log-probs come from the batch (`ref_logps`, `ref_kl_logps`; `precomputed`) or from forwards of
    `reference_params`; with an adapter the driver passes the base weights as the reference.
    Rows with no completion token (eval padding) count for nothing. The KL companions' forward
    runs on stopped-gradient weights (TRL: under no_grad), so it costs no backward pass."""

    def loss_fn(model_config, params, batch, reference_params=None):
        policy, counts = completion_logps(model_config, params, batch)
        valid = counts > 0
        labels = (batch["label"][:, 0] > 0) & valid
        if precomputed:
            reference = batch["ref_logps"][:, 0]
        elif reference_params is not None:
            reference = jax.lax.stop_gradient(completion_logps(model_config, reference_params, batch)[0])
        else:
            raise ValueError("the KTO loss needs reference log-probs: a reference model (make_loss(precomputed="
                             "False)) or precomputed ref_logps/ref_kl_logps.")
        kl = jnp.zeros((), jnp.float32)
        if options.uses_kl:
            policy_kl = completion_logps(model_config, jax.lax.stop_gradient(params), batch, "kl_")[0]
            if precomputed:
                reference_kl = batch["ref_kl_logps"][:, 0]
            else:
                reference_kl = completion_logps(model_config, jax.lax.stop_gradient(reference_params), batch, "kl_")[0]
            kl = kl_estimate(policy_kl, reference_kl, valid)
        losses, rewards = kto_losses(options, policy, reference, labels, kl)
        desirable, undesirable = labels, valid & ~labels
        total = lambda x, where=valid: jnp.sum(jnp.where(where, x, 0.0))  # noqa: E731
        logps = jax.lax.stop_gradient(policy)
        metrics = {"rewards/chosen_sum": total(rewards, desirable), "rewards/rejected_sum": total(rewards, undesirable),
                   "logps/chosen_sum": total(logps, desirable), "logps/rejected_sum": total(logps, undesirable),
                   "count/chosen": total(1.0, desirable), "count/rejected": total(1.0, undesirable),
                   "kl": kl * jnp.sum(valid.astype(jnp.float32))}
        return total(losses), jnp.sum(valid.astype(jnp.float32)), metrics

    return recipe.Loss(loss_fn, "examples", needs_reference=not precomputed)


def derive(record: dict) -> dict:
    """TRL's logged figures from a record of `make_loss` metrics (each a per-example mean over the
    batch): rewards/logps of the desirable (`chosen`) and undesirable (`rejected`) examples as
    means over those examples (absent when the batch has none, as in TRL), their margin, and kl;
    for training and `eval_` figures alike. A derived record comes back unchanged."""
    out = dict(record)
    for prefix in ("", "eval_"):
        shares = {side: out.pop(f"{prefix}count/{side}", None) for side in ("chosen", "rejected")}
        for side, share in shares.items():
            for name in ("rewards", "logps"):
                value = out.pop(f"{prefix}{name}/{side}_sum", None)
                if share is not None and share > 0:
                    out[f"{prefix}{name}/{side}"] = value / share
        if f"{prefix}rewards/chosen" in out and f"{prefix}rewards/rejected" in out and shares["chosen"] is not None:
            out[f"{prefix}rewards/margins"] = out[f"{prefix}rewards/chosen"] - out[f"{prefix}rewards/rejected"]
    return out


# ----------------------------------------------------------------------------- precomputed reference

def reference_logps(model_config, params, rows: dict[str, np.ndarray], mesh, batch_size: int, with_kl: bool
                    ) -> dict[str, np.ndarray]:
    """The reference policy's summed completion log-probs of every example (and of its KL
    companion, `with_kl`), in one pass of `batch_size` rows at a time: `{"ref_logps"[,
    "ref_kl_logps"]}` `[num_examples, 1]` float32, to add to the rows."""
    prefixes = {"ref_logps": "", **({"ref_kl_logps": "kl_"} if with_kl else {})}
    model_rows = {k: v for k, v in rows.items() if k.replace("kl_", "", 1) in ROW_KEYS}
    return batched_logps(lambda p, b: {name: completion_logps(model_config, p, b, prefix)[0]
                                       for name, prefix in prefixes.items()}, params, model_rows, mesh, batch_size)


# ----------------------------------------------------------------------------- the recipe

def unpaired_data(ctx: recipe.Context, source: str):
    """`(rows, stats)` of `source`'s examples with their KL companions, the drop count said on
    stderr."""
    from easytune import data
    from easytune.data import unpaired
    cfg = ctx.cfg
    records, locations = data.load_pairs(source)
    rows, stats = unpaired.unpaired_rows(records, ctx.model.tokenizer, ctx.template, cfg.seq_length,
                                         max(cfg.batch_size // max(cfg.grad_accum_steps, 1), 1), source, locations)
    if stats.num_dropped:
        recipe.dropped(ctx.is_main, f"dropped {stats.num_dropped} of {stats.num_examples} examples of {source} "
                                    f"whose completion is empty after truncation to seq_length={cfg.seq_length}")
    return rows, stats


class KTORecipe(recipe.Recipe):
    """KTO on unpaired (prompt, completion, desirable?) examples, or on preference pairs unpaired.
    The reference policy: the base with the adapter off (an adapter run: no copy), a frozen copy
    of the initial weights (--peft=none), or log-probs precomputed in one pass."""

    name = "KTO"
    flag_groups = ("data", "lm_head", "peft", "lm_eval")
    adapters = ("lora", "qlora", "dora", "prompt", "prefix", "ptuning")
    # as DPO's: LoRA's for adapters; all weights in TRL's KTO range (5e-7 .. 5e-6 for 7B+)
    learning_rates = {"full": 5e-6, "lora": 5e-4, "prompt": 1e-2}
    defaults = {
        "output_dir": "outputs/kto",
        "train_data": "",
        "seq_length": 512,
        "loss_type": "kto",
        "beta": 0.1,
        "desirable_weight": 1.0,
        "undesirable_weight": 1.0,
        "precompute_reference": False,
        "optimizer": {"warmup_ratio": 0.1},
        "peft": "lora",
    }
    docs = {
        "train_data": "KTO examples: .jsonl/.json/.parquet or a `datasets` name; {prompt, completion, label: "
                      "true|false} with prompt/completion as strings or message lists (TRL's unpaired layout), "
                      "or preference pairs {prompt, chosen, rejected} (unpaired: chosen true, rejected false)",
        "eval_data": "evaluation examples, same layouts (default: none)",
        "total_steps": "optimizer steps; 0 = num_epochs over the training examples",
        "num_epochs": "epochs when total_steps is 0",
        "batch_size": "global batch in examples (each is also run once as its KL companion: its prompt with "
                      "another example's completion); > 1 per micro-batch for the kto loss",
        "seq_length": "maximum tokens per sequence (prompt + completion), truncated on the right",
        "loss_reduction": "mean: per example over the global batch; sum: per micro-batch example sum averaged "
                          "over accumulation steps",
        "model": "HF directory, hub id, or easytune checkpoint/run directory, e.g. an SFT run",
        "loss_type": "kto (KTO with the KL baseline z), apo_zero_unpaired (APO-zero, unpaired: no KL term)",
        "beta": "KTO beta: the scale of the log-ratio rewards",
        "desirable_weight": "weight of the desirable examples' losses (TRL: keep weight * count of the two "
                            "sides within 1:1 to 4:3)",
        "undesirable_weight": "weight of the undesirable examples' losses",
        "precompute_reference": "compute the reference log-probs (examples and KL companions) in one pass before "
                                "training (cached in <output_dir>/reference_logps_*.npz) instead of holding a "
                                "reference during training",
        "optimizer.lr": "peak learning rate (AdamW); full KTO of 7B+ models usually wants 5e-7 to 5e-6",
        "seed": "data order and adapter init seed",
        "peft": "parameter-efficient fine-tuning: lora (default: the reference is the base, no copy), qlora, dora, "
                "prompt, prefix, ptuning, or none (all weights; the reference is a frozen copy unless "
                "--precompute_reference)",
    }

    @staticmethod
    def options(cfg) -> KTOConfig:
        return KTOConfig(loss_type=cfg.loss_type, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                         undesirable_weight=cfg.undesirable_weight)

    def validate(self, cfg) -> None:
        options = self.options(cfg)
        if not cfg.train_data:
            raise ValueError("KTO needs --train_data: examples {prompt, completion, label} or pairs {prompt, chosen, "
                             "rejected}.")
        micro_batch = cfg.batch_size // max(cfg.grad_accum_steps, 1)
        if options.uses_kl and micro_batch <= 1:
            raise ValueError(f"the kto loss needs more than one example per micro-batch (--batch_size="
                             f"{cfg.batch_size}, --grad_accum_steps={cfg.grad_accum_steps}): with one, the KL "
                             f"companion is the example itself and the KL term equals its reward.")

    def check_record(self, cfg, record: dict, where: str) -> None:
        from easytune.data.unpaired import parse_unpaired
        parse_unpaired(record, where)

    def setup(self, ctx: recipe.Context) -> recipe.Job:
        cfg, model = ctx.cfg, ctx.model
        options = self.options(cfg)
        rows, stats = unpaired_data(ctx, cfg.train_data)
        logger.info("train data %s: %s; rows of %d tokens", cfg.train_data, stats.summary(), rows["input_ids"].shape[1])
        eval_rows = unpaired_data(ctx, cfg.eval_data)[0] if cfg.eval_data else None
        precomputed = bool(cfg.precompute_reference)
        if precomputed:  # the reference: the initial model, adapters off
            micro_batch = cfg.batch_size // max(cfg.grad_accum_steps, 1)
            attach_reference_logps(cfg, {"train": rows, "eval": eval_rows}, lambda these: reference_logps(
                model.config, model.params, these, model.mesh, micro_batch, options.uses_kl),
                fingerprint_keys=("input_ids", "loss_mask", "kl_input_ids", "kl_loss_mask"))
        reference = ("precomputed" if precomputed else "base (adapter off)" if model.adapter is not None
                     else "copy")

        def report(history, summary):
            keys = ("rewards/", "logps/", "kl")
            return {k: v for k, v in history[-1].items() if k.startswith(keys)} if history else {}

        return recipe.Job(
            model=model, rows=rows, eval_rows=eval_rows, loss=make_loss(options, precomputed),
            summary={"train_examples": stats.num_kept, "train_examples_dropped": stats.num_dropped,
                     "train_desirable": stats.num_desirable, "train_undesirable": stats.num_undesirable,
                     "loss_type": cfg.loss_type, "reference": reference},
            report=report, derive=derive)


RECIPE = KTORecipe()
