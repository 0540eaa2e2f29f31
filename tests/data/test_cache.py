"""Tokenize once (`easytune.data.cache`): the parallel, cached, array-backed path gives exactly the
rows and counts of the in-memory path (`tokenize_records` + `make_rows`, one record at a time), reads
the cache instead of tokenizing again, locates bad records from its worker processes, and on two
real processes tokenizes each record once."""
import json
import os
import sys

import numpy as np
import pytest

from easytune import data
from easytune.data import cache


def conversations(n, seed=0):
    """Chat records of 1-3 turns with a system prompt, some long enough to be truncated at 64
    tokens, and tool calls in some (the one-at-a-time path inside a batch)."""
    rng = np.random.default_rng(seed)
    words = "the a of to and in is it you that he was for on are with as his they be at one have this".split()
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "You are terse."}] if i % 3 else []
        for _ in range(int(rng.integers(1, 4))):
            messages.append({"role": "user", "content": " ".join(rng.choice(words, int(rng.integers(2, 30))))})
            messages.append({"role": "assistant", "content": " ".join(rng.choice(words, int(rng.integers(1, 40))))})
        record = {"messages": messages}
        if i % 17 == 5:
            record["tools"] = [{"type": "function", "function": {"name": "lookup", "description": "Look up a word.",
                                                                  "parameters": {"type": "object", "properties": {}}}}]
        out.append(record)
    return out


def write_jsonl(path, records, blank_every=0):
    with open(path, "w") as f:
        for i, record in enumerate(records):
            f.write(json.dumps(record) + "\n")
            if blank_every and i % blank_every == 0:
                f.write("\n" if i % 2 else "  \r\n")  # blank and whitespace-only lines are not records
    return str(path)


def in_memory(spec, tokenizer, template, seq_length, pack, train_on="assistant"):
    located = data.load_located_records(spec)
    examples, stats = data.tokenize_records([r for r, _ in located], tokenizer, template, seq_length, spec,
                                            [w for _, w in located], train_on=train_on)
    return data.make_rows(examples, seq_length, pack), stats


def all_rows(rows):
    return rows.take(np.arange(rows.num_rows))


def assert_same_rows(expected, rows):
    got = all_rows(rows)
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


@pytest.fixture(scope="module")
def template(tokenizer):
    return data.resolve_chat_template(tokenizer, None)


@pytest.mark.parametrize("pack,train_on", [(True, "assistant"), (False, "all")])
def test_parallel_tokenization_equals_the_in_memory_path(tokenizer, template, tmp_path, pack, train_on):
    train = write_jsonl(tmp_path / "train.jsonl", conversations(300), blank_every=40)
    other = write_jsonl(tmp_path / "other.jsonl", conversations(90, seed=1))
    json_file = tmp_path / "items.json"
    json_file.write_text(json.dumps(conversations(40, seed=2)))
    for spec in (train, f"{train}:0.5,{other}:200", f"{json_file}:0.25,{other}"):
        expected, expected_stats = in_memory(spec, tokenizer, template, 64, pack, train_on)
        rows, stats = cache.tokenized_rows(spec, tokenizer, template, 64, pack, train_on=train_on, num_proc=2,
                                           cache_dir="")
        assert stats == expected_stats
        assert stats.num_truncated > 0 and stats.num_kept >= stats.num_records // 2
        assert_same_rows(expected, rows)


def test_conversations_are_tokenized_together(tokenizer, template, monkeypatch):
    """The batched path serves conversations without tools itself: with the one-at-a-time path
    broken, a chunk of them still tokenizes, to what that path gives."""
    from easytune.data import tokenize
    records = [r for r in conversations(40) if "tools" not in r]
    wheres = [f"record {i}" for i in range(len(records))]
    expected = tokenize.tokenize_chunk(records, wheres, tokenizer, template, 64)

    def broken(*args, **kwargs):
        raise AssertionError("tokenized one at a time")
    monkeypatch.setattr(tokenize, "tokenize_conversation", broken)
    assert tokenize.tokenize_chunk(records, wheres, tokenizer, template, 64) == expected


@pytest.mark.parametrize("text", [
    "",                                   # empty
    "\n\n  \n\r\n",                          # blank lines only
    "{A}\r\n{B}\r\n\r\n{A}",                  # CRLF, a blank CRLF line, no trailing newline
    "{A}\n\r\n\r{B}\n\n",                       # a one-byte carriage-return line... and a record after "\r"
])
def test_line_edges_match_the_in_memory_reader(tokenizer, template, tmp_path, text):
    a, b = (json.dumps(r) for r in conversations(2, seed=4))
    path = tmp_path / "edges.jsonl"
    path.write_bytes(text.replace("{A}", a).replace("{B}", b).encode())
    try:
        expected = in_memory(str(path), tokenizer, template, 64, True)
    except ValueError as e:
        with pytest.raises(ValueError, match="has no records"):
            cache.tokenized_rows(str(path), tokenizer, template, 64, True, cache_dir="")
        assert "has no records" in str(e)
        return
    rows, stats = cache.tokenized_rows(str(path), tokenizer, template, 64, True, cache_dir="")
    assert stats == expected[1]
    assert_same_rows(expected[0], rows)


