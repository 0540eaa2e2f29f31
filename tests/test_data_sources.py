"""What --train_data/--eval_data name (`easytune.data.sources`): a dataset's subset and split, a local
directory in the Hub's layout, weighted mixtures; --train_on; content given as text parts."""
import json

import pytest

from conftest import run_config


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def hub_layout(tmp_path_factory):
    """A local directory laid out as UltraFeedback-binarized is on the Hub: parquet files per split
    and a README whose YAML names the splits (train_prefs, test_prefs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = tmp_path_factory.mktemp("ultrafeedback")
    (root / "data").mkdir()

    def pairs(n, tag):
        return [{"prompt": f"{tag} question {i}?",
                 "chosen": [{"role": "user", "content": f"{tag} question {i}?"},
                            {"role": "assistant", "content": f"a good answer {i}"}],
                 "rejected": [{"role": "user", "content": f"{tag} question {i}?"},
                              {"role": "assistant", "content": f"bad {i}"}]} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(pairs(16, "train")), root / "data" / "train_prefs-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(pairs(8, "test")), root / "data" / "test_prefs-00000-of-00001.parquet")
    (root / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train_prefs\n"
                                    "    path: data/train_prefs-*\n  - split: test_prefs\n    path: data/test_prefs-*\n"
                                    "---\n")
    return str(root)


def test_specs_parse_into_parts(tmp_path):
    from easytune.data.sources import SourcePart, parse_source
    local = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    assert parse_source(local) == [SourcePart(local, text=local)]
    assert parse_source("org/ds:train_prefs") == [SourcePart("org/ds", None, "train_prefs", None, "org/ds:train_prefs")]
    assert parse_source("org/ds:sub:test") == [SourcePart("org/ds", "sub", "test", None, "org/ds:sub:test")]
    assert parse_source(f"{local}:0.5, org/ds:train:20000") == [
        SourcePart(local, None, None, 0.5, f"{local}:0.5"), SourcePart("org/ds", None, "train", 20000.0,
                                                                       "org/ds:train:20000")]


@pytest.mark.parametrize("spec,message", [
    ("{a}:half", r"mixture part '.*a.jsonl:half': .*a.jsonl is a file, which has no subsets or splits, and 'half' "
                 r"is not a number"),
    ("{a}:0", r"the weight 0 must be a fraction in \(0, 1\] or a whole count"),
    ("{a}:2.5", r"the weight 2.5 must be a fraction in \(0, 1\] or a whole count"),
    ("{a}:inf", r"the weight inf must be a fraction in \(0, 1\] or a whole count"),
    ("{a},,{a}", r"has an empty part"),
    ("org/ds:a:b:c", r"data part 'org/ds:a:b:c' does not parse"),
])
def test_bad_specs_are_one_sentence_naming_the_part(spec, message, tmp_path):
    from easytune.data import load_located_records
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    with pytest.raises(ValueError, match=message):
        load_located_records(spec.format(a=a))


def test_mixture_takes_fractions_and_counts_in_a_fixed_order(tmp_path):
    """open-instruct's mixer: a weight <= 1 is a fraction of the part, > 1 a count (repeating the
    part when it exceeds it); each record keeps its own file and line."""
    from easytune.data import load_located_records
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(4)])
    located = load_located_records(f"{a}:0.5,{b}:10")
    texts = [r["text"] for r, _ in located]
    assert len(texts) == 15 and len(set(texts[:5])) == 5 and all(t.startswith("a") for t in texts[:5])
    assert sorted(texts[5:]) == sorted([f"b{i}" for i in range(4)] * 2 + texts[13:])  # every b twice, then two
    assert len(set(texts[5:9])) == 4
    assert all(where.startswith((f"{a} line", f"{b} line")) for _, where in located)
    assert located == load_located_records(f"{a}:0.5,{b}:10")  # the same order every time
    from easytune.data import prefetch
    for spec in (f"{a},{b}", f"{a}:0.5,{b}"):  # read ahead (before the model loads) with the last part whole
        assert [r for r, _ in prefetch(spec)] == [r for r, _ in load_located_records(spec)]


def test_hub_layout_directory_splits(hub_layout):
    from easytune.data import load_located_records, load_pairs
    located = load_located_records(f"{hub_layout}:test_prefs")
    assert len(located) == 8 and located[0][1] == f"{hub_layout}:test_prefs record 1"
    assert located[0][0]["prompt"] == "test question 0?"
    records, _ = load_pairs(f"{hub_layout}:train_prefs:0.25")
    assert len(records) == 4
    with pytest.raises(ValueError, match=r"has no split 'test'; its splits: train_prefs, test_prefs"):
        load_located_records(f"{hub_layout}:test")
    with pytest.raises(ValueError, match=r"has no split 'train'; its splits: train_prefs, test_prefs"):
        load_located_records(hub_layout)  # no split named: train, which this dataset lacks
    with pytest.raises(ValueError, match=r"has no subset 'other'; its subsets: default"):
        load_located_records(f"{hub_layout}:other:train_prefs")


def test_dpo_trains_and_evaluates_on_named_splits(tiny_chat_model, hub_layout, tmp_path):
    """--train_data=<dir>:train_prefs --eval_data=<dir>:test_prefs, as UltraFeedback is named on the
    Hub: 16 training pairs from train_prefs, and an eval loss (on test_prefs)."""
    from easytune import train_dpo
    cfg = run_config(train_dpo.DEFAULTS, {
        "model": tiny_chat_model, "train_data": f"{hub_layout}:train_prefs", "eval_data": f"{hub_layout}:test_prefs",
        "output_dir": str(tmp_path / "run"), "batch_size": 8, "seq_length": 64, "total_steps": 2, "logger": "none"})
    summary = train_dpo.run(cfg)
    assert summary["train_pairs"] == 16 and "eval_loss" in summary, summary


def test_a_bad_record_in_a_local_mixture_is_reported_before_the_model_loads(tmp_path):
    """A mixture of local files is read and checked like one file: the bad part's file and line."""
    from easytune import train_sft
    good = write_jsonl(tmp_path / "good.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "only a prompt"}])
    cfg = run_config(train_sft.DEFAULTS, {"model": "/nonexistent/model", "train_data": f"{good}:1,{bad}:1",
                                          "output_dir": str(tmp_path / "run")})
    with pytest.raises(ValueError, match=r"bad.jsonl line 1: unrecognized record with fields \['prompt'\]"):
        train_sft.run(cfg)


def test_train_on_all_trains_every_token(tiny_chat_model):
    import easytune
    from easytune import data
    model = easytune.load(tiny_chat_model)
    records = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": "4"}]}]
    template = model.tokenizer.chat_template
    assistant, _ = data.tokenize_records(records, model.tokenizer, template, 128, "x")
    everything, _ = data.tokenize_records(records, model.tokenizer, template, 128, "x", train_on="all")
    assert everything[0].input_ids == assistant[0].input_ids
    assert everything[0].loss_mask == [1] * len(everything[0].input_ids)
    assert 0 < sum(assistant[0].loss_mask) < len(assistant[0].input_ids) // 2
    from easytune import train_sft
    with pytest.raises(ValueError, match="--train_on must be one of assistant, all, got 'prompt'"):
        train_sft.RECIPE.validate(run_config(train_sft.DEFAULTS, {"train_on": "prompt"}))


def test_content_as_text_parts():
    """OpenAI-style content parts are read as their concatenated text; a non-text part is refused
    naming the record."""
    from easytune import data
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is "},
                                                        {"type": "text", "text": "2+2?"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]}
    assert data.to_messages(record, "messages", "r 1") == [{"role": "user", "content": "What is 2+2?"},
                                                           {"role": "assistant", "content": "4"}]
    with pytest.raises(ValueError, match=r"r 1 messages\[1\]: content part 0 has no string 'text' \(got null\)"):
        data.to_messages({"messages": [record["messages"][0], {"role": "assistant", "content": [{"type": "text"}]}]},
                         "messages", "r 1")
    record["messages"][0]["content"].append({"type": "image", "url": "x.png"})
    with pytest.raises(ValueError, match=r"r 1 messages\[0\]: content part 2 is 'image'; text models take text"):
        data.to_messages(record, "messages", "r 1")


TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.get('tool_calls') %}<tool_call>{{ m['tool_calls'] | tojson }}</tool_call>{% else %}{{ m['content'] }}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_tools_and_tool_calls_render_and_only_assistant_turns_train(tiny_chat_model):
    """A record with a `tools` column (a JSON string, as datasets store it) and tool-call turns: the
    template renders the tools and the call; the loss covers the assistant's call and its final
    answer, not the tool's result or the prompt."""
    import easytune
    from easytune import data
    tokenizer = easytune.load(tiny_chat_model).tokenizer
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]
    record = {"tools": json.dumps(tools), "messages": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": None, "tool_calls": call},
        {"role": "tool", "name": "add", "content": "4"}, {"role": "assistant", "content": "It is 4."}]}
    [example], _ = data.tokenize_records([record], tokenizer, TOOL_TEMPLATE, 512, "x")
    text = tokenizer.decode(example.input_ids)
    assert text.startswith('<|im_start|>system\nTools: [{"type": "function", "function": {"name": "add"')
    assert "<|im_start|>tool\n4<|im_end|>" in text
    trained = tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask) if m])
    assert trained == ('<tool_call>[{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]'
                       '</tool_call><|im_end|>\nIt is 4.<|im_end|>\n')
    with pytest.raises(ValueError, match=r"r 1: 'tools' must be a list of tool \(function\) schemas"):
        data.tokenize_records([{**record, "tools": {"add": 1}}], tokenizer, TOOL_TEMPLATE, 512, "x", ["r 1"])
