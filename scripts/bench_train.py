"""Training throughput: one easytune SFT step next to one Hugging Face transformers + PyTorch step
(AdamW with clipping, same model, tokens, batch and sequence length), interleaved pair by pair.

    python scripts/bench_train.py [--batch 8] [--seq 128] [--pairs 5] [--warmup 1] [--dtype float32|bfloat16]
    python scripts/bench_train.py --shape llama3.2-1b --batch 4 --seq 2048 --dtype bfloat16   # on a GPU

--dtype=float32: both sides compute and keep weights in float32. --dtype=bfloat16: easytune computes
in bf16 with float32 master weights (`dtype=bfloat16, param_dtype=float32`), PyTorch keeps float32
weights under `torch.autocast(bfloat16)`: each framework's mixed precision. PyTorch runs on CUDA
when JAX's backend is a GPU, else on the CPU. --model: an HF directory (default: the bundled
SmolLM2-135M-Instruct); --shape: random weights of a named shape instead, written to a temporary
directory (for machines without the bundled model; speed does not depend on the values).

Prints tokens/s of each (medians), MFU where a peak is known, and, last, the median of the
per-pair ratios: `ratio easytune/transformers: R x (range A-B)`.

Contention (CPU): on a shared machine a busy neighbour slows the two frameworks unequally (PyTorch's
OpenMP threads lose more than XLA's pool), so the wall-clock ratio can flip. Every step records the
CPU time other processes used during it (`/proc/stat` minus this process's own, as a share of the
cores this process may run on); a pair where either step saw more than `--max_others` (default 10%)
is flagged "contended" and left out of the ratio (all pairs are used, with a warning, if none is
clean). The ratio of this process's own CPU seconds per step (`cpu-time ratio`) is printed too; it
is not immune either (under a busy neighbour PyTorch's OpenMP threads spin and burn CPU: 1.07x quiet,
1.53x contended, BENCHMARKS). `--single_core` pins the process to one core with one thread per
framework (XLA's Eigen pool off, `torch.set_num_threads(1)`): the cross-check that leaves no thread
pool to lose to a neighbour.
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # as easytune's commands on CPU (not in a process that imports this file)
    os.environ.setdefault("EASYTUNE_HOST_MALLOC", "tuned")  # =system for glibc's default
import easytune  # noqa: E402,F401 (sets it before numpy's and XLA's threads start: host_memory)

import argparse
import statistics
import tempfile
import time

import numpy as np

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         rope_theta=100000.0),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                        rope_theta=500000.0),
}


def random_hf_dir(shape: str) -> str:
    """An HF LLaMA directory of `shape` with random weights (no tokenizer: the benchmark feeds token ids)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    directory = tempfile.mkdtemp(prefix=f"bench_train_{shape}_")
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def random_rows(batch: int, seq: int, vocab_size: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """`(tokens [batch, seq + 1], SFT rows)`: one unpacked example of random tokens per row, every
    token trained (speed does not depend on the values)."""
    tokens = np.random.RandomState(seed).randint(0, vocab_size, (batch, seq + 1)).astype(np.int32)
    rows = {"input_ids": tokens[:, :-1], "target_ids": tokens[:, 1:], "loss_mask": np.ones((batch, seq), np.int32),
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1))}
    return tokens, rows


def cpu_seconds() -> tuple[float, float]:
    """`(CPU seconds the whole machine has been busy, across cores; this process's own)`; Linux."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    busy = (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return busy, own.user + own.system


def cpu_isa() -> str:
    """The host CPU's widest vector ISA that matters to both frameworks' kernels (Linux): the figures
    move with it (bf16 dots run natively only with avx512_bf16 or amx_bf16; AVX2-only machines take
    the float32 path for them), so every benchmark header names it."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown ISA"
    for flag in ("amx_bf16", "avx512_bf16", "avx512f", "avx2"):
        if flag in flags:
            return flag
    return "no AVX2"


