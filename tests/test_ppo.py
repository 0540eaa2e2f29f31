"""train_ppo end to end on a tiny character-level chat model: GRPO raises a programmatic reward,
PPO with a LoRA policy records old log-probs that the first update reproduces exactly (ratio 1)
and resumes exactly from a checkpoint, RLOO scores with a reward model; rollout rows; and bad
rewards, options and data as clear errors. The losses against TRL's code are in test_ppo_trl.py."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import logged, run_config

import easytune
from easytune import data, generate, recipe, rewards, rl
from easytune.algos import reward as reward_lib
from easytune.train_ppo import DEFAULTS, DOCS, make_scorer, run

REWARDS_MODULE = '''
import math

def digit_fraction(prompts, completions, **kwargs):
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]

def raises(prompts, completions, **kwargs):
    raise KeyError("no such column")

def strings(prompts, completions, **kwargs):
    return ["high" for _ in completions]

def too_few(prompts, completions, **kwargs):
    return [1.0]

def nan(prompts, completions, **kwargs):
    return [math.nan for _ in completions]

def constant(prompts, completions, **kwargs):
    return [1.0 for _ in completions]

def sees_columns(prompts, completions, completion_ids, answer, task, **kwargs):
    assert len(answer) == len(task) == len(completions) == len(completion_ids)
    return [float(len(ids)) for ids in completion_ids]
'''


@pytest.fixture(scope="module")
def reward_module(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rewards")
    (directory / "rl_test_rewards.py").write_text(REWARDS_MODULE)
    sys.path.insert(0, str(directory))
    yield "rl_test_rewards"
    sys.path.remove(str(directory))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    with open(path, "w") as f:
        for record in data.make_task_records(64, seed=3):
            f.write(json.dumps(record) + "\n")
    return str(path)


def make_cfg(model, train_data, output_dir, **overrides):
    return run_config(DEFAULTS, {"model": model, "train_data": train_data, "output_dir": str(output_dir),
                                 "logger": "none", "iterations": 2, "rollout_batch_size": 16, "rollouts_per_prompt": 4,
                                 "max_new_tokens": 16, "temperature": 1.0, "peft": "none", "optimizer.lr": 3e-3,
                                 **overrides})


def test_grpo_raises_a_programmatic_reward(char_chat_model, prompt_file, reward_module, tmp_path):
    cfg = make_cfg(char_chat_model, prompt_file, tmp_path, algo="grpo", iterations=8,
                   reward_fn=f"{reward_module}:digit_fraction")
    summary = run(cfg)
    history = logged(tmp_path)
    assert [h["step"] for h in history] == list(range(1, 9))
    reward = [h["reward/mean"] for h in history]
    assert np.mean(reward[-2:]) > np.mean(reward[:2]) + 0.1, reward
    assert summary["reward/mean_first"] == reward[0] and summary["reward/mean_last"] == reward[-1]
    for h in history:
        assert h["policy/ratio_deviation_first_step"] == 0.0  # old log-probs are the training forward's
        assert h["policy/ratio_deviation"] > 0.0              # and later steps move away from them
        for name in ("reward/std", "objective/kl", "objective/entropy", "policy/clipfrac", "policy/approxkl",
                     "response/length_mean", "time/generation", "time/train", "kl_coef"):
            assert math.isfinite(h[name]), name
    assert history[0]["objective/kl"] == 0.0   # the reference is the initial policy
    assert history[-1]["objective/kl"] > 0.0
    assert "value/loss" not in history[0]     # no critic


@pytest.mark.parametrize("algo, reward, overrides", [
    ("dapo", "digit_fraction", {"overlong_buffer": 8}),
    ("gspo", "digit_fraction", {}),
    ("dapo", "constant", {"iterations": 1}),
])
def test_grpo_family_runs_end_to_end(char_chat_model, prompt_file, reward_module, tmp_path, algo, reward, overrides):
    """--algo=dapo and --algo=gspo through the RL recipe: old log-probs are the training
    forward's (GSPO's sequence ratio is exactly 1 at the first step too), the overlong penalty is
    charged, and with a reward that scores every completion alike dynamic sampling drops every
    group: the jitted update runs on the same shapes with nothing counted and a zero loss."""
    summary = run(make_cfg(char_chat_model, prompt_file, tmp_path, algo=algo, reward_fn=f"{reward_module}:{reward}",
                           **overrides))
    history = logged(tmp_path)
    assert len(history) == overrides.get("iterations", 2)
    assert summary["loss_type"] == {"dapo": "dapo", "gspo": "grpo"}[algo]
    for h in history:
        assert h["policy/ratio_deviation_first_step"] == 0.0
        for name in ("policy/loss", "policy/clipfrac", "policy/kl_ref", "reward/group_std"):
            assert math.isfinite(h[name]), name
        if algo == "gspo":  # units: the minibatch's sequences (16 completions / 2 minibatches)
            assert h["policy/sequences"] == 8 and "reward/dropped_groups" not in h
        elif reward == "constant":  # 4 prompts x 4 completions, every group alike
            assert h["reward/dropped_groups"] == 4 and h["policy/response_tokens"] == 0 and h["policy/loss"] == 0
        else:
            assert 0 <= h["reward/dropped_groups"] < 4 and h["policy/response_tokens"] > 0
            assert -1 <= h["reward/overlong_penalty"] <= 0
            assert h["reward/penalized_mean"] == pytest.approx(h["reward/mean"] + h["reward/overlong_penalty"],
                                                               abs=1e-6)
    if reward == "digit_fraction":
        assert history[-1]["policy/ratio_deviation"] > 0.0


@pytest.mark.parametrize("critic", ["model", "shared"])
def test_ppo_lora_policy_resumes_exactly(char_chat_model, prompt_file, reward_module, tmp_path, critic):
    """PPO with a LoRA policy (reference = the base, adapter off) and a critic (a value model of its
    own, or the value head on the policy), with the adaptive KL controller, on a dp x fsdp x mp
    mesh; a run stopped after 1 iteration and resumed reproduces iteration 2 of an uninterrupted
    run."""
    common = dict(algo="ppo", peft="lora", reward_fn=f"{reward_module}:digit_fraction", save_steps=1,
                  mesh_dim="2,2,2", adaptive_kl=True, critic=critic, **{"lora.rank": 4, "optimizer.lr": 1e-2})
    straight = tmp_path / "straight"
    run(make_cfg(char_chat_model, prompt_file, straight, iterations=2, **common))
    resumed = tmp_path / "resumed"
    run(make_cfg(char_chat_model, prompt_file, resumed, iterations=1, **common))
    run(make_cfg(char_chat_model, prompt_file, resumed, iterations=2, resume=True, resume_override="iterations",
                 **common))
    a, b = logged(straight), logged(resumed)
    assert [h["step"] for h in b] == [1, 2]
    for name in ("reward/mean", "objective/kl", "policy/loss", "value/loss", "policy/clipfrac",
                 "value/explained_variance", "kl_coef"):
        assert b[1][name] == pytest.approx(a[1][name], rel=1e-5, abs=1e-7), name
    assert a[1]["objective/kl"] > 0.0  # iteration 2 samples from the updated policy
    assert a[1]["kl_coef"] < a[0]["kl_coef"]  # the KL is under its target: the controller lowers beta
    assert a[0]["objective/kl"] == 0.0  # LoRA B starts at 0: the policy is the base
    assert all(h["policy/ratio_deviation_first_step"] == 0.0 for h in a)
    assert all(h["value/loss"] > 0 and math.isfinite(h["value/explained_variance"]) for h in a)
    if critic == "model":
        assert os.path.isdir(straight / "value" / "checkpoints" / "8")  # the critic is saved with the policy
    else:  # the value head is a head of the policy's checkpoints, and its loss trains the adapter too
        assert not os.path.exists(straight / "value")
        assert os.path.isdir(straight / "checkpoints" / "8" / "heads")
        assert json.load(open(straight / "summary.json"))["critic"] == "shared value head on the policy"
    policy = easytune.load(str(straight))  # the run loads as base + trained adapter
    assert policy.adapter is not None and policy.adapter.config.method == "lora"


def test_grpo_adaptive_kl_coefficient_is_the_one_in_the_loss(char_chat_model, prompt_file, reward_module, tmp_path):
    """GRPO's in-loss KL term uses the adaptive controller's current beta: two runs, adaptive and
    fixed, start at the same beta and share iteration 1 exactly; in iteration 2 (one optimizer step
    each, on the same rollout) their losses differ by exactly the change in beta times the step's
    k3 KL to the reference (`policy/kl_ref`)."""
    common = dict(algo="grpo", reward_fn=f"{reward_module}:digit_fraction", kl_coef=2.0, ppo_epochs=1,
                  num_minibatches=1, **{"optimizer.lr": 1e-2})
    run(make_cfg(char_chat_model, prompt_file, tmp_path / "adaptive", adaptive_kl=True, kl_target=6.0, kl_horizon=16,
                 **common))
    run(make_cfg(char_chat_model, prompt_file, tmp_path / "fixed", **common))
    adaptive, fixed = logged(tmp_path / "adaptive"), logged(tmp_path / "fixed")
    assert adaptive[0]["policy/loss"] == fixed[0]["policy/loss"]
    # the KL (0 at the start) is under its target: beta *= 1 - 0.2 * 16 completions / horizon 16
    assert fixed[1]["kl_coef"] == 2.0 and adaptive[1]["kl_coef"] == pytest.approx(1.6)
    kl_ref = adaptive[1]["policy/kl_ref"]
    assert kl_ref == fixed[1]["policy/kl_ref"] and kl_ref > 1e-3
    assert adaptive[1]["policy/loss"] - fixed[1]["policy/loss"] == pytest.approx(
        (adaptive[1]["kl_coef"] - fixed[1]["kl_coef"]) * kl_ref, rel=1e-3)


@pytest.mark.parametrize("head_chunk_size", [0, 24])
def test_temperature_is_the_same_at_rollout_and_in_training(char_chat_model, prompt_file, reward_module, tmp_path,
                                                            head_chunk_size):
    """At a temperature other than 1 the rollout's recorded log-probs are still exactly the training
    forward's before the first update (both divide the logits by it), and not after; also through
    the fused, chunked head (the record pass and the loss run the same chunks)."""
    cfg = make_cfg(char_chat_model, prompt_file, tmp_path, algo="ppo", iterations=1, temperature=0.5, ppo_epochs=2,
                   reward_fn=f"{reward_module}:digit_fraction", head_chunk_size=head_chunk_size)
    run(cfg)
    (h,) = logged(tmp_path)
    assert h["policy/ratio_deviation_first_step"] == 0.0
    assert h["policy/ratio_deviation"] > 0.0


def test_rloo_qlora_policy_scores_with_a_reward_model(char_chat_model, prompt_file, tmp_path):
    reward_model = easytune.load(char_chat_model)
    reward_model = reward_lib.with_score_head(reward_model, seed=3)
    reward_dir = str(tmp_path / "reward_model")
    reward_model.save(reward_dir)
    cfg = make_cfg(char_chat_model, prompt_file, tmp_path / "run", algo="rloo", iterations=1, peft="qlora",
                   reward_model=reward_dir, **{"lora.rank": 4})
    summary = run(cfg)
    history = logged(tmp_path / "run")
    assert len(history) == 1 and history[0]["reward/std"] > 0 and summary["critic"] is None
    assert summary["peft"] == "qlora" and summary["reference"] == "base (adapter off)"
    # the reference is the NF4 base with the adapter off: no KL before the first update (up to
    # rounding: with and without the adapter XLA fuses the NF4 dequantization differently)
    assert abs(history[0]["objective/kl"]) < 1e-5
    assert history[0]["policy/ratio_deviation_first_step"] == 0.0

    # the scorer reads prompt + completion through the chat template, as Model.score does
    policy = easytune.load(char_chat_model)
    reloaded = easytune.load(reward_dir)
    records = data.load_records(prompt_file)[:2]
    ids = [policy.tokenizer("12")["input_ids"] + [2], policy.tokenizer("ab")["input_ids"]]
    scores = make_scorer(cfg, policy, reloaded)(records, ids)
    expected = reloaded.score([records[0]["messages"][:1] + [{"role": "assistant", "content": "12"}],
                               records[1]["messages"][:1] + [{"role": "assistant", "content": "ab"}]])
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert scores[0] != scores[1]


def test_a_grpo_variant_is_one_registered_function(monkeypatch):
    """A GRPO variant (here unscaled advantages, as Dr. GRPO's) is one registered estimator and one
    algorithm entry; RLConfig, the loop's advantages step and the loss take it by name, unchanged.
    (Registered into copies of the registries, so no other test sees it.)"""
    import copy
    import dataclasses

    from easytune.algos import ppo
    for name in ("ADVANTAGE_ESTIMATORS", "ALGORITHMS"):
        monkeypatch.setattr(ppo, name, copy.deepcopy(getattr(ppo, name)))

    @ppo.advantage_estimator("unscaled_group", min_group_size=2)
    def unscaled_group(options, scores, kl, kl_coef, mask, values):
        return ppo.group_relative_advantages(dataclasses.replace(options, scale_rewards="none"), scores, kl, kl_coef,
                                             mask, values)

    ppo.ALGORITHMS.add("my_grpo", ppo.Algorithm("unscaled_group", "per_token", ("loss", "reward")))
    options = ppo.RLConfig(algo="my_grpo", group_size=4)
    assert options.kl_in == "loss" and not options.uses_critic and options.loss_aggregation.unit == "response_tokens"
    with pytest.raises(ValueError, match="rollouts_per_prompt must be >= 2"):
        ppo.RLConfig(algo="my_grpo", group_size=1)
    rng = np.random.default_rng(0)
    mask = (np.arange(5)[None, :] < rng.integers(1, 6, (8, 1))).astype(np.int32)
    rows = {"response_mask": mask, "old_logprobs": -rng.random((8, 5), np.float32),
            "ref_logprobs": -rng.random((8, 5), np.float32), "old_values": np.zeros((8, 5), np.float32)}
    scores = rng.normal(size=8).astype(np.float32)
    stand_in = type("Loop", (), {"options": options, "kl": ppo.FixedKLController(0.1)})()
    out, metrics = rl.RLSteps.advantages(stand_in, rows, scores)
    grouped = scores.reshape(2, 4)
    expected = (grouped - grouped.mean(axis=1, keepdims=True)).reshape(-1)[:, None] * mask
    np.testing.assert_allclose(out["advantages"], expected, rtol=1e-6, atol=1e-7)
    assert np.all(out["returns"] == 0) and np.all(out["kl_coef"] == np.float32(0.1))
    assert metrics["reward/group_std"] > 0


def test_response_rows_mask_through_the_first_eos():
    tokens, positions, segments = generate.left_pad([[5, 6, 7], [8]], length=4)
    responses = np.array([[10, 2, 11, 2], [12, 13, 14, 15]])
    rows = rl.response_rows(tokens, positions, segments, responses, eos_ids=[2])
    np.testing.assert_array_equal(rows["response_mask"], [[1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(rows["has_eos"][:, 0], [1, 0])
    np.testing.assert_array_equal(rows["input_ids"], [[0, 5, 6, 7, 10, 2, 0, 0], [0, 0, 0, 8, 12, 13, 14, 15]])
    np.testing.assert_array_equal(rows["positions"], [[0, 0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(rows["segment_ids"], [[0, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]])
    assert rl.completion_ids(rows) == [[10, 2], [12, 13, 14, 15]]


def test_reward_functions_get_prompts_completions_and_columns(reward_module):
    fn = rewards.load_reward_fn(f"{reward_module}:sees_columns")
    scores = rewards.call_reward_fn(fn, ["p", "q"], ["a", "bc"], [[1, 2], [3]], {"answer": ["1", "2"],
                                                                                  "task": ["add", "add"]})
    np.testing.assert_array_equal(scores, [2.0, 1.0])
    assert rewards.exact_match(["p", "q"], [" 95 ", "95."], answer=["95", "96"]) == [1.0, 0.0]


@pytest.mark.parametrize("name, error, message", [
    ("raises", RuntimeError, "raised KeyError: 'no such column'"),
    ("strings", TypeError, "returned 'high' (str) for completion 0"),
    ("too_few", ValueError, "returned 1 scores for 2 completions"),
    ("nan", ValueError, "returned nan for completion 0"),
])
def test_bad_reward_functions_are_named(reward_module, name, error, message):
    fn = rewards.load_reward_fn(f"{reward_module}:{name}")
    with pytest.raises(error) as info:
        rewards.call_reward_fn(fn, ["p", "q"], ["a", "b"], [[1], [2]], {})
    assert f"reward function {reward_module}:{name}" in str(info.value) and message in str(info.value)


def test_bad_reward_specs_are_clear_errors(reward_module):
    with pytest.raises(ValueError, match="must be module:function"):
        rewards.load_reward_fn("no_colon")
    with pytest.raises(ValueError, match="cannot import module 'not_a_module_xyz'"):
        rewards.load_reward_fn("not_a_module_xyz:f")
    with pytest.raises(ValueError, match=f"module '{reward_module}' has no function 'missing'"):
        rewards.load_reward_fn(f"{reward_module}:missing")


def test_a_failing_reward_function_stops_the_run_with_its_name(char_chat_model, prompt_file, reward_module,
                                                               tmp_path):
    cfg = make_cfg(char_chat_model, prompt_file, tmp_path, algo="grpo", iterations=1,
                   reward_fn=f"{reward_module}:raises")
    with pytest.raises(RuntimeError, match=f"reward function {reward_module}:raises raised KeyError"):
        run(cfg)


@pytest.mark.parametrize("overrides, message", [
    (dict(algo="grpo", rollouts_per_prompt=1), "rollouts_per_prompt must be >= 2"),
    (dict(algo="ppo", kl_in="loss"), "PPO folds the KL penalty into the rewards"),
    (dict(algo="dpo"), "unknown --algo 'dpo'"),
    (dict(rollout_batch_size=18), "must be a multiple of --rollouts_per_prompt"),
    (dict(num_minibatches=3), "must divide into --num_minibatches"),
    (dict(peft="lora", **{"lora.dropout": 0.1}), "use --lora.dropout=0"),
    (dict(reward_model="/nonexistent"), "exactly one of --reward_fn"),
    (dict(reward_fn=None), "exactly one of --reward_fn"),
    (dict(temperature=0.0), "--temperature must be > 0"),
    (dict(algo="dr_grpo", scale_rewards="group"),
     "DR_GRPO does not divide its advantages by a standard deviation (--scale_rewards=none); --scale_rewards=group "
     "is for grpo, dapo and gspo."),
    (dict(algo="rloo", scale_rewards="batch"), "RLOO has no group advantages to scale; --scale_rewards=batch is for"),
    (dict(algo="ppo", loss_type="grpo"),
     "PPO averages its loss over the minibatch's tokens (--loss_type=dapo); --loss_type=grpo is for grpo, rloo, dapo, "
     "dr_grpo and gspo."),
    (dict(algo="rloo", loss_type="dapo"), "RLOO averages each sequence's token mean over the sequences"),
    (dict(algo="dapo", loss_type="luspo"), "unknown --loss_type 'luspo'; use one of dapo, bnpo, grpo, dr_grpo."),
    (dict(algo="ppo", dynamic_sampling=True), "PPO has no prompt groups (use grpo, rloo, dapo, dr_grpo or gspo)."),
    (dict(algo="rloo", kl_in="none"), "RLOO folds the KL penalty into the rewards; --kl_in=none is for grpo, dapo"),
    (dict(algo="dapo", rollouts_per_prompt=1), "rollouts_per_prompt must be >= 2"),
    (dict(algo="dapo", cliprange_high=-0.1), "--cliprange_high must be >= 0"),
    (dict(algo="dapo", overlong_buffer=32), "--overlong_buffer (32) must be at most the length it ends at, 16"),
    (dict(algo="dapo", overlong_max_length=8), "only applies with --overlong_buffer > 0"),
    (dict(algo="grpo", critic="shared"), "--critic=shared is a value head for PPO's GAE; grpo reads no values."),
    (dict(algo="ppo", critic="shared", value_lr=-1e-4), "--value_lr must be >= 0 (0: --optimizer.lr), got -0.0001."),
    (dict(algo="ppo", critic="shared", value_model="/somewhere"), "--value_model /somewhere would not be used"),
    (dict(algo="ppo", critic="value"), "--critic must be model (a value model of its own) or shared"),
])
def test_bad_options_are_clear_errors(char_chat_model, prompt_file, reward_module, tmp_path, overrides, message):
    settings = {"reward_fn": f"{reward_module}:digit_fraction", **overrides}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(make_cfg(char_chat_model, prompt_file, tmp_path, **settings))


@pytest.mark.parametrize("argv, expected", [
    # DAPO: clip-higher, the token-level loss, no KL, dynamic sampling
    (["--algo=dapo"], dict(clip_high=0.28, loss_type="dapo", kl_in="none", scale_rewards="group",
                           dynamic_sampling=True)),
    (["--algo=dapo", "--cliprange_high=0.3", "--loss_type=bnpo", "--kl_in=loss"],
     dict(clip_high=0.3, loss_type="bnpo", kl_in="loss", dynamic_sampling=True)),
    # Dr. GRPO, and the same from TRL's config names on grpo
    (["--algo=dr_grpo"], dict(clip_high=0.2, loss_type="dr_grpo", kl_in="loss", scale_rewards="none",
                              dynamic_sampling=False)),
    (["--algo=grpo", "--loss_type=dr_grpo", "--scale_rewards=none"],
     dict(loss_type="dr_grpo", scale_rewards="none", kl_in="loss")),
    (["--algo=dr_grpo", "--scale_rewards=none", "--loss_type=dapo"], dict(loss_type="dapo", scale_rewards="none")),
    # GSPO: a sequence ratio, each sequence's loss averaged alike (TRL's recommended loss_type="grpo")
    (["--algo=gspo", "--cliprange=3e-4", "--cliprange_high=4e-4"],
     dict(clip_high=4e-4, cliprange=3e-4, loss_type="grpo", kl_in="loss", scale_rewards="group")),
    (["--algo=grpo", "--dynamic_sampling", "--kl_in=none"], dict(dynamic_sampling=True, kl_in="none",
                                                                 loss_type="dapo", clip_high=0.2)),
    (["--algo=rloo", "--dynamic_sampling"], dict(dynamic_sampling=True, loss_type="grpo", scale_rewards=None)),
    (["--algo=ppo"], dict(loss_type="dapo", scale_rewards=None, dynamic_sampling=False, kl_in="reward")),
])
def test_grpo_family_flags_parse_into_rl_options(argv, expected):
    """The command line (absl) through the recipe into RLConfig: the algorithm's choices where a
    flag is left unset, the flag where it is given; and the pieces each algorithm names."""
    from absl import flags

    from easytune import config
    from easytune.algos import ppo
    from easytune.rl.recipe import RLRecipe
    flag_values = flags.FlagValues()
    config.define_flags(DEFAULTS, DOCS, flag_values=flag_values)
    flag_values(["train_ppo", *argv])
    options = RLRecipe.options(config.read_config(DEFAULTS, flag_values=flag_values))
    for name, value in expected.items():
        assert getattr(options, name) == value, name
    algorithm = ppo.ALGORITHMS.get(options.algo)
    assert options.policy_loss is ppo.POLICY_LOSSES.get(
        {"gspo": "sequence_ratio", "rloo": "per_sequence"}.get(options.algo, "per_token"))
    assert algorithm.advantage_estimator == {"ppo": "gae", "rloo": "leave_one_out"}.get(options.algo, "group")


def test_a_bad_algorithm_combination_is_one_sentence_on_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "easytune.train_ppo", "--algo=dr_grpo", "--scale_rewards=batch",
                             f"--output_dir={tmp_path}"], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "easytune: error: DR_GRPO does not divide its advantages by a standard deviation (--scale_rewards=none); "
        "--scale_rewards=batch is for grpo, dapo and gspo.")


def test_bad_prompt_records_name_the_line(char_chat_model, reward_module, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "What is 1 + 1?"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    cfg = make_cfg(char_chat_model, str(path), tmp_path / "run", reward_fn=f"{reward_module}:digit_fraction")
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: a prompt record needs a `prompt`"):
        run(cfg)


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, "-m", "easytune.train_ppo", "--help"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    for name in DOCS:
        assert f"--{name}:" in result.stdout or f"--[no]{name}:" in result.stdout, name


def test_ppo_critic_starts_from_the_reward_model(char_chat_model, prompt_file, tmp_path):
    reward_model = easytune.load(char_chat_model)
    reward_model = reward_lib.with_score_head(reward_model, seed=3)
    reward_dir = str(tmp_path / "reward_model")
    reward_model.save(reward_dir)
    run_dir = tmp_path / "run"
    # a critic learning rate of 1e-20 leaves its weights as they started, to the last bit of float32
    summary = run(make_cfg(char_chat_model, prompt_file, run_dir, algo="ppo", iterations=1, rollouts_per_prompt=1,
                           reward_model=reward_dir, value_lr=1e-20))
    assert summary["critic"] == reward_dir
    critic = easytune.load(str(run_dir / "value"), tokenizer=False)
    reloaded = easytune.load(reward_dir, tokenizer=False)
    np.testing.assert_array_equal(np.asarray(critic.params["score"]["kernel"]),
                                  np.asarray(reloaded.params["score"]["kernel"]))


def test_shared_value_head_trains_at_value_lr(char_chat_model, prompt_file, reward_module, tmp_path):
    """--critic=shared --value_lr: the value head's own learning rate in the policy's optimizer. At
    1e-20 the head comes out of a PPO iteration as it was initialised, to the last bit of float32
    (at the policy's learning rate, 3e-3, it would move), while the policy's weights moved."""
    import jax

    from easytune import checkpoint
    from easytune.algos import ppo
    run_dir = tmp_path / "run"
    run(make_cfg(char_chat_model, prompt_file, run_dir, algo="ppo", critic="shared", iterations=1, save_steps=1,
                 reward_fn=f"{reward_module}:digit_fraction", value_lr=1e-20))
    start = easytune.load(char_chat_model, tokenizer=False)
    initial = ppo.init_value_head(jax.random.key(1), start.config.hidden_size)  # the recipe's seed + 1
    steps = sorted(int(n) for n in os.listdir(run_dir / "checkpoints") if n.isdigit())
    shapes = jax.eval_shape(lambda: initial)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    trained = checkpoint.restore_tree(str(run_dir / "checkpoints" / str(steps[-1]) / "heads"), shapes,
                                      jax.tree.map(lambda _: cpu, shapes))
    jax.tree.map(np.testing.assert_array_equal, trained, initial)
    policy = easytune.load(str(run_dir), tokenizer=False)
    assert not np.array_equal(np.asarray(policy.params["embed"]["embedding"]),
                              np.asarray(start.params["embed"]["embedding"]))


def test_heldout_data_is_scored_with_the_reward_function_before_during_and_after(char_chat_model, prompt_file,
                                                                                   reward_module, tmp_path):
    """--heldout_data: the greedy completions' mean reward on held-out prompts before training,
    every --heldout_steps and after, recomputed here from the start model and the trained run
    directory; with --heldout_samples, the mean over samples, and the distinct share and length."""
    heldout = tmp_path / "heldout.jsonl"
    records = data.make_task_records(6, seed=11)
    heldout.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = make_cfg(char_chat_model, prompt_file, tmp_path / "run", algo="grpo", iterations=2,
                   reward_fn=f"{reward_module}:digit_fraction", heldout_data=str(heldout), heldout_samples=2,
                   heldout_steps=1)
    summary = run(cfg)
    fn = rewards.load_reward_fn(f"{reward_module}:digit_fraction")
    prompts = [r["messages"][:-1] for r in records]

    def greedy_mean(model):
        texts = model.generate(prompts, max_new_tokens=16, temperature=0.0)
        return float(np.mean(fn(prompts, texts))), len(set(texts)) / len(texts)

    before, distinct_before = greedy_mean(easytune.load(char_chat_model))
    after, distinct_after = greedy_mean(easytune.load(str(tmp_path / "run")))
    assert summary["heldout_accuracy_before"] == pytest.approx(before, abs=1e-6)
    assert summary["heldout_distinct_before"] == pytest.approx(distinct_before)
    assert summary["heldout_accuracy_after"] == pytest.approx(after, abs=1e-6)
    assert summary["heldout_distinct_after"] == pytest.approx(distinct_after)
    assert [c["step"] for c in summary["heldout_curve"]] == [0, 1, 2]  # before, every step, after (the last)
    for point in summary["heldout_curve"]:
        assert 0 <= point["sampled_mean"] <= 1 and 0 < point["sampled_distinct"] <= 1 and point["length_mean"] > 0
    history = logged(tmp_path / "run")
    assert [h["heldout_accuracy"] for h in history if "heldout_accuracy" in h] == \
        [summary["heldout_curve"][1]["accuracy"]]


def test_heldout_reward_gives_standard_errors_and_per_prompt_figures(char_chat_model, reward_module):
    """recipe.heldout_reward's standard errors are over prompts (a prompt's samples averaged first)
    and its per-prompt figures are in record order: recomputed from the same greedy and seeded
    sampled completions."""
    records = data.make_task_records(6, seed=11)
    fn = rewards.load_reward_fn(f"{reward_module}:digit_fraction")
    model = easytune.load(char_chat_model)
    figures = recipe.heldout_reward(model, records, fn, max_new_tokens=16, samples=3, temperature=1.0, seed=5,
                                    per_prompt=True)
    prompts = [r["messages"][:-1] for r in records]
    greedy = np.asarray(fn(prompts, model.generate(prompts, max_new_tokens=16, temperature=0.0)), np.float64)
    repeated = [p for p in prompts for _ in range(3)]
    sampled = np.asarray(fn(repeated, model.generate(repeated, max_new_tokens=16, temperature=1.0, seed=5)),
                         np.float64).reshape(6, 3).mean(axis=1)
    assert np.std(sampled) > 0  # the test tells prompt-major from sample-major order
    np.testing.assert_allclose(figures["accuracy_per_prompt"], greedy, atol=1e-6)
    np.testing.assert_allclose(figures["sampled_per_prompt"], sampled, atol=1e-6)
    assert figures["accuracy_stderr"] == pytest.approx(np.std(greedy, ddof=1) / np.sqrt(6), abs=1e-6)
    assert figures["sampled_stderr"] == pytest.approx(np.std(sampled, ddof=1) / np.sqrt(6), abs=1e-6)
    assert figures["sampled_mean"] == pytest.approx(sampled.mean(), abs=1e-6)
    assert "sampled_per_prompt" not in recipe.heldout_reward(model, records, fn, max_new_tokens=16, samples=1)


def test_heldout_data_needs_a_reward_function(char_chat_model, prompt_file, tmp_path):
    cfg = make_cfg(char_chat_model, prompt_file, tmp_path, reward_model=char_chat_model, heldout_data=prompt_file)
    with pytest.raises(ValueError, match="--heldout_data is scored with --reward_fn"):
        run(cfg)
