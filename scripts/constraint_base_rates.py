"""Per-constraint satisfaction of a model on the instruction-constraint task set
(`easytune.data.constraints`), greedy and sampled: what a reward has to work with before RL.

    python scripts/constraint_base_rates.py                       # the bundled SmolLM2-135M-Instruct
    python scripts/constraint_base_rates.py --model outputs/rft --per_type 16 --samples 8 --split heldout

Prints, per constraint type: the greedy satisfaction rate, the mean over `--samples` samples at
`--temperature`, pass@k (unbiased, Chen et al. 2021), the share of completions cut at
`--max_new_tokens`, and the mean completion length in tokens. Only single-constraint records are
used, so each row is one constraint's own rate.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def satisfaction(model, records, *, max_new_tokens: int, temperature: float, samples: int, seed: int,
                 batch: int = 32) -> dict:
    """{"greedy": [0/1 per record], "sampled": [[0/1 per sample] per record], "lengths", "cut"}."""
    from easytune.eval import verifiers
    prompts = [r["prompt"] for r in records]

    def run(prompt_list, **sampling):
        ids = []
        for start in range(0, len(prompt_list), batch):
            ids += model.generate(prompt_list[start:start + batch], max_new_tokens=max_new_tokens,
                                  return_tokens=True, seed=seed + start, **sampling)
        return ids

    def score(ids, recs):
        texts = [model.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
        return verifiers.ifeval_reward([r["prompt"] for r in recs], texts, [r["instruction_id_list"] for r in recs],
                                       [r["kwargs"] for r in recs]), texts
    eos = set(model.eos_token_ids)
    greedy_ids = run(prompts, temperature=0.0)
    greedy, greedy_texts = score(greedy_ids, records)
    sampled_ids = run([p for p in prompts for _ in range(samples)], temperature=temperature) if samples else []
    sampled, _ = score(sampled_ids, [r for r in records for _ in range(samples)]) if samples else ([], [])
    lengths = [len(i) for i in greedy_ids + sampled_ids]
    cut = [not (set(i) & eos) and len(i) >= max_new_tokens for i in greedy_ids + sampled_ids]
    return {"greedy": greedy, "sampled": [sampled[k * samples:(k + 1) * samples] for k in range(len(records))],
            "lengths": lengths, "cut": cut, "greedy_texts": greedy_texts}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the bundled SmolLM2)")
    parser.add_argument("--per_type", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--split", choices=("train", "heldout"), default="heldout")
    parser.add_argument("--types", default="", help="comma-separated constraint types (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=0, help="print this many greedy completions per type")
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args()

    import easytune
    from easytune.data import constraints
    from easytune.eval.verifiers import pass_at_k
    types = [t for t in args.types.split(",") if t] or list(constraints.ALL_TYPES)
    records = []
    for kind in types:
        records += constraints.make_constraint_records(args.per_type, heldout=args.split == "heldout",
                                                       seed=args.seed, types=[kind], two_constraints=0.0)
    model = easytune.load(args.model) if args.model else easytune.load()
    started = time.time()
    got = satisfaction(model, records, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       samples=args.samples, seed=args.seed)
    elapsed = time.time() - started
    print(f"{len(records)} {args.split} prompts, greedy + {args.samples} samples at temperature "
          f"{args.temperature}, max_new_tokens {args.max_new_tokens}: {elapsed:.0f} s")
    print(f"| constraint | greedy | mean over samples | pass@{args.samples} |")
    print("|---|---|---|---|")
    rows = {}
    for kind in types:
        idx = [i for i, r in enumerate(records) if r["constraint"] == kind]
        greedy = float(np.mean([got["greedy"][i] for i in idx]))
        sampled = [got["sampled"][i] for i in idx]
        mean = float(np.mean(sampled)) if args.samples else float("nan")
        passk = (float(np.mean([pass_at_k(len(s), int(sum(s)), len(s)) for s in sampled])) if args.samples
                 else float("nan"))
        rows[kind] = {"greedy": greedy, "sampled_mean": mean, f"pass@{args.samples}": passk}
        print(f"| {kind} | {greedy:.2f} | {mean:.2f} | {passk:.2f} |")
        for i in idx[:args.show]:
            print("    ", json.dumps(got["greedy_texts"][i])[:300])
    print(f"mean length {np.mean(got['lengths']):.1f} tokens; cut at max_new_tokens: {np.mean(got['cut']):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "seconds": elapsed,
                       "mean_length": float(np.mean(got["lengths"])), "cut": float(np.mean(got["cut"]))}, f, indent=1)


if __name__ == "__main__":
    main()
