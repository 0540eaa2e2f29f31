"""Offline RL data (ILQL): logged completions with a scalar reward -> token rows whose trained
tokens are the actions.

A record is one JSON object:

    {"prompt": "..." | [messages], "completion": "..." | [assistant messages], "reward": number}
    {"messages": [...], "reward": number}     every assistant turn is an action (trlx's dialogues:
                                               its output segments), the rest is context

As trlx's `make_experience` (trlx/trainer/accelerate_ilql_trainer.py): the actions are the tokens
of the completion (here, with the chat template's end of turn, which trlx appends as EOS); the
reward sits on the last action; rewards are z-scored over the dataset (`normalize_rewards`).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import numpy as np

from easytune.data.formats import _json_type, _message, record_tools
from easytune.data.packing import make_rows
from easytune.data.templates import render_ids
from easytune.data.tokenize import Example, tokenize_conversation
from easytune.data.unpaired import prompt_and_completion


@dataclasses.dataclass
class OfflineExample:
    """One logged episode: the conversation, how many of its turns are the prompt (the rest are
    the completion's assistant turns; None: every assistant turn is an action), and its reward."""

    messages: list[dict]
    prompt_turns: int | None
    reward: float


@dataclasses.dataclass
class OfflineStats:
    num_records: int = 0
    num_kept: int = 0
    num_dropped: int = 0
    num_truncated: int = 0
    reward_mean: float = 0.0
    reward_std: float | None = None

    def summary(self) -> str:
        std = "n/a" if self.reward_std is None else f"{self.reward_std:.4g}"
        return (f"{self.num_records} records: {self.num_kept} kept, {self.num_dropped} dropped (no action token "
                f"left after truncation), {self.num_truncated} truncated; reward mean {self.reward_mean:.4g}, "
                f"std {std}")


def parse_offline(record: dict, where: str) -> OfflineExample:
    """The episode of a record; ValueError naming `where`."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_json_type(record)}.")
    reward = record.get("reward")
    if reward is None or isinstance(reward, bool) or not isinstance(reward, numbers.Real) \
            or not math.isfinite(float(reward)):
        got = "no 'reward'" if reward is None else f"'reward' {reward!r}"
        raise ValueError(f"{where}: an offline RL record needs a finite number 'reward' (with 'prompt' and "
                         f"'completion', or 'messages'); it has {got}.")
    if "messages" in record and "completion" not in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of messages.")
        messages = [_message(m, f"{where} messages[{i}]") for i, m in enumerate(messages)]
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: 'messages' has no assistant turn, so no action to learn from.")
        return OfflineExample(messages, None, float(reward))
    missing = [key for key in ("prompt", "completion") if record.get(key) is None]
    if missing:
        raise ValueError(f"{where}: missing {' and '.join(repr(k) for k in missing)}; an offline RL record needs "
                         f"'prompt', 'completion' and 'reward' (or 'messages' and 'reward'). It has fields "
                         f"{sorted(record)}.")
    prompt, completion = prompt_and_completion(record, where)
    return OfflineExample(prompt + completion, len(prompt), float(reward))


def normalize_rewards(rewards: Sequence[float]) -> tuple[np.ndarray, float, float | None]:
    """`(z-scored rewards, mean, std)` as trlx's `make_experience`: in float64, minus the mean,
    divided by (the unbiased std + float64 eps) unless the std is undefined (one record: None)."""
    returns = np.asarray(rewards, np.float64)
    mean = float(returns.mean())
    std = float((returns - mean).std(ddof=1)) if len(returns) > 1 else None
    return zscore(returns, mean, std), mean, std


def zscore(rewards: Sequence[float], mean: float, std: float | None) -> np.ndarray:
    """`(rewards - mean) / (std + float64 eps)` in float64 (only centred when `std` is None): the
    training data's statistics applied to any rewards (e.g. the eval data's)."""
    centred = np.asarray(rewards, np.float64) - mean
    return centred if std is None else centred / (std + np.finfo(np.float64).eps)


def tokenize_offline(located: Sequence[tuple[dict, str]], tokenizer, chat_template: str | None, seq_length: int,
                     source_name: str) -> tuple[list[Example], list[float], OfflineStats]:
    """`(examples with the actions as loss mask, raw rewards, stats)`; an episode whose actions are
    all cut by truncation to seq_length is dropped (and counted)."""
    if not located:
        raise ValueError(f"{source_name} has no records.")
    if chat_template is None:
        raise ValueError("offline RL episodes are conversations and need a chat template; pass --chat_template.")
    stats = OfflineStats(num_records=len(located))
    examples, rewards = [], []
    for record, where in located:
        episode = parse_offline(record, where)
        tools = record_tools(record, where)
        try:
            whole = tokenize_conversation(episode.messages, tokenizer, chat_template, tools)
            mask = list(whole.loss_mask)
            if episode.prompt_turns is not None:  # the prompt's own assistant turns are context
                prompt_length = len(render_ids(tokenizer, episode.messages[:episode.prompt_turns],
                                               add_generation_prompt=True, chat_template=chat_template,
                                               tools=tools))
                mask[:prompt_length] = [0] * min(prompt_length, len(mask))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        except Exception as e:  # template errors (jinja, raise_exception), located
            raise ValueError(f"{where}: {type(e).__name__}: {e}") from e
        example = Example(whole.input_ids[:seq_length], mask[:seq_length])
        # an action is a trained target: the token after a masked position must be inside the row
        if not any(example.loss_mask[1:]):
            stats.num_dropped += 1
            continue
        stats.num_truncated += len(whole.input_ids) > seq_length
        examples.append(example)
        rewards.append(episode.reward)
    stats.num_kept = len(examples)
    if not examples:
        raise ValueError(f"all {stats.num_records} episodes of {source_name} have no action token left after "
                         f"truncation to seq_length={seq_length}; raise --seq_length or shorten the prompts.")
    return examples, rewards, stats


def offline_rows(examples: Sequence[Example], rewards: np.ndarray, seq_length: int) -> dict[str, np.ndarray]:
    """`[num_episodes, length]` int32 rows (every key of `packing.make_rows`, unpacked: one episode
    per row; `loss_mask` marks the actions) and `reward` `[num_episodes, 1]` float32, the episode's
    (normalised) reward, which the loss puts on its last action. `length`: the longest episode
    rounded up to a multiple of 8, at most seq_length."""
    longest = max(len(e.input_ids) for e in examples)
    rows = make_rows(examples, min(seq_length, -(-longest // 8) * 8), pack=False)
    rows["reward"] = np.asarray(rewards, np.float32).reshape(-1, 1)
    return rows