def test_a_dataset_split_tokenizes_from_its_arrow_table(tokenizer, template, tmp_path):
    folder = tmp_path / "hub"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", conversations(30))
    write_jsonl(folder / "test.jsonl", conversations(20, seed=3))
    expected, expected_stats = in_memory(f"{folder}:test", tokenizer, template, 64, True)
    rows, stats = cache.tokenized_rows(f"{folder}:test", tokenizer, template, 64, True, cache_dir=str(tmp_path / "c"))
    assert stats == expected_stats and stats.num_records == 20
    assert_same_rows(expected, rows)


def test_a_second_run_reads_the_cache(tokenizer, template, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", conversations(120))
    part = data.sources.SourcePart(train)
    settings = {"tokenizer": tokenizer, "template": template, "seq_length": 64, "train_on": "assistant"}
    store = str(tmp_path / "cache")
    first = cache.tokenize_part(part, "train", settings, cache_dir=store)
    again = cache.tokenize_part(part, "train", settings, cache_dir=store)
    assert first.built == [0] and again.built == []
    assert again.dataset["input_ids"] == first.dataset["input_ids"]
    # the same tokenizer loaded from another folder (a run's, an export's) keys the same tokens
    import shutil

    from transformers import AutoTokenizer

    from easytune import assets
    copy = tmp_path / "tokenizer_copy"
    copy.mkdir()
    for name in os.listdir(assets.smollm2_hf_dir()):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(assets.smollm2_hf_dir(), name), copy)
    elsewhere = {**settings, "tokenizer": AutoTokenizer.from_pretrained(str(copy))}
    assert cache.tokenize_part(part, "train", elsewhere, cache_dir=store).built == []
    # what changes the tokens is in the key: each of these tokenizes afresh
    for changed in ({"seq_length": 32}, {"train_on": "all"}, {"template": data.templates.TULU}):
        assert cache.tokenize_part(part, "train", {**settings, **changed}, cache_dir=store).built == [0]
    os.utime(train, ns=(1, 1))  # the file was rewritten
    assert cache.tokenize_part(part, "train", settings, cache_dir=store).built == [0]
    assert not [name for name in os.listdir(store) for shard in os.listdir(os.path.join(store, name))
                if ".building-" in shard]  # nothing half-written is left


@pytest.mark.parametrize("line,expected", [
    ('{"messages": [{"role": "user", "content": "hi"}', "train.jsonl line 2: not valid JSON"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "train.jsonl line 2: the conversation has no "
                                                                       "assistant message"),
])
def test_a_bad_record_found_by_a_worker_names_its_line(tokenizer, template, tmp_path, line, expected):
    records = conversations(30)
    path = tmp_path / "train.jsonl"
    with open(path, "w") as f:
        for i, record in enumerate(records):
            f.write(json.dumps(record) + "\n")
            if i == 25:  # line 27 (one bad line after 26 good ones)... then its number is 27
                f.write(line + "\n")
    with pytest.raises(ValueError) as error:
        cache.tokenized_rows(str(path), tokenizer, template, 64, True, num_proc=2, cache_dir="")
    assert expected.replace("line 2", "line 27") in str(error.value)


def test_the_sft_run_reads_its_tokens_from_the_cache(tiny_chat_model, tmp_path):
    """The run driver's data path is the cached one: a second run with the same data reuses the
    first's tokens and trains on the same batches. (Resume from a checkpoint over this path:
    tests/test_train_resume.py, whose --train_data is a .jsonl file.)"""
    from conftest import logged, run_config

    from easytune import train_sft
    train = write_jsonl(tmp_path / "train.jsonl", conversations(64))
    store = str(tmp_path / "cache")
    flags = {"model": tiny_chat_model, "train_data": train, "seq_length": 64, "batch_size": 8, "total_steps": 3,
             "log_steps": 1, "data_cache_dir": store, "export_hf": False}
    losses, written = [], []
    for name in ("first", "second"):
        train_sft.run(run_config(train_sft.DEFAULTS, {**flags, "output_dir": str(tmp_path / name)}))
        losses.append([record["loss"] for record in logged(tmp_path / name) if "loss" in record])
        (entry,) = os.listdir(store)  # one cache entry
        written.append(os.stat(os.path.join(store, entry, "shard-00000-of-00001", "done.json")).st_mtime_ns)
    assert written[0] == written[1]  # the second run tokenized nothing
    assert len(losses[0]) == 3 and losses[0] == losses[1]


