"""ILQL: implicit language Q-learning (Snell et al. 2022), offline RL from logged completions and
their rewards, as trlx defines it (trlx/models/modeling_ilql.py, `ILQLConfig.loss`, `ILQLHeads`,
`AutoModelForCausalLMWithILQLHeads.generate`; trlx/trainer/accelerate_ilql_trainer.py).

Heads on the LM's final hidden states h (after the last norm), each trlx's `make_head`, a two-layer
MLP `Linear(H, 2H) -> ReLU -> Linear(2H, out)`: V (out 1), Q1 and Q2 (out vocab) and their target
copies (`two_qs`; one Q without), trained jointly with the LM in one optimizer; the targets are
not trained but follow the Q heads by Polyak averaging, target <- α Q + (1 − α) target, after every
`steps_for_target_q_sync`-th optimizer step.

Per action t (a token of the completion, predicted at position t; `loss_mask` marks them), with
a_t the taken token, Q_i = Q_i(h_t)[a_t], Q̂ = min_i targetQ_i(h_t)[a_t] (detached), V = V(h_t):

    target   y_t = r_t + γ · V(h_next) (detached)   h_next: the next action's state; 0 after the last
             r_t = the episode's (z-scored) reward on its last action, 0 elsewhere
    loss_q    Σ_i (Q_i − y_t)²
    loss_v    |τ − 1[Q̂ < V]| · (Q̂ − V)²            expectile regression of V towards Q̂
    loss_cql  Σ_i CE(Q_i(h_t), a_t)                  cross-entropy of each Q head's outputs as logits
    loss_awac CE(logits_t, a_t) · exp(β (Q̂ − V))      (weight detached; β = 0: behaviour cloning)

    loss = (Σ_t loss_q + loss_v + cql_scale · loss_cql + awac_scale · loss_awac) / number of actions

over the global batch. Generation samples from `log_softmax(logits) + β_gen · (min_i targetQ_i − V)`
with top-k and temperature, through the one generate call (`steering`, a `generate.Steering` hook).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from easytune import models, recipe, storage
from easytune.algos import logprobs

logger = logging.getLogger("easytune")

HEADS_FILE = "ilql_heads.safetensors"
# the heads' sharding (`recipe.Heads.rules`): matrices over (fsdp, mp) like the LM head, biases replicated
HEAD_RULES = ((r"heads/.*kernel$", P("fsdp", "mp")), (r"heads/.*bias$", P()))


@dataclasses.dataclass(frozen=True)
class ILQLConfig:
    """trlx's `ILQLConfig` (method) values; defaults as trlx's `default_ilql_config`."""

    tau: float = 0.7
    gamma: float = 0.99
    cql_scale: float = 0.1
    awac_scale: float = 1.0
    alpha: float = 0.001
    beta: float = 0.0
    steps_for_target_q_sync: int = 5
    two_qs: bool = True

    def __post_init__(self):
        checks = [("tau", 0 < self.tau < 1, "in (0, 1)"), ("gamma", 0 <= self.gamma <= 1, "in [0, 1]"),
                  ("alpha", 0 < self.alpha <= 1, "in (0, 1]"), ("cql_scale", self.cql_scale >= 0, ">= 0"),
                  ("awac_scale", self.awac_scale >= 0, ">= 0"),
                  ("steps_for_target_q_sync", self.steps_for_target_q_sync >= 1, ">= 1")]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"--{name} must be {want}, got {getattr(self, name)}.")


# ----------------------------------------------------------------------------- heads

def init_head(key: jax.Array, hidden_size: int, out_size: int) -> dict:
    """One trlx `make_head`: `{"hidden": {kernel [H, 2H], bias [2H]}, "out": {kernel [2H, out], bias
    [out]}}` float32, initialised as torch's `nn.Linear` (weights and biases uniform in ±1/√fan_in)."""
    keys = jax.random.split(key, 4)

    def uniform(key, shape, fan_in):
        bound = 1.0 / np.sqrt(fan_in)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

    inner = 2 * hidden_size
    return {"hidden": {"kernel": uniform(keys[0], (hidden_size, inner), hidden_size),
                       "bias": uniform(keys[1], (inner,), hidden_size)},
            "out": {"kernel": uniform(keys[2], (inner, out_size), inner),
                    "bias": uniform(keys[3], (out_size,), inner)}}


