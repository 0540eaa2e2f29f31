"""Verifiable checks of generated text, with no judge model: usable as lm-eval metrics and as RL
rewards (`--reward_fn easytune.eval.verifiers:ifeval_reward`), with the same code both ways.

- IFEval instruction constraints (lowercase, word counts, keywords, forbidden words, end phrase,
  JSON, bullet counts, no commas, sections, postscript, ...): lm-eval's own implementation of
  Google's IFEval checkers (`lm_eval.tasks.ifeval`), not a copy. Only the sentence-count
  constraint needs data a machine may lack (nltk's punkt); it is refused with what to install.
- GSM8K style: the last number in the completion against the reference answer.
- pass@k: the unbiased estimator of Chen et al. (2021) from n samples with c correct.

Reward functions take easytune's reward signature (`prompts`, `completions`, the prompt file's
columns as keyword lists) and return one float per completion.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Sequence

# Instructions whose checker needs nltk's punkt sentence tokenizer data (downloaded, not shipped).
NEEDS_PUNKT = frozenset({"length_constraints:number_sentences"})

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in `text` (commas and a trailing '.0' dropped), or None: GSM8K's reading of an answer."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "")
    return value[:-2] if value.endswith(".0") else value


def gsm8k_reward(prompts, completions, answer: Sequence[str], **_) -> list[float]:
    """1.0 where the completion's last number equals the reference answer's last number."""
    return [float(last_number(c) is not None and last_number(c) == last_number(str(a)))
            for c, a in zip(completions, answer)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c of them
    correct) is correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, computed stably)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_figures(doc: dict, results: Sequence[str]) -> dict[str, float]:
    """lm-eval `process_results` of a task sampled n times per question (`repeats: n`): pass@1 and
    pass@n of exact match against `doc["answer"]` (easytune's task check)."""
    from easytune.data import exact_match
    if len(results) == 1 and isinstance(results[0], (list, tuple)):  # a filter that keeps the repeats: one list
        results = results[0]
    n = len(results)
    correct = sum(exact_match(text, str(doc["answer"])) for text in results)
    return {"pass@1": pass_at_k(n, correct, 1), f"pass@{n}": pass_at_k(n, correct, n)}


def _check_instructions(instruction_ids: Sequence[str]) -> None:
    from lm_eval.tasks.ifeval import instructions_registry
    unknown = [i for i in instruction_ids if i not in instructions_registry.INSTRUCTION_DICT]
    if unknown:
        raise ValueError(f"unknown IFEval instruction {unknown[0]!r}; known: "
                         f"{sorted(instructions_registry.INSTRUCTION_DICT)}.")
    needs = sorted(set(instruction_ids) & NEEDS_PUNKT)
    if needs and not _have_punkt():
        raise ValueError(f"IFEval instruction {needs[0]!r} counts sentences with nltk's punkt_tab data, which "
                         f"is not installed; run `python -m nltk.downloader punkt_tab` where the Internet is "
                         f"reachable, or leave that instruction out.")


@functools.lru_cache(maxsize=None)
def _have_punkt() -> bool:
    """Looked up once: a reward function runs this for every completion of every rollout."""
    import nltk
    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        return False
    return True


def follows_instructions(prompt: str, response: str, instruction_ids: Sequence[str],
                         kwargs: Sequence[dict]) -> list[bool]:
    """IFEval's strict check of each instruction on `response` (lm-eval's implementation)."""
    from lm_eval.tasks.ifeval.utils import InputExample, test_instruction_following_strict
    _check_instructions(instruction_ids)
    example = InputExample(key=0, instruction_id_list=list(instruction_ids), prompt=prompt, kwargs=list(kwargs))
    return test_instruction_following_strict(example, response).follow_instruction_list


def ifeval_reward(prompts, completions, instruction_id_list: Sequence[Sequence[str]],
                  kwargs: Sequence[Sequence[dict]], **_) -> list[float]:
    """Fraction of each prompt's IFEval instructions the completion follows (strict), in [0, 1].
    The prompt file carries IFEval's columns: `instruction_id_list` and `kwargs`."""
    rewards = []
    for prompt, completion, ids, args in zip(prompts, completions, instruction_id_list, kwargs):
        text = prompt if isinstance(prompt, str) else next((m["content"] for m in reversed(prompt)
                                                            if m.get("role") == "user"), "")
        followed = follows_instructions(text, completion, ids, args)
        rewards.append(sum(followed) / len(followed) if followed else 0.0)
    return rewards
