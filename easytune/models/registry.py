"""The family protocol: what a model family registers so the rest of easytune can use it.

A family file (e.g. `models/qwen.py`) defines `FAMILY = Family(...)` next to its Hugging Face
config and weight maps; `easytune.models` finds it by scanning its own package, so adding a
family touches no central table. The implementation module (`decoder` for the decoder-only
families, `t5`) provides: `Config` (a frozen dataclass), `param_shapes`, `init_params`,
`SHARDING_RULES`, `forward`, `init_cache`, `flops_per_token`; decoder-only modules also
`hidden_states`, `logits_from_hidden` and `fused_head_kernel`, encoder-decoders (`IS_ENCODER_DECODER = True`) `encode`,
`cross_attention_kv` and `decode`.
"""
from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class WeightEntry:
    path: tuple[str, ...]   # our parameter path
    hf_name: str            # HF tensor name; '{layer}' filled in for stacked parameters
    stacked: bool           # has a leading [num_layers] axis
    transpose: bool         # HF stores [out, in]; we store [in, out]


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: the HF `model_type`s it reads, its implementation and its HF maps."""

    model_types: tuple[str, ...]
    module: ModuleType                       # the implementation (see the module docstring)
    config_from_hf: Callable[..., Any]       # (hf dict, directory=None, **compute) -> Config
    config_to_hf: Callable[..., dict]        # (config, base=None, torch_dtype=None) -> hf dict
    weight_map: Callable[[Any], list[WeightEntry]]


def set_torch_dtype(hf: dict, torch_dtype: str | None) -> dict:
    """Write the checkpoint dtype where transformers reads it (5: "dtype", 4: "torch_dtype")."""
    if torch_dtype is not None:
        for key in [k for k in ("dtype", "torch_dtype") if k in hf] or ["torch_dtype"]:
            hf[key] = torch_dtype
    return hf


def missing_fields(hf: dict, required: tuple[str, ...], model_type: str) -> None:
    """One-sentence error for a config.json without a field the family cannot default."""
    missing = [key for key in required if key not in hf]
    if missing:
        raise ValueError(f"config.json lacks {missing[0]!r}" + (f" (and {missing[1:]})" if missing[1:] else "")
                         + f"; a {model_type} config needs {list(required)}.")
