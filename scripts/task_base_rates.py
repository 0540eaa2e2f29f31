"""How often a model answers the verifiable tasks exactly, per task: the mean exact match per sample
and pass@k at a temperature, the greedy accuracy, and what guessing from the answers' own
distribution would score. RL with an exact-match reward needs a policy whose right answers depend on
the question; run this before an RL job to see whether one does.

    python scripts/task_base_rates.py [--model DIR] [--tasks count,subtract] [--num 24] [--shots 2]
                                      [--samples 8] [--temperature 1.0] [--max_new_tokens 8]
"""
from __future__ import annotations

import argparse
import collections

import numpy as np


def main() -> None:
    import easytune
    from easytune import assets, data

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF or easytune run directory (default: bundled SmolLM2)")
    parser.add_argument("--tasks", default=",".join(data.TASKS))
    parser.add_argument("--num", type=int, default=24, help="held-out questions per task")
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=8)
    args = parser.parse_args()

    model = easytune.load(args.model or assets.smollm2_hf_dir())
    print(f"{'task':9s} {'greedy':>7s} {'per sample':>10s} {'pass@' + str(args.samples):>7s} {'prior guess':>11s}  greedy answers")
    for task in args.tasks.split(","):
        _, held = data.train_and_heldout(16, args.num, seed=0, tasks=(task,))
        held = data.with_examples(held, args.shots, seed=10_000)
        prompts = [r["messages"][:-1] for r in held]
        greedy = model.generate(prompts, max_new_tokens=args.max_new_tokens)
        right = np.zeros((len(held), args.samples), bool)
        for s in range(args.samples):  # one prompt batch per sample keeps the prefill's memory bounded
            sampled = model.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=1 + s)
            right[:, s] = [data.exact_match(p, r["answer"]) for p, r in zip(sampled, held)]
        answers = collections.Counter(r["answer"] for r in held)
        prior = sum((n / len(held)) ** 2 for n in answers.values())  # a guess drawn from the answer distribution
        print(f"{task:9s} {data.accuracy(greedy, held):7.3f} {right.mean():10.3f} {right.any(1).mean():7.3f} "
              f"{prior:11.3f}  {collections.Counter(greedy).most_common(3)}", flush=True)


if __name__ == "__main__":
    main()
