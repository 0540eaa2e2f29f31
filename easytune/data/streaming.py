"""`--streaming`: SFT data read, tokenized and packed as training goes, for data larger than a
host's disk or memory, or to start training before a large dataset has been tokenized.

    stream = StreamingRows("org/big-chat:train", tokenizer, template, seq_length=2048, buffer_records=10000)
    batches = stream.batches(batch_size=8, seed=0)   # the BatchIterator interface: next, state, restore

The stream (a `datasets` split opened with `streaming=True`, or a .jsonl file read line by line) is
cut into buffers of `buffer_records` records. Each buffer is tokenized (`tokenize.tokenize_chunk`, as
the cached path), packed best-fit (segment ids, as `PackedRows`), its rows shuffled by (seed, epoch,
buffer), and served `batch_size` rows at a time; a buffer's last batch is filled out with padding rows
(no loss) rather than carrying rows over, so that a position is (epoch, first record of the buffer,
batch within it). The stream stays open from buffer to buffer; a resume reopens it and reads up to
that record without tokenizing it, rebuilds the buffer and continues with the same batches. When
the stream ends, the next epoch starts it again.

Every process reads the whole stream and builds the same batches (each feeds its devices' rows, as
with the cached path); sharding a stream between hosts is not done. `--total_steps` is required: a
stream's length is not known ahead.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import numpy as np

from easytune.data import formats, sources
from easytune.data.batching import check_layout, pad_rows
from easytune.data.packing import PackedRows, TokenStore
from easytune.data.tokenize import tokenize_chunk


class StreamingRows:
    """A data spec read as a stream (see the module doc): one local .jsonl file or one dataset split."""

    def __init__(self, source: str, tokenizer, chat_template: str | None, seq_length: int,
                 buffer_records: int = 10000, pack: bool = True, train_on: str = "assistant", split: str = "train"):
        source = formats.localize(source)
        path = os.path.expanduser(source)
        parts = [sources.SourcePart(source, text=source)] if os.path.isfile(path) else sources.parse_source(source)
        if len(parts) != 1 or parts[0].weight is not None:
            raise ValueError(f"--streaming reads one file or one dataset split, not a mixture ({source!r}); drop "
                             f"--streaming to mix (the parts are then tokenized once and cached).")
        if buffer_records < 1:
            raise ValueError(f"--streaming_buffer must be >= 1 record, got {buffer_records}.")
        formats.forget_prefetched(source)  # read as a stream, not from what the driver's check read ahead
        self.part, self.split = parts[0], split
        self.tokenizer, self.template, self.train_on = tokenizer, chat_template, train_on
        self.seq_length, self.buffer_records, self.pack = seq_length, buffer_records, pack
        self._records(0)  # a missing file, split or subset: now, not at the first step

    def _records(self, skip: int) -> Iterator[tuple[dict, str]]:
        """`(record, where)` from the stream's start, the first `skip` records read and passed over."""
        path = os.path.expanduser(self.part.name)
        if os.path.isfile(path):
            if not path.endswith(".jsonl"):
                raise ValueError(f"--streaming reads .jsonl files line by line; {self.part.name} is not one (drop "
                                 f"--streaming: it is read whole and cached).")

            def lines():
                with open(path, "rb") as f:
                    for number, raw in enumerate(f, start=1):
                        record = formats.parse_line(raw, path, number) if raw.strip() else None
                        if record is not None:
                            yield record, f"{path} line {number}"
            return itertools.islice(lines(), skip, None)
        if not os.path.isdir(path) and formats.names_a_file(path):
            raise FileNotFoundError(f"data file {self.part.name!r} does not exist.")
        dataset, label = sources.open_dataset_split(self.part, self.split, streaming=True)
        if skip:
            dataset = dataset.skip(skip)
        return ((dict(record), f"{label} record {skip + i}") for i, record in enumerate(dataset, start=1))

    def buffer(self, records_from: Iterator[tuple[dict, str]]) -> tuple[PackedRows | None, int]:
        """`(rows of the next `buffer_records` records of `records_from` (an iterator from
        `_records`), or None when no example of them trains (or the stream has ended), records read)`."""
        records, wheres = [], []
        for record, where in itertools.islice(records_from, self.buffer_records):
            records.append(record)
            wheres.append(where)
        examples = [example for example, _ in tokenize_chunk(records, wheres, self.tokenizer, self.template,
                                                             self.seq_length, self.train_on)
                    if example.num_trainable_targets]
        if not examples:
            return None, len(records)
        return PackedRows(TokenStore.from_examples(examples), self.seq_length, self.pack), len(records)

    def batches(self, batch_size: int, seed: int) -> "StreamingBatches":
        return StreamingBatches(self, batch_size, seed)


class StreamingBatches:
    """`BatchIterator`'s interface over a `StreamingRows`: dicts of `[batch_size, seq_length]` arrays,
    forever; `state()` / `restore()` give an exact resume."""

    steps_per_epoch = None  # not known ahead

    def __init__(self, stream: StreamingRows, batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.stream, self.batch_size, self.seed = stream, batch_size, seed
        self.epoch, self.start, self.index = 0, 0, 0
        self._rows, self._read, self._order = None, 0, None
        self._next_records = None  # the stream, positioned after the buffer in use (read on, not reopened)

    def _layout(self) -> dict:
        return {"batch_size": self.batch_size, "seed": self.seed, "streaming_buffer": self.stream.buffer_records,
                "seq_length": self.stream.seq_length, "pack": self.stream.pack}

    def state(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "index": self.index, **self._layout()}

    def restore(self, state: dict) -> None:
        if "start" not in state:
            raise ValueError("cannot resume this data position: the checkpoint was not written with --streaming; "
                             "resume with the run's own data settings, or start a new --output_dir.")
        check_layout(state, self._layout())
        self.epoch, self.start, self.index = int(state["epoch"]), int(state["start"]), int(state["index"])
        self._rows, self._next_records = None, None

    def _load(self) -> None:
        """The buffer at (epoch, start), stepping over buffers with nothing to train and into the
        next epoch when the stream ends."""
        wrapped = False
        while True:
            if self._next_records is None:  # (re)open at this position: a resume, a new epoch
                self._next_records = self.stream._records(self.start)
            rows, read = self.stream.buffer(self._next_records)
            if rows is not None:
                self._rows, self._read = rows, read
                rng = np.random.default_rng([self.seed, self.epoch, self.start])
                self._order = rng.permutation(rows.num_rows)
                return
            if read == 0:  # the stream ended: the next epoch
                if wrapped or self.start == 0:
                    raise ValueError(f"{self.stream.part.text} has no records with trainable tokens after "
                                     f"truncation to seq_length={self.stream.seq_length}.")
                self.epoch, self.start, self.index, wrapped = self.epoch + 1, 0, 0, True
                self._next_records = None
                continue
            self.start, self.index = self.start + read, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._rows is None:
            self._load()
        chosen = self._order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        batch = pad_rows(self._rows.take(chosen), self.batch_size)  # the buffer's last batch is padded
        self.index += 1
        if self.index * self.batch_size >= self._rows.num_rows:  # the next buffer
            self.start, self.index, self._rows = self.start + self._read, 0, None
            if self._read < self.stream.buffer_records:  # a short buffer is the stream's last: the next epoch
                self.epoch, self.start, self._next_records = self.epoch + 1, 0, None
        return batch
