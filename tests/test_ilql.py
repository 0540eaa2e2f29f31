"""ILQL (`easytune.algos.ilql`, `python -m easytune.train_ilql`): every loss term against an
independent PyTorch implementation of trlx's definitions on identical tensors (trlx itself cannot
be installed here: it pins deepspeed and torch 1.x-era packages), the heads and their Polyak update
against trlx's modules, the steered sampler against argmax of the perturbed logits, and a tiny
offline run whose steered samples score above the behaviour data, with exact resume and reloadable
heads."""
import functools
import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import logged, run_config

# ----------------------------------------------------------------------------- trlx, in PyTorch
# Transcribed from trlx (CarperAI/trlx @ main): trlx/utils/modeling.py `make_head`,
# trlx/models/modeling_ilql.py `ILQLHeads`, `ILQLConfig.loss`,
# trlx/trainer/accelerate_ilql_trainer.py `make_experience`, trlx/pipeline/offline_pipeline.py
# `ilql_collate_fn` (right padding: ids with the pad id, everything else with 0).


def trlx_make_head(n_embd, out):
    from torch import nn
    return nn.Sequential(nn.Linear(n_embd, n_embd * 2), nn.ReLU(), nn.Linear(n_embd * 2, out))


def trlx_make_experience(samples, rewards):
    """samples: lists of (tokens, is_output) segments."""
    import torch
    all_input_ids, all_actions_ixs, all_states_ixs, all_dones = [], [], [], []
    for sample in samples:
        length = 0
        all_input_ids.append(torch.tensor(sum((tuple(tokens) for tokens, _ in sample), ())))
        actions_ixs = []
        for tokens, is_output in sample:
            if is_output:
                actions_ixs.append(torch.arange(length - 1, length + len(tokens) - 1))
            length += len(tokens)
        states_ixs = torch.hstack((*actions_ixs, torch.tensor(length - 1)))
        all_dones.append(torch.tensor([1] * (len(states_ixs) - 1) + [0], dtype=int))
        all_actions_ixs.append(torch.hstack(actions_ixs))
        all_states_ixs.append(states_ixs)
    returns = torch.tensor(rewards, dtype=float)
    returns = returns - returns.mean()
    std_returns = returns.std()
    if not torch.isnan(std_returns):
        returns = returns / (std_returns + torch.finfo(returns.dtype).eps)
    rewards = [torch.zeros(len(x)) for x in all_actions_ixs]
    for rs, ret in zip(rewards, returns):
        rs[-1] = ret
    pad = functools.partial(torch.nn.utils.rnn.pad_sequence, batch_first=True)
    return (pad(all_input_ids, padding_value=0), pad(rewards, padding_value=0.0), pad(all_states_ixs, padding_value=0),
            pad(all_actions_ixs, padding_value=0), pad(all_dones, padding_value=0))


def trlx_heads_forward(v_head, q_heads, target_q_heads, hs, states_ixs, actions_ixs):
    def select(x, idxs):
        return x.gather(dim=1, index=idxs.unsqueeze(-1).expand(idxs.shape[0], idxs.shape[1], x.shape[-1]))
    states_hs, actions_hs = select(hs, states_ixs), select(hs, actions_ixs)
    return (tuple(q(actions_hs) for q in q_heads), tuple(q(actions_hs) for q in target_q_heads), v_head(states_hs))


