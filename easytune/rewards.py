"""Programmatic rewards for RL (`--reward_fn=module:function`), and the call that checks them.

A reward function is called once per rollout batch, TRL-style, with keyword arguments:

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], **columns) -> list of numbers

`prompts` are the records' prompts (a string, or a list of chat messages), `completions` the
decoded completions (strings, special tokens skipped), `completion_ids` their token ids (up to and
including EOS), and every other field of the prompt records is passed as a list under its own name
(e.g. `answer` for the verifiable tasks). It returns one finite number per completion. Accept
`**kwargs` to ignore the columns you do not need.
"""
from __future__ import annotations

import importlib
import math
import numbers
from typing import Callable, Sequence

import numpy as np


def exact_match(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion is exactly the record's `answer` (whitespace and one trailing period
    ignored, as the verifiable tasks' accuracy), else 0.0."""
    from easytune.data.tasks import exact_match as matches
    del prompts, kwargs
    return [float(matches(completion, expected)) for completion, expected in zip(completions, answer)]


def load_reward_fn(spec: str) -> Callable:
    """The function named by `module:function` (the module on sys.path, e.g. `my_rewards:score`)."""
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"--reward_fn must be module:function (e.g. easytune.rewards:exact_match), got {spec!r}.")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ValueError(f"--reward_fn {spec}: cannot import module {module_name!r} ({type(e).__name__}: {e}).") from e
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise ValueError(f"--reward_fn {spec}: module {module_name!r} has no function {function_name!r}.")
    fn.__easytune_name__ = spec
    return fn


def call_reward_fn(fn: Callable, prompts: Sequence, completions: Sequence[str],
                   completion_ids: Sequence[Sequence[int]], columns: dict[str, list]) -> np.ndarray:
    """Scores `[num_completions]` float32 from `fn`; any failure is an error naming the function."""
    name = getattr(fn, "__easytune_name__", getattr(fn, "__qualname__", repr(fn)))
    try:
        scores = fn(prompts=list(prompts), completions=list(completions),
                    completion_ids=[list(ids) for ids in completion_ids], **columns)
    except Exception as e:
        raise RuntimeError(f"reward function {name} raised {type(e).__name__}: {e} (called on {len(completions)} "
                           f"completions with prompts, completions, completion_ids and columns "
                           f"{sorted(columns)}).") from e
    if isinstance(scores, np.ndarray):
        scores = scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise TypeError(f"reward function {name} returned {type(scores).__name__}; it must return a list of "
                        f"{len(completions)} numbers, one per completion.")
    if len(scores) != len(completions):
        raise ValueError(f"reward function {name} returned {len(scores)} scores for {len(completions)} completions; "
                         f"it must return one number per completion.")
    for index, score in enumerate(scores):
        if not isinstance(score, numbers.Real):  # bools count (as 0/1)
            raise TypeError(f"reward function {name} returned {score!r} ({type(score).__name__}) for completion "
                            f"{index}; every score must be a number.")
        if not math.isfinite(float(score)):
            raise ValueError(f"reward function {name} returned {score} for completion {index}; scores must be "
                             f"finite.")
    return np.asarray(scores, np.float32)
