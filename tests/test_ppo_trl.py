"""easytune.algos.ppo against TRL's own code, run on identical tensors (torch, CPU).

TRL is the oracle throughout: its code is run, never restated here. Where it comes from:

- trl 1.8.0, `trl/experimental/ppo/ppo_trainer.py` (PPO left TRL after 1.8): the standalone
  `masked_mean`, `masked_var`, `masked_whiten`, `forward`, `PolicyAndValueWrapper` and
  `INVALID_LOGPROB`, and two blocks of `PPOTrainer.train()` cut out of the source text between
  marker lines: the rollout block (padding masks, KL k1/k3, non-score and score rewards,
  whitened rewards, the GAE loop, whitened advantages) and the minibatch loss block (new log-probs,
  clipped value loss, clipped policy loss, clip fractions, entropy, approxkl).
- trl 0.11.4 (the last with the old PPOTrainer): `trl/trainer/utils.py` `AdaptiveKLController`
  and `FixedKLController`, and `PPOTrainer._kl_penalty` in `trl/trainer/ppo_trainer.py`
  ("kl" = k1, "mse" = k2: no later TRL has k2).
- the installed trl (1.16): `trl/trainer/grpo_trainer.py` (the group-advantage block of
  `_generate_and_score_completions`; `GRPOTrainer._compute_loss` called unbound with a stand-in
  self), `trl/trainer/rloo_trainer.py` (the leave-one-out advantage block;
  `RLOOTrainer._compute_loss`), `trl.trainer.utils` (`nanstd`, `selective_log_softmax`,
  `entropy_from_logits`, which the 1.8.0 blocks also use); for the GRPO family (DAPO, Dr. GRPO,
  GSPO) the same `GRPOTrainer._compute_loss` with each `loss_type` (grpo, bnpo, dr_grpo, dapo) and
  `importance_sampling_level` (token, sequence), and `trl.rewards.get_soft_overlong_punishment`.

Old versions are never installed: their wheels are fetched once with `pip download --no-deps` into
`<easytune cache>/trl-wheels` and read with zipfile; functions and classes are taken out with `ast`
and blocks by their first and last lines, then exec'd in a namespace that provides their inputs.
When a marker or a definition is not found (TRL's code changed) the test fails and says which.

The losses on a real model (`policy_loss_fn`, `value_loss_fn`) run one tiny random LLaMA in
easytune (JAX) and in transformers (torch); TRL's loss code gets the torch model's outputs.
"""
import __future__

import ast
import collections
import functools
import glob
import importlib
import inspect
import math
import os
import subprocess
import sys
import textwrap
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import easytune
from easytune import assets
from easytune.algos import ppo

from conftest import TINY, make_hf_model

TRL_WHEELS = os.path.join(assets.default_cache_dir(), "trl-wheels")
PPO_TRAINER = ("1.8.0", "trl/experimental/ppo/ppo_trainer.py")
OLD_UTILS = ("0.11.4", "trl/trainer/utils.py")
OLD_PPO_TRAINER = ("0.11.4", "trl/trainer/ppo_trainer.py")
RTOL, ATOL = 1e-5, 1e-6  # float32 throughout


# ----------------------------------------------------------------------------- TRL's code

@functools.lru_cache(maxsize=None)
def trl_source(version: str, path: str) -> str:
    """The text of `path` in trl==`version`, read from its wheel (downloaded once, no deps)."""
    wheels = glob.glob(os.path.join(TRL_WHEELS, f"trl-{version}-*.whl"))
    if not wheels:
        os.makedirs(TRL_WHEELS, exist_ok=True)
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                                 f"trl=={version}", "-d", TRL_WHEELS], capture_output=True, text=True)
        wheels = glob.glob(os.path.join(TRL_WHEELS, f"trl-{version}-*.whl"))
        if not wheels:
            pytest.fail(f"could not download the trl=={version} wheel into {TRL_WHEELS} (the TRL oracle for these "
                        f"tests; put it there by hand when offline):\n{result.stdout}{result.stderr}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        return wheel.read(path).decode()


@functools.lru_cache(maxsize=None)
def installed_source(module: str) -> str:
    return inspect.getsource(importlib.import_module(module))


def _compile(code: str, where: str):
    # annotations stay strings, so TRL's type hints need not resolve in our namespace
    return compile(code, where, "exec", flags=__future__.annotations.compiler_flag, dont_inherit=True)


def trl_definitions(source: str, where: str, names, **namespace) -> dict:
    """Exec TRL's top-level functions, classes and constants `names` ("Class.method" for a
    method, which becomes a plain function taking `self`) into `namespace`; return it."""
    tree = ast.parse(source)
    for name in names:
        owner, _, member = name.rpartition(".")
        body = tree.body
        if owner:
            classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == owner]
            body = classes[0].body if classes else []
        found = [n for n in body
                 if (isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == member)
                 or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) == member for t in n.targets))]
        if not found:
            pytest.fail(f"TRL's code changed: no definition of {name!r} in {where}")
        code = textwrap.dedent(ast.get_source_segment(source, found[0], padded=True))
        exec(_compile(code, f"<{where}: {name}>"), namespace)
    return namespace


def trl_block(source: str, where: str, start: str, end: str) -> str:
    """The lines of `source` from the first that starts with `start` through the next that starts
    with `end` (both stripped of indentation), dedented."""
    lines = source.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip().startswith(start)), None)
    if first is None:
        pytest.fail(f"TRL's code changed: no line starting with {start!r} in {where}")
    last = next((i for i in range(first, len(lines)) if lines[i].strip().startswith(end)), None)
    if last is None:
        pytest.fail(f"TRL's code changed: no line starting with {end!r} after {start!r} in {where}")
    return textwrap.dedent("\n".join(lines[first:last + 1]))


def run_block(code: str, where: str, namespace: dict, **inputs) -> dict:
    """Exec a block of TRL's code with `inputs` as its local variables; return all its variables."""
    scope = {**namespace, **inputs}
    exec(_compile(code, f"<{where}>"), scope)
    return scope


@functools.lru_cache(maxsize=None)
def ppo_1_8() -> dict:
    """trl 1.8.0's PPO module pieces, with what they use."""
    from trl.trainer.utils import selective_log_softmax
    version, path = PPO_TRAINER
    return trl_definitions(trl_source(version, path), f"trl {version} {path}",
                           ["INVALID_LOGPROB", "masked_mean", "masked_var", "masked_whiten", "forward",
                            "PolicyAndValueWrapper"],
                           torch=torch, nn=torch.nn, np=np, math=math, selective_log_softmax=selective_log_softmax)


def ppo_train_block(start: str, end: str) -> str:
    version, path = PPO_TRAINER
    return trl_block(trl_source(version, path), f"trl {version} {path} PPOTrainer.train", start, end)


def trl_ppo_rollout(logprobs, ref_logprobs, values, scores, sequence_lengths, **args):
    """TRL 1.8.0 PPOTrainer.train(), from the padding masks to the whitened advantages, on a rollout:
    per-token `logprobs`, `ref_logprobs`, `values` `[batch, response]`, `scores` and
    `sequence_lengths` (index of each response's last token) `[batch]`. Returns its variables."""
    code = ppo_train_block("response_idxs = torch.arange(",
                           "advantages = torch.masked_fill(advantages, padding_mask, 0)")
    args = types.SimpleNamespace(**{"kl_estimator": "k1", "kl_coef": 0.05, "gamma": 1.0, "lam": 0.95,
                                    "whiten_rewards": False, **args})
    return run_block(code, "trl 1.8.0 PPOTrainer.train: rewards and GAE", ppo_1_8(),
                     responses=torch.zeros(logprobs.shape, dtype=torch.long), logprobs=logprobs,
                     ref_logprobs=ref_logprobs, values=values, scores=scores, sequence_lengths=sequence_lengths,
                     args=args)


