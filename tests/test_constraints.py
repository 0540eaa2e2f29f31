"""The instruction-constraint task set (easytune.data.constraints): held-out prompts are new in
request and in constraint instance, every record's constraints are IFEval's (lm-eval's checkers
accept a response written to follow them and refuse one that breaks them), two constraints never
conflict, and the writer's files feed train_ppo's --train_data/--heldout_data."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from easytune.data import constraints
from easytune.eval import verifiers


def following(instruction_id: str, kwargs: dict) -> tuple[str, str]:
    """(a response that follows the constraint, one that breaks it), written from its arguments."""
    words = lambda n: " ".join(["word"] * n)  # noqa: E731
    if instruction_id == "change_case:english_lowercase":
        return "all of this is lowercase.", "This Is Not."
    if instruction_id == "change_case:english_capital":
        return "ALL OF THIS IS CAPITALS.", "This is not."
    if instruction_id == "punctuation:no_comma":
        return "no commas in here.", "one, two."
    if instruction_id == "startend:quotation":
        return '"wrapped in quotes"', "not wrapped"
    if instruction_id == "detectable_format:title":
        return "<<A Title>>\nSome text.", "Some text."
    if instruction_id == "detectable_format:json_format":
        return '{"answer": "yes"}', "yes"
    if instruction_id == "length_constraints:number_words":
        n = kwargs["num_words"]
        return (words(n - 1), words(n + 3)) if kwargs["relation"] == "less than" else (words(n), words(n - 1))
    if instruction_id == "keywords:existence":
        return "here: " + " and ".join(kwargs["keywords"]) + ".", "nothing here."
    if instruction_id == "keywords:forbidden_words":
        return "nothing here.", "here: " + kwargs["forbidden_words"][0] + "."
    if instruction_id == "startend:end_checker":
        return "Some text. " + kwargs["end_phrase"], kwargs["end_phrase"] + " Some text."
    if instruction_id == "detectable_content:postscript":
        return f"Hello.\n{kwargs['postscript_marker']} see you.", "Hello."
    if instruction_id == "detectable_format:number_bullet_lists":
        n = kwargs["num_bullets"]
        return "".join(f"* point {i}\n" for i in range(n)), "".join(f"* point {i}\n" for i in range(n + 1))
    raise AssertionError(f"no response written for {instruction_id}")


def test_heldout_requests_are_new_in_topic_and_template():
    train, heldout = constraints.split_requests()
    assert train and heldout and not set(train) & set(heldout)
    topic_of = lambda request: next(t for t in constraints.TOPICS if t in request)  # noqa: E731
    assert not {topic_of(r) for r in train} & {topic_of(r) for r in heldout}
    held_templates = constraints.REQUESTS[-constraints.HELDOUT_REQUESTS:]
    assert any(template.format(topic=topic_of(r)) == r for r in heldout for template in held_templates)
    assert not any(template.format(topic=topic_of(r)) == r for r in train for template in held_templates)


def test_heldout_constraint_instances_never_occur_in_training():
    for kind, (train, heldout) in constraints.INSTANCES.items():
        assert train and heldout, kind
        if train != [{}]:  # a type with arguments: its held-out arguments are new
            assert not [k for k in heldout if k in train], kind
    train, heldout = constraints.constraint_records(400, 200, seed=0)
    pairs = lambda records: {(i, json.dumps(k, sort_keys=True)) for r in records  # noqa: E731
                             for i, k in zip(r["instruction_id_list"], r["kwargs"]) if k}
    assert pairs(train) and pairs(heldout) and not pairs(train) & pairs(heldout)
    assert not {r["request"] for r in train} & {r["request"] for r in heldout}


@pytest.mark.parametrize("side", [0, 1])
def test_every_instance_is_checked_by_ifevals_own_checker(side):
    """Each record's text carries IFEval's description of its constraint, and lm-eval's checker
    with the record's arguments accepts a response that follows it and refuses one that breaks it."""
    for kind, instances in constraints.INSTANCES.items():
        for kwargs in instances[side]:
            record = constraints._record("Describe a rainy day.", [(kind, kwargs)])
            assert constraints.describe(kind, kwargs) in record["prompt"][0]["content"]
            good, bad = following(kind, kwargs)
            prompt = record["prompt"][0]["content"]
            assert verifiers.follows_instructions(prompt, good, record["instruction_id_list"], record["kwargs"]) \
                == [True], (kind, kwargs, good)
            assert verifiers.follows_instructions(prompt, bad, record["instruction_id_list"], record["kwargs"]) \
                == [False], (kind, kwargs, bad)
            assert verifiers.ifeval_reward([record["prompt"]], [good], [record["instruction_id_list"]],
                                           [record["kwargs"]]) == [1.0]


