"""Rows from examples: every token once, segments never crossed, targets and masks shifted right."""
import numpy as np
import pytest

from easytune.data import BUILTIN_TEMPLATES, Example, make_rows, tokenize_records


def random_examples(num: int, max_length: int, seed: int = 0) -> list[Example]:
    """Examples whose tokens identify them: example k holds tokens 1000*(k+1) + position."""
    rng = np.random.default_rng(seed)
    examples = []
    for k in range(num):
        length = int(rng.integers(1, max_length + 1))
        examples.append(Example([1000 * (k + 1) + i for i in range(length)],
                                [int(m) for m in rng.integers(0, 2, length)]))
    return examples


def segments(rows):
    """Yield (row, start, end) for each segment, asserting segments are contiguous and numbered 1..k."""
    for row, segment_ids in enumerate(rows["segment_ids"]):
        used = segment_ids[segment_ids > 0]
        assert (segment_ids[len(used):] == 0).all(), "padding only at the end of a row"
        expected_id = 1
        start = 0
        while start < len(used):
            assert used[start] == expected_id
            end = start + int((used == expected_id).sum())
            assert (used[start:end] == expected_id).all(), "segments are contiguous"
            yield row, start, end
            start, expected_id = end, expected_id + 1


@pytest.mark.parametrize("pack", [True, False])
def test_rows_hold_every_example_once_with_shifted_targets(pack):
    seq_length = 32
    examples = random_examples(60, seq_length)
    rows = make_rows(examples, seq_length, pack)
    assert set(rows) == {"input_ids", "target_ids", "loss_mask", "segment_ids", "positions"}
    for array in rows.values():
        assert array.dtype == np.int32 and array.shape == (len(rows["input_ids"]), seq_length)

    found = []
    for row, start, end in segments(rows):
        ids = rows["input_ids"][row, start:end].tolist()
        k = ids[0] // 1000 - 1
        example = examples[k]
        assert ids == example.input_ids
        found.append(k)
        np.testing.assert_array_equal(rows["positions"][row, start:end], np.arange(end - start))
        # Targets never cross into the next segment: the last token of a segment has none.
        assert rows["target_ids"][row, start:end].tolist() == example.input_ids[1:] + [0]
        assert rows["loss_mask"][row, start:end].tolist() == example.loss_mask[1:] + [0]
    assert sorted(found) == list(range(len(examples)))  # each exactly once

    padding = rows["segment_ids"] == 0
    for key in ("input_ids", "target_ids", "loss_mask", "positions"):
        assert (rows[key][padding] == 0).all()
    assert rows["loss_mask"].sum() == sum(sum(e.loss_mask[1:]) for e in examples)
    if pack:
        total = sum(len(e.input_ids) for e in examples)
        assert len(rows["input_ids"]) < len(examples) and len(rows["input_ids"]) >= -(-total // seq_length)
    else:
        assert len(rows["input_ids"]) == len(examples) and rows["segment_ids"].max() == 1


def test_best_fit_decreasing_by_hand():
    # Lengths 8, 6, 3, 1 into rows of 10: 8 -> A (2 free), 6 -> B (4 free), 3 -> B (A is too full),
    # 1 -> B, the fullest row it fits (first fit would put it in A).
    examples = [Example([length] * length, [1] * length) for length in (3, 8, 1, 6)]
    rows = make_rows(examples, 10, pack=True)
    assert rows["input_ids"].tolist() == [[8] * 8 + [0] * 2, [6] * 6 + [3] * 3 + [1]]
    assert rows["segment_ids"].tolist() == [[1] * 8 + [0] * 2, [1] * 6 + [2] * 3 + [3]]
    assert rows["positions"].tolist() == [list(range(8)) + [0, 0], list(range(6)) + [0, 1, 2, 0]]
    again = make_rows(examples, 10, pack=True)
    assert all((rows[k] == again[k]).all() for k in rows)


def test_packed_and_unpacked_rows_agree():
    examples = random_examples(25, 16, seed=3)
    packed, unpacked = make_rows(examples, 16, pack=True), make_rows(examples, 16, pack=False)

    def by_first_token(rows):
        out = {}
        for row, start, end in segments(rows):
            out[int(rows["input_ids"][row, start])] = {k: rows[k][row, start:end].tolist() for k in rows if k != "segment_ids"}
        return out
    assert by_first_token(packed) == by_first_token(unpacked)
    np.testing.assert_array_equal(unpacked["input_ids"][:, 0], [e.input_ids[0] for e in examples])


def test_loss_mask_total_matches_tokenized_stats(tokenizer):
    records = [{"messages": [{"role": "user", "content": f"Count to {n}."},
                             {"role": "assistant", "content": " ".join(map(str, range(1, n + 1)))}]} for n in range(1, 30)]
    examples, stats = tokenize_records(records, tokenizer, BUILTIN_TEMPLATES["chatml"], 64, "counting")
    for pack in (True, False):
        assert make_rows(examples, 64, pack)["loss_mask"].sum() == stats.num_trainable_tokens


def test_overlong_example_is_an_error():
    with pytest.raises(ValueError, match=r"example 1 has 9 tokens.*seq_length=8"):
        make_rows([Example([1, 2], [0, 1]), Example([1] * 9, [1] * 9)], 8, pack=True)
