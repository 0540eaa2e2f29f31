"""The TPU kernel (`easytune.kernels.tpu_flash_attention`: JAX's Pallas splash attention with
easytune's semantics) in Pallas' TPU interpret mode on this CPU, against the XLA reference: values
and gradients, packing, GQA/MQA, sliding window, ragged lengths, bf16, a mesh; `--attention=splash`
end to end; and a train step exported for TPU from this CPU."""
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

import easytune
from easytune import kernels, sharding
from easytune.kernels import tpu_flash_attention
from easytune.models import layers, llama

from test_kernels import (FAST_COMPILE, assert_close, load, mistral_dir, packed_rows, packed_segments,  # noqa: F401
                          random_qkv, reference, values_and_grads)

CASES = {
    # name: batch, seq, heads, kv_heads, head_dim, causal, window, packed, dtype
    "gqa_packed_padded_ragged": (2, 200, 4, 2, 64, True, None, True, jnp.float32),
    "mqa_window_bf16": (2, 130, 4, 1, 128, True, 50, True, jnp.bfloat16),
    "bidirectional_window_odd_head_dim": (1, 300, 2, 2, 80, False, 33, False, jnp.float32),
    "mha_causal_one_block": (1, 128, 2, 2, 64, True, None, False, jnp.float32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_values_and_gradients_match_the_xla_reference(case):
    batch, seq, heads, kv_heads, head_dim, causal, window, packed, dtype = CASES[case]
    rng = np.random.RandomState(len(case))
    q, k, v = random_qkv(rng, batch, seq, heads, kv_heads, head_dim, dtype)
    segments = jnp.asarray(packed_segments(rng, batch, seq)) if packed else None
    real = np.ones((batch, seq), bool) if segments is None else np.asarray(segments) != 0
    cotangent = jnp.asarray(rng.randn(*q.shape), jnp.float32).astype(dtype)

    def expected_fn(q, k, v):  # padding rows output 0 (the kernels' rule; the reference leaves them free)
        return reference(q, k, v, segments, causal, window) * jnp.asarray(real, dtype)[:, :, None, None]

    expected, expected_grads = jax.jit(lambda *a: values_and_grads(expected_fn, *a, cotangent))(q, k, v)
    actual, actual_grads = jax.jit(lambda *a: values_and_grads(
        lambda q, k, v: tpu_flash_attention(q, k, v, causal=causal, segment_ids=segments, sliding_window=window),
        *a, cotangent), compiler_options=FAST_COMPILE)(q, k, v)
    assert actual.dtype == dtype and actual.shape == q.shape
    assert_close(actual, expected, dtype, "output")
    assert not np.asarray(actual, np.float32)[~real].any()  # padding rows are exactly 0
    for name, a, e in zip(("dq", "dk", "dv"), actual_grads, expected_grads):
        assert_close(a, e, dtype, name)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)])
def test_sharded_kernel_matches_unsharded(heads, kv_heads):
    """Under a 2x2x2 mesh the kernel runs per shard (batch over dp x fsdp, heads over mp; with one KV
    head each mp shard takes the replicated K/V), with the values and gradients of one device."""
    rng = np.random.RandomState(heads + kv_heads)
    batch, seq = 4, 136
    q, k, v = random_qkv(rng, batch, seq, heads, kv_heads, 64, jnp.float32)
    segments = jnp.asarray(packed_segments(rng, batch, seq))
    cotangent = jnp.asarray(rng.randn(*q.shape), jnp.float32)

    def run(q, k, v, segments, cotangent):
        return values_and_grads(lambda q, k, v: tpu_flash_attention(q, k, v, segment_ids=segments, sliding_window=40),
                                q, k, v, cotangent)

    expected = jax.jit(run, compiler_options=FAST_COMPILE)(q, k, v, segments, cotangent)
    mesh = sharding.make_mesh("2,2,2")
    heads_spec = NamedSharding(mesh, P(("dp", "fsdp"), None, "mp", None))
    kv_spec = heads_spec if kv_heads % 2 == 0 else NamedSharding(mesh, P(("dp", "fsdp"), None, None, None))
    placed = [jax.device_put(x, s) for x, s in ((q, heads_spec), (k, kv_spec), (v, kv_spec),
                                                 (segments, sharding.batch_sharding(mesh)), (cotangent, heads_spec))]
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(run)(*placed))
        actual = jax.jit(run, compiler_options=FAST_COMPILE)(*placed)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5), actual, expected)


def sft_step(model, optimizer):
    from easytune import train
    from easytune.algos import sft
    return train.build_train_step(model.config, sft.loss_sums, optimizer, "mean", grad_accum_steps=1)