def trl_ppo_losses(output, vpred_temp, context_length, rollout, **args):
    """TRL 1.8.0 PPOTrainer.train()'s minibatch losses (one minibatch: the whole rollout) from the
    policy's `output.logits` and the critic's `vpred_temp` over the query + response, and the
    rollout variables of `trl_ppo_rollout` (mb_* = the rollout's). Returns its variables."""
    code = ppo_train_block("logits = output.logits[:, context_length - 1 : -1]",
                           "approxkl = 0.5 * (logprobs_diff**2).mean()")
    args = types.SimpleNamespace(**{"temperature": 1.0, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1,
                                    **args})
    inds = np.arange(len(rollout["scores"]))
    return run_block(code, "trl 1.8.0 PPOTrainer.train: losses", ppo_1_8(), output=output, vpred_temp=vpred_temp,
                     context_length=context_length, args=args, micro_batch_inds=inds,
                     padding_mask=rollout["padding_mask"], padding_mask_p1=rollout["padding_mask_p1"],
                     mb_advantage=rollout["advantages"], mb_responses=rollout["responses"],
                     mb_logprobs=rollout["logprobs"], mb_return=rollout["returns"], mb_values=rollout["values"],
                     accelerator=types.SimpleNamespace(backward=lambda loss: None),
                     optimizer=types.SimpleNamespace(step=lambda: None, zero_grad=lambda: None))


# ----------------------------------------------------------------------------- helpers

def j(tensor):
    return jnp.asarray(tensor.detach().numpy())


def close(ours, theirs, **tolerances):
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    np.testing.assert_allclose(np.asarray(ours), theirs, **{"rtol": RTOL, "atol": ATOL, **tolerances})


def ragged_rollout(seed, sequence_lengths, response_length=9):
    """Random per-token log-probs, reference log-probs and values `[batch, response]` and scores."""
    generator = torch.Generator().manual_seed(seed)
    shape = (len(sequence_lengths), response_length)
    logprobs = -3 * torch.rand(shape, generator=generator)
    ref_logprobs = logprobs + 0.5 * torch.randn(shape, generator=generator)
    values = torch.randn(shape, generator=generator)
    scores = 2 * torch.randn(shape[0], generator=generator)
    return logprobs, ref_logprobs, values, scores, torch.tensor(sequence_lengths)


# TRL's sequence_lengths (index of each response's last token) for 9-token responses: one without
# padding, one whose score lands on the last position, a 1-token response, ...
SEQUENCE_LENGTHS = [8, 7, 0, 3, 5, 2]


# ----------------------------------------------------------------------------- 1. masked statistics

def test_masked_statistics_match_trl():
    trl = ppo_1_8()
    torch.manual_seed(0)
    values = 3 * torch.randn(5, 9) + 1
    lengths = torch.tensor([9, 4, 1, 7, 2])
    mask = torch.arange(9)[None] < lengths[:, None]
    v, m = j(values), j(mask)
    close(ppo.masked_mean(v, m), trl["masked_mean"](values, mask))
    close(ppo.masked_mean(v, m, axis=1), trl["masked_mean"](values, mask, axis=1))
    for unbiased in (True, False):
        close(ppo.masked_var(v, m, unbiased=unbiased), trl["masked_var"](values, mask, unbiased=unbiased))
    for shift_mean in (True, False):
        close(ppo.masked_whiten(v, m, shift_mean=shift_mean), trl["masked_whiten"](values, mask, shift_mean=shift_mean))


# ----------------------------------------------------------------------------- 2. KL and token rewards

def test_kl_estimators_match_trl():
    """k1 and k3 as TRL 1.8.0's PPO rollout computes them; k1 and k2 as trl 0.11.4's _kl_penalty."""
    logprobs, ref_logprobs, values, scores, lengths = ragged_rollout(1, SEQUENCE_LENGTHS)
    for estimator in ("k1", "k3"):
        rollout = trl_ppo_rollout(logprobs, ref_logprobs, values, scores, lengths, kl_estimator=estimator)
        close(ppo.kl_penalty(j(logprobs), j(ref_logprobs), estimator)[j(~rollout["padding_mask"])],
              rollout["kl"][~rollout["padding_mask"]])
        # TRL sets both log-probs to INVALID_LOGPROB past the end, where its KL is then 0
        close(ppo.kl_penalty(j(rollout["logprobs"]), j(rollout["ref_logprobs"]), estimator), rollout["kl"])
        assert torch.all(rollout["kl"][rollout["padding_mask"]] == 0)
    version, path = OLD_PPO_TRAINER
    old = trl_definitions(trl_source(version, path), f"trl {version} {path}", ["PPOTrainer._kl_penalty"],
                          torch=torch, F=torch.nn.functional)
    for estimator, name in (("k1", "kl"), ("k2", "mse")):
        stand_in = types.SimpleNamespace(config=types.SimpleNamespace(kl_penalty=name))
        close(ppo.kl_penalty(j(logprobs), j(ref_logprobs), estimator),
              old["_kl_penalty"](stand_in, logprobs, ref_logprobs))


def test_missing_eos_penalty_matches_trl():
    code = ppo_train_block("contain_eos_token = torch.any(",
                           "scores[~contain_eos_token] -= self.args.missing_eos_penalty")
    generator = torch.Generator().manual_seed(5)
    eos = 2
    responses = torch.randint(3, 9, (6, 5), generator=generator)
    responses[[0, 2, 3], [1, 4, 0]] = eos
    scores = torch.randn(6, generator=generator)
    stand_in = types.SimpleNamespace(processing_class=types.SimpleNamespace(eos_token_id=eos),
                                     args=types.SimpleNamespace(missing_eos_penalty=1.5))
    theirs = run_block(code, "trl 1.8.0 PPOTrainer.train: missing EOS penalty", {"torch": torch},
                       postprocessed_responses=responses, scores=scores.clone(), self=stand_in)
    has_eos = np.asarray(theirs["contain_eos_token"])
    assert 0 < has_eos.sum() < len(has_eos)  # some completions are penalized, some not
    close(ppo.penalize_missing_eos(j(scores), jnp.asarray(has_eos), 1.5), theirs["scores"])
    close(ppo.penalize_missing_eos(j(scores), jnp.asarray(has_eos), 0.0), scores)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_token_rewards_match_trl(estimator, whiten_rewards):
    logprobs, ref_logprobs, values, scores, lengths = ragged_rollout(2, SEQUENCE_LENGTHS)
    kl_coef = 0.3
    rollout = trl_ppo_rollout(logprobs, ref_logprobs, values, scores, lengths, kl_estimator=estimator,
                              kl_coef=kl_coef, whiten_rewards=whiten_rewards)
    # TRL adds the score one past each response's last token (its EOS), or on the last token of a
    # response that fills the length (row 0)
    assert rollout["actual_end"].tolist() == [8, 8, 1, 4, 6, 3]
    mask = j(~rollout["padding_mask"])
    kl = ppo.kl_penalty(j(logprobs), j(ref_logprobs), estimator)
    rewards, non_score = ppo.token_rewards(j(scores), kl, j(rollout["actual_end"]), kl_coef, mask)
    close(non_score, rollout["non_score_reward"])
    if whiten_rewards:  # TRL whitens over the positions up to one past the EOS (its padding_mask_p1)
        kept = j(~rollout["padding_mask_p1"])
        rewards = jnp.where(kept, ppo.masked_whiten(rewards, kept, shift_mean=False), 0.0)
    close(rewards, rollout["rewards"])


# ----------------------------------------------------------------------------- 3. GAE

