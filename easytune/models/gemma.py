"""Gemma 2 and Gemma 3 (text): the decoder (`models/decoder.py`) with Gemma's `(1 + w)` RMSNorm,
embeddings scaled by sqrt(hidden_size), GeGLU (tanh GELU), norms before and after attention and
MLP, `query_pre_attn_scalar`, alternating sliding-window and global layers, attention-logit and
final-logit soft-capping (Gemma 2), q/k norms and a RoPE base of its own for the local layers
(Gemma 3); and their Hugging Face config and weight maps.

Gemma 3's multimodal checkpoints (`model_type: gemma3`, Gemma3ForConditionalGeneration) are not
read: easytune trains the text models (`gemma3_text`, Gemma3ForCausalLM, e.g. gemma-3-1b).
"""
from __future__ import annotations

from typing import Any

from easytune.models import decoder, decoder_hf
from easytune.models.decoder import FULL, SLIDING, DecoderConfig
from easytune.models.registry import Family

ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
CLASSIFIER_ARCHITECTURES = {"gemma2": "Gemma2ForSequenceClassification",
                            "gemma3_text": "Gemma3TextForSequenceClassification"}
LEGACY_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_local_base_freq", "sliding_window_pattern")


def _ropes(hf: dict, gemma3: bool) -> dict[str, Any]:
    """RoPE fields: Gemma 2 has one; Gemma 3 one per layer kind (`rope_parameters` keyed by layer
    type, or the older `rope_theta` (default 1e6) + `rope_local_base_freq` (default 1e4))."""
    if not gemma3:
        theta, scaling = decoder_hf.rope_from_hf(hf)
        return {"rope_theta": theta, "rope_scaling": None if scaling is None else tuple(sorted(scaling.items()))}
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get(SLIDING), dict):
        (theta, scaling), (local, local_scaling) = (decoder_hf.rope_from_hf(hf, FULL, 1e6),
                                                    decoder_hf.rope_from_hf(hf, SLIDING))
    else:
        theta, scaling = decoder_hf.rope_from_hf(hf, default_theta=1e6)
        local, local_scaling = float(hf.get("rope_local_base_freq", 10000.0)), None
    as_tuple = lambda d: None if d is None else tuple(sorted(d.items()))  # noqa: E731
    return {"rope_theta": theta, "rope_scaling": as_tuple(scaling), "local_rope_theta": local,
            "local_rope_scaling": as_tuple(local_scaling)}


def config_from_hf(hf: dict, directory: str | None = None, **compute: Any) -> DecoderConfig:
    """DecoderConfig from a Gemma 2 or Gemma 3 text `config.json` dict (transformers' defaults for
    absent fields: head_dim 256, tied embeddings, window 4096, Gemma 2's caps 50 and 30)."""
    model_type = hf.get("model_type")
    gemma3 = model_type == "gemma3_text"
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"use_bidirectional_attention is not supported for {model_type}: easytune's decoder is "
                         f"causal.")
    fields = decoder_hf.common_fields(hf, head_dim_default=256, tie_default=True)
    act = decoder_hf.check_activation(hf, ("hidden_activation",), {"gelu_pytorch_tanh": "gelu_tanh"}, model_type)
    window = hf.get("sliding_window", 4096)
    period = 2 if not gemma3 else hf.get("sliding_window_pattern", 6)
    types, window = decoder_hf.layer_kinds_of(hf, fields["num_layers"], window,
                                              lambda i: SLIDING if (i + 1) % period else FULL)
    fields.update(_ropes(hf, gemma3))
    fields.update(
        sliding_window=window, layer_types=types, qk_norm=gemma3, norm_style="gemma", embed_scale=True,
        hidden_act=act, sandwich_norms=True,
        attn_logit_softcap=hf.get("attn_logit_softcapping", None if gemma3 else 50.0),
        final_logit_softcap=hf.get("final_logit_softcapping", None if gemma3 else 30.0),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
    )
    return decoder_hf.make_config(fields, compute)


def config_to_hf(config: DecoderConfig, base: dict | None = None, torch_dtype: str | None = None) -> dict:
    """An HF `config.json` dict for `config`: `base` (the imported config) unchanged when it
    describes this architecture, else base with every architecture field written out."""
    c = config

    def write(hf):
        for key in LEGACY_ROPE_KEYS:
            hf.pop(key, None)
        if c.model_type == "gemma3_text":
            theta, scaling = c.rope_of(SLIDING)
            rope = {FULL: decoder_hf.rope_to_hf(c.rope_theta, c.rope_scaling_dict),
                    SLIDING: decoder_hf.rope_to_hf(theta, scaling)}
        else:
            rope = decoder_hf.rope_to_hf(c.rope_theta, c.rope_scaling_dict)
        hf.update(decoder_hf.hf_fields(c, ARCHITECTURES, CLASSIFIER_ARCHITECTURES),
                  hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=c.query_pre_attn_scalar,
                  sliding_window=c.sliding_window, layer_types=list(c.layer_kinds), rope_parameters=rope,
                  attn_logit_softcapping=c.attn_logit_softcap, final_logit_softcapping=c.final_logit_softcap)

    return decoder_hf.export_config(c, base, torch_dtype, config_from_hf, write)


FAMILY = Family(model_types=("gemma2", "gemma3_text"), module=decoder, config_from_hf=config_from_hf,
                config_to_hf=config_to_hf, weight_map=decoder_hf.weight_map)
