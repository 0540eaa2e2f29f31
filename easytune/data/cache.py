"""Tokenize once: SFT data tokenized in parallel into Arrow files, cached, and packed from arrays.

    rows, stats = tokenized_rows(source, tokenizer, template, seq_length=2048, pack=True)
    for batch in BatchIterator(rows, batch_size=8, seed=0): ...     # rows built per batch

`datasets.Dataset.map(num_proc=...)` tokenizes (`tokenize.tokenize_chunk`, the in-memory path's own
function) and writes Arrow files; a restart or a second run with the same data, tokenizer, template,
`seq_length` and `train_on` memory-maps them instead (`datasets.fingerprint.Hasher` makes the key).
Why not datasets' own map cache: its file names depend on num_proc, it is not atomic when several
processes or hosts build the same data, and it keys a local file's records on how they were read.
Here a cache entry is a folder renamed into place when complete; a half-written one is never read.

Sources are read without turning them into Python objects first: a .jsonl file as byte ranges of its
lines (each worker reads and parses its own lines, so errors still name "file line N"), a `datasets`
split as its Arrow table; .json and .parquet files (read whole anyway) as their records' JSON text.
A mixture tokenizes each part on its own (each cached), then selects records by the weights.

On several processes (`jax.process_count() > 1`) each tokenizes a contiguous 1/P of every part,
they meet at a barrier, then each memory-maps all shards: with a cache folder on storage the hosts
share, every record is tokenized once in the whole job. A host that cannot see a shard (a
host-local cache folder) tokenizes it itself, and says so.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
import warnings

import numpy as np

from easytune.data import formats, sources
from easytune.data.packing import PackedRows, TokenStore
from easytune.data.tokenize import CHUNK, DataStats, tokenize_chunk

logger = logging.getLogger("easytune")

FORMAT = 1  # bump when what a cache entry holds changes
_DONE = "done.json"
_BATCH = CHUNK


def default_cache_dir() -> str:
    from easytune import assets
    return os.path.join(assets.default_cache_dir(), "data")


@dataclasses.dataclass
class Tokenized:
    """One part's records tokenized, one Arrow row per record (blank lines skipped): `input_ids`,
    `loss_mask` (truncated to seq_length), `truncated`, `trained` (loss terms; 0: dropped)."""

    dataset: object    # datasets.Dataset, memory-mapped; None when the part has no records
    built: list[int]   # the shards (of jax.process_count()) this call tokenized; [] when all were cached


def tokenized_rows(source: str, tokenizer, chat_template: str | None, seq_length: int, pack: bool,
                   train_on: str = "assistant", num_proc: int = 0, cache_dir: str | None = None,
                   split: str = "train") -> tuple[PackedRows, DataStats]:
    """`(rows, stats)` of the data spec `source` (a file, a dataset split, a mixture: see
    `easytune.data.sources`), the same rows and stats as `tokenize_records` + `make_rows` give, with
    rows laid out per batch from memory-mapped token arrays. num_proc: tokenizing processes per
    host (0: by the size of the data and this machine's CPUs); cache_dir: None for the default
    (`$EASYTUNE_CACHE/data`), "" for no cache (tokenized into a temporary folder)."""
    source = formats.localize(source)
    path = os.path.expanduser(source)
    parts = [sources.SourcePart(source, text=source)] if os.path.isfile(path) else sources.parse_source(source)
    settings = {"tokenizer": tokenizer, "template": chat_template, "seq_length": seq_length, "train_on": train_on}
    selected = []
    for part in parts:
        tokenized = tokenize_part(part, split, settings, num_proc, cache_dir)
        count = 0 if tokenized.dataset is None else len(tokenized.dataset)
        indices = np.asarray(sources.weighted(range(count), part), np.int64) if part.weight else np.arange(count)
        selected.append((tokenized.dataset, indices))
    formats.forget_prefetched(source)
    return _rows(selected, source, seq_length, pack)


def _rows(selected, source: str, seq_length: int, pack: bool) -> tuple[PackedRows, DataStats]:
    """Pack the selected records of each part (their kept examples, in selection order)."""
    ids, masks, chunk_of, starts, lengths = [], [], [], [], []
    stats = DataStats()
    for dataset, indices in selected:
        if dataset is None:  # a part with no records
            continue
        table = dataset.data.table
        trained = table.column("trained").to_numpy()[indices]
        truncated = table.column("truncated").to_numpy()[indices]
        stats.num_records += len(indices)
        kept = trained > 0
        stats.num_dropped_no_trainable_tokens += int((~kept).sum())
        stats.num_truncated += int(truncated[kept].sum())
        stats.num_trainable_tokens += int(trained[kept].sum())
        # each record's (chunk, start, length) in this table's input_ids chunks
        record_chunk, record_start, record_length = [], [], []
        for piece_ids, piece_mask in zip(table.column("input_ids").chunks, table.column("loss_mask").chunks):
            offsets = piece_ids.offsets.to_numpy()
            record_chunk.append(np.full(len(piece_ids), len(ids), np.int32))
            record_start.append(offsets[:-1].astype(np.int64))
            record_length.append(np.diff(offsets).astype(np.int64))
            ids.append(piece_ids.values.to_numpy(zero_copy_only=False))
            masks.append(piece_mask.values.to_numpy(zero_copy_only=False))
        chosen = indices[kept]
        if len(chosen):
            chunk_of.append(np.concatenate(record_chunk)[chosen])
            starts.append(np.concatenate(record_start)[chosen])
            lengths.append(np.concatenate(record_length)[chosen])
    if not stats.num_records:
        raise ValueError(f"{source} has no records.")
    if not lengths:
        raise ValueError(f"all {stats.num_records} samples of {source} have no trainable tokens after truncation "
                         f"to seq_length={seq_length}; raise --seq_length or check the data.")
    store = TokenStore(ids, masks, np.concatenate(chunk_of), np.concatenate(starts), np.concatenate(lengths))
    stats.num_kept = len(store)
    stats.num_tokens = int(store.length.sum())
    return PackedRows(store, seq_length, pack), stats


# ----------------------------------------------------------------------------- one part

def tokenize_part(part: sources.SourcePart, split: str, settings: dict, num_proc: int = 0,
                  cache_dir: str | None = None) -> Tokenized:
    """A part's records tokenized (see `Tokenized`), from the cache when it holds them."""
    import datasets
    from datasets.fingerprint import Hasher
    raw, kwargs, identity = _raw(part, split)
    key = Hasher.hash({"format": FORMAT, "code": _code_fingerprint(), "data": identity, **settings,
                       "tokenizer": tokenizer_fingerprint(settings["tokenizer"])})
    temporary = cache_dir == ""
    # without a cache every process tokenizes everything into its own folder: nothing to share
    count, index = (1, 0) if temporary else _processes()
    root = os.path.join(_temporary_root() if temporary else (cache_dir or default_cache_dir()), key)
    kwargs = {**kwargs, **settings}
    shards = [os.path.join(root, f"shard-{i:05d}-of-{count:05d}") for i in range(count)]
    built, error = [], None
    if not os.path.exists(os.path.join(shards[index], _DONE)):
        try:
            _build(raw, count, index, shards[index], kwargs, num_proc)
            built.append(index)
        except Exception as e:  # raised after the barrier, so that no other process waits for this one forever
            error = e
    if count > 1:  # every process, cached or not (hosts may see different caches), and every failure shared
        failed = _barrier_flags(error is not None)
        if error is None and any(failed):
            raise ValueError(f"process(es) {[i for i, f in enumerate(failed) if f]} could not tokenize their share "
                             f"of {part.text or part.name}; their logs say why.")
    if error is not None:
        raise error
    for i, shard in enumerate(shards):
        if not os.path.exists(os.path.join(shard, _DONE)):
            logger.warning("tokenized data shard %d of %d is not in %s (a cache folder the hosts do not share?); "
                           "tokenizing it on this host too. Point --data_cache_dir at storage every host mounts "
                           "to tokenize each record once.", i, count, root)
            _build(raw, count, i, shard, kwargs, num_proc)
            built.append(i)
    pieces = []
    for shard in shards:
        with open(os.path.join(shard, _DONE)) as f:
            files = json.load(f)["files"]
        pieces.extend(datasets.Dataset.from_file(os.path.join(shard, name)) for name in files)
    dataset = datasets.concatenate_datasets(pieces) if len(pieces) > 1 else pieces[0] if pieces else None
    if built:
        logger.info("tokenized %s: shards %s of %d (%d records in all) into %s", part.text or part.name, built, count,
                    0 if dataset is None else len(dataset), root)
    return Tokenized(dataset, built)


_CODE: list[str] = []


def _code_fingerprint() -> str:
    """The tokenization code and the libraries that render and tokenize: a new version of any
    may tokenize differently, so it is a new cache entry."""
    if not _CODE:
        import inspect

        import jinja2
        import tokenizers
        import transformers
        from datasets.fingerprint import Hasher

        from easytune.data import tokenize
        sources_text = [inspect.getsource(module) for module in (tokenize, formats)]
        _CODE.append(Hasher.hash([transformers.__version__, tokenizers.__version__, jinja2.__version__,
                                  sources_text]))
    return _CODE[0]


def tokenizer_fingerprint(tokenizer) -> str:
    """What the tokens depend on, not where the tokenizer was loaded from (the same tokenizer in a
    run folder, an export or the Hub's cache gives one key): a fast tokenizer's whole
    `tokenizer.json` (normalizer, pre-tokenizer, model, post-processor, added tokens), its class,
    special tokens and init settings other than file paths."""
    from datasets.fingerprint import Hasher
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return Hasher.hash(tokenizer)
    settings = {key: value for key, value in getattr(tokenizer, "init_kwargs", {}).items()
                if not any(word in key for word in ("file", "path", "local", "chat_template"))}
    return Hasher.hash([type(tokenizer).__name__, backend.to_str(), tokenizer.special_tokens_map,
                        tokenizer.eos_token_id, settings])


def _processes() -> tuple[int, int]:
    import jax
    return jax.process_count(), jax.process_index()


def _barrier_flags(flag: bool) -> list[bool]:
    """Wait for every process, and return each one's `flag` (whether its tokenization failed)."""
    from jax.experimental import multihost_utils
    return [bool(f) for f in np.asarray(multihost_utils.process_allgather(np.array([flag], np.int32))).reshape(-1)]


_TEMPORARY: list[str] = []


def _temporary_root() -> str:
    """A folder for one process's uncached tokenization, removed at exit."""
    if not _TEMPORARY:
        import atexit
        import tempfile
        _TEMPORARY.append(tempfile.mkdtemp(prefix="easytune-tokenized-"))
        atexit.register(shutil.rmtree, _TEMPORARY[0], True)
    return _TEMPORARY[0]


def _build(raw, count: int, index: int, folder: str, kwargs: dict, num_proc: int) -> None:
    """Tokenize shard `index` of `count` of `raw` into `folder`: written beside it, renamed into
    place when complete (another process that built it first wins)."""
    import datasets
    size, extra = divmod(len(raw), count)  # contiguous shards, the first `extra` one record longer
    offset, length = index * size + min(index, extra), size + (index < extra)
    if length == 0:  # fewer records than processes, or none: an empty shard
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, _DONE), "w") as f:
            json.dump({"files": [], "format": FORMAT}, f)
        return
    shard = raw.select(range(offset, offset + length)) if count > 1 else raw
    procs = num_proc or auto_num_proc(len(shard))
    procs = max(1, min(procs, len(shard)))
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    building = f"{folder}.building-{uuid.uuid4().hex[:8]}"
    os.makedirs(building)
    try:
        features = datasets.Features({
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "loss_mask": datasets.Sequence(datasets.Value("int8")),
            "truncated": datasets.Value("bool"), "trained": datasets.Value("int32")})
        with warnings.catch_warnings():  # workers fork a process that has started JAX; they run no JAX
            warnings.filterwarnings("ignore", message=".*os.fork\\(\\) was called.*")
            done = shard.map(_tokenize_batch, batched=True, batch_size=_BATCH, with_indices=True,
                             fn_kwargs={**kwargs, "offset": offset}, remove_columns=shard.column_names,
                             features=features, num_proc=procs if procs > 1 else None,
                             cache_file_name=os.path.join(building, "tokens.arrow"), load_from_cache_file=False,
                             new_fingerprint=uuid.uuid4().hex, desc=f"tokenizing (shard {index + 1}/{count})"
                             if count > 1 else "tokenizing")
        files = [os.path.basename(f["filename"]) for f in done.cache_files]
        del done
        with open(os.path.join(building, _DONE), "w") as f:
            json.dump({"files": files, "format": FORMAT}, f)
        try:
            os.replace(building, folder)
        except OSError:  # built by another process meanwhile
            if not os.path.exists(os.path.join(folder, _DONE)):
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)


