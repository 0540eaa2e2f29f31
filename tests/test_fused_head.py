"""The fused, chunked LM head (`easytune.models.fused_head`): log-probs, entropy and their gradients
equal the full-logits computation (`algos.logprobs.token_logps`, itself checked against TRL's
selective_log_softmax), the losses of SFT, DPO and PPO are unchanged with `head_chunk_size`, and
the compiled peak memory of a Llama-3-8B-shaped head falls."""
import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import easytune
from easytune.algos import dpo, logprobs, ppo, sft
from easytune.models import fused_head


def full_logits_reference(hidden, kernel, targets, temperature):
    logits = jnp.einsum("...h,hv->...v", hidden, kernel.astype(hidden.dtype),
                        preferred_element_type=jnp.float32) / temperature
    return logprobs.token_logps(logits, targets), logprobs.entropy_from_logits(logits)


@pytest.mark.parametrize("dtype,chunk,temperature", [(jnp.float32, 5, 1.0), (jnp.float32, 64, 0.7),
                                                     (jnp.bfloat16, 8, 1.3)])
def test_values_and_gradients_match_full_logits(dtype, chunk, temperature):
    rng = np.random.RandomState(0)
    hidden = jnp.asarray(rng.randn(3, 13, 32), jnp.float32).astype(dtype)  # 39 tokens: chunks do not divide it
    kernel = jnp.asarray(rng.randn(32, 300) * 0.2, jnp.float32)
    targets = jnp.asarray(rng.randint(0, 300, (3, 13)))
    weights = jnp.asarray(rng.randn(2, 3, 13), jnp.float32)

    def objective(fn):
        def f(hidden, kernel):
            logp, entropy = fn(hidden, kernel)
            return jnp.sum(weights[0] * logp) + jnp.sum(weights[1] * entropy)
        return f

    fused = lambda h, k: fused_head.target_logprobs(h, k, targets, temperature=temperature, chunk_size=chunk,  # noqa: E731
                                                    with_entropy=True)
    full = lambda h, k: full_logits_reference(h, k, targets, temperature)  # noqa: E731
    # values: the same bf16/fp32 operands with float32 accumulation and softmax on both sides
    for ours, theirs in zip(jax.jit(fused)(hidden, kernel), jax.jit(full)(hidden, kernel)):
        assert ours.dtype == jnp.float32 and ours.shape == (3, 13)
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    ours = jax.jit(jax.grad(objective(fused), argnums=(0, 1)))(hidden, kernel)
    theirs = jax.jit(jax.grad(objective(full), argnums=(0, 1)))(hidden, kernel)
    for name, a, b in zip(("d_hidden", "d_kernel"), ours, theirs):
        assert a.dtype == b.dtype, name
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = np.abs(b).max()
        # bf16: the logits' gradient is rounded to bf16 (2^-8 relative) before the two dots
        assert np.abs(a - b).max() <= (1e-5 if dtype == jnp.float32 else 1e-2) * scale, name


