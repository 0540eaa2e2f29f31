"""SmolLM2-135M-Instruct on this machine: first-call compile time of the forward, and greedy
generation throughput of easytune next to transformers (PyTorch) on the same prompts.

    python scripts/bench_generate.py [--batch 4] [--new_tokens 64] [--repeats 3]

Runs the two interleaved and prints medians and the easytune/transformers ratio (higher is
faster for easytune).
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

import easytune
from easytune import assets, generate as gen

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primary colors.",
           "Explain gravity to a child.", "What is 12 plus 7?", "Name a famous painter.",
           "Give me a synonym for happy.", "How many legs does a spider have?"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    directory = assets.smollm2_hf_dir()
    model = easytune.load(directory, devices=jax.devices()[:1], mesh_dim="1,1,1")
    tokens = np.ones((1, 128), np.int32)
    start = time.perf_counter()
    jax.block_until_ready(model(tokens))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(model(tokens))
    print(f"forward [1, 128]: first call {compile_s:.2f}s (compile + run), then {time.perf_counter() - start:.3f}s")

    chats = [[{"role": "user", "content": p}] for p in PROMPTS[: args.batch]]
    prompts = [model._encode(c) for c in chats]
    sampling = gen.SamplingConfig(max_new_tokens=args.new_tokens)

    def ours():
        out = gen.generate_tokens(model.config, model.params, prompts, sampling, eos_ids=[], pad_id=model.pad_token_id)
        return sum(len(o) for o in out)

    start = time.perf_counter()
    ours()
    print(f"easytune generate: first call {time.perf_counter() - start:.2f}s (compile + run)")

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    torch_model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, padding_side="left")
    batch = tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True,
                                          return_tensors="pt", return_dict=True)

    def theirs():
        with torch.no_grad():
            out = torch_model.generate(**batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                       do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]

    def timed(fn):
        start = time.perf_counter()
        count = fn()
        return count / (time.perf_counter() - start)

    theirs()  # warm-up
    # Interleaved pairs: drift on a shared machine hits both sides of each ratio alike.
    pairs = [(timed(ours), timed(theirs)) for _ in range(args.repeats)]
    ours_tps = statistics.median(p[0] for p in pairs)
    theirs_tps = statistics.median(p[1] for p in pairs)
    ratio = statistics.median(p[0] / p[1] for p in pairs)
    print(f"greedy generation, batch {args.batch}, {args.new_tokens} new tokens, {args.repeats} interleaved pairs:")
    print(f"  easytune (JAX):              {ours_tps:8.1f} tokens/s (median)")
    print(f"  transformers (PyTorch, CPU): {theirs_tps:8.1f} tokens/s (median)")
    print(f"  ratio easytune/transformers: {ratio:.2f}x (median of pair ratios; range "
          f"{min(p[0] / p[1] for p in pairs):.2f}-{max(p[0] / p[1] for p in pairs):.2f})")


if __name__ == "__main__":
    main()