def test_types_get_even_shares_and_pairs_never_conflict():
    from lm_eval.tasks.ifeval import instructions_registry
    n = 30 * len(constraints.DEFAULT_TYPES)
    records = constraints.make_constraint_records(n, heldout=False, seed=1, two_constraints=0.5)
    firsts = [r["instruction_id_list"][0] for r in records]
    assert {firsts.count(k) for k in constraints.DEFAULT_TYPES} == {30}
    two = [r for r in records if len(r["instruction_id_list"]) == 2]
    assert 0.35 * n < len(two) < 0.65 * n
    for r in two:
        a, b = r["instruction_id_list"]
        assert a != b and b not in instructions_registry.INSTRUCTION_CONFLICTS[a]
    assert constraints.make_constraint_records(10, heldout=True, seed=3) == \
        constraints.make_constraint_records(10, heldout=True, seed=3)
    with pytest.raises(ValueError, match="unknown constraint type 'nope'"):
        constraints.make_constraint_records(4, heldout=False, types=["nope"])


def test_the_writer_command_makes_prompt_files(tmp_path):
    result = subprocess.run([sys.executable, "-m", "easytune.data.constraints", f"--out={tmp_path}",
                             "--num_train=24", "--num_heldout=12", "--types=punctuation:no_comma,keywords:existence"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == 24 and len(heldout) == 12
    assert {i for r in train + heldout for i in r["instruction_id_list"]} == {"punctuation:no_comma",
                                                                               "keywords:existence"}
    from easytune.rl.recipe import prompt_of
    for r in train + heldout:
        assert prompt_of(r, "record")[0]["role"] == "user"


def load_pipeline():
    """scripts/constraint_pipeline.py as a module."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                        "constraint_pipeline.py")
    spec = importlib.util.spec_from_file_location("constraint_pipeline", path)
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    return pipeline


def test_the_score_stages_paired_change_is_the_paired_t_tests():
    """The score stage's change from the start model: the mean per-prompt difference and its
    standard error, whose ratio is scipy's paired t statistic; and the table's cells."""
    from scipy import stats
    pipeline = load_pipeline()
    rng = np.random.default_rng(0)
    start, end = rng.uniform(size=48), rng.uniform(size=48)
    change, error = pipeline.paired_change(start.tolist(), end.tolist())
    assert change == pytest.approx(np.mean(end - start), abs=1e-12)
    assert change / error == pytest.approx(stats.ttest_rel(end, start).statistic, rel=1e-10)
    with pytest.raises(ValueError, match="at least 2 prompts"):
        pipeline.paired_change([0.5], [1.0])
    figures = lambda greedy, sampled: {"accuracy": float(np.mean(greedy)), "accuracy_stderr": 0.01,  # noqa: E731
                                       "accuracy_per_prompt": greedy, "sampled_mean": float(np.mean(sampled)),
                                       "sampled_stderr": 0.02, "sampled_per_prompt": sampled, "distinct": 0.9,
                                       "length_mean": 30.0}
    table = pipeline.score_table({"start": figures([0.0, 1.0, 0.5], [0.25, 0.5, 0.25]),
                                  "grpo": figures([1.0, 1.0, 0.5], [0.5, 0.75, 0.25])}, "start")
    rows = table.splitlines()
    assert rows[2] == "| start | 0.500 ± 0.010 | start | 0.333 ± 0.020 | start | 0.90 | 30.0 |"
    greedy_change = pipeline.paired_change([0.0, 1.0, 0.5], [1.0, 1.0, 0.5])
    sampled_change = pipeline.paired_change([0.25, 0.5, 0.25], [0.5, 0.75, 0.25])
    assert rows[3] == (f"| grpo | 0.833 ± 0.010 | {greedy_change[0]:+.3f} ± {greedy_change[1]:.3f} | 0.500 ± 0.020 | "
                       f"{sampled_change[0]:+.3f} ± {sampled_change[1]:.3f} | 0.90 | 30.0 |")


def test_rft_samples_become_sft_dpo_and_ilql_data():
    """The pipeline's rejection sampling: accepted completions (reward 1, distinct, at most `keep`
    per prompt) become SFT conversations, an accepted and a rejected one of a prompt a DPO pair, and
    every completion an ILQL episode with its reward, each in the layout its trainer parses."""
    from easytune.data import offline, preference
    pipeline = load_pipeline()
    train = constraints.make_constraint_records(3, heldout=False, seed=0)
    texts = ["a", "a", "b", "c",   "d", "e", "f", "",   "g", "h", "i", "j"]
    scores = [1.0, 1.0, 1.0, 1.0,  0.5, 0.0, 1.0, 1.0,  0.0, 0.0, 0.0, 0.0]
    sft, pairs, episodes, figures = pipeline.rft_data(train, texts, scores, samples=4, keep=2)
    assert [m["messages"][-1]["content"] for m in sft] == ["a", "b", "f"]  # distinct, at most 2, not empty
    assert all(m["messages"][:-1] == r["prompt"] for m, r in zip(sft, [train[0], train[0], train[1]]))
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [("f", "d")]
    assert len(episodes) == 11 and [e["reward"] for e in episodes][4:7] == [0.5, 0.0, 1.0]
    assert figures["prompts_with_an_accepted_sample"] == 2 and figures["sft_examples"] == 3
    for i, pair in enumerate(pairs):
        parsed = preference.parse_pair(pair, f"pair {i}")
        assert parsed is not None
    for i, episode in enumerate(episodes):
        assert offline.parse_offline(episode, f"episode {i}") is not None


def test_the_pipeline_reuses_the_start_models_figures_only_where_measured_alike(tmp_path):
    """An RL stage skips its evaluation before training only where the base or RFT stage measured
    its start model on the same held-out file with the same settings, and no --extra flag of the
    stage changes how the run measures."""
    import argparse
    pipeline = load_pipeline()
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text('{"prompt": "a"}\n')
    cfg = argparse.Namespace(heldout_samples=2, seed=0, temperature=1.0, max_new_tokens=64)
    current = pipeline.measure(cfg, str(heldout))
    figures = {"accuracy": 0.5, "sampled_mean": 0.25}
    results = {"rft": {"heldout": figures, "heldout_model": "out/rft/hf", "measure": current}}
    assert pipeline.known_start(results, "out/rft/hf", current, ["--optimizer.lr=5e-4"]) == figures
    assert pipeline.known_start(results, "other", current, []) is None
    for flag in ("--seed=1", "--heldout_samples=4", "--temperature=0.7", "--max_new_tokens=32", "--model=x"):
        assert pipeline.known_start(results, "out/rft/hf", current, [flag]) is None
    assert pipeline.known_start(results, "out/rft/hf", pipeline.measure(argparse.Namespace(**{**vars(cfg), "seed": 1}),
                                                                         str(heldout)), []) is None
    heldout.write_text('{"prompt": "b"}\n')
    assert pipeline.known_start(results, "out/rft/hf", pipeline.measure(cfg, str(heldout)), []) is None
    assert pipeline.known_start({"rft": {"heldout": figures}}, "out/rft/hf", current, []) is None  # older results


def test_the_pipeline_runs_ppo_from_a_start_model_and_scores_it(char_chat_model, tmp_path):
    """scripts/constraint_pipeline.py end to end on a tiny model: the data stage, the base stage
    (the start model's held-out figures), the PPO stage (a real train_ppo run, with the pipeline's
    GAE λ 1, shared value head, fused loss forward and 4 minibatches, a flag passed through --extra,
    and no evaluation of its own before training: the base stage measured the same model the same
    way), and the score stage, which finds the start model and the PPO run and scores both on the
    held-out prompts with standard errors and per-prompt figures."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                          "constraint_pipeline.py")
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, script, f"--out={out}", f"--model={char_chat_model}",
                             f"--start={char_chat_model}", "--stages=data,base,ppo,score", "--num_train=16",
                             "--num_heldout=4", "--ppo_iterations=1", "--max_new_tokens=8", "--heldout_samples=1",
                             "--score_samples=2", "--extra=ppo=--kl_coef=0.05"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    config = json.loads((out / "ppo" / "easytune_config.json").read_text())
    assert (config["lam"], config["critic"], config["exact_ratio"], config["iterations"]) == (1.0, "shared", False, 1)
    assert config["kl_coef"] == 0.05 and config["heldout_before"] is False and config["num_minibatches"] == 4
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["num_heldout"] == 4
    summary = json.loads((out / "ppo" / "summary.json").read_text())
    assert "heldout_accuracy_before" not in summary and [c["step"] for c in summary["heldout_curve"]] == [1]
    base = results["base"]["heldout"]
    assert results["ppo"]["before"] == {k: base[k] for k in ("accuracy", "sampled_mean", "distinct", "length_mean")}
    assert [c["step"] for c in results["ppo"]["heldout_curve"]] == [0, 1]
    assert results["ppo"]["after"]["accuracy"] == summary["heldout_accuracy_after"]
    assert len(results["ppo"]["reward_curve"]) == 1 and results["ppo"]["seconds"] > 0
    scores = results["score"]["models"]
    assert set(scores) == {"start", "ppo"} and scores["ppo"]["model"] == str(out / "ppo")
    for figures in scores.values():
        assert len(figures["accuracy_per_prompt"]) == len(figures["sampled_per_prompt"]) == 4
        assert figures["sampled_mean"] == pytest.approx(np.mean(figures["sampled_per_prompt"]))
    assert "| ppo |" in result.stdout and "| start |" in result.stdout