def test_logits_never_materialised_in_the_jaxpr():
    """No array in the fused forward + backward holds more than one chunk of logits."""
    hidden = jnp.zeros((4, 256, 16))
    kernel = jnp.zeros((16, 1000))
    targets = jnp.zeros((4, 256), jnp.int32)
    loss = lambda h, k: jnp.sum(fused_head.target_logprobs(h, k, targets, chunk_size=128))  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, kernel)
    sizes = []

    def visit(j):
        for eqn in j.eqns:
            sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for param in eqn.params.values():
                for inner in (param if isinstance(param, (list, tuple)) else [param]):
                    inner = getattr(inner, "jaxpr", inner)
                    if hasattr(inner, "eqns"):
                        visit(inner)
    visit(jaxpr.jaxpr)
    assert max(sizes) <= 128 * 1000 < 4 * 256 * 1000, max(sizes)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Tied and untied tiny LLaMAs, with and without the fused head."""
    from conftest import make_hf_model
    out = {}
    for name in ("llama_tied_mqa", "llama2"):
        directory = tmp_path_factory.mktemp(name)
        make_hf_model(name, directory)
        plain = easytune.load(str(directory), tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")
        fused = easytune.load(str(directory), tokenizer=False, mesh_dim="2,2,2", head_chunk_size=24)
        assert fused.config.head_chunk_size == 24 and plain.config.head_chunk_size == 0
        out[name] = plain, fused
    return out


def rows(rng, batch=4, seq=20, vocab=128):
    tokens = rng.randint(3, vocab, (batch, seq + 1)).astype(np.int32)
    return {"input_ids": tokens[:, :-1], "target_ids": tokens[:, 1:], "loss_mask": np.ones((batch, seq), np.int32),
            "segment_ids": np.ones((batch, seq), np.int32), "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1))}


def loss_and_grads(loss_fn, model, batch):
    with jax.set_mesh(model.mesh):
        return jax.jit(jax.value_and_grad(loss_fn, argnums=1, has_aux=True), static_argnums=0)(
            model.config, model.params, {k: jnp.asarray(v) for k, v in batch.items()})


@pytest.mark.parametrize("name", ["llama_tied_mqa", "llama2"])
def test_sft_dpo_and_ppo_losses_are_unchanged(tiny_models, name):
    """head_chunk_size (on a 2x2x2 mesh) gives the SFT loss, DPO's pair log-probs and PPO's response
    log-probs and entropy of the full-logits path (one device), and the same gradients."""
    plain, fused = tiny_models[name]
    rng = np.random.RandomState(1)
    batch = rows(rng)

    def sft_loss(config, params, batch):
        total, count = sft.loss_sums(config, params, batch)
        return total / count, total

    with jax.set_mesh(fused.mesh):  # per batch shard, not every row on every device
        assert "shard_map" in str(jax.make_jaxpr(jax.grad(lambda p: sft_loss(fused.config, p, batch)[0]))(fused.params))
    (loss_p, _), grads_p = loss_and_grads(sft_loss, plain, batch)
    (loss_f, _), grads_f = loss_and_grads(sft_loss, fused, batch)
    np.testing.assert_allclose(loss_f, loss_p, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6), grads_f, grads_p)

    pairs = {f"{side}_{key}": value for side in ("chosen", "rejected") for key, value in rows(rng).items()}
    ours, theirs = (jax.jit(dpo.pair_logps, static_argnums=0)(m.config, m.params, pairs) for m in (fused, plain))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5), ours, theirs)

    rollout = {**rows(rng), "response_mask": np.ones((4, 6), np.int32)}
    ours, theirs = (jax.jit(ppo.response_logprobs, static_argnums=(0, 3, 4))(m.config, m.params, rollout, 0.7, True)
                    for m in (fused, plain))
    for a, b in zip(ours, theirs):
        assert a.shape == (4, 6)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_head_chunk_size_is_checked():
    from easytune.models import decoder
    arch = dict(vocab_size=32, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                head_dim=16)
    with pytest.raises(ValueError, match="head_chunk_size must be a number of tokens >= 0"):
        decoder.DecoderConfig(**arch, head_chunk_size=-1)
    with pytest.raises(ValueError, match="chunk_size must be a positive number of tokens"):
        fused_head.target_logprobs(jnp.zeros((2, 4)), jnp.zeros((4, 8)), jnp.zeros((2,), jnp.int32), chunk_size=0)
    # an adapted head falls back to the full logits (the one linear); a score head has no fused path
    config = dataclasses.replace(decoder.DecoderConfig(**arch), head_chunk_size=8)
    assert decoder.fused_head_inputs(config, {"lm_head": {"kernel": 0, "lora_a": 0}}, None) is None
    assert decoder.fused_head_inputs(dataclasses.replace(config, num_labels=1), {}, None) is None


def test_peak_memory_of_a_llama3_8b_head():
    """Compiled (not run) on this CPU: the SFT head + cross-entropy, forward and backward, for
    8 x 4096 tokens at vocab 128,256 and hidden 4096 in bf16; the fused head's temporary memory is
    a small fraction of the full logits'."""
    tokens, hidden_size, vocab = 8 * 4096, 4096, 128256
    hidden = jax.ShapeDtypeStruct((8, 4096, hidden_size), jnp.bfloat16)
    kernel = jax.ShapeDtypeStruct((hidden_size, vocab), jnp.bfloat16)
    targets = jax.ShapeDtypeStruct((8, 4096), jnp.int32)

    def full(h, k, t):
        return -jnp.mean(full_logits_reference(h, k, t, 1.0)[0])

    def fused(h, k, t):
        return -jnp.mean(fused_head.target_logprobs(h, k, t, chunk_size=2048))

    peak = {}
    for name, fn in (("full", full), ("fused", fused)):
        compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(hidden, kernel, targets).compile()
        peak[name] = compiled.memory_analysis().temp_size_in_bytes
    logits_bytes = tokens * vocab * 4
    print(f"temp bytes: full {peak['full'] / 2**30:.2f} GiB, fused {peak['fused'] / 2**30:.2f} GiB "
          f"(float32 logits alone: {logits_bytes / 2**30:.2f} GiB)")
    assert peak["full"] >= logits_bytes  # the full path holds the logits (at least)
    # the fused path's own budget: the head gradient's float32 accumulator, a few float32
    # [chunk, vocab] arrays of one chunk (logits, probabilities, their gradient), and float32-sized
    # copies of the hidden states and their gradient (measured: 4.48 GiB against 35.23 GiB)
    budget = hidden_size * vocab * 4 + 3 * 2048 * vocab * 4 + 2 * tokens * hidden_size * 4
    assert peak["fused"] <= budget and peak["fused"] * 5 <= peak["full"]
