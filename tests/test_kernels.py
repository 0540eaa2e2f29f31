"""The Pallas flash-attention kernel (CPU interpret mode) against the XLA reference
(`layers.xla_attention` with `layers.attention_mask`): values and gradients, packing, GQA/MQA,
sliding window, ragged lengths, head dims, dtypes, a mesh; then `--attention=pallas` end to end."""
import os
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

import easytune
from easytune import sharding
from easytune.kernels import BlockSizes, flash_attention, tpu_flash_attention
from easytune.models import decoder, layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = BlockSizes(16, 16, 16, 16, 16, 16)
UNEVEN = BlockSizes(32, 16, 16, 32, 32, 16)  # query and key tiles of different sizes
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}  # max abs error, relative to the output's scale
# Interpret mode turns kernels into XLA loops whose CPU compilation dominates these tests; LLVM's
# optimizations halve it and change nothing that is checked.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def reference(q, k, v, segment_ids, causal, window):
    batch, seq = q.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    segments = jnp.ones((batch, seq), jnp.int32) if segment_ids is None else segment_ids
    mask = layers.attention_mask(positions, segments, positions, segments, causal=causal, sliding_window=window)
    return layers.xla_attention(q, k, v, mask)


def packed_segments(rng, batch, seq, pieces=3):
    """Rows of `pieces` examples of random lengths, then padding (segment 0)."""
    segments = np.zeros((batch, seq), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), pieces, replace=False))
        start = 0
        for segment, end in enumerate(cuts, 1):
            segments[row, start:end] = segment
            start = end
    return segments


def random_qkv(rng, batch, seq, heads, kv_heads, head_dim, dtype):
    def draw(h):
        return jnp.asarray(rng.randn(batch, seq, h, head_dim), jnp.float32).astype(dtype)
    return draw(heads), draw(kv_heads), draw(kv_heads)


def values_and_grads(fn, q, k, v, cotangent):
    out, pullback = jax.vjp(fn, q, k, v)
    return out, pullback(cotangent)


def assert_close(actual, expected, dtype, what):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    scale = max(1.0, float(np.abs(expected).max()))
    error = float(np.abs(actual - expected).max()) / scale
    assert error <= TOLERANCE[dtype], f"{what}: max error {error:.2e} (relative to {scale:.2f})"


CASES = {
    # name: batch, seq, heads, kv_heads, causal, window, packed, blocks, dtype
    "mha_causal_ragged": (1, 40, 2, 2, True, None, False, SMALL, jnp.float32),
    "gqa_packed_window_uneven_blocks": (2, 72, 4, 2, True, 7, True, UNEVEN, jnp.float32),
    "mqa_bidirectional_packed_window": (1, 47, 3, 1, False, 9, True, SMALL, jnp.float32),
    "gqa_packed_bf16": (2, 64, 4, 2, True, None, True, SMALL, jnp.bfloat16),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_values_and_gradients_match_reference(name):
    batch, seq, heads, kv_heads, causal, window, packed, blocks, dtype = CASES[name]
    rng = np.random.RandomState(sorted(CASES).index(name))
    q, k, v = random_qkv(rng, batch, seq, heads, kv_heads, 64, dtype)
    segments = jnp.asarray(packed_segments(rng, batch, seq)) if packed else None
    real = np.ones((batch, seq), bool) if segments is None else np.asarray(segments) != 0
    cotangent = jnp.asarray(rng.randn(*q.shape), jnp.float32).astype(dtype)
    # Padding rows' outputs differ by design (the reference averages every value, the kernel gives
    # 0), so the comparison trains on real rows only, as the loss mask does.
    real_cotangent = cotangent * jnp.asarray(real, dtype)[:, :, None, None]

    kernel = jax.jit(lambda q, k, v, ct: values_and_grads(
        lambda q, k, v: flash_attention(q, k, v, causal=causal, segment_ids=segments, sliding_window=window,
                                        block_sizes=blocks), q, k, v, ct), compiler_options=FAST_COMPILE)
    out, grads = kernel(q, k, v, real_cotangent)
    expected, expected_grads = values_and_grads(lambda q, k, v: reference(q, k, v, segments, causal, window),
                                                q, k, v, real_cotangent)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(np.asarray(out, np.float32)[real], np.asarray(expected, np.float32)[real], dtype, "output")
    for grad, expected_grad, what in zip(grads, expected_grads, ("dq", "dk", "dv")):
        assert grad.dtype == dtype
        assert_close(grad, expected_grad, dtype, what)
    if not real.all():
        # fully masked (padding) rows: exactly 0 out, and finite gradients however they are used
        assert np.all(np.asarray(out, np.float32)[~real] == 0)
        _, padded_grads = kernel(q, k, v, cotangent)
        assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in padded_grads)
        np.testing.assert_array_equal(np.asarray(padded_grads[0], np.float32)[~real], 0)