def test_model_forward_and_train_step_match_xla(mistral_dir):  # noqa: F811
    """attention='splash' under a 2x2x2 mesh (the kernel per shard inside the scanned, differentiated
    model) gives the logits, loss and gradient norm of attention='xla' on one device, and the same
    first AdamW step."""
    from ml_collections import ConfigDict

    from easytune import train
    from easytune.train_sft import DEFAULTS

    rows = packed_rows(np.random.RandomState(0), 4, 48, 128)
    xla = load(mistral_dir, "xla")
    splash = easytune.load(mistral_dir, tokenizer=False, mesh_dim="2,2,2", attention="splash")
    optimizer, _ = train.make_optimizer(ConfigDict(DEFAULTS).optimizer, total_steps=10)
    forward = jax.jit(llama.forward, static_argnums=0, compiler_options=FAST_COMPILE)
    results = []
    for model in (xla, splash):
        batch = {k: jax.device_put(v, sharding.batch_sharding(model.mesh)) for k, v in rows.items()}
        step = sft_step(model, optimizer)
        with jax.set_mesh(model.mesh):
            logits = forward(model.config, model.params, batch["input_ids"], batch["positions"], batch["segment_ids"])
            params, _, metrics = jax.jit(step, compiler_options=FAST_COMPILE)(
                model.params, optimizer.init(model.params), None, {k: v[None] for k, v in batch.items()}, 0)
        results.append((np.asarray(logits), params, metrics))
    (logits_x, params_x, metrics_x), (logits_s, params_s, metrics_s) = results
    real = rows["segment_ids"] != 0
    np.testing.assert_allclose(logits_s[real], logits_x[real], atol=2e-5)
    assert np.isfinite(logits_s).all()
    np.testing.assert_allclose(metrics_s["loss"], metrics_x["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics_s["grad_norm"], metrics_x["grad_norm"], rtol=1e-5)
    # (Adam's first step is lr * g / (|g| + eps): see test_train_sft.assert_same_training for why
    # near-zero gradients summed in another order may move a parameter by a visible fraction of lr)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5), params_s, params_x)


def test_train_step_exports_for_tpu(mistral_dir):  # noqa: F811
    """Without a TPU: the whole SFT train step with attention='splash' on a 2x2x2 mesh lowers for
    TPU (`jax.export(platforms=['tpu'])`), with splash's forward, dQ and dK/dV kernels as Mosaic
    custom calls in it; the same step with attention='xla' has none."""
    from ml_collections import ConfigDict

    from easytune import train
    from easytune.train_sft import DEFAULTS

    optimizer, _ = train.make_optimizer(ConfigDict(DEFAULTS).optimizer, total_steps=10)
    rows = packed_rows(np.random.RandomState(0), 4, 256, 128)
    modules = {}
    for attention in ("splash", "xla"):
        model = easytune.load(mistral_dir, tokenizer=False, mesh_dim="2,2,2", attention=attention)
        batch = {k: jax.device_put(v[None], NamedSharding(model.mesh, P(None, ("dp", "fsdp"))))
                 for k, v in rows.items()}
        with jax.set_mesh(model.mesh), kernels.for_export("tpu"):
            exported = jax.export.export(jax.jit(sft_step(model, optimizer)), platforms=["tpu"])(
                model.params, optimizer.init(model.params), None, batch, np.int32(0))
        modules[attention] = exported.mlir_module()
        assert exported.nr_devices == 8
    names = set(re.findall(r"splash_mha_[a-z_]+", modules["splash"]))
    assert {"splash_mha_fwd_segmented_residuals", "splash_mha_dq_segmented_no_residuals",
            "splash_mha_dkv_segmented_no_residuals"} <= names, names
    assert modules["splash"].count("tpu_custom_call") >= 3
    assert "tpu_custom_call" not in modules["xla"]


def test_bad_uses_are_one_sentence_errors():
    q = jnp.zeros((1, 16, 4, 64))
    with kernels.for_export("cuda"), pytest.raises(ValueError, match=r"splash' is the TPU kernel and cannot run on "
                                                                      r"cuda; use attention='pallas' or 'cudnn'"):
        tpu_flash_attention(q, q, q)
    with pytest.raises(ValueError, match="block_size must be a multiple of 128"):
        tpu_flash_attention(q, q, q, block_size=64)
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of .* key/value heads \(3\)"):
        tpu_flash_attention(q, jnp.zeros((1, 16, 3, 64)), jnp.zeros((1, 16, 3, 64)))
    with pytest.raises(ValueError, match="segment_ids must be"):
        tpu_flash_attention(q, q, q, segment_ids=jnp.ones((1, 15), jnp.int32))
    # the switch: splash is a known implementation (interpret mode on this CPU); auto stays xla here
    arch = dict(vocab_size=32, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
    llama.LlamaConfig(**arch, head_dim=16, attention="splash")
    assert layers.resolve_attention("auto", 64) == "xla"
