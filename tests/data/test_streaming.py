"""`--streaming` (`easytune.data.streaming`): batches built buffer by buffer as training goes hold
every trainable example of an epoch exactly once, tokenized as the in-memory path does; a position
saved mid-stream (and across epochs) resumes to the same batches; a dataset split streams too; bad
input is one sentence."""
import json
import os

import numpy as np
import pytest

from easytune import data
from easytune.data.streaming import StreamingRows

from data.test_cache import conversations, write_jsonl


@pytest.fixture(scope="module")
def template(tokenizer):
    return data.resolve_chat_template(tokenizer, None)


def segments(batch):
    """Each packed segment of a batch as (input_ids, trained targets) tuples."""
    out = []
    for row in range(len(batch["input_ids"])):
        for segment in range(1, int(batch["segment_ids"][row].max(initial=0)) + 1):
            where = batch["segment_ids"][row] == segment
            out.append((tuple(batch["input_ids"][row][where]), tuple(batch["loss_mask"][row][where])))
    return out


def test_one_epoch_holds_every_example_once(tokenizer, template, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", conversations(150), blank_every=30)
    located = data.load_located_records(path)
    examples, stats = data.tokenize_records([r for r, _ in located], tokenizer, template, 64, path,
                                            [w for _, w in located])
    expected = sorted((tuple(e.input_ids), tuple([*e.loss_mask[1:], 0])) for e in examples)
    stream = StreamingRows(path, tokenizer, template, 64, buffer_records=40)
    batches = stream.batches(batch_size=8, seed=0)
    seen = []
    while batches.epoch == 0:
        seen.extend(segments(next(batches)))
    assert sorted(seen) == expected
    assert batches.state()["start"] == 0 and batches.state()["epoch"] == 1


def test_a_saved_position_resumes_to_the_same_batches(tokenizer, template, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", conversations(60))
    stream = StreamingRows(path, tokenizer, template, 64, buffer_records=25)
    whole = stream.batches(batch_size=4, seed=3)
    batches = [next(whole) for _ in range(40)]  # several buffers and epochs
    assert whole.epoch >= 2
    for stop in (1, 7, 19, 33):
        run = stream.batches(batch_size=4, seed=3)
        for _ in range(stop):
            next(run)
        resumed = StreamingRows(path, tokenizer, template, 64, buffer_records=25).batches(batch_size=4, seed=3)
        resumed.restore(json.loads(json.dumps(run.state())))
        for expected in batches[stop:stop + 8]:
            got = next(resumed)
            for key in expected:
                np.testing.assert_array_equal(got[key], expected[key])
    other_seed = stream.batches(batch_size=4, seed=4)
    assert not all((next(other_seed)["input_ids"] == b["input_ids"]).all() for b in batches[:3])
    with pytest.raises(ValueError, match="checkpoint was written with batch_size=4, this run has batch_size=8"):
        stream.batches(batch_size=8, seed=3).restore(run.state())


def test_a_dataset_split_streams(tokenizer, template, tmp_path):
    folder = tmp_path / "hub"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", conversations(20))
    write_jsonl(folder / "test.jsonl", conversations(12, seed=5))
    stream = StreamingRows(f"{folder}:test", tokenizer, template, 64, buffer_records=5)
    batches = stream.batches(batch_size=2, seed=0)
    seen = []
    while batches.epoch == 0:
        seen.extend(segments(next(batches)))
    examples, _ = data.tokenize_records(conversations(12, seed=5), tokenizer, template, 64, "test")
    assert sorted(seen) == sorted((tuple(e.input_ids), tuple([*e.loss_mask[1:], 0])) for e in examples)
    with pytest.raises(ValueError, match="has no split 'validation'; its splits: "):
        StreamingRows(f"{folder}:validation", tokenizer, template, 64)


def test_bad_input_is_one_sentence(tokenizer, template, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", conversations(10))
    with pytest.raises(ValueError, match="not a mixture"):
        StreamingRows(f"{path}:0.5,{path}", tokenizer, template, 64)
    with open(path, "a") as f:
        f.write('{"messages": oops}\n')
    batches = StreamingRows(path, tokenizer, template, 64, buffer_records=100).batches(batch_size=2, seed=0)
    with pytest.raises(ValueError, match=f"{path} line 11: not valid JSON"):
        next(batches)


def test_the_sft_cli_streams_and_resumes_to_the_same_losses(tiny_chat_model, tmp_path):
    from conftest import logged, run_config

    from easytune import train_sft
    train = write_jsonl(tmp_path / "train.jsonl", conversations(48))
    flags = {"model": tiny_chat_model, "train_data": train, "seq_length": 64, "batch_size": 8, "total_steps": 6,
             "save_steps": 3, "log_steps": 1, "streaming": True, "streaming_buffer": 20, "export_hf": False,
             "async_checkpoints": False, "optimizer.schedule": "constant", "optimizer.warmup_ratio": 0.0}
    # a constant learning rate: the run stopped at 3 of 6 steps has the whole run's schedule
    whole, stopped = str(tmp_path / "whole"), str(tmp_path / "stopped")
    train_sft.run(run_config(train_sft.DEFAULTS, {**flags, "output_dir": whole}))
    train_sft.run(run_config(train_sft.DEFAULTS, {**flags, "output_dir": stopped, "total_steps": 3}))
    train_sft.run(run_config(train_sft.DEFAULTS, {**flags, "output_dir": stopped, "resume": True,
                                                   "resume_override": "total_steps"}))

    def losses(output_dir):
        return {r["step"]: r["loss"] for r in logged(output_dir) if "loss" in r}
    assert len(losses(whole)) == 6 and losses(stopped) == losses(whole)
    with pytest.raises(ValueError, match="--streaming needs --total_steps"):
        train_sft.run(run_config(train_sft.DEFAULTS, {**flags, "output_dir": str(tmp_path / "x"), "total_steps": 0}))
    assert os.path.isdir(whole)
