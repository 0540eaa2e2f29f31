"""The decoder-only transformer in pure JAX: LLaMA 1/2/3, Mistral, Qwen2/2.5/3, Gemma 2/3.

One implementation; the families differ by config fields, each set by its family file
(`llama.py`, `qwen.py`, `gemma.py`, which map Hugging Face configs and weights onto it):
q/k/v (and o) biases, RMSNorm on q and k per head, Gemma's `(1 + w)` RMSNorm and scaled
embeddings, GeGLU, norms after attention and MLP as well as before, attention-logit and
final-logit soft-capping, the attention scale, and per-layer attention kinds (full or sliding
window, each with its own RoPE).

Parameters are a nested dict; per-layer weights are stacked on a leading `[num_layers]` axis and
the decoder runs under `jax.lax.scan` (optionally rematerialized), so compile time is flat in depth
(`layer_loop="auto"` unrolls the cacheless forward on CPU, where that trains faster: `common.scan_layers`).
Layers of different kinds share the scan: the layer's kind is scanned with it and picks its
attention branch (`lax.switch`), so each kind keeps a static window the fused kernels can use.

    {'embed': {'embedding': [vocab, hidden]},
     'layers': {'attn_norm': {'scale'},
                'attn': {'q','k','v','o': {'kernel'[, 'bias']}[, 'q_norm','k_norm': {'scale': [head_dim]}]},
                ['post_attn_norm': {'scale'},]  'mlp_norm': {'scale'},
                'mlp': {'gate','up','down': {'kernel'[, 'bias']}}[, 'post_mlp_norm': {'scale'}]},
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

from easytune.models import common, layers
from easytune.dtypes import parse_dtype

FULL, SLIDING = "full_attention", "sliding_attention"   # per-layer attention kinds, as HF's layer_types
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}
NORM_STYLES = ("llama", "gemma")


@dataclasses.dataclass(frozen=True)
class DecoderConfig(common.ComputeDtypes):
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
    sliding_window: int | None = None  # the window of sliding layers; None attends to the whole prefix
    # Per layer FULL or SLIDING (HF's `layer_types`); None: every layer SLIDING when there is a
    # sliding_window (Mistral), else FULL.
    layer_types: tuple[str, ...] | None = None
    # RoPE of the sliding layers when it differs from the full layers' (Gemma 3's local base).
    local_rope_theta: float | None = None
    local_rope_scaling: tuple | None = None
    qkv_bias: bool = False           # bias on q, k, v only, not o (Qwen2)
    qk_norm: bool = False            # RMSNorm over head_dim on q and k, before RoPE (Qwen3, Gemma 3)
    norm_style: str = "llama"        # gemma: x * (1 + w), all in float32 (Gemma's RMSNorm)
    embed_scale: bool = False        # embeddings times sqrt(hidden_size) (Gemma)
    hidden_act: str = "silu"         # the MLP's gate activation: silu or gelu_tanh (Gemma's GeGLU)
    sandwich_norms: bool = False     # a norm after attention and after the MLP as well (Gemma 2/3)
    attn_logit_softcap: float | None = None   # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this) (Gemma); None: 1/sqrt(head_dim)
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
    layer_loop: str = "auto"        # the layer loop of forward passes without a cache: scan, unroll or auto

    def __post_init__(self):
        # Hashable forms of the list and dict fields (a config read back from JSON has lists and dicts).
        for name in ("rope_scaling", "local_rope_scaling"):
            value = getattr(self, name)
            if value is not None:
                items = value.items() if isinstance(value, dict) else value
                object.__setattr__(self, name, tuple(sorted((str(k), v) for k, v in items)))
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})."
            )
        common.check_remat(self.remat)
        common.check_layer_loop(self.layer_loop)
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}.")
        if self.norm_style not in NORM_STYLES:
            raise ValueError(f"norm_style must be one of {NORM_STYLES}, got {self.norm_style!r}.")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= {FULL, SLIDING}:
                raise ValueError(f"layer_types must give {FULL!r} or {SLIDING!r} for each of the {self.num_layers} "
                                 f"layers, got {list(self.layer_types)}.")
            if SLIDING in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is not set.")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window!r}.")
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value!r}.")
        parse_dtype(self.dtype)
        parse_dtype(self.param_dtype)
        layers.check_attention(self.attention, self.head_dim, self.dtype)
        if not isinstance(self.head_chunk_size, int) or self.head_chunk_size < 0:
            raise ValueError(f"head_chunk_size must be a number of tokens >= 0 (0: no fused head), "
                             f"got {self.head_chunk_size!r}.")
        if self.head_chunk_size and self.final_logit_softcap is not None:
            raise ValueError("head_chunk_size (the fused LM head) does not apply final-logit soft-capping; "
                             "use head_chunk_size=0 for this model.")
        for kind in self.attention_kinds:
            layers.rope_inverse_frequencies(self.head_dim, *self.rope_of(kind))

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """Each layer's attention kind, FULL or SLIDING."""
        if self.layer_types is not None:
            return tuple(self.layer_types)
        return ((SLIDING if self.sliding_window is not None else FULL),) * self.num_layers

    @property
    def attention_kinds(self) -> tuple[str, ...]:
        """The kinds present, in a fixed order: the branches of the per-layer switch."""
        return tuple(kind for kind in (FULL, SLIDING) if kind in self.layer_kinds)

    def window_of(self, kind: str) -> int | None:
        return self.sliding_window if kind == SLIDING else None

    def rope_of(self, kind: str) -> tuple[float, dict | None]:
        """`(theta, scaling dict)` of the RoPE that layers of `kind` use."""
        if kind == SLIDING and self.local_rope_theta is not None:
            return self.local_rope_theta, None if self.local_rope_scaling is None else dict(self.local_rope_scaling)
        return self.rope_theta, self.rope_scaling_dict

    @property
    def uniform_window(self) -> int | None:
        """The window when every layer slides (then the KV cache is a ring of that many slots)."""
        return self.sliding_window if self.attention_kinds == (SLIDING,) else None

    @property
    def attention_scale(self) -> float | None:
        return None if self.query_pre_attn_scalar is None else float(self.query_pre_attn_scalar) ** -0.5


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


