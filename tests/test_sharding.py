"""--mesh_dim parsing, sharded parameters, and sharded forward == unsharded forward."""
import numpy as np
import pytest

import jax
from jax.sharding import PartitionSpec as P

import easytune
from easytune import sharding
from easytune.models import decoder


@pytest.mark.parametrize("text,expected", [
    ("1,-1,1", (1, 8, 1)), ("2,2,2", (2, 2, 2)), ("-1,1,2", (4, 1, 2)),
    ("dp:2,fsdp:-1,mp:1", (2, 4, 1)), ("mp:2,fsdp:-1", (1, 4, 2)), ("fsdp:8", (1, 8, 1)),
])
def test_parse_mesh_dim(text, expected):
    assert sharding.parse_mesh_dim(text, 8) == expected


@pytest.mark.parametrize("text,message", [
    ("1,3,1", "needs 3 devices but 8 are available"),
    ("1,-1,3", "does not fit 8 devices"),
    ("-1,-1,1", "more than one -1"),
    ("1,8", "must give 3 sizes"),
    ("dp:2,tp:4", "'tp' is not a mesh axis"),
    ("1,x,1", "not a list of integers"),
])
def test_bad_mesh_dim_is_one_clear_error(text, message):
    with pytest.raises(ValueError, match=message):
        sharding.parse_mesh_dim(text, 8)


def test_rules_shard_stacked_params_and_skip_indivisible_dims():
    mesh = sharding.make_mesh("1,2,4")
    assert sharding.spec_for("layers/attn/q/kernel", (2, 64, 64), decoder.SHARDING_RULES, mesh) == P(None, "fsdp", "mp")
    # a dim the mesh axis does not divide (6 outputs over mp=4) stays unsharded on that axis
    assert sharding.spec_for("layers/attn/k/kernel", (2, 64, 6), decoder.SHARDING_RULES, mesh) == P(None, "fsdp", None)
    # optimizer moments end in the parameter path and inherit its rule
    assert sharding.spec_for("opt_state/0/mu/layers/mlp/down/kernel", (2, 96, 64), decoder.SHARDING_RULES, mesh) == P(None, "mp", "fsdp")
    assert sharding.spec_for("final_norm/scale", (64,), decoder.SHARDING_RULES, mesh) == P(None)


def test_params_are_loaded_into_their_shards(hf_models):
    """With fsdp=8 every device holds 1/8 of each sharded weight, never the full tensor."""
    directory, _ = hf_models["llama2"]
    model = easytune.load(directory, tokenizer=False, mesh_dim="1,8,1")
    q = model.params["layers"]["attn"]["q"]["kernel"]  # [layers, hidden, heads*head_dim]
    assert len(q.addressable_shards) == 8
    assert {s.data.shape for s in q.addressable_shards} == {(2, 64 // 8, 64)}
    embedding = model.params["embed"]["embedding"]
    assert {s.data.shape for s in embedding.addressable_shards} == {(128, 64 // 8)}


@pytest.mark.parametrize("mesh_dim", ["1,8,1", "2,2,2", "1,2,4", "8,1,1"])
@pytest.mark.parametrize("name", ["llama3_gqa_rope_scaling", "mistral_sliding_window"])
def test_sharded_forward_equals_unsharded(hf_models, name, mesh_dim):
    directory, _ = hf_models[name]
    tokens = np.random.RandomState(5).randint(0, 128, (8, 16))
    single = easytune.load(directory, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")
    sharded = easytune.load(directory, tokenizer=False, mesh_dim=mesh_dim)
    expected = np.asarray(single(tokens))
    logits = sharded(tokens)
    assert len(logits.sharding.device_set) == 8
    diff = np.abs(np.asarray(logits) - expected).max()
    print(f"{name} mesh {mesh_dim}: max |diff| = {diff:.2e}")
    assert diff <= 1e-5


def test_random_init_is_created_in_its_shards():
    """init_params jitted with out_shardings: each device makes only its shard, and the result is
    a usable model (HF-style init: unit norms, std 0.02 kernels)."""
    config = decoder.DecoderConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=16)
    mesh = sharding.make_mesh("1,8,1")
    shardings = sharding.tree_shardings(decoder.param_shapes(config), decoder.SHARDING_RULES, mesh)
    params = jax.jit(decoder.init_params, static_argnums=0, out_shardings=shardings)(config, jax.random.key(0))
    up = params["layers"]["mlp"]["up"]["kernel"]
    assert {s.data.shape for s in up.addressable_shards} == {(2, 64 // 8, 96)}
    assert abs(float(np.std(np.asarray(up))) - 0.02) < 0.002
    assert np.all(np.asarray(params["final_norm"]["scale"]) == 1.0)
    with jax.set_mesh(mesh):
        logits = jax.jit(decoder.forward, static_argnums=0)(config, params, np.zeros((8, 4), np.int32))
    assert logits.shape == (8, 4, 128) and np.isfinite(np.asarray(logits)).all()
