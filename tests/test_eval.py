"""`python -m easytune.eval`: easytune as an lm-evaluation-harness backend, against lm-eval's own
`hf` backend (transformers + torch, CPU) on the same local tasks and the same weights."""
import json
import os

import numpy as np
import pytest

from conftest import make_chat_model

lm_eval = pytest.importorskip("lm_eval")

@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    from easytune.eval.local_tasks import write_local_tasks
    return write_local_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


def run_hf(model_dir, task_dir, tasks, model_args_extra="", dtype="float32", **kwargs):
    from lm_eval.tasks import TaskManager  # the local tasks only: lm-eval's full index takes 11.5 s to build
    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype={dtype}{model_args_extra}",
                                   tasks=tasks, task_manager=TaskManager(include_path=task_dir, include_defaults=False),
                                   log_samples=True, batch_size=4,
                                   device="cpu", **kwargs)


def run_easytune(model_dir, task_dir, tasks, output_path, extra=()):
    from easytune.eval.__main__ import main
    return main(["--model", model_dir, "--tasks", ",".join(tasks), "--include_path", task_dir, "--batch_size", "4",
                 "--log_samples", "--output_path", str(output_path), *extra])


def responses(results, task):
    """Per-document responses in document order, as lm-eval logs them (values as strings)."""
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def loglikelihoods(results, task):
    """Every request's `(loglikelihood, is_greedy)` (is_greedy None for rolling ones), in order."""
    out = []
    for doc in responses(results, task):
        for (value,) in doc:
            if isinstance(value, (list, tuple)):
                out.append((float(value[0]), str(value[1]) == "True"))
            else:
                out.append((float(value), None))
    return out


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_same_requests_same_answers_as_lm_eval_hf(tmp_path_factory, task_dir, tmp_path, which):
    """Loglikelihoods within 1e-4 (and the same greedy flags), identical greedy generations, equal
    accuracies and perplexities, for a tiny random model and for SmolLM2-135M-Instruct (fp32).

    The loglikelihood values are held against the `hf` backend run in float64: torch's float32
    `log_softmax` on CPU is biased on some machines (on an AVX2-only one, from the same float32
    SmolLM2 logits over its 49152-token vocabulary, it reads 1.75e-5 per token high: 1.47e-3 on an
    84-token document against the same logits' float64 log_softmax, while easytune's float32 total
    is 4.8e-5 from float64), and a rolling document sums that bias over every token scored. The
    float32 `hf` run stays the oracle for the greedy flags, generations and accuracies."""
    if which == "tiny":
        model_dir = make_chat_model(tmp_path_factory.mktemp("tiny_eval"), max_position_embeddings=512)
    else:
        from easytune import assets
        model_dir = assets.smollm2_hf_dir()
    tasks = ["capitals_mc", "tasks_gen", "capitals_text"]
    theirs = run_hf(model_dir, task_dir, tasks)
    exact = run_hf(model_dir, task_dir, ["capitals_mc", "capitals_text"], dtype="float64")
    ours = run_easytune(model_dir, task_dir, tasks, tmp_path / "out")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [s["doc"]["text"] for s in sorted(ours["samples"]["capitals_text"], key=lambda s: s["doc_id"])]
    # A multiple-choice continuation is 1-3 tokens: 1e-4 each. A rolling document sums one float32
    # log-prob per token (up to ~130 here, through SmolLM2's 30 layers): 1e-5 per token scored.
    budgets = {"capitals_mc": lambda i: 1e-4, "capitals_text": lambda i: 1e-5 * len(tokenizer.encode(texts[i]))}
    for task in ("capitals_mc", "capitals_text"):
        a, b, e = loglikelihoods(ours, task), loglikelihoods(theirs, task), loglikelihoods(exact, task)
        assert len(a) == len(b) == len(e) > 0
        diffs = [abs(ll_a - ll_e) for (ll_a, _), (ll_e, _) in zip(a, e)]
        print(f"{which} {task}: {len(a)} requests, max |loglikelihood diff| = {max(diffs):.2e}")
        assert all(d <= budgets[task](i) for i, d in enumerate(diffs)), diffs
        assert [greedy for _, greedy in a] == [greedy for _, greedy in b]
    assert responses(ours, "tasks_gen") == responses(theirs, "tasks_gen")
    for task, metric in (("capitals_mc", "acc,none"), ("capitals_mc", "acc_norm,none"),
                         ("tasks_gen", "exact_match,none")):
        assert ours["results"][task][metric] == theirs["results"][task][metric], (task, metric)
    np.testing.assert_allclose(ours["results"]["capitals_text"]["word_perplexity,none"],
                               exact["results"]["capitals_text"]["word_perplexity,none"], rtol=1e-4)
    if which == "smollm2":  # the real model knows some capitals: the task is not all chance
        assert ours["results"]["capitals_mc"]["acc,none"] > 0.25