def auto_num_proc(num_records: int) -> int:
    """Tokenizing processes: one per 5,000 records, at most this machine's CPUs (and 16)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 16, num_records // 5000))


# ----------------------------------------------------------------------------- reading a part

def _raw(part: sources.SourcePart, split: str):
    """`(raw dataset, map kwargs, identity)` of a part: the records' places, not their contents."""
    import datasets
    path = os.path.expanduser(part.name)
    if os.path.isfile(path):
        stat = os.stat(path)
        url = formats.url_of(path)  # a bucket's file, downloaded into a folder per process: keyed by its URL
        identity = ("url", url, stat.st_size) if url else ("file", os.path.abspath(path), stat.st_size,
                                                            stat.st_mtime_ns)
        if path.endswith(".jsonl"):
            return datasets.Dataset.from_dict(_line_ranges(path)), {"kind": "lines", "path": path}, identity
        located = formats.prefetched(path) or formats.load_located_records(path)
        texts = [json.dumps(record, default=str) for record, _ in located]
        raw = datasets.Dataset.from_dict({"record": texts, "where": [where for _, where in located]})
        return raw, {"kind": "records", "path": path}, identity
    if not os.path.isdir(path) and formats.names_a_file(path):
        raise FileNotFoundError(f"data file {part.name!r} does not exist.")
    dataset, label = sources.open_dataset_split(part, split)
    return dataset, {"kind": "rows", "path": label}, ("dataset", label, dataset._fingerprint)


