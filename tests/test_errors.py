"""Bad input gets one clear message that names the problem."""
import json
import os

import pytest

import easytune
from easytune.safetensors_io import SafetensorsCheckpoint, write_safetensors
from conftest import make_hf_model


@pytest.fixture
def tiny_dir(tmp_path):
    make_hf_model("llama2", tmp_path / "m")
    return tmp_path / "m"


def assert_one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 400, message


@pytest.mark.parametrize("mesh_dim,message", [
    ("1,3,1", "needs 3 devices but 8 are available"),
    ("-1,-1,1", "more than one -1"),
])
def test_bad_mesh(tiny_dir, mesh_dim, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        easytune.load(str(tiny_dir), tokenizer=False, mesh_dim=mesh_dim)
    assert_one_line(excinfo)


def test_unknown_model_type(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unknown model_type 'gpt2'; easytune supports \['gemma2', 'gemma3_text', 'llama', 'mistral', "
                                         r"'qwen2', 'qwen3', 't5'\]") as excinfo:
        easytune.load(str(tiny_dir), tokenizer=False)
    assert_one_line(excinfo)


def test_checkpoint_missing_a_weight(tiny_dir):
    checkpoint = SafetensorsCheckpoint(str(tiny_dir))
    kept = [(name, checkpoint.shape(name), checkpoint[name].dtype, lambda name=name: checkpoint[name].copy())
            for name in checkpoint.keys() if name != "model.layers.1.mlp.up_proj.weight"]
    out = tiny_dir.parent / "broken"
    out.mkdir()
    write_safetensors(str(out), kept)
    (out / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="missing weight 'model.layers.1.mlp.up_proj.weight'") as excinfo:
        easytune.load(str(out), tokenizer=False)
    assert_one_line(excinfo)


def test_weight_with_wrong_shape(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    config["intermediate_size"] = 100
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(96, 64\) but the config implies \(100, 64\)"):
        easytune.load(str(tiny_dir), tokenizer=False)


@pytest.mark.parametrize("kwargs", [{"dtype": "bfloat61"}, {"param_dtype": "fp23"}])
def test_misspelled_dtype(tiny_dir, kwargs):
    with pytest.raises(ValueError, match="unknown dtype .*; use one of float32") as excinfo:
        easytune.load(str(tiny_dir), tokenizer=False, **kwargs)
    assert_one_line(excinfo)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        easytune.load(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        easytune.load(str(tmp_path / "empty"))


def test_weights_not_in_safetensors(tiny_dir):
    os.remove(tiny_dir / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        easytune.load(str(tiny_dir), tokenizer=False)


def test_unsupported_rope_scaling(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "su", "rope_theta": 10000.0, "factor": 2.0}
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope scaling type 'su' is not supported"):
        easytune.load(str(tiny_dir), tokenizer=False)


def test_config_missing_a_field(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    del config["intermediate_size"]
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json lacks 'intermediate_size'") as excinfo:
        easytune.load(str(tiny_dir), tokenizer=False)
    assert_one_line(excinfo)