def init_heads(key: jax.Array, hidden_size: int, vocab_size: int, two_qs: bool = True) -> dict:
    """`{"v": head, "q": {"0": head[, "1": head]}, "target_q": copies of "q"}` (trlx's `ILQLHeads`:
    the targets start as deep copies of the Q heads)."""
    keys = jax.random.split(key, 3)
    q = {str(i): init_head(keys[1 + i], hidden_size, vocab_size) for i in range(2 if two_qs else 1)}
    return {"v": init_head(keys[0], hidden_size, 1), "q": q, "target_q": jax.tree.map(jnp.copy, q)}


def apply_head(head: dict, hidden: jax.Array) -> jax.Array:
    """`[..., out]` float32 from `hidden [..., H]`, in the hidden states' dtype with float32
    accumulation."""
    dtype = hidden.dtype
    x = jnp.einsum("...h,hk->...k", hidden, head["hidden"]["kernel"].astype(dtype),
                   preferred_element_type=jnp.float32) + head["hidden"]["bias"]
    x = jax.nn.relu(x).astype(dtype)
    return jnp.einsum("...k,kv->...v", x, head["out"]["kernel"].astype(dtype),
                      preferred_element_type=jnp.float32) + head["out"]["bias"]


def head_outputs(heads: dict, hidden: jax.Array):
    """`(qs, target_qs, v)`: tuples of `[..., vocab]` Q and target Q values and `[...]` V from
    final hidden states `[..., H]` (a head set without "q" gives `qs = ()`)."""
    qs = tuple(apply_head(heads["q"][k], hidden) for k in sorted(heads.get("q", {})))
    target_qs = tuple(apply_head(heads["target_q"][k], hidden) for k in sorted(heads["target_q"]))
    return qs, target_qs, apply_head(heads["v"], hidden)[..., 0]


def polyak(heads: dict, alpha) -> dict:
    """trlx's `_sync_target_q_heads`: every target leaf <- alpha * Q leaf + (1 - alpha) * target leaf."""
    target = jax.tree.map(lambda q, t: (alpha * q + (1.0 - alpha) * t).astype(t.dtype), heads["q"], heads["target_q"])
    return {**heads, "target_q": target}


def sync_after_step(options: ILQLConfig):
    """`after_step(heads, step_index)` for `recipe.Heads`: the Polyak update after optimizer steps
    k, 2k, ... (trlx: `iter_count % steps_for_target_q_sync == 0` after the step)."""
    def after_step(heads, step_index):
        due = (step_index + 1) % options.steps_for_target_q_sync == 0
        return jax.lax.cond(due, lambda h: polyak(h, options.alpha), lambda h: h, heads)
    return after_step


def is_target(path: str) -> bool:
    """Leaves the optimizer does not train: the target Q heads (`recipe.Heads.frozen`)."""
    return path.startswith("target_q/")


# ----------------------------------------------------------------------------- the loss

def next_action_index(action_mask: jax.Array) -> jax.Array:
    """For each position t `[batch, seq]`, the first position s > t with an action (seq: none)."""
    seq = action_mask.shape[1]
    index = jnp.where(action_mask > 0, jnp.arange(seq, dtype=jnp.int32), seq)
    at_or_after = jax.lax.cummin(index, axis=1, reverse=True)
    return jnp.concatenate([at_or_after[:, 1:], jnp.full_like(at_or_after[:, :1], seq)], axis=1)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """`[...]` float32: −log softmax(logits)[target]."""
    return -logprobs.token_logps(logits, targets)


