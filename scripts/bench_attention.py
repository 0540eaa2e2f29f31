"""Attention implementations side by side: forward and forward+backward TFLOP/s and memory of
easytune's Pallas kernel, easytune's splash wrapper (TPU), the XLA reference, cuDNN
(`jax.nn.dot_product_attention`) and the Pallas `mha` bundled with JAX, causal, per sequence length
and head dim; then one SFT train step of a ~1B LLaMA (Llama-3.2-1B's shape, random weights) with each `--attention`.

    python scripts/bench_attention.py                                        # GPU: seq 1k-16k, d 64 and 128
    python scripts/bench_attention.py --seqs=128,256 --head_dims=64 --tiny   # CPU smoke run

Times are medians of `--repeats` runs after `--warmup`; ratios are throughput relative to cuDNN,
or to XLA where cuDNN is unavailable (higher is faster). Unavailable baselines are skipped with a
note. On CPU the Pallas kernels run in interpret mode: those figures check the script, not speed.
"""
from __future__ import annotations

import argparse
import gc
import math
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from easytune import kernels
from easytune.models import decoder, layers

MIB = 1024 * 1024


def timed(fn, *args, warmup: int, repeats: int) -> float:
    """Median seconds of `fn(*args)` after `warmup` calls (the first one compiles)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compile_with_memory(fn, *args):
    """`(compiled fn, MiB it allocates per call beyond its inputs: temporaries + outputs)`, the
    memory read from the compiled program: the same measure on every backend, per function,
    unlike a process-wide peak (None where the backend does not report it)."""
    compiled = fn.lower(*args).compile()
    try:
        stats = compiled.memory_analysis()
        return compiled, (stats.temp_size_in_bytes + stats.output_size_in_bytes) / MIB
    except Exception:
        return compiled, None


def implementations(backend: str, heads: int, kv_heads: int):
    """name -> (attention fn over q, k, v, or None, note)."""
    interpret = backend == "cpu"

    def easytune_pallas(q, k, v):
        return kernels.flash_attention(q, k, v, causal=True)

    def xla(q, k, v):
        positions = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
        return layers.attention(q, k, v, q_positions=positions, causal=True, implementation="xla")

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    def jax_mha(q, k, v):
        from jax.experimental.pallas.ops.gpu import attention
        return attention.mha(q, k, v, None, sm_scale=1 / math.sqrt(q.shape[-1]), causal=True, interpret=interpret)

    def easytune_splash(q, k, v):
        return kernels.tpu_flash_attention(q, k, v, causal=True)

    out = {}
    out["easytune pallas"] = (None, "skipped: no TPU lowering") if backend == "tpu" else (
        easytune_pallas, "interpret mode" if interpret else "")
    out["easytune splash"] = (None, "skipped: the TPU kernel") if backend == "gpu" else (
        easytune_splash, "TPU interpret mode" if interpret else "")
    out["xla"] = (xla, "")
    out["cudnn"] = (cudnn, "") if backend == "gpu" else (None, "skipped: needs an NVIDIA GPU")
    if backend == "tpu":
        out["jax pallas mha"] = (None, "skipped: a Triton (GPU) kernel")
    elif kv_heads != heads:
        out["jax pallas mha"] = (None, "skipped: no GQA support")
    else:
        out["jax pallas mha"] = (jax_mha, "interpret mode" if interpret else "")
    return out


def bench_kernels(args, backend: str, dtype) -> None:
    print(f"attention: causal, {jnp.dtype(dtype).name}, {args.tokens} tokens per call (batch = tokens / seq), "
          f"heads = {args.hidden} / head_dim, kv_heads = {args.kv_heads or 'heads'}; "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print("TFLOP/s count the causal half of the work: 2 * b * h * s^2 * d forward, 3.5x that forward+backward; "
          "MiB: XLA's compiled temporaries + outputs")
    header = (f"{'seq':>6} {'d':>4}  {'implementation':<16} {'fwd ms':>9} {'TFLOP/s':>8} {'ratio':>6}  "
              f"{'fwd+bwd ms':>10} {'TFLOP/s':>8} {'ratio':>6}  {'MiB fwd+bwd':>11}  note")
    print(header)
    print("-" * len(header))
    rng = np.random.RandomState(0)
    for head_dim in args.head_dims:
        heads = max(1, args.hidden // head_dim)
        kv_heads = args.kv_heads or heads
        impls = implementations(backend, heads, kv_heads)
        baseline = "cudnn" if impls["cudnn"][0] is not None else "xla"
        for seq in args.seqs:
            batch = max(1, args.tokens // seq)
            q = jnp.asarray(rng.randn(batch, seq, heads, head_dim), dtype)
            k = jnp.asarray(rng.randn(batch, seq, kv_heads, head_dim), dtype)
            v = jnp.asarray(rng.randn(batch, seq, kv_heads, head_dim), dtype)
            cotangent = jnp.asarray(rng.randn(*q.shape), dtype)
            # causal: half of the 2 matmuls of 2*b*h*s*s*d flops; backward does 2.5x the forward
            fwd_flops = 4 * batch * heads * seq * seq * head_dim * 0.5
            results = {}
            for name, (fn, note) in impls.items():
                if fn is None:
                    results[name] = None, note
                    continue
                try:
                    forward, _ = compile_with_memory(jax.jit(fn), q, k, v)
                    both, mib = compile_with_memory(jax.jit(lambda q, k, v, ct, fn=fn: jax.vjp(fn, q, k, v)[1](ct)),
                                                    q, k, v, cotangent)
                    fwd_s = timed(forward, q, k, v, warmup=args.warmup, repeats=args.repeats)
                    both_s = timed(both, q, k, v, cotangent, warmup=args.warmup, repeats=args.repeats)
                except Exception as e:  # out of memory, an unsupported shape
                    results[name] = None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                    continue
                results[name] = (fwd_s, both_s, mib), note
            base = results[baseline][0]
            for name, (timing, note) in results.items():
                if timing is None:
                    print(f"{seq:>6} {head_dim:>4}  {name:<16} {'-':>9} {'-':>8} {'-':>6}  {'-':>10} {'-':>8} {'-':>6}  "
                          f"{'-':>11}  {note}")
                    continue
                fwd_s, both_s, mib = timing
                fwd_ratio = f"{base[0] / fwd_s:.2f}" if base else "-"
                both_ratio = f"{base[1] / both_s:.2f}" if base else "-"
                mem = f"{mib:.1f}" if mib is not None else "-"
                print(f"{seq:>6} {head_dim:>4}  {name:<16} {fwd_s * 1e3:>9.2f} {fwd_flops / fwd_s / 1e12:>8.3f} "
                      f"{fwd_ratio:>6}  {both_s * 1e3:>10.2f} {3.5 * fwd_flops / both_s / 1e12:>8.3f} {both_ratio:>6}  "
                      f"{mem:>11}  {note}")
        print(f"(ratios: throughput relative to {baseline})")


def model_config(tiny: bool, attention: str) -> decoder.DecoderConfig:
    if tiny:
        arch = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=64)
    else:  # Llama-3.2-1B
        arch = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                    num_kv_heads=8, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True)
    return decoder.DecoderConfig(**arch, dtype="bfloat16", param_dtype="float32", attention=attention)


def bench_train_step(args, backend: str) -> None:

    from easytune import Model, sharding, train
    from easytune.algos import sft

    batch, seq = args.train_batch, args.train_seq
    devices = jax.devices()[:1] if args.tiny else None
    mesh = sharding.make_mesh("1,1,1" if args.tiny else args.mesh_dim, devices)
    # packed rows: examples of seq / 4 tokens, so attention never crosses them
    rng = np.random.RandomState(0)
    segments = np.repeat(np.arange(1, 5, dtype=np.int32), seq // 4)[None].repeat(batch, 0)
    segments = np.pad(segments, [(0, 0), (0, seq - segments.shape[1])])
    positions = np.where(segments > 0, np.arange(seq) - (segments - 1) * (seq // 4), 0).astype(np.int32)
    size = "tiny LLaMA" if args.tiny else "Llama-3.2-1B-shaped (1.2B params)"
    print(f"\ntrain step: {size}, bf16 compute, fp32 master weights, AdamW, batch {batch} x seq {seq} "
          f"(packed, 4 examples per row), mesh {dict(mesh.shape)}; median of {args.repeats} after {args.warmup} warm-up")
    results = {}
    for attention in ("xla", "pallas", "splash", "cudnn"):
        if attention == "cudnn" and backend != "gpu":
            results[attention] = None, "skipped: needs an NVIDIA GPU"
            continue
        if attention == "splash" and backend == "gpu":
            results[attention] = None, "skipped: the TPU kernel"
            continue
        if attention == "pallas" and backend == "tpu":
            results[attention] = None, "skipped: no TPU lowering"
            continue
        config = model_config(args.tiny, attention)
        tokens = rng.randint(0, config.vocab_size, (batch, seq + 1)).astype(np.int32)
        rows = {"input_ids": tokens[:, :-1], "target_ids": tokens[:, 1:], "loss_mask": (segments > 0).astype(np.int32),
                "segment_ids": segments, "positions": positions}
        shapes = decoder.param_shapes(config)
        with jax.set_mesh(mesh):
            params = jax.jit(decoder.init_params, static_argnums=0,
                             out_shardings=sharding.tree_shardings(shapes, decoder.SHARDING_RULES, mesh))(
                config, jax.random.key(0))
        trainer = train.Trainer(train.TrainConfig(tempfile.mkdtemp(prefix="bench_attention_"), batch_size=batch),
                                Model(config, params, None, mesh), sft.LOSS, total_steps=10**6)
        step_batch = train.global_batch(mesh, rows, 1)

        def step(compiled):  # what Trainer.train_step runs, on the compiled program measured below
            trainer.params, trainer.opt_state, metrics = compiled(trainer.params, trainer.opt_state, trainer.frozen,
                                                                  step_batch, np.int32(0))
            return metrics

        try:
            with jax.set_mesh(mesh):
                compiled, mib = compile_with_memory(trainer._step, trainer.params, trainer.opt_state, trainer.frozen,
                                                    step_batch, np.int32(0))
                seconds = timed(step, compiled, warmup=args.warmup, repeats=args.repeats)
            results[attention] = (seconds, mib), "interpret mode" if attention in ("pallas", "splash") and backend == "cpu" else ""
        except Exception as e:
            results[attention] = None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        trainer = params = compiled = None  # free this attention's state before the next
        gc.collect()
    baseline = "cudnn" if results["cudnn"][0] is not None else "xla"
    base = results[baseline][0]
    print(f"{'attention':<10} {'step ms':>9} {'tokens/s':>10} {'ratio':>6}  {'temp MiB':>9}  note")
    for attention, (timing, note) in results.items():
        if timing is None:
            print(f"{attention:<10} {'-':>9} {'-':>10} {'-':>6}  {'-':>9}  {note}")
            continue
        seconds, mib = timing
        ratio = f"{base[0] / seconds:.2f}" if base else "-"
        mem = f"{mib:.0f}" if mib is not None else "-"
        print(f"{attention:<10} {seconds * 1e3:>9.1f} {batch * seq / seconds:>10.0f} {ratio:>6}  {mem:>9}  {note}")
    print(f"(ratios: throughput relative to {baseline})")
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        print(f"device 0 peak memory over the whole run: {stats['peak_bytes_in_use'] / MIB:.0f} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--seqs", type=ints, default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head_dims", type=ints, default=[64, 128])
    parser.add_argument("--tokens", type=int, default=16384, help="batch x seq per kernel call")
    parser.add_argument("--hidden", type=int, default=2048, help="heads = hidden / head_dim")
    parser.add_argument("--kv_heads", type=int, default=0, help="0: as many as query heads")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--train_batch", type=int, default=4)
    parser.add_argument("--train_seq", type=int, default=2048)
    parser.add_argument("--mesh_dim", default="1,-1,1", help="mesh for the train step")
    parser.add_argument("--no_train", action="store_true", help="skip the train-step comparison")
    parser.add_argument("--tiny", action="store_true",
                        help="small shapes and a tiny model (CPU smoke run): tokens 256, hidden 128, train 2 x 128")
    args = parser.parse_args()
    if args.tiny:
        args.tokens, args.hidden, args.train_batch, args.train_seq = 256, 128, 2, 128
    backend = jax.default_backend()
    print(f"backend: {backend} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    bench_kernels(args, backend, jnp.dtype(args.dtype))
    if not args.no_train:
        bench_train_step(args, backend)


if __name__ == "__main__":
    main()
