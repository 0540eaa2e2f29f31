"""T5 v1.0 and v1.1 / FLAN-T5 encoder-decoders in pure JAX.

v1.0: ReLU feed-forward, lm_head tied to the shared embedding, decoder output rescaled by
`d_model ** -0.5` before it. v1.1 / FLAN-T5: gated-GELU (`gelu_new`) feed-forward, untied lm_head,
no rescale. Both follow the HF config fields (`feed_forward_proj`, `tie_word_embeddings`, ...).

Parameters are a nested dict; each stack's per-layer weights are stacked on a leading axis and run
under `jax.lax.scan` (optionally rematerialized; unrolled on CPU without a cache, `layer_loop`):

    {'embed': {'embedding': [vocab, d_model]},                       # HF `shared`
     'encoder': {'relative_attention_bias': {'embedding': [buckets, heads]},
                 'layers': {'attn_norm': {'scale'}, 'attn': {'q','k','v','o': {'kernel'}},
                            'mlp_norm': {'scale'}, 'mlp': {'gate','up','down' | 'up','down': {'kernel'}}},
                 'final_norm': {'scale': [d_model]}},
     'decoder': {... as the encoder, plus per layer 'cross_attn_norm', 'cross_attn'},
     'lm_head': {'kernel': [d_model, vocab]}}                       # absent when tied

Kernels are `[in, out]`; every dense projection goes through `layers.linear`. The gated
feed-forward's `wi_0` (activated) is 'gate', `wi_1` is 'up', `wo` is 'down'; ungated `wi` is 'up'.

Attention is local to this module (`t5_attention`): T5 adds a learned relative position bias to
the scores and does not scale them by 1/sqrt(head_dim), which the shared `layers.attention`
dispatch does not express. Masks come from `layers.attention_mask` (segment ids, 0 = padding), so
packed examples stay independent in self- and cross-attention.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from easytune.dtypes import parse_dtype
from easytune.models import common, layers
from easytune.models.common import compute_options
from easytune.models.registry import Family, WeightEntry, missing_fields, set_torch_dtype
from easytune.safetensors_io import SafetensorsCheckpoint

IS_ENCODER_DECODER = True

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation_of(feed_forward_proj: str) -> str:
    """The activation HF derives from `feed_forward_proj` ('gated-gelu' means `gelu_new`)."""
    if feed_forward_proj == "gated-gelu":
        return "gelu_new"
    return feed_forward_proj.split("-")[-1]


@dataclasses.dataclass(frozen=True)
class T5Config(common.ComputeDtypes):
    """Architecture plus compute options. Frozen and hashable: it is a static jit argument."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int                 # encoder layers
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # 'relu', 'gated-gelu', 'gated-silu', ...
    dense_act_fn: str | None = None  # None: derived from feed_forward_proj, as HF does
    tie_word_embeddings: bool = True     # lm_head is the shared embedding (no 'lm_head' parameter)
    scale_decoder_outputs: bool = True   # multiply the decoder output by d_model**-0.5 (v1.0)
    decoder_start_token_id: int = 0
    model_type: str = "t5"
    # Compute options: not part of the checkpoint.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"
    head_chunk_size: int = 0
    layer_loop: str = "auto"        # loop of the passes without a cache: scan, unroll or auto (common.scan_layers)

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not valid; use '<act>' or "
                             f"'gated-<act>', e.g. 'relu' or 'gated-gelu'.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"T5 activation {self.activation!r} is not supported; use one of {sorted(ACTIVATIONS)}.")
        common.check_remat(self.remat)
        common.check_layer_loop(self.layer_loop)
        if self.attention != "xla":
            raise ValueError(f"attention {self.attention!r} is not available for T5: its attention adds a relative "
                             f"position bias and has its own implementation; use attention='xla'.")
        if self.head_chunk_size:
            raise ValueError(f"head_chunk_size={self.head_chunk_size}: the fused LM head is for decoder-only LMs; T5's "
                             f"seq2seq loss reads full logits, use head_chunk_size=0.")
        if self.relative_attention_num_buckets < 4:
            raise ValueError(f"relative_attention_num_buckets must be >= 4, got {self.relative_attention_num_buckets}.")
        parse_dtype(self.dtype)
        parse_dtype(self.param_dtype)

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        return self.dense_act_fn or activation_of(self.feed_forward_proj)

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


