"""Training throughput on this machine: one easytune SFT step next to one Hugging Face
transformers + PyTorch step (AdamW, same model, batch and sequence length, float32), interleaved.

    python scripts/bench_train.py [--batch 8] [--seq 128] [--pairs 5] [--model DIR]

Prints tokens/s of each (medians) and the median of the per-pair ratios easytune/transformers.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF directory (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--remat", default="none")
    args = parser.parse_args()

    import jax

    import easytune
    from easytune import assets, train
    from easytune.algos import sft

    directory = args.model or assets.smollm2_hf_dir()
    model = easytune.load(directory, devices=jax.devices()[:1], mesh_dim="1,1,1", remat=args.remat)
    trainer = train.Trainer(train.TrainConfig("/tmp/easytune_bench_train", batch_size=args.batch), model, sft.LOSS,
                            total_steps=10**6)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, model.config.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    rows = {"input_ids": tokens[:, :-1], "target_ids": tokens[:, 1:],
            "loss_mask": np.ones((args.batch, args.seq), np.int32),
            "segment_ids": np.ones((args.batch, args.seq), np.int32),
            "positions": np.tile(np.arange(args.seq, dtype=np.int32), (args.batch, 1))}
    batch = train.global_batch(model.mesh, rows, 1)

    def ours():
        start = time.perf_counter()
        with jax.set_mesh(model.mesh):
            metrics = trainer.train_step(batch)
            jax.block_until_ready(metrics)
        return time.perf_counter() - start

    import torch
    from transformers import AutoModelForCausalLM
    torch_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    torch_model.train()
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=1e-5)
    input_ids = torch.tensor(tokens[:, :-1], dtype=torch.long)
    labels = torch.tensor(tokens[:, 1:], dtype=torch.long)

    def theirs():
        start = time.perf_counter()
        logits = torch_model(input_ids=input_ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    compile_seconds = ours()
    theirs()  # warm-up
    pairs = [(ours(), theirs()) for _ in range(args.pairs)]
    step_tokens = args.batch * args.seq
    ours_tps = statistics.median(step_tokens / p[0] for p in pairs)
    theirs_tps = statistics.median(step_tokens / p[1] for p in pairs)
    ratios = [p[1] / p[0] for p in pairs]
    print(f"train step, batch {args.batch} x seq {args.seq}, float32, {args.pairs} interleaved pairs "
          f"(easytune first step incl. compile: {compile_seconds:.1f}s):")
    print(f"  easytune (JAX):              {ours_tps:8.1f} tokens/s (median)")
    print(f"  transformers (PyTorch, CPU): {theirs_tps:8.1f} tokens/s (median)")
    print(f"  ratio easytune/transformers: {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
