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
    """Write three lm-eval tasks (YAML + JSONL, absolute data paths) into `directory` and return it
    for `--include_path`: `capitals_mc` (multiple choice: loglikelihood), `tasks_gen` (easytune's
    verifiable tasks, exact match: generate_until) and `capitals_text` (perplexity:
    loglikelihood_rolling)."""
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
    return str(directory)
