"""Model families, looked up by Hugging Face `model_type`."""
from __future__ import annotations

from easytune.models import llama, t5

# model_type -> module providing: Config (frozen dataclass), param_shapes, init_params,
# SHARDING_RULES, forward (logits) and init_cache. Decoder-only families (llama) also provide
# hidden_states + logits_from_hidden; encoder-decoders (t5, IS_ENCODER_DECODER = True) provide
# encode, cross_attention_kv and decode, and their forward takes decoder_input_ids.
FAMILIES = {
    "llama": llama,
    "mistral": llama,
    "t5": t5,
}


def is_encoder_decoder(model_type: str) -> bool:
    return getattr(family(model_type), "IS_ENCODER_DECODER", False)


def family(model_type: str):
    """The module implementing `model_type`, or a clear error naming the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"unknown model_type {model_type!r}; easytune supports {sorted(FAMILIES)}."
        ) from None


def fused_head_inputs(config, params, tokens, positions=None, segment_ids=None):
    """`(hidden, head kernel)` for the fused, chunked head (`fused_head.target_logprobs`) when the
    config asks for it and the family and head allow it; None: compute logits with `forward`."""
    fused = getattr(family(config.model_type), "fused_head_inputs", None)
    return None if fused is None else fused(config, params, tokens, positions, segment_ids)
