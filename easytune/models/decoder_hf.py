"""Hugging Face config and weight maps shared by the decoder-only families (`llama.py`, `qwen.py`,
`gemma.py`): the fields every such `config.json` has, RoPE in both transformers layouts, per-layer
attention kinds, and the one weight map (which tensors exist follows the config's features).
"""
from __future__ import annotations

from typing import Any, Callable

from easytune.models import common
from easytune.models.decoder import FULL, SLIDING, DecoderConfig
from easytune.models.registry import WeightEntry, missing_fields, set_torch_dtype

REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def rope_from_hf(hf: dict, layer_type: str | None = None, default_theta: float = 10000.0
                 ) -> tuple[float, dict | None]:
    """`(rope_theta, rope_scaling)` from either transformers layout: v4 `rope_theta` +
    `rope_scaling`, or v5 `rope_parameters` (per layer type for Gemma 3, then `layer_type` picks
    one). Plain RoPE gives `rope_scaling=None`."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    if isinstance(params, dict) and "rope_theta" in params:
        theta = params["rope_theta"]
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", default_theta)
        scaling = dict(hf.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor (RoPE on part of each head) is not supported; easytune rotates "
                         "the whole head.")
    if scaling.get("rope_type", "default") == "default":
        return float(theta), None
    return float(theta), scaling


def num_labels_of(hf: dict) -> int:
    """> 0 for a *ForSequenceClassification checkpoint (transformers' default is 2 labels)."""
    if any(str(a).endswith("ForSequenceClassification") for a in hf.get("architectures") or []):
        return int(hf.get("num_labels") or len(hf.get("id2label") or {}) or 2)
    return 0


def check_activation(hf: dict, keys: tuple[str, ...], allowed: dict[str, str], model_type: str) -> str:
    """Our activation name for the first of `keys` present in `hf` (HF name -> ours in `allowed`)."""
    for key in keys:
        if hf.get(key) is not None:
            name = hf[key]
            if name not in allowed:
                raise ValueError(f"{key} {name!r} is not supported for {model_type}; use one of {sorted(allowed)}.")
            return allowed[name]
    return next(iter(allowed.values()))


def layer_kinds_of(hf: dict, num_layers: int, sliding_window: int | None, default
                   ) -> tuple[tuple[str, ...] | None, int | None]:
    """`(layer_types, sliding_window)` as DecoderConfig takes them, read as transformers reads them:
    `layer_types` if written, else `default(i)` per layer. A window no layer uses is dropped, and a
    list where every layer slides becomes None (the window alone says so)."""
    if sliding_window is None:
        return None, None
    types = hf.get("layer_types") or [default(i) for i in range(num_layers)]
    unknown = sorted(set(types) - {FULL, SLIDING})
    if unknown:
        raise ValueError(f"layer_types holds {unknown[0]!r}; easytune implements {FULL!r} and {SLIDING!r} layers.")
    if len(types) != num_layers:
        raise ValueError(f"layer_types lists {len(types)} layers but num_hidden_layers is {num_layers}.")
    if SLIDING not in types:
        return None, None
    return (None if FULL not in types else tuple(types)), sliding_window


def common_fields(hf: dict, *, head_dim_default: int | None = None, tie_default: bool = False) -> dict[str, Any]:
    """DecoderConfig fields every decoder-only config.json has, with the family's defaults for
    the head size (None: hidden_size // heads) and for tied embeddings."""
    model_type = hf.get("model_type")
    missing_fields(hf, REQUIRED_FIELDS, model_type)
    num_heads = hf["num_attention_heads"]
    theta, scaling = rope_from_hf(hf)
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or head_dim_default or hf["hidden_size"] // num_heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=None if scaling is None else tuple(sorted(scaling.items())),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", tie_default)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        model_type=model_type,
        num_labels=num_labels_of(hf),
    )


def make_config(fields: dict, compute: dict) -> DecoderConfig:
    return DecoderConfig(**fields, **common.compute_options(compute))


def export_config(config: DecoderConfig, base: dict | None, torch_dtype: str | None,
                  config_from_hf: Callable[[dict], DecoderConfig], write: Callable[[dict], None]) -> dict:
    """An HF `config.json` dict for `config`: `base` (the imported config) unchanged when the family
    reads it as this architecture (an exact round trip), else base with `write(hf)` setting every
    architecture field; then the labels and the checkpoint dtype."""
    hf = dict(base or {})
    if not base or common.architecture(config_from_hf(base)) != common.architecture(config):
        write(hf)
    return set_torch_dtype(set_labels(hf, config), torch_dtype)


def hf_fields(config: DecoderConfig, architectures: dict[str, str], classifiers: dict[str, str]) -> dict:
    """The config.json fields every decoder-only family writes the same way."""
    c = config
    return {
        "architectures": [(classifiers if c.num_labels else architectures)[c.model_type]],
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
    }


def set_labels(hf: dict, config: DecoderConfig) -> dict:
    if config.num_labels:  # transformers derives num_labels from id2label
        hf.pop("num_labels", None)
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
    return hf


def rope_to_hf(theta: float, scaling: dict | None) -> dict:
    """transformers 5's `rope_parameters` for one RoPE."""
    return {"rope_type": "default", **(scaling or {}), "rope_theta": theta}


def weight_map(config: DecoderConfig) -> list[WeightEntry]:
    """Every parameter of `config` with the HF tensor it comes from; which tensors exist follows
    the config (biases, q/k norms, Gemma's four norms per layer, tied or score head)."""
    c = config
    prefix = "model.layers.{layer}."

    def layer(path, name, transpose=False):
        return WeightEntry(("layers", *path), prefix + name, True, transpose)

    entries = [WeightEntry(("embed", "embedding"), "model.embed_tokens.weight", False, False),
               layer(("attn_norm", "scale"), "input_layernorm.weight")]
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
        entries.append(layer(("attn", ours, "kernel"), f"self_attn.{theirs}.weight", True))
        if c.attention_bias or (c.qkv_bias and ours != "o"):
            entries.append(layer(("attn", ours, "bias"), f"self_attn.{theirs}.bias"))
    if c.qk_norm:
        entries += [layer(("attn", "q_norm", "scale"), "self_attn.q_norm.weight"),
                    layer(("attn", "k_norm", "scale"), "self_attn.k_norm.weight")]
    if c.sandwich_norms:
        entries += [layer(("post_attn_norm", "scale"), "post_attention_layernorm.weight"),
                    layer(("mlp_norm", "scale"), "pre_feedforward_layernorm.weight"),
                    layer(("post_mlp_norm", "scale"), "post_feedforward_layernorm.weight")]
    else:
        entries.append(layer(("mlp_norm", "scale"), "post_attention_layernorm.weight"))
    for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        entries.append(layer(("mlp", ours, "kernel"), f"mlp.{theirs}.weight", True))
        if c.mlp_bias:
            entries.append(layer(("mlp", ours, "bias"), f"mlp.{theirs}.bias"))
    entries.append(WeightEntry(("final_norm", "scale"), "model.norm.weight", False, False))
    if c.num_labels:  # *ForSequenceClassification: score [num_labels, hidden], no LM head
        entries.append(WeightEntry(("score", "kernel"), "score.weight", False, True))
    elif not c.tie_word_embeddings:
        entries.append(WeightEntry(("lm_head", "kernel"), "lm_head.weight", False, True))
    return entries
