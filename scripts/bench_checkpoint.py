"""How long a checkpoint stalls training: the same SFT steps with a save every `--save_every`
steps, synchronous (the loop waits for the write) and asynchronous (orbax copies the arrays to host
memory and writes them in a thread while the next steps run), interleaved run by run.

    python scripts/bench_checkpoint.py [--steps 9] [--save_every 3] [--rounds 2] [--model DIR]

Per mode: the median time the loop spends inside `Trainer.save` (the stall), the median step
time without a save, and the stall as a share of a step; the async runs also report how long the
final `wait_for_saves` took (the write still in flight when training ended).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF directory (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--save_every", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output_dir", default=None, help="where checkpoints go (default: a temporary folder)")
    args = parser.parse_args()

    import jax

    import easytune
    from easytune import assets, train
    from easytune.algos import sft

    model = easytune.load(args.model or assets.smollm2_hf_dir(), devices=jax.devices()[:1], mesh_dim="1,1,1",
                          tokenizer=False)
    from bench_train import random_rows  # scripts/ is on the path of a script run from it
    _, rows = random_rows(args.batch, args.seq, model.config.vocab_size)
    batch = train.global_batch(model.mesh, rows, 1)
    base = args.output_dir or tempfile.mkdtemp(prefix="bench_checkpoint_")
    results = {False: {"stall": [], "step": [], "final": []}, True: {"stall": [], "step": [], "final": []}}
    for round_index in range(args.rounds):
        for async_saves in (False, True):
            out = f"{base}/{'async' if async_saves else 'sync'}_{round_index}"
            trainer = train.Trainer(train.TrainConfig(out, batch_size=args.batch, async_checkpoints=async_saves),
                                    model, sft.LOSS, total_steps=10**6)
            with jax.set_mesh(model.mesh):
                jax.block_until_ready(trainer.train_step(batch))  # compile
                for step in range(1, args.steps + 1):
                    start = time.perf_counter()
                    jax.block_until_ready(trainer.train_step(batch))
                    step_seconds = time.perf_counter() - start
                    if step % args.save_every:
                        results[async_saves]["step"].append(step_seconds)
                        continue
                    start = time.perf_counter()
                    trainer.save({"step": trainer.step})
                    results[async_saves]["stall"].append(time.perf_counter() - start)
                start = time.perf_counter()
                trainer.wait_for_saves()
                results[async_saves]["final"].append(time.perf_counter() - start)
            trainer.publish()  # the next run starts from these weights (the steps donated the model's buffers)
            trainer.manager.close()
            del trainer
            shutil.rmtree(out, ignore_errors=True)
    size = sum(x.nbytes for x in jax.tree.leaves(model.params)) * 3  # params + AdamW's two moments
    print(f"checkpoint: params + optimizer state ~{size / 2**20:.0f} MiB, a save every {args.save_every} steps, "
          f"{args.rounds} rounds of {args.steps} steps per mode, interleaved")
    print(f"{'mode':<6} {'stall per save s (median, range)':>34} {'step s':>8} {'stall / step':>13} "
          f"{'final wait s':>13}")
    for async_saves in (False, True):
        r = results[async_saves]
        stall, step = statistics.median(r["stall"]), statistics.median(r["step"])
        print(f"{'async' if async_saves else 'sync':<6} {stall:>13.3f} ({min(r['stall']):.3f}-{max(r['stall']):.3f})"
              f"{'':>8} {step:>8.3f} {stall / step:>12.0%} {statistics.median(r['final']):>13.3f}")


if __name__ == "__main__":
    main()
