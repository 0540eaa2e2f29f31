"""Verifiable synthetic tasks: short questions with one exact answer, the default SFT job's data.

    records = make_task_records(1000, seed=0)
    records[0] == {"messages": [{"role": "user", "content": "What is 37 + 58? Answer with the number only."},
                                {"role": "assistant", "content": "95"}], "task": "add", "answer": "95"}

Fine-tuning on them moves held-out exact-match accuracy measurably, which makes them a test of the
whole training stack, not only of the loss going down.
"""
from __future__ import annotations

import random
import string
from collections.abc import Sequence

TASKS = ("add", "subtract", "multiply", "sort", "reverse", "count")


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} + {b}? Answer with the number only.", str(a + b)


def _subtract(rng: random.Random) -> tuple[str, str]:
    a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)  # no negative answers
    return f"What is {a} - {b}? Answer with the number only.", str(a - b)


def _multiply(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 9)
    return f"What is {a} * {b}? Answer with the number only.", str(a * b)


def _sort(rng: random.Random) -> tuple[str, str]:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    question = (f"Sort these numbers in ascending order: {', '.join(map(str, numbers))}. "
                f"Answer with the sorted numbers separated by commas, nothing else.")
    return question, ", ".join(map(str, sorted(numbers)))


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 8)))
    return f"Reverse the string '{word}'. Answer with the reversed string only.", word[::-1]


def _count(rng: random.Random) -> tuple[str, str]:
    alphabet = rng.sample(string.ascii_lowercase, 4)  # few distinct letters, so counts above 1 are common
    word = "".join(rng.choices(alphabet, k=rng.randint(6, 12)))
    letter = rng.choice(alphabet)
    return (f"How many times does the letter '{letter}' appear in '{word}'? Answer with the number only.",
            str(word.count(letter)))


_GENERATORS = {"add": _add, "subtract": _subtract, "multiply": _multiply, "sort": _sort,
               "reverse": _reverse, "count": _count}


def _record(task: str, question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "task": task, "answer": answer}


def make_task_records(num: int, seed: int, tasks: Sequence[str] = TASKS, *, exclude=frozenset()) -> list[dict]:
    """`num` records cycling through `tasks` (so every task gets num // len(tasks) or one more),
    with operands drawn from `random.Random(seed)`. Questions in `exclude` are skipped."""
    unknown = [task for task in tasks if task not in _GENERATORS]
    if unknown or not tasks:
        raise ValueError(f"unknown tasks {unknown or list(tasks)}; choose from {', '.join(TASKS)}.")
    rng = random.Random(seed)
    records = []
    attempts = 0
    while len(records) < num:
        task = tasks[len(records) % len(tasks)]
        question, answer = _GENERATORS[task](rng)
        attempts += 1
        if question in exclude:
            if attempts > 100 * (num + 10):
                raise ValueError(f"could not draw {num} questions outside the {len(exclude)} excluded ones.")
            continue
        records.append(_record(task, question, answer))
    return records


def train_and_heldout(num_train: int, num_heldout: int, seed: int = 0,
                      tasks: Sequence[str] = TASKS) -> tuple[list[dict], list[dict]]:
    """Training records and distinct held-out records (an even share per task); no held-out
    question appears in training. The two sets come from different seeds."""
    quota = {task: num_heldout // len(tasks) + (i < num_heldout % len(tasks)) for i, task in enumerate(tasks)}
    heldout, seen = [], set()
    for record in make_task_records(20 * num_heldout + 100, seed=2 * seed + 1, tasks=tasks):
        question = record["messages"][0]["content"]
        if question not in seen and quota[record["task"]] > 0:
            quota[record["task"]] -= 1
            seen.add(question)
            heldout.append(record)
    if len(heldout) < num_heldout:
        raise ValueError(f"could not draw {num_heldout} distinct held-out questions from {', '.join(tasks)}.")
    train = make_task_records(num_train, seed=2 * seed, tasks=tasks, exclude=seen)
    return train, heldout


def with_examples(records: Sequence[dict], shots: int, seed: int) -> list[dict]:
    """Records whose conversation starts with `shots` solved examples of the same task (user
    question, assistant answer) before the question: few-shot prompts, which show a small model
    the answer format. The examples come from `random.Random(seed)` and are the same for every
    record of a task."""
    if shots <= 0:
        return list(records)
    examples = {}
    for task in {r["task"] for r in records}:
        drawn = make_task_records(shots, seed=seed, tasks=(task,))
        examples[task] = [message for example in drawn for message in example["messages"]]
    return [{**r, "messages": examples[r["task"]] + r["messages"]} for r in records]


def exact_match(prediction: str, answer: str) -> bool:
    """Whether `prediction` is `answer`, ignoring surrounding whitespace and one trailing period."""
    def normalize(text: str) -> str:
        text = text.strip()
        return text[:-1].rstrip() if text.endswith(".") else text
    return normalize(prediction) == normalize(answer)


def accuracy(predictions: Sequence[str], records: Sequence[dict]) -> float:
    """The fraction of `predictions` that exactly match their record's "answer"."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records.")
    if not records:
        raise ValueError("accuracy of an empty set of records is undefined.")
    return sum(exact_match(p, r["answer"]) for p, r in zip(predictions, records)) / len(records)
