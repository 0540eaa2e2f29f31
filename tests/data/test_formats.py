"""Reading jsonl/json/parquet records and normalizing the four layouts into conversations."""
import json

import pytest

from easytune.data import detect_format, load_records, to_messages, tokenize_records

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
LAYOUTS = [  # (record, format, expected conversation)
    ({"messages": CONVERSATION}, "messages", CONVERSATION),
    ({"conversations": CONVERSATION, "id": 7}, "messages", CONVERSATION),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}, "messages",
     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]),
    ({"instruction": "Translate to French.", "input": "cat", "output": "chat"}, "alpaca",
     [{"role": "user", "content": "Translate to French.\n\ncat"}, {"role": "assistant", "content": "chat"}]),
    ({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca",
     [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]),
    ({"instruction": "Say hi.", "output": "hi"}, "alpaca",
     [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]),
    ({"prompt": "2+2=", "completion": "4"}, "prompt_completion",
     [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]),
    ({"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:]}, "prompt_completion", CONVERSATION),
    ({"text": "Once upon a time."}, "text", None),
]


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize("record,fmt,expected", LAYOUTS)
def test_layouts(record, fmt, expected):
    assert detect_format(record, "x") == fmt
    assert to_messages(record, fmt, "x") == expected


def test_jsonl_json_and_parquet_read_the_same_records(tmp_path):
    records = [record for record, _, _ in LAYOUTS]
    jsonl = write_jsonl(tmp_path / "data.jsonl", [json.dumps(r) for r in records] + [""])  # blank line skipped
    (tmp_path / "list.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": records}))
    assert load_records(jsonl) == records
    assert load_records(str(tmp_path / "list.json")) == records
    assert load_records(str(tmp_path / "wrapped.json")) == records


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    records = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:]}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "data.parquet")
    loaded = load_records(str(tmp_path / "data.parquet"))
    assert loaded == records
    assert to_messages(loaded[1], detect_format(loaded[1], "x"), "x") == CONVERSATION[1:]


def test_malformed_json_names_file_and_line(tmp_path):
    lines = [json.dumps({"text": f"line {i}"}) for i in range(1, 7)] + ['{"text": "unterminated']
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    with pytest.raises(ValueError, match=r"data\.jsonl line 7: not valid JSON \("):
        load_records(path)

    (tmp_path / "bad.json").write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    with pytest.raises(ValueError, match=r"bad\.json line 3: not valid JSON"):
        load_records(str(tmp_path / "bad.json"))


def test_json_that_is_not_an_object_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ['{"text": "a"}', '["text", "b"]'])
    with pytest.raises(ValueError, match=r"data\.jsonl line 2: expected a JSON object .*got a list"):
        load_records(path)


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_records(str(tmp_path / "data.csv"))


def test_unknown_layout_names_where_fields_and_layouts():
    with pytest.raises(ValueError, match=r"train\.jsonl line 3: .*\['input', 'instruction'\].*accepted layouts"):
        detect_format({"instruction": "x", "input": "y"}, "train.jsonl line 3")  # no "output"


@pytest.mark.parametrize("record,message", [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]}, r"unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}, r"messages\[1\]: missing 'content'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}, r"'content' is empty"),
    ({"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "Yo"}]},
     r"messages\[0\]: content part 0 is 'a string'; text models take text parts"),
    ({"messages": []}, r"'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, r"no assistant message"),
    ({"instruction": "Do it.", "output": 3}, r"'output' must be a string"),
    ({"prompt": "", "completion": "x"}, r"'prompt' is empty"),
    ({"text": None}, r"missing 'text'"),
])
def test_bad_records_name_where(record, message):
    with pytest.raises(ValueError, match=r"^d\.jsonl record 4.*" + message):
        to_messages(record, detect_format(record, "d.jsonl record 4"), "d.jsonl record 4")


def test_empty_file_has_no_records(tmp_path, tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    assert load_records(str(path)) == []
    with pytest.raises(ValueError, match=r"^empty\.jsonl has no records\.$"):
        tokenize_records([], tokenizer, None, seq_length=32, source_name="empty.jsonl")


def test_non_utf8_data_names_the_file_line_and_byte(tmp_path):
    good = json.dumps({"text": "fine"}).encode() + b"\n"
    bad = '{"text": "café"}'.encode("latin-1") + b"\n"
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_bytes(b"\n\n\n" + good + bad)  # blank lines count: errors name the file's own lines
    with pytest.raises(ValueError, match=r"train.jsonl line 5: not UTF-8 \(byte 14 of the line is 0xe9\); save "
                                         r"the file as UTF-8"):
        load_records(str(jsonl))
    whole = tmp_path / "train.json"
    whole.write_bytes(b"[\n" + good.rstrip() + b",\n" + bad.rstrip() + b"\n]\n")
    with pytest.raises(ValueError, match=r"train.json line 3: not UTF-8 \(byte 14 of the line is 0xe9\)"):
        load_records(str(whole))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + good)
    assert load_records(str(bom)) == [{"text": "fine"}]
