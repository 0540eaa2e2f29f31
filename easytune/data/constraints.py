"""Verifiable instruction constraints on everyday requests: the RL demo task set (Tulu 3's RLVR
idea on a laptop). Each record is a request ("Write a short note to a friend about the weekend.")
with one or two IFEval constraints ("Your entire response should be in English, and in all
lowercase letters."), in IFEval's own columns, so `easytune.eval.verifiers:ifeval_reward` (lm-eval's
IFEval checkers) scores a completion without a judge:

    train, heldout = constraint_records(256, 64, seed=0)
    train[0] == {"prompt": [{"role": "user", "content": "... request ... constraint ..."}],
                 "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}],
                 "constraint": "change_case:english_lowercase", "request": "..."}

Held-out measures generalisation, not memorised strings: its requests come from topics and request
templates that no training record uses, and its constraint instances (keywords, end phrases, word
limits, bullet counts, postscript markers) are disjoint from the training ones. The constraint
descriptions are IFEval's own (`build_description` of lm-eval's checker classes), so the text a
prompt shows and the check that scores it come from the same code.

The types kept by default (`DEFAULT_TYPES`) are those where the bundled SmolLM2-135M-Instruct is
neither always right nor always wrong (measured by `scripts/constraint_base_rates.py`, table in
BENCHMARKS.md): a reward can sharpen a partial ability, which it cannot create from nothing.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

# Request templates: the last two are held out (with the held-out topics), so held-out requests are
# new in wording as well as in topic.
REQUESTS = (
    "Write a short note to a friend about {topic}.",
    "Describe {topic} in a few sentences.",
    "Give me a piece of advice about {topic}.",
    "Explain {topic} to a ten-year-old.",
    "Write a short message to a coworker about {topic}.",
    "Tell me what you like about {topic}.",
    "Write a short paragraph about {topic}.",
    "Share a quick tip about {topic}.",
    "Write a brief reply to a friend who asked about {topic}.",
    "Summarize why people care about {topic}.",
)
HELDOUT_REQUESTS = 2

TOPICS = (
    "the weekend", "cooking pasta", "a rainy day", "learning to swim", "your favourite book", "morning coffee",
    "a trip to the beach", "growing tomatoes", "riding a bicycle", "a birthday party", "cleaning the kitchen",
    "walking the dog", "a new job", "saving money", "a football match", "the first snow", "baking bread",
    "a visit to the dentist", "moving house", "a long train ride", "playing chess", "a summer holiday",
    "learning a new language", "a power cut", "planting a tree", "a school concert", "fixing a flat tyre",
    "a quiet evening at home", "buying a laptop", "a family dinner", "a camping trip", "drinking enough water",
    "a museum visit", "a lost umbrella", "a noisy neighbour", "writing a letter", "a picnic in the park",
    "getting up early", "a broken phone screen", "painting a room", "a farmers market", "learning to drive",
    "a thunderstorm", "making new friends", "a library card", "a job interview", "the autumn leaves",
    "a cup of tea", "a surprise gift", "a rainy commute", "a yoga class", "a garage sale", "feeding birds",
    "a late bus", "a movie night", "sorting old photos", "a mountain hike", "a cold morning", "a street festival",
    "a pet cat",
)
HELDOUT_TOPIC_FRACTION = 0.25

# Constraint instances per type: (train instances, held-out instances), disjoint. A type without
# arguments has one instance, `{}`, on both sides (held-out is new requests only).
_KEYWORDS = ("happy", "simple", "friend", "today", "small", "bright", "easy", "water", "together", "plan",
             "quiet", "warm")
_END_PHRASES = ("Is there anything else I can help with?", "Have a nice day.", "Thanks for reading.",
                "Let me know what you think.", "See you soon.", "That is all for now.")
_FORBIDDEN = ("very", "really", "good", "great", "thing", "nice", "just", "also", "like", "lot")


def _split(values: Sequence, heldout_every: int = 3) -> tuple[list, list]:
    train = [v for i, v in enumerate(values) if i % heldout_every != heldout_every - 1]
    heldout = [v for i, v in enumerate(values) if i % heldout_every == heldout_every - 1]
    return train, heldout


def _instances() -> dict[str, tuple[list[dict], list[dict]]]:
    kw_train, kw_held = _split(_KEYWORDS)
    end_train, end_held = _split(_END_PHRASES)
    forbid_train, forbid_held = _split(_FORBIDDEN)
    pairs = lambda words: [{"keywords": [a, b]} for a, b in zip(words[::2], words[1::2])]  # noqa: E731
    return {
        "change_case:english_lowercase": ([{}], [{}]),
        "change_case:english_capital": ([{}], [{}]),
        "punctuation:no_comma": ([{}], [{}]),
        "startend:quotation": ([{}], [{}]),
        "detectable_format:title": ([{}], [{}]),
        "detectable_format:json_format": ([{}], [{}]),
        "length_constraints:number_words": (
            [{"num_words": n, "relation": "less than"} for n in (20, 30, 50, 70)]
            + [{"num_words": n, "relation": "at least"} for n in (40, 60)],
            [{"num_words": n, "relation": "less than"} for n in (25, 40, 60)]
            + [{"num_words": 50, "relation": "at least"}]),
        "keywords:existence": ([{"keywords": [w]} for w in kw_train] + pairs(kw_train),
                               [{"keywords": [w]} for w in kw_held] + pairs(kw_held)),
        "keywords:forbidden_words": ([{"forbidden_words": list(p)} for p in zip(forbid_train[::2], forbid_train[1::2])],
                                     [{"forbidden_words": list(p)} for p in zip(forbid_held[::2], forbid_held[1::2])]
                                     + [{"forbidden_words": [forbid_held[-1]]}]),
        "startend:end_checker": ([{"end_phrase": p} for p in end_train], [{"end_phrase": p} for p in end_held]),
        "detectable_content:postscript": ([{"postscript_marker": "P.S."}], [{"postscript_marker": "P.P.S"}]),
        "detectable_format:number_bullet_lists": ([{"num_bullets": n} for n in (2, 4, 5)],
                                                  [{"num_bullets": n} for n in (3, 6)]),
    }


INSTANCES = _instances()
ALL_TYPES = tuple(INSTANCES)
# Kept after measuring the bundled model (BENCHMARKS.md, "Constraint base rates": 16 held-out prompts
# per type, greedy and 4 samples at temperature 1.0, 64 new tokens): the types whose greedy or sampled
# rate lies in [0.05, 0.9]. Left out: lowercase, all capitals and quotation (0.00 greedy and sampled),
# title and forbidden words (1.00 greedy). Override with `types=`.
DEFAULT_TYPES = ("punctuation:no_comma", "detectable_format:json_format", "length_constraints:number_words",
                 "keywords:existence", "startend:end_checker", "detectable_content:postscript",
                 "detectable_format:number_bullet_lists")


def describe(instruction_id: str, kwargs: dict) -> str:
    """IFEval's own wording of one constraint instance (lm-eval's checker `build_description`)."""
    from lm_eval.tasks.ifeval import instructions_registry
    if instruction_id not in instructions_registry.INSTRUCTION_DICT:
        raise ValueError(f"unknown IFEval instruction {instruction_id!r}.")
    checker = instructions_registry.INSTRUCTION_DICT[instruction_id](instruction_id)
    return checker.build_description(**kwargs)


def _conflicts(a: str, b: str) -> bool:
    from lm_eval.tasks.ifeval import instructions_registry
    return (a == b or b in instructions_registry.INSTRUCTION_CONFLICTS.get(a, ())
            or a in instructions_registry.INSTRUCTION_CONFLICTS.get(b, ())
            or {a, b} & {"detectable_format:json_format", "startend:quotation"} != set())


def split_requests() -> tuple[list[str], list[str]]:
    """(training requests, held-out requests): disjoint in topic and in template."""
    topics = list(TOPICS)
    random.Random(1234).shuffle(topics)
    held_topics = topics[:round(len(topics) * HELDOUT_TOPIC_FRACTION)]
    train_topics = topics[len(held_topics):]
    train_templates, held_templates = REQUESTS[:-HELDOUT_REQUESTS], REQUESTS[-HELDOUT_REQUESTS:]
    train = [t.format(topic=topic) for t in train_templates for topic in train_topics]
    heldout = [t.format(topic=topic) for t in held_templates + train_templates[:2] for topic in held_topics]
    return train, heldout


def _record(request: str, constraints: list[tuple[str, dict]]) -> dict:
    text = " ".join([request] + [describe(i, k) for i, k in constraints])
    return {"prompt": [{"role": "user", "content": text}],
            "instruction_id_list": [i for i, _ in constraints], "kwargs": [dict(k) for _, k in constraints],
            "constraint": "+".join(i for i, _ in constraints), "request": request}


def make_constraint_records(n: int, *, heldout: bool, seed: int = 0, types: Sequence[str] = DEFAULT_TYPES,
                            two_constraints: float = 0.25) -> list[dict]:
    """`n` records from the training or the held-out side: each request with one constraint (two,
    non-conflicting, with probability `two_constraints`), types drawn in turn so every type gets an
    even share of single-constraint records."""
    unknown = [t for t in types if t not in INSTANCES]
    if unknown:
        raise ValueError(f"unknown constraint type {unknown[0]!r}; known: {sorted(INSTANCES)}.")
    if not types:
        raise ValueError("no constraint types given.")
    rng = random.Random(2 * seed + int(heldout))
    requests = split_requests()[int(heldout)]
    side = int(heldout)
    records = []
    order = list(types)
    for i in range(n):
        if i % len(order) == 0:
            rng.shuffle(order)
        first = order[i % len(order)]
        constraints = [(first, rng.choice(INSTANCES[first][side]))]
        if len(types) > 1 and rng.random() < two_constraints:
            others = [t for t in types if not _conflicts(first, t)]
            if others:
                second = rng.choice(others)
                constraints.append((second, rng.choice(INSTANCES[second][side])))
        records.append(_record(rng.choice(requests), constraints))
    return records


def constraint_records(num_train: int, num_heldout: int, seed: int = 0, types: Sequence[str] = DEFAULT_TYPES,
                       two_constraints: float = 0.25) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records): held-out requests and constraint instances never occur
    in training (see the module docstring)."""
    return (make_constraint_records(num_train, heldout=False, seed=seed, types=types, two_constraints=two_constraints),
            make_constraint_records(num_heldout, heldout=True, seed=seed, types=types,
                                    two_constraints=two_constraints))