@pytest.mark.parametrize("kernel", ["pallas", "splash"])
def test_scale_and_softcap_match_reference(kernel):
    """Gemma's attention: a scale other than 1/sqrt(head_dim) and soft-capped scores (cap 1.0, well
    inside the scores' range), packed rows and a window; values and all three gradients."""
    rng = np.random.RandomState(11)
    q, k, v = random_qkv(rng, 2, 40, 4, 2, 64, jnp.float32)
    segments = jnp.asarray(packed_segments(rng, 2, 40))
    real = np.asarray(segments) != 0
    cotangent = jnp.asarray(rng.randn(*q.shape), jnp.float32) * jnp.asarray(real, jnp.float32)[:, :, None, None]
    scale, cap, window = 24 ** -0.5, 1.0, 9
    attend = flash_attention if kernel == "pallas" else tpu_flash_attention
    extra = dict(block_sizes=SMALL) if kernel == "pallas" else {}
    fused = jax.jit(lambda q, k, v, ct: values_and_grads(
        lambda q, k, v: attend(q, k, v, segment_ids=segments, sliding_window=window, scale=scale, logit_softcap=cap,
                               **extra), q, k, v, ct), compiler_options=FAST_COMPILE)
    out, grads = fused(q, k, v, cotangent)

    def expected_fn(q, k, v, cap=cap):
        positions = jnp.broadcast_to(jnp.arange(40), (2, 40))
        mask = layers.attention_mask(positions, segments, positions, segments, causal=True, sliding_window=window)
        return layers.xla_attention(q, k, v, mask, scale, cap)

    expected, expected_grads = values_and_grads(expected_fn, q, k, v, cotangent)
    assert_close(np.asarray(out)[real], np.asarray(expected)[real], jnp.float32, "output")
    for grad, expected_grad, what in zip(grads, expected_grads, ("dq", "dk", "dv")):
        assert_close(grad, expected_grad, jnp.float32, what)
    uncapped = np.asarray(values_and_grads(lambda q, k, v: expected_fn(q, k, v, None), q, k, v, cotangent)[0])
    assert np.abs(uncapped - np.asarray(expected))[real].max() > 1e-2  # the cap is active


@pytest.mark.parametrize("head_dim", [128, 256])
def test_other_head_dims_match_reference(head_dim):
    rng = np.random.RandomState(head_dim)
    q, k, v = random_qkv(rng, 1, 24, 2, 1, head_dim, jnp.float32)
    segments = jnp.asarray(packed_segments(rng, 1, 24, pieces=2))
    real = np.asarray(segments) != 0
    out = jax.jit(lambda q, k, v: flash_attention(q, k, v, segment_ids=segments, block_sizes=SMALL),
                  compiler_options=FAST_COMPILE)(q, k, v)
    assert_close(np.asarray(out)[real], np.asarray(reference(q, k, v, segments, True, None))[real],
                 jnp.float32, f"head_dim {head_dim}")


def test_score_matrix_is_never_materialized():
    """No array in the traced forward and backward passes is [seq, seq]-sized: only tiles."""
    seq = 256
    rng = np.random.RandomState(0)
    q, k, v = random_qkv(rng, 1, seq, 2, 1, 64, jnp.float32)
    segments = jnp.asarray(packed_segments(rng, 1, seq))
    blocks = BlockSizes(64, 32, 32, 64, 64, 32)

    def loss(q, k, v):
        return flash_attention(q, k, v, segment_ids=segments, sliding_window=100, block_sizes=blocks).sum()

    largest = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            for var in (*eqn.invars, *eqn.outvars):
                shape = sorted(getattr(var.aval, "shape", ()))
                largest.append(shape[-2] if len(shape) >= 2 else 0)
            for value in eqn.params.values():  # sub-jaxprs: jit, custom_vjp, loops, the kernels
                for item in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(item, "jaxpr", item)
                    if hasattr(inner, "eqns"):
                        visit(inner)

    visit(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr)
    # every array's second-largest dim stays below seq (q/k/v themselves are [1, seq, h, 64])
    assert max(largest) < seq, max(largest)


