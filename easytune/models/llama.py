"""LLaMA 1/2/3 and Mistral: the decoder (`models/decoder.py`) as a plain pre-norm SwiGLU
transformer, and their Hugging Face config and weight maps."""
from __future__ import annotations

from typing import Any

from easytune.models import decoder, decoder_hf
from easytune.models.decoder import DecoderConfig
from easytune.models.registry import Family, set_torch_dtype

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# models with a score head (num_labels > 0), e.g. reward models
CLASSIFIER_ARCHITECTURES = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification"}


def config_from_hf(hf: dict, directory: str | None = None, **compute: Any) -> DecoderConfig:
    """DecoderConfig from a LLaMA or Mistral `config.json` dict; `compute` sets the compute options."""
    model_type = hf.get("model_type")
    fields = decoder_hf.common_fields(hf)
    decoder_hf.check_activation(hf, ("hidden_act",), {"silu": "silu"}, model_type)
    sliding_window = hf.get("sliding_window") if model_type == "mistral" else None
    if hf.get("use_sliding_window") is False:
        sliding_window = None
    return decoder_hf.make_config({**fields, "sliding_window": sliding_window}, compute)


def config_to_hf(config: DecoderConfig, base: dict | None = None, torch_dtype: str | None = None) -> dict:
    """An HF `config.json` dict for `config`. Fields of `base` (the imported config) are kept, so
    an import/export round trip returns the same config; architecture fields are set from ours."""
    c = config
    hf = dict(base or {})
    fields = {**decoder_hf.hf_fields(c, ARCHITECTURES, CLASSIFIER_ARCHITECTURES), "hidden_act": "silu",
              "mlp_bias": c.mlp_bias}
    if c.model_type == "mistral":
        fields["sliding_window"] = c.sliding_window
    if decoder_hf.rope_from_hf(hf) != (c.rope_theta, c.rope_scaling_dict):  # else keep the rope keys as written
        hf.pop("rope_parameters", None)
        fields["rope_theta"] = c.rope_theta
        fields["rope_scaling"] = c.rope_scaling_dict
    # Values transformers assumes when a key is absent: leave them absent, so a round trip
    # returns the imported config.json unchanged.
    implied = {"head_dim": c.hidden_size // c.num_heads, "attention_bias": False, "mlp_bias": False,
               "rope_scaling": None, "tie_word_embeddings": False}
    for key, value in fields.items():
        if key in hf or key not in implied or implied[key] != value:
            hf[key] = value
    return set_torch_dtype(decoder_hf.set_labels(hf, c), torch_dtype)


FAMILY = Family(model_types=("llama", "mistral"), module=decoder, config_from_hf=config_from_hf,
                config_to_hf=config_to_hf, weight_map=decoder_hf.weight_map)
