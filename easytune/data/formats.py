"""Reading SFT records from disk or the Hub, and normalizing them into conversations.

A record is one JSON object. Four layouts are understood (`detect_format`):

    messages           {"messages": [{"role": "user", "content": "..."}, ...]}
                       (also "conversations", with role/content or ShareGPT's from/value)
    alpaca             {"instruction": "...", "input": "..." (optional), "output": "..."}
    prompt_completion  {"prompt": "...", "completion": "..."}  (or both lists of messages, as in TRL)
    text               {"text": "..."}                        (continued pretraining, no template)

Every error names where the bad record is (`where`, e.g. "train.jsonl record 3").
"""
from __future__ import annotations

import json
import os
import re

from easytune.data import sources

FORMATS = ("messages", "alpaca", "prompt_completion", "text")
ROLES = ("system", "user", "assistant", "tool")
LOCAL_EXTENSIONS = (".jsonl", ".json", ".parquet")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
_LAYOUTS = ('{"messages": [{"role", "content"}, ...]} (or "conversations"), '
            '{"instruction", "input" (optional), "output"}, {"prompt", "completion"}, {"text"}')


def load_records(source: str, split: str = "train") -> list[dict]:
    """The records of `source`: a local .jsonl, .json (a list of objects or {"data": [...]}) or
    .parquet file, a `datasets` name or local directory in the Hub's layout (`name[:subset]:split`,
    `split` when none is named), or a weighted mixture of these (`easytune.data.sources`)."""
    return [record for record, _ in load_located_records(source, split)]


# Local data read ahead of the model (`prefetch`): the run driver checks the data before the model
# loads, and the recipe's later read takes the records from here once instead of re-reading.
_PREFETCHED: dict[tuple, list[tuple[dict, str]]] = {}


def _file_key(path: str) -> tuple:
    stat = os.stat(path)
    return os.path.abspath(path), stat.st_size, stat.st_mtime_ns


def _spec_key(source: str, parts) -> tuple | None:
    """The cache key of a spec whose parts are all local files (None otherwise)."""
    if not all(part.is_local_file for part in parts):
        return None
    return (source, *(_file_key(os.path.expanduser(part.name)) for part in parts))


_URL_PART = re.compile(r"^([a-z][a-z0-9+.-]*://[^:,]+)(.*)$")
_LOCALIZED: dict[str, str] = {}


def localize(source: str) -> str:
    """`source` with each part that is a URL (`gs://bucket/train.jsonl:0.5`, a dataset directory
    `gs://bucket/ufb:test_prefs`) replaced by a local copy of it (downloaded once per process)."""
    if "://" not in source:
        return source
    from easytune import storage
    parts = []
    for text in source.split(","):
        match = _URL_PART.match(text.strip())
        if match and storage.is_remote(match.group(1)):
            url = match.group(1)
            if url not in _LOCALIZED:
                try:
                    _LOCALIZED[url] = storage.local_copy(url)
                except FileNotFoundError:
                    raise FileNotFoundError(f"data file {url!r} does not exist.") from None
            text = _LOCALIZED[url] + match.group(2)
        parts.append(text)
    return ",".join(parts)


# Local data larger than this is not read ahead: it is checked record by record as it is tokenized
# (before the first compile too), without holding its records in memory.
PREFETCH_LIMIT = 64 << 20


def url_of(path: str) -> str | None:
    """The URL `localize` downloaded the local file `path` from, or None."""
    for url, local in _LOCALIZED.items():
        if os.path.abspath(local) == os.path.abspath(path):
            return url
    return None


def prefetch(source: str) -> list[tuple[dict, str]] | None:
    """Read local data now (a file, or a mixture of local files; JSON, encoding and record errors
    raised now), keeping the located records for the next `load_located_records(source)`; None
    when the spec names a dataset (read, and checked, when the recipe loads it) or local files of
    more than `PREFETCH_LIMIT` bytes. Parts given as URLs (`gs://...`) are downloaded first."""
    source = localize(source)
    path = os.path.expanduser(source)
    if os.path.isfile(path) and os.path.getsize(path) > PREFETCH_LIMIT:
        return None
    if not os.path.isfile(path) and not names_a_file(path):
        parts = sources.parse_source(source)  # a weight or a part that does not parse: now
        key = _spec_key(source, parts)
        if key is None or sum(os.path.getsize(os.path.expanduser(p.name)) for p in parts) > PREFETCH_LIMIT:
            return None
        located = load_located_records(source)
        _PREFETCHED[key] = located
        return located
    located = load_located_records(source)  # a missing file: its error
    _PREFETCHED[_file_key(path)] = located
    return located


