"""Synthetic tasks: answers recomputed here from the question text, disjoint splits, exact match."""
import re

import pytest

from easytune.data import (TASKS, accuracy, detect_format, exact_match, make_task_records, to_messages,
                           train_and_heldout)


def solve(question: str) -> str:
    """An independent solver for the task questions."""
    if match := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\? Answer with the number only\.", question):
        a, op, b = int(match[1]), match[2], int(match[3])
        return str({"+": a + b, "-": a - b, "*": a * b}[op])
    if match := re.fullmatch(r"Sort these numbers in ascending order: ([\d, ]+)\. Answer with .*", question):
        return ", ".join(str(n) for n in sorted(int(x) for x in match[1].split(",")))
    if match := re.fullmatch(r"Reverse the string '([a-z]+)'\. Answer with .*", question):
        return "".join(reversed(match[1]))
    if match := re.fullmatch(r"How many times does the letter '([a-z])' appear in '([a-z]+)'\? Answer with .*", question):
        return str(sum(ch == match[1] for ch in match[2]))
    raise AssertionError(f"unrecognized question {question!r}")


def test_answers_are_correct_and_every_task_appears():
    records = make_task_records(600, seed=0)
    assert {r["task"] for r in records} == set(TASKS) >= {"add", "subtract", "multiply", "sort", "reverse", "count"}
    for record in records:
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert "Answer with" in user["content"]
        assert assistant["content"] == record["answer"] == solve(user["content"])
        assert to_messages(record, detect_format(record, "task"), "task") == record["messages"]


def test_records_are_deterministic_and_seeded():
    assert make_task_records(50, seed=1) == make_task_records(50, seed=1)
    assert make_task_records(50, seed=1) != make_task_records(50, seed=2)
    assert {r["task"] for r in make_task_records(20, seed=0, tasks=("sort",))} == {"sort"}
    with pytest.raises(ValueError, match="unknown tasks"):
        make_task_records(5, seed=0, tasks=("divide",))


def test_train_and_heldout_are_disjoint():
    train, heldout = train_and_heldout(3000, 300, seed=0)
    assert len(train) == 3000 and len(heldout) == 300
    heldout_questions = [r["messages"][0]["content"] for r in heldout]
    assert len(set(heldout_questions)) == 300
    assert not set(heldout_questions) & {r["messages"][0]["content"] for r in train}
    assert {r["task"] for r in heldout} == set(TASKS)
    assert all(r["answer"] == solve(r["messages"][0]["content"]) for r in heldout + train)


def test_exact_match_and_accuracy():
    assert exact_match(" 42.\n", "42")
    assert exact_match("3, 5, 7.", "3, 5, 7")
    assert not exact_match("42", "43")
    assert not exact_match("The answer is 42", "42")
    assert not exact_match("", "0")
    records = [{"answer": "1"}, {"answer": "2"}, {"answer": "3"}, {"answer": "4"}]
    assert accuracy(["1", "2.", "x", "5"], records) == 0.5
    with pytest.raises(ValueError, match="3 predictions for 4 records"):
        accuracy(["1", "2", "3"], records)


def test_with_examples_prepends_solved_questions_of_the_same_task():
    from easytune.data import with_examples
    records = make_task_records(12, seed=0)
    shot = with_examples(records, 2, seed=7)
    for original, record in zip(records, shot):
        examples, question = record["messages"][:4], record["messages"][4:]
        assert question == original["messages"] and record["answer"] == original["answer"]
        assert [m["role"] for m in examples] == ["user", "assistant"] * 2
        for user, assistant in zip(examples[::2], examples[1::2]):
            assert assistant["content"] == solve(user["content"])        # solved correctly
        same_task = [r for r in shot if r["task"] == record["task"]]
        assert all(r["messages"][:4] == examples for r in same_task)   # one set of examples per task
    assert with_examples(records, 0, seed=7) == records