def param_shapes(config: DecoderConfig) -> dict:
    """Pytree of `jax.ShapeDtypeStruct` describing the parameters."""
    c, dt = config, config.weight_dtype
    n, h = c.num_layers, c.hidden_size
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def dense(fan_in, fan_out, bias):
        p = {"kernel": jax.ShapeDtypeStruct((n, fan_in, fan_out), dt)}
        if bias:
            p["bias"] = jax.ShapeDtypeStruct((n, fan_out), dt)
        return p

    def norm(size):
        return {"scale": jax.ShapeDtypeStruct((n, size), dt)}

    qkv_bias = c.attention_bias or c.qkv_bias
    attn = {"q": dense(h, q_dim, qkv_bias), "k": dense(h, kv_dim, qkv_bias), "v": dense(h, kv_dim, qkv_bias),
            "o": dense(q_dim, h, c.attention_bias)}
    if c.qk_norm:
        attn["q_norm"], attn["k_norm"] = norm(c.head_dim), norm(c.head_dim)
    block = {
        "attn_norm": norm(h),
        "attn": attn,
        "mlp_norm": norm(h),
        "mlp": {
            "gate": dense(h, c.intermediate_size, c.mlp_bias),
            "up": dense(h, c.intermediate_size, c.mlp_bias),
            "down": dense(c.intermediate_size, h, c.mlp_bias),
        },
    }
    if c.sandwich_norms:
        block["post_attn_norm"], block["post_mlp_norm"] = norm(h), norm(h)
    shapes = {
        "embed": {"embedding": jax.ShapeDtypeStruct((c.vocab_size, h), dt)},
        "layers": block,
        "final_norm": {"scale": jax.ShapeDtypeStruct((h,), dt)},
    }
    if c.num_labels:
        shapes["score"] = {"kernel": jax.ShapeDtypeStruct((h, c.num_labels), dt)}
    elif not c.tie_word_embeddings:
        shapes["lm_head"] = {"kernel": jax.ShapeDtypeStruct((h, c.vocab_size), dt)}
    return shapes


