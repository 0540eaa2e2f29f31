"""The RL demo pipeline on instruction constraints ("DPO vs PPO" in miniature), from the bundled
SmolLM2-135M-Instruct, every stage one of easytune's own commands:

    python scripts/constraint_pipeline.py --out outputs/constraints            # every stage
    python scripts/constraint_pipeline.py --out outputs/constraints --stages grpo,ppo   # reuse earlier stages

1. **data**: the constraint task set (`python -m easytune.data.constraints`): train and held-out
   prompts, disjoint in request and in constraint instance.
2. **base**: held-out satisfaction of the start model (greedy, and the mean over samples).
3. **rft**: rejection-sampling SFT (trlx's RFT, open-instruct's rejection sampling): sample
   `--rft_samples` completions per training prompt, keep those the verifier fully accepts (at most
   `--rft_keep` distinct ones per prompt), `python -m easytune.train_sft` on them. The same samples
   give the DPO pairs (an accepted and a rejected completion of one prompt) and the ILQL episodes
   (every sample with its reward).
4. **grpo**, **ppo**: `python -m easytune.train_ppo` from the RFT model, the verifier
   (`easytune.eval.verifiers:ifeval_reward`) as reward, held-out satisfaction before, every
   `--heldout_steps` iterations and after. PPO's critic is the value head on the policy
   (`--critic=shared`); `--extra ppo=--critic=model --extra ppo=--value_lr=1e-4` gives it a value
   model of its own (a second SmolLM2, all weights), as the first table in BENCHMARKS.md did.
   PPO runs GAE with λ = 1 (Monte-Carlo returns less the value): the reward comes on the last
   token only, and with TRL's λ = 0.95 and a critic that has not learnt the values a 40-token
   response's first tokens get 0.95^40 ≈ 0.13 of it (held-out sampled +0.02 ± 0.02 at λ 0.95,
   +0.14 ± 0.03 at λ 1, BENCHMARKS.md); `--extra ppo=--lam=0.95` restores TRL's. The policy loss's
   forward is fused with its backward (`--exact_ratio=false`: one forward fewer per minibatch; over 20
   iterations it drew the same samples as the exact mode and its KL agreed to 3e-5, BENCHMARKS.md);
   `--extra ppo=--exact_ratio=true` recomputes it under `jax.checkpoint`, first ratio exactly 1.
   PPO takes 4 optimizer steps per rollout batch of 32 completions (`--num_minibatches=4`, 8
   completions each), GRPO 2. With 2 steps per batch, PPO gained +0.13 to +0.14 held-out sampled in
   20-22 iterations, with KL per completion 0.7-1.9 at the end. With 4 steps per batch, 21 iterations
   gave +0.26 ± 0.04, with KL 3.9 at the end (BENCHMARKS.md). `--extra ppo=--num_minibatches=2`
   restores the former setting.
   Where the RFT stage (or the base stage, for a `--start` that is `--model`) measured the start
   model on the same held-out file with the same settings, the RL stages report those figures as
   "before" and skip their own evaluation before training (`--heldout_before=false`, `known_start`).
5. **dpo**: `python -m easytune.train_dpo` from the RFT model on the pairs.
6. **ilql**: `python -m easytune.train_ilql` from the RFT model on the episodes.
7. **score**: the finished stages' final models (and `--score_also name=DIR`) scored again on the
   held-out prompts with `--score_samples` fresh samples each (seed `--score_seed`), with standard
   errors over prompts and each model's change from the start model as a paired difference on the
   same prompts: 48 prompts with 2 samples each resolve a change of about 0.05 (one standard
   error), which is a third of the 0.15 the RL stages aim for.

Each stage reports held-out satisfaction before -> after (greedy and sampled), the share of distinct
greedy responses, their mean length, KL to its start model where the algorithm measures it, and wall
time; `results.json` collects them and the last lines print the table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REWARD = "easytune.eval.verifiers:ifeval_reward"
STAGES = ("data", "base", "rft", "grpo", "ppo", "dpo", "ilql", "score")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def command(stage: str, args: list[str], log: str) -> float:
    """Run one easytune command, its output into `log`; returns its wall seconds."""
    line = [sys.executable, "-m", *args]
    print(f"[{stage}] {' '.join(line[1:])}", flush=True)
    started = time.time()
    with open(log, "w") as f:
        done = subprocess.run(line, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        with open(log) as f:
            tail = f.read()[-2000:]
        raise SystemExit(f"[{stage}] failed with status {done.returncode}; the end of {log}:\n{tail}")
    return time.time() - started


def evaluate(model_dir, heldout, cfg, *, samples: int | None = None, seed: int | None = None,
             per_prompt: bool = False) -> dict:
    """Held-out figures of a model (`easytune.recipe.heldout_reward`, the RL runs' own measure)."""
    import easytune
    from easytune import recipe, rewards
    model = easytune.load(model_dir) if model_dir else easytune.load()
    return recipe.heldout_reward(model, heldout, rewards.load_reward_fn(REWARD), max_new_tokens=cfg.max_new_tokens,
                                 samples=cfg.heldout_samples if samples is None else samples,
                                 temperature=cfg.temperature, seed=cfg.seed if seed is None else seed,
                                 per_prompt=per_prompt)


def measure(cfg, heldout_path: str) -> dict:
    """How `evaluate` (the base and RFT stages) measures a model: the held-out file's digest and the
    sampling settings. An RL stage that starts from a model measured this way, with none of these
    settings changed for it by --extra, would measure the same figures before training."""
    import hashlib
    with open(heldout_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"heldout_sha256": digest, "samples": cfg.heldout_samples, "seed": cfg.seed,
            "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens}


MEASURE_FLAGS = ("seed", "heldout_samples", "heldout_data", "temperature", "max_new_tokens", "model")


def known_start(results: dict, start_model: str, current: dict, flags: list[str]) -> dict | None:
    """The start model's held-out figures as the base or RFT stage measured them, where the RL stage
    given `flags` (its --extra) would measure the same (then it skips its own evaluation before
    training, `--heldout_before=false`); else None."""
    if any(flag.lstrip("-").partition("=")[0] in MEASURE_FLAGS for flag in flags):
        return None
    for stage in ("rft", "base"):
        got = results.get(stage) or {}
        if got.get("heldout_model") == start_model and got.get("measure") == current:
            return got["heldout"]
    return None


def paired_change(start: list[float], end: list[float]) -> tuple[float, float]:
    """(mean, standard error) of end - start over prompts: the change of a per-prompt figure
    between two models scored on the same prompts (the paired t-test's numerator and
    denominator)."""
    import numpy as np
    from easytune import recipe
    diff = np.asarray(end, np.float64) - np.asarray(start, np.float64)
    if diff.size < 2:
        raise ValueError(f"a paired change needs at least 2 prompts, got {diff.size}.")
    return float(diff.mean()), recipe.standard_error(diff)


def score_table(scores: dict, start: str) -> str:
    """The markdown table of the score stage: each model's greedy and sampled held-out figures
    (mean ± standard error over prompts) and their paired change from model `start`."""
    lines = ["| model | greedy | change | sampled | change | distinct greedy | length |", "|---|---|---|---|---|---|---|"]
    first = scores[start]
    for name, got in scores.items():
        cells = []
        for key, mean in (("accuracy", got["accuracy"]), ("sampled", got["sampled_mean"])):
            cells.append(f"{mean:.3f} ± {got[key + '_stderr']:.3f}")
            if name == start:
                cells.append("start")
            else:
                change, error = paired_change(first[f"{key}_per_prompt"], got[f"{key}_per_prompt"])
                cells.append(f"{change:+.3f} ± {error:.3f}")
        lines.append(f"| {name} | {' | '.join(cells)} | {got['distinct']:.2f} | {got['length_mean']:.1f} |")
    return "\n".join(lines)


def sample_for_rft(train, cfg) -> tuple[list, list, list, dict]:
    """(SFT records, DPO pairs, ILQL episodes, figures) from the start model's samples."""
    import easytune
    from easytune import rewards
    model = easytune.load(cfg.model) if cfg.model else easytune.load()
    prompts = [r["prompt"] for r in train for _ in range(cfg.rft_samples)]
    texts = []
    for start in range(0, len(prompts), 32):
        texts += model.generate(prompts[start:start + 32], max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, seed=cfg.seed + start)
    records = [r for r in train for _ in range(cfg.rft_samples)]
    columns = {k: [r[k] for r in records] for k in ("instruction_id_list", "kwargs")}
    scores = rewards.call_reward_fn(rewards.load_reward_fn(REWARD), prompts, texts, [[]] * len(texts), columns)
    return rft_data(train, texts, scores.tolist(), cfg.rft_samples, cfg.rft_keep)


def rft_data(train, texts, scores, samples: int, keep: int) -> tuple[list, list, list, dict]:
    """From `samples` completions per training prompt (in order) and their rewards: the SFT records
    (at most `keep` distinct fully accepted completions per prompt, reward 1), the DPO pairs (an
    accepted and a rejected completion of one prompt) and the ILQL episodes (every non-empty
    completion with its reward), in the layouts train_sft, train_dpo and train_ilql read."""
    sft, pairs, episodes = [], [], []
    for i, record in enumerate(train):
        group = list(zip(texts[i * samples:(i + 1) * samples], scores[i * samples:(i + 1) * samples]))
        accepted = list(dict.fromkeys(t for t, s in group if s == 1.0 and t.strip()))
        rejected = list(dict.fromkeys(t for t, s in group if s < 1.0 and t.strip()))
        for text in accepted[:keep]:
            sft.append({"messages": record["prompt"] + [{"role": "assistant", "content": text}]})
        if accepted and rejected:
            pairs.append({"prompt": record["prompt"], "chosen": [{"role": "assistant", "content": accepted[0]}],
                          "rejected": [{"role": "assistant", "content": rejected[0]}]})
        episodes += [{"messages": record["prompt"] + [{"role": "assistant", "content": t}], "reward": float(s)}
                     for t, s in group if t.strip()]
    figures = {"samples": len(texts), "sample_mean_reward": float(sum(scores) / max(len(scores), 1)),
               "prompts_with_an_accepted_sample": sum(any(s == 1.0 for s in scores[i * samples:(i + 1) * samples])
                                                      for i in range(len(train))),
               "sft_examples": len(sft), "dpo_pairs": len(pairs), "ilql_episodes": len(episodes)}
    return sft, pairs, episodes, figures


def rl_figures(run_dir: str, before: dict | None = None) -> dict:
    """An RL run's figures from its summary and metrics; `before`: the start model's held-out
    figures where the run did not measure them itself (`known_start`)."""
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    iterations = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "reward/mean" in record:
                iterations.append(record)
    keys = ("accuracy", "sampled_mean", "distinct", "length_mean")
    curve = summary.get("heldout_curve")
    if before is not None:
        before = {k: before.get(k) for k in keys}
        curve = [{"step": 0, **before}, *(curve or [])]
    return {"before": before or {k: summary.get(f"heldout_{k}_before") for k in keys},
            "before_measured_by": "the start model's stage" if before is not None else "the run",
            "after": {k: summary.get(f"heldout_{k}_after") for k in keys},
            "heldout_curve": curve,
            "reward_curve": [round(m["reward/mean"], 3) for m in iterations],
            "kl_last": iterations[-1].get("objective/kl") if iterations else None,
            "entropy_first_last": [iterations[0].get("objective/entropy"), iterations[-1].get("objective/entropy")]
            if iterations else None,
            "train_seconds": summary.get("train_seconds"), "wall_seconds": summary.get("wall_seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/constraints")
    parser.add_argument("--model", default="", help="the start model (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--types", default="", help="constraint types (default: easytune.data.constraints.DEFAULT_TYPES)")
    parser.add_argument("--num_train", type=int, default=256)
    parser.add_argument("--num_heldout", type=int, default=48)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--heldout_samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rft_prompts", type=int, default=128, help="training prompts sampled for RFT")
    parser.add_argument("--rft_samples", type=int, default=4)
    parser.add_argument("--rft_keep", type=int, default=2)
    parser.add_argument("--rft_epochs", type=int, default=2)
    parser.add_argument("--grpo_iterations", type=int, default=20)
    parser.add_argument("--ppo_iterations", type=int, default=21)
    parser.add_argument("--heldout_steps", type=int, default=10)
    parser.add_argument("--start", default="", help="the RL/DPO/ILQL start model (default: the RFT stage's)")
    parser.add_argument("--extra", action="append", default=[], help="stage=--flag=value, passed to that stage")
    parser.add_argument("--score_samples", type=int, default=8, help="samples per held-out prompt in the score stage")
    parser.add_argument("--score_seed", type=int, default=1, help="the score stage's sampling seed")
    parser.add_argument("--score_also", action="append", default=[],
                        help="name=DIR: another model (an HF directory or a run directory) for the score stage")
    cfg = parser.parse_args()
    stages = [s for s in cfg.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}.")
    extra = {}
    for item in cfg.extra:
        stage, _, flag = item.partition("=")
        extra.setdefault(stage, []).append(flag)
    os.makedirs(cfg.out, exist_ok=True)
    results_path = os.path.join(cfg.out, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}

    def save():
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)

    data_dir = os.path.join(cfg.out, "data")
    train_path, heldout_path = os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "heldout.jsonl")
    if "data" in stages:
        from easytune.data import constraints
        types = [t for t in cfg.types.split(",") if t] or list(constraints.DEFAULT_TYPES)
        constraints.write_constraint_data(data_dir, cfg.num_train, cfg.num_heldout, seed=cfg.seed, types=types)
        results["data"] = {"types": types, "num_train": cfg.num_train, "num_heldout": cfg.num_heldout}
        save()
    heldout = read_jsonl(heldout_path)
    current = measure(cfg, heldout_path)  # how the base and RFT stages measure, and the RL stages would
    if "base" in stages:
        started = time.time()
        results["base"] = {"heldout": evaluate(cfg.model or None, heldout, cfg), "seconds": time.time() - started,
                           "heldout_model": cfg.model, "measure": current}
        print(f"[base] {results['base']}", flush=True)
        save()
    rft_dir = os.path.join(cfg.out, "rft")
    start = cfg.start or rft_dir
    common = [f"--max_new_tokens={cfg.max_new_tokens}", f"--seed={cfg.seed}"]
    if "rft" in stages:
        started = time.time()
        train = read_jsonl(train_path)[:cfg.rft_prompts]
        sft, pairs, episodes, figures = sample_for_rft(train, cfg)
        sampling_seconds = time.time() - started
        for name, records in (("rft_sft.jsonl", sft), ("dpo_pairs.jsonl", pairs), ("ilql_episodes.jsonl", episodes)):
            write_jsonl(os.path.join(cfg.out, name), records)
        if not sft:
            raise SystemExit("[rft] no sample was accepted; nothing to fine-tune on.")
        seconds = command("rft", ["easytune.train_sft", *([f"--model={cfg.model}"] if cfg.model else []),
                                  f"--train_data={cfg.out}/rft_sft.jsonl",
                                  f"--output_dir={rft_dir}", "--seq_length=256", "--batch_size=8",
                                  f"--num_epochs={cfg.rft_epochs}", "--peft=lora",
                                  "--export_hf=" + rft_dir + "/hf", *extra.get("rft", [])],
                          os.path.join(cfg.out, "rft.log"))
        results["rft"] = {**figures, "sampling_seconds": sampling_seconds, "train_seconds": seconds,
                          "heldout": evaluate(rft_dir + "/hf", heldout, cfg), "heldout_model": rft_dir + "/hf",
                          "measure": current}
        print(f"[rft] {results['rft']}", flush=True)
        save()
    start_model = start + "/hf" if start == rft_dir else start
    rl_common = ["easytune.train_ppo", f"--model={start_model}", f"--train_data={train_path}",
                 f"--heldout_data={heldout_path}", f"--reward_fn={REWARD}", f"--heldout_samples={cfg.heldout_samples}",
                 f"--heldout_steps={cfg.heldout_steps}", f"--temperature={cfg.temperature}", *common,
                 "--rollout_batch_size=32", "--ppo_epochs=1", "--optimizer.lr=3e-4",
                 "--log_steps=1"]
    def skip_known(stage: str) -> tuple[dict | None, list[str]]:
        known = known_start(results, start_model, current, extra.get(stage, []))
        return known, ([] if known is None else ["--heldout_before=false"])

    if "grpo" in stages:
        out = os.path.join(cfg.out, "grpo")
        known, skip = skip_known("grpo")
        seconds = command("grpo", [*rl_common, *skip, "--algo=grpo", "--rollouts_per_prompt=8", "--num_minibatches=2",
                                   "--kl_coef=0.02",
                                   f"--iterations={cfg.grpo_iterations}", f"--output_dir={out}",
                                   *extra.get("grpo", [])], os.path.join(cfg.out, "grpo.log"))
        results["grpo"] = {**rl_figures(out, known), "seconds": seconds}
        print(f"[grpo] {results['grpo']}", flush=True)
        save()
    if "ppo" in stages:
        out = os.path.join(cfg.out, "ppo")
        known, skip = skip_known("ppo")
        seconds = command("ppo", [*rl_common, *skip, "--algo=ppo", "--rollouts_per_prompt=4", "--kl_coef=0.02",
                                  "--critic=shared", "--lam=1.0", "--exact_ratio=false", "--num_minibatches=4",
                                  f"--iterations={cfg.ppo_iterations}",
                                  f"--output_dir={out}",
                                  *extra.get("ppo", [])], os.path.join(cfg.out, "ppo.log"))
        results["ppo"] = {**rl_figures(out, known), "seconds": seconds}
        print(f"[ppo] {results['ppo']}", flush=True)
        save()
    if "dpo" in stages:
        out = os.path.join(cfg.out, "dpo")
        seconds = command("dpo", ["easytune.train_dpo", f"--model={start_model}",
                                  f"--train_data={cfg.out}/dpo_pairs.jsonl", f"--output_dir={out}",
                                  "--seq_length=256", "--batch_size=8", "--num_epochs=1", "--peft=lora",
                                  f"--export_hf={out}/hf", *extra.get("dpo", [])],
                          os.path.join(cfg.out, "dpo.log"))
        results["dpo"] = {"train_seconds": seconds, "heldout": evaluate(out + "/hf", heldout, cfg)}
        print(f"[dpo] {results['dpo']}", flush=True)
        save()
    if "ilql" in stages:
        out = os.path.join(cfg.out, "ilql")
        seconds = command("ilql", ["easytune.train_ilql", f"--model={start_model}",
                                   f"--train_data={cfg.out}/ilql_episodes.jsonl", f"--output_dir={out}",
                                   "--seq_length=256", "--batch_size=8", "--num_epochs=1", f"--export_hf={out}/hf",
                                   *extra.get("ilql", [])], os.path.join(cfg.out, "ilql.log"))
        results["ilql"] = {"train_seconds": seconds, "heldout": evaluate(out + "/hf", heldout, cfg)}
        print(f"[ilql] {results['ilql']}", flush=True)
        save()
    if "score" in stages:
        finished = {"start": start_model, "grpo": os.path.join(cfg.out, "grpo"), "ppo": os.path.join(cfg.out, "ppo"),
                    "dpo": os.path.join(cfg.out, "dpo", "hf"), "ilql": os.path.join(cfg.out, "ilql", "hf")}
        models = {name: path for name, path in finished.items() if os.path.isdir(path)}
        for item in cfg.score_also:
            name, _, path = item.partition("=")
            if not name or not os.path.isdir(path):
                raise SystemExit(f"--score_also {item!r}: give name=DIR with an existing model or run directory.")
            models[name] = path
        if "start" not in models:
            raise SystemExit(f"[score] the start model {start_model} is not there; run the rft stage or give --start.")
        scores = {}
        for name, path in models.items():
            started = time.time()
            scores[name] = {"model": path, **evaluate(path, heldout, cfg, samples=cfg.score_samples,
                                                      seed=cfg.score_seed, per_prompt=True),
                            "seconds": time.time() - started}
            print(f"[score] {name}: greedy {scores[name]['accuracy']:.3f}, sampled {scores[name]['sampled_mean']:.3f} "
                  f"({scores[name]['seconds']:.0f} s)", flush=True)
        results["score"] = {"samples": cfg.score_samples, "seed": cfg.score_seed, "models": scores}
        save()
        print(score_table(scores, "start"))
    print(table(results))


def table(results: dict) -> str:
    """The markdown result table: held-out satisfaction start -> end, per stage."""
    lines = ["| stage | greedy start -> end | sampled start -> end | distinct (end) | length (end) | minutes |",
             "|---|---|---|---|---|---|"]
    base = results.get("base", {}).get("heldout")
    start = results.get("rft", {}).get("heldout") or base
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for stage in ("rft", "grpo", "ppo", "dpo", "ilql"):
        got = results.get(stage)
        if not got:
            continue
        if stage in ("grpo", "ppo"):
            before, after, minutes = got["before"], got["after"], got["seconds"] / 60
        else:
            before, after = (base if stage == "rft" else start) or {}, got["heldout"]
            minutes = (got.get("train_seconds", 0) + got.get("sampling_seconds", 0)) / 60
        lines.append(f"| {stage} | {fmt(before.get('accuracy'))} -> {fmt(after.get('accuracy'))} | "
                     f"{fmt(before.get('sampled_mean'))} -> {fmt(after.get('sampled_mean'))} | "
                     f"{fmt(after.get('distinct'))} | {fmt(after.get('length_mean'))} | {minutes:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
