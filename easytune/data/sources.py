"""What `--train_data` / `--eval_data` name: a local file, a dataset (a Hub name or a local directory in
the Hub's layout) with its subset and split, or a mixture of these with weights.

    train.jsonl                                   a local .jsonl/.json/.parquet file
    HuggingFaceH4/ultrafeedback_binarized:train_prefs          a dataset's split (default: train)
    allenai/tulu-3-sft-mixture:default:train      a dataset's subset (config) and split
    path/to/dir:test_prefs                        a local directory in the Hub's layout, its split
    'a.jsonl:0.5,org/ds:train:20000'              a mixture (open-instruct's dataset_mixer_list):
                                                  each part, then a weight: <= 1 a fraction of the
                                                  part's records, > 1 a count of them

A part's records are taken in a fixed shuffled order (seed 42) when a weight selects some of them,
and repeated when a count exceeds them (upsampling). Every record keeps its own location ("a.jsonl
line 3", "org/ds:train record 7"), so an error in any part names it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random

MIXTURE_SEED = 42


@dataclasses.dataclass(frozen=True)
class SourcePart:
    """One part of a data spec: `name` (a file, directory or dataset name), its `subset` and
    `split` (datasets only), its `weight` (None: all records) and the `text` it was written as."""

    name: str
    subset: str | None = None
    split: str | None = None
    weight: float | None = None
    text: str = ""

    @property
    def is_local_file(self) -> bool:
        return os.path.isfile(os.path.expanduser(self.name))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_source(spec: str) -> list[SourcePart]:
    """The parts of a data spec (see the module doc); ValueError naming the part that does not parse."""
    if os.path.exists(os.path.expanduser(spec)):  # a path that holds ':' or ',' itself
        return [SourcePart(spec, text=spec)]
    parts = []
    for text in spec.split(","):
        text = text.strip()
        if not text:
            raise ValueError(f"data spec {spec!r} has an empty part; separate the parts of a mixture with single "
                             f"commas.")
        pieces = text.split(":")
        weight = _number(pieces[-1]) if len(pieces) > 1 else None
        if weight is not None:
            pieces = pieces[:-1]
            if not math.isfinite(weight) or not weight > 0 or (weight > 1 and weight != int(weight)):
                raise ValueError(f"mixture part {text!r}: the weight {weight:g} must be a fraction in (0, 1] or a "
                                 f"whole count of records > 1.")
        name = pieces[0]
        if os.path.isfile(os.path.expanduser(name)) and len(pieces) > 1:
            raise ValueError(f"mixture part {text!r}: {name} is a file, which has no subsets or splits, and "
                             f"{':'.join(pieces[1:])!r} is not a number (a weight: a fraction <= 1 or a count).")
        if len(pieces) > 3 or not name:
            raise ValueError(f"data part {text!r} does not parse; write name[:subset]:split[:weight] for a dataset or "
                             f"file[:weight] for a local file.")
        subset, split = (pieces[1], pieces[2]) if len(pieces) == 3 else (None, pieces[1] if len(pieces) == 2 else None)
        parts.append(SourcePart(name, subset or None, split or None, weight, text))
    return parts


def weighted(located, part: SourcePart) -> list:
    """The records a part's weight selects: a fraction (<= 1) or a count (> 1, repeating the records
    when it exceeds them), in a fixed shuffled order."""
    if part.weight is None:
        return located
    order = list(range(len(located)))
    random.Random(MIXTURE_SEED).shuffle(order)
    if part.weight <= 1:
        count = int(round(part.weight * len(located)))
    else:
        count = int(part.weight)
    if not located or count == 0:
        raise ValueError(f"mixture part {part.text!r} selects no records (it has {len(located)}).")
    chosen = order * (count // len(order)) + order[:count % len(order)]
    return [located[i] for i in chosen]


def load_dataset_split(part: SourcePart, default_split: str) -> list[tuple[dict, str]]:
    """A dataset's (Hub name or local directory) subset and split as located records; a subset or
    split that does not exist is one sentence listing the available ones."""
    dataset, label = open_dataset_split(part, default_split)
    return [(dict(record), f"{label} record {i}") for i, record in enumerate(dataset, start=1)]


def open_dataset_split(part: SourcePart, default_split: str, streaming: bool = False):
    """`(datasets.Dataset, label)`: a dataset's subset and split, Arrow-backed (not read into
    Python objects), and its name for error messages ("org/ds:sub:train"); an IterableDataset
    with `streaming`."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{part.name!r} is not a local file; loading it as a dataset needs "
                          f"`pip install datasets`.") from None
    split = part.split or default_split
    name = os.path.expanduser(part.name)
    try:
        subsets = datasets.get_dataset_config_names(name)
    except Exception as e:
        raise FileNotFoundError(f"{part.name!r} is neither a local file nor a dataset datasets.load_dataset can open "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:300]}).") from None
    if part.subset is not None and part.subset not in subsets:
        raise ValueError(f"{part.name} has no subset {part.subset!r}; its subsets: {', '.join(subsets)}.")
    subset = part.subset
    if subset is None and len(subsets) > 1 and "default" not in subsets:
        raise ValueError(f"{part.name} has several subsets ({', '.join(subsets)}); name one: "
                         f"{part.name}:<subset>:{split}.")
    splits = datasets.get_dataset_split_names(name, subset)
    if split not in splits:
        named = f"{part.name}:{subset}" if subset else part.name
        raise ValueError(f"{named} has no split {split!r}; its splits: {', '.join(splits)}. Name one as "
                         f"{named}:<split>.")
    dataset = datasets.load_dataset(name, subset, split=split, streaming=streaming)
    return dataset, f"{part.name}{f':{subset}' if subset else ''}:{split}"