def test_results_files_and_bad_input(tmp_path_factory, task_dir, tmp_path):
    model_dir = make_chat_model(tmp_path_factory.mktemp("tiny_eval_files"), max_position_embeddings=512)
    run_easytune(model_dir, task_dir, ["capitals_mc"], tmp_path / "out", extra=["--limit", "3"])
    written = list((tmp_path / "out").glob("**/results_*.json"))
    assert written, "lm-eval's results JSON was not written"
    results = json.loads(written[0].read_text())
    assert "capitals_mc" in results["results"] and results["n-samples"]["capitals_mc"]["effective"] == 3
    assert list(written[0].parent.glob("samples_capitals_mc_*.jsonl"))
    from easytune.eval.__main__ import main, resolve_tasks
    # local tasks only: a manager of the local folder; a bundled task among them: lm-eval's full index
    local, _ = resolve_tasks("capitals_mc,tasks_gen", task_dir)
    assert "capitals_mc" in local.task_index and "arc_easy" not in local.task_index
    full, names = resolve_tasks("capitals_mc,arc_easy", task_dir)
    assert names == ["capitals_mc", "arc_easy"] and {"capitals_mc", "arc_easy"} <= set(full.task_index)
    assert full.task_index["capitals_mc"].yaml_path == local.task_index["capitals_mc"].yaml_path  # local wins
    with pytest.raises(ValueError, match="unknown lm-eval task 'no_such_task'"):
        main(["--model", model_dir, "--tasks", "no_such_task", "--include_path", task_dir])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "broken.yaml").write_text("task: broken\ndataset_path: [unclosed\n")
    with pytest.raises(ValueError, match="task file .*broken.yaml does not parse"):
        main(["--model", model_dir, "--tasks", "broken", "--include_path", str(tmp_path / "broken")])


def test_registered_as_an_lm_eval_model_name(tmp_path_factory, task_dir):
    """After `import easytune.eval.lm_eval_backend`, lm-eval builds the backend from its name and
    model_args, as `lm_eval --model easytune --model_args ...` does."""
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import easytune.eval.lm_eval_backend  # noqa: F401
    model_dir = make_chat_model(tmp_path_factory.mktemp("tiny_eval_reg"), max_position_embeddings=512)
    results = lm_eval.simple_evaluate(model="easytune", model_args=f"model={model_dir},mesh_dim=1x8x1",
                                      tasks=["capitals_mc"],
                                      task_manager=TaskManager(include_path=task_dir, include_defaults=False),
                                      limit=2)
    assert get_model("easytune").__name__ == "EasytuneLM"
    assert 0.0 <= results["results"]["capitals_mc"]["acc,none"] <= 1.0


CHILD = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
coordinator, process_id, model_dir, task_dir, out_dir = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
jax.distributed.initialize(coordinator, num_processes=2, process_id=process_id)
from easytune.eval.__main__ import main
results = main(["--model", model_dir, "--tasks", "capitals_mc,tasks_gen,capitals_text", "--include_path", task_dir,
                "--batch_size", "4", "--mesh_dim", "2,2,1", "--output_path", out_dir, "--log_samples"])