@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0)])
@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_gae_matches_trl(gamma, lam, whiten_rewards):
    logprobs, ref_logprobs, values, scores, lengths = ragged_rollout(3, SEQUENCE_LENGTHS)
    rollout = trl_ppo_rollout(logprobs, ref_logprobs, values, scores, lengths, gamma=gamma, lam=lam,
                              whiten_rewards=whiten_rewards, kl_estimator="k3")
    # TRL's values as it masks them (kept one past the EOS), its rewards (score included)
    advantages, returns = ppo.gae(j(rollout["rewards"]), j(rollout["values"]), gamma, lam)
    close(advantages, torch.stack(rollout["advantages_reversed"][::-1], axis=1))
    close(returns, rollout["returns"])
    mask = j(~rollout["padding_mask"])
    close(jnp.where(mask, ppo.masked_whiten(advantages, mask), 0.0), rollout["advantages"], atol=1e-5)


# ----------------------------------------------------------------------------- 4. PPO losses

def _noisy_rollout(generator, new_logprobs, vpred, lengths, noise=0.5, **args):
    """A rollout whose old log-probs and values are the new ones plus noise, so that ratios and
    values leave the clip ranges on both sides."""
    old_logprobs = new_logprobs + noise * torch.randn(new_logprobs.shape, generator=generator)
    ref_logprobs = new_logprobs + noise * torch.randn(new_logprobs.shape, generator=generator)
    values = vpred + noise * torch.randn(vpred.shape, generator=generator)
    scores = 2 * torch.randn(len(lengths), generator=generator)
    return trl_ppo_rollout(old_logprobs, ref_logprobs, values, scores, lengths, **args)


def _assert_clipped_both_ways(ratio, advantages, mask, low, high):
    clipped_low = (ratio < 1 - low) & (advantages < 0) & mask
    clipped_high = (ratio > 1 + high) & (advantages > 0) & mask
    assert clipped_low.any() and clipped_high.any(), "the test data should clip on both sides"


def test_ppo_losses_match_trl():
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax
    generator = torch.Generator().manual_seed(4)
    batch, context, response, vocab, temperature = 6, 3, 9, 11, 0.7
    logits = 2 * torch.randn(batch, context + response, vocab, generator=generator)
    vpred_temp = torch.randn(batch, context + response, 1, generator=generator)
    responses = torch.randint(vocab, (batch, response), generator=generator)
    lengths = torch.tensor(SEQUENCE_LENGTHS)
    new = selective_log_softmax(logits[:, context - 1:-1] / (temperature + 1e-7), responses)
    rollout = _noisy_rollout(generator, new, vpred_temp[:, context - 1:-1, 0], lengths, kl_estimator="k3")
    rollout["responses"] = responses
    theirs = trl_ppo_losses(types.SimpleNamespace(logits=logits.clone()), vpred_temp, context, rollout,
                            temperature=temperature, cliprange=0.2, cliprange_value=0.2)
    mask, value_mask = j(~rollout["padding_mask"]), j(~rollout["padding_mask_p1"])

    losses, ratio, clipped = ppo.clipped_policy_loss(j(theirs["new_logprobs"]), j(rollout["logprobs"]),
                                                     j(rollout["advantages"]), 0.2, 0.2)
    close(ratio, theirs["ratio"])
    close(losses, theirs["pg_loss_max"])
    close(ppo.masked_mean(losses, mask), theirs["pg_loss"])
    close(ppo.masked_mean(clipped, mask), theirs["pg_clipfrac"])
    assert 0 < theirs["pg_clipfrac"] < 1
    _assert_clipped_both_ways(theirs["ratio"], rollout["advantages"], ~rollout["padding_mask"], 0.2, 0.2)

    value_losses, value_clipped = ppo.clipped_value_loss(j(theirs["vpred"]), j(rollout["values"]),
                                                         j(rollout["returns"]), 0.2)
    close(ppo.masked_mean(value_losses, value_mask), theirs["vf_loss"])
    close(ppo.masked_mean(value_clipped, value_mask), theirs["vf_clipfrac"])
    assert 0 < theirs["vf_clipfrac"] < 1

    # entropy of the temperature-scaled logits, per token, as TRL's PPO loop and trl.trainer.utils
    close(ppo.entropy_from_logits(j(theirs["logits"])), theirs["entropy"], atol=1e-5)
    close(ppo.entropy_from_logits(j(theirs["logits"])), entropy_from_logits(theirs["logits"]), atol=1e-5)


# ----------------------------------------------------------------------------- 5. the losses on a model

