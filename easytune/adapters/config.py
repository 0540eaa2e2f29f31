"""What an adapter is: its method, its frozen `AdapterConfig` (validated on creation) and the
`Adapter` that pairs a config with its trainable parameters."""
from __future__ import annotations

import dataclasses
import math

LORA_METHODS = ("lora", "qlora", "dora")
PROMPT_METHODS = ("prompt", "ptuning", "prefix")
METHODS = LORA_METHODS + PROMPT_METHODS
ALL_LINEAR = "all-linear"


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    method: str                                  # one of METHODS
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    use_rslora: bool = False                     # scale alpha / sqrt(rank) instead of alpha / rank
    num_virtual_tokens: int = 20
    encoder_type: str = "mlp"                    # ptuning: mlp | lstm; prefix: mlp (projection) | none
    encoder_hidden_size: int = 0                 # 0: the token dim, as peft
    prompt_init: str = "sample_vocab"            # prompt tuning: sample_vocab | random | text
    modules: tuple[str, ...] = ()                # resolved LoRA targets, e.g. 'layers/attn/q'

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown --peft method {self.method!r}; use one of {', '.join(METHODS)} "
                             f"(or none for full fine-tuning).")
        if self.is_lora:
            if self.rank <= 0:
                raise ValueError(f"LoRA rank must be a positive integer, got {self.rank}; set --lora.rank.")
            if not 0.0 <= self.dropout < 1.0:
                raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}; set --lora.dropout.")
        else:
            if self.num_virtual_tokens <= 0:
                raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens}; "
                                 f"set --prompt.num_virtual_tokens.")
            encoders = {"ptuning": ("mlp", "lstm"), "prefix": ("mlp", "none"), "prompt": ("mlp", "none")}
            if self.method != "prompt" and self.encoder_type not in encoders[self.method]:
                raise ValueError(f"--prompt.encoder_type={self.encoder_type!r} is not available for {self.method}; "
                                 f"use one of {encoders[self.method]}.")

    @property
    def is_lora(self) -> bool:
        return self.method in LORA_METHODS

    @property
    def use_dora(self) -> bool:
        return self.method == "dora"

    @property
    def quantize_base(self) -> bool:
        return self.method == "qlora"

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        d = dict(d)
        for key in ("target_modules", "modules"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclasses.dataclass
class Adapter:
    """An adapter attached to a model: its config and its (trainable) parameters."""
    config: AdapterConfig
    params: dict