print("CHILD_RESULTS", process_id, json.dumps(results["results"], sort_keys=True, default=str))
"""


def test_two_processes_give_the_results_of_one(tmp_path_factory, task_dir, tmp_path):
    """`python -m easytune.eval` launched as a 2-process jax.distributed job (2 devices each, the
    batch sharded over both processes) reports what one process reports; process 0 writes the files."""
    import os
    import sys

    from conftest import run_processes
    model_dir = make_chat_model(tmp_path_factory.mktemp("tiny_eval_mp"), max_position_embeddings=512)
    single = run_easytune(model_dir, task_dir, ["capitals_mc", "tasks_gen", "capitals_text"], tmp_path / "one")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    outputs = run_processes(lambda address: [[sys.executable, "-c", CHILD, address, str(i), model_dir, task_dir,
                                              str(tmp_path / "two")] for i in range(2)],
                            env, timeout=400, output_dir=tmp_path)
    for i, text in enumerate(outputs):
        line = next(line for line in text.splitlines() if line.startswith(f"CHILD_RESULTS {i} "))
        theirs = json.loads(line.split(" ", 2)[2])
        for task, metrics in single["results"].items():
            for name, value in metrics.items():
                if isinstance(value, float):
                    np.testing.assert_allclose(theirs[task][name], value, rtol=1e-5, err_msg=f"{task} {name}")
    assert len(list((tmp_path / "two").glob("**/results_*.json"))) == 1  # written once, by process 0


# ----------------------------------------------------------------------------- verifiable checks

def test_gsm8k_last_number_and_pass_at_k():
    from itertools import combinations

    from easytune.eval.verifiers import gsm8k_reward, last_number, pass_at_k
    assert last_number("so 3 + 4 = 7, and the answer is 1,234.") == "1234"
    assert last_number("It is -12.50 dollars") == "-12.50" and last_number("no digits") is None
    assert last_number("#### 18.0") == "18"
    assert gsm8k_reward(["q"] * 3, ["The answer is 18.", "about 17", "none"], answer=["#### 18", "18", "18"]) == [
        1.0, 0.0, 0.0]
    # the estimator equals the fraction of k-subsets of n samples holding at least one correct one
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (6, 5, 2), (10, 3, 4)]:
        samples = [True] * c + [False] * (n - c)
        subsets = list(combinations(range(n), k))
        exact = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(3, 4, 1)


def test_ifeval_reward_is_lm_evals_checker_as_a_reward_function():
    """The reward is the fraction of instructions lm-eval's IFEval checker says are followed, through
    easytune's reward-function interface (prompt file columns as keyword lists)."""
    from easytune import rewards
    from easytune.eval.local_tasks import IFEVAL_PROMPTS
    from lm_eval.tasks.ifeval.utils import InputExample, test_instruction_following_strict
    completions = ["the sea is calm and blue today", "Cats Sleep. They purr.", "An apple, a pear and a plum.",
                   "* red\n* blue", '{"greeting": "hello"}', "Hello! Is there anything else I can help with?",
                   "Dear Sam, see you soon.", "Drops of water fall from grey clouds."]
    prompts = [p for p, _, _ in IFEVAL_PROMPTS]
    columns = {"instruction_id_list": [ids for _, ids, _ in IFEVAL_PROMPTS],
               "kwargs": [kw for _, _, kw in IFEVAL_PROMPTS]}
    fn = rewards.load_reward_fn("easytune.eval.verifiers:ifeval_reward")
    ours = rewards.call_reward_fn(fn, prompts, completions, [[0]] * len(prompts), columns)
    expected = []
    for prompt, completion, ids, kw in zip(prompts, completions, columns["instruction_id_list"], columns["kwargs"]):
        example = InputExample(0, ids, prompt, kw)
        followed = test_instruction_following_strict(example, completion).follow_instruction_list
        expected.append(sum(followed) / len(followed))
    np.testing.assert_allclose(ours, expected)
    assert expected == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]  # followed and broken constraints both present