def prefetched(path: str) -> list[tuple[dict, str]] | None:
    """The records `prefetch` read from the local file `path` (taken: a second call gives None)."""
    return _PREFETCHED.pop(_file_key(path), None) if os.path.isfile(path) else None


def forget_prefetched(source: str) -> None:
    """Drop what `prefetch(source)` kept (a reader that does not need the records)."""
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        _PREFETCHED.pop(_file_key(path), None)
        return
    try:
        key = _spec_key(source, sources.parse_source(source))
    except ValueError:
        return
    if key is not None:
        _PREFETCHED.pop(key, None)


def names_a_file(source: str) -> bool:
    """Whether `source`, not an existing file, still names one (not a dataset name or spec)."""
    looks_like_a_path = source.endswith(LOCAL_EXTENSIONS) or source.startswith((".", "/", "~"))
    return looks_like_a_path and ":" not in source and "," not in source and not os.path.isdir(source)


def load_located_records(source: str, split: str = "train") -> list[tuple[dict, str]]:
    """`(record, where)` pairs of `source` (a local file, a dataset's split, or a mixture:
    `easytune.data.sources`), where naming the record's place for error messages: "train.jsonl
    line 3", "train.json item 2", "train.parquet row 5", "org/name:train record 4". `split`: the
    split of a dataset named without one."""
    source = localize(source)
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        return _read_local(path)
    parts = sources.parse_source(source)
    key = _spec_key(source, parts)
    if key is not None and key in _PREFETCHED:
        return _PREFETCHED.pop(key)
    if len(parts) == 1 and parts[0].weight is None:
        return _load_part(parts[0], split)
    located = []
    for part in parts:
        located.extend(sources.weighted(_load_part(part, split), part))
    return located


def _load_part(part, split: str) -> list[tuple[dict, str]]:
    path = os.path.expanduser(part.name)
    if os.path.isfile(path):
        return _read_local(path)
    if not os.path.isdir(path) and names_a_file(path):
        raise FileNotFoundError(f"data file {part.name!r} does not exist.")
    return sources.load_dataset_split(part, split)


def _read_local(path: str) -> list[tuple[dict, str]]:
    prefetched = _PREFETCHED.pop(_file_key(path), None)
    if prefetched is not None:
        return prefetched
    if path.endswith(".jsonl"):
        return _read_jsonl(path)
    if path.endswith(".json"):
        return _read_json(path)
    if path.endswith(".parquet"):
        return [(record, f"{path} row {i}") for i, record in enumerate(_read_parquet(path), start=1)]
    raise ValueError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_EXTENSIONS)}.")


def _decode(raw: bytes, path: str, line_number: int | None = None) -> str:
    """UTF-8 text of `raw` (a BOM dropped); a file in another encoding is an error naming the
    line and the byte, where a bare UnicodeDecodeError would give an offset into a read buffer."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if line_number is None:  # a whole file: the line is the newlines before the bad byte
            line_number = raw.count(b"\n", 0, e.start) + 1
            column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        else:
            column = e.start + 1
        raise ValueError(f"{path} line {line_number}: not UTF-8 (byte {column} of the line is 0x{raw[e.start]:02x}); "
                         f"save the file as UTF-8.") from None


def _read_jsonl(path: str) -> list[tuple[dict, str]]:
    records = []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            record = parse_line(raw, path, line_number)
            if record is not None:
                records.append((record, f"{path} line {line_number}"))
    return records


def parse_line(raw: bytes, path: str, line_number: int) -> dict | None:
    """The record on one line of a .jsonl file, None for a blank line (a trailing newline, a
    separator); errors name the file and line."""
    line = _decode(raw, path, line_number)
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {line_number}: not valid JSON ({e.msg} at column {e.colno}).") from None
    return _check_object(record, f"{path} line {line_number}")


def _read_json(path: str) -> list[tuple[dict, str]]:
    with open(path, "rb") as f:
        text = _decode(f.read(), path)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}).") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records or an object {{\"data\": [...]}}, "
                         f"got {_json_type(data)}.")
    return [(_check_object(record, f"{path} item {i}"), f"{path} item {i}") for i, record in enumerate(data, start=1)]


def _read_parquet(path: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow.") from None
    return pq.read_table(path).to_pylist()


def _check_object(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object (one record), got {_json_type(record)}.")
    return record


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def detect_format(record: dict, where: str) -> str:
    """Which of `FORMATS` the record's fields describe; ValueError naming `where` if none."""
    if "messages" in record or "conversations" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    raise ValueError(f"{where}: unrecognized record with fields {sorted(record)}; "
                     f"accepted layouts are {_LAYOUTS}.")


