"""Model families, looked up by Hugging Face `model_type`."""
from __future__ import annotations

from easytune.models import llama

# model_type -> module providing: Config (frozen dataclass), param_shapes, init_params,
# SHARDING_RULES, forward (logits), hidden_states + logits_from_hidden, and init_cache.
FAMILIES = {
    "llama": llama,
    "mistral": llama,
}


def family(model_type: str):
    """The module implementing `model_type`, or a clear error naming the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"unknown model_type {model_type!r}; easytune supports {sorted(FAMILIES)}."
        ) from None