def test_ifeval_errors_name_the_instruction():
    from easytune.eval.verifiers import follows_instructions
    with pytest.raises(ValueError, match="unknown IFEval instruction 'keywords:nonsense'"):
        follows_instructions("p", "r", ["keywords:nonsense"], [{}])


def test_ifeval_local_task_same_in_both_backends(tmp_path_factory, task_dir, tmp_path):
    """IFEval as an lm-eval task (its own checker and metrics) over local prompts: identical greedy
    generations and metrics from easytune's backend and lm-eval's hf backend."""
    model_dir = make_chat_model(tmp_path_factory.mktemp("tiny_eval_ifeval"), max_position_embeddings=512)
    theirs = run_hf(model_dir, task_dir, ["ifeval_local"])
    ours = run_easytune(model_dir, task_dir, ["ifeval_local"], tmp_path / "out")
    assert responses(ours, "ifeval_local") == responses(theirs, "ifeval_local")
    for metric in ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                   "inst_level_loose_acc"):
        key = f"{metric},none"
        assert ours["results"]["ifeval_local"][key] == theirs["results"]["ifeval_local"][key]


def test_eval_tasks_during_training_and_the_best_checkpoint(tmp_path_factory, task_dir, task_file, tmp_path):
    """`--eval_tasks` in a trainer: the task figures logged at --eval_steps and in the summary are
    lm-eval's own results for the model at that point (before training: the starting model; at the
    end: the trained run, evaluated afresh from its directory by `python -m easytune.eval`'s
    evaluate). `--keep_best=eval_loss --keep_best_mode=min` keeps the step whose eval loss was the
    lowest, and `easytune.load(<run>/best)` is that step's checkpoint."""
    import types

    from conftest import logged, run_config

    import easytune
    from easytune.eval.__main__ import evaluate
    from easytune.train_sft import DEFAULTS, run
    model_dir = make_chat_model(tmp_path_factory.mktemp("tiny_eval_train"), max_position_embeddings=512)
    out = tmp_path / "run"
    cfg = run_config(DEFAULTS, {
        "model": model_dir, "train_data": task_file, "eval_data": task_file, "output_dir": str(out),
        "logger": "none", "seq_length": 64, "batch_size": 8, "total_steps": 4, "eval_steps": 2, "save_steps": 1,
        "keep_checkpoints": 0, "optimizer.lr": 3e-3, "eval_tasks": "capitals_text", "eval_include_path": task_dir,
        "keep_best": "eval_loss", "keep_best_mode": "min"})
    summary = run(cfg)

    def lm_eval_figure(path):
        args = types.SimpleNamespace(model=str(path), adapter=None, dtype=None, mesh_dim="1,-1,1",
                                     tasks="capitals_text", num_fewshot=None, limit=None, batch_size=8,
                                     max_gen_toks=256, include_path=task_dir, log_samples=False,
                                     apply_chat_template=False,
                                     fewshot_as_multiturn=False, seed=0)
        return evaluate(args)["results"]["capitals_text"]["word_perplexity,none"]

    name = "eval_capitals_text/word_perplexity"
    history = logged(out)
    evaluated = {h["step"]: h for h in history if name in h}
    assert sorted(evaluated) == [2, 4] and all("eval_loss" in h for h in evaluated.values())
    assert summary[f"{name}_before"] == pytest.approx(lm_eval_figure(model_dir), rel=1e-5)
    assert summary[name] == evaluated[4][name] == pytest.approx(lm_eval_figure(out), rel=1e-5)
    assert summary[name] != summary[f"{name}_before"]  # the trained model was evaluated, not the start

    best_step = min(evaluated, key=lambda s: evaluated[s]["eval_loss"])
    assert summary["best"] == {"metric": "eval_loss", "value": evaluated[best_step]["eval_loss"], "step": best_step}
    assert sorted(os.listdir(out / "best")) == [str(best_step)]
    tokens = [[1, 5, 9, 13, 2]]
    np.testing.assert_array_equal(np.asarray(easytune.load(str(out / "best"))(tokens)),
                                  np.asarray(easytune.load(str(out / "checkpoints" / str(best_step)))(tokens)))
    json.dumps(summary, allow_nan=False)


