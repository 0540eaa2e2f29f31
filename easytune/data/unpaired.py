"""Unpaired preference data for KTO: (prompt, completion, label) -> masked token rows, each with
a KL companion row.

A record is one JSON object, TRL's unpaired preference layout (`parse_unpaired`):

    {"prompt": "..." | [messages], "completion": "..." | [assistant messages], "label": true | false}
        label true: a desirable completion; false: an undesirable one
    {"prompt": ..., "chosen": ..., "rejected": ...}   (any layout of `preference.parse_pair`)
        a preference pair, unpaired as TRL's `unpair_preference_dataset` does: chosen -> label
        true, rejected -> label false; per 1000 records (`datasets.map`'s batch) the chosen
        completions come first, then the rejected ones

KTO's KL term is estimated from mismatched (prompt, completion) pairs. TRL builds them in its data
pipeline by rotating the completions by +1 within each batch of the (sequential) dataset:
(x_1, y_1), ..., (x_n, y_n) -> (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}). We do the same on the
host, once, over chunks of a micro-batch of examples (--batch_size / --grad_accum_steps, the
batch one KL estimate is averaged over) in dataset order, and store each example's KL
companion (its own prompt + the rotated completion) in the same row of the data as `kl_<key>`:
the jitted step then sees fixed-shape rows and the batch iterator may shuffle them freely. The
price: a shuffled batch's KL completions are not its own completions (TRL, sampling sequentially,
makes them the same set); they are still completions of the data on mismatched prompts, so the
estimate is of the same quantity, with a little more variance.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from easytune.data.formats import _json_type, _message
from easytune.data.packing import make_rows
from easytune.data.preference import parse_pair
from easytune.data.templates import render_ids
from easytune.data.tokenize import Example, tokenize_conversation

UNPAIR_CHUNK = 1000  # datasets.map's default batch size, which TRL's unpairing runs under


@dataclasses.dataclass
class UnpairedExample:
    """One parsed example: the prompt turns, the completion (assistant turns) and its label."""

    prompt: list[dict]
    completion: list[dict]
    label: bool


@dataclasses.dataclass
class TokenizedCompletion:
    """Token ids of the prompt and of the completion (with its loss mask), kept apart so that a
    completion can be put after another prompt (the KL companion)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    completion_mask: list[int]
    label: bool


@dataclasses.dataclass
class UnpairedStats:
    num_records: int = 0
    num_examples: int = 0
    num_kept: int = 0
    num_dropped: int = 0
    num_desirable: int = 0
    num_undesirable: int = 0
    num_truncated: int = 0

    def summary(self) -> str:
        return (f"{self.num_records} records -> {self.num_examples} examples: {self.num_kept} kept "
                f"({self.num_desirable} desirable, {self.num_undesirable} undesirable), {self.num_dropped} dropped "
                f"(completion empty after truncation), {self.num_truncated} truncated")


def _text_turns(value, where: str, key: str, role: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: {key!r} is empty.")
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {key!r} must be a string or a non-empty list of messages, got "
                         f"{'an empty list' if value == [] else _json_type(value)}.")
    return [_message(m, f"{where} {key}[{i}]") for i, m in enumerate(value)]


