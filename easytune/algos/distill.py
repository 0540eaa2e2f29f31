"""Knowledge distillation: the student learns a frozen teacher's next-token distributions on the
trained tokens of SFT data (`python -m easytune.train_distill --teacher=DIR --model=STUDENT ...`).

Per trained token, with s = log softmax(student logits / T), t = log softmax(teacher logits / T)
and β = --beta, the generalized Jensen-Shannon divergence of GKD (Agarwal et al., Eq. 1), exactly as
TRL's `GKDTrainer.generalized_jsd_loss` computes it:

    β = 0      KL(teacher ‖ student) = Σ_v p_t (t − s)          forward KL (word-level KD)
    β = 1      KL(student ‖ teacher) = Σ_v p_s (s − t)          reverse KL
    0 < β < 1  β KL(teacher ‖ m) + (1 − β) KL(student ‖ m),  m = β p_t + (1 − β) p_s

(like TRL, β = 0 and β = 1 are the KLs themselves, not the limits of the mixture form, which vanish).
The loss is summed over trained tokens and divided by their number over the global batch (TRL's
"batchmean" with labels: the sum over unmasked tokens / their count); no T² factor, as TRL.

The teacher is any model `easytune.load` reads, loaded with the run's mesh and dtype flags, with
the student's tokenizer; it reaches the jitted loss as the Trainer's frozen `reference` input
(never trained, no optimizer state).

On-policy (GKD, `--lmbda`): with probability lmbda per step (TRL's `random.random() <= lmbda`),
the step's examples are replaced by the student's own samples: each row's prompt (the tokens
before its last assistant turn) with a completion the current student samples at --temperature
(top-k off, as TRL's generation config), trained on the completion's tokens (TRL also puts the
prompt's tokens in the labels; we keep the loss on the completion, as off-policy). The coin and
the samples are seeded by (--seed, step), so a resumed run sees the same data. Sequence-level KD
from teacher samples (TRL's `seq_kd`) is not done.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

from easytune import models, recipe
from easytune.algos import logprobs, sft

logger = logging.getLogger("easytune")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    beta: float = 0.5
    temperature: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"--beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {self.beta}.")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be positive, got {self.temperature}.")


def generalized_jsd(student_logits: jax.Array, teacher_logits: jax.Array, beta: float,
                    temperature: float = 1.0) -> jax.Array:
    """The divergence per position `[batch, seq]` (float32, summed over the vocabulary) from logits
    `[batch, seq, vocab]`; see the module doc."""
    student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)

    def kl(target, log_q):  # KL(target ‖ q) with target as log-probs (torch's kl_div, log_target=True)
        return jnp.sum(jnp.exp(target) * (target - log_q), axis=-1)

    if beta == 0:
        return kl(teacher, student)
    if beta == 1:
        return kl(student, teacher)
    mixture = jnp.logaddexp(student + jnp.log1p(-beta), teacher + jnp.log(beta))
    return beta * kl(teacher, mixture) + (1 - beta) * kl(student, mixture)


def make_loss(options: DistillConfig, teacher_config) -> recipe.Loss:
    """`fn(student_config, params, batch, teacher_params) -> (sum of the divergence over trained
    tokens, trained tokens, {"student_ce": sum of the student's cross-entropy})` over SFT rows
    (`easytune.algos.sft.BATCH_KEYS`)."""

    def loss_fn(model_config, params, batch, teacher_params):
        inputs = batch["input_ids"], batch["positions"], batch["segment_ids"]
        student_logits = models.family(model_config.model_type).forward(model_config, params, *inputs)
        teacher_logits = jax.lax.stop_gradient(
            models.family(teacher_config.model_type).forward(teacher_config, teacher_params, *inputs))
        mask = batch["loss_mask"].astype(jnp.float32)
        divergence = generalized_jsd(student_logits, teacher_logits, options.beta, options.temperature)
        cross_entropy = -logprobs.token_logps(jax.lax.stop_gradient(student_logits), batch["target_ids"])
        return jnp.sum(divergence * mask), jnp.sum(mask), {"student_ce": jnp.sum(cross_entropy * mask)}

    return recipe.Loss(loss_fn, "trained_tokens", needs_reference=True)


def check_teacher(teacher, student, teacher_name: str, student_name: str) -> None:
    """Raise ValueError (one sentence) unless `teacher` can teach `student`: a causal LM with the
    same vocabulary and tokenizer, on the same mesh."""
    if teacher.is_encoder_decoder or getattr(teacher.config, "num_labels", 0):
        raise ValueError(f"the teacher {teacher_name} must be a decoder-only causal LM like the student.")
    same_tokenizer = (teacher.tokenizer is not None
                      and teacher.tokenizer.get_vocab() == student.tokenizer.get_vocab())
    if teacher.config.vocab_size != student.config.vocab_size or not same_tokenizer:
        raise ValueError(f"the teacher {teacher_name} (vocabulary {teacher.config.vocab_size}) and the student "
                         f"{student_name} (vocabulary {student.config.vocab_size}) must share one tokenizer and "
                         f"vocabulary; distill into a student of the teacher's family.")
    if teacher.mesh != student.mesh:
        raise ValueError(f"the teacher {teacher_name} was loaded on a different device mesh than the student.")
    if teacher.adapter is not None and not teacher.adapter.config.is_lora:
        raise ValueError(f"the teacher {teacher_name} carries a {teacher.adapter.config.method} adapter, which "
                         f"cannot be merged into its weights; distill from a LoRA/DoRA or full model.")


# ----------------------------------------------------------------------------- on-policy samples

def last_turn_prompt(input_ids: np.ndarray, loss_mask: np.ndarray) -> list[int] | None:
    """The tokens of an unpacked row before its last run of trained tokens (the prompt of its last
    assistant turn, with the generation prompt), or None for a row with no trained token. Row
    layout as `packing.make_rows`: loss_mask[t] says whether token t + 1 is trained."""
    trained = np.flatnonzero(loss_mask)
    if trained.size == 0:
        return None
    breaks = np.flatnonzero(np.diff(trained) > 1)
    start = trained[breaks[-1] + 1] if breaks.size else trained[0]
    return input_ids[:start + 1].tolist()


class StudentSamples:
    """`Job.resample` for on-policy GKD: with probability `lmbda` a step's rows become the
    student's samples on their prompts (see the module doc); metrics `on_policy` (the share of the
    step's examples replaced by samples: 0 on an off-policy step; below 1 when a prompt fills its
    whole row) and `sampled_tokens` (mean completion length of the step's samples). The sampling
    time counts in the step's time."""

    def __init__(self, model, lmbda: float, temperature: float, max_new_tokens: int, seed: int):
        from easytune.generate import SamplingConfig
        self.model, self.lmbda, self.seed = model, lmbda, seed
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)

    def __call__(self, rows: dict, step: int) -> tuple[dict, dict]:
        from easytune.data.packing import make_rows
        from easytune.data.tokenize import Example
        if np.random.default_rng([self.seed, step]).random() > self.lmbda:
            return rows, {"on_policy": 0.0}
        width = rows["input_ids"].shape[1]
        prompts = {i: last_turn_prompt(ids, mask) for i, (ids, mask) in enumerate(zip(rows["input_ids"],
                                                                                      rows["loss_mask"]))}
        with_prompt = sum(p is not None for p in prompts.values())
        prompts = {i: p for i, p in prompts.items() if p is not None and len(p) < width}
        if not prompts:
            return rows, {"on_policy": 0.0}
        samples = self.model.generate(list(prompts.values()), sampling=self.sampling, seed=self.seed * 1_000_003 + step,
                                      return_tokens=True)
        examples = [Example((p + s)[:width], ([0] * len(p) + [1] * len(s))[:width])
                    for p, s in zip(prompts.values(), samples)]
        sampled = make_rows(examples, width, pack=False)
        out = {key: value.copy() for key, value in rows.items()}
        for row, index in enumerate(prompts):
            for key in sampled:
                out[key][index] = sampled[key][row]
        return out, {"on_policy": len(prompts) / with_prompt,
                     "sampled_tokens": float(np.mean([len(s) for s in samples]))}


