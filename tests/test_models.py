"""Model forward parity with transformers (PyTorch, CPU, fp32) on tiny random configs."""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

import easytune
from conftest import TINY_CONFIGS

SEQ = 16  # longer than the Mistral sliding window (5) and rope_scaling's original context (8)


def reference_logits(torch_model, tokens):
    with torch.no_grad():
        return torch_model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_transformers(hf_models, name):
    directory, torch_model = hf_models[name]
    model = easytune.load(directory, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")
    tokens = np.random.RandomState(1).randint(0, 128, (3, SEQ))
    diff = np.abs(np.asarray(model(tokens)) - reference_logits(torch_model, tokens)).max()
    print(f"{name}: max |logits diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_padding_and_packing_match_separate_forwards(hf_models):
    """Two examples packed in one row (segment ids, per-segment positions) and a padded tail give
    the logits of each example run alone: attention never crosses examples."""
    directory, torch_model = hf_models["mistral_sliding_window"]
    model = easytune.load(directory, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")
    rng = np.random.RandomState(2)
    a, b = rng.randint(0, 128, 9), rng.randint(0, 128, 7)
    packed = np.concatenate([a, b, [0, 0, 0]])[None]
    positions = np.concatenate([np.arange(9), np.arange(7), [0, 0, 0]])[None]
    segments = np.concatenate([np.full(9, 1), np.full(7, 2), np.zeros(3, int)])[None]
    logits = np.asarray(model(packed, jnp.asarray(positions), jnp.asarray(segments)))
    np.testing.assert_allclose(logits[0, :9], reference_logits(torch_model, a[None])[0], atol=1e-4)
    np.testing.assert_allclose(logits[0, 9:16], reference_logits(torch_model, b[None])[0], atol=1e-4)
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_values_and_gradients(hf_models, remat):
    directory, _ = hf_models["llama3_gqa_rope_scaling"]
    plain = easytune.load(directory, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")
    rematted = easytune.load(directory, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1", remat=remat)
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, 128, (2, SEQ)))

    def loss(config, params):
        logits = plain.family.forward(config, params, tokens)
        return jax.nn.logsumexp(logits, -1).mean()

    g1 = jax.grad(loss, argnums=1)(plain.config, plain.params)
    g2 = jax.grad(loss, argnums=1)(rematted.config, rematted.params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), g1, g2)
    # and the rematerialization is really there
    assert "remat" not in str(jax.make_jaxpr(jax.grad(loss, argnums=1), static_argnums=0)(plain.config, plain.params))
    assert "remat" in str(jax.make_jaxpr(jax.grad(loss, argnums=1), static_argnums=0)(rematted.config, rematted.params))


@pytest.mark.parametrize("name", ["llama2", "gemma2_softcap"])
def test_bf16_params_and_compute(hf_models, name):
    """param_dtype and dtype are independent; bf16 stays close to the fp32 reference (Gemma: its
    norms in float32, the embedding scale rounded to bf16 as transformers does)."""
    directory, torch_model = hf_models[name]
    model = easytune.load(directory, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1", param_dtype="bf16", dtype="bf16")
    assert model.params["layers"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16
    mixed = easytune.load(directory, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1", param_dtype="float32", dtype="bfloat16")
    assert mixed.params["layers"]["attn"]["q"]["kernel"].dtype == jnp.float32
    tokens = np.random.RandomState(4).randint(0, 128, (2, SEQ))
    ref = reference_logits(torch_model, tokens)
    fp32 = np.asarray(easytune.load(directory, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")(tokens))
    for m in (model, mixed):
        logits = np.asarray(m(tokens))
        assert logits.dtype == np.float32
        assert np.abs(logits - ref).max() < 0.05 * np.abs(ref).max()
        assert np.abs(logits - fp32).max() > 1e-4  # computed in bf16, not silently in fp32


def test_mistral_without_sliding_window(tmp_path):
    """Mistral v0.2+ configs set sliding_window to null: full causal attention."""
    from conftest import make_hf_model
    torch_model = make_hf_model("mistral_sliding_window", tmp_path, sliding_window=None)
    model = easytune.load(str(tmp_path), tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")
    assert model.config.sliding_window is None
    tokens = np.random.RandomState(6).randint(0, 128, (2, SEQ))
    np.testing.assert_allclose(model(tokens), reference_logits(torch_model, tokens), atol=1e-4)


def test_out_of_vocab_padding_stays_finite(hf_models):
    """A pad id outside the vocabulary (a pad token added to the tokenizer) in padded positions
    must not turn the real tokens' logits into NaN."""
    directory, torch_model = hf_models["llama2"]
    model = easytune.load(directory, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")
    tokens = np.random.RandomState(7).randint(0, 128, (1, 12))
    padded = np.concatenate([tokens, np.full((1, 4), 128)], axis=1)
    segments = jnp.asarray(np.concatenate([np.ones((1, 12)), np.zeros((1, 4))], axis=1).astype(np.int32))
    logits = np.asarray(model(padded, None, segments))
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits[:, :12], reference_logits(torch_model, tokens), atol=1e-4)
