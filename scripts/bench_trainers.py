"""Step time, train-state memory and the learning curve's ends of every trainer on SmolLM2-135M-Instruct
(the bundled model), side by side on the same records and batch size.

    python scripts/bench_trainers.py [--steps 8] [--batch 4] [--seq 256] [--only sft,ilql] [--out figures.json]

Dataset trainers (SFT, DPO, KTO, distillation, ILQL) train all weights, `--batch` records per step
(SFT: packed rows of `--seq` tokens; DPO: pairs; KTO: examples, each also run as its KL companion;
ILQL: episodes), on the verifiable task records (`easytune.data.make_task_records`): SFT and
distillation on the correct answers, DPO on (correct, wrong) pairs, KTO on the same pairs
unpaired, ILQL on the same completions as episodes with reward 1 (correct) or 0 (wrong).
Distillation's student is SmolLM2 with every other layer (15 of 30, the DistilBERT-style init),
its teacher the full model. The GRPO family (grpo, dapo, dr_grpo, gspo) runs `--rl_iterations`
RL iterations each with LoRA (4 prompts x 4 samples, 24 new tokens), rewarded by the share of digits
in the completion (a reward the model partly earns; it cannot solve the tasks exactly). Step time is the median
`step_seconds` after the first (compiling) step, with its range; memory is the Trainer's live train
state (`summary.json` `train_state_bytes`).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import statistics
import sys
import tempfile
import time

RL_ALGOS = ("grpo", "dapo", "dr_grpo", "gspo")


def half_depth_student(directory: str) -> str:
    """SmolLM2 with layers 0, 2, 4, ... (15 of 30), exported as an HF directory."""
    import jax

    import easytune
    model = easytune.load()
    model.params = {**model.params, "layers": jax.tree.map(lambda x: x[::2], model.params["layers"])}
    depth = jax.tree.leaves(model.params["layers"])[0].shape[0]
    model.config = dataclasses.replace(model.config, num_layers=depth)
    model.hf_config = {**(model.hf_config or {}), "num_hidden_layers": depth}
    model.save_pretrained(directory)
    return directory


def run_config(defaults, overrides: dict):
    """An entry point's config: `defaults` with `overrides` (dotted keys for nested fields). As
    tests/conftest.py's, which cannot be imported here: it simulates 8 devices, and this measures one."""
    from ml_collections import ConfigDict
    cfg = ConfigDict(defaults)
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return cfg


def logged(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def write_data(tmp: str, count: int) -> dict[str, str]:
    from easytune import data
    records = data.make_task_records(count, seed=7)
    pairs = data.task_pairs(records, seed=0)
    paths = {name: os.path.join(tmp, f"{name}.jsonl") for name in ("sft", "pairs", "episodes", "prompts")}
    with open(paths["sft"], "w") as f:
        f.writelines(json.dumps({"messages": r["messages"]}) + "\n" for r in records)
    with open(paths["pairs"], "w") as f:
        f.writelines(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for p in pairs)
    with open(paths["episodes"], "w") as f:
        for p in pairs:
            for side, reward in (("chosen", 1.0), ("rejected", 0.0)):
                f.write(json.dumps({"prompt": p["prompt"], "completion": p[side], "reward": reward}) + "\n")
    with open(paths["prompts"], "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rl_iterations", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--only", default="")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from easytune import assets
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_data(tmp, 64)
        with open(os.path.join(tmp, "bench_trainer_rewards.py"), "w") as f:  # a reward SmolLM2 partly earns
            f.write("def digit_fraction(prompts, completions, **kwargs):\n"
                    "    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]\n")
        sys.path.insert(0, tmp)
        common = {"logger": "none", "log_steps": 1, "seq_length": args.seq, "batch_size": args.batch,
                  "optimizer.warmup_steps": 0}
        dataset = {"total_steps": args.steps, "peft": "none"}
        jobs = {
            "sft": ("easytune.train_sft", paths["sft"], {**dataset, "optimizer.lr": 1e-5}),
            "dpo": ("easytune.train_dpo", paths["pairs"], {**dataset, "optimizer.lr": 5e-6}),
            "kto": ("easytune.train_kto", paths["pairs"], {**dataset, "optimizer.lr": 5e-6}),
            "distill": ("easytune.train_distill", paths["sft"], {**dataset, "optimizer.lr": 1e-4, "teacher": "FULL",
                                                                 "model": "STUDENT"}),
            "ilql": ("easytune.train_ilql", paths["episodes"], {**dataset, "optimizer.lr": 5e-5}),
            **{algo: ("easytune.train_ppo", paths["prompts"], {
                "algo": algo, "iterations": args.rl_iterations, "rollout_batch_size": 16, "rollouts_per_prompt": 4,
                "max_new_tokens": 24, "temperature": 1.0, "peft": "lora",
                "reward_fn": "bench_trainer_rewards:digit_fraction", "batch_size": 16}) for algo in RL_ALGOS},
        }
        only = [name for name in args.only.split(",") if name]
        for name, (module_name, train_data, overrides) in jobs.items():
            if only and name not in only:
                continue
            if overrides.get("teacher") == "FULL":
                overrides = {**overrides, "teacher": assets.smollm2_hf_dir(),
                             "model": half_depth_student(os.path.join(tmp, "student"))}
            module = importlib.import_module(module_name)
            output_dir = os.path.join(tmp, name)
            cfg = run_config(module.DEFAULTS, {"train_data": train_data, "output_dir": output_dir, "export_hf": False,
                                               **common, **overrides})
            started = time.perf_counter()
            summary = module.run(cfg)
            records = [r for r in logged(output_dir) if "step_seconds" in r]
            times = [r["step_seconds"] for r in records[1:]] or [records[0]["step_seconds"]]
            curve = [r.get("reward/mean", r.get("loss")) for r in records]
            state = summary.get("train_state_bytes", {})
            out[name] = {"step_seconds_median": statistics.median(times),
                         "step_seconds_range": [min(times), max(times)],
                         "first_step_seconds": records[0].get("first_step_seconds"),
                         "state_mib": {k: round(v / 2**20, 1) for k, v in state.items()},
                         "state_mib_total": round(sum(state.values()) / 2**20, 1) if state else None,
                         "curve_start": curve[0], "curve_end": curve[-1], "curve": curve, "steps": len(records),
                         "tokens_per_step": statistics.median(r.get("tokens_per_second", 0) * r["step_seconds"]
                                                              for r in records),
                         "tokens_per_second": statistics.median(r.get("tokens_per_second", 0) for r in records[1:])
                         if len(records) > 1 else None,
                         "wall_seconds": time.perf_counter() - started}
            if name in RL_ALGOS:
                out[name]["reward_curve"] = [r.get("reward/mean") for r in records]
            print(name, json.dumps(out[name]), flush=True)
    print()
    print("| trainer | step s (median, range) | train state MiB (params / optimizer / frozen / heads) | total MiB | "
          "curve start -> end |")
    print("|---|---|---|---|---|")
    for name, f in out.items():
        parts = " / ".join(f"{f['state_mib'].get(k, 0):g}" for k in ("params", "optimizer", "frozen", "heads"))
        print(f"| {name} | {f['step_seconds_median']:.2f} ({f['step_seconds_range'][0]:.2f}-"
              f"{f['step_seconds_range'][1]:.2f}) | {parts} | {f['state_mib_total']} | "
              f"{f['curve_start']:.4g} -> {f['curve_end']:.4g} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