def to_messages(record: dict, fmt: str, where: str) -> list[dict] | None:
    """The record as a validated conversation `[{"role", "content"}, ...]`, or None for 'text'
    records (whose text is validated too). Raises ValueError naming `where` on bad content."""
    if fmt == "messages":
        key = "messages" if "messages" in record else "conversations"
        messages = [_message(m, f"{where} {key}[{i}]") for i, m in enumerate(_list(record[key], where, key))]
    elif fmt == "alpaca":
        user = _string(record, "instruction", where)
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise ValueError(f"{where}: 'input' must be a string, got {_json_type(extra)}.")
        if extra and extra.strip():
            user = f"{user}\n\n{extra}"
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _string(record, "output", where)}]
    elif fmt == "prompt_completion":
        if isinstance(record["prompt"], list):  # TRL's conversational prompt/completion
            prompt = [_message(m, f"{where} prompt[{i}]") for i, m in enumerate(record["prompt"])]
            completion = _list(record["completion"], where, "completion")
            messages = prompt + [_message(m, f"{where} completion[{i}]") for i, m in enumerate(completion)]
        else:
            messages = [{"role": "user", "content": _string(record, "prompt", where)},
                        {"role": "assistant", "content": _string(record, "completion", where)}]
    elif fmt == "text":
        _string(record, "text", where)
        return None
    else:
        raise ValueError(f"unknown record format {fmt!r}; expected one of {FORMATS}.")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant message, so there is nothing to train on.")
    return messages


def _list(value, where: str, key: str) -> list:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {key!r} must be a non-empty list of messages, got "
                         f"{'an empty list' if value == [] else _json_type(value)}.")
    return value


def _message(message, where: str) -> dict:
    if not isinstance(message, dict):
        raise ValueError(f"{where}: a message must be an object with 'role' and 'content', got {_json_type(message)}.")
    if "role" not in message and "from" in message:  # ShareGPT: {"from": "human"|"gpt", "value": ...}
        role = _SHAREGPT_ROLES.get(message["from"], message["from"])
        message = {"role": role, "content": message.get("value")}
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}: unknown role {role!r}; roles must be one of {', '.join(ROLES)}.")
    if isinstance(message.get("content"), list):  # content parts (OpenAI / multimodal layout): text only
        message = {**message, "content": _text_parts(message["content"], where)}
    if role == "assistant" and message.get("tool_calls"):  # a tool call: its content may be empty
        calls = message["tool_calls"]
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            raise ValueError(f"{where}: 'tool_calls' must be a list of objects, got {_json_type(calls)}.")
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise ValueError(f"{where}: 'content' must be a string, got {_json_type(content)}.")
        return {"role": role, "content": content, "tool_calls": calls}
    if role == "tool":  # a tool's result: context, rendered by the template with its call's id or name
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"{where}: a tool message's 'content' must be a string, got {_json_type(content)}.")
        return {"role": role, "content": content,
                **{k: message[k] for k in ("tool_call_id", "name") if message.get(k) is not None}}
    return {"role": role, "content": _string(message, "content", where)}


def record_tools(record: dict, where: str) -> list[dict] | None:
    """A record's `tools` column (function schemas the template renders; a JSON string or a list),
    or None."""
    tools = record.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: 'tools' is a string but not valid JSON ({e.msg}).") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError(f"{where}: 'tools' must be a list of tool (function) schemas, got {_json_type(tools)}.")
    return tools


def _text_parts(parts: list, where: str) -> str:
    """The text of a content given as parts `[{"type": "text", "text": "..."}, ...]`, concatenated."""
    texts = []
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type", "text") != "text":
            kind = part.get("type") if isinstance(part, dict) else _json_type(part)
            raise ValueError(f"{where}: content part {i} is {kind!r}; text models take text parts "
                             f"{{\"type\": \"text\", \"text\": ...}} only.")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}: content part {i} has no string 'text' (got {_json_type(part.get('text'))}).")
        texts.append(part["text"])
    return "".join(texts)


def _string(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if value is None:
        raise ValueError(f"{where}: missing {key!r}.")
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {_json_type(value)}.")
    if not value.strip():
        raise ValueError(f"{where}: {key!r} is empty.")
    return value