def test_an_adapter_and_the_chat_template_as_lm_eval_hf_with_peft(tmp_path_factory, task_dir, tmp_path):
    """`--adapter` (a peft LoRA directory) and `--apply_chat_template`: the loglikelihoods equal lm-eval's
    hf backend given the same adapter (`peft=`) and the same flag; an adapter made for another base
    is one sentence naming it."""
    import peft
    import torch
    import transformers
    model_dir = make_chat_model(tmp_path_factory.mktemp("tiny_eval_base"), max_position_embeddings=512)
    torch.manual_seed(1)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    adapter_dir = str(tmp_path / "adapter")
    lora.save_pretrained(adapter_dir)
    theirs = run_hf(model_dir, task_dir, ["capitals_mc"], apply_chat_template=True, limit=4,
                    model_args_extra=f",peft={adapter_dir}")
    ours = run_easytune(model_dir, task_dir, ["capitals_mc"], tmp_path / "out",
                        extra=["--adapter", adapter_dir, "--apply_chat_template", "--limit", "4"])
    plain = run_easytune(model_dir, task_dir, ["capitals_mc"], tmp_path / "plain", extra=["--limit", "4"])
    a, b = loglikelihoods(ours, "capitals_mc"), loglikelihoods(theirs, "capitals_mc")
    assert len(a) == len(b) == 16
    assert max(abs(x - y) for (x, _), (y, _) in zip(a, b)) <= 1e-4
    assert max(abs(x - y) for (x, _), (y, _) in zip(a, loglikelihoods(plain, "capitals_mc"))) > 1e-3

    other = make_chat_model(tmp_path_factory.mktemp("tiny_eval_other"), max_position_embeddings=512, hidden_size=32,
                            intermediate_size=64)
    from easytune.eval.__main__ import main
    with pytest.raises(ValueError, match="adapter") as excinfo:
        main(["--model", other, "--adapter", adapter_dir, "--tasks", "capitals_mc", "--include_path", task_dir])
    print(excinfo.value)
    assert len(str(excinfo.value).splitlines()) == 1


def test_pass_at_k_task_samples_and_scores_each_question_n_times(task_dir, tmp_path):
    """`tasks_pass_at_k` (lm-eval `repeats: 4`, sampling at temperature 1) on SmolLM2: each question
    gets 4 sampled answers (not all alike), and the task's pass@1 and pass@4 are Chen et al.'s
    estimator over them, recomputed here with math.comb from the logged samples."""
    from math import comb

    from easytune import assets
    from easytune.data import exact_match
    results = run_easytune(assets.smollm2_hf_dir(), task_dir, ["tasks_pass_at_k"], tmp_path / "out",
                           extra=["--batch_size", "16"])  # 48 requests: 3 batches, not 12
    samples = sorted(results["samples"]["tasks_pass_at_k"], key=lambda s: s["doc_id"])
    answers = [s["resps"][0] for s in samples]  # one request per question, its 4 repeats
    assert len(answers) == 12 and all(len(a) == 4 for a in answers)
    assert any(len(set(a)) > 1 for a in answers), answers  # sampled, not greedy
    correct = [sum(exact_match(text, s["doc"]["answer"]) for text in a) for s, a in zip(samples, answers)]
    for k in (1, 4):
        expected = np.mean([1 - comb(4 - c, k) / comb(4, k) for c in correct])
        assert results["results"]["tasks_pass_at_k"][f"pass@{k},none"] == pytest.approx(expected, abs=1e-12)
    print("correct of 4 per question:", correct)
