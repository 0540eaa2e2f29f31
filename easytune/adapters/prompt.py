"""Prompt tuning, P-tuning and prefix tuning, as in `peft`: trainable virtual tokens (or, for
prefix tuning, per-layer keys and values), optionally produced by a small encoder (P-tuning's MLP or
LSTM, prefix tuning's projection) with torch's layer definitions, so the weights move to and from
peft unchanged.

Attached to the base tree as `virtual_tokens [n, hidden]` (prepended to the input embeddings by the
model) or `prefix = {k, v}: [layers, n, kv_heads, head_dim]` (prepended to every layer's keys and
values).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from easytune.adapters.config import AdapterConfig


def check_supported(config: AdapterConfig, model_config) -> None:
    """Prompt-type adapters need a decoder-only model: a clear error otherwise."""
    from easytune import models
    if models.is_encoder_decoder(model_config.model_type):
        raise ValueError(f"{config.method} adapters are implemented for decoder-only models; for "
                         f"{model_config.model_type} use lora, qlora or dora.")


# ----------------------------------------------------------------------------- init

def init_params(config: AdapterConfig, model_config, base: dict, key: jax.Array, init_embeddings=None) -> dict:
    """Fresh parameters (float32), initialised as peft does: virtual tokens from `init_embeddings
    [n, hidden]` or sampled vocabulary embeddings (prompt tuning) or N(0, 1); encoders as torch's
    `nn.Linear` / `nn.LSTM` defaults."""
    c = model_config
    n, hidden = config.num_virtual_tokens, c.hidden_size
    k_embed, k_enc = jax.random.split(key)
    if config.method == "prompt":
        if init_embeddings is not None:
            embedding = jnp.asarray(init_embeddings, jnp.float32)
        elif config.prompt_init == "sample_vocab":
            ids = jax.random.randint(k_embed, (n,), 0, c.vocab_size)
            embedding = base["embed"]["embedding"][ids].astype(jnp.float32)
        else:
            embedding = jax.random.normal(k_embed, (n, hidden), jnp.float32)
        return {"prompt": {"embedding": embedding}}
    if config.method == "ptuning":
        width = config.encoder_hidden_size or hidden
        keys = jax.random.split(k_enc, 8)
        encoder = {"embedding": jax.random.normal(k_embed, (n, hidden), jnp.float32)}
        if config.encoder_type == "mlp":
            encoder["mlp"] = {"0": _torch_linear(keys[0], hidden, width), "1": _torch_linear(keys[1], width, width),
                              "2": _torch_linear(keys[2], width, hidden)}
        else:
            encoder["lstm"] = _init_lstm(keys[3], hidden, width, num_layers=2)
            encoder["mlp"] = {"0": _torch_linear(keys[4], 2 * width, 2 * width),
                              "1": _torch_linear(keys[5], 2 * width, hidden)}
        return {"prompt_encoder": encoder}
    # prefix: per virtual token, every layer's key and value (peft's layout)
    token_dim = c.num_kv_heads * c.head_dim
    total = c.num_layers * 2 * token_dim
    if config.encoder_type == "mlp":
        width = config.encoder_hidden_size or token_dim
        keys = jax.random.split(k_enc, 2)
        return {"prefix_encoder": {"embedding": jax.random.normal(k_embed, (n, token_dim), jnp.float32),
                                   "transform": {"0": _torch_linear(keys[0], token_dim, width),
                                                 "1": _torch_linear(keys[1], width, total)}}}
    return {"prefix_encoder": {"embedding": jax.random.normal(k_embed, (n, total), jnp.float32)}}


# ----------------------------------------------------------------------------- encoders (torch's layers)

def _torch_linear(key, fan_in: int, fan_out: int) -> dict:
    """torch.nn.Linear's default init (kaiming-uniform weight, uniform bias), our [in, out] layout."""
    bound = 1.0 / math.sqrt(fan_in)
    k_w, k_b = jax.random.split(key)
    return {"kernel": jax.random.uniform(k_w, (fan_in, fan_out), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(k_b, (fan_out,), jnp.float32, -bound, bound)}


def _init_lstm(key, input_size: int, hidden: int, num_layers: int) -> dict:
    """torch.nn.LSTM(bidirectional=True) parameters: per layer and direction w_ih [in, 4h],
    w_hh [h, 4h], b_ih, b_hh [4h] (gate order i, f, g, o), uniform(+-1/sqrt(hidden))."""
    bound = 1.0 / math.sqrt(hidden)
    out = {}
    for layer in range(num_layers):
        size = input_size if layer == 0 else 2 * hidden
        for direction in ("forward", "backward"):
            key, *ks = jax.random.split(key, 5)
            out[f"{layer}_{direction}"] = {
                "w_ih": jax.random.uniform(ks[0], (size, 4 * hidden), jnp.float32, -bound, bound),
                "w_hh": jax.random.uniform(ks[1], (hidden, 4 * hidden), jnp.float32, -bound, bound),
                "b_ih": jax.random.uniform(ks[2], (4 * hidden,), jnp.float32, -bound, bound),
                "b_hh": jax.random.uniform(ks[3], (4 * hidden,), jnp.float32, -bound, bound)}
    return out


def _lstm_direction(p, x, reverse: bool):
    """One direction of an LSTM over `x [n, in]` -> `[n, hidden]` (torch's equations)."""
    hidden = p["w_hh"].shape[0]

    def cell(carry, x_t):
        h, c = carry
        gates = x_t @ p["w_ih"] + p["b_ih"] + h @ p["w_hh"] + p["b_hh"]
        i, f, g, o = jnp.split(gates, 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((hidden,), x.dtype)
    _, hs = jax.lax.scan(cell, (zeros, zeros), x, reverse=reverse)
    return hs


def _linear(p, x):
    return x @ p["kernel"] + p["bias"]


# ----------------------------------------------------------------------------- forward

def virtual_embeddings(config: AdapterConfig, adapter_params: dict) -> jax.Array:
    """Prompt tuning / P-tuning: the `[n, hidden]` embeddings prepended to the input (float32);
    prefix tuning: the flattened prefix `[n, layers * 2 * kv_dim]`. What peft saves as
    `prompt_embeddings`."""
    if config.method == "prompt":
        return adapter_params["prompt"]["embedding"]
    if config.method == "ptuning":
        enc = adapter_params["prompt_encoder"]
        x = enc["embedding"]
        if "lstm" in enc:
            layer = 0
            while f"{layer}_forward" in enc["lstm"]:
                x = jnp.concatenate([_lstm_direction(enc["lstm"][f"{layer}_forward"], x, False),
                                     _lstm_direction(enc["lstm"][f"{layer}_backward"], x, True)], axis=-1)
                layer += 1
            return _linear(enc["mlp"]["1"], jax.nn.relu(_linear(enc["mlp"]["0"], x)))
        x = jax.nn.relu(_linear(enc["mlp"]["0"], x))
        x = jax.nn.relu(_linear(enc["mlp"]["1"], x))
        return _linear(enc["mlp"]["2"], x)
    enc = adapter_params["prefix_encoder"]
    if "transform" in enc:
        return _linear(enc["transform"]["1"], jnp.tanh(_linear(enc["transform"]["0"], enc["embedding"])))
    return enc["embedding"]


def prefix_keys_values(model_config, flat: jax.Array) -> dict:
    """`[n, layers * 2 * kv_dim]` (peft's layout: layer-major, key then value, heads, head_dim) ->
    `{k, v}: [layers, n, kv_heads, head_dim]`."""
    c = model_config
    n = flat.shape[0]
    kv = flat.reshape(n, c.num_layers, 2, c.num_kv_heads, c.head_dim).transpose(2, 1, 0, 3, 4)
    return {"k": kv[0], "v": kv[1]}


def apply(base: dict, adapter_params: dict, config: AdapterConfig, model_config) -> dict:
    """`base` with the virtual tokens (prompt, P-tuning) or the prefix keys and values attached."""
    embeddings = virtual_embeddings(config, adapter_params)
    if config.method == "prefix":
        return {**base, "prefix": prefix_keys_values(model_config, embeddings)}
    return {**base, "virtual_tokens": embeddings}