# ----------------------------------------------------------------------------- the recipe

class DistillRecipe(recipe.Recipe):
    """Knowledge distillation on SFT data: the generalized JSD (forward KL, reverse KL or between,
    `--beta`) of the student's next-token distributions to a frozen teacher's, on the trained tokens."""

    name = "distillation"
    flag_groups = ("data", "tokenized_data", "peft")
    adapters = ("lora", "qlora", "dora", "prompt", "prefix", "ptuning")
    defaults = {"output_dir": "outputs/distill", "teacher": None, "beta": 0.5, "temperature": 1.0, "pack": True,
                "lmbda": 0.0, "max_new_tokens": 128}
    docs = {
        "teacher": "the frozen teacher: an HF directory, Hub id or easytune checkpoint with the student's tokenizer "
                   "(loaded with the run's --mesh_dim/--dtype/--param_dtype)",
        "train_data": "training data (SFT formats: messages, instruction/input/output, prompt/completion, text); the "
                      "loss is on its trained (assistant) tokens",
        "eval_data": "evaluation data, same formats (default: none)",
        "beta": "generalized JSD interpolation (TRL GKD's beta): 0 = forward KL(teacher||student), "
                "1 = reverse KL(student||teacher), between = JSD with the mixture",
        "temperature": "softmax temperature of both distributions in the loss, and of the student's samples "
                       "(--lmbda)",
        "lmbda": "GKD's on-policy fraction: the probability that a step trains on the student's own samples of "
                 "its prompts instead of the data's completions (0 = off-policy, supervised KD; rows are not "
                 "packed when > 0)",
        "max_new_tokens": "longest student sample (--lmbda > 0)",
        "pack": "pack several samples per row (best fit; attention never crosses samples)",
        "batch_size": "global batch in sequences (rows of seq_length), across all hosts and accumulation steps",
        "loss_reduction": "mean: per trained token over the global batch; sum: per micro-batch token sum "
                          "averaged over accumulation steps",
        "seed": "data order seed",
    }

    def validate(self, cfg) -> None:
        if not cfg.teacher:
            raise ValueError("distillation needs --teacher=<model directory or id>.")
        if not cfg.train_data:
            raise ValueError("distillation needs --train_data=<SFT data file or dataset name>.")
        DistillConfig(cfg.beta, cfg.temperature)
        if not 0.0 <= cfg.lmbda <= 1.0:
            raise ValueError(f"--lmbda must be in [0, 1] (the share of on-policy steps), got {cfg.lmbda}.")
        if cfg.lmbda > 0 and cfg.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1 for on-policy samples, got {cfg.max_new_tokens}.")
        if cfg.lmbda > 0 and cfg.pack:  # a student sample replaces one example: one example per row
            logger.info("--lmbda=%g: one example per row (--pack=false)", cfg.lmbda)
            cfg.pack = False

    def check_record(self, cfg, record: dict, where: str) -> None:
        from easytune import data
        data.to_messages(record, data.detect_format(record, where), where)

    def setup(self, ctx: recipe.Context) -> recipe.Job:
        import easytune
        cfg, model = ctx.cfg, ctx.model
        options = DistillConfig(cfg.beta, cfg.temperature)
        teacher = easytune.load(cfg.teacher, dtype=cfg.dtype, param_dtype=cfg.param_dtype, mesh_dim=cfg.mesh_dim,
                                attention=cfg.attention, layer_loop=cfg.layer_loop)
        check_teacher(teacher, model, cfg.teacher, cfg.model)
        teacher_params = teacher.merged_params()
        rows, eval_rows, stats = sft.train_and_eval_rows(ctx, cfg.train_data)
        student_flops = models.flops_per_token(model.config, cfg.seq_length)
        teacher_flops = models.flops_per_token(teacher.config, cfg.seq_length)
        flops = None if student_flops is None or teacher_flops is None else student_flops + teacher_flops / 3
        return recipe.Job(
            model=model, rows=rows, eval_rows=eval_rows, loss=make_loss(options, teacher.config),
            reference=teacher_params,
            resample=StudentSamples(model, cfg.lmbda, cfg.temperature, cfg.max_new_tokens, cfg.seed)
            if cfg.lmbda > 0 else None,
            summary={"train_samples": stats.num_records, "train_samples_dropped": stats.num_dropped_no_trainable_tokens,
                     "teacher": cfg.teacher, "beta": options.beta, "temperature": options.temperature},
            flops_per_token=flops)  # the teacher's forward: a third of its training FLOPs


RECIPE = DistillRecipe()
