"""Preference pairs for DPO and reward models: (prompt, chosen, rejected) -> masked token rows.

A record is one JSON object; these layouts are understood (`parse_pair`):

    {"prompt": "...", "chosen": "...", "rejected": "..."}
        strings: the prompt is one user turn, each response one assistant turn
    {"prompt": "...", "chosen": [messages], "rejected": [messages]}
        UltraFeedback-binarized: chosen and rejected are whole conversations that include the prompt
        turn(s); the response is what follows the last non-assistant turn. The `prompt` string must
        be that turn's content (a `prompt` list must be all of it)
    {"prompt": "..." | [messages], "chosen": [assistant messages], "rejected": [assistant messages]}
        the responses only (TRL's conversational layout)
    {"chosen": [messages], "rejected": [messages]}
        whole conversations, no prompt field: the shared part before the response is the prompt

Optional: "margin" (a number; the reward model's Bradley-Terry margin, default 0).

Pairs are tokenized with the SFT code (`tokenize.tokenize_conversation`, so any chat template and
the same turn boundaries) with the loss mask on the response's assistant tokens only, then
right-truncated to seq_length as SFT truncates. A pair whose chosen or rejected response has no
token left is dropped and counted. Every error names the file and line (or record) of the pair.
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np

from easytune.data.formats import _json_type, _message, load_located_records
from easytune.data.packing import make_rows
from easytune.data.tasks import exact_match
from easytune.data.templates import render_ids
from easytune.data.tokenize import Example, tokenize_conversation

SIDES = ("chosen", "rejected")


@dataclasses.dataclass
class PreferencePair:
    """One parsed pair: the shared prompt and each side's response (messages after the prompt)."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    margin: float | None = None


@dataclasses.dataclass
class TokenizedPair:
    chosen: Example
    rejected: Example
    margin: float | None = None


@dataclasses.dataclass
class PreferenceStats:
    """Counts from `tokenize_pairs`: num_dropped = pairs whose chosen or rejected response had no
    token left after truncation; num_truncated = kept pairs that lost tokens."""

    num_records: int = 0
    num_kept: int = 0
    num_dropped: int = 0
    num_dropped_chosen: int = 0
    num_dropped_rejected: int = 0
    num_truncated: int = 0
    num_tokens: int = 0
    num_response_tokens: int = 0

    def summary(self) -> str:
        return (f"{self.num_records} pairs: {self.num_kept} kept, {self.num_dropped} dropped (chosen or rejected "
                f"response empty after truncation: {self.num_dropped_chosen} chosen, {self.num_dropped_rejected} "
                f"rejected), {self.num_truncated} truncated; {self.num_tokens} tokens, {self.num_response_tokens} "
                f"response tokens")


# ----------------------------------------------------------------------------- reading

def load_pairs(source: str) -> tuple[list[dict], list[str]]:
    """The records of a preference file or dataset and where each one is, for errors ("pairs.jsonl
    line 3", "pairs.json item 2", ...)."""
    located = load_located_records(source)
    return [record for record, _ in located], [where for _, where in located]


def _messages(value, where: str, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {key!r} must be a string or a non-empty list of messages, got "
                         f"{'an empty list' if value == [] else _json_type(value)}.")
    return [_message(m, f"{where} {key}[{i}]") for i, m in enumerate(value)]


def _text(value, where: str, key: str) -> str:
    if not value.strip():
        raise ValueError(f"{where}: {key!r} is empty.")
    return value