def measured(step, cores: int):
    """Run `step()` (which returns its wall seconds) and return `(wall seconds, own CPU seconds,
    other processes' share of `cores` during it)`."""
    busy, own = cpu_seconds()
    wall = step()
    busy_after, own_after = cpu_seconds()
    others = max(0.0, (busy_after - busy) - (own_after - own))
    return wall, own_after - own, others / (wall * cores)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF directory (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="random weights of this shape")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps of each framework before the pairs (easytune's first includes its "
                             "compile); more measures the steady state of a long run")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", default="none")
    parser.add_argument("--layer_loop", default="auto", help="easytune's --layer_loop (scan, unroll, auto)")
    parser.add_argument("--attention", default="xla", help="easytune's --attention (xla, pallas, cudnn, auto)")
    parser.add_argument("--max_others", type=float, default=0.10,
                        help="a pair is contended when other processes used more than this share of the cores")
    parser.add_argument("--single_core", action="store_true", help="one core, one thread per framework (CPU)")
    args = parser.parse_args()
    if args.single_core:  # before JAX and PyTorch start their thread pools
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
    cores = len(os.sched_getaffinity(0))

    import jax

    import easytune
    from easytune import assets, train
    from easytune.algos import sft

    directory = args.model or (random_hf_dir(args.shape) if args.shape else assets.smollm2_hf_dir())
    model = easytune.load(directory, devices=jax.devices()[:1], mesh_dim="1,1,1", remat=args.remat,
                          dtype=args.dtype, param_dtype="float32", attention=args.attention, tokenizer=False,
                          layer_loop=args.layer_loop)
    trainer = train.Trainer(train.TrainConfig(tempfile.mkdtemp(prefix="easytune_bench_train_"), batch_size=args.batch),
                            model, sft.LOSS, total_steps=10**6)
    tokens, rows = random_rows(args.batch, args.seq, model.config.vocab_size)
    batch = train.global_batch(model.mesh, rows, 1)

    def ours():
        start = time.perf_counter()
        with jax.set_mesh(model.mesh):
            metrics = trainer.train_step(batch)
            jax.block_until_ready(metrics)
        return time.perf_counter() - start

    import torch
    from transformers import AutoModelForCausalLM
    if args.single_core:
        torch.set_num_threads(1)
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    torch_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device)
    torch_model.train()
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=1e-5)
    input_ids = torch.tensor(tokens[:, :-1], dtype=torch.long, device=device)
    labels = torch.tensor(tokens[:, 1:], dtype=torch.long, device=device)
    autocast = args.dtype == "bfloat16"

    def theirs():
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            logits = torch_model(input_ids=input_ids).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    compile_seconds = ours()
    theirs()  # warm-up
    for _ in range(args.warmup - 1):  # interleaved, so neither framework's heap settles alone
        ours()
        theirs()
    on_cpu = jax.default_backend() == "cpu" and os.path.exists("/proc/stat")
    all_pairs = []
    for number in range(args.pairs):
        if on_cpu:
            pair = (measured(ours, cores), measured(theirs, cores))
        else:  # the device does the work: the host's load does not decide the speed
            pair = ((ours(), 0.0, 0.0), (theirs(), 0.0, 0.0))
        all_pairs.append(pair)
        contended = max(pair[0][2], pair[1][2]) > args.max_others
        if on_cpu:
            print(f"  pair {number}: easytune {pair[0][0]:.3f} s (own CPU {pair[0][1]:.2f} s, others "
                  f"{pair[0][2]:.0%}), transformers {pair[1][0]:.3f} s (own CPU {pair[1][1]:.2f} s, others "
                  f"{pair[1][2]:.0%}){'  CONTENDED' if contended else ''}", flush=True)
    clean = [p for p in all_pairs if max(p[0][2], p[1][2]) <= args.max_others]
    if not clean:
        print(f"WARNING: every pair was contended (other processes used > {args.max_others:.0%} of the cores); "
              f"the ratio below uses them all and is not to be trusted.")
        clean = all_pairs
    pairs = [(p[0][0], p[1][0]) for p in clean]
    step_tokens = args.batch * args.seq
    ours_tps = statistics.median(step_tokens / p[0] for p in pairs)
    theirs_tps = statistics.median(step_tokens / p[1] for p in pairs)
    ratios = [p[1] / p[0] for p in pairs]
    torch_name = f"transformers (PyTorch {torch.__version__.split('+')[0]}, {device})"
    print(f"train step, {args.shape or directory}, batch {args.batch} x seq {args.seq}, {args.dtype}, "
          f"attention {args.attention}, layer loop {args.layer_loop}, {len(pairs)} of {args.pairs} interleaved pairs "
          f"on "
          f"{jax.devices()[0].device_kind}{f' ({cpu_isa()})' if on_cpu else ''}"
          f"{', one core' if args.single_core else f', {cores} cores'} "
          f"(easytune first step incl. compile: {compile_seconds:.1f}s; {args.warmup} untimed step(s) each; host malloc "
          f"{'kept for reuse' if easytune.host_memory.applied() else 'system default'}, both frameworks):")
    if on_cpu:
        cpu_ratios = [p[1][1] / p[0][1] for p in clean if p[0][1] > 0]
        print(f"  cpu-time ratio easytune/transformers (own CPU seconds per step, theirs / ours): "
              f"{statistics.median(cpu_ratios):.2f}x (range {min(cpu_ratios):.2f}-{max(cpu_ratios):.2f})")
    from easytune import logging_utils, models
    flops = models.flops_per_token(model.config, args.seq)
    peak = logging_utils.peak_flops_per_device()

    def mfu(tps):
        return f", MFU {tps * flops / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if flops and peak else ""
    print(f"  easytune (JAX {jax.__version__}):  {ours_tps:10.1f} tokens/s (median){mfu(ours_tps)}")
    print(f"  {torch_name}: {theirs_tps:10.1f} tokens/s (median){mfu(theirs_tps)}")
    print(f"ratio easytune/transformers: {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