def parse_unpaired(record: dict, where: str) -> list[UnpairedExample]:
    """The examples of a record (one, or two for a preference pair); ValueError naming `where`."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_json_type(record)}.")
    if "completion" not in record and ("chosen" in record or "rejected" in record):
        pair = parse_pair(record, where)
        return [UnpairedExample(pair.prompt, pair.chosen, True), UnpairedExample(pair.prompt, pair.rejected, False)]
    missing = [key for key in ("prompt", "completion", "label") if record.get(key) is None]
    if missing:
        raise ValueError(f"{where}: missing {' and '.join(repr(k) for k in missing)}; a KTO example needs "
                         f"'prompt', 'completion' and a true/false 'label' (or a pair: 'prompt', 'chosen', "
                         f"'rejected'). It has fields {sorted(record)}.")
    label = record["label"]
    if not isinstance(label, (bool, np.bool_)):
        raise ValueError(f"{where}: 'label' must be true (desirable) or false (undesirable), got {label!r}.")
    return [UnpairedExample(*prompt_and_completion(record, where), bool(label))]


def prompt_and_completion(record: dict, where: str) -> tuple[list[dict], list[dict]]:
    """The turns of a record's 'prompt' (a string: one user turn) and 'completion' (a string: one
    assistant turn; a list: assistant turns only); ValueError naming `where`."""
    prompt = _text_turns(record["prompt"], where, "prompt", "user")
    if prompt[-1]["role"] == "assistant":
        raise ValueError(f"{where}: the prompt ends with an assistant turn; the completion is what follows it, so "
                         f"the prompt should end with a user (or system) turn.")
    completion = _text_turns(record["completion"], where, "completion", "assistant")
    if any(m["role"] != "assistant" for m in completion):
        raise ValueError(f"{where}: 'completion' must hold assistant turns only (the prompt goes in 'prompt').")
    return prompt, completion


def unpair(records: Sequence[dict], locations: Sequence[str]) -> tuple[list[UnpairedExample], list[str]]:
    """Every record's examples in TRL's order: per chunk of 1000 records, the records' own
    examples (unpaired ones, and pairs' chosen) in order, then the pairs' rejected."""
    examples, wheres = [], []
    for start in range(0, len(records), UNPAIR_CHUNK):
        rejected = []
        for record, where in zip(records[start:start + UNPAIR_CHUNK], locations[start:start + UNPAIR_CHUNK]):
            parsed = parse_unpaired(record, where)
            examples.append(parsed[0])
            wheres.append(where)
            if len(parsed) == 2:
                rejected.append((parsed[1], where))
        examples.extend(e for e, _ in rejected)
        wheres.extend(w for _, w in rejected)
    return examples, wheres


def tokenize_unpaired(records: Sequence[dict], tokenizer, chat_template: str | None, seq_length: int,
                      source_name: str, locations: Sequence[str] | None = None
                      ) -> tuple[list[TokenizedCompletion], UnpairedStats]:
    """Parse, unpair and tokenize every record (the SFT template code; the loss mask on the
    completion's assistant tokens only); drop (and count) examples whose completion has no trained
    token left within seq_length."""
    if not records:
        raise ValueError(f"{source_name} has no records.")
    if chat_template is None:
        raise ValueError("KTO examples are conversations and need a chat template; pass --chat_template.")
    locations = locations or [f"{source_name} record {n}" for n in range(1, len(records) + 1)]
    examples, wheres = unpair(records, locations)
    stats = UnpairedStats(num_records=len(records), num_examples=len(examples))
    out = []
    for example, where in zip(examples, wheres):
        try:
            whole = tokenize_conversation(example.prompt + example.completion, tokenizer, chat_template)
            prompt_length = len(render_ids(tokenizer, example.prompt, add_generation_prompt=True,
                                           chat_template=chat_template))
        except Exception as e:  # template errors (jinja, raise_exception) and ours, located
            raise ValueError(f"{where}: {e}") from e
        prompt_length = min(prompt_length, len(whole.input_ids))
        tokenized = TokenizedCompletion(whole.input_ids[:prompt_length], whole.input_ids[prompt_length:],
                                        whole.loss_mask[prompt_length:], example.label)
        kept = _join(tokenized, tokenized, seq_length)
        if kept.num_trainable_targets == 0:
            stats.num_dropped += 1
            continue
        stats.num_truncated += len(whole.input_ids) > seq_length
        out.append(tokenized)
    stats.num_kept = len(out)
    stats.num_desirable = sum(e.label for e in out)
    stats.num_undesirable = stats.num_kept - stats.num_desirable
    if not out:
        raise ValueError(f"all {stats.num_examples} examples of {source_name} have an empty completion after "
                         f"truncation to seq_length={seq_length}; raise --seq_length or shorten the prompts.")
    return out, stats


def _join(prompt_of: TokenizedCompletion, completion_of: TokenizedCompletion, seq_length: int) -> Example:
    """`prompt_of`'s prompt + `completion_of`'s completion, right-truncated to seq_length."""
    ids = prompt_of.prompt_ids + completion_of.completion_ids
    mask = [0] * len(prompt_of.prompt_ids) + completion_of.completion_mask
    return Example(ids[:seq_length], mask[:seq_length])


def kl_partners(num_examples: int, batch_size: int) -> np.ndarray:
    """For each example, the example whose completion its KL companion takes: the completions
    rotated by +1 within each chunk of `batch_size` (TRL's `add_kl_completion_ids` under
    `datasets.map(batched=True, batch_size=...)`; the last chunk may be shorter)."""
    partners = np.arange(num_examples)
    for start in range(0, num_examples, batch_size):
        chunk = partners[start:start + batch_size].copy()
        partners[start:start + batch_size] = np.roll(chunk, 1)
    return partners


def make_unpaired_rows(examples: Sequence[TokenizedCompletion], seq_length: int, batch_size: int
                       ) -> dict[str, np.ndarray]:
    """`[num_examples, length]` int32 rows: every key of `packing.make_rows` for the example
    itself and `kl_<key>` for its KL companion (its prompt + the completion `kl_partners` gives),
    plus `label` `[num_examples, 1]` int32 (1 desirable, 0 undesirable). `length` is the longest
    row rounded up to a multiple of 8, at most seq_length."""
    partners = kl_partners(len(examples), batch_size)
    own = [_join(e, e, seq_length) for e in examples]
    companions = [_join(e, examples[p], seq_length) for e, p in zip(examples, partners)]
    longest = max(len(e.input_ids) for e in own + companions)
    length = min(seq_length, -(-longest // 8) * 8)
    rows = make_rows(own, length, pack=False)
    rows.update({f"kl_{key}": value for key, value in make_rows(companions, length, pack=False).items()})
    rows["label"] = np.array([[int(e.label)] for e in examples], np.int32)
    return rows


def unpaired_rows(records: Sequence[dict], tokenizer, chat_template: str | None, seq_length: int, batch_size: int,
                  source_name: str, locations: Sequence[str] | None = None
                  ) -> tuple[dict[str, np.ndarray], UnpairedStats]:
    """`(rows, stats)`: `tokenize_unpaired` then `make_unpaired_rows`."""
    examples, stats = tokenize_unpaired(records, tokenizer, chat_template, seq_length, source_name, locations)
    return make_unpaired_rows(examples, seq_length, batch_size), stats
