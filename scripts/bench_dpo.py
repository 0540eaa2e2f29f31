"""DPO's reference policy three ways on one model, side by side: a frozen reference copy (all
weights trained), precomputed reference log-probs (all weights trained, no reference held), and
LoRA (the reference is the base with the adapter off). Prints the live train-state bytes
(trained weights + optimizer state + frozen inputs, counted from the arrays), the precompute
pass's time, and step times, with ratios to the reference copy.

    python scripts/bench_dpo.py [--model DIR] [--pairs 8] [--steps 3] [--modes copy,precomputed,lora]

Pairs come from the verifiable tasks (rejected = a perturbed answer), batch --pairs, float32 on
one device. All modes are built first, then their steps run interleaved (a loaded machine slows
them alike); step times are medians after one compiling step (also reported).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF directory (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--pairs", type=int, default=8, help="batch size in preference pairs")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one compiling step)")
    parser.add_argument("--modes", default="copy,precomputed,lora")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import jax

    import easytune
    from easytune import data, train
    from easytune.algos import dpo

    devices = jax.devices()[:1]
    options = dpo.PreferenceConfig()
    runs, results = {}, {}
    for mode in args.modes.split(","):
        model = easytune.load(args.model, dtype="float32", param_dtype="float32", mesh_dim="1,1,1", devices=devices)
        records = data.task_pairs(data.make_task_records(args.pairs, seed=0), seed=0)
        rows, _ = data.pair_rows(records, model.tokenizer, model.tokenizer.chat_template, 512, "tasks")
        if mode == "lora":
            model.add_adapter("lora", rank=args.rank, alpha=2.0 * args.rank)
        precompute_seconds = None
        if mode == "precomputed":
            start = time.perf_counter()
            rows.update(dpo.reference_logps(model.config, model.params, rows, model.mesh, args.pairs))
            precompute_seconds = time.perf_counter() - start  # includes compiling the forward
        trainer = train.Trainer(train.TrainConfig(f"/tmp/easytune_bench_dpo_{mode}", batch_size=args.pairs), model,
                                dpo.make_loss(options, precomputed=mode == "precomputed"), total_steps=10**6)
        runs[mode] = (trainer, train.global_batch(model.mesh, rows, 1), [])
        state = trainer.state_bytes()
        results[mode] = {**{f"{k}_bytes": v for k, v in state.items()}, "train_state_bytes": sum(state.values()),
                         "precompute_seconds": precompute_seconds, "seq_length": int(rows["chosen_input_ids"].shape[1])}
    for _ in range(args.steps + 1):
        for mode, (trainer, batch, times) in runs.items():
            with jax.set_mesh(trainer.mesh):
                start = time.perf_counter()
                jax.block_until_ready(trainer.train_step(batch))
                times.append(time.perf_counter() - start)
    for mode, (_, _, times) in runs.items():
        results[mode].update(first_step_seconds=times[0], step_seconds=statistics.median(times[1:]))
    baseline = results.get("copy")
    print(f"{'mode':<12}{'params MB':>11}{'optimizer MB':>14}{'frozen MB':>11}{'state MB':>10}{'x copy':>8}"
          f"{'step s':>8}{'x copy':>8}{'1st step s':>12}{'precompute s':>14}")
    for mode, r in results.items():
        mem = r["train_state_bytes"] / baseline["train_state_bytes"] if baseline else float("nan")
        speed = r["step_seconds"] / baseline["step_seconds"] if baseline else float("nan")
        pre = "-" if r["precompute_seconds"] is None else f"{r['precompute_seconds']:.1f}"
        print(f"{mode:<12}{r['params_bytes'] / 2**20:>11.1f}{r['optimizer_bytes'] / 2**20:>14.1f}"
              f"{r['frozen_bytes'] / 2**20:>11.1f}{r['train_state_bytes'] / 2**20:>10.1f}{mem:>8.3f}"
              f"{r['step_seconds']:>8.2f}{speed:>8.2f}{r['first_step_seconds']:>12.1f}{pre:>14}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