def ilql_terms(options: ILQLConfig, logits, qs, target_qs, values, target_ids, action_mask, reward) -> dict:
    """ILQL's per-position terms `[batch, seq]` (see the module doc), valid where `action_mask`:
    `loss_q`, `loss_v`, `loss_cql`, `loss_awac`, and `q` (Q1 of the action), `v`, `awac_weight`.

    logits, qs[i], target_qs[i]: `[batch, seq, vocab]`; values: `[batch, seq]`; target_ids,
    action_mask: `[batch, seq]` (the token predicted at t, and whether it is an action); reward:
    `[batch, 1]`, put on each row's last action."""
    def taken(x):
        return jnp.take_along_axis(x.astype(jnp.float32), target_ids[..., None], axis=-1)[..., 0]

    q = [taken(x) for x in qs]
    target_q = jax.lax.stop_gradient(functools.reduce(jnp.minimum, [taken(x) for x in target_qs]))
    v = values.astype(jnp.float32)
    nxt = next_action_index(action_mask)
    seq = action_mask.shape[1]
    v_next = jnp.where(nxt < seq, jnp.take_along_axis(v, jnp.minimum(nxt, seq - 1), axis=1), 0.0)
    last_action = (action_mask > 0) & (nxt == seq)
    rewards = jnp.where(last_action, reward[:, :1].astype(jnp.float32), 0.0)
    q_target = rewards + options.gamma * jax.lax.stop_gradient(v_next)
    diff = target_q - v
    weight = jax.lax.stop_gradient(jnp.exp(options.beta * (target_q - v)))
    return {
        "loss_q": sum((qi - q_target) ** 2 for qi in q),
        "loss_v": jnp.where(diff >= 0, options.tau, 1 - options.tau) * diff ** 2,
        "loss_cql": sum(cross_entropy(x, target_ids) for x in qs),
        "loss_awac": cross_entropy(logits, target_ids) * weight,
        "q": jax.lax.stop_gradient(q[0]), "v": jax.lax.stop_gradient(v), "awac_weight": weight,
    }


def combine_terms(options: ILQLConfig, terms: dict) -> jax.Array:
    """The per-position loss: loss_q + loss_v + cql_scale · loss_cql + awac_scale · loss_awac."""
    return (terms["loss_q"] + terms["loss_v"] + options.cql_scale * terms["loss_cql"]
            + options.awac_scale * terms["loss_awac"])


def make_loss(options: ILQLConfig) -> recipe.Loss:
    """`fn(model_config, {"model": params, "heads": heads}, batch) -> (sum over actions of the
    loss, number of actions, {term: sum over actions})` over `easytune.data.offline` rows."""

    def loss_fn(model_config, params, batch):
        family = models.family(model_config.model_type)
        hidden, _ = family.hidden_states(model_config, params["model"], batch["input_ids"], batch["positions"],
                                         batch["segment_ids"])
        logits = family.logits_from_hidden(model_config, params["model"], hidden)
        qs, target_qs, values = head_outputs(params["heads"], hidden)
        target_qs = tuple(jax.lax.stop_gradient(t) for t in target_qs)
        terms = ilql_terms(options, logits, qs, target_qs, values, batch["target_ids"], batch["loss_mask"],
                           batch["reward"])
        mask = batch["loss_mask"].astype(jnp.float32)
        total = lambda x: jnp.sum(x * mask)  # noqa: E731
        extras = {name: total(terms[name]) for name in ("loss_q", "loss_v", "loss_cql", "loss_awac")}
        extras.update({"values": total(terms["v"]), "qvalues": total(terms["q"]),
                       "awac_weight": total(terms["awac_weight"])})
        return total(combine_terms(options, terms)), jnp.sum(mask), extras

    return recipe.Loss(loss_fn, "actions")


# ----------------------------------------------------------------------------- steered generation

def steer_logits(params: dict, hidden: jax.Array, logits: jax.Array) -> jax.Array:
    """trlx's ILQL sampling logits `[batch, vocab]`: log_softmax(logits) + beta · (min target Q − V),
    from the final hidden states `[batch, H]`; `params`: `{"heads": {"v", "target_q"}, "beta"}`."""
    _, target_qs, values = head_outputs(params["heads"], hidden)
    advantage = functools.reduce(jnp.minimum, target_qs) - values[:, None]
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1) + params["beta"] * advantage


def steering(heads: dict, beta: float):
    """The `generate.Steering` hook of trained heads at `beta` (0: the LM's own distribution)."""
    from easytune.generate import Steering
    return Steering(steer_logits, {"heads": {"v": heads["v"], "target_q": heads["target_q"]},
                                   "beta": jnp.float32(beta)})


