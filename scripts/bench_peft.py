"""Full fine-tuning vs LoRA vs QLoRA (vs DoRA) on one model: trainable parameters, train-state
memory (trained weights + optimizer state + frozen base, counted from the live arrays) and step
time on this machine, side by side (timed steps interleaved); plus the NF4 model's logits KL against the unquantized one.

    python scripts/bench_peft.py [--model DIR] [--batch 4] [--seq 128] [--steps 3]
                                 [--methods full,lora,qlora,dora] [--base_dtype bfloat16]

Full fine-tuning keeps float32 weights and AdamW moments (the usual mixed-precision master copy);
the adapter methods keep the frozen base in --base_dtype (QLoRA: NF4 block kernels) and float32
adapters. Compute is float32 (this is a CPU benchmark). Step times are medians after one
compiling step; ratios are to full fine-tuning.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def nbytes(tree) -> int:
    import jax
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def kl_nf4(directory: str, devices) -> dict:
    """Mean per-token KL(p_fp32 || p_nf4) and top-1 agreement on chat-formatted task prompts."""
    import jax
    import jax.numpy as jnp

    import easytune
    from easytune import adapters, data
    model = easytune.load(directory, dtype="float32", param_dtype="float32", mesh_dim="1,1,1", devices=devices)
    records, _ = data.train_and_heldout(16, 0, seed=1)
    if model.tokenizer is not None:
        texts = [model.tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]
        ids = [model.tokenizer(t)["input_ids"][:64] for t in texts]
    else:  # a tokenizer-less model: random token ids
        rng = np.random.RandomState(0)
        ids = [rng.randint(0, model.config.vocab_size, 48).tolist() for _ in records]
    length = min(len(i) for i in ids)
    tokens = np.asarray([i[:length] for i in ids], np.int32)
    reference = jax.nn.log_softmax(np.asarray(model(tokens)), axis=-1)
    model.params = adapters.quantize_base(model.params, model.config, model.mesh)
    model._forward = None
    quantized = jax.nn.log_softmax(np.asarray(model(tokens)), axis=-1)
    kl = jnp.sum(jnp.exp(reference) * (reference - quantized), axis=-1)
    agree = jnp.mean(jnp.argmax(reference, -1) == jnp.argmax(quantized, -1))
    return {"kl_mean": float(jnp.mean(kl)), "kl_max": float(jnp.max(kl)), "top1_agreement": float(agree),
            "tokens": int(tokens.size)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF directory (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method (after one compiling step)")
    parser.add_argument("--methods", default="full,lora,qlora,dora")
    parser.add_argument("--base_dtype", default="bfloat16", help="frozen base dtype for the adapter methods")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import jax

    import easytune
    from easytune import adapters, assets, train
    from easytune.algos import sft

    directory = args.model or assets.smollm2_hf_dir()
    devices = jax.devices()[:1]
    rng = np.random.RandomState(0)
    results, trainers, batches = {}, {}, {}
    for method in args.methods.split(","):
        full = method == "full"
        model = easytune.load(directory, dtype="float32", param_dtype="float32" if full else args.base_dtype,
                              mesh_dim="1,1,1", devices=devices, tokenizer=False)
        base_bf16_bytes = sum(x.size * 2 for x in jax.tree.leaves(model.params))
        linear_bf16_bytes = sum(x.size * 2 for m in adapters.linear_modules(model.config) if m.stacked
                                for x in [adapters._get(model.params, m.path)["kernel"]])
        if not full:
            model.add_adapter(method, rank=args.rank, alpha=2.0 * args.rank)
        trainer = train.Trainer(train.TrainConfig(f"/tmp/easytune_bench_peft_{method}", batch_size=args.batch), model,
                                sft.LOSS, total_steps=10**6)
        tokens = rng.randint(0, model.config.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
        rows = {"input_ids": tokens[:, :-1], "target_ids": tokens[:, 1:],
                "loss_mask": np.ones((args.batch, args.seq), np.int32),
                "segment_ids": np.ones((args.batch, args.seq), np.int32),
                "positions": np.tile(np.arange(args.seq, dtype=np.int32), (args.batch, 1))}
        batches[method] = train.global_batch(model.mesh, rows, 1)
        with jax.set_mesh(model.mesh):
            jax.block_until_ready(trainer.train_step(batches[method]))  # compile
        frozen = trainer.frozen if trainer.frozen is not None else {}
        linear_bytes = (sum(nbytes(adapters._get(frozen, m.path)) - nbytes(adapters._get(frozen, m.path).get("bias", {}))
                            for m in adapters.linear_modules(model.config) if m.stacked) if not full else None)
        results[method] = {
            "trainable_params": adapters.count(trainer.params),
            "trained_bytes": nbytes(trainer.params), "optimizer_bytes": nbytes(trainer.opt_state),
            "frozen_bytes": nbytes(frozen),
            "train_state_bytes": nbytes(trainer.params) + nbytes(trainer.opt_state) + nbytes(frozen),
            "block_linear_bytes_vs_bf16": None if linear_bytes is None else linear_bytes / linear_bf16_bytes,
            "frozen_vs_bf16": None if full else nbytes(frozen) / base_bf16_bytes,
            "step_seconds": [],
        }
        trainers[method] = trainer
    # timed steps interleaved across methods, so load drift on a shared machine hits all alike
    for _ in range(args.steps):
        for method, trainer in trainers.items():
            with jax.set_mesh(trainer.mesh):
                start = time.perf_counter()
                jax.block_until_ready(trainer.train_step(batches[method]))
                results[method]["step_seconds"].append(time.perf_counter() - start)
    for method in trainers:
        results[method]["step_seconds"] = statistics.median(results[method]["step_seconds"])
    del trainers
    reference = results.get("full")
    print(f"{'method':<8}{'trainable':>14}{'train state MB':>16}{'x full':>8}{'frozen/bf16':>13}"
          f"{'linears/bf16':>14}{'step s':>9}{'x full':>8}")
    for method, r in results.items():
        ratio_mem = r["train_state_bytes"] / reference["train_state_bytes"] if reference else float("nan")
        ratio_time = r["step_seconds"] / reference["step_seconds"] if reference else float("nan")
        frozen = "-" if r["frozen_vs_bf16"] is None else f"{r['frozen_vs_bf16']:.3f}"
        linears = "-" if r["block_linear_bytes_vs_bf16"] is None else f"{r['block_linear_bytes_vs_bf16']:.3f}"
        print(f"{method:<8}{r['trainable_params']:>14,}{r['train_state_bytes'] / 2**20:>16.1f}{ratio_mem:>8.3f}"
              f"{frozen:>13}{linears:>14}{r['step_seconds']:>9.2f}{ratio_time:>8.2f}")
    results["nf4_kl"] = kl_nf4(directory, devices)
    print(f"NF4 vs float32 logits: mean KL {results['nf4_kl']['kl_mean']:.4f} nats/token "
          f"(max {results['nf4_kl']['kl_max']:.4f}), top-1 agreement {results['nf4_kl']['top1_agreement']:.3f} "
          f"over {results['nf4_kl']['tokens']} tokens")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
