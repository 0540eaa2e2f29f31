"""Streaming safetensors: read any slice of any tensor through a memory map, write tensor by tensor.

Our own reader (rather than `safetensors.safe_open`) because it hands out numpy views of bf16
tensors (via ml_dtypes) and lets a shard callback read just its slice, so a model larger than host
RAM loads and converts without ever being materialized whole.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
DTYPE_CODES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsFile:
    """One `.safetensors` file, memory-mapped. `file[name]` is a lazy numpy view."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            try:
                header = json.loads(f.read(header_len))
            except ValueError as e:
                raise ValueError(f"{path} is not a valid safetensors file (bad header: {e}).") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self._data_start = 8 + header_len

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        """A read-only view mapping just this tensor's bytes. The mapping lives only as long as
        the view, so pages read for one tensor stop counting toward this process's memory once
        it has been converted."""
        entry = self.entries[name]
        dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
        start, end = entry["data_offsets"]
        if end == start:
            return np.zeros(entry["shape"], dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + start,
                         shape=tuple(entry["shape"]))


class SafetensorsCheckpoint:
    """All safetensors files of an HF directory (single file or sharded with an index)."""

    def __init__(self, directory: str):
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            files = {name: os.path.join(directory, fname) for name, fname in weight_map.items()}
        elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
            files = None
        else:
            found = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
            raise FileNotFoundError(
                f"{directory} has no {SINGLE_FILE} or {INDEX_FILE} (found: {found[:10]}); "
                "easytune reads Hugging Face checkpoints in safetensors format."
            )
        self._open: dict[str, SafetensorsFile] = {}
        if files is None:
            single = self._file(os.path.join(directory, SINGLE_FILE))
            self._where = {name: single.path for name in single.keys()}
        else:
            self._where = files

    def _file(self, path: str) -> SafetensorsFile:
        if path not in self._open:
            if not os.path.exists(path):
                raise FileNotFoundError(f"checkpoint shard {path} named in the index is missing.")
            self._open[path] = SafetensorsFile(path)
        return self._open[path]

    def keys(self):
        return self._where.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(self._where[name]).shape(name)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._file(self._where[name])[name]


def write_safetensors(
    directory: str,
    tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
    max_shard_bytes: int = 5 * 1024**3,
    metadata: dict | None = None,
    filename: str | None = None,
) -> list[str]:
    """Write `(name, shape, dtype, produce)` tensors, calling `produce()` one at a time.

    Shapes and dtypes are known up front, so each file's header is written first and tensors
    stream after it; only one tensor is in memory at a time. Shards over `max_shard_bytes` get an
    index file, as transformers writes them. Files appear atomically (written to `.tmp`, renamed).
    filename: write one file of this name, never sharded (e.g. peft's adapter_model.safetensors).
    """
    tensors = list(tensors)
    if filename is not None:
        max_shard_bytes = float("inf")
    shards, current, current_bytes = [], [], 0
    for item in tensors:
        nbytes = int(np.prod(item[1], dtype=np.int64)) * np.dtype(item[2]).itemsize
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += nbytes
    shards.append(current)

    names = [filename or SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        header, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
        for name, shape, dtype, _ in shard:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": DTYPE_CODES[np.dtype(dtype)], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        total += offset
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)  # keep tensor data 8-byte aligned
        path = os.path.join(directory, fname)
        with open(path + ".tmp", "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            for name, shape, dtype, produce in shard:
                array = np.ascontiguousarray(produce(), dtype=dtype)  # copies only if transposed
                if array.shape != tuple(shape):
                    raise ValueError(f"tensor {name} has shape {array.shape}, expected {tuple(shape)}.")
                f.write(array.reshape(-1).view(np.uint8).data)
        os.replace(path + ".tmp", path)
    for stale in os.listdir(directory):  # weights of an earlier export would shadow or mix with ours
        if stale.endswith(".safetensors") and stale.startswith("model") and stale not in names:
            os.remove(os.path.join(directory, stale))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(directory, INDEX_FILE + ".tmp"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        os.replace(os.path.join(directory, INDEX_FILE + ".tmp"), os.path.join(directory, INDEX_FILE))
    elif filename is None and os.path.exists(os.path.join(directory, INDEX_FILE)):
        os.remove(os.path.join(directory, INDEX_FILE))
    return names