def _line_ranges(path: str, block: int = 64 << 20) -> dict[str, np.ndarray]:
    """Byte ranges and 1-based numbers of a .jsonl file's lines that are not blank (a trailing
    newline, a separator; whitespace-only ones are skipped when read). Scanned in blocks: memory
    of 24 bytes per line, not the file's size."""
    size = os.path.getsize(path)
    newlines = []
    with open(path, "rb") as f:
        for offset in range(0, size, block):
            chunk = np.frombuffer(f.read(block), np.uint8)
            newlines.append(np.flatnonzero(chunk == ord("\n")) + offset)
    newlines = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    stops = newlines if len(newlines) and newlines[-1] == size - 1 else np.append(newlines, size)
    starts = np.concatenate([[0], newlines + 1])[:len(stops)].astype(np.int64)
    lines = np.arange(1, len(stops) + 1)
    keep = stops - starts > 1
    if (stops - starts == 1).any():  # a one-byte line is blank if that byte is "\r"
        with open(path, "rb") as f:
            for i in np.flatnonzero(stops - starts == 1):
                f.seek(starts[i])
                keep[i] = f.read(1) not in (b"\r", b" ", b"\t")
    return {"start": starts[keep], "stop": stops[keep].astype(np.int64), "line": lines[keep]}


