"""The SFT data pipeline (pure Python + numpy): records -> conversations -> masked tokens -> rows -> batches.

    records = load_records("train.jsonl")                      # or make_task_records(1000, seed=0)
    template = resolve_chat_template(tokenizer, "chatml")      # None: the tokenizer's own
    examples, stats = tokenize_records(records, tokenizer, template, seq_length=2048, source_name="train.jsonl")
    rows = make_rows(examples, seq_length=2048, pack=True)     # int32 [num_rows, 2048] arrays
    rows, stats = tokenized_rows("train.jsonl", tokenizer, template, 2048, pack=True)  # the same, tokenized in
                                                               # parallel, cached, rows built per batch
    for batch in BatchIterator(rows, batch_size=8, seed=0): ...

Encoder-decoders (T5) train on input/target records instead: see `easytune.data.seq2seq`.
Preference pairs (DPO, reward models) go through `preference`: load_pairs -> pair_rows (tokenize_pairs,
make_pair_rows); task_pairs builds pairs from the verifiable tasks.
"""
from easytune.data.batching import BatchIterator, count_tokens, eval_batches
from easytune.data.formats import FORMATS, detect_format, load_located_records, load_records, prefetch, to_messages
from easytune.data.cache import tokenized_rows
from easytune.data.packing import ROW_KEYS, PackedRows, TokenStore, make_rows, num_rows, take_rows
from easytune.data.preference import (PreferenceStats, TokenizedPair, load_pairs, make_pair_rows, pair_rows,
                                      task_pairs, task_pairs_from_model, tokenize_pairs)
from easytune.data.streaming import StreamingBatches, StreamingRows
from easytune.data.seq2seq import SEQ2SEQ_ROW_KEYS, Seq2SeqExample, make_seq2seq_rows, tokenize_seq2seq_records
from easytune.data.tasks import TASKS, accuracy, exact_match, make_task_records, train_and_heldout, with_examples
from easytune.data.templates import BUILTIN_TEMPLATES, adopt_chat_template, render_ids, resolve_chat_template
from easytune.data.tokenize import DataStats, Example, tokenize_conversation, tokenize_records, tokenize_text

__all__ = [
    "BatchIterator", "count_tokens", "eval_batches", "FORMATS", "detect_format", "load_located_records", "load_records", "prefetch", "to_messages", "ROW_KEYS",
    "make_rows", "PackedRows", "TokenStore", "num_rows", "take_rows", "tokenized_rows", "StreamingRows", "StreamingBatches",
    "SEQ2SEQ_ROW_KEYS", "Seq2SeqExample", "make_seq2seq_rows", "tokenize_seq2seq_records",
    "TASKS", "with_examples", "accuracy", "exact_match", "make_task_records", "train_and_heldout", "BUILTIN_TEMPLATES",
    "adopt_chat_template", "render_ids", "resolve_chat_template", "DataStats", "Example", "tokenize_conversation",
    "tokenize_records", "tokenize_text",
    "PreferenceStats", "TokenizedPair", "load_pairs", "make_pair_rows", "pair_rows", "task_pairs",
    "task_pairs_from_model", "tokenize_pairs",
]