@pytest.mark.parametrize("head_dim,dtype,window,packed,softcap", [
    (64, jnp.bfloat16, None, False, None), (128, jnp.bfloat16, 100, True, None), (256, jnp.bfloat16, None, True, 50.0),
    (128, jnp.float32, None, False, None)])
def test_kernels_lower_to_triton_for_gpu(head_dim, dtype, window, packed, softcap):
    """Without a GPU: the forward and both backward kernels lower through Pallas' Triton path (an
    export for CUDA), so every primitive they use has a Triton lowering (PTX is compiled on a GPU)."""
    q = jax.ShapeDtypeStruct((2, 509, 4, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((2, 509, 2, head_dim), dtype)
    segments = jax.ShapeDtypeStruct((2, 509), jnp.int32) if packed else None

    def forward_and_backward(q, k, v, segments):
        out, pullback = jax.vjp(lambda q, k, v: flash_attention(q, k, v, segment_ids=segments, sliding_window=window,
                                                                 logit_softcap=softcap, interpret=False), q, k, v)
        return out, pullback(out)

    exported = jax.export.export(
        jax.jit(forward_and_backward), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(q, kv, kv, segments)
    module = exported.mlir_module()
    for name in ("easytune_flash_forward", "easytune_flash_backward_dkdv", "easytune_flash_backward_dq"):
        assert f'name = "{name}"' in module, name


def test_invalid_inputs_are_clear_errors():
    q = jnp.zeros((1, 16, 4, 64))
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of .* key/value heads \(3\)"):
        flash_attention(q, jnp.zeros((1, 16, 3, 64)), jnp.zeros((1, 16, 3, 64)))
    with pytest.raises(ValueError, match=r"supports head_dim \(64, 128, 256\), not 80"):
        flash_attention(jnp.zeros((1, 16, 4, 80)), jnp.zeros((1, 16, 2, 80)), jnp.zeros((1, 16, 2, 80)))
    with pytest.raises(ValueError, match="self-attention"):
        flash_attention(q, jnp.zeros((1, 8, 2, 64)), jnp.zeros((1, 8, 2, 64)))
    with pytest.raises(ValueError, match="segment_ids must be"):
        flash_attention(q, q, q, segment_ids=jnp.ones((1, 15), jnp.int32))
    with pytest.raises(ValueError, match="sliding_window must be a positive int"):
        flash_attention(q, q, q, sliding_window=0)
    with pytest.raises(ValueError, match="share one dtype"):
        flash_attention(q, q.astype(jnp.bfloat16), q)
    with pytest.raises(ValueError, match="powers of two"):
        flash_attention(q, q, q, block_sizes=BlockSizes(24, 16, 16, 16, 16, 16))
    positions = jnp.zeros((1, 16), jnp.int32)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'; choose one of"):
        layers.attention(q, q, q, q_positions=positions, implementation="flash")
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple"):
        layers.attention(q, q[:, :, :3], q[:, :, :3], q_positions=positions)
    if jax.default_backend() != "gpu":  # scripts/gpu_check.sh runs this test on a GPU too
        with pytest.raises(ValueError, match="cudnn' needs an NVIDIA GPU with cuDNN, but the backend is cpu"):
            layers.attention(q, q, q, q_positions=positions, implementation="cudnn")
    else:  # float32 q: cuDNN's fused attention takes bf16/fp16 only (JAX's own error is a NotImplementedError)
        with pytest.raises(ValueError, match="attention='cudnn' computes in bfloat16 or float16, not float32"):
            layers.attention(q, q, q, q_positions=positions, implementation="cudnn")
    with pytest.raises(ValueError, match="attention='cudnn' computes in bfloat16 or float16, not float32; use"):
        decoder.DecoderConfig(vocab_size=8, hidden_size=64, intermediate_size=8, num_layers=1, num_heads=1,
                              num_kv_heads=1, head_dim=64, dtype="float32", attention="cudnn")
    # and at config time, before anything compiles
    arch = dict(vocab_size=32, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        decoder.DecoderConfig(**arch, head_dim=16, attention="flash")
    with pytest.raises(ValueError, match=r"attention='pallas' supports head_dim .* not 16; use attention='xla'"):
        decoder.DecoderConfig(**arch, head_dim=16, attention="pallas")
    decoder.DecoderConfig(**arch, head_dim=16, attention="auto")  # auto falls back where pallas cannot run
    # on CPU xla (interpret mode is for tests, not speed); gpu_check.sh runs this on a GPU too
    assert layers.resolve_attention("auto", 64) == {"gpu": "pallas", "tpu": "splash"}.get(jax.default_backend(), "xla")


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)])
@pytest.mark.parametrize("kernel", ["pallas", "splash"])
def test_sharded_kernel_matches_unsharded(heads, kv_heads, kernel):
    """Under a 2x2x2 mesh the kernel (easytune's, or the TPU splash wrapper in interpret mode) runs
    per shard (batch over dp x fsdp, heads over mp); with one KV head (MQA) each mp shard takes its
    slice of the replicated K/V."""
    rng = np.random.RandomState(heads + kv_heads)
    batch, seq = 4, 40
    q, k, v = random_qkv(rng, batch, seq, heads, kv_heads, 64, jnp.float32)
    segments = jnp.asarray(packed_segments(rng, batch, seq))
    cotangent = jnp.asarray(rng.randn(*q.shape), jnp.float32) * (segments != 0)[:, :, None, None]

    def attend(q, k, v, segments):
        if kernel == "splash":
            return tpu_flash_attention(q, k, v, segment_ids=segments, sliding_window=11)
        return flash_attention(q, k, v, segment_ids=segments, sliding_window=11, block_sizes=SMALL)

    def run(q, k, v, segments, cotangent):
        return values_and_grads(lambda q, k, v: attend(q, k, v, segments), q, k, v, cotangent)

    expected = jax.jit(run, compiler_options=FAST_COMPILE)(q, k, v, segments, cotangent)
    mesh = sharding.make_mesh("2,2,2")
    heads_spec = NamedSharding(mesh, P(("dp", "fsdp"), None, "mp", None))
    kv_spec = heads_spec if kv_heads % 2 == 0 else NamedSharding(mesh, P(("dp", "fsdp"), None, None, None))
    placed = [jax.device_put(x, s) for x, s in ((q, heads_spec), (k, kv_spec), (v, kv_spec),
                                                 (segments, sharding.batch_sharding(mesh)), (cotangent, heads_spec))]
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(run)(*placed))
        actual = jax.jit(run, compiler_options=FAST_COMPILE)(*placed)
    # (not bit-equal: XLA sums delta = rowsum(o * do) in another order for another batch size)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5), actual, expected)


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    """Tiny Mistral (GQA 4/2, sliding window 5) with head_dim 64, a size the kernel supports."""
    from conftest import make_hf_model
    directory = tmp_path_factory.mktemp("mistral64")
    make_hf_model("mistral_sliding_window", directory, head_dim=64)
    return str(directory)


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    """Tiny Gemma 2 (sliding/global layers, window 5, both soft-caps active) with head_dim 64."""
    from conftest import make_hf_model
    directory = tmp_path_factory.mktemp("gemma2_64")
    make_hf_model("gemma2_softcap", directory, head_dim=64)
    return str(directory)