PROMPT, RESPONSE, BATCH = 5, 7, 8
PAD, EOS = TINY["pad_token_id"], TINY["eos_token_id"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """One tiny random LLaMA policy and a value model (its LlamaForSequenceClassification twin,
    num_labels=1), each in transformers and in easytune."""
    import transformers
    policy_dir, value_dir = tmp_path_factory.mktemp("policy"), tmp_path_factory.mktemp("value")
    torch_policy = make_hf_model("llama2", policy_dir)
    torch.manual_seed(1)
    config = transformers.LlamaConfig(**{**TINY, "rms_norm_eps": 1e-5, "num_labels": 1})
    torch_value = transformers.LlamaForSequenceClassification(config).eval()
    torch_value.save_pretrained(str(value_dir))
    policy = easytune.load(str(policy_dir), dtype="float32", tokenizer=False)
    value = easytune.load(str(value_dir), dtype="float32", tokenizer=False)
    assert value.config.num_labels == 1
    return torch_policy, torch_value, policy, value


def rollout_tokens(seed):
    """A batch in ppo.py's layout: prompts left-padded, responses right-padded after their EOS
    (row 0 runs to the response length without one). Returns input_ids, positions, segment_ids
    `[batch, prompt + response]` and response_mask `[batch, response]` (numpy)."""
    rng = np.random.RandomState(seed)
    input_ids = np.full((BATCH, PROMPT + RESPONSE), PAD, np.int64)
    response_mask = np.zeros((BATCH, RESPONSE), np.int64)
    for row in range(BATCH):
        prompt_length = PROMPT if row == 0 else rng.randint(1, PROMPT + 1)
        response_length = RESPONSE if row < 2 else rng.randint(1, RESPONSE + 1)
        input_ids[row, PROMPT - prompt_length:PROMPT] = rng.randint(3, TINY["vocab_size"], prompt_length)
        input_ids[row, PROMPT:PROMPT + response_length] = rng.randint(3, TINY["vocab_size"], response_length)
        if row > 0:
            input_ids[row, PROMPT + response_length - 1] = EOS
        response_mask[row, :response_length] = 1
    segment_ids = (input_ids != PAD).astype(np.int32)
    positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
    return input_ids, positions, segment_ids, response_mask


def ours(loss_fn, model, batch):
    total, count, metrics = jax.jit(loss_fn, static_argnums=0)(
        model.config, model.params, {k: jnp.asarray(v) for k, v in batch.items()})
    return float(total / count), {k: float(v / count) for k, v in metrics.items()}


def test_ppo_policy_and_value_losses_match_trl(tiny_models):
    from trl.trainer.utils import selective_log_softmax
    torch_policy, torch_value, policy, value = tiny_models
    input_ids, positions, segment_ids, response_mask = rollout_tokens(5)
    temperature, cliprange, cliprange_value, vf_coef = 0.7, 0.2, 0.2, 0.1
    trl = ppo_1_8()
    wrapper = trl["PolicyAndValueWrapper"](torch_policy, torch_value)
    query_responses = torch.tensor(input_ids)
    with torch.no_grad():
        # TRL's forward: attention on the non-pad tokens, positions counted from each row's first token
        output, vpred_temp = trl["forward"](wrapper, query_responses, PAD)
        new = selective_log_softmax(output.logits[:, PROMPT - 1:-1] / (temperature + 1e-7), query_responses[:, PROMPT:])
        lengths = torch.tensor(response_mask.sum(1) - 1)  # TRL's sequence_lengths: index of the last token
        rollout = _noisy_rollout(torch.Generator().manual_seed(6), new, vpred_temp[:, PROMPT - 1:-1, 0], lengths,
                                 noise=0.3, kl_estimator="k1", kl_coef=0.05)
        rollout["responses"] = query_responses[:, PROMPT:]
        theirs = trl_ppo_losses(output, vpred_temp, PROMPT, rollout, temperature=temperature, cliprange=cliprange,
                                cliprange_value=cliprange_value, vf_coef=vf_coef)
    assert np.array_equal(~rollout["padding_mask"].numpy(), response_mask.astype(bool))
    assert 0 < theirs["pg_clipfrac"] < 1 and 0 < theirs["vf_clipfrac"] < 1
    _assert_clipped_both_ways(theirs["ratio"], rollout["advantages"], ~rollout["padding_mask"], cliprange, cliprange)

    options = ppo.RLConfig(algo="ppo", temperature=temperature, cliprange=cliprange, cliprange_value=cliprange_value,
                           vf_coef=vf_coef)
    batch = dict(input_ids=input_ids, positions=positions, segment_ids=segment_ids, response_mask=response_mask,
                 old_logprobs=rollout["logprobs"].numpy(), ref_logprobs=rollout["ref_logprobs"].numpy(),
                 advantages=rollout["advantages"].numpy(), returns=rollout["returns"].numpy(),
                 old_values=rollout["values"].numpy())
    loss, metrics = ours(ppo.policy_loss_fn(options), policy, batch)
    close(loss, theirs["pg_loss"])
    close(metrics["policy/clipfrac"], theirs["pg_clipfrac"])
    # TRL logs ratio, entropy and approxkl as plain means over all [batch, response] positions;
    # ours are over the response tokens. Past the end TRL's log-prob difference is 0 (both are
    # INVALID_LOGPROB), so its approxkl times positions / tokens is the token mean.
    tokens = ~rollout["padding_mask"]
    close(metrics["policy/ratio"], theirs["ratio"][tokens].mean())
    close(metrics["policy/entropy"], theirs["entropy"][tokens].mean())
    close(metrics["policy/approxkl"], theirs["approxkl"] * tokens.numel() / tokens.sum())

    # TRL's critic loss covers one position past the EOS (padding_mask_p1), where TRL puts the
    # score; easytune puts the score on the EOS (module docstring), so give ours TRL's positions.
    value_batch = {**batch, "response_mask": (~rollout["padding_mask_p1"]).numpy().astype(np.int64)}
    value_loss, value_metrics = ours(ppo.value_loss_fn(options), value, value_batch)
    close(value_loss, vf_coef * theirs["vf_loss"])
    close(value_metrics["value/loss"], theirs["vf_loss"])
    close(value_metrics["value/clipfrac"], theirs["vf_clipfrac"])


def trlx_make_head(n_embd: int, out: int) -> torch.nn.Sequential:
    """trlx's `trlx.utils.modeling.make_head`, restated (trlx cannot be installed here)."""
    return torch.nn.Sequential(torch.nn.Linear(n_embd, n_embd * 2), torch.nn.ReLU(), torch.nn.Linear(n_embd * 2, out))


def trlx_ppo_loss(logprobs, values, old_logprobs, old_values, advantages, returns, mask, cliprange, cliprange_value,
                  vf_coef):
    """trlx's `PPOConfig.loss` (trlx/models/modeling_ppo.py), restated: the token-mean clipped
    policy loss plus vf_coef times the token-mean clipped value loss; (loss, pg_loss, vf_loss,
    vf_clipfrac)."""
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    n = mask.sum()
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (values_clipped - returns) ** 2
    vf_loss = 0.5 * torch.sum(torch.max(vf_loss1, vf_loss2) * mask) / n
    vf_clipfrac = torch.sum((vf_loss2 > vf_loss1).float() * mask) / n
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = torch.sum(torch.max(pg_loss1, pg_loss2) * mask) / n
    return pg_loss + vf_coef * vf_loss, pg_loss, vf_loss, vf_clipfrac


@pytest.mark.parametrize("head_chunk_size, exact_ratio", [(0, True), (48, True), (0, False)])
def test_shared_value_head_loss_and_gradients_match_trlx(tiny_models, head_chunk_size, exact_ratio):
    """`--critic=shared` is trlx's PPO model (`AutoModelForCausalLMWithValueHead` with
    num_value_layers_unfrozen=0: `make_head(hidden, 1)` on `hidden_states[-1]`) trained by trlx's
    `PPOConfig.loss`: the same loss and the same gradients, for the value head and for the
    policy's own weights (the value loss reaches them), with the full logits and the fused head,
    and with the forward fused into the backward (`--exact_ratio=false`), which compiles to fewer
    FLOPs than the checkpointed forward (it is not run a second time)."""
    import dataclasses

    from trl.trainer.utils import selective_log_softmax
    torch_policy, _, policy, _ = tiny_models
    config = dataclasses.replace(policy.config, head_chunk_size=head_chunk_size)
    input_ids, positions, segment_ids, response_mask = rollout_tokens(7)
    cliprange, cliprange_value, vf_coef = 0.2, 0.2, 0.5
    torch.manual_seed(3)
    head = trlx_make_head(TINY["hidden_size"], 1)
    ids = torch.tensor(input_ids)
    torch_policy.zero_grad()
    output = torch_policy(input_ids=ids, attention_mask=ids != PAD, position_ids=torch.tensor(positions).long(),
                          output_hidden_states=True)
    logprobs = selective_log_softmax(output.logits[:, PROMPT - 1:-1], ids[:, PROMPT:])
    values = head(output.hidden_states[-1]).squeeze(-1)[:, PROMPT - 1:-1]
    generator = torch.Generator().manual_seed(8)
    noise = lambda x, scale: (x.detach() + scale * torch.randn(x.shape, generator=generator))  # noqa: E731
    old_logprobs, old_values = noise(logprobs, 0.3), noise(values, 0.3)
    advantages, returns = torch.randn(values.shape, generator=generator), noise(values, 1.0)
    mask = torch.tensor(response_mask).float()
    loss, pg_loss, vf_loss, vf_clipfrac = trlx_ppo_loss(logprobs, values, old_logprobs, old_values, advantages,
                                                        returns, mask, cliprange, cliprange_value, vf_coef)
    assert 0 < vf_clipfrac < 1
    loss.backward()

    batch = {k: jnp.asarray(v) for k, v in dict(
        input_ids=input_ids, positions=positions, segment_ids=segment_ids, response_mask=response_mask,
        old_logprobs=old_logprobs.numpy(), ref_logprobs=old_logprobs.numpy(), advantages=advantages.numpy(),
        returns=returns.numpy(), old_values=old_values.numpy()).items()}
    heads = {ppo.VALUE_HEAD: {"hidden": {"kernel": j(head[0].weight.T), "bias": j(head[0].bias)},
                              "out": {"kernel": j(head[2].weight.T), "bias": j(head[2].bias)}}}

    def step(exact):
        loss_fn = ppo.shared_loss_fn(ppo.RLConfig(algo="ppo", temperature=1.0, cliprange=cliprange,
                                                  cliprange_value=cliprange_value, vf_coef=vf_coef,
                                                  exact_ratio=exact)).fn

        def mean_loss(params):
            total, count, metrics = loss_fn(config, params, batch)
            return total / count, {k: v / count for k, v in metrics.items()}

        return jax.jit(jax.value_and_grad(mean_loss, has_aux=True))

    params = {"model": policy.params, "heads": heads}
    (ours, metrics), grads = step(exact_ratio)(params)
    if not exact_ratio:
        flops = {exact: step(exact).lower(params).compile().cost_analysis()["flops"] for exact in (True, False)}
        assert flops[False] < 0.9 * flops[True], flops
    close(ours, loss.item())
    close(metrics["value/loss"], vf_loss.item())
    close(metrics["value/clipfrac"], vf_clipfrac.item())
    close(metrics["policy/ratio"], (torch.exp(logprobs - old_logprobs) * mask).sum().item() / mask.sum().item())
    head_grads = grads["heads"][ppo.VALUE_HEAD]
    close(head_grads["hidden"]["kernel"], head[0].weight.grad.T, atol=2e-6)
    close(head_grads["out"]["kernel"], head[2].weight.grad.T, atol=2e-6)
    close(head_grads["out"]["bias"], head[2].bias.grad, atol=2e-6)
    # a policy weight the value loss and the policy loss both reach, through every layer
    close(grads["model"]["embed"]["embedding"], torch_policy.model.embed_tokens.weight.grad, atol=2e-6)
    assert float(jnp.abs(head_grads["out"]["kernel"]).max()) > 1e-3


class _Accelerator:
    num_processes = 1

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def trl_compute_loss(trainer_class, torch_policy, input_ids, positions, response_mask, temperature, inputs, **attrs):
    """`trainer_class._compute_loss` (TRL 1.16 GRPO or RLOO), unbound, with a stand-in self whose
    `_get_per_token_logps_and_entropies` runs the transformers model with our positions and TRL's
    selective_log_softmax / entropy_from_logits at `temperature` (TRL's own goes through its
    fused LM head). Returns (loss, TRL's logged metrics)."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    def per_token_logps_and_entropies(model, ids, attention_mask, logits_to_keep, compute_entropy=False, **kwargs):
        assert torch.equal(ids, torch.tensor(input_ids))
        logits = model(input_ids=ids, attention_mask=attention_mask,
                       position_ids=torch.tensor(positions, dtype=torch.long)).logits[:, -logits_to_keep - 1:-1]
        logps = selective_log_softmax(logits, ids[:, -logits_to_keep:], temperature=temperature)
        return logps, entropy_from_logits(logits / temperature) if compute_entropy else None, None

    stand_in = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps_and_entropies, model=types.SimpleNamespace(training=False),
        accelerator=_Accelerator(), aux_loss_enabled=False, _entropy_bonus_enabled=False, use_vllm=False,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}, **attrs)
    ids = torch.tensor(input_ids)
    inputs = {"prompt_ids": ids[:, :PROMPT], "prompt_mask": torch.tensor(input_ids[:, :PROMPT] != PAD).long(),
              "completion_ids": ids[:, PROMPT:], "completion_mask": torch.tensor(response_mask).float(), **inputs}
    with torch.no_grad():
        loss = trainer_class._compute_loss(stand_in, torch_policy, inputs)
    return loss.item(), {k: v[0] for k, v in stand_in._metrics["eval"].items()}


def _rollout_logprobs(torch_policy, input_ids, positions, temperature, seed, noise):
    """The transformers model's log-probs of the responses (TRL's selective_log_softmax) plus
    noise, as rollout-time and reference log-probs: `(old, ref)` `[batch, response]` float32."""
    from trl.trainer.utils import selective_log_softmax
    ids = torch.tensor(input_ids)
    with torch.no_grad():
        logits = torch_policy(input_ids=ids, attention_mask=ids != PAD,
                              position_ids=torch.tensor(positions, dtype=torch.long)).logits[:, PROMPT - 1:-1]
        logps = selective_log_softmax(logits, ids[:, PROMPT:], temperature=temperature)
    generator = torch.Generator().manual_seed(seed)
    return (logps + noise * torch.randn(logps.shape, generator=generator),
            logps + noise * torch.randn(logps.shape, generator=generator))


def test_grpo_policy_loss_matches_trl(tiny_models):
    """GRPO with the k3 KL term in the loss (beta) and clip-higher, token-level aggregation: TRL's
    "bnpo" and "dapo" (one process, no accumulation) both average over the batch's tokens."""
    from trl.trainer.grpo_trainer import GRPOTrainer
    torch_policy, _, policy, _ = tiny_models
    input_ids, positions, segment_ids, response_mask = rollout_tokens(7)
    temperature, beta, low, high = 0.7, 0.1, 0.2, 0.28
    old, ref = _rollout_logprobs(torch_policy, input_ids, positions, temperature, seed=8, noise=0.3)
    advantages = torch.randn(BATCH, generator=torch.Generator().manual_seed(9))
    advantages -= advantages.mean()  # both signs
    options = ppo.RLConfig(algo="grpo", kl_in="loss", kl_estimator="k3", kl_coef=beta, temperature=temperature,
                           cliprange=low, cliprange_high=high, group_size=4)
    batch = dict(input_ids=input_ids, positions=positions, segment_ids=segment_ids, response_mask=response_mask,
                 old_logprobs=old.numpy(), ref_logprobs=ref.numpy(),
                 advantages=np.repeat(advantages.numpy()[:, None], RESPONSE, axis=1),
                 kl_coef=np.full((BATCH, 1), beta, np.float32))
    loss, metrics = ours(ppo.policy_loss_fn(options), policy, batch)
    for loss_type in ("bnpo", "dapo"):
        theirs, logged = trl_compute_loss(
            GRPOTrainer, torch_policy, input_ids, positions, response_mask, temperature,
            {"advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
             "num_items_in_batch": torch.tensor(float(response_mask.sum()))},
            loss_type=loss_type, beta=beta, epsilon_low=low, epsilon_high=high,
            importance_sampling_level="token", top_entropy_quantile=1.0, off_policy_mask_threshold=None,
            args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None))
        close(loss, theirs)
    assert 0 < logged["clip_ratio/low_mean"] and 0 < logged["clip_ratio/high_mean"]
    assert logged["clip_ratio/region_mean"] < 1
    close(metrics["policy/clipfrac"], logged["clip_ratio/region_mean"])
    close(metrics["policy/kl_ref"], logged["kl"])
    close(metrics["policy/entropy"], logged["entropy"])


