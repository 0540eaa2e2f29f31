"""Where an SFT step's time goes: the step's components timed in easytune and in transformers +
PyTorch on the same model and tokens, interleaved pair by pair, as a table of ratios.

    python scripts/profile_step.py [--dtype float32|bfloat16] [--batch 8] [--seq 128] [--pairs 3]

Components (each a compiled JAX function next to the same work in PyTorch):

  whole step           SFT forward + loss + backward + clip + AdamW (what `bench_train.py` times)
  forward + loss       the model and the cross-entropy, no gradients
  layers fwd + bwd     embedding, every decoder layer and the final norm, forward and backward
                       (the gradient of a fixed random projection of the final hidden states)
  head + CE fwd + bwd  LM head (tied: the embedding) and cross-entropy from fixed hidden states,
                       gradients for the hidden states and the head
  clip + AdamW         global-norm clipping and the AdamW update on fixed gradients

--dtype=bfloat16: easytune computes in bf16 with float32 weights, PyTorch under
`torch.autocast(bfloat16)`, as in `bench_train.py`. The ratio column is PyTorch's median time over
easytune's (above 1: easytune is faster). Every pair records other processes' CPU use, as
`bench_train.py` does; a component whose pairs saw more than `--max_others` is marked CONTENDED.
The breakdown locates a regression: the whole step should be about the layers plus the head plus
the optimizer (forward + loss is part of the first two).
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # as easytune's commands on CPU (not in a process that imports this file)
    os.environ.setdefault("EASYTUNE_HOST_MALLOC", "tuned")  # =system for glibc's default
import easytune  # noqa: E402,F401 (sets it before numpy's and XLA's threads start: host_memory)

import argparse
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import cpu_isa, measured, random_rows  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF directory (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layer_loop", default="auto", help="easytune's --layer_loop (scan, unroll, auto)")
    parser.add_argument("--max_others", type=float, default=0.10,
                        help="flag a component whose steps saw other processes use more than this share of the cores")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    import easytune
    from easytune import assets, train
    from easytune.algos import sft
    from easytune.models import decoder

    directory = args.model or assets.smollm2_hf_dir()
    model = easytune.load(directory, devices=jax.devices()[:1], mesh_dim="1,1,1", dtype=args.dtype,
                          param_dtype="float32", tokenizer=False, layer_loop=args.layer_loop)
    config = model.config
    trainer = train.Trainer(train.TrainConfig(tempfile.mkdtemp(prefix="easytune_profile_"), batch_size=args.batch),
                            model, sft.LOSS, total_steps=10**6)
    tokens, rows = random_rows(args.batch, args.seq, config.vocab_size)
    batch = train.global_batch(model.mesh, rows, 1)  # [accumulation steps, batch, seq]
    micro = jax.tree.map(lambda x: x[0], batch)
    rng = np.random.RandomState(1)
    projection = rng.standard_normal((args.batch, args.seq, config.hidden_size)).astype(np.float32)
    hidden_in = (rng.standard_normal((args.batch, args.seq, config.hidden_size)) * 0.5).astype(np.float32)
    targets = tokens[:, 1:]

    def layers_loss(params, projection):
        hidden, _ = decoder.hidden_states(config, params, micro["input_ids"], micro["positions"], micro["segment_ids"])
        return jnp.sum(hidden.astype(jnp.float32) * projection)

    def head_loss(hidden, params, targets):
        logits = decoder.logits_from_hidden(config, params, hidden.astype(config.compute_dtype))
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

    def optimizer_step(params, opt_state, grads):
        # The donated inputs in the order of the outputs, as in the train step: JAX pairs donated
        # buffers with outputs of the same shape in order, so (grads, opt_state, params) ->
        # (params, opt_state) would alias params' outputs to mu's buffers, mu's to nu's, and XLA
        # copies every buffer first (three extra passes: 450-620 ms instead of ~250 for SmolLM2).
        import optax
        updates, opt_state = trainer.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    forward = jax.jit(lambda p, b: sft.loss_sums(config, p, b))
    layers_grad = jax.jit(jax.grad(layers_loss))
    head_grad = jax.jit(jax.grad(head_loss, argnums=(0, 1)))
    opt = jax.jit(optimizer_step, donate_argnums=(0, 1))  # in place, as in the train step
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), trainer.params)  # (the step donates trainer.params)
    opt_inputs = [jax.tree.map(jnp.copy, trainer.params), jax.tree.map(jnp.copy, trainer.opt_state)]

    def optimizer_only():
        opt_inputs[0], opt_inputs[1] = opt(opt_inputs[0], opt_inputs[1], grads)
        return opt_inputs[0]
    projection_j, hidden_j, targets_j = jnp.asarray(projection), jnp.asarray(hidden_in), jnp.asarray(targets)

    def timed(fn):
        def run():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            return time.perf_counter() - start
        return run

    def step():
        with jax.set_mesh(model.mesh):
            return trainer.train_step(batch)

    ours = {
        "whole step": timed(step),
        "forward + loss": timed(lambda: forward(trainer.params, micro)),
        "layers fwd + bwd": timed(lambda: layers_grad(trainer.params, projection_j)),
        "head + CE fwd + bwd": timed(lambda: head_grad(hidden_j, trainer.params, targets_j)),
        "clip + AdamW": timed(optimizer_only),
    }

    torch_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    torch_model.train()
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=1e-5)
    input_ids = torch.tensor(tokens[:, :-1], dtype=torch.long)
    labels = torch.tensor(targets, dtype=torch.long)
    projection_t, targets_t = torch.tensor(projection), labels
    autocast = args.dtype == "bfloat16"

    def torch_timed(fn):
        def run():
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                fn()
            return time.perf_counter() - start
        return run

    def torch_loss():
        logits = torch_model(input_ids=input_ids).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))

    def torch_step():
        torch_loss().backward()
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def torch_forward():
        with torch.no_grad():
            torch_loss()

    def torch_layers():
        hidden = torch_model.model(input_ids=input_ids).last_hidden_state
        (hidden.float() * projection_t).sum().backward()
        optimizer.zero_grad(set_to_none=True)

    def torch_head():
        hidden = torch.tensor(hidden_in, requires_grad=True)
        logits = torch_model.lm_head(hidden)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets_t.reshape(-1))
        loss.backward()
        optimizer.zero_grad(set_to_none=True)

    def torch_optimizer_timed():
        for p in torch_model.parameters():  # setting the gradients is not part of the timed work
            p.grad = torch.full_like(p, 1e-3)
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
        optimizer.step()
        return time.perf_counter() - start

    theirs = {
        "whole step": torch_timed(torch_step),
        "forward + loss": torch_timed(torch_forward),
        "layers fwd + bwd": torch_timed(torch_layers),
        "head + CE fwd + bwd": torch_timed(torch_head),
        "clip + AdamW": torch_optimizer_timed,
    }

    total, count = forward(trainer.params, micro)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        same_work = {"loss_easytune": float(total / count), "loss_pytorch": float(torch_loss())}
    for name in ours:  # compile and warm up
        ours[name]()
        theirs[name]()
    print(f"{args.dtype}, layer loop {args.layer_loop}, batch {args.batch} x seq {args.seq}, {args.pairs} "
          f"interleaved pairs per component, "
          f"{cores} cores ({cpu_isa()}), JAX {jax.__version__}, PyTorch {torch.__version__.split('+')[0]}, {directory}; the "
          f"same work: loss {same_work['loss_easytune']:.4f} (easytune), "
          f"{same_work['loss_pytorch']:.4f} (PyTorch), before any step")
    print(f"{'component':22s} {'easytune ms':>12s} {'PyTorch ms':>11s} {'ratio':>6s}  (range)")
    results = {"same_work": same_work}
    for name in ours:
        pairs = [(measured(ours[name], cores), measured(theirs[name], cores)) for _ in range(args.pairs)]
        mine = statistics.median(p[0][0] for p in pairs) * 1e3
        other = statistics.median(p[1][0] for p in pairs) * 1e3
        ratios = [p[1][0] / p[0][0] for p in pairs]
        contended = any(max(p[0][2], p[1][2]) > args.max_others for p in pairs)
        print(f"{name:22s} {mine:12.1f} {other:11.1f} {statistics.median(ratios):5.2f}x  "
              f"({min(ratios):.2f}-{max(ratios):.2f}){'  CONTENDED' if contended else ''}", flush=True)
        results[name] = {"easytune_ms": mine, "pytorch_ms": other, "ratio": statistics.median(ratios),
                         "contended": contended}
    return results


if __name__ == "__main__":
    main()