# ----------------------------------------------------------------------------- heads on disk

def _trlx_names(heads: dict) -> dict[str, tuple[tuple[str, ...], bool]]:
    """trlx state-dict name -> (path in our tree, is a kernel), e.g. `ilql_heads.q_heads.1.2.weight`
    -> (("q", "1", "out", "kernel"), True)."""
    names = {}
    groups = [("v_head", ("v",))] + [(f"{kind}.{k}", (ours, k)) for kind, ours in (("q_heads", "q"),
                                                                                  ("target_q_heads", "target_q"))
                                     for k in sorted(heads[ours])]
    for prefix, path in groups:
        for index, layer in (("0", "hidden"), ("2", "out")):
            names[f"ilql_heads.{prefix}.{index}.weight"] = (path + (layer, "kernel"), True)
            names[f"ilql_heads.{prefix}.{index}.bias"] = (path + (layer, "bias"), False)
    return names


def save_heads(path: str, heads: dict, options: ILQLConfig) -> None:
    """Write the heads as a safetensors file under trlx's state-dict names (`ilql_heads.v_head.0.weight`,
    ...; torch's `[out, in]` weights), with the ILQL options as metadata. Call on every process
    (the arrays are gathered); process 0 writes."""
    from safetensors.numpy import save_file

    from easytune.distributed import host_array
    host = jax.tree.map(host_array, heads)
    tensors = {}
    for name, (where, is_kernel) in _trlx_names(host).items():
        value = functools.reduce(lambda tree, key: tree[key], where, host)
        tensors[name] = np.ascontiguousarray(value.T if is_kernel else value)
    if jax.process_index() == 0:
        save_file(tensors, path, metadata={"format": "pt", "easytune": "ilql_heads",
                                           "ilql": json.dumps(dataclasses.asdict(options))})


