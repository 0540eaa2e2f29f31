"""Qwen2 / Qwen2.5 and Qwen3: the decoder (`models/decoder.py`) with bias on q, k and v but not o
(Qwen2) or RMSNorm on q and k per head (Qwen3), sliding-window layers from `max_window_layers` on
as transformers reads them, and their Hugging Face config and weight maps."""
from __future__ import annotations

from typing import Any

from easytune.models import decoder, decoder_hf
from easytune.models.decoder import FULL, SLIDING, DecoderConfig
from easytune.models.registry import Family

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
CLASSIFIER_ARCHITECTURES = {"qwen2": "Qwen2ForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification"}


def config_from_hf(hf: dict, directory: str | None = None, **compute: Any) -> DecoderConfig:
    """DecoderConfig from a Qwen2/Qwen2.5 or Qwen3 `config.json` dict (transformers' defaults for
    absent fields: untied embeddings, Qwen3's head_dim 128, no sliding window)."""
    model_type = hf.get("model_type")
    qwen3 = model_type == "qwen3"
    fields = decoder_hf.common_fields(hf, head_dim_default=128 if qwen3 else None)
    decoder_hf.check_activation(hf, ("hidden_act",), {"silu": "silu"}, model_type)
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
    first_sliding = hf.get("max_window_layers", 28)
    types, window = decoder_hf.layer_kinds_of(hf, fields["num_layers"], window,
                                              lambda i: SLIDING if i >= first_sliding else FULL)
    fields.update(sliding_window=window, layer_types=types, qk_norm=qwen3)
    if not qwen3:  # Qwen2: q, k, v always carry a bias, o never (no attention_bias field)
        fields.update(attention_bias=False, qkv_bias=True)
    return decoder_hf.make_config(fields, compute)


def config_to_hf(config: DecoderConfig, base: dict | None = None, torch_dtype: str | None = None) -> dict:
    """An HF `config.json` dict for `config`: `base` (the imported config) unchanged when it
    describes this architecture, else base with every architecture field written out."""
    c = config

    def write(hf):
        fields = decoder_hf.hf_fields(c, ARCHITECTURES, CLASSIFIER_ARCHITECTURES)
        if c.model_type == "qwen2":
            del fields["attention_bias"]
        for key in ("rope_theta", "rope_scaling", "max_window_layers"):
            hf.pop(key, None)
        hf.update(fields, hidden_act="silu", rope_parameters=decoder_hf.rope_to_hf(c.rope_theta, c.rope_scaling_dict),
                  use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
                  layer_types=list(c.layer_kinds))

    return decoder_hf.export_config(c, base, torch_dtype, config_from_hf, write)


FAMILY = Family(model_types=("qwen2", "qwen3"), module=decoder, config_from_hf=config_from_hf,
                config_to_hf=config_to_hf, weight_map=decoder_hf.weight_map)
