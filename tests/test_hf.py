"""Hugging Face <-> easytune: exact round trips, sharded checkpoints, easytune checkpoints, CLIs."""
import json
import os

import numpy as np
import pytest
import torch

import jax

import easytune
from easytune import export_hf, import_hf
from conftest import TINY_CONFIGS, make_hf_model


def assert_same_state_dict(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def read_config(directory):
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_round_trip_is_exact(hf_models, name, tmp_path):
    from transformers import AutoModelForCausalLM
    directory, torch_model = hf_models[name]
    easytune.load(directory, tokenizer=False).save_pretrained(str(tmp_path))
    assert read_config(tmp_path) == read_config(directory)
    assert_same_state_dict(torch_model, AutoModelForCausalLM.from_pretrained(str(tmp_path)))


def test_transformers_v4_config_layout(tmp_path):
    """Checkpoints written by transformers 4 keep `rope_theta`/`rope_scaling` at the top level."""
    from transformers import AutoModelForCausalLM
    src = tmp_path / "src"
    torch_model = make_hf_model("llama3_gqa_rope_scaling", src)
    config = read_config(src)
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype")
    with open(src / "config.json", "w") as f:
        json.dump(config, f)
    model = easytune.load(str(src), tokenizer=False)
    assert model.config.rope_theta == 500000.0 and dict(model.config.rope_scaling)["rope_type"] == "llama3"
    tokens = np.random.RandomState(0).randint(0, 128, (1, 16))
    with torch.no_grad():
        np.testing.assert_allclose(model(tokens), torch_model(torch.tensor(tokens)).logits.numpy(), atol=1e-4)
    model.save_pretrained(str(tmp_path / "out"))
    assert read_config(tmp_path / "out") == config
    assert_same_state_dict(torch_model, AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")))


def test_transformers_v4_linear_rope_type_key_round_trips(tmp_path):
    """Old configs spell the scaling kind `type`; export must not rewrite it."""
    make_hf_model("llama_linear_rope_bias", tmp_path / "src")
    config = read_config(tmp_path / "src")
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope["rope_theta"], rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    model = easytune.load(str(tmp_path / "src"), tokenizer=False)
    assert dict(model.config.rope_scaling) == {"rope_type": "linear", "factor": 2.0}
    model.save_pretrained(str(tmp_path / "out"))
    assert read_config(tmp_path / "out") == config


def test_export_over_an_earlier_export_leaves_no_stale_weights(hf_models, tmp_path):
    from transformers import AutoModelForCausalLM
    directory, torch_model = hf_models["llama2"]
    model = easytune.load(directory, tokenizer=False)
    model.save_pretrained(str(tmp_path))                       # one file
    model.save_pretrained(str(tmp_path), max_shard_size=40_000)  # now sharded
    assert not os.path.exists(tmp_path / "model.safetensors")
    assert_same_state_dict(torch_model, AutoModelForCausalLM.from_pretrained(str(tmp_path)))


def test_bf16_checkpoint_round_trip_and_sharded_files(tmp_path):
    """A bf16 checkpoint split over several safetensors files (with an index) loads as bf16 and
    exports to several files again, bit-equal."""
    from transformers import AutoModelForCausalLM
    torch_model = make_hf_model("llama2", tmp_path / "fp32").to(torch.bfloat16)
    torch_model.save_pretrained(str(tmp_path / "src"), max_shard_size="40KB")
    assert os.path.exists(tmp_path / "src" / "model.safetensors.index.json")
    model = easytune.load(str(tmp_path / "src"), tokenizer=False, mesh_dim="1,2,4")
    assert model.config.param_dtype == "bfloat16"
    model.save_pretrained(str(tmp_path / "out"), max_shard_size=40_000)
    files = [f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")]
    assert len(files) > 1 and os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.bfloat16)
    assert_same_state_dict(torch_model, reloaded)


def test_export_in_another_dtype(hf_models, tmp_path):
    from transformers import AutoModelForCausalLM
    directory, torch_model = hf_models["llama_tied_mqa"]
    easytune.load(directory, tokenizer=False).save_pretrained(str(tmp_path), dtype="bf16")
    assert read_config(tmp_path)["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    for key, value in torch_model.state_dict().items():
        assert torch.equal(value.to(torch.bfloat16), reloaded.state_dict()[key]), key


def test_import_export_clis_through_an_easytune_checkpoint(hf_models, tmp_path):
    """HF -> easytune checkpoint (orbax) -> HF with the CLIs; the checkpoint also restores into a
    different mesh than the one it was saved from."""
    from transformers import AutoModelForCausalLM
    directory, torch_model = hf_models["mistral_sliding_window"]
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    import_hf.main(["--model", directory, "--output_dir", ckpt, "--mesh_dim", "1,8,1"])
    assert os.path.exists(os.path.join(ckpt, "easytune.json"))
    restored = easytune.load(ckpt, tokenizer=False, mesh_dim="2,1,4")
    assert restored.config.param_dtype == "float32"
    assert restored.config.sliding_window == 5
    tokens = np.random.RandomState(0).randint(0, 128, (2, 12))
    with torch.no_grad():
        np.testing.assert_allclose(restored(tokens), torch_model(torch.tensor(tokens)).logits.numpy(), atol=1e-4)
    export_hf.main(["--checkpoint", ckpt, "--output_dir", out])
    assert read_config(out) == read_config(directory)
    assert_same_state_dict(torch_model, AutoModelForCausalLM.from_pretrained(out))


def test_easytune_checkpoint_keeps_its_dtype(hf_models, tmp_path):
    directory, torch_model = hf_models["llama2"]
    import_hf.main(["--model", directory, "--output_dir", str(tmp_path / "ckpt"), "--param_dtype", "bf16"])
    restored = easytune.load(str(tmp_path / "ckpt"), tokenizer=False)
    assert restored.config.param_dtype == "bfloat16"
    assert restored.params["layers"]["mlp"]["up"]["kernel"].dtype == jax.numpy.bfloat16
