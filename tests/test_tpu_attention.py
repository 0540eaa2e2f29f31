"""The TPU kernel (`easytune.kernels.tpu_flash_attention`: JAX's Pallas splash attention with
easytune's semantics) in Pallas' TPU interpret mode on this CPU, against the XLA reference: values
and gradients, packing, GQA/MQA, sliding window, ragged lengths, bf16, a mesh; and a sharded train
step with `--attention=splash` exported for TPU from this CPU. (The model end to end with
`attention='splash'`: test_kernels.test_model_forward_and_train_step_match_xla.)"""
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

import easytune
from easytune import kernels
from easytune.kernels import tpu_flash_attention
from easytune.models import decoder, layers

from test_kernels import (FAST_COMPILE, assert_close, mistral_dir, packed_rows, packed_segments,  # noqa: F401
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


# (per shard under a 2x2x2 mesh: test_kernels.test_sharded_kernel_matches_unsharded[*-splash])


def sft_step(model, optimizer):
    from easytune import train
    from easytune.algos import sft
    return train.build_train_step(model.config, sft.LOSS, optimizer, "mean", grad_accum_steps=1)


# (the model forward and one SFT step with attention='splash' on a 2x2x2 mesh against xla:
# test_kernels.test_model_forward_and_train_step_match_xla[splash])


def test_train_step_exports_for_tpu(mistral_dir):  # noqa: F811
    """Without a TPU: the whole SFT train step with attention='splash' on a 2x2x2 mesh lowers for
    TPU (`jax.export(platforms=['tpu'])`), with splash's forward, dQ and dK/dV kernels as Mosaic
    custom calls in it; the same step with attention='xla' has none."""
    from easytune import train

    optimizer, _ = train.make_optimizer(train.OptimizerConfig(), total_steps=10)
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


def test_auto_picks_splash_on_tpu_and_config_refuses_it_on_gpu(monkeypatch):
    """The switch as it decides on other backends (the backend faked: the decision is all that runs)."""
    arch = dict(vocab_size=32, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert layers.resolve_attention("auto", 64) == "splash"
    decoder.DecoderConfig(**arch, head_dim=16, attention="splash")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert layers.resolve_attention("auto", 64) == "pallas"
    with pytest.raises(ValueError, match=r"splash' is the TPU kernel and cannot run on gpu; use attention='pallas'"):
        decoder.DecoderConfig(**arch, head_dim=16, attention="splash")


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
    decoder.DecoderConfig(**arch, head_dim=16, attention="splash")
    assert layers.resolve_attention("auto", 64) == "xla"