def load(directory, attention):
    return easytune.load(directory, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1", attention=attention)


def packed_rows(rng, batch, seq, vocab):
    segments = packed_segments(rng, batch, seq)
    positions = np.zeros_like(segments)
    for row in range(batch):
        for segment in range(1, segments[row].max() + 1):
            where = segments[row] == segment
            positions[row, where] = np.arange(where.sum())
    tokens = rng.randint(0, vocab, (batch, seq + 1)).astype(np.int32)
    return {"input_ids": tokens[:, :-1], "target_ids": tokens[:, 1:], "loss_mask": (segments != 0).astype(np.int32),
            "segment_ids": segments, "positions": positions}


@pytest.mark.parametrize("family,attention", [("mistral", "pallas"), ("mistral", "splash"), ("gemma2", "pallas")])
def test_model_forward_and_train_step_match_xla(request, family, attention):
    """attention='pallas' (and 'splash', the TPU kernel, in interpret mode) under a 2x2x2 mesh (the
    kernel per shard inside the scanned, differentiated model) gives the logits and the SFT step of
    attention='xla' on one device. Gemma 2: the soft-cap and the attention scale inside the kernel,
    and sliding and global layers as the two branches of the per-layer switch."""
    directory = request.getfixturevalue(f"{family}_dir")
    from easytune import train
    from easytune.algos import sft

    rows = packed_rows(np.random.RandomState(0), 4, 48, 128)
    xla = load(directory, "xla")
    pallas = easytune.load(directory, tokenizer=False, mesh_dim="2,2,2", attention=attention)
    optimizer, _ = train.make_optimizer(train.OptimizerConfig(), total_steps=10)
    forward = jax.jit(decoder.forward, static_argnums=0, compiler_options=FAST_COMPILE)
    results = []
    for model in (xla, pallas):
        batch = {k: jax.device_put(v, sharding.batch_sharding(model.mesh)) for k, v in rows.items()}
        # one SFT train step: the loop's own step function (loss, grads, clipping, AdamW)
        step = train.build_train_step(model.config, sft.LOSS, optimizer, "mean", grad_accum_steps=1)
        with jax.set_mesh(model.mesh):
            logits = forward(model.config, model.params, batch["input_ids"], batch["positions"], batch["segment_ids"])
            params, _, metrics = jax.jit(step, compiler_options=FAST_COMPILE)(
                model.params, optimizer.init(model.params), None, {k: v[None] for k, v in batch.items()}, 0)
        results.append((np.asarray(logits), params, metrics))
    (logits_x, params_x, metrics_x), (logits_p, params_p, metrics_p) = results
    real = rows["segment_ids"] != 0
    np.testing.assert_allclose(logits_p[real], logits_x[real], atol=2e-5)
    assert np.isfinite(logits_p).all()
    np.testing.assert_allclose(metrics_p["loss"], metrics_x["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics_p["grad_norm"], metrics_x["grad_norm"], rtol=1e-5)
    # (Adam's first step is about lr * sign(grad): as in test_train_sft, near-zero grads summed in
    # another order across shards move a parameter by a visible fraction of lr = 1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5), params_p, params_x)


def test_prefill_into_an_empty_cache_runs_the_kernel(mistral_dir):
    """generate's prefill (several tokens into an empty cache) takes the kernel and gives the xla
    hidden states and cache; a decode step (one token) attends over the cache with xla."""
    from easytune import generate
    xla, pallas = load(mistral_dir, "xla"), load(mistral_dir, "pallas")
    # left-padded prompts, longer than the window (5): the cache is a ring of 5 slots
    tokens, positions, segments = generate.left_pad([[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4, 5]])
    real = segments != 0

    def prefill(config, params, tokens, positions, segments):
        cache = decoder.init_cache(config, tokens.shape[0], 32)
        return decoder.hidden_states(config, params, tokens, positions, segments, cache)

    run = jax.jit(prefill, static_argnums=0, compiler_options=FAST_COMPILE)
    (hidden_x, cache_x), (hidden_p, cache_p) = [run(m.config, m.params, tokens, positions, segments)
                                                for m in (xla, pallas)]
    np.testing.assert_allclose(np.asarray(hidden_p)[real], np.asarray(hidden_x)[real], atol=2e-5)
    filled = np.asarray(cache_x["segment_ids"]) != 0  # (padding slots hold padding rows' keys: never read)
    np.testing.assert_array_equal(cache_p["segment_ids"], cache_x["segment_ids"])
    for name in ("k", "v"):
        np.testing.assert_allclose(np.asarray(cache_p[name])[:, filled], np.asarray(cache_x[name])[:, filled], atol=2e-5)
    assert "pallas_call" in str(jax.make_jaxpr(prefill, static_argnums=0)(pallas.config, pallas.params, tokens,
                                                                         positions, segments))
    assert "pallas_call" not in str(jax.make_jaxpr(prefill, static_argnums=0)(
        pallas.config, pallas.params, tokens[:, :1], positions[:, :1], segments[:, :1]))


def test_bench_script_runs_tiny_on_cpu():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench_attention.py"), "--seqs=128", "--head_dims=64",
         "--tiny", "--repeats=1", "--warmup=1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for name in ("easytune pallas", "easytune splash", "xla", "jax pallas mha"):
        assert name in out, out
    assert "cudnn" in out and "skipped" in out  # unavailable on CPU, said so
    assert "train step" in out and "ratio" in out
    assert "failed" not in out, out  # every implementation that runs here ran, kernels and train steps