def test_rloo_policy_loss_matches_trl(tiny_models):
    """RLOO: one clipped ratio per sequence, exp(sum of the token log-ratios), averaged over sequences."""
    from trl.trainer.rloo_trainer import RLOOTrainer
    torch_policy, _, policy, _ = tiny_models
    input_ids, positions, segment_ids, response_mask = rollout_tokens(10)
    temperature, low, high = 0.7, 0.2, 0.2
    old, ref = _rollout_logprobs(torch_policy, input_ids, positions, temperature, seed=11, noise=0.15)
    advantages = torch.randn(BATCH, generator=torch.Generator().manual_seed(12))
    advantages -= advantages.mean()  # both signs
    options = ppo.RLConfig(algo="rloo", temperature=temperature, cliprange=low, cliprange_high=high, group_size=4)
    batch = dict(input_ids=input_ids, positions=positions, segment_ids=segment_ids, response_mask=response_mask,
                 old_logprobs=old.numpy(), ref_logprobs=ref.numpy(),
                 advantages=np.repeat(advantages.numpy()[:, None], RESPONSE, axis=1))
    loss, metrics = ours(ppo.policy_loss_fn(options), policy, batch)
    old_logps = (old * torch.tensor(response_mask)).sum(1)  # as RLOOTrainer records them at rollout time
    theirs, logged = trl_compute_loss(RLOOTrainer, torch_policy, input_ids, positions, response_mask, temperature,
                                      {"advantages": advantages, "old_logps": old_logps},
                                      epsilon_low=low, epsilon_high=high)
    close(loss, theirs)
    assert 0 < logged["clip_ratio/region_mean"] < 1
    close(metrics["policy/clipfrac"], logged["clip_ratio/region_mean"])
    close(metrics["policy/entropy"], logged["entropy"])


