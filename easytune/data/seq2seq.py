"""Seq2seq (encoder-decoder, T5) data: input/target records -> token ids -> paired encoder/decoder rows.

    located = load_located_records("train.jsonl")             # [(record, "train.jsonl line 3"), ...]
    examples, stats = tokenize_seq2seq_records(located, tokenizer, "input", "target", 512, 128)
    rows = make_seq2seq_rows(examples, 512, 128, decoder_start_token_id=0, pack=True)

A record is `{"input": "...", "target": "..."}` (field names are arguments). The encoder reads the
input as the tokenizer encodes it (T5 tokenizers end it with `</s>`), exactly as `Model.generate`
encodes a prompt; the decoder is trained, by teacher forcing, on the target followed by EOS.
"""
from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

import numpy as np

from easytune.data.formats import _json_type
from easytune.data.tokenize import DataStats

ENCODER_ROW_KEYS = ("input_ids", "segment_ids", "positions")  # [rows, input_length]
DECODER_ROW_KEYS = ("decoder_input_ids", "target_ids", "loss_mask", "decoder_segment_ids", "decoder_positions")
SEQ2SEQ_ROW_KEYS = ENCODER_ROW_KEYS + DECODER_ROW_KEYS


@dataclasses.dataclass
class Seq2SeqExample:
    """One tokenized pair: the encoder's `input_ids` and the decoder's `target_ids` (ending in EOS
    unless truncated); every target token is trained."""

    input_ids: list[int]
    target_ids: list[int]


def record_text(record: dict, field: str, where: str, input_field: str, target_field: str) -> str:
    if field not in record:
        raise ValueError(f"{where}: missing {field!r}; a seq2seq record needs the fields {input_field!r} and "
                         f"{target_field!r} (set them with --seq2seq.input_field/--seq2seq.target_field), this one "
                         f"has {sorted(record)}.")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: {field!r} must be a string, got {_json_type(value)}.")
    if not value.strip():
        raise ValueError(f"{where}: {field!r} is empty.")
    return value


def tokenize_seq2seq_records(located: Sequence[tuple[dict, str]], tokenizer, input_field: str, target_field: str,
                             input_length: int, target_length: int) -> tuple[list[Seq2SeqExample], DataStats]:
    """Tokenize `(record, where)` pairs; inputs right-truncated to `input_length`, targets (plus
    EOS) to `target_length`. Errors name the record's place (`where`)."""
    if not located:
        raise ValueError("the seq2seq data has no records.")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; seq2seq targets end with one so that generation stops.")
    stats = DataStats(num_records=len(located))
    examples = []
    for record, where in located:
        source = record_text(record, input_field, where, input_field, target_field)
        target = record_text(record, target_field, where, input_field, target_field)
        input_ids = list(tokenizer(source)["input_ids"])
        target_ids = list(tokenizer(target)["input_ids"])
        if not target_ids or target_ids[-1] != eos:
            target_ids.append(eos)
        if not input_ids:
            raise ValueError(f"{where}: {input_field!r} tokenizes to no tokens.")
        truncated = len(input_ids) > input_length or len(target_ids) > target_length
        example = Seq2SeqExample(input_ids[:input_length], target_ids[:target_length])
        examples.append(example)
        stats.num_truncated += truncated
        stats.num_tokens += len(example.input_ids) + len(example.target_ids)
        stats.num_trainable_tokens += len(example.target_ids)
    stats.num_kept = len(examples)
    return examples, stats


def make_seq2seq_rows(examples: Sequence[Seq2SeqExample], input_length: int, target_length: int,
                      decoder_start_token_id: int, pack: bool) -> dict[str, np.ndarray]:
    """Lay examples out in paired rows: int32 arrays `[num_rows, input_length]` for the encoder
    (input_ids, segment_ids, positions) and `[num_rows, target_length]` for the decoder:

    decoder_input_ids    each segment's targets shifted right, starting with decoder_start_token_id
    target_ids           the targets (0 on padding)
    loss_mask            1 on every target token
    decoder_segment_ids  k for the k-th example of the row, as on the encoder side (0 = padding)
    decoder_positions    0.. within each segment

    pack=True puts several examples in a row (best fit on the encoder side among the rows whose
    decoder side also has room; deterministic); pack=False one per row.
    """
    for number, example in enumerate(examples):
        if not (0 < len(example.input_ids) <= input_length and 0 < len(example.target_ids) <= target_length):
            raise ValueError(f"example {number} has {len(example.input_ids)} input and {len(example.target_ids)} "
                             f"target tokens; expected 1..{input_length} and 1..{target_length} (truncate first).")
    members = _pack(examples, input_length, target_length) if pack else [[i] for i in range(len(examples))]
    rows = {key: np.zeros((len(members), input_length if key in ENCODER_ROW_KEYS else target_length), np.int32)
            for key in SEQ2SEQ_ROW_KEYS}
    for row, indices in enumerate(members):
        start_in = start_t = 0
        for segment, index in enumerate(indices, start=1):
            source, target = examples[index].input_ids, examples[index].target_ids
            end_in, end_t = start_in + len(source), start_t + len(target)
            rows["input_ids"][row, start_in:end_in] = source
            rows["segment_ids"][row, start_in:end_in] = segment
            rows["positions"][row, start_in:end_in] = np.arange(len(source))
            rows["decoder_input_ids"][row, start_t:end_t] = [decoder_start_token_id] + target[:-1]
            rows["target_ids"][row, start_t:end_t] = target
            rows["loss_mask"][row, start_t:end_t] = 1
            rows["decoder_segment_ids"][row, start_t:end_t] = segment
            rows["decoder_positions"][row, start_t:end_t] = np.arange(len(target))
            start_in, start_t = end_in, end_t
    return rows


def _pack(examples: Sequence[Seq2SeqExample], input_length: int, target_length: int) -> list[list[int]]:
    """Example indices per row: longest input first, each into the row with the least encoder room
    that still fits both its input and its target."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), -len(examples[i].target_ids), i))
    rows: list[list[int]] = []
    free_target: list[int] = []
    open_rows: list[tuple[int, int]] = []  # (free encoder tokens, row), sorted
    for index in order:
        need_in, need_t = len(examples[index].input_ids), len(examples[index].target_ids)
        slot = bisect.bisect_left(open_rows, (need_in, -1))
        while slot < len(open_rows) and free_target[open_rows[slot][1]] < need_t:
            slot += 1
        if slot < len(open_rows):
            free_in, row = open_rows.pop(slot)
        else:
            free_in, row = input_length, len(rows)
            rows.append([])
            free_target.append(target_length)
        rows[row].append(index)
        free_target[row] -= need_t
        if free_in - need_in > 0 and free_target[row] > 0:
            bisect.insort(open_rows, (free_in - need_in, row))
    return rows
