"""Examples -> fixed-shape rows for the model: `[num_rows, seq_length]` int32 arrays.

Each row holds one example (pack=False) or several (pack=True), told apart by segment ids so that
attention and the loss never cross an example boundary.

Tokens live in flat arrays (`TokenStore`: numpy views of Arrow buffers, memory-mapped from the
tokenized cache, or of one in-memory array), and `PackedRows` lays rows out from them only when a
batch asks for them: a host holds the packing (a few integers per example), not `[rows, seq]` arrays
of the whole dataset.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from easytune.data.tokenize import Example

ROW_KEYS = ("input_ids", "target_ids", "loss_mask", "segment_ids", "positions")


class TokenStore:
    """Examples as slices of flat token arrays: example e is `ids[chunk[e]][start[e]:start[e] + length[e]]`
    (and the same slice of `masks`). `ids`/`masks`: one array per chunk (an Arrow chunk's values)."""

    def __init__(self, ids: list[np.ndarray], masks: list[np.ndarray], chunk: np.ndarray, start: np.ndarray,
                 length: np.ndarray):
        self.ids, self.masks = ids, masks
        self.chunk, self.start, self.length = chunk, start, length

    @classmethod
    def from_examples(cls, examples: Sequence[Example]) -> "TokenStore":
        length = np.array([len(e.input_ids) for e in examples], np.int64)
        start = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64) if len(examples) else length
        ids = np.fromiter((t for e in examples for t in e.input_ids), np.int32, int(length.sum()))
        masks = np.fromiter((t for e in examples for t in e.loss_mask), np.int8, int(length.sum()))
        return cls([ids], [masks], np.zeros(len(examples), np.int32), start, length)

    def __len__(self) -> int:
        return len(self.length)

    def example(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        c, s = self.chunk[e], self.start[e]
        stop = s + self.length[e]
        return self.ids[c][s:stop], self.masks[c][s:stop]


class PackedRows:
    """Rows of `seq_length` tokens over a `TokenStore`: row r holds the examples
    `members[offsets[r]:offsets[r + 1]]`, in order. `take(indices)` builds the rows' arrays (see
    `make_rows`); `num_rows` counts them. Deterministic: the layout depends only on the lengths."""

    def __init__(self, store: TokenStore, seq_length: int, pack: bool):
        length = store.length
        if len(length) and not (length.min() > 0 and length.max() <= seq_length):
            bad = int(np.flatnonzero((length <= 0) | (length > seq_length))[0])
            raise ValueError(f"example {bad} has {int(length[bad])} tokens; expected 1..seq_length={seq_length} "
                             f"(truncate first).")
        self.store, self.seq_length = store, seq_length
        if pack:
            members = best_fit_decreasing(length, seq_length)
            self.offsets = np.concatenate([[0], np.cumsum([len(m) for m in members])]).astype(np.int64)
            self.members = np.fromiter((i for m in members for i in m), np.int64, len(length))
        else:
            self.offsets = np.arange(len(length) + 1, dtype=np.int64)
            self.members = np.arange(len(length), dtype=np.int64)

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    def __len__(self) -> int:
        return self.num_rows

    def take(self, indices) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        rows = {key: np.zeros((len(indices), self.seq_length), np.int32) for key in ROW_KEYS}
        for out, row in enumerate(indices):
            begin = 0
            for segment, e in enumerate(self.members[self.offsets[row]:self.offsets[row + 1]], start=1):
                ids, mask = self.store.example(e)
                end = begin + len(ids)
                rows["input_ids"][out, begin:end] = ids
                rows["target_ids"][out, begin:end - 1] = ids[1:]
                rows["loss_mask"][out, begin:end - 1] = mask[1:]
                rows["segment_ids"][out, begin:end] = segment
                rows["positions"][out, begin:end] = np.arange(len(ids))
                begin = end
        return rows


def make_rows(examples: Sequence[Example], seq_length: int, pack: bool) -> dict[str, np.ndarray]:
    """Lay `examples` out in rows of `seq_length` tokens. Returns int32 arrays `[num_rows, seq_length]`:

    input_ids    the tokens, 0 on padding
    target_ids   the next token of the same segment (input_ids[i + 1]); 0 at a segment's last token and on padding
    loss_mask    1 where target i is trained (example.loss_mask[i + 1]); 0 at a segment's last token and on padding
    segment_ids  1..k for the k examples of a row, 0 on padding
    positions    0.. within each segment, 0 on padding

    pack=True packs examples by best-fit decreasing (deterministic); pack=False gives one example per row.
    """
    for number, example in enumerate(examples):
        if not 0 < len(example.input_ids) <= seq_length or len(example.loss_mask) != len(example.input_ids):
            raise ValueError(f"example {number} has {len(example.input_ids)} tokens and {len(example.loss_mask)} "
                             f"mask entries; expected 1..seq_length={seq_length} of each (truncate first).")
    rows = PackedRows(TokenStore.from_examples(examples), seq_length, pack)
    return rows.take(np.arange(rows.num_rows))


def num_rows(rows) -> int:
    """Rows in `rows`: a dict of `[num_rows, ...]` arrays or a `PackedRows`."""
    if isinstance(rows, dict):
        return len(next(iter(rows.values())))
    return rows.num_rows


def take_rows(rows, indices) -> dict[str, np.ndarray]:
    """The rows at `indices` of a dict of arrays or a `PackedRows`, as a dict of arrays."""
    if isinstance(rows, dict):
        return {key: values[indices] for key, values in rows.items()}
    return rows.take(indices)


def best_fit_decreasing(lengths, seq_length: int) -> list[list[int]]:
    """Example indices per row: longest first, each into the fullest row it still fits in.

    Ties go to the earlier example and the earlier row, so the packing depends only on the lengths.
    """
    lengths = np.asarray(lengths, np.int64)
    order = np.lexsort((np.arange(len(lengths)), -lengths))  # longest first, ties by index
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (free tokens, row), sorted: the best fit is the first that fits
    for index, length in zip(order.tolist(), lengths[order].tolist()):
        slot = bisect.bisect_left(open_rows, (length, -1))
        if slot < len(open_rows):
            free, row = open_rows.pop(slot)
        else:
            free, row = seq_length, len(rows)
            rows.append([])
        rows[row].append(index)
        if free - length > 0:
            bisect.insort(open_rows, (free - length, row))
    return rows