def init_params(config: DecoderConfig, key: jax.Array) -> dict:
    """Random parameters as HF initializes them: normal(0, 0.02) kernels, zero biases, norms that
    start as the identity (scale 1, or 0 for Gemma's `1 + w`).

    Jit this with `out_shardings` to create the parameters directly in their shards.
    """
    unit = 0.0 if config.norm_style == "gemma" else 1.0

    def init(name, key, shape, dtype):
        if "scale" in name:
            return jnp.full(shape, unit, dtype)
        if "bias" in name:
            return jnp.zeros(shape, dtype)
        return common.normal(0.02, key, shape, dtype)

    return common.init_from_shapes(param_shapes(config), key, init)


def flops_per_token(config: DecoderConfig, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM-style with causal attention counted as
    MaxText does: `6 * N + 6 * num_layers * (num_heads * head_dim) * seq_length`.

    N counts the weights of every matmul (attention and MLP projections, and the LM head even when
    tied to the embedding) but not the embedding lookup, norms or biases; the second term is the
    attention score and value products (12 FLOPs per query-key pair and head dim, forward and
    backward) over the half of a `seq_length` context a causal token sees on average (PaLM's
    `12 * L * d * seq` counts the whole square; sliding windows are not discounted).
    """
    c = config
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = c.hidden_size * (q_dim + 2 * kv_dim) + q_dim * c.hidden_size \
        + 3 * c.hidden_size * c.intermediate_size
    matmul_params = c.num_layers * per_layer + c.hidden_size * c.vocab_size
    return 6.0 * matmul_params + 6.0 * c.num_layers * q_dim * seq_length


# ----------------------------------------------------------------------------- KV cache

def cache_length(config: DecoderConfig, max_length: int) -> int:
    """Slots per sequence: a ring buffer of `sliding_window` slots when every layer slides and the
    window is shorter. With full layers among them, every layer keeps all tokens and sliding layers
    mask by position (one cache shape for the scan over layers)."""
    if config.uniform_window is not None:
        return min(max_length, config.uniform_window)
    return max_length


def init_cache(config: DecoderConfig, batch_size: int, max_length: int) -> dict:
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

def norm(config: DecoderConfig, x, scale):
    """The family's RMSNorm: LLaMA's (weight applied in the input dtype) or Gemma's `x * (1 + w)`."""
    if config.norm_style == "gemma":
        return layers.gemma_rms_norm(x, scale, config.rms_norm_eps)
    return layers.rms_norm(x, scale, config.rms_norm_eps)


def _rope_table(config: DecoderConfig) -> jax.Array:
    """Inverse RoPE frequencies `[kinds, head_dim // 2]`, one row per attention kind."""
    return jnp.stack([layers.rope_inverse_frequencies(config.head_dim, *config.rope_of(kind))
                      for kind in config.attention_kinds])


def _kind_ids(config: DecoderConfig) -> jax.Array:
    """Each layer's row in `attention_kinds`, `[num_layers]` int32: scanned with the layers."""
    kinds = config.attention_kinds
    return jnp.asarray([kinds.index(kind) for kind in config.layer_kinds], jnp.int32)


def _by_kind(config: DecoderConfig, kind_id, fn, *operands):
    """`fn(kind, *operands)` for the layer's attention kind: a static call when every layer is of
    one kind, else a `lax.switch` on the scanned `kind_id` (each branch with its static window)."""
    kinds = config.attention_kinds
    if len(kinds) == 1:
        return fn(kinds[0], *operands)
    return jax.lax.switch(kind_id, [functools.partial(fn, kind) for kind in kinds], *operands)


def _qkv(config: DecoderConfig, inv_freq, h, p, positions):
    """Projections of one block: q `[b, s, heads, d]`, k and v `[b, s, kv_heads, d]`, RoPE applied
    (after the per-head q/k norms, where the family has them)."""
    c = config
    batch, seq, _ = h.shape
    x = norm(c, h, p["attn_norm"]["scale"])
    q = layers.linear(x, p["attn"]["q"]).reshape(batch, seq, c.num_heads, c.head_dim)
    k = layers.linear(x, p["attn"]["k"]).reshape(batch, seq, c.num_kv_heads, c.head_dim)
    v = layers.linear(x, p["attn"]["v"]).reshape(batch, seq, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
        q, k = norm(c, q, p["attn"]["q_norm"]["scale"]), norm(c, k, p["attn"]["k_norm"]["scale"])
    return layers.apply_rope(q, positions, inv_freq), layers.apply_rope(k, positions, inv_freq), v


def _attend(config: DecoderConfig, kind: str, q, k, v, positions, segment_ids, kv_positions=None, kv_segments=None):
    """`layers.attention` with this model's causal mask, scale, soft-cap and the window of `kind`."""
    return layers.attention(q, k, v, q_positions=positions, q_segment_ids=segment_ids, kv_positions=kv_positions,
                            kv_segment_ids=kv_segments, causal=True, sliding_window=config.window_of(kind),
                            scale=config.attention_scale, logit_softcap=config.attn_logit_softcap,
                            implementation=config.attention)


def _cache_attention(config: DecoderConfig, kind: str, q, k, v, positions, segment_ids, keys, values, kv_positions,
                     kv_segments, cache_is_empty):
    """Attention of the new tokens over a KV cache (`keys`, `values` hold them too).

    A multi-token call into an empty cache (the prefill of `generate`) attends exactly as
    self-attention over the new tokens, so there, chosen at run time, it takes the configured
    kernel; decode steps and chunked prefill attend over the cache with the xla reference."""
    over_cache = functools.partial(_attend, config, kind, q, keys, values, positions, segment_ids, kv_positions,
                                   kv_segments)
    if q.shape[1] == 1 or layers.resolve_attention(config.attention, config.head_dim) == "xla":
        return over_cache()
    return jax.lax.cond(cache_is_empty, lambda: _attend(config, kind, q, k, v, positions, segment_ids), over_cache)


def _finish_block(config: DecoderConfig, h, p, attn):
    """Output projection of the attention `attn [b, s, heads, d]` and the MLP; returns the new h."""
    c = config
    batch, seq, _ = h.shape
    out = layers.linear(attn.reshape(batch, seq, c.num_heads * c.head_dim), p["attn"]["o"])
    if c.sandwich_norms:
        out = norm(c, out, p["post_attn_norm"]["scale"])
    h = layers.constrain(h + out, P(layers.BATCH_AXES, None, None))
    x = norm(c, h, p["mlp_norm"]["scale"])
    gated = ACTIVATIONS[c.hidden_act](layers.linear(x, p["mlp"]["gate"])) * layers.linear(x, p["mlp"]["up"])
    out = layers.linear(gated, p["mlp"]["down"])
    if c.sandwich_norms:
        out = norm(c, out, p["post_mlp_norm"]["scale"])
    return layers.constrain(h + out, P(layers.BATCH_AXES, None, None))


def embed(config: DecoderConfig, params: dict, tokens) -> jax.Array:
    """Token embeddings `[batch, seq, hidden]` in the compute dtype (Gemma: times sqrt(hidden),
    multiplied in the weights' dtype as transformers does)."""
    # clip: an out-of-vocab pad id (a pad token added to the tokenizer) must not turn into NaN.
    table = params["embed"]["embedding"]
    h = jnp.take(table, tokens, axis=0, mode="clip")
    if config.embed_scale:
        h = h * jnp.asarray(config.hidden_size ** 0.5, table.dtype)
    return h.astype(config.compute_dtype)


def hidden_states(config: DecoderConfig, params: dict, tokens, positions=None, segment_ids=None, cache=None):
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
    rope, kind_ids = _rope_table(c), _kind_ids(c)

    h = layers.constrain(embed(c, params, tokens), P(layers.BATCH_AXES, None, None))

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
            p, kind_id, prefix_k, prefix_v = xs
            q, k, v = _qkv(c, rope[kind_id], h, p, positions)
            expand = lambda x: jnp.broadcast_to(x.astype(k.dtype), (batch, *x.shape))  # noqa: E731
            keys = jnp.concatenate([expand(prefix_k), k], axis=1)
            values = jnp.concatenate([expand(prefix_v), v], axis=1)
            # keys beyond the tokens themselves: the reference attention serves it (as for a KV cache)
            attn = _by_kind(c, kind_id, functools.partial(_attend, c), q, keys, values, positions, segment_ids,
                            kv_positions, kv_segments)
            return _finish_block(c, h, p, attn), None

        h, _ = common.scan_layers(c.remat, body, h,
                                  (params["layers"], kind_ids, params["prefix"]["k"], params["prefix"]["v"]),
                                  c.layer_loop)
        new_cache = None
    elif cache is None:
        def body(h, xs):
            p, kind_id = xs
            q, k, v = _qkv(c, rope[kind_id], h, p, positions)
            attn = _by_kind(c, kind_id, functools.partial(_attend, c), q, k, v, positions, attention_segments)
            return _finish_block(c, h, p, attn), None

        h, _ = common.scan_layers(c.remat, body, h, (params["layers"], kind_ids), c.layer_loop)
        new_cache = None
        if "virtual_tokens" in params:
            h = h[:, num_virtual:]
    else:
        h, new_cache = _decode_with_cache(c, rope, kind_ids, params, h, positions, segment_ids, cache)
    h = norm(c, h, params["final_norm"]["scale"])
    return h, new_cache


def _decode_with_cache(c: DecoderConfig, rope, kind_ids, params, h, positions, segment_ids, cache):
    seq = h.shape[1]
    num_slots = cache["positions"].shape[1]
    cache_is_empty = cache["index"] == 0
    ring = c.uniform_window is not None and num_slots >= c.uniform_window
    attend = functools.partial(_cache_attention, c)
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
            p, layer, kind_id = xs
            q, k, v = _qkv(c, rope[kind_id], h, p, positions)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), (layer, 0, start, 0, 0))
            cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), (layer, 0, start, 0, 0))
            keys = jax.lax.dynamic_index_in_dim(cache_k, layer, keepdims=False).astype(q.dtype)
            values = jax.lax.dynamic_index_in_dim(cache_v, layer, keepdims=False).astype(q.dtype)
            attn = _by_kind(c, kind_id, attend, q, k, v, positions, segment_ids, keys, values, kv_positions,
                            kv_segments, cache_is_empty)
            return (_finish_block(c, h, p, attn), cache_k, cache_v), None

        layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)
        (h, cache_k, cache_v), _ = common.scan_layers(c.remat, body, (h, cache["k"], cache["v"]),
                                                      (params["layers"], layer_ids, kind_ids))
    else:
        # Several tokens into a sliding-window ring (chunked prefill): writing first could evict
        # keys that earlier tokens of the chunk still need, so attend over cache + new, then write.
        slots, kept = _ring_slots(cache["index"], seq, num_slots)
        kv_positions = jnp.concatenate([cache["positions"], positions], axis=1)
        kv_segments = jnp.concatenate([cache["segment_ids"], segment_ids], axis=1)

        def body(h, xs):
            p, kind_id, layer_k, layer_v = xs
            q, k, v = _qkv(c, rope[kind_id], h, p, positions)
            keys = jnp.concatenate([layer_k.astype(k.dtype), k], axis=1)
            values = jnp.concatenate([layer_v.astype(v.dtype), v], axis=1)
            attn = _by_kind(c, kind_id, attend, q, k, v, positions, segment_ids, keys, values, kv_positions,
                            kv_segments, cache_is_empty)
            h = _finish_block(c, h, p, attn)
            return h, (_ring_write(layer_k, k, slots, kept), _ring_write(layer_v, v, slots, kept))

        h, (cache_k, cache_v) = common.scan_layers(c.remat, body, h,
                                                   (params["layers"], kind_ids, cache["k"], cache["v"]))
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