def test_rloo_kl_in_the_loss_adds_beta_times_each_sequences_k3(tiny_models):
    """--algo=rloo --kl_in=loss: each sequence's loss gains beta times its k3 KL to the reference
    summed over its tokens (the sequence's KL, as --kl_in=reward charges it), averaged over the
    sequences. The k3 term is computed here from the transformers model's log-probs
    (TRL's selective_log_softmax), not from ours."""
    torch_policy, _, policy, _ = tiny_models
    input_ids, positions, segment_ids, response_mask = rollout_tokens(15)
    temperature, beta = 0.7, 0.3
    old, ref = _rollout_logprobs(torch_policy, input_ids, positions, temperature, seed=16, noise=0.15)
    logps, _ = _rollout_logprobs(torch_policy, input_ids, positions, temperature, seed=0, noise=0.0)
    advantages = torch.randn(BATCH, generator=torch.Generator().manual_seed(17))
    options = ppo.RLConfig(algo="rloo", kl_in="loss", kl_coef=beta, temperature=temperature, group_size=4)
    batch = {"input_ids": input_ids, "positions": positions, "segment_ids": segment_ids,
             "response_mask": response_mask, "old_logprobs": old.numpy(), "ref_logprobs": ref.numpy(),
             "advantages": np.repeat(advantages.numpy()[:, None], RESPONSE, axis=1)}

    def loss_at(kl_coef):
        loss, _ = ours(ppo.policy_loss_fn(options), policy,
                       {**batch, "kl_coef": np.full((BATCH, 1), kl_coef, np.float32)})
        return loss

    without, with_kl = loss_at(0.0), loss_at(beta)
    log_ratio = ref - logps
    sequence_k3 = ((log_ratio.exp() - 1 - log_ratio) * torch.tensor(response_mask)).sum(1)
    assert sequence_k3.min() > 0
    close(with_kl - without, beta * sequence_k3.mean(), err_msg="the in-loss KL term")


# ----------------------------------------------------------------------------- 6. GRPO and RLOO advantages

def _group_rewards(seed, prompts=3, group_size=4):
    rewards = torch.randn(prompts * group_size, generator=torch.Generator().manual_seed(seed))
    rewards[group_size:2 * group_size] = 0.5  # a group whose completions all scored the same
    return rewards


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale):
    from trl.trainer.utils import nanstd
    where = "trl (installed) grpo_trainer.py GRPOTrainer._generate_and_score_completions"
    code = trl_block(installed_source("trl.trainer.grpo_trainer"), where,
                     "mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)",
                     "is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))")
    rewards = _group_rewards(13)
    theirs = run_block(code, where, {"torch": torch, "nanstd": nanstd}, rewards=rewards, num_generations=4,
                       self=types.SimpleNamespace(scale_rewards=scale))
    close(ppo.group_advantages(j(rewards), 4, scale), theirs["advantages"])


@pytest.mark.parametrize("normalize", [False, True])
def test_leave_one_out_advantages_match_trl(normalize):
    from trl.trainer.utils import nanstd
    where = "trl (installed) rloo_trainer.py RLOOTrainer._generate_and_score_completions"
    code = trl_block(installed_source("trl.trainer.rloo_trainer"), where,
                     "grouped_rewards = rewards.view(-1, num_generations)",
                     "advantages = torch.nan_to_num(advantages, nan=0.0)")
    rewards = _group_rewards(14)
    theirs = run_block(code, where, {"torch": torch, "nanstd": nanstd}, rewards=rewards, num_generations=4,
                       self=types.SimpleNamespace(normalize_advantages=normalize))
    close(ppo.leave_one_out_advantages(j(rewards), 4, normalize=normalize), theirs["advantages"])


# ----------------------------------------------------------------------------- 7. KL controllers

def test_kl_controllers_match_trl():
    version, path = OLD_UTILS
    old = trl_definitions(trl_source(version, path), f"trl {version} {path}",
                          ["AdaptiveKLController", "FixedKLController"], np=np)
    # KL well under, near, and well over the target (the ±20% clip), and uneven step counts
    updates = [(0.5, 256), (3.0, 256), (6.1, 128), (5.9, 512), (100.0, 64), (0.0, 1000), (7.0, 4096)]
    for ours_, theirs in ((ppo.AdaptiveKLController(0.2, 6.0, 10000), old["AdaptiveKLController"](0.2, 6.0, 10000)),
                          (ppo.FixedKLController(0.2), old["FixedKLController"](0.2))):
        for current, n_steps in updates:
            ours_.update(current, n_steps)
            theirs.update(current, n_steps)
            np.testing.assert_allclose(ours_.value, theirs.value, rtol=1e-12)


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_kl_in_the_reward_and_advantages_match_trl(normalize):
    """RLOO's sequence-level k1 KL penalty folded into the rewards, then the leave-one-out
    advantages: TRL's block against the RL loop's `advantages` step on the same rollout."""
    from trl.trainer.utils import nanstd

    from easytune import rl
    where = "trl (installed) rloo_trainer.py RLOOTrainer._generate_and_score_completions"
    code = trl_block(installed_source("trl.trainer.rloo_trainer"), where,
                     "# Include the KL penalty in the reward", "advantages = torch.nan_to_num(advantages, nan=0.0)")
    generator = torch.Generator().manual_seed(21)
    batch, length, beta = 12, 7, 0.3
    mask = (torch.arange(length)[None, :] < torch.randint(1, length + 1, (batch, 1), generator=generator)).float()
    old = -torch.rand(batch, length, generator=generator) * 3
    ref = old + 0.4 * torch.randn(batch, length, generator=generator)
    scores = _group_rewards(22)
    theirs = run_block(code, where, {"torch": torch, "nanstd": nanstd, "gather": lambda x: x}, rewards=scores.clone(),
                       old_per_token_logps=old, ref_per_token_logps=ref, completion_mask=mask, num_generations=4,
                       self=types.SimpleNamespace(beta=beta, normalize_advantages=normalize))
    stand_in = types.SimpleNamespace(
        options=ppo.RLConfig(algo="rloo", kl_in="reward", kl_estimator="k1", group_size=4,
                             normalize_advantages=normalize),
        kl=ppo.FixedKLController(beta))
    rows = {"response_mask": mask.numpy().astype(np.int32), "old_logprobs": old.numpy(), "ref_logprobs": ref.numpy(),
            "old_values": np.zeros((batch, length), np.float32)}
    advantages, metrics = rl.RLSteps.advantages(stand_in, rows, scores.numpy())
    close(advantages["advantages"], (theirs["advantages"][:, None] * mask).numpy())
    close(metrics["objective/kl"], theirs["kl"].mean())


# ----------------------------------------------------------------------------- 8. the GRPO family

def trl_grpo_loss(torch_policy, input_ids, positions, response_mask, temperature, advantages, old, ref, *,
                  loss_type, beta, low, high, level="token"):
    """TRL 1.16 `GRPOTrainer._compute_loss` (eval mode: one process, no accumulation) with
    `loss_type`, `importance_sampling_level=level`, `beta`, `epsilon_low`/`epsilon_high`, and
    max_completion_length the response width (ours: max_new_tokens)."""
    from trl.trainer.grpo_trainer import GRPOTrainer
    return trl_compute_loss(
        GRPOTrainer, torch_policy, input_ids, positions, response_mask, temperature,
        {"advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
         "num_items_in_batch": torch.tensor(float(response_mask.sum()))},
        loss_type=loss_type, beta=beta, epsilon_low=low, epsilon_high=high, importance_sampling_level=level,
        max_completion_length=response_mask.shape[1], top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None))


