"""LLaMA 1/2/3 and Mistral in pure JAX.

Parameters are a nested dict; per-layer weights are stacked on a leading `[num_layers]` axis and
the decoder runs under `jax.lax.scan` (optionally rematerialized), so compile time is flat in depth.

    {'embed': {'embedding': [vocab, hidden]},
     'layers': {'attn_norm': {'scale'}, 'attn': {'q','k','v','o': {'kernel'[, 'bias']}},
                'mlp_norm': {'scale'}, 'mlp': {'gate','up','down': {'kernel'[, 'bias']}}},
     'final_norm': {'scale': [hidden]},
     'lm_head': {'kernel': [hidden, vocab]}}          # absent when embeddings are tied

Kernels are `[in, out]`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from easytune.models import layers
from easytune.dtypes import parse_dtype

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture plus compute options. Frozen and hashable: it is a static jit argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Items of the HF `rope_scaling` dict as a sorted tuple of pairs (hashable); None for plain RoPE.
    rope_scaling: tuple | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral; None attends to the whole prefix
    model_type: str = "llama"
    # > 0: a sequence-classification (reward) model, HF's *ForSequenceClassification: a `score`
    # head [hidden, num_labels] replaces the LM head and `forward` gives per-token scores.
    num_labels: int = 0
    # Compute options: not part of the checkpoint.
    dtype: str = "float32"          # activations and matmuls
    param_dtype: str = "float32"    # stored weights (master weights when training)
    remat: str = "none"             # one of REMAT_POLICIES
    attention: str = "xla"          # layers.attention implementation: xla, pallas, splash, cudnn or auto
    head_chunk_size: int = 0        # > 0: losses run the LM head + log-softmax fused, this many tokens at a time

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})."
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; choose one of {sorted(REMAT_POLICIES)}.")
        parse_dtype(self.dtype)
        parse_dtype(self.param_dtype)
        layers.check_attention(self.attention, self.head_dim)
        if not isinstance(self.head_chunk_size, int) or self.head_chunk_size < 0:
            raise ValueError(f"head_chunk_size must be a number of tokens >= 0 (0: no fused head), "
                             f"got {self.head_chunk_size!r}.")
        layers.rope_inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling_dict)

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def compute_dtype(self):
        return parse_dtype(self.dtype)

    @property
    def weight_dtype(self):
        return parse_dtype(self.param_dtype)


# Sharding rules: regex searched in the '/'-joined parameter path (so optimizer moments whose
# paths end in the parameter path inherit them) -> spec of the per-layer tensor. Stacked leading
# axes are left unsharded automatically. The first match wins.
SHARDING_RULES = (
    (r"embed/embedding$", P("mp", "fsdp")),
    (r"attn/(q|k|v)/kernel$", P("fsdp", "mp")),
    (r"attn/(q|k|v)/bias$", P("mp")),
    (r"attn/o/kernel$", P("mp", "fsdp")),
    (r"mlp/(gate|up)/kernel$", P("fsdp", "mp")),
    (r"mlp/(gate|up)/bias$", P("mp")),
    (r"mlp/down/kernel$", P("mp", "fsdp")),
    (r"lm_head/kernel$", P("fsdp", "mp")),
    (r".*", P()),
)


def param_shapes(config: LlamaConfig) -> dict:
    """Pytree of `jax.ShapeDtypeStruct` describing the parameters."""
    c, dt = config, config.weight_dtype
    n, h = c.num_layers, c.hidden_size
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def dense(fan_in, fan_out, bias):
        p = {"kernel": jax.ShapeDtypeStruct((n, fan_in, fan_out), dt)}
        if bias:
            p["bias"] = jax.ShapeDtypeStruct((n, fan_out), dt)
        return p

    shapes = {
        "embed": {"embedding": jax.ShapeDtypeStruct((c.vocab_size, h), dt)},
        "layers": {
            "attn_norm": {"scale": jax.ShapeDtypeStruct((n, h), dt)},
            "attn": {
                "q": dense(h, q_dim, c.attention_bias),
                "k": dense(h, kv_dim, c.attention_bias),
                "v": dense(h, kv_dim, c.attention_bias),
                "o": dense(q_dim, h, c.attention_bias),
            },
            "mlp_norm": {"scale": jax.ShapeDtypeStruct((n, h), dt)},
            "mlp": {
                "gate": dense(h, c.intermediate_size, c.mlp_bias),
                "up": dense(h, c.intermediate_size, c.mlp_bias),
                "down": dense(c.intermediate_size, h, c.mlp_bias),
            },
        },
        "final_norm": {"scale": jax.ShapeDtypeStruct((h,), dt)},
    }
    if c.num_labels:
        shapes["score"] = {"kernel": jax.ShapeDtypeStruct((h, c.num_labels), dt)}
    elif not c.tie_word_embeddings:
        shapes["lm_head"] = {"kernel": jax.ShapeDtypeStruct((h, c.vocab_size), dt)}
    return shapes


def init_params(config: LlamaConfig, key: jax.Array) -> dict:
    """Random parameters (normal(0, 0.02) kernels, zero biases, unit norms), as HF initializes.

    Jit this with `out_shardings` to create the parameters directly in their shards.
    """
    shapes = param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, shape), k in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            out.append(jnp.ones(shape.shape, shape.dtype))
        elif "bias" in name:
            out.append(jnp.zeros(shape.shape, shape.dtype))
        else:
            out.append((0.02 * jax.random.normal(k, shape.shape, jnp.float32)).astype(shape.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------- KV cache

def cache_length(config: LlamaConfig, max_length: int) -> int:
    """Slots per sequence: a ring buffer of `sliding_window` slots when the window is shorter."""
    if config.sliding_window is not None:
        return min(max_length, config.sliding_window)
    return max_length


def init_cache(config: LlamaConfig, batch_size: int, max_length: int) -> dict:
    """An empty KV cache for sequences of up to `max_length` tokens (prompt + generated).

    'k','v': `[num_layers, batch, slots, kv_heads, head_dim]`; 'positions', 'segment_ids':
    `[batch, slots]` of the token held in each slot (segment 0 = empty); 'index': tokens written.
    """
    slots = cache_length(config, max_length)
    kv_shape = (config.num_layers, batch_size, slots, config.num_kv_heads, config.head_dim)
    return {
        "k": jnp.zeros(kv_shape, config.compute_dtype),
        "v": jnp.zeros(kv_shape, config.compute_dtype),
        "positions": jnp.zeros((batch_size, slots), jnp.int32),
        "segment_ids": jnp.zeros((batch_size, slots), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def _ring_slots(index: jax.Array, num_new: int, slots: int) -> tuple[jax.Array, int]:
    """Ring-buffer slots for the last `min(num_new, slots)` of `num_new` tokens written at `index`."""
    kept = min(num_new, slots)
    return (index + (num_new - kept) + jnp.arange(kept)) % slots, kept


def _ring_write(buffer: jax.Array, new: jax.Array, slots: jax.Array, kept: int) -> jax.Array:
    """Write the last `kept` entries of `new [batch, T, ...]` into `buffer [batch, slots, ...]`."""
    return buffer.at[:, slots].set(new[:, new.shape[1] - kept:].astype(buffer.dtype))


# ----------------------------------------------------------------------------- forward

def _qkv(config: LlamaConfig, inv_freq, h, p, positions):
    """Projections of one block: q `[b, s, heads, d]`, k and v `[b, s, kv_heads, d]`, RoPE applied."""
    c = config
    batch, seq, _ = h.shape
    x = layers.rms_norm(h, p["attn_norm"]["scale"], c.rms_norm_eps)
    q = layers.linear(x, p["attn"]["q"]).reshape(batch, seq, c.num_heads, c.head_dim)
    k = layers.linear(x, p["attn"]["k"]).reshape(batch, seq, c.num_kv_heads, c.head_dim)
    v = layers.linear(x, p["attn"]["v"]).reshape(batch, seq, c.num_kv_heads, c.head_dim)
    return layers.apply_rope(q, positions, inv_freq), layers.apply_rope(k, positions, inv_freq), v


def _self_attention(config: LlamaConfig, q, k, v, positions, segment_ids):
    """Attention of the tokens over themselves (training, eval, prefill into an empty cache)."""
    return layers.attention(q, k, v, q_positions=positions, q_segment_ids=segment_ids, causal=True,
                            sliding_window=config.sliding_window, implementation=config.attention)


def _cache_attention(config: LlamaConfig, q, k, v, positions, segment_ids, keys, values, kv_positions, kv_segments,
                     cache_is_empty):
    """Attention of the new tokens over a KV cache (`keys`, `values` hold them too).

    A multi-token call into an empty cache (the prefill of `generate`) attends exactly as
    self-attention over the new tokens, so there, chosen at run time, it takes the configured
    kernel; decode steps and chunked prefill attend over the cache with the xla reference."""
    over_cache = functools.partial(
        layers.attention, q, keys, values, q_positions=positions, q_segment_ids=segment_ids,
        kv_positions=kv_positions, kv_segment_ids=kv_segments, causal=True, sliding_window=config.sliding_window,
        implementation=config.attention)
    if q.shape[1] == 1 or layers.resolve_attention(config.attention, config.head_dim) == "xla":
        return over_cache()
    return jax.lax.cond(cache_is_empty, lambda: _self_attention(config, q, k, v, positions, segment_ids), over_cache)


def _finish_block(config: LlamaConfig, h, p, attn):
    """Output projection of the attention `attn [b, s, heads, d]` and the MLP; returns the new h."""
    c = config
    batch, seq, _ = h.shape
    h = h + layers.linear(attn.reshape(batch, seq, c.num_heads * c.head_dim), p["attn"]["o"])
    h = layers.constrain(h, P(layers.BATCH_AXES, None, None))
    x = layers.rms_norm(h, p["mlp_norm"]["scale"], c.rms_norm_eps)
    gated = jax.nn.silu(layers.linear(x, p["mlp"]["gate"])) * layers.linear(x, p["mlp"]["up"])
    h = h + layers.linear(gated, p["mlp"]["down"])
    return layers.constrain(h, P(layers.BATCH_AXES, None, None))


def _scan_layers(config: LlamaConfig, body, carry, xs):
    if config.remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[config.remat], prevent_cse=False)
    return jax.lax.scan(body, carry, xs)


def hidden_states(config: LlamaConfig, params: dict, tokens, positions=None, segment_ids=None, cache=None):
    """Final hidden states `[batch, seq, hidden]` (after the last norm) and the updated cache.

    tokens, positions, segment_ids: `[batch, seq]` int. positions default to 0..seq-1 and
    segment_ids to all ones; segment id 0 marks padding. With a `cache` (see `init_cache`), the
    tokens attend to what it holds as well and are appended to it; the caller keeps
    `index + seq` within the `max_length` the cache was made for.
    """
    c = config
    batch, seq = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    attention_segments = segment_ids  # None lets a kernel skip segment masking altogether
    if segment_ids is None:
        segment_ids = jnp.ones((batch, seq), jnp.int32)
    inv_freq = layers.rope_inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling_dict)

    # clip: an out-of-vocab pad id (a pad token added to the tokenizer) must not turn into NaN.
    h = jnp.take(params["embed"]["embedding"], tokens, axis=0, mode="clip").astype(c.compute_dtype)
    h = layers.constrain(h, P(layers.BATCH_AXES, None, None))

    # Prompt-learning adapters (easytune.adapters), as peft runs them: `virtual_tokens [n, hidden]`
    # are prepended to the input, `prefix` {k, v} `[layers, n, kv_heads, head_dim]` to every
    # layer's keys and values. Either way the real tokens move n positions on and the row's
    # tokens attend to the n virtual ones (rows hold one example: no packing).
    num_virtual = 0
    if cache is not None and ("virtual_tokens" in params or "prefix" in params):
        raise ValueError("with a KV cache, put the adapter's virtual tokens in the cache first (prime_cache).")
    row_segment = jnp.max(segment_ids, axis=1, keepdims=True)
    if "virtual_tokens" in params:
        num_virtual = params["virtual_tokens"].shape[0]
        virtual = jnp.broadcast_to(params["virtual_tokens"].astype(h.dtype), (batch, num_virtual, h.shape[-1]))
        h = jnp.concatenate([virtual, h], axis=1)
    elif "prefix" in params:
        num_virtual = params["prefix"]["k"].shape[1]
    if num_virtual:
        virtual_positions = jnp.broadcast_to(jnp.arange(num_virtual, dtype=positions.dtype), (batch, num_virtual))
        virtual_segments = jnp.broadcast_to(row_segment, (batch, num_virtual)).astype(segment_ids.dtype)
        positions = positions + num_virtual
        if "virtual_tokens" in params:
            positions = jnp.concatenate([virtual_positions, positions], axis=1)
            segment_ids = jnp.concatenate([virtual_segments, segment_ids], axis=1)
            if attention_segments is not None:
                attention_segments = segment_ids

    if cache is None and "prefix" in params:
        kv_positions = jnp.concatenate([virtual_positions, positions], axis=1)
        kv_segments = jnp.concatenate([virtual_segments, segment_ids], axis=1)

        def body(h, xs):
            p, prefix_k, prefix_v = xs
            q, k, v = _qkv(c, inv_freq, h, p, positions)
            expand = lambda x: jnp.broadcast_to(x.astype(k.dtype), (batch, *x.shape))  # noqa: E731
            keys = jnp.concatenate([expand(prefix_k), k], axis=1)
            values = jnp.concatenate([expand(prefix_v), v], axis=1)
            # keys beyond the tokens themselves: the reference attention serves it (as for a KV cache)
            attn = layers.attention(q, keys, values, q_positions=positions, q_segment_ids=segment_ids,
                                    kv_positions=kv_positions, kv_segment_ids=kv_segments, causal=True,
                                    sliding_window=c.sliding_window, implementation=c.attention)
            return _finish_block(c, h, p, attn), None

        h, _ = _scan_layers(c, body, h, (params["layers"], params["prefix"]["k"], params["prefix"]["v"]))
        new_cache = None
    elif cache is None:
        def body(h, p):
            q, k, v = _qkv(c, inv_freq, h, p, positions)
            return _finish_block(c, h, p, _self_attention(c, q, k, v, positions, attention_segments)), None

        h, _ = _scan_layers(c, body, h, params["layers"])
        new_cache = None
        if "virtual_tokens" in params:
            h = h[:, num_virtual:]
    else:
        h, new_cache = _decode_with_cache(c, inv_freq, params, h, positions, segment_ids, cache)
    h = layers.rms_norm(h, params["final_norm"]["scale"], c.rms_norm_eps)
    return h, new_cache


def _decode_with_cache(c: LlamaConfig, inv_freq, params, h, positions, segment_ids, cache):
    seq = h.shape[1]
    num_slots = cache["positions"].shape[1]
    cache_is_empty = cache["index"] == 0
    ring = c.sliding_window is not None and num_slots >= c.sliding_window
    if seq == 1 or not ring:
        # The hot path (every decode step): write the new tokens into the cache in place, then
        # attend over the cache. Safe because no slot a query still needs gets overwritten: one
        # token replaces the one just outside the window, and a cache that is not a ring never
        # wraps.
        start = cache["index"] % num_slots
        kv_positions = jax.lax.dynamic_update_slice(cache["positions"], positions, (0, start))
        kv_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, start))

        def body(carry, xs):
            h, cache_k, cache_v = carry
            p, layer = xs
            q, k, v = _qkv(c, inv_freq, h, p, positions)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), (layer, 0, start, 0, 0))
            cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), (layer, 0, start, 0, 0))
            keys = jax.lax.dynamic_index_in_dim(cache_k, layer, keepdims=False).astype(q.dtype)
            values = jax.lax.dynamic_index_in_dim(cache_v, layer, keepdims=False).astype(q.dtype)
            attn = _cache_attention(c, q, k, v, positions, segment_ids, keys, values, kv_positions, kv_segments,
                                    cache_is_empty)
            return (_finish_block(c, h, p, attn), cache_k, cache_v), None

        layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)
        (h, cache_k, cache_v), _ = _scan_layers(c, body, (h, cache["k"], cache["v"]), (params["layers"], layer_ids))
    else:
        # Several tokens into a sliding-window ring (chunked prefill): writing first could evict
        # keys that earlier tokens of the chunk still need, so attend over cache + new, then write.
        slots, kept = _ring_slots(cache["index"], seq, num_slots)
        kv_positions = jnp.concatenate([cache["positions"], positions], axis=1)
        kv_segments = jnp.concatenate([cache["segment_ids"], segment_ids], axis=1)

        def body(h, xs):
            p, layer_k, layer_v = xs
            q, k, v = _qkv(c, inv_freq, h, p, positions)
            keys = jnp.concatenate([layer_k.astype(k.dtype), k], axis=1)
            values = jnp.concatenate([layer_v.astype(v.dtype), v], axis=1)
            attn = _cache_attention(c, q, k, v, positions, segment_ids, keys, values, kv_positions, kv_segments,
                                    cache_is_empty)
            h = _finish_block(c, h, p, attn)
            return h, (_ring_write(layer_k, k, slots, kept), _ring_write(layer_v, v, slots, kept))

        h, (cache_k, cache_v) = _scan_layers(c, body, h, (params["layers"], cache["k"], cache["v"]))
        kv_positions = _ring_write(cache["positions"], positions, slots, kept)
        kv_segments = _ring_write(cache["segment_ids"], segment_ids, slots, kept)
    new_cache = {"k": cache_k, "v": cache_v, "positions": kv_positions, "segment_ids": kv_segments,
                 "index": cache["index"] + seq}
    return h, new_cache


def num_virtual_tokens(params: dict) -> int:
    """Virtual tokens a prompt-learning adapter puts before every row (0 without one)."""
    if "virtual_tokens" in params:
        return params["virtual_tokens"].shape[0]
    if "prefix" in params:
        return params["prefix"]["k"].shape[1]
    return 0


def prime_cache(config: LlamaConfig, params: dict, cache: dict) -> tuple[dict, dict]:
    """Put a prompt-learning adapter's virtual tokens into an empty `cache` (positions 0..n-1,
    visible to every row); returns the cache and the params without the adapter's entries, to
    decode on with positions moved n on."""
    c = config
    n = num_virtual_tokens(params)
    rest = {k: v for k, v in params.items() if k not in ("virtual_tokens", "prefix")}
    if n == 0:
        return cache, rest
    batch = cache["positions"].shape[0]
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
    segment_ids = jnp.ones((batch, n), jnp.int32)
    if "prefix" in params:
        def put(buffer, values):  # [layers, batch, slots, ...] <- [layers, n, ...] for every row
            values = jnp.broadcast_to(values[:, None].astype(buffer.dtype), (values.shape[0], batch, *values.shape[1:]))
            return jax.lax.dynamic_update_slice_in_dim(buffer, values, 0, axis=2)
        cache = {**cache, "k": put(cache["k"], params["prefix"]["k"]), "v": put(cache["v"], params["prefix"]["v"]),
                 "positions": jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions, 0, axis=1),
                 "segment_ids": jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, 0, axis=1),
                 "index": cache["index"] + n}
        return cache, rest
    inv_freq = layers.rope_inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling_dict)
    h = jnp.broadcast_to(params["virtual_tokens"].astype(c.compute_dtype), (batch, n, c.hidden_size))
    _, cache = _decode_with_cache(c, inv_freq, params, h, positions, segment_ids, cache)
    return cache, rest


def logits_from_hidden(config: LlamaConfig, params: dict, hidden) -> jax.Array:
    """`[batch, seq, vocab]` float32 logits from final hidden states (for a model with
    `num_labels`: per-token scores `[batch, seq, num_labels]`)."""
    if config.num_labels:
        kernel = params["score"]["kernel"].astype(config.compute_dtype)
        return jnp.einsum("bsh,hl->bsl", hidden, kernel, preferred_element_type=jnp.float32)
    kernel = lm_head_kernel(config, params)
    if kernel is None:  # an adapted or quantized head: the one linear
        return layers.linear(hidden, params["lm_head"]).astype(jnp.float32)
    return jnp.einsum("bsh,hv->bsv", hidden, kernel, preferred_element_type=jnp.float32)


def lm_head_kernel(config: LlamaConfig, params: dict):
    """The LM head as a plain `[hidden, vocab]` matrix in the compute dtype (tied: the embedding's
    transpose), or None for a head the one linear must run (adapted, quantized)."""
    if config.tie_word_embeddings:
        kernel = params["embed"]["embedding"].T
    elif set(params["lm_head"]) == {"kernel"}:
        kernel = params["lm_head"]["kernel"]
    else:
        return None
    return kernel.astype(config.compute_dtype)


def fused_head_inputs(config: LlamaConfig, params: dict, tokens, positions=None, segment_ids=None):
    """`(hidden [batch, seq, hidden], head kernel [hidden, vocab])` for `fused_head.target_logprobs`
    when `config.head_chunk_size > 0` and the head is a plain matrix (tied or not); None otherwise
    (fused head off, a score head, an adapted or quantized head), where losses use `forward`."""
    kernel = None if not config.head_chunk_size or config.num_labels else lm_head_kernel(config, params)
    if kernel is None:
        return None
    hidden, _ = hidden_states(config, params, tokens, positions, segment_ids)
    return hidden, kernel


def forward(config: LlamaConfig, params: dict, tokens, positions=None, segment_ids=None):
    """Logits `[batch, seq, vocab]` (float32) for `tokens [batch, seq]` (a `num_labels` model:
    per-token scores `[batch, seq, num_labels]`, which a reward model reads at the last token)."""
    hidden, _ = hidden_states(config, params, tokens, positions, segment_ids)
    return logits_from_hidden(config, params, hidden)


Config = LlamaConfig