def prime_cache(config: DecoderConfig, params: dict, cache: dict) -> tuple[dict, dict]:
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
    h = jnp.broadcast_to(params["virtual_tokens"].astype(c.compute_dtype), (batch, n, c.hidden_size))
    _, cache = _decode_with_cache(c, _rope_table(c), _kind_ids(c), params, h, positions, segment_ids, cache)
    return cache, rest


def logits_from_hidden(config: DecoderConfig, params: dict, hidden) -> jax.Array:
    """`[batch, seq, vocab]` float32 logits from final hidden states (for a model with
    `num_labels`: per-token scores `[batch, seq, num_labels]`)."""
    if config.num_labels:
        kernel = params["score"]["kernel"].astype(config.compute_dtype)
        return jnp.einsum("bsh,hl->bsl", hidden, kernel, preferred_element_type=jnp.float32)
    if config.tie_word_embeddings:
        logits = layers.logits_matmul(hidden, params["embed"]["embedding"], w_rows_out=True)
    elif (kernel := lm_head_kernel(config, params)) is None:  # an adapted or quantized head: the one linear
        logits = layers.linear(hidden, params["lm_head"]).astype(jnp.float32)
    else:
        logits = layers.logits_matmul(hidden, kernel)
    return layers.soft_cap(logits, config.final_logit_softcap)