def _group_family_batch(torch_policy, seed, noise, temperature):
    """A rollout batch on the tiny model (two prompt groups of 4) with noisy old and reference
    log-probs and centred per-sequence advantages: (batch for our loss, TRL's inputs)."""
    input_ids, positions, segment_ids, response_mask = rollout_tokens(seed)
    old, ref = _rollout_logprobs(torch_policy, input_ids, positions, temperature, seed=seed + 1, noise=noise)
    advantages = torch.randn(BATCH, generator=torch.Generator().manual_seed(seed + 2))
    advantages -= advantages.mean()  # both signs
    batch = dict(input_ids=input_ids, positions=positions, segment_ids=segment_ids, response_mask=response_mask,
                 old_logprobs=old.numpy(), ref_logprobs=ref.numpy(),
                 advantages=np.repeat(advantages.numpy()[:, None], RESPONSE, axis=1))
    theirs = dict(input_ids=input_ids, positions=positions, response_mask=response_mask, temperature=temperature,
                  advantages=advantages, old=old, ref=ref)
    return batch, theirs


@pytest.mark.parametrize("algo, level, low, high", [("grpo", "token", 0.2, 0.28), ("gspo", "sequence", 3e-4, 4e-4)])
def test_grpo_loss_types_match_trl(tiny_models, algo, level, low, high):
    """Each of TRL's loss types (--loss_type: grpo, bnpo, dr_grpo, dapo) with the k3 KL term in the
    loss, clip-higher, and the token ratio (--algo=grpo) or GSPO's sequence ratio (--algo=gspo,
    TRL's importance_sampling_level="sequence": exp of the masked mean of the token log ratios,
    clipped as tightly as the GSPO paper does)."""
    torch_policy, _, policy, _ = tiny_models
    temperature, beta = 0.7, 0.1
    batch, inputs = _group_family_batch(torch_policy, seed=30, noise=0.3, temperature=temperature)
    batch["kl_coef"] = np.full((BATCH, 1), beta, np.float32)
    losses = {}
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        options = ppo.RLConfig(algo=algo, loss_type=loss_type, kl_in="loss", kl_estimator="k3", kl_coef=beta,
                               temperature=temperature, cliprange=low, cliprange_high=high, group_size=4)
        losses[loss_type], metrics = ours(ppo.policy_loss_fn(options), policy, batch)
        theirs, logged = trl_grpo_loss(torch_policy, **inputs, loss_type=loss_type, beta=beta, low=low, high=high,
                                       level=level)
        close(losses[loss_type], theirs, err_msg=loss_type)
        # clip fraction over the ratio's units (tokens, or sequences for GSPO), as TRL logs it
        assert 0 < logged["clip_ratio/region_mean"] < 1
        close(metrics["policy/clipfrac"], logged["clip_ratio/region_mean"])
        close(metrics["policy/kl_ref"], logged["kl"])
        close(metrics["policy/entropy"], logged["entropy"])
    # the ragged lengths tell the aggregations apart (bnpo and dapo agree with one process)
    assert len({round(losses[name], 6) for name in ("grpo", "dapo", "dr_grpo")}) == 3


def test_gspo_ratio_is_the_geometric_mean_of_the_token_ratios(tiny_models):
    """GSPO's clipped quantity is exp(mean log ratio) per sequence, not the token ratios nor their
    product (RLOO's): with β = 0, --loss_type=grpo and clipping out of reach, the loss is
    −mean over sequences of A·exp(mean log ratio), computed here from the transformers model."""
    torch_policy, _, policy, _ = tiny_models
    temperature = 0.7
    batch, inputs = _group_family_batch(torch_policy, seed=40, noise=0.3, temperature=temperature)
    options = ppo.RLConfig(algo="gspo", kl_in="none", temperature=temperature, cliprange=0.99, cliprange_high=100.0,
                           group_size=4)
    loss, metrics = ours(ppo.policy_loss_fn(options), policy, batch)
    logps, _ = _rollout_logprobs(torch_policy, inputs["input_ids"], inputs["positions"], temperature, seed=0,
                                 noise=0.0)
    mask = torch.tensor(inputs["response_mask"]).float()
    ratio = (((logps - inputs["old"]) * mask).sum(1) / mask.sum(1)).exp()
    assert ratio.min() < 0.9 and ratio.max() > 1.1  # far from 1: the definition is tested, not the limit
    close(loss, -(inputs["advantages"] * ratio).mean())
    close(metrics["policy/ratio"], ratio.mean())
    assert metrics["policy/clipfrac"] == 0


def _group_scores():
    """Scores of two prompt groups of 4: the first varied, the second all the same."""
    return torch.tensor([0.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0])


def _trl_group_advantages(rewards, scale):
    from trl.trainer.utils import nanstd
    where = "trl (installed) grpo_trainer.py GRPOTrainer._generate_and_score_completions"
    code = trl_block(installed_source("trl.trainer.grpo_trainer"), where,
                     "mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)",
                     "is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))")
    return run_block(code, where, {"torch": torch, "nanstd": nanstd}, rewards=rewards, num_generations=4,
                     self=types.SimpleNamespace(scale_rewards=scale))


def _advantage_rows(batch):
    return {"response_mask": batch["response_mask"], "old_logprobs": batch["old_logprobs"],
            "ref_logprobs": batch["ref_logprobs"], "old_values": np.zeros((BATCH, RESPONSE), np.float32)}


def test_dapo_matches_trl_and_drops_uniform_groups(tiny_models):
    """--algo=dapo as it comes: clip-higher (ε_high 0.28), the token-level loss, no KL, dynamic
    sampling. The RL loop's advantages (TRL's group block) and its minibatch (`minibatch_rows`) on
    a rollout whose second prompt group all scored the same give TRL's "dapo" loss on the first
    group alone, as DAPO's dynamic sampling leaves the uniform group out of the batch."""
    from easytune import rl
    torch_policy, _, policy, _ = tiny_models
    temperature = 0.7
    batch, inputs = _group_family_batch(torch_policy, seed=55, noise=0.3, temperature=temperature)
    batch["kl_coef"] = np.full((BATCH, 1), 0.1, np.float32)  # charged only if the KL were in the loss
    options = ppo.RLConfig(algo="dapo", temperature=temperature, group_size=4)
    assert (options.clip_high, options.kl_in, options.loss_type, options.dynamic_sampling) == (0.28, "none", "dapo",
                                                                                                True)
    scores = _group_scores()
    trl_advantages = _trl_group_advantages(scores.clone(), "group")["advantages"]
    stand_in = types.SimpleNamespace(options=options, kl=ppo.FixedKLController(0.1))
    out, metrics = rl.RLSteps.advantages(stand_in, _advantage_rows(batch), scores.numpy())
    close(out["advantages"], trl_advantages[:, None].numpy() * batch["response_mask"])
    np.testing.assert_array_equal(out["keep"][:, 0], [1, 1, 1, 1, 0, 0, 0, 0])
    assert metrics["reward/dropped_groups"] == 1
    rows = {**batch, "advantages": out["advantages"], "keep": out["keep"]}
    minibatch = rl.minibatch_rows(rows, np.arange(BATCH), list(batch))
    loss, metrics = ours(ppo.policy_loss_fn(options), policy, minibatch)

    kept = slice(0, 4)
    theirs, logged = trl_grpo_loss(
        torch_policy, input_ids=inputs["input_ids"][kept], positions=inputs["positions"][kept],
        response_mask=inputs["response_mask"][kept], temperature=temperature, advantages=trl_advantages[kept],
        old=inputs["old"][kept], ref=inputs["ref"][kept], loss_type="dapo", beta=0.0, low=0.2, high=0.28)
    close(loss, theirs)
    close(metrics["policy/clipfrac"], logged["clip_ratio/region_mean"])
    # clip-higher matters here: some kept tokens with A > 0 have a ratio in (1.2, 1.28], where a
    # symmetric clip would cut them off
    logps, _ = _rollout_logprobs(torch_policy, inputs["input_ids"], inputs["positions"], temperature, seed=0,
                                 noise=0.0)
    ratio = (logps - inputs["old"]).exp()[kept]
    mask = torch.tensor(inputs["response_mask"][kept]).bool()
    assert ((ratio > 1.2) & (ratio <= 1.28) & (trl_advantages[kept, None] > 0) & mask).any()
    # and the drop matters: kept in the batch, the uniform group's tokens would dilute the average
    undropped, _ = ours(ppo.policy_loss_fn(options), policy, {**batch, "advantages": out["advantages"]})
    tokens = batch["response_mask"].sum()
    close(undropped * tokens, loss * batch["response_mask"][kept].sum())
    assert abs(undropped - loss) > 1e-3