def trlx_loss(cfg, logits, qs, target_qs, vs, input_ids, actions_ixs, rewards, dones):
    import torch
    import torch.nn.functional as F
    terminal_mask = dones[:, :-1]
    n_nonterminal = max(1, terminal_mask.sum())
    actions = input_ids[:, 1:].gather(dim=1, index=actions_ixs).unsqueeze(-1)
    nactions = actions.shape[1]
    bsize, _, dsize = logits.shape
    Q = [q.gather(-1, actions).squeeze(-1) for q in qs]
    targetQs = [q.gather(-1, actions).squeeze(-1).detach() for q in target_qs]
    targetQ = functools.reduce(torch.minimum, targetQs)
    V = vs[:, :-1, 0]
    Vnext = vs[:, 1:, 0] * dones[:, 1:].to(vs.dtype)
    Q_ = rewards + cfg.gamma * Vnext.detach()
    loss_q = sum(((Qi - Q_) * terminal_mask).pow(2).sum() / n_nonterminal for Qi in Q)
    targetQ = targetQ.detach()
    loss_v = (((targetQ >= V).int() * cfg.tau * (targetQ - V).pow(2)
               + (targetQ < V).int() * (1 - cfg.tau) * (targetQ - V).pow(2)) * terminal_mask).sum() / n_nonterminal

    def cql_loss(q):
        loss = F.cross_entropy(q.reshape(-1, dsize), actions.reshape(-1), reduction="none")
        return (loss.reshape(bsize, nactions) * terminal_mask).sum() / n_nonterminal

    loss_cql = sum(cql_loss(q) for q in qs)
    action_logits = logits.gather(dim=1, index=actions_ixs.unsqueeze(-1).expand(bsize, nactions, dsize))
    cross_entropy = F.cross_entropy(action_logits.reshape(-1, dsize), actions.reshape(-1),
                                    reduction="none").reshape(bsize, nactions)
    with torch.no_grad():
        awac_weight = torch.exp(cfg.beta * (targetQ - V))
    loss_awac = torch.sum(cross_entropy * awac_weight * terminal_mask) / n_nonterminal
    loss = loss_q + loss_v + cfg.cql_scale * loss_cql + cfg.awac_scale * loss_awac
    stats = {"loss": loss, "loss_q": loss_q, "loss_v": loss_v, "loss_cql": loss_cql, "loss_awac": loss_awac,
             "values": (V * terminal_mask).sum() / n_nonterminal,
             "qvalues": (Q[0] * terminal_mask).sum() / n_nonterminal,
             "awac_weight": (awac_weight * terminal_mask).sum() / n_nonterminal}
    return {k: float(v.detach()) for k, v in stats.items()}


def torch_head(head: dict):
    """A trlx head holding our head's weights."""
    import torch
    module = trlx_make_head(head["hidden"]["kernel"].shape[0], head["out"]["kernel"].shape[1])
    with torch.no_grad():
        for index, layer in ((0, "hidden"), (2, "out")):
            module[index].weight.copy_(torch.tensor(np.asarray(head[layer]["kernel"]).T))
            module[index].bias.copy_(torch.tensor(np.asarray(head[layer]["bias"])))
    return module


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("two_qs,beta", [(True, 0.0), (True, 0.7), (False, 0.3)])
def test_loss_terms_match_trlx(two_qs, beta, monkeypatch):
    """Episodes (one with two output segments, trlx's dialogue case) through our rows and loss, and
    through trlx's make_experience, collate, ILQLHeads and ILQLConfig.loss, on identical hidden
    states, logits and head weights: every term, the total and the logged statistics agree."""
    import torch

    from easytune import models
    from easytune.algos import ilql
    from easytune.data import offline
    from easytune.data.tokenize import Example

    rng = np.random.default_rng(0)
    vocab, hidden_size = 13, 6
    tokens = lambda n: rng.integers(1, vocab, n).tolist()  # noqa: E731
    samples = [[(tokens(3), False), (tokens(4), True)],
               [(tokens(2), False), (tokens(3), True), (tokens(2), False), (tokens(2), True)],
               [(tokens(5), False), (tokens(1), True)]]
    raw_rewards = [1.0, -0.5, 2.0]
    options = ilql.ILQLConfig(tau=0.6, gamma=0.9, cql_scale=0.3, awac_scale=0.8, alpha=0.2, beta=beta, two_qs=two_qs)

    # ours
    examples = [Example(sum((t for t, _ in s), []), sum(([int(out)] * len(t) for t, out in s), [])) for s in samples]
    normalised, _, _ = offline.normalize_rewards(raw_rewards)
    rows = offline.offline_rows(examples, normalised, seq_length=64)
    seq = rows["input_ids"].shape[1]
    hidden = rng.standard_normal((len(samples), seq, hidden_size)).astype(np.float32)
    logits = (2 * rng.standard_normal((len(samples), seq, vocab))).astype(np.float32)
    heads = ilql.init_heads(jax.random.key(1), hidden_size, vocab, two_qs)
    # targets that differ from the Q heads (as after training), so min(target Q) is not Q
    heads["target_q"] = jax.tree.map(lambda x: x + 0.3 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32),
                                     heads["target_q"])
    family = type("Fixed", (), {"hidden_states": staticmethod(lambda *a, **k: (jnp.asarray(hidden), None)),
                                "logits_from_hidden": staticmethod(lambda *a, **k: jnp.asarray(logits))})
    monkeypatch.setattr(models, "family", lambda name: family)
    config = type("Config", (), {"model_type": "llama"})()
    loss_sum, count, extras = ilql.make_loss(options)(config, {"model": {}, "heads": heads},
                                                      {k: jnp.asarray(v) for k, v in rows.items()})
    ours = {"loss": float(loss_sum) / float(count), **{k: float(v) / float(count) for k, v in extras.items()}}

    # trlx
    input_ids, rewards, states_ixs, actions_ixs, dones = trlx_make_experience(samples, raw_rewards)
    length = input_ids.shape[1]
    np.testing.assert_array_equal(input_ids.numpy(), rows["input_ids"][:, :length])  # the same episodes
    qs, target_qs, vs = trlx_heads_forward(
        torch_head(heads["v"]), [torch_head(heads["q"][k]) for k in sorted(heads["q"])],
        [torch_head(heads["target_q"][k]) for k in sorted(heads["target_q"])],
        torch.tensor(hidden[:, :length]), states_ixs, actions_ixs)
    expected = trlx_loss(options, torch.tensor(logits[:, :length]), qs, target_qs, vs, input_ids, actions_ixs,
                         rewards, dones)
    assert float(count) == float(dones[:, :-1].sum())
    for name, value in expected.items():
        np.testing.assert_allclose(ours[name], value, rtol=2e-5, atol=1e-6, err_msg=name)