def _records(batch: dict, indices: list[int], kind: str, path: str, offset: int):
    """`(records, wheres)` of a raw batch."""
    if kind == "lines":
        records, wheres = [], []
        with open(path, "rb") as f:
            f.seek(batch["start"][0])
            block = f.read(batch["stop"][-1] - batch["start"][0])
        base = batch["start"][0]
        for start, stop, line in zip(batch["start"], batch["stop"], batch["line"]):
            record = formats.parse_line(block[start - base:stop - base], path, line)
            if record is not None:
                records.append(record)
                wheres.append(f"{path} line {line}")
        return records, wheres
    if kind == "records":
        return [json.loads(text) for text in batch["record"]], list(batch["where"])
    columns = list(batch)
    records = [{c: batch[c][i] for c in columns} for i in range(len(indices))]
    return records, [f"{path} record {offset + i + 1}" for i in indices]


def _tokenize_batch(batch: dict, indices: list[int], *, kind: str, path: str, offset: int, tokenizer, template,
                    seq_length: int, train_on: str) -> dict:
    records, wheres = _records(batch, indices, kind, path, offset)
    out = {"input_ids": [], "loss_mask": [], "truncated": [], "trained": []}
    for example, truncated in tokenize_chunk(records, wheres, tokenizer, template, seq_length, train_on):
        out["input_ids"].append(example.input_ids)
        out["loss_mask"].append(example.loss_mask)
        out["truncated"].append(truncated)
        out["trained"].append(example.num_trainable_targets)
    return out