CHILD = r"""
import json, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
coordinator, process_id, train, shared, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
jax.distributed.initialize(coordinator, num_processes=2, process_id=process_id)
import numpy as np
from transformers import AutoTokenizer
from easytune import assets, data
from easytune.data import cache
tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_hf_dir())
template = data.resolve_chat_template(tokenizer, None)
settings = {"tokenizer": tokenizer, "template": template, "seq_length": 64, "train_on": "assistant"}
part = data.sources.SourcePart(train)
report = {}
shared_part = cache.tokenize_part(part, "train", settings, cache_dir=shared)
report["shared"] = {"built": shared_part.built, "records": len(shared_part.dataset)}
own = cache.tokenize_part(part, "train", settings, cache_dir=os.path.join(shared, "host-%d" % process_id))
report["own"] = {"built": own.built, "records": len(own.dataset)}
# a mixture with a one-record part: one process's share of it is empty
rows, stats = cache.tokenized_rows(train + "," + train.replace("train.jsonl", "one.jsonl"), tokenizer, template, 64,
                                   True, cache_dir=shared)
np.savez(os.path.join(out, "rows_%d.npz" % process_id), **rows.take(np.arange(rows.num_rows)))
# a bad line in process 1's share: it names the line, process 0 does not wait for it forever
try:
    cache.tokenized_rows(train.replace("train.jsonl", "bad.jsonl"), tokenizer, template, 64, True, cache_dir=shared)
except ValueError as e:
    report["bad"] = str(e)
print("REPORT", json.dumps(report))
"""


def test_two_processes_each_tokenize_their_share(tokenizer, template, tmp_path):
    from conftest import run_processes
    train = write_jsonl(tmp_path / "train.jsonl", conversations(200))
    write_jsonl(tmp_path / "one.jsonl", conversations(1, seed=9))
    with open(tmp_path / "bad.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in conversations(9)) + "{oops\n")
    shared, out = str(tmp_path / "shared"), str(tmp_path / "out")
    os.makedirs(out)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    outputs = run_processes(lambda address: [[sys.executable, "-c", CHILD, address, str(i), train, shared, out]
                                             for i in range(2)], env, timeout=300, output_dir=tmp_path)
    reports = [json.loads(text.split("REPORT ", 1)[1].splitlines()[0]) for text in outputs]
    # a shared cache folder: each process tokenized its half, and both read all 200 records
    assert [r["shared"] for r in reports] == [{"built": [0], "records": 200}, {"built": [1], "records": 200}]
    # a folder per host (not shared): each finds the other's shard missing, tokenizes it, and says so
    assert [r["own"] for r in reports] == [{"built": [0, 1], "records": 200}, {"built": [1, 0], "records": 200}]
    assert all("tokenizing it on this host too" in text for text in outputs)
    assert "could not tokenize their share" in reports[0]["bad"] and "[1]" in reports[0]["bad"]
    assert "bad.jsonl line 10: not valid JSON" in reports[1]["bad"]
    expected, _ = in_memory(f"{train},{tmp_path / 'one.jsonl'}", tokenizer, template, 64, True)
    for i in range(2):
        got = np.load(os.path.join(out, f"rows_{i}.npz"))
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


def test_num_proc_workers_each_write_their_part(tokenizer, template, tmp_path):
    """`--data_num_proc=2`: datasets.map runs two workers, each writing its own Arrow file, and the
    part reads both back (the equality tests above would pass with the workers ignored)."""
    train = write_jsonl(tmp_path / "train.jsonl", conversations(40))
    settings = {"tokenizer": tokenizer, "template": template, "seq_length": 64, "train_on": "assistant"}
    tokenized = cache.tokenize_part(data.sources.SourcePart(train), "train", settings, num_proc=2,
                                    cache_dir=str(tmp_path / "cache"))
    files = sorted(os.path.basename(f["filename"]) for f in tokenized.dataset.cache_files)
    assert files == ["tokens_00000_of_00002.arrow", "tokens_00001_of_00002.arrow"]
    assert len(tokenized.dataset) == 40


def test_large_local_data_is_checked_as_it_is_tokenized(tokenizer, template, tmp_path, monkeypatch):
    """Past PREFETCH_LIMIT a file is not read ahead (its records would sit in memory); its bad line
    is still named, by the tokenization."""
    from easytune.data import formats
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in conversations(5)) + '{"prompt": "only"}\n')
    monkeypatch.setattr(formats, "PREFETCH_LIMIT", 100)
    assert data.prefetch(str(path)) is None
    monkeypatch.setattr(formats, "PREFETCH_LIMIT", 64 << 20)
    assert len(data.prefetch(str(path))) == 6  # under the limit: read ahead (and checked by the recipe)
    with pytest.raises(ValueError, match=r"big.jsonl line 6: unrecognized record with fields \['prompt'\]"):
        cache.tokenized_rows(str(path), tokenizer, template, 64, True, cache_dir="")
