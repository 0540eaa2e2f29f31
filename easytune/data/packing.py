"""Examples -> fixed-shape rows for the model: `[num_rows, seq_length]` int32 arrays.

Each row holds one example (pack=False) or several (pack=True), told apart by segment ids so that
attention and the loss never cross an example boundary.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from easytune.data.tokenize import Example

ROW_KEYS = ("input_ids", "target_ids", "loss_mask", "segment_ids", "positions")


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
    row_members = _best_fit_decreasing(examples, seq_length) if pack else [[i] for i in range(len(examples))]
    rows = {key: np.zeros((len(row_members), seq_length), np.int32) for key in ROW_KEYS}
    for row, members in enumerate(row_members):
        start = 0
        for segment, index in enumerate(members, start=1):
            ids, mask = examples[index].input_ids, examples[index].loss_mask
            end = start + len(ids)
            rows["input_ids"][row, start:end] = ids
            rows["target_ids"][row, start:end - 1] = ids[1:]
            rows["loss_mask"][row, start:end - 1] = mask[1:]
            rows["segment_ids"][row, start:end] = segment
            rows["positions"][row, start:end] = np.arange(len(ids))
            start = end
    return rows


def _best_fit_decreasing(examples: Sequence[Example], seq_length: int) -> list[list[int]]:
    """Example indices per row: longest first, each into the fullest row it still fits in.

    Ties go to the earlier example and the earlier row, so the packing depends only on the lengths.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (free tokens, row), sorted: the best fit is the first that fits
    for index in order:
        length = len(examples[index].input_ids)
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