# Regexes searched in the '/'-joined parameter path; the first match wins (see decoder.SHARDING_RULES).
SHARDING_RULES = (
    (r"relative_attention_bias/embedding$", P()),
    (r"embed/embedding$", P("mp", "fsdp")),
    (r"attn/(q|k|v)/kernel$", P("fsdp", "mp")),   # self- and cross-attention
    (r"attn/o/kernel$", P("mp", "fsdp")),
    (r"mlp/(gate|up)/kernel$", P("fsdp", "mp")),
    (r"mlp/down/kernel$", P("mp", "fsdp")),
    (r"lm_head/kernel$", P("fsdp", "mp")),
    (r".*", P()),
)


def param_shapes(config: T5Config) -> dict:
    """Pytree of `jax.ShapeDtypeStruct` describing the parameters."""
    c, dt = config, config.weight_dtype
    d = c.d_model

    def dense(n, fan_in, fan_out):
        return {"kernel": jax.ShapeDtypeStruct((n, fan_in, fan_out), dt)}

    def norm(n):
        return {"scale": jax.ShapeDtypeStruct((n, d), dt)}

    def attn(n):
        return {"q": dense(n, d, c.inner_dim), "k": dense(n, d, c.inner_dim), "v": dense(n, d, c.inner_dim),
                "o": dense(n, c.inner_dim, d)}

    def mlp(n):
        out = {"up": dense(n, d, c.d_ff), "down": dense(n, c.d_ff, d)}
        if c.is_gated:
            out["gate"] = dense(n, d, c.d_ff)
        return out

    def stack(n, cross: bool):
        block = {"attn_norm": norm(n), "attn": attn(n)}
        if cross:
            block.update(cross_attn_norm=norm(n), cross_attn=attn(n))
        block.update(mlp_norm=norm(n), mlp=mlp(n))
        return {
            "relative_attention_bias": {
                "embedding": jax.ShapeDtypeStruct((c.relative_attention_num_buckets, c.num_heads), dt)},
            "layers": block,
            "final_norm": {"scale": jax.ShapeDtypeStruct((d,), dt)},
        }

    shapes = {
        "embed": {"embedding": jax.ShapeDtypeStruct((c.vocab_size, d), dt)},
        "encoder": stack(c.num_layers, cross=False),
        "decoder": stack(c.num_decoder_layers, cross=True),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head"] = {"kernel": jax.ShapeDtypeStruct((d, c.vocab_size), dt)}
    return shapes


def _init_std(config: T5Config, name: str) -> float:
    """Standard deviation HF's `T5PreTrainedModel._init_weights` uses (initializer_factor 1)."""
    c = config
    if "relative_attention_bias" in name:
        return c.d_model ** -0.5
    if "embed" in name or "lm_head" in name:
        return 1.0
    if "attn']['q'" in name:
        return (c.d_model * c.d_kv) ** -0.5
    if "attn']['o'" in name:
        return c.inner_dim ** -0.5
    if "mlp']['down'" in name:
        return c.d_ff ** -0.5
    return c.d_model ** -0.5  # k, v, wi


def init_params(config: T5Config, key: jax.Array) -> dict:
    """Random parameters with HF's T5 initialization (unit norms). Jit with `out_shardings` to
    create them directly in their shards."""
    def init(name, key, shape, dtype):
        if "scale" in name:
            return jnp.ones(shape, dtype)
        return common.normal(_init_std(config, name), key, shape, dtype)

    return common.init_from_shapes(param_shapes(config), key, init)


# ----------------------------------------------------------------------------- relative positions

@functools.lru_cache(maxsize=None)
def _bucket_table(num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of each distance 0..max_distance (beyond it: the last bucket), for one direction.

    Computed on the host, as transformers computes it (float32 arithmetic, correctly rounded log):
    distances whose log-scaled value lands exactly on a bucket edge (16, 32, 64 for T5's
    bidirectional 32 buckets / 128) would otherwise fall either way with a device log.
    """
    max_exact = num_buckets // 2
    n = np.arange(max_distance + 1)
    with np.errstate(divide="ignore"):
        log_ratio = np.log((n.astype(np.float32) / np.float32(max_exact)).astype(np.float64)).astype(np.float32)
    scaled = log_ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    large = max_exact + np.where(n < max_exact, 0, scaled).astype(np.int64)
    return np.where(n < max_exact, n, np.minimum(large, num_buckets - 1)).astype(np.int32)


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """T5's bucket (int32, in [0, num_buckets)) of `memory_position - query_position`.

    Bidirectional (encoder): half the buckets for keys after the query. Causal (decoder): keys
    after the query all share bucket 0 (they are masked anyway). Small distances get a bucket
    each; larger ones share logarithmically wider buckets up to `max_distance`.
    """
    if bidirectional:
        num_buckets //= 2
        offset = jnp.where(relative_position > 0, num_buckets, 0)
        distance = jnp.abs(relative_position)
    else:
        offset = 0
        distance = -jnp.minimum(relative_position, 0)
    table = jnp.asarray(_bucket_table(num_buckets, max_distance))
    return offset + table[jnp.minimum(distance, max_distance)]


def position_bias(config: T5Config, table: jax.Array, q_positions, kv_positions, bidirectional: bool) -> jax.Array:
    """Additive score bias `[batch, heads, q_len, kv_len]` (float32) from the bias `table [buckets, heads]`."""
    relative = kv_positions[:, None, :] - q_positions[:, :, None]
    buckets = relative_position_bucket(relative, bidirectional, config.relative_attention_num_buckets,
                                       config.relative_attention_max_distance)
    bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [b, q, kv, heads]
    return jnp.transpose(bias, (0, 3, 1, 2))


# ----------------------------------------------------------------------------- attention

def t5_attention(q, k, v, mask, bias=None) -> jax.Array:
    """q `[b, s, h, d]`, k/v `[b, t, h, d]`, mask `[b, s, t]`, bias `[b or 1, h, s, t]` -> `[b, s, h, d]`.

    Scores are `q . k + bias` with no 1/sqrt(head_dim) scaling (T5 folds it into the weights);
    softmax in float32.
    """
    scores = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(mask[:, None, :, :], scores, layers.MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhst,bthd->bshd", probs, v)


def _heads(config: T5Config, x):
    return x.reshape(*x.shape[:2], config.num_heads, config.d_kv)


def _project_kv(config: T5Config, x, p):
    return _heads(config, layers.linear(x, p["k"])), _heads(config, layers.linear(x, p["v"]))


def _attend_and_project(config: T5Config, h, p, q, keys, values, mask, bias):
    """Residual `h + o(attention)`."""
    out = t5_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask, bias)
    h = h + layers.linear(out.reshape(*out.shape[:2], config.inner_dim), p["o"])
    return layers.constrain(h, P(layers.BATCH_AXES, None, None))


def _feed_forward(config: T5Config, h, p):
    x = layers.rms_norm(h, p["mlp_norm"]["scale"], config.layer_norm_epsilon)
    act = ACTIVATIONS[config.activation]
    if config.is_gated:
        x = act(layers.linear(x, p["mlp"]["gate"])) * layers.linear(x, p["mlp"]["up"])
    else:
        x = act(layers.linear(x, p["mlp"]["up"]))
    h = h + layers.linear(x, p["mlp"]["down"])
    return layers.constrain(h, P(layers.BATCH_AXES, None, None))


def _embed(config: T5Config, params, tokens):
    # clip: an out-of-vocab pad id must not turn into NaN.
    h = jnp.take(params["embed"]["embedding"], tokens, axis=0, mode="clip").astype(config.compute_dtype)
    return layers.constrain(h, P(layers.BATCH_AXES, None, None))


def _defaults(tokens, positions, segment_ids):
    batch, seq = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    if segment_ids is None:
        segment_ids = jnp.ones((batch, seq), jnp.int32)
    return positions, segment_ids


# ----------------------------------------------------------------------------- encoder

def encode(config: T5Config, params: dict, input_ids, segment_ids=None, positions=None) -> jax.Array:
    """Encoder output `[batch, seq, d_model]` (after its final norm) for `input_ids [batch, seq]`.

    segment_ids: 0 marks padding (an HF attention mask is valid segment ids); several ids per row
    pack several examples, which then never attend to each other. positions default to 0..seq-1;
    only differences within a segment matter (the bias is relative).
    """
    c = config
    positions, segment_ids = _defaults(input_ids, positions, segment_ids)
    stack = params["encoder"]
    bias = position_bias(c, stack["relative_attention_bias"]["embedding"], positions, positions, bidirectional=True)
    mask = layers.attention_mask(positions, segment_ids, positions, segment_ids, causal=False)

    def body(h, p):
        x = layers.rms_norm(h, p["attn_norm"]["scale"], c.layer_norm_epsilon)
        q = _heads(c, layers.linear(x, p["attn"]["q"]))
        k, v = _project_kv(c, x, p["attn"])
        h = _attend_and_project(c, h, p["attn"], q, k, v, mask, bias)
        return _feed_forward(c, h, p), None

    h, _ = common.scan_layers(c.remat, body, _embed(c, params, input_ids), stack["layers"], c.layer_loop)
    return layers.rms_norm(h, stack["final_norm"]["scale"], c.layer_norm_epsilon)


def cross_attention_kv(config: T5Config, params: dict, encoder_hidden) -> dict:
    """Every decoder layer's cross-attention keys and values of the encoder output, computed once
    for generation: 'k', 'v' `[num_decoder_layers, batch, enc_seq, heads, d_kv]`."""
    def body(_, p):
        k, v = _project_kv(config, encoder_hidden, p["cross_attn"])
        return None, (k, v)

    _, (k, v) = jax.lax.scan(body, None, params["decoder"]["layers"])
    return {"k": k, "v": v}


# ----------------------------------------------------------------------------- decoder

def init_cache(config: T5Config, batch_size: int, max_length: int) -> dict:
    """An empty decoder self-attention cache for up to `max_length` decoder tokens.

    'k','v': `[num_decoder_layers, batch, max_length, heads, d_kv]`; 'positions', 'segment_ids':
    `[batch, max_length]` of the token in each slot (segment 0 = empty); 'index': tokens written.
    """
    shape = (config.num_decoder_layers, batch_size, max_length, config.num_heads, config.d_kv)
    return {
        "k": jnp.zeros(shape, config.compute_dtype),
        "v": jnp.zeros(shape, config.compute_dtype),
        "positions": jnp.zeros((batch_size, max_length), jnp.int32),
        "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def decoder_hidden_states(config: T5Config, params: dict, decoder_input_ids, encoder_segment_ids, *,
                          encoder_hidden=None, cross_kv=None, segment_ids=None, positions=None, cache=None):
    """Decoder output `[batch, seq, d_model]` (after its final norm) and the updated cache.

    Cross-attention reads `encoder_hidden [batch, enc_seq, d_model]`, or `cross_kv` (from
    `cross_attention_kv`) when given; a decoder token attends to encoder tokens of its own segment
    (`encoder_segment_ids [batch, enc_seq]`, 0 = padding). With a `cache` (see `init_cache`), the
    tokens also attend to the cached ones and are appended at `cache['index']`; the caller keeps
    `index + seq` within the cache's length.
    """
    c = config
    if (encoder_hidden is None) == (cross_kv is None):
        raise ValueError("pass exactly one of encoder_hidden and cross_kv.")
    positions, segment_ids = _defaults(decoder_input_ids, positions, segment_ids)
    stack = params["decoder"]
    table = stack["relative_attention_bias"]["embedding"]
    enc_segments = encoder_segment_ids
    cross_mask = layers.attention_mask(positions, segment_ids, jnp.zeros_like(enc_segments), enc_segments, causal=False)
    h = _embed(c, params, decoder_input_ids)

    if cache is None:
        kv_positions, kv_segments = positions, segment_ids
    else:
        start = cache["index"]
        kv_positions = jax.lax.dynamic_update_slice(cache["positions"], positions, (0, start))
        kv_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, start))
    self_mask = layers.attention_mask(positions, segment_ids, kv_positions, kv_segments, causal=True)
    self_bias = position_bias(c, table, positions, kv_positions, bidirectional=False)

    def block(h, p, self_kv, cross_k, cross_v):
        x = layers.rms_norm(h, p["attn_norm"]["scale"], c.layer_norm_epsilon)
        q = _heads(c, layers.linear(x, p["attn"]["q"]))
        k, v = _project_kv(c, x, p["attn"])
        keys, values, new_kv = self_kv(k, v)
        h = _attend_and_project(c, h, p["attn"], q, keys, values, self_mask, self_bias)
        x = layers.rms_norm(h, p["cross_attn_norm"]["scale"], c.layer_norm_epsilon)
        q = _heads(c, layers.linear(x, p["cross_attn"]["q"]))
        if cross_k is None:
            cross_k, cross_v = _project_kv(c, encoder_hidden, p["cross_attn"])
        h = _attend_and_project(c, h, p["cross_attn"], q, cross_k, cross_v, cross_mask, None)
        return _feed_forward(c, h, p), new_kv

    layer_ids = jnp.arange(c.num_decoder_layers, dtype=jnp.int32)
    cross = (cross_kv["k"], cross_kv["v"]) if cross_kv is not None else (None, None)

    if cache is None:
        def body(h, xs):
            p, cross_k, cross_v = xs
            h, _ = block(h, p, lambda k, v: (k, v, None), cross_k, cross_v)
            return h, None

        h, _ = common.scan_layers(c.remat, body, h, (stack["layers"], *cross), c.layer_loop)
        new_cache = None
    else:
        # Write the new keys/values into the cache in place, then attend over all its slots.
        def body(carry, xs):
            h, cache_k, cache_v = carry
            p, layer, cross_k, cross_v = xs

            def self_kv(k, v):
                ck = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), (layer, 0, start, 0, 0))
                cv = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), (layer, 0, start, 0, 0))
                keys = jax.lax.dynamic_index_in_dim(ck, layer, keepdims=False)
                values = jax.lax.dynamic_index_in_dim(cv, layer, keepdims=False)
                return keys, values, (ck, cv)

            h, (cache_k, cache_v) = block(h, p, self_kv, cross_k, cross_v)
            return (h, cache_k, cache_v), None

        (h, cache_k, cache_v), _ = common.scan_layers(
            c.remat, body, (h, cache["k"], cache["v"]), (stack["layers"], layer_ids, *cross))
        new_cache = {"k": cache_k, "v": cache_v, "positions": kv_positions, "segment_ids": kv_segments,
                     "index": cache["index"] + decoder_input_ids.shape[1]}
    h = layers.rms_norm(h, stack["final_norm"]["scale"], c.layer_norm_epsilon)
    return h, new_cache


def logits_from_hidden(config: T5Config, params: dict, hidden) -> jax.Array:
    """`[batch, seq, vocab]` float32 logits from decoder outputs (rescaled first in v1.0)."""
    if config.scale_decoder_outputs:
        hidden = hidden * (config.d_model ** -0.5)
    if config.tie_word_embeddings:
        return layers.logits_matmul(hidden, params["embed"]["embedding"], w_rows_out=True)
    return layers.logits_matmul(hidden, params["lm_head"]["kernel"])


def decode(config: T5Config, params: dict, decoder_input_ids, encoder_segment_ids, **kwargs):
    """Logits `[batch, seq, vocab]` (float32) and the updated cache; arguments as
    `decoder_hidden_states`."""
    hidden, cache = decoder_hidden_states(config, params, decoder_input_ids, encoder_segment_ids, **kwargs)
    return logits_from_hidden(config, params, hidden), cache


def forward(config: T5Config, params: dict, input_ids, decoder_input_ids, segment_ids=None,
            decoder_segment_ids=None, positions=None, decoder_positions=None) -> jax.Array:
    """Logits `[batch, dec_seq, vocab]` (float32) for `input_ids [batch, enc_seq]` and
    `decoder_input_ids [batch, dec_seq]` (teacher forcing: the targets shifted right, starting
    with `decoder_start_token_id`). Segment ids: 0 = padding; matching ids pair a packed decoder
    segment with its encoder segment."""
    _, segment_ids = _defaults(input_ids, None, segment_ids)
    encoder_hidden = encode(config, params, input_ids, segment_ids, positions)
    logits, _ = decode(config, params, decoder_input_ids, segment_ids, encoder_hidden=encoder_hidden,
                       segment_ids=decoder_segment_ids, positions=decoder_positions)
    return logits


def shift_right(target_ids, decoder_start_token_id: int, segment_ids=None):
    """Decoder inputs for teacher forcing: each segment's targets shifted right by one, its first
    input `decoder_start_token_id`. `target_ids, segment_ids [batch, seq]`."""
    shifted = jnp.concatenate([jnp.full_like(target_ids[:, :1], decoder_start_token_id), target_ids[:, :-1]], axis=1)
    if segment_ids is None:
        return shifted
    previous = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1]), segment_ids[:, :-1]], axis=1)
    return jnp.where(segment_ids != previous, decoder_start_token_id, shifted)


Config = T5Config


# ----------------------------------------------------------------------------- Hugging Face maps

ARCHITECTURE = "T5ForConditionalGeneration"
REQUIRED_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")


def config_from_hf(hf: dict, directory: str | None = None, **compute: Any) -> T5Config:
    """T5Config from an HF `config.json` dict, read as transformers reads it.

    The lm_head is untied when the config says `tie_word_embeddings: false` or when the checkpoint
    in `directory` holds an `lm_head.weight` (transformers 5 writes `tie_word_embeddings: true`
    for every T5 and unties by content). The v1.0 rescale follows `scale_decoder_outputs`, or
    else `tie_word_embeddings` (absent = true).
    """
    missing_fields(hf, REQUIRED_FIELDS, "t5")
    if hf.get("is_encoder_decoder") is False or hf.get("is_decoder") is True:
        raise ValueError("this T5 config is not an encoder-decoder (an encoder-only or decoder-only T5); "
                         "easytune supports T5ForConditionalGeneration.")
    tie = hf.get("tie_word_embeddings", True) is not False
    if tie and directory is not None and "lm_head.weight" in SafetensorsCheckpoint(directory):
        tie = False
    scale = hf.get("scale_decoder_outputs")
    if scale is None:
        scale = hf.get("tie_word_embeddings", True) is not False
    start = hf.get("decoder_start_token_id")
    return T5Config(
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        d_kv=hf["d_kv"],
        d_ff=hf["d_ff"],
        num_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        num_heads=hf["num_heads"],
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=hf.get("feed_forward_proj", "relu"),
        dense_act_fn=hf.get("dense_act_fn"),
        tie_word_embeddings=tie,
        scale_decoder_outputs=bool(scale),
        decoder_start_token_id=int(start if start is not None else hf.get("pad_token_id") or 0),
        **compute_options(compute),
    )


def config_to_hf(config: T5Config, base: dict | None = None, torch_dtype: str | None = None) -> dict:
    """An HF `config.json` dict for `config`, keeping the fields of `base` (the imported config) so
    that a round trip returns it unchanged."""
    c = config
    hf = dict(base or {})
    fields = {
        "architectures": [ARCHITECTURE],
        "model_type": "t5",
        "is_encoder_decoder": True,
        "vocab_size": c.vocab_size,
        "d_model": c.d_model,
        "d_kv": c.d_kv,
        "d_ff": c.d_ff,
        "num_layers": c.num_layers,
        "num_decoder_layers": c.num_decoder_layers,
        "num_heads": c.num_heads,
        "relative_attention_num_buckets": c.relative_attention_num_buckets,
        "relative_attention_max_distance": c.relative_attention_max_distance,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "feed_forward_proj": c.feed_forward_proj,
        "decoder_start_token_id": c.decoder_start_token_id,
    }
    if c.dense_act_fn is not None:
        fields["dense_act_fn"] = c.dense_act_fn
    # Values transformers assumes when a key is absent: leave them absent.
    implied = {"num_decoder_layers": c.num_layers, "relative_attention_num_buckets": 32,
               "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "relu",
               "decoder_start_token_id": hf.get("pad_token_id", 0), "is_encoder_decoder": True}
    for key, value in fields.items():
        if key in hf or key not in implied or implied[key] != value:
            hf[key] = value
    # An exported lm_head.weight unties by itself (see config_from_hf); only a new config needs the flag.
    if "tie_word_embeddings" not in hf and not c.tie_word_embeddings:
        hf["tie_word_embeddings"] = False
    if "scale_decoder_outputs" in hf or c.scale_decoder_outputs != (hf.get("tie_word_embeddings", True) is not False):
        hf["scale_decoder_outputs"] = c.scale_decoder_outputs
    return set_torch_dtype(hf, torch_dtype)


def weight_map(config: T5Config) -> list[WeightEntry]:
    """Every parameter of a T5 config with the HF tensor it comes from. The relative attention
    bias lives in block 0 of each stack (later blocks reuse it)."""
    entries = [WeightEntry(("embed", "embedding"), "shared.weight", False, False)]
    for stack in ("encoder", "decoder"):
        prefix = f"{stack}.block.{{layer}}.layer."
        entries.append(WeightEntry((stack, "relative_attention_bias", "embedding"),
                                   f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False, False))
        sublayers = [("attn", "0", "SelfAttention")]
        if stack == "decoder":
            sublayers.append(("cross_attn", "1", "EncDecAttention"))
        for ours, index, theirs in sublayers:
            entries.append(WeightEntry((stack, "layers", f"{ours}_norm", "scale"), prefix + f"{index}.layer_norm.weight",
                                       True, False))
            for proj in ("q", "k", "v", "o"):
                entries.append(WeightEntry((stack, "layers", ours, proj, "kernel"),
                                           prefix + f"{index}.{theirs}.{proj}.weight", True, True))
        ff = "2" if stack == "decoder" else "1"
        entries.append(WeightEntry((stack, "layers", "mlp_norm", "scale"), prefix + f"{ff}.layer_norm.weight", True, False))
        mlp = (("gate", "wi_0"), ("up", "wi_1"), ("down", "wo")) if config.is_gated else (("up", "wi"), ("down", "wo"))
        for ours, theirs in mlp:
            entries.append(WeightEntry((stack, "layers", "mlp", ours, "kernel"),
                                       prefix + f"{ff}.DenseReluDense.{theirs}.weight", True, True))
        entries.append(WeightEntry((stack, "final_norm", "scale"), f"{stack}.final_layer_norm.weight", False, False))
    if not config.tie_word_embeddings:
        entries.append(WeightEntry(("lm_head", "kernel"), "lm_head.weight", False, True))
    return entries


FAMILY = Family(model_types=("t5",), module=sys.modules[__name__], config_from_hf=config_from_hf,
                config_to_hf=config_to_hf, weight_map=weight_map)
