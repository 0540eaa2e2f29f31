"""Data at scale: tokenization throughput, time to first step (cold and cached) and peak memory per
token of the SFT data path, on a synthetic chat dataset (default 1,000,000 records).

    python scripts/bench_data.py [--records 1000000] [--sample 20000] [--num_proc 0] [--workdir DIR]

1. Throughput, same records (the first `--sample`), interleaved: the path before the cache (one
   record at a time: `tokenize_conversation` per record, Python lists, `make_rows` over all) against
   `tokenized_rows` (batched rendering, `--num_proc` processes, Arrow); ratio of records/s.
   Memory per token: each child's RSS growth from the tokenizer loaded to the rows built.
2. `tokenized_rows` on all records into a fresh cache (cold), then again (cached), to the first
   batch: seconds and RSS growth per token.
3. `python -m easytune.train_sft --total_steps=1` on all records with a tiny model (SmolLM2's
   tokenizer and template): on the cache step 2 filled, and on a fresh one (cold). Wall time from the
   process start to its end after one step (load, data, compile, step); peak RSS (`/usr/bin/time`).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or "
         "had by hot word but what some we can out other were all there when up use your how said an each she "
         "which do their time if will way about many then them write would like so these her long make thing see "
         "him two has look more day could go come did number sound no most people my over know water than call "
         "first who may down side been now find").split()


def write_records(path: str, count: int, seed: int = 0) -> None:
    """Chat records of 1-3 turns (a system prompt in two of three), 5-60 words per message."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(count):
            messages = [{"role": "system", "content": "You are a helpful assistant."}] if i % 3 else []
            for _ in range(rng.randint(1, 3)):
                for role in ("user", "assistant"):
                    messages.append({"role": role, "content": " ".join(rng.choices(WORDS, k=rng.randint(5, 60)))})
            f.write(json.dumps({"messages": messages}) + "\n")


BASELINE = r"""
import resource, sys, time
from transformers import AutoTokenizer
from easytune import assets, data
from easytune.data.tokenize import Example, tokenize_conversation
tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_hf_dir())
template = data.resolve_chat_template(tokenizer, None)
path, seq_length = sys.argv[1], int(sys.argv[2])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
located = data.load_located_records(path)
examples = []
for record, where in located:  # one record at a time, as before the cache
    e = tokenize_conversation(record["messages"], tokenizer, template)
    e = Example(e.input_ids[:seq_length], e.loss_mask[:seq_length])
    if e.num_trainable_targets:
        examples.append(e)
rows = data.make_rows(examples, seq_length, pack=True)
seconds = time.perf_counter() - start
tokens = sum(len(e.input_ids) for e in examples)
print("BASELINE", len(located), seconds, tokens, base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

CACHED = r"""
import resource, sys, time
from transformers import AutoTokenizer
from easytune import assets, data
tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_hf_dir())
template = data.resolve_chat_template(tokenizer, None)
path, seq_length, num_proc, cache_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
rows, stats = data.tokenized_rows(path, tokenizer, template, seq_length, True, num_proc=num_proc,
                                  cache_dir=None if cache_dir == "-" else cache_dir)
batch = next(data.BatchIterator(rows, 8, seed=0))
seconds = time.perf_counter() - start
print("CACHED", stats.num_records, seconds, stats.num_tokens, base,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def child(code: str, *args) -> list[float]:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    line = next(line for line in out.stdout.splitlines() if line.startswith(("BASELINE", "CACHED")))
    return [float(x) for x in line.split()[1:]]


def timed_run(command: list[str], env: dict) -> tuple[float, int, str]:
    """Wall seconds, peak RSS in bytes (of the largest process) and stderr of `command`."""
    start = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *command], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    rss = int(re.findall(r"MAXRSS_KB (\d+)", out.stderr)[-1]) * 1024
    return seconds, rss, out.stderr