def test_rewards_are_z_scored_as_trlx():
    """trlx's make_experience: float64, unbiased std + float64 eps; one record is only centred."""
    import torch

    from easytune.data import offline
    rewards = [3.0, -1.0, 0.5, 7.25]
    returns = torch.tensor(rewards, dtype=float)
    returns = returns - returns.mean()
    expected = returns / (returns.std() + torch.finfo(returns.dtype).eps)
    np.testing.assert_allclose(offline.normalize_rewards(rewards)[0], expected.numpy(), rtol=1e-15)
    single, mean, std = offline.normalize_rewards([4.0])
    assert single.tolist() == [0.0] and mean == 4.0 and std is None


def test_polyak_update_and_its_cadence_match_trlx():
    """`polyak` equals trlx's `_sync_target_q_heads` on the same weights, and the Trainer's
    after-step hook applies it after optimizer steps k, 2k, ... only (trlx:
    `iter_count % steps_for_target_q_sync == 0`)."""
    from easytune.algos import ilql
    options = ilql.ILQLConfig(alpha=0.25, steps_for_target_q_sync=3)
    heads = ilql.init_heads(jax.random.key(0), 4, 9)
    heads["q"] = jax.tree.map(lambda x: x + 1.0, heads["q"])  # trained away from the targets
    q_modules = [torch_head(heads["q"][k]) for k in sorted(heads["q"])]
    target_modules = [torch_head(heads["target_q"][k]) for k in sorted(heads["target_q"])]
    for target_head, q_head in zip(target_modules, q_modules):  # trlx's _sync_target_q_heads(alpha)
        for target_param, copy_param in zip(target_head.parameters(), q_head.parameters()):
            target_param.data.copy_((options.alpha * copy_param.data) + (1.0 - options.alpha) * target_param.data)
    synced = ilql.polyak(heads, options.alpha)
    for k, module in zip(sorted(heads["q"]), target_modules):
        for index, layer in ((0, "hidden"), (2, "out")):
            np.testing.assert_allclose(np.asarray(synced["target_q"][k][layer]["kernel"]).T,
                                       module[index].weight.detach().numpy(), rtol=1e-6)
            np.testing.assert_allclose(np.asarray(synced["target_q"][k][layer]["bias"]),
                                       module[index].bias.detach().numpy(), rtol=1e-6)
    after_step = jax.jit(ilql.sync_after_step(options))
    state, synced_at = heads, []
    for step_index in range(7):
        new = after_step(state, step_index)
        if not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new["target_q"]),
                                                        jax.tree.leaves(state["target_q"]))):
            synced_at.append(step_index + 1)
        state = new
    assert synced_at == [3, 6]


# ----------------------------------------------------------------------------- steered sampling


