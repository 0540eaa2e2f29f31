"""A deterministic, resumable iterator of batches over rows from `make_rows`."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from easytune.data.packing import num_rows, take_rows


class BatchIterator:
    """Yields dicts of `[batch_size, seq_length]` arrays, epoch after epoch, forever.

    Epoch e visits the rows in the order `np.random.default_rng([seed, e]).permutation(num_rows)`
    (or in order, shuffle=False), so a run resumed from `state()` sees the same batches as one that
    never stopped. drop_last=True skips the final partial batch of each epoch; drop_last=False fills
    it out with all-padding rows (segment 0, loss_mask 0), keeping the shape fixed for jit.
    """

    def __init__(self, rows, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = True):
        """rows: a dict of `[num_rows, ...]` arrays, or a `PackedRows` (rows built per batch)."""
        self.rows = rows
        self.num_rows = num_rows(rows)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if self.num_rows < batch_size:
            raise ValueError(f"the data has {self.num_rows} rows, fewer than batch_size={batch_size}; "
                             f"lower the batch size or add data.")
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = None, None

    @property
    def steps_per_epoch(self) -> int:
        full, partial = divmod(self.num_rows, self.batch_size)
        return full + (0 if self.drop_last or partial == 0 else 1)

    def _layout(self) -> dict:
        """What a position means: the same index in another layout would be other data."""
        return {"batch_size": self.batch_size, "seed": self.seed, "num_rows": self.num_rows,
                "shuffle": self.shuffle, "drop_last": self.drop_last}

    def state(self) -> dict:
        """Where the next batch comes from ("epoch", "index": batch index within the epoch), and
        the layout that position refers to."""
        return {"epoch": self.epoch, "index": self.index, **self._layout()}

    def restore(self, state: dict) -> None:
        check_layout(state, self._layout())
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.steps_per_epoch:
            raise ValueError(f"invalid iterator state {state}: this data has {self.steps_per_epoch} batches per epoch.")
        self.epoch, self.index = epoch, index
        self._roll_over()

    def _roll_over(self) -> None:
        if self.index >= self.steps_per_epoch:  # keep state() canonical: the end of e is the start of e + 1
            self.epoch, self.index = self.epoch + 1, 0

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
            else:
                self._order = np.arange(self.num_rows)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        chosen = self._epoch_order()[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        self._roll_over()
        return pad_rows(take_rows(self.rows, chosen), self.batch_size)  # drop_last=False: the last batch padded


def check_layout(state: dict, layout: dict) -> None:
    """Refuse to resume a data position saved under another layout (`state`'s entries for the keys
    of `layout`, this run's): the same position would be other data."""
    for key, value in layout.items():
        if key in state and state[key] != value:
            raise ValueError(f"cannot resume this data position: the checkpoint was written with {key}="
                             f"{state[key]!r}, this run has {key}={value!r}; resume with the same data and "
                             f"batch settings, or start a new --output_dir.")


def pad_rows(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """`batch` filled out to `batch_size` rows with all-zero rows (segment 0, loss_mask 0: no loss)."""
    missing = batch_size - len(next(iter(batch.values())))
    if not missing:
        return batch
    return {key: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for key, v in batch.items()}


def count_tokens(rows: dict[str, np.ndarray]) -> int:
    """Real (non-padding) tokens in host rows: every `segment_ids` array (SFT's, or a preference
    pair's `chosen_segment_ids` and `rejected_segment_ids`)."""
    return sum(int((v > 0).sum()) for k, v in rows.items() if k == "segment_ids" or k.endswith("_segment_ids"))


def eval_batches(rows, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """All eval rows in order, `batch_size` at a time; the last batch is padded with rows whose
    loss_mask is 0 (so every device gets a full batch and padding adds nothing). Rows: any dict of
    `[num_rows, k]` arrays (SFT's, or preference pairs'), or a `PackedRows`."""
    total = num_rows(rows)
    for start in range(0, total, batch_size):
        yield pad_rows(take_rows(rows, np.arange(start, min(start + batch_size, total))), batch_size)