def tiny_model(directory: str) -> str:
    import torch
    import transformers

    from easytune import assets
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    source = assets.smollm2_hf_dir()
    for name in os.listdir(source):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(source, name), directory)
    return directory


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--sample", type=int, default=20_000, help="records of the side-by-side throughput pairs")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seq_length", type=int, default=2048)
    parser.add_argument("--num_proc", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--steps", default="pairs,data_cold,data_cached,cli_cached,cli_cold",
                        help="what to measure, in order: pairs, data_cold, data_cached, cli_cold, cli_cached (a cached "
                             "step reads the cache the last cold step filled)")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_data_")
    os.makedirs(workdir, exist_ok=True)
    full, sample = os.path.join(workdir, "chat.jsonl"), os.path.join(workdir, "sample.jsonl")
    if not os.path.exists(full):
        write_records(full, args.records)
    with open(full) as f, open(sample, "w") as g:
        for _, line in zip(range(args.sample), f):
            g.write(line)
    print(f"data: {args.records:,} records, {os.path.getsize(full) / 2**20:.0f} MiB ({full})", flush=True)

    steps = args.steps.split(",")
    if "pairs" in steps:
        ratios = []
        for pair in range(args.pairs):
            n, base_s, base_tokens, base_before, base_rss = child(BASELINE, sample, args.seq_length)
            _, new_s, new_tokens, _, _ = child(CACHED, sample, args.seq_length, args.num_proc, "")
            assert base_tokens == new_tokens, (base_tokens, new_tokens)
            ratios.append(base_s / new_s)
            print(f"pair {pair}: {int(n):,} records, baseline {n / base_s:,.0f} records/s ({base_tokens / base_s:,.0f} "
                  f"tokens/s), tokenized_rows {n / new_s:,.0f} records/s: {base_s / new_s:.2f}x; baseline RSS "
                  f"{base_before / 2**20:.0f} -> {base_rss / 2**20:.0f} MiB: "
                  f"{(base_rss - base_before) / base_tokens:.0f} bytes/token", flush=True)
        print(f"ratio tokenized_rows/baseline throughput: {statistics.median(ratios):.2f}x "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})", flush=True)

    model = tiny_model(os.path.join(workdir, "tiny"))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    store = None  # the cache the last cold step filled
    for step in steps:
        if step == "pairs":
            continue
        what, label = step.rsplit("_", 1)
        if label == "cold":
            store = tempfile.mkdtemp(prefix="cache_", dir=workdir)
        elif store is None:
            raise SystemExit(f"{step} needs a cold step before it (the cache it reads)")
        if what == "data":
            n, seconds, tokens, before, rss = child(CACHED, full, args.seq_length, args.num_proc, store)
            print(f"data, {label}: {int(n):,} records -> first batch in {seconds:.1f} s ({n / seconds:,.0f} "
                  f"records/s, {tokens / seconds:,.0f} tokens/s); RSS {before / 2**20:.0f} -> {rss / 2**20:.0f} MiB: "
                  f"{(rss - before) / tokens:.2f} bytes/token ({int(tokens):,} tokens)", flush=True)
            continue
        output_dir = os.path.join(workdir, "run_" + label)
        shutil.rmtree(output_dir, ignore_errors=True)
        command = [sys.executable, "-m", "easytune.train_sft", f"--model={model}", f"--train_data={full}",
                   f"--seq_length={args.seq_length}", "--batch_size=8", "--total_steps=1", "--head_chunk_size=1024",
                   "--logger=none", f"--data_cache_dir={store}", f"--data_num_proc={args.num_proc}",
                   f"--output_dir={output_dir}"]
        seconds, rss, stderr = timed_run(command, env)
        tokens = int(re.findall(r"(\d+) tokens, \d+ trained", stderr)[-1])
        print(f"train_sft, {label}: first step done {seconds:.1f} s after start ({tokens:,} tokens); peak RSS "
              f"{rss / 2**20:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