def test_dr_grpo_matches_trl(tiny_models):
    """--algo=dr_grpo: the RL loop's advantages are TRL's with scale_rewards="none" (no division by
    the group's std), and the loss is TRL's "dr_grpo": the sum over tokens / (sequences x
    max_completion_length), with the k3 KL in the loss."""
    from easytune import rl
    torch_policy, _, policy, _ = tiny_models
    temperature, beta = 0.7, 0.1
    batch, inputs = _group_family_batch(torch_policy, seed=60, noise=0.3, temperature=temperature)
    batch["kl_coef"] = np.full((BATCH, 1), beta, np.float32)
    options = ppo.RLConfig(algo="dr_grpo", kl_coef=beta, temperature=temperature, group_size=4)
    assert (options.scale_rewards, options.loss_type, options.kl_in) == ("none", "dr_grpo", "loss")
    scores = torch.randn(BATCH, generator=torch.Generator().manual_seed(61)) * 3
    trl_advantages = _trl_group_advantages(scores.clone(), "none")["advantages"]
    assert not torch.allclose(trl_advantages, _trl_group_advantages(scores.clone(), "group")["advantages"])
    stand_in = types.SimpleNamespace(options=options, kl=ppo.FixedKLController(beta))
    out, metrics = rl.RLSteps.advantages(stand_in, _advantage_rows(batch), scores.numpy())
    close(out["advantages"], trl_advantages[:, None].numpy() * batch["response_mask"])
    assert np.all(out["keep"] == 1) and "reward/dropped_groups" not in metrics  # no dynamic sampling
    loss, _ = ours(ppo.policy_loss_fn(options), policy, {**batch, "advantages": out["advantages"]})
    theirs, _ = trl_grpo_loss(torch_policy, **{**inputs, "advantages": trl_advantages}, loss_type="dr_grpo",
                              beta=beta, low=0.2, high=0.2)
    close(loss, theirs)


def test_uniform_groups_are_what_dynamic_sampling_drops():
    """A group is dropped exactly when all its scores are equal (DAPO: accuracy 0 or 1 for a 0/1
    reward), whatever the KL; a difference of one float32 ulp keeps it. Off (grpo's default) nothing is dropped;
    --dynamic_sampling turns it on for grpo and rloo too."""
    from easytune import rl
    scores = np.array([1, 1, 1, 1,  1, 1, 1, np.nextafter(np.float32(1), np.float32(2)),  0, 0, 0, 0,
                       0.2, 0.9, 0.4, 0.9], np.float32)
    expected = np.repeat([True, False, True, False], 4)
    np.testing.assert_array_equal(ppo.uniform_groups(jnp.asarray(scores), 4), expected)
    rng = np.random.default_rng(0)
    mask = (np.arange(5)[None, :] < rng.integers(1, 6, (16, 1))).astype(np.int32)
    rows = {"response_mask": mask, "old_logprobs": -rng.random((16, 5), np.float32),
            "ref_logprobs": -rng.random((16, 5), np.float32), "old_values": np.zeros((16, 5), np.float32)}
    for algo, flag, dropped in (("dapo", None, 2), ("grpo", None, None), ("grpo", True, 2), ("rloo", True, 2),
                                ("dr_grpo", None, None)):
        options = ppo.RLConfig(algo=algo, group_size=4, dynamic_sampling=flag)
        stand_in = types.SimpleNamespace(options=options, kl=ppo.FixedKLController(0.1))
        out, metrics = rl.RLSteps.advantages(stand_in, rows, scores)
        assert metrics.get("reward/dropped_groups") == dropped, algo
        keep = out["keep"][:, 0] > 0
        np.testing.assert_array_equal(keep, ~expected if dropped else np.ones(16, bool))
        minibatch = rl.minibatch_rows({**rows, "keep": out["keep"]}, np.arange(16), ["response_mask"])
        np.testing.assert_array_equal(minibatch["response_mask"], mask * keep[:, None])
        if not options.kl_placement.in_reward:
            # a dropped group's advantages were 0 already: the drop changes only what the loss counts
            # (with the KL in the reward, as rloo's default, it also drops the group's KL penalty)
            assert np.all(out["advantages"][expected] == 0), algo


@pytest.mark.parametrize("max_length, buffer", [(20, 5), (16, 16), (9, 1)])
def test_overlong_penalty_matches_trl(max_length, buffer):
    """DAPO's soft overlong punishment against TRL's own reward function
    (`trl.rewards.get_soft_overlong_punishment`), over every length around the buffer, and the
    definition's three pieces."""
    from trl.rewards import get_soft_overlong_punishment
    lengths = np.arange(0, max_length + 4)
    theirs = get_soft_overlong_punishment(max_length, buffer)([[7] * n for n in lengths])
    close(ppo.overlong_penalty(lengths, max_length, buffer), np.asarray(theirs, np.float32))
    ours_ = np.asarray(ppo.overlong_penalty(lengths, max_length, buffer))
    assert np.all(ours_[lengths <= max_length - buffer] == 0) and np.all(ours_[lengths > max_length] == -1)
    inside = (lengths > max_length - buffer) & (lengths <= max_length)
    close(ours_[inside], (max_length - buffer - lengths[inside]) / buffer)
    assert ours_[max_length] == -1


def test_rollout_scores_pay_the_overlong_and_missing_eos_penalties():
    """The scores the advantages see (`RLSteps.shaped_scores`): the reward, less
    --missing_eos_penalty without EOS, plus TRL's soft overlong punishment of each completion's
    tokens (EOS included) with L_max = --overlong_max_length, else --max_new_tokens."""
    from trl.rewards import get_soft_overlong_punishment

    from easytune import generate, rl
    eos, max_new_tokens = 2, 10
    responses = np.full((6, max_new_tokens), 5)
    for row, length in enumerate([1, 5, 7, 8, 10]):  # EOS at the end: 1..10 tokens
        responses[row, length - 1] = eos
    # row 5: no EOS, runs to max_new_tokens
    tokens, positions, segments = generate.left_pad([[3, 4]] * 6, length=2)
    rows = rl.response_rows(tokens, positions, segments, responses, eos_ids=[eos])
    raw = np.linspace(-1, 1, 6).astype(np.float32)
    for overlong_max_length, limit in ((0, max_new_tokens), (8, 8)):
        settings = rl.RolloutConfig(rollout_batch_size=6, max_new_tokens=max_new_tokens, missing_eos_penalty=0.5,
                                    overlong_buffer=4, overlong_max_length=overlong_max_length)
        scores, metrics = rl.RLSteps.shaped_scores(types.SimpleNamespace(settings=settings), rows, raw)
        penalty = np.asarray(get_soft_overlong_punishment(limit, 4)(rl.completion_ids(rows)), np.float32)
        assert (penalty == 0).any() and ((penalty < 0) & (penalty > -1)).any() and (penalty == -1).any()
        close(scores, raw - 0.5 * (rows["has_eos"][:, 0] == 0) + penalty)
        close(metrics["reward/overlong_penalty"], penalty.mean())
    off = rl.RolloutConfig(rollout_batch_size=6, max_new_tokens=max_new_tokens, missing_eos_penalty=0.5)
    scores, metrics = rl.RLSteps.shaped_scores(types.SimpleNamespace(settings=off), rows, raw)
    close(scores, raw - 0.5 * (rows["has_eos"][:, 0] == 0))
    assert metrics == {}