def test_steered_greedy_sampling_is_argmax_of_the_perturbed_logits(char_chat_model):
    """Greedy generation with the ILQL hook picks, at every step, argmax of log_softmax(logits) +
    beta * (min target Q - V) computed from a full forward of the prompt and the tokens so far
    (trlx's `generate` at temperature 0); the steering changes what is generated."""
    import easytune
    from easytune import models
    from easytune.algos import ilql
    model = easytune.load(char_chat_model)
    heads = ilql.init_heads(jax.random.key(3), model.config.hidden_size, model.config.vocab_size)
    heads["target_q"] = jax.tree.map(lambda x: 4.0 * x, heads["target_q"])  # strong enough to steer
    beta = 2.0
    from easytune.data import render_ids
    prompt = render_ids(model.tokenizer, [{"role": "user", "content": "abc"}], add_generation_prompt=True)
    steered = model.generate([prompt], max_new_tokens=8, steer=ilql.steering(heads, beta))[0]
    plain = model.generate([prompt], max_new_tokens=8)[0]
    assert steered != plain
    family = models.family(model.config.model_type)
    sequence = list(prompt)
    for token in steered:
        hidden, _ = family.hidden_states(model.config, model.params, jnp.asarray([sequence]))
        logits = family.logits_from_hidden(model.config, model.params, hidden[:, -1:])[:, 0]
        _, target_qs, values = ilql.head_outputs(heads, hidden[:, -1])
        perturbed = jax.nn.log_softmax(logits, -1) + beta * (jnp.minimum(*target_qs) - values[:, None])
        assert token == int(jnp.argmax(perturbed[0]))
        sequence.append(token)
        if token in model.eos_token_ids:
            break


# ----------------------------------------------------------------------------- end to end


def share_of_a(prompts, completions, **kwargs):
    """The behaviour data's reward: the share of 'a' among the completion's a/b letters."""
    out = []
    for completion in completions:
        letters = [c for c in completion if c in "ab"]
        out.append(letters.count("a") / len(letters) if letters else 0.0)
    return out