def _split_conversation(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """(prompt, response): the response is the assistant turns after the last other turn."""
    last_prompt_turn = max(i for i, m in enumerate(messages) if m["role"] != "assistant")
    return messages[:last_prompt_turn + 1], messages[last_prompt_turn + 1:]


def parse_pair(record: dict, where: str) -> PreferencePair:
    """A record (any layout in the module doc) as prompt + responses; ValueError naming `where`."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_json_type(record)}.")
    missing = [key for key in SIDES if record.get(key) is None]
    if missing:
        raise ValueError(f"{where}: missing {' and '.join(repr(k) for k in missing)}; a preference pair needs "
                         f"'chosen' and 'rejected' (and 'prompt' unless they are whole conversations). It has "
                         f"fields {sorted(record)}.")
    prompt_field = record.get("prompt")
    if prompt_field is None:
        prompt = None
    elif isinstance(prompt_field, str):
        prompt = [{"role": "user", "content": _text(prompt_field, where, "prompt")}]
    else:
        prompt = _messages(prompt_field, where, "prompt")
        if prompt[-1]["role"] == "assistant":
            raise ValueError(f"{where}: the prompt ends with an assistant turn; the responses are what follows it, "
                             f"so the prompt should end with a user (or system) turn.")
    sides = {}
    for key in SIDES:
        value = record[key]
        if isinstance(value, str):
            if prompt is None:
                raise ValueError(f"{where}: {key!r} is a string, so the pair needs a 'prompt' field.")
            sides[key] = (prompt, [{"role": "assistant", "content": _text(value, where, key)}])
            continue
        messages = _messages(value, where, key)
        if messages[0]["role"] == "assistant":  # the response only
            if prompt is None:
                raise ValueError(f"{where}: {key!r} holds only assistant turns, so the pair needs a 'prompt' field.")
            if any(m["role"] != "assistant" for m in messages):
                raise ValueError(f"{where}: {key!r} starts with an assistant turn but also holds other turns; give "
                                 f"either the response turns only or the whole conversation.")
            sides[key] = (prompt, messages)
            continue
        if all(m["role"] != "assistant" for m in messages):
            raise ValueError(f"{where}: {key!r} has no assistant turn: there is no response to train on.")
        conversation_prompt, response = _split_conversation(messages)
        if not response:
            raise ValueError(f"{where}: {key!r} ends with a {messages[-1]['role']} turn; the response (the "
                             f"assistant turns after the prompt) is missing.")
        if prompt_field is not None:
            matches = (conversation_prompt[-1]["content"] == prompt_field if isinstance(prompt_field, str)
                       else conversation_prompt == prompt)
            if not matches:
                raise ValueError(f"{where}: the 'prompt' field does not match the prompt turns of {key!r} "
                                 f"({_preview(conversation_prompt)}); fix the record so they agree.")
        sides[key] = (conversation_prompt, response)
    (chosen_prompt, chosen), (rejected_prompt, rejected) = sides["chosen"], sides["rejected"]
    if chosen_prompt != rejected_prompt:
        raise ValueError(f"{where}: chosen and rejected have different prompts (chosen: {_preview(chosen_prompt)}; "
                         f"rejected: {_preview(rejected_prompt)}); a preference pair answers one prompt twice.")
    margin = record.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not np.isfinite(margin):
            raise ValueError(f"{where}: 'margin' must be a finite number, got {margin!r}.")
        margin = float(margin)
    return PreferencePair(chosen_prompt, chosen, rejected, margin)


def _preview(messages: list[dict], limit: int = 60) -> str:
    last = messages[-1]["content"]
    last = last if len(last) <= limit else last[:limit] + "..."
    return f"{len(messages)} turn(s), last {messages[-1]['role']}: {last!r}"


# ----------------------------------------------------------------------------- tokenizing

def tokenize_response(prompt: Sequence[dict], response: Sequence[dict], tokenizer, chat_template: str) -> Example:
    """The conversation prompt + response with the loss mask on the response's assistant tokens
    only (assistant turns inside the prompt are context, not trained)."""
    example = tokenize_conversation(list(prompt) + list(response), tokenizer, chat_template)
    prompt_length = len(render_ids(tokenizer, prompt, add_generation_prompt=True, chat_template=chat_template))
    mask = [0] * min(prompt_length, len(example.loss_mask)) + example.loss_mask[prompt_length:]
    return Example(example.input_ids, mask)


def tokenize_pairs(records: Sequence[dict], tokenizer, chat_template: str | None, seq_length: int,
                   source_name: str, locations: Sequence[str] | None = None
                   ) -> tuple[list[TokenizedPair], PreferenceStats]:
    """Parse, tokenize and right-truncate every pair; drop (and count) pairs left with an empty
    chosen or rejected response. Errors name `locations[i]` (default `<source_name> record <i>`)."""
    if not records:
        raise ValueError(f"{source_name} has no records.")
    if chat_template is None:
        raise ValueError("preference pairs are conversations and need a chat template; pass --chat_template.")
    locations = locations or [f"{source_name} record {n}" for n in range(1, len(records) + 1)]
    stats = PreferenceStats(num_records=len(records))
    pairs = []
    for record, where in zip(records, locations):
        pair = parse_pair(record, where)
        examples, truncated, empty = {}, False, []
        for side in SIDES:
            try:
                example = tokenize_response(pair.prompt, getattr(pair, side), tokenizer, chat_template)
            except Exception as e:  # template errors (jinja, raise_exception) and ours, located
                raise ValueError(f"{where} ({side}): {e}") from e
            truncated |= len(example.input_ids) > seq_length
            example = Example(example.input_ids[:seq_length], example.loss_mask[:seq_length])
            if example.num_trainable_targets == 0:
                empty.append(side)
            examples[side] = example
        if empty:
            stats.num_dropped += 1
            stats.num_dropped_chosen += "chosen" in empty
            stats.num_dropped_rejected += "rejected" in empty
            continue
        pairs.append(TokenizedPair(examples["chosen"], examples["rejected"], pair.margin))
        stats.num_truncated += truncated
        for example in examples.values():
            stats.num_tokens += len(example.input_ids)
            stats.num_response_tokens += example.num_trainable_targets
    stats.num_kept = len(pairs)
    if not pairs:
        raise ValueError(f"all {len(records)} pairs of {source_name} have an empty chosen or rejected response after "
                         f"truncation to seq_length={seq_length} ({stats.num_dropped_chosen} chosen, "
                         f"{stats.num_dropped_rejected} rejected); raise --seq_length or shorten the prompts.")
    return pairs, stats


def pair_rows(records: Sequence[dict], tokenizer, chat_template: str | None, seq_length: int, source_name: str,
              locations: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray], PreferenceStats]:
    """`(rows, stats)`: `tokenize_pairs` then `make_pair_rows`."""
    pairs, stats = tokenize_pairs(records, tokenizer, chat_template, seq_length, source_name, locations)
    return make_pair_rows(pairs, seq_length), stats


def make_pair_rows(pairs: Sequence[TokenizedPair], seq_length: int) -> dict[str, np.ndarray]:
    """`[num_pairs, length]` int32 rows per side, keyed `chosen_<key>` and `rejected_<key>` for
    every key of `packing.make_rows` (one sequence per row, never packed), plus `margin`
    `[num_pairs, 1]` float32 when any pair has one (missing margins are 0). `length` is the
    longest sequence rounded up to a multiple of 8, at most seq_length: short pairs do not pay
    for padding up to a long --seq_length."""
    longest = max(len(getattr(p, side).input_ids) for p in pairs for side in SIDES)
    length = min(seq_length, -(-longest // 8) * 8)
    rows = {}
    for side in SIDES:
        side_rows = make_rows([getattr(p, side) for p in pairs], length, pack=False)
        rows.update({f"{side}_{key}": value for key, value in side_rows.items()})
    if any(p.margin is not None for p in pairs):
        rows["margin"] = np.array([[p.margin or 0.0] for p in pairs], np.float32)
    return rows


# ----------------------------------------------------------------------------- pairs from verifiable tasks

def wrong_answer(task: str, answer: str, rng: random.Random) -> str:
    """A plausible wrong answer to a `tasks` question: a nearby number, a mis-sorted list, a
    misspelled reversal."""
    if task in ("add", "subtract", "multiply", "count"):
        value = int(answer)
        offsets = [d for d in range(-10, 11) if d and value + d >= 0]
        return str(value + rng.choice(offsets))
    if task == "sort":
        numbers = answer.split(", ")
        distinct = [i for i in range(len(numbers) - 1) if numbers[i] != numbers[i + 1]]
        if distinct:
            i = rng.choice(distinct)
            numbers[i], numbers[i + 1] = numbers[i + 1], numbers[i]
            return ", ".join(numbers)
        return ", ".join(numbers[:-1])
    if task == "reverse":
        if answer != answer[::-1]:
            return answer[::-1]  # the word itself: not reversed
        i = rng.randrange(len(answer))
        return answer[:i] + ("a" if answer[i] != "a" else "b") + answer[i + 1:]
    return answer + " " + answer


def task_pairs(records: Sequence[dict], seed: int, generations: Sequence[str] | None = None) -> list[dict]:
    """Preference records from verifiable-task records (`tasks.make_task_records`): prompt = the
    question, chosen = the exact answer, rejected = `generations[i]` (e.g. the model's own greedy
    answer) when that is wrong, else `wrong_answer`."""
    if generations is not None and len(generations) != len(records):
        raise ValueError(f"{len(generations)} generations for {len(records)} task records.")
    rng = random.Random(seed)
    out = []
    for i, record in enumerate(records):
        question, answer = record["messages"][0]["content"], record["answer"]
        generated = None if generations is None else generations[i].strip()
        if generated and not exact_match(generated, answer):
            rejected, source = generated, "model"
        else:
            rejected, source = wrong_answer(record["task"], answer, rng), "perturbed"
        out.append({"prompt": question, "chosen": answer, "rejected": rejected, "task": record["task"],
                    "rejected_source": source})
    return out


def task_pairs_from_model(model, records: Sequence[dict], rejected: str, max_new_tokens: int, seed: int) -> list[dict]:
    """`task_pairs` with rejected = the model's own greedy answer where it is wrong
    (rejected="model"; `model.generate` answers every question once), or always a perturbed
    answer (rejected="perturb")."""
    if rejected not in ("model", "perturb"):
        raise ValueError(f"unknown rejected-answer source {rejected!r}; use model or perturb.")
    generations = None
    if rejected == "model":
        generations = model.generate([r["messages"][:-1] for r in records], max_new_tokens=max_new_tokens)
    return task_pairs(records, seed=seed, generations=generations)