def write_constraint_data(directory, num_train: int, num_heldout: int, seed: int = 0,
                          types: Sequence[str] = DEFAULT_TYPES, two_constraints: float = 0.25) -> dict:
    """Write `train.jsonl` and `heldout.jsonl` into `directory` (prompt records for `train_ppo
    --train_data/--heldout_data` with `--reward_fn=easytune.eval.verifiers:ifeval_reward`); returns
    their paths."""
    import json
    import os
    os.makedirs(directory, exist_ok=True)
    train, heldout = constraint_records(num_train, num_heldout, seed=seed, types=types,
                                        two_constraints=two_constraints)
    paths = {}
    for name, records in (("train", train), ("heldout", heldout)):
        paths[name] = os.path.join(directory, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return paths


def main(argv=None) -> None:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m easytune.data.constraints",
                                     description="Write the instruction-constraint task set (train.jsonl, "
                                                 "heldout.jsonl) for RL with the IFEval verifier as reward.")
    parser.add_argument("--out", required=True, help="directory to write train.jsonl and heldout.jsonl into")
    parser.add_argument("--num_train", type=int, default=512)
    parser.add_argument("--num_heldout", type=int, default=96)
    parser.add_argument("--types", default="", help=f"comma-separated IFEval instruction ids (default: "
                                                    f"{','.join(DEFAULT_TYPES)})")
    parser.add_argument("--two_constraints", type=float, default=0.25, help="share of prompts with two constraints")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    types = [t for t in args.types.split(",") if t] or list(DEFAULT_TYPES)
    paths = write_constraint_data(args.out, args.num_train, args.num_heldout, seed=args.seed, types=types,
                                  two_constraints=args.two_constraints)
    print(f"wrote {paths['train']} ({args.num_train} records) and {paths['heldout']} ({args.num_heldout})")


if __name__ == "__main__":
    main()
