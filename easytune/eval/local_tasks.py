"""Small lm-eval task definitions that run offline (`dataset_path: json` over local files): what
the tests compare backends on, and an example of local tasks for `python -m easytune.eval
--include_path`. lm-eval reads `data_files` relative to the working directory, so the YAMLs are
written with absolute paths next to their data.

    python -c "from easytune.eval.local_tasks import write_local_tasks; print(write_local_tasks('my_tasks'))"
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from easytune import data

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
            ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Canada", "Ottawa")]
CITIES = [city for _, city in CAPITALS]


def write_local_tasks(directory) -> str:
    """Write the local lm-eval tasks (YAML + JSONL, absolute data paths) into `directory` and return
    it for `--include_path`: `capitals_mc` (multiple choice: loglikelihood), `tasks_gen` (easytune's
    verifiable tasks, exact match: generate_until), `capitals_text` (perplexity:
    loglikelihood_rolling), `ifeval_local` (IFEval instruction checks, `write_ifeval_task`) and
    `tasks_pass_at_k` (pass@k of sampled answers, `write_pass_at_k_task`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    mc = []
    for country, city in CAPITALS:
        choices = [city] + [c for c in rng.permutation(CITIES).tolist() if c != city][:3]
        order = rng.permutation(4).tolist()
        mc.append({"country": country, "choices": [choices[i] for i in order], "label": order.index(0)})
    records = data.make_task_records(8, seed=5)
    gen = [{"question": r["messages"][0]["content"], "answer": r["answer"]} for r in records]
    text = [{"text": " ".join(f"The capital of {c} is {city}." for c, city in CAPITALS[i:i + 3]) * (1 + i)}
            for i in range(4)]
    files = {"capitals_mc": mc, "tasks_gen": gen, "capitals_text": text}
    for name, rows in files.items():
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (directory / "capitals_mc.yaml").write_text(
        f"task: capitals_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {directory}/capitals_mc.jsonl\n"
        "output_type: multiple_choice\ndoc_to_text: 'Question: What is the capital of {{country}}?\nAnswer:'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (directory / "tasks_gen.yaml").write_text(
        f"task: tasks_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {directory}/tasks_gen.jsonl\n"
        "output_type: generate_until\ndoc_to_text: 'Q: {{question}}\nA:'\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: ['\\n', 'Q:']\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    ignore_case: true\n    ignore_punctuation: true\n")
    (directory / "capitals_text.yaml").write_text(
        f"task: capitals_text\n{common}dataset_kwargs:\n  data_files:\n    test: {directory}/capitals_text.jsonl\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: '{{text}}'\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    write_ifeval_task(directory)
    write_pass_at_k_task(directory)
    return str(directory)


def _task_with_code(directory: Path, name: str, rows: list[dict], imports: str) -> str:
    """Write task `name`'s data (`<name>.jsonl`) and its metric code (`<name>_utils.py`, which
    `!function <name>_utils.x` finds beside the YAML); returns the YAML's opening lines."""
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / f"{name}_utils.py").write_text(f"{imports}  # noqa: F401\n")
    return (f"task: {name}\ndataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n"
            f"    test: {directory}/{name}.jsonl\n")


def write_pass_at_k_task(directory, samples: int = 4, temperature: float = 0.7) -> str:
    """`tasks_pass_at_k`: easytune's count and subtract tasks (the ones SmolLM2 sometimes answers
    exactly), 3-shot from the same file, each question sampled `samples` times at `temperature`
    (lm-eval's `repeats`), scored pass@1 and pass@<samples> by
    `easytune.eval.verifiers.pass_at_k_figures`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    records = data.make_task_records(12, seed=5, tasks=("count", "subtract"))
    rows = [{"question": r["messages"][0]["content"], "answer": r["answer"]} for r in records]
    header = _task_with_code(directory, "tasks_pass_at_k", rows,
                             "from easytune.eval.verifiers import pass_at_k_figures as process_results")
    (directory / "tasks_pass_at_k.yaml").write_text(
        f"{header}output_type: generate_until\nrepeats: {samples}\n"
        "fewshot_split: test\nnum_fewshot: 3\nfewshot_config:\n  sampler: first_n\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: answer\n'
        'generation_kwargs:\n  until: ["\\n", "Q:"]\n  max_gen_toks: 12\n  do_sample: true\n'
        f"  temperature: {temperature}\n"
        # lm-eval's default filter keeps the first of the repeats; pass@k scores all of them
        f"filter_list:\n  - name: none\n    filter:\n      - function: take_first_k\n        k: {samples}\n"
        "process_results: !function tasks_pass_at_k_utils.process_results\nmetric_list:\n"
        f"  - metric: pass@1\n    aggregation: mean\n    higher_is_better: true\n"
        f"  - metric: pass@{samples}\n    aggregation: mean\n    higher_is_better: true\n")
    return str(directory)


IFEVAL_PROMPTS = [
    ("Describe the sea in one short paragraph. Do not use any commas.",
     ["punctuation:no_comma"], [{}]),
    ("Write two sentences about cats, all in lowercase letters.",
     ["change_case:english_lowercase"], [{}]),
    ("Name three fruits in fewer than 20 words, and mention the word apple.",
     ["length_constraints:number_words", "keywords:existence"],
     [{"relation": "less than", "num_words": 20}, {"keywords": ["apple"]}]),
    ("List two colours as a markdown bullet list with exactly 2 bullets.",
     ["detectable_format:number_bullet_lists"], [{"num_bullets": 2}]),
    ("Give a greeting in JSON format.", ["detectable_format:json_format"], [{}]),
    ("Say hello. End your reply with the exact phrase: Is there anything else I can help with?",
     ["startend:end_checker"], [{"end_phrase": "Is there anything else I can help with?"}]),
    ("Write a short note to a friend and add a postscript starting with P.S.",
     ["detectable_content:postscript"], [{"postscript_marker": "P.S."}]),
    ("Describe rain without using the words wet or water.",
     ["keywords:forbidden_words"], [{"forbidden_words": ["wet", "water"]}]),
]


def write_ifeval_task(directory, max_gen_toks: int = 48) -> str:
    """`ifeval_local`: IFEval's format, checker and metrics (lm-eval's `ifeval` task code) over a
    few local prompts whose instructions need no downloaded data, greedy, up to `max_gen_toks`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"key": i, "prompt": p, "instruction_id_list": ids, "kwargs": kw}
            for i, (p, ids, kw) in enumerate(IFEVAL_PROMPTS)]
    header = _task_with_code(directory, "ifeval_local", rows,
                             "from lm_eval.tasks.ifeval.utils import agg_inst_level_acc, process_results")
    (directory / "ifeval_local.yaml").write_text(
        f"{header}output_type: generate_until\nnum_fewshot: 0\n"
        f"doc_to_text: prompt\ndoc_to_target: 0\n"
        f"generation_kwargs:\n  until: []\n  do_sample: false\n  temperature: 0.0\n  max_gen_toks: {max_gen_toks}\n"
        "process_results: !function ifeval_local_utils.process_results\nmetric_list:\n"
        "  - metric: prompt_level_strict_acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: inst_level_strict_acc\n    aggregation: !function ifeval_local_utils.agg_inst_level_acc\n"
        "    higher_is_better: true\n"
        "  - metric: prompt_level_loose_acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: inst_level_loose_acc\n    aggregation: !function ifeval_local_utils.agg_inst_level_acc\n"
        "    higher_is_better: true\n")
    return str(directory)
