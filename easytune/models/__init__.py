"""Model families, looked up by Hugging Face `model_type`.

Each family file in this package registers itself with `FAMILY = registry.Family(...)` (see
`registry.py` for the protocol); they are found by scanning the package, so a new family is a new
file here and nothing else.
"""
from __future__ import annotations

import importlib
import pkgutil

from easytune.models.registry import Family

_REGISTERED: dict[str, Family] = {}


def _families() -> dict[str, Family]:
    """model_type -> Family, collected from this package's modules on first use."""
    if not _REGISTERED:
        for info in pkgutil.iter_modules(__path__):
            module = importlib.import_module(f"{__name__}.{info.name}")
            registered = getattr(module, "FAMILY", None)
            if isinstance(registered, Family):
                for model_type in registered.model_types:
                    if model_type in _REGISTERED:
                        raise RuntimeError(f"model_type {model_type!r} is registered twice ({info.name}).")
                    _REGISTERED[model_type] = registered
    return _REGISTERED


def supported_model_types() -> list[str]:
    return sorted(_families())


def registration(model_type: str) -> Family:
    """The registered family of `model_type`, or a clear error naming the supported ones."""
    try:
        return _families()[model_type]
    except KeyError:
        hint = (" (a multimodal Gemma 3 checkpoint: easytune trains Gemma 3's text models, model_type "
                "'gemma3_text')" if model_type == "gemma3" else "")
        raise ValueError(f"unknown model_type {model_type!r}{hint}; easytune supports "
                         f"{supported_model_types()}.") from None


def family(model_type: str):
    """The module implementing `model_type` (`decoder` or `t5`), or a clear error."""
    return registration(model_type).module


def is_encoder_decoder(model_type: str) -> bool:
    return getattr(family(model_type), "IS_ENCODER_DECODER", False)


def flops_per_token(config, seq_length: int) -> float | None:
    """Training FLOPs per token of `config` at this context length, where the family counts them."""
    count = getattr(family(config.model_type), "flops_per_token", None)
    return None if count is None else count(config, seq_length)


def fused_head_inputs(config, params, tokens, positions=None, segment_ids=None):
    """`(hidden, head kernel)` for the fused, chunked head (`fused_head.target_logprobs`) when the
    config asks for it and the family and head allow it; None: compute logits with `forward`."""
    fused = getattr(family(config.model_type), "fused_head_inputs", None)
    return None if fused is None else fused(config, params, tokens, positions, segment_ids)