def load_heads(path: str) -> tuple[dict, ILQLConfig | None]:
    """`(heads as host float arrays, the ILQL options they were trained with)` from `save_heads`'s
    file (or a trlx checkpoint's state dict saved as safetensors)."""
    from safetensors import safe_open
    if os.path.isdir(path):
        path = os.path.join(path, HEADS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no ILQL heads at {path}; an ILQL run writes them to <output_dir>/{HEADS_FILE}.")
    with safe_open(path, framework="numpy") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        metadata = f.metadata() or {}
    two_qs = "ilql_heads.q_heads.1.0.weight" in tensors
    skeleton = {"v": None, "q": {str(i): None for i in range(1 + two_qs)},
                "target_q": {str(i): None for i in range(1 + two_qs)}}
    heads: dict = {}
    for name, (where, is_kernel) in _trlx_names(skeleton).items():
        if name not in tensors:
            raise ValueError(f"{path} is not an ILQL heads file: it has no tensor {name}.")
        node = heads
        for key in where[:-1]:
            node = node.setdefault(key, {})
        node[where[-1]] = tensors[name].T if is_kernel else tensors[name]
    options = ILQLConfig(**json.loads(metadata["ilql"])) if "ilql" in metadata else None
    return heads, options


# ----------------------------------------------------------------------------- the recipe

def prompt_of(episode) -> list[dict]:
    """The turns before an episode's first action (its prompt)."""
    if episode.prompt_turns is not None:
        return episode.messages[:episode.prompt_turns]
    first = next(i for i, m in enumerate(episode.messages) if m["role"] == "assistant")
    return episode.messages[:first]


class ILQLRecipe(recipe.Recipe):
    """ILQL on logged (prompt, completion, reward) episodes: the LM and its V/Q heads trained
    jointly offline; steered sampling with the trained heads after."""

    name = "ILQL"
    flag_groups = ("data", "peft")
    adapters = ("lora", "qlora", "dora")
    learning_rates = {"full": 5e-5, "lora": 5e-4}  # trlx's default_ilql_config (full); LoRA 10x
    defaults = {
        "output_dir": "outputs/ilql",
        "train_data": "",
        "seq_length": 512,
        "tau": 0.7,
        "gamma": 0.99,
        "cql_scale": 0.1,
        "awac_scale": 1.0,
        "alpha": 0.001,
        "beta": 0.0,
        "steps_for_target_q_sync": 5,
        "two_qs": True,
        "normalize_rewards": True,
        "reward_fn": "",
        "eval_prompts": 32,
        "gen_beta": 1.0,
        "gen_top_k": 20,
        "gen_temperature": 1.0,
        "max_new_tokens": 56,
        "optimizer": {"weight_decay": 1e-6},
    }
    docs = {
        "train_data": "offline episodes: .jsonl/.json/.parquet or a `datasets` name; {prompt, completion, reward} "
                      "(prompt/completion as strings or message lists) or {messages, reward} (every assistant "
                      "turn is an action)",
        "eval_data": "evaluation episodes, same layout (rewards normalised with the training data's mean and std)",
        "batch_size": "global batch in episodes (one per row), across all hosts and accumulation steps",
        "loss_reduction": "mean: per action token over the global batch (trlx); sum: per micro-batch sum averaged "
                          "over accumulation steps",
        "tau": "expectile of the value loss (V regresses towards the tau-expectile of the target Q)",
        "gamma": "discount of the TD target r + gamma * V(next state)",
        "cql_scale": "weight of the CQL term (cross-entropy of each Q head's outputs against the taken token)",
        "awac_scale": "weight of the AWAC term (the LM's cross-entropy weighted by exp(beta * (Q - V)))",
        "alpha": "Polyak rate: target <- alpha * Q + (1 - alpha) * target",
        "beta": "AWAC temperature in the training loss (trlx's method.beta; 0 = plain behaviour cloning)",
        "steps_for_target_q_sync": "Polyak-update the target Q heads after every N-th optimizer step",
        "two_qs": "two Q heads (and targets), the minimum taken (false: one)",
        "normalize_rewards": "z-score the rewards over the training episodes, as trlx does",
        "reward_fn": "module:function scoring completions (as --reward_fn of train_ppo); with it the run reports "
                     "the mean reward of steered and unsteered samples on --eval_prompts prompts at the end",
        "eval_prompts": "distinct prompts (eval data's, else the training data's) sampled for the final reward "
                        "figures",
        "gen_beta": "steering strength of the final samples: log_softmax(logits) + gen_beta * (min target Q - V) "
                    "(trlx's gen_kwargs beta)",
        "gen_top_k": "top-k of the final samples (0 = off)",
        "gen_temperature": "temperature of the final samples (0 = greedy)",
        "max_new_tokens": "tokens generated per final sample",
        "optimizer.weight_decay": "AdamW weight decay (trlx's default 1e-6)",
        "peft": "none (all weights, as trlx; default), lora, qlora or dora; the heads are trained in full either way",
        "seed": "data order, head initialisation and sampling seed",
    }

    @staticmethod
    def options(cfg) -> ILQLConfig:
        return ILQLConfig(tau=cfg.tau, gamma=cfg.gamma, cql_scale=cfg.cql_scale, awac_scale=cfg.awac_scale,
                          alpha=cfg.alpha, beta=cfg.beta, steps_for_target_q_sync=cfg.steps_for_target_q_sync,
                          two_qs=bool(cfg.two_qs))

    def validate(self, cfg) -> None:
        self.options(cfg)
        if not cfg.train_data:
            raise ValueError("ILQL needs --train_data: episodes {prompt, completion, reward} or {messages, reward}.")
        if cfg.reward_fn:
            from easytune.rewards import load_reward_fn
            load_reward_fn(cfg.reward_fn)

    def check_record(self, cfg, record: dict, where: str) -> None:
        from easytune.data.offline import parse_offline
        parse_offline(record, where)

    def setup(self, ctx: recipe.Context) -> recipe.Job:
        from easytune import data, sharding
        from easytune.data import offline
        cfg, model = ctx.cfg, ctx.model
        options = self.options(cfg)

        def episodes(source):
            located = data.load_located_records(source)
            examples, raw, stats = offline.tokenize_offline(located, model.tokenizer, ctx.template, cfg.seq_length,
                                                            source)
            if stats.num_dropped:
                recipe.dropped(ctx.is_main, f"dropped {stats.num_dropped} of {stats.num_records} episodes of {source} "
                                            f"with no action token left after truncation to seq_length="
                                            f"{cfg.seq_length}")
            return located, examples, raw, stats

        located, examples, raw, stats = episodes(cfg.train_data)
        normalised, stats.reward_mean, stats.reward_std = offline.normalize_rewards(raw)
        if not cfg.normalize_rewards:
            normalised = np.asarray(raw, np.float64)
        rows = offline.offline_rows(examples, normalised, cfg.seq_length)
        logger.info("train data %s: %s; rows of %d tokens", cfg.train_data, stats.summary(), rows["input_ids"].shape[1])
        eval_rows, eval_located = None, None
        if cfg.eval_data:
            eval_located, eval_examples, eval_raw, _ = episodes(cfg.eval_data)
            eval_rewards = (offline.zscore(eval_raw, stats.reward_mean, stats.reward_std)  # the training data's
                            if cfg.normalize_rewards else np.asarray(eval_raw, np.float64))
            eval_rows = offline.offline_rows(eval_examples, eval_rewards, cfg.seq_length)

        make = functools.partial(init_heads, hidden_size=model.config.hidden_size,
                                 vocab_size=model.config.vocab_size, two_qs=options.two_qs)
        key = jax.random.key(cfg.seed)
        shapes = jax.eval_shape(make, key)
        shardings = sharding.tree_shardings({"heads": shapes}, HEAD_RULES, model.mesh)["heads"]
        with jax.set_mesh(model.mesh):  # created in their shards, never whole on one device
            params = jax.jit(make, out_shardings=shardings)(key)
        heads = recipe.Heads(params=params, frozen=is_target, after_step=sync_after_step(options), rules=HEAD_RULES)

        def report(history, summary):
            out = {"ilql_heads": os.path.join(cfg.output_dir, HEADS_FILE)}  # beside the checkpoints' "heads" item
            save_heads(os.path.join(storage.run_files(cfg.output_dir), HEADS_FILE), heads.params, options)
            if cfg.reward_fn:
                out.update(self.sampled_rewards(cfg, model, heads.params, eval_located or located))
                out["behaviour_reward_mean"] = float(np.mean(raw))
            return out

        return recipe.Job(
            model=model, rows=rows, eval_rows=eval_rows, loss=make_loss(options), heads=heads, report=report,
            summary={"train_episodes": stats.num_kept, "train_episodes_dropped": stats.num_dropped,
                     "reward_mean": stats.reward_mean, "reward_std": stats.reward_std,
                     "head_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))})

    @staticmethod
    def sampled_rewards(cfg, model, heads: dict, located) -> dict:
        """Mean --reward_fn reward of completions sampled (--gen_* settings) on up to --eval_prompts
        distinct prompts, steered (--gen_beta) and unsteered (beta 0: the trained LM alone)."""
        from easytune.data.offline import parse_offline
        from easytune.generate import SamplingConfig
        from easytune.rewards import call_reward_fn, load_reward_fn
        fn = load_reward_fn(cfg.reward_fn)
        prompts, records, seen = [], [], set()
        for record, where in located:
            prompt = prompt_of(parse_offline(record, where))
            key = json.dumps(prompt, sort_keys=True)
            if key not in seen:
                seen.add(key)
                prompts.append(prompt)
                records.append(record)
            if len(prompts) >= cfg.eval_prompts:
                break
        columns = {k: [r.get(k) for r in records] for k in records[0]
                   if k not in ("prompt", "completion", "reward", "messages")}
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.gen_temperature,
                                  top_k=cfg.gen_top_k)
        out = {}
        for name, beta in (("steered", cfg.gen_beta), ("unsteered", 0.0)):
            ids = model.generate(prompts, sampling=sampling, seed=cfg.seed, return_tokens=True,
                                 steer=steering(heads, beta))
            texts = [model.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
            scores = call_reward_fn(fn, prompts, texts, ids, columns)
            out[f"{name}_reward_mean"] = float(np.mean(scores))
        out["eval_prompts"] = len(prompts)
        logger.info("sampled rewards on %d prompts: steered (beta %g) %.4f, unsteered %.4f", len(prompts),
                    cfg.gen_beta, out["steered_reward_mean"], out["unsteered_reward_mean"])
        return out


RECIPE = ILQLRecipe()