@pytest.fixture(scope="module")
def episodes(tmp_path_factory):
    """128 logged episodes: 40 prompts, completions of six random a/b letters, reward share_of_a."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("ilql") / "episodes.jsonl"
    with open(path, "w") as f:
        for i in range(128):
            completion = "".join(rng.choice("ab") for _ in range(6))
            f.write(json.dumps({"prompt": f"letters {i % 40}", "completion": completion,
                                "reward": share_of_a(None, [completion])[0]}) + "\n")
    return str(path)


def ilql_config(model, train_data, output_dir, **overrides):
    from easytune import train_ilql
    return run_config(train_ilql.DEFAULTS, {
        "model": model, "train_data": train_data, "output_dir": str(output_dir), "batch_size": 16,
        "total_steps": 100, "log_steps": 10, "seq_length": 64, "optimizer.lr": 1e-3, "optimizer.warmup_steps": 0,
        "optimizer.schedule": "constant", "alpha": 0.1, "steps_for_target_q_sync": 1,
        "reward_fn": "test_ilql:share_of_a", "gen_beta": 4.0, "max_new_tokens": 8, "eval_prompts": 40,
        **overrides})


def test_offline_run_steers_above_the_behaviour_data(char_chat_model, episodes, tmp_path):
    """100 steps on 128 episodes (mean reward 0.50): steered samples of the trained LM score well
    above the behaviour data's mean, unsteered ones do not; the target heads carry no optimizer
    state; the heads reload from ilql_heads.safetensors (trlx's names) and, with the LM loaded
    from the run, reproduce the run's steered figure."""
    import easytune
    from easytune import train_ilql
    from easytune.algos import ilql
    from easytune.data import load_located_records
    cfg = ilql_config(char_chat_model, episodes, tmp_path / "run")
    summary = train_ilql.run(cfg)
    records = logged(tmp_path / "run")
    assert records[-1]["loss"] < records[0]["loss"]
    assert {"loss_q", "loss_v", "loss_cql", "loss_awac", "values", "qvalues", "awac_weight"} <= set(records[-1])
    behaviour = summary["behaviour_reward_mean"]
    assert abs(behaviour - 0.5) < 0.05
    assert summary["steered_reward_mean"] > behaviour + 0.15, summary
    assert summary["steered_reward_mean"] > summary["unsteered_reward_mean"] + 0.15, summary
    heads, options = ilql.load_heads(summary["ilql_heads"])
    assert options == ilql.RECIPE.options(cfg)
    # Adam's two moments for the model and the trained heads (V, Q1, Q2) only, none for the targets
    state = summary["train_state_bytes"]
    trained_heads = sum(x.nbytes for x in jax.tree.leaves((heads["v"], heads["q"])))
    assert state["heads"] == trained_heads + sum(x.nbytes for x in jax.tree.leaves(heads["target_q"]))
    assert 2 * (state["params"] + trained_heads) <= state["optimizer"] <= 2 * (state["params"] + trained_heads) + 64
    model = easytune.load(str(tmp_path / "run"))  # the newest checkpoint, as a plain LM
    from safetensors import safe_open
    with safe_open(summary["ilql_heads"], framework="numpy") as f:  # torch's [out, in] weights
        assert {"ilql_heads.v_head.0.weight", "ilql_heads.q_heads.1.2.bias",
                "ilql_heads.target_q_heads.0.2.weight"} <= set(f.keys())
        assert f.get_tensor("ilql_heads.q_heads.0.2.weight").shape == (model.config.vocab_size,
                                                                       2 * model.config.hidden_size)
    again = ilql.ILQLRecipe.sampled_rewards(cfg, model, jax.tree.map(jnp.asarray, heads),
                                            load_located_records(episodes))
    assert again["steered_reward_mean"] == summary["steered_reward_mean"]


def test_resume_continues_the_heads_and_their_targets(char_chat_model, episodes, tmp_path):
    """A run stopped at step 3 and resumed to 6 logs the losses of an uninterrupted run: the
    checkpoint restores the heads (online and target) beside the model and the optimizer."""
    from easytune import train_ilql
    common = {"total_steps": 6, "log_steps": 1, "save_steps": 3, "reward_fn": "", "steps_for_target_q_sync": 2,
              "alpha": 0.5}
    train_ilql.run(ilql_config(char_chat_model, episodes, tmp_path / "whole", **common))
    train_ilql.run(ilql_config(char_chat_model, episodes, tmp_path / "parts", **{**common, "total_steps": 3}))
    train_ilql.run(ilql_config(char_chat_model, episodes, tmp_path / "parts", **common, resume=True,
                               resume_override="total_steps"))
    whole, parts = logged(tmp_path / "whole"), logged(tmp_path / "parts")
    assert [r["step"] for r in parts] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(whole, parts):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-6)
        np.testing.assert_allclose(b["loss_v"], a["loss_v"], rtol=1e-5)


def test_targets_follow_the_q_heads_after_every_kth_optimizer_step(char_chat_model, episodes, tmp_path):
    """The Trainer runs the Polyak update after the optimizer's (trlx: after `opt.step()`, when
    `iter_count % k == 0`): with alpha 1 and k 2 the targets equal the Q heads after step 2 exactly,
    and after step 3 they still hold step 2's Q heads, which step 3 then moved."""
    import jax

    from easytune import train_ilql
    from easytune.algos import ilql
    common = {"log_steps": 1, "reward_fn": "", "steps_for_target_q_sync": 2, "alpha": 1.0}
    two = train_ilql.run(ilql_config(char_chat_model, episodes, tmp_path / "two", total_steps=2, **common))
    three = train_ilql.run(ilql_config(char_chat_model, episodes, tmp_path / "three", total_steps=3, **common))
    heads_two, heads_three = ilql.load_heads(two["ilql_heads"])[0], ilql.load_heads(three["ilql_heads"])[0]
    jax.tree.map(np.testing.assert_array_equal, heads_two["target_q"], heads_two["q"])
    jax.tree.map(np.testing.assert_array_equal, heads_three["target_q"], heads_two["q"])
    assert not np.array_equal(heads_three["q"]["0"]["out"]["kernel"], heads_two["q"]["0"]["out"]["kernel"])


def test_bad_episodes_are_one_sentence_naming_the_line(char_chat_model, tmp_path):
    """A record without a numeric reward is reported with its file and line before the model loads."""
    from easytune import train_ilql
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b", "reward": 1}) + "\n"
                    + json.dumps({"prompt": "a", "completion": "b", "reward": "high"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: an offline RL record needs a finite number 'reward'"):
        train_ilql.run(ilql_config(char_chat_model, str(path), tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "checkpoints")