def lm_head_kernel(config: DecoderConfig, params: dict):
    """The LM head as a plain `[hidden, vocab]` matrix in the compute dtype (tied: the embedding's
    transpose), or None for a head the one linear must run (adapted, quantized)."""
    if config.tie_word_embeddings:
        kernel = params["embed"]["embedding"].T
    elif set(params["lm_head"]) == {"kernel"}:
        kernel = params["lm_head"]["kernel"]
    else:
        return None
    return kernel.astype(config.compute_dtype)


def fused_head_inputs(config: DecoderConfig, params: dict, tokens, positions=None, segment_ids=None):
    """`(hidden [batch, seq, hidden], head kernel [hidden, vocab])` for `fused_head.target_logprobs`
    when `config.head_chunk_size > 0` and the head is a plain matrix (tied or not); None otherwise
    (fused head off, a score head, an adapted or quantized head), where losses use `forward`."""
    kernel = fused_head_kernel(config, params)
    if kernel is None:
        return None
    hidden, _ = hidden_states(config, params, tokens, positions, segment_ids)
    return hidden, kernel


def fused_head_kernel(config: DecoderConfig, params: dict):
    """The head kernel `[hidden, vocab]` `fused_head.target_logprobs` reads final hidden states with
    (`fused_head_inputs`), or None where losses use `logits_from_hidden`."""
    return None if not config.head_chunk_size or config.num_labels else lm_head_kernel(config, params)


def forward(config: DecoderConfig, params: dict, tokens, positions=None, segment_ids=None):
    """Logits `[batch, seq, vocab]` (float32) for `tokens [batch, seq]` (a `num_labels` model:
    per-token scores `[batch, seq, num_labels]`, which a reward model reads at the last token)."""
    hidden, _ = hidden_states(config, params, tokens, positions, segment_ids)
    return logits_from_hidden(config, params, hidden)


Config = DecoderConfig
