"""First logged losses of the SFT, DPO, reward and GRPO entry points on fixed seeds, as JSON.

Run it on two commits (e.g. before and after a refactor of the run driver) and compare: the
entry points' behaviour is unchanged when every figure is equal.

    python scripts/recipe_losses.py [--steps 3] [--out losses.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

FIGURES = ("loss", "grad_norm", "accuracy", "rewards/margins", "reward/mean", "objective/kl", "policy/clipfrac")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from conftest import logged, make_char_chat_model, make_chat_model, run_config

    from easytune import data
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        chat = make_chat_model(os.path.join(tmp, "chat"))
        char = make_char_chat_model(os.path.join(tmp, "char"))
        sft_data = os.path.join(tmp, "sft.jsonl")
        with open(sft_data, "w") as f:
            for record in data.make_task_records(96, seed=1):
                f.write(json.dumps({"messages": record["messages"]}) + "\n")
        pairs = os.path.join(tmp, "pairs.jsonl")
        with open(pairs, "w") as f:
            for r in data.task_pairs(data.make_task_records(32, seed=3), seed=0):
                f.write(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
        prompts = os.path.join(tmp, "prompts.jsonl")
        with open(prompts, "w") as f:
            for record in data.make_task_records(64, seed=3):
                f.write(json.dumps(record) + "\n")
        reward_fn = os.path.join(tmp, "recipe_losses_rewards.py")
        with open(reward_fn, "w") as f:
            f.write("def digit_fraction(prompts, completions, **kwargs):\n"
                    "    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]\n")
        sys.path.insert(0, tmp)

        common = {"logger": "none", "log_steps": 1}
        jobs = {
            "sft": ("easytune.train_sft", chat, sft_data, {"seq_length": 128, "total_steps": args.steps}),
            "sft_lora": ("easytune.train_sft", chat, sft_data, {"seq_length": 128, "total_steps": args.steps,
                                                                "peft": "lora", "lora.dropout": 0.0}),
            "dpo": ("easytune.train_dpo", chat, pairs, {"seq_length": 128, "total_steps": args.steps,
                                                        "peft": "none", "optimizer.lr": 1e-3}),
            "dpo_lora": ("easytune.train_dpo", chat, pairs, {"seq_length": 128, "total_steps": args.steps,
                                                             "lora.dropout": 0.0}),
            "reward": ("easytune.train_reward", chat, pairs, {"seq_length": 128, "total_steps": args.steps}),
            "grpo": ("easytune.train_ppo", char, prompts, {
                "algo": "grpo", "iterations": args.steps, "rollout_batch_size": 16, "rollouts_per_prompt": 4,
                "max_new_tokens": 16, "temperature": 1.0, "peft": "none", "optimizer.lr": 3e-3,
                "reward_fn": "recipe_losses_rewards:digit_fraction"}),
            "ppo": ("easytune.train_ppo", char, prompts, {
                "algo": "ppo", "iterations": args.steps, "rollout_batch_size": 16, "rollouts_per_prompt": 1,
                "max_new_tokens": 16, "temperature": 1.0, "optimizer.lr": 3e-3,
                "reward_fn": "recipe_losses_rewards:digit_fraction"}),
        }
        import importlib
        for name, (module_name, model, train_data, overrides) in jobs.items():
            module = importlib.import_module(module_name)
            output_dir = os.path.join(tmp, name)
            cfg = run_config(module.DEFAULTS, {"model": model, "train_data": train_data, "output_dir": output_dir,
                                               **common, **overrides})
            module.run(cfg)
            out[name] = [{k: h[k] for k in FIGURES if k in h} for h in logged(output_dir)]
            print(name, json.dumps(out[name][0]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
