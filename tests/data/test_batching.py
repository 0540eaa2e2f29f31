"""BatchIterator: seeded epoch permutations, and resuming from state() replays the same batches."""
import itertools

import numpy as np
import pytest

from easytune.data import BatchIterator


def numbered_rows(num_rows: int, seq_length: int = 4) -> dict:
    """Rows whose input_ids[:, 0] is the row number (plus one, so 0 stays padding)."""
    ids = np.arange(1, num_rows + 1, dtype=np.int32)[:, None] * np.ones(seq_length, np.int32)
    return {"input_ids": ids, "loss_mask": np.ones_like(ids), "segment_ids": np.ones_like(ids)}


def take(iterator, n):
    return [batch["input_ids"][:, 0].tolist() for batch in itertools.islice(iterator, n)]


def test_epochs_are_the_seeded_permutations():
    iterator = BatchIterator(numbered_rows(10), batch_size=3, seed=7)
    assert iterator.steps_per_epoch == 3
    batches = take(iterator, 6)
    for epoch in range(2):
        order = np.random.default_rng([7, epoch]).permutation(10) + 1
        assert batches[3 * epoch:3 * epoch + 3] == order[:9].reshape(3, 3).tolist()
    assert {k: iterator.state()[k] for k in ("epoch", "index")} == {"epoch": 2, "index": 0}
    assert batches[:3] != batches[3:]  # a new order each epoch


def test_determinism_and_seed():
    rows = numbered_rows(16)
    assert take(BatchIterator(rows, 4, seed=1), 10) == take(BatchIterator(rows, 4, seed=1), 10)
    assert take(BatchIterator(rows, 4, seed=1), 10) != take(BatchIterator(rows, 4, seed=2), 10)
    assert take(BatchIterator(rows, 4, seed=1, shuffle=False), 5) == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12],
                                                                      [13, 14, 15, 16], [1, 2, 3, 4]]


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4, 7])
def test_resume_replays_the_uninterrupted_run(stop_after):
    rows = numbered_rows(13)
    uninterrupted = take(BatchIterator(rows, 3, seed=5), 12)
    first = BatchIterator(rows, 3, seed=5)
    before = take(first, stop_after)
    state = dict(first.state())  # what a checkpoint stores
    resumed = BatchIterator(rows, 3, seed=5)
    resumed.restore(state)
    assert before + take(resumed, 12 - stop_after) == uninterrupted


def test_drop_last_false_pads_the_last_batch():
    iterator = BatchIterator(numbered_rows(5), batch_size=2, seed=0, shuffle=False, drop_last=False)
    assert iterator.steps_per_epoch == 3
    batches = list(itertools.islice(iterator, 3))
    assert [b["input_ids"][:, 0].tolist() for b in batches] == [[1, 2], [3, 4], [5, 0]]
    assert batches[2]["loss_mask"][1].sum() == 0 and batches[2]["segment_ids"][1].sum() == 0
    assert all(b["input_ids"].shape == (2, 4) for b in batches)


def test_too_few_rows_and_bad_state():
    with pytest.raises(ValueError, match="the data has 3 rows, fewer than batch_size=4"):
        BatchIterator(numbered_rows(3), batch_size=4, seed=0)
    with pytest.raises(ValueError, match="invalid iterator state"):
        BatchIterator(numbered_rows(8), batch_size=4, seed=0).restore({"epoch": 0, "index": 5})


def test_resuming_under_another_layout_is_refused():
    """The same batch index means other data under another batch size or seed."""
    state = BatchIterator(numbered_rows(16), batch_size=4, seed=1).state()
    with pytest.raises(ValueError, match="checkpoint was written with batch_size=4, this run has batch_size=2"):
        BatchIterator(numbered_rows(16), batch_size=2, seed=1).restore(state)
    with pytest.raises(ValueError, match="seed=1"):
        BatchIterator(numbered_rows(16), batch_size=4, seed=2).restore(state)
