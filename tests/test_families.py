"""Qwen2/2.5, Qwen3, Gemma 2 and Gemma 3 (text) against transformers, peft and TRL, beyond the
logits, round-trip and generation checks every family gets from `conftest.TINY_CONFIGS`
(test_models, test_hf, test_generate): the features are really exercised, packed and padded
batches, sharding, adapters, every trainer, and bad configs."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import easytune
from easytune import models
from easytune.models import decoder
from easytune.models.decoder import FULL, SLIDING

from conftest import logged, make_char_chat_model, make_chat_model, run_config

NEW_FAMILIES = ["qwen2", "qwen2_tied_mqa_sliding", "qwen3_qk_norm", "gemma2_softcap", "gemma3_local_global"]
SEQ = 16


def torch_logits(model, tokens, **kwargs):
    with torch.no_grad():
        return model(torch.tensor(tokens), **kwargs).logits.numpy()


def load1(directory, **kwargs):
    return easytune.load(directory, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1", **kwargs)


def logits_with(model, tokens, **changes):
    config = dataclasses.replace(model.config, **changes)
    return np.asarray(jax.jit(decoder.forward, static_argnums=0)(config, model.params, jnp.asarray(tokens)))


def test_configs_read_as_transformers_reads_them(hf_models):
    qwen2 = load1(hf_models["qwen2"][0]).config
    assert (qwen2.qkv_bias, qwen2.attention_bias, qwen2.tie_word_embeddings, qwen2.layer_kinds) == (
        True, False, False, (FULL, FULL))
    sliding = load1(hf_models["qwen2_tied_mqa_sliding"][0]).config
    assert sliding.layer_kinds == (FULL, SLIDING) and sliding.sliding_window == 5  # from max_window_layers=1 on
    assert sliding.tie_word_embeddings and sliding.num_kv_heads == 1
    qwen3 = load1(hf_models["qwen3_qk_norm"][0]).config
    assert qwen3.qk_norm and qwen3.head_dim == 32 and not qwen3.qkv_bias
    gemma2 = load1(hf_models["gemma2_softcap"][0]).config
    assert gemma2.layer_kinds == (SLIDING, FULL)  # Gemma 2 alternates, starting with a sliding layer
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap, gemma2.query_pre_attn_scalar) == (0.5, 1.5, 24)
    gemma3 = load1(hf_models["gemma3_local_global"][0]).config
    assert gemma3.layer_kinds == (SLIDING, FULL, SLIDING) and gemma3.qk_norm
    assert gemma3.rope_of(SLIDING) == (1e4, None)
    assert gemma3.rope_of(FULL) == (1e6, {"rope_type": "linear", "factor": 2.0})


@pytest.mark.parametrize("name,changes", [
    ("gemma2_softcap", dict(attn_logit_softcap=None)),
    ("gemma2_softcap", dict(final_logit_softcap=None)),
    ("gemma2_softcap", dict(query_pre_attn_scalar=None)),
    ("gemma2_softcap", dict(layer_types=None, sliding_window=None)),
    ("gemma3_local_global", dict(local_rope_theta=None)),
    ("gemma3_local_global", dict(layer_types=None, sliding_window=None)),
    ("qwen2_tied_mqa_sliding", dict(layer_types=None, sliding_window=None)),
])
def test_each_feature_changes_the_logits(hf_models, name, changes):
    """The parity tests are not vacuous: without any one of these features (soft-caps, attention
    scale, the windows on a sequence longer than them, Gemma 3's local RoPE) the logits move far
    beyond the 1e-4 the comparison with transformers allows."""
    model = load1(hf_models[name][0])
    tokens = np.random.RandomState(1).randint(0, 128, (2, SEQ))
    assert np.abs(logits_with(model, tokens, **changes) - np.asarray(model(tokens))).max() > 1e-3


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_packed_and_padded_batches_match_transformers(hf_models, name):
    """Two examples packed in one row (segment ids, per-segment positions) plus a padded tail, and a
    left-padded row: each real token's logits equal transformers' on the example alone."""
    directory, torch_model = hf_models[name]
    model = load1(directory)
    rng = np.random.RandomState(2)
    a, b, c = rng.randint(0, 128, 11), rng.randint(0, 128, 6), rng.randint(0, 128, 13)
    tokens = np.stack([np.concatenate([a, b, [0, 0, 0]]), np.concatenate([[0] * 7, c])])
    positions = np.stack([np.concatenate([np.arange(11), np.arange(6), [0, 0, 0]]),
                          np.concatenate([[0] * 7, np.arange(13)])])
    segments = np.stack([np.concatenate([np.full(11, 1), np.full(6, 2), [0, 0, 0]]),
                         np.concatenate([[0] * 7, np.ones(13, int)])])
    logits = np.asarray(model(tokens, jnp.asarray(positions), jnp.asarray(segments)))
    np.testing.assert_allclose(logits[0, :11], torch_logits(torch_model, a[None])[0], atol=1e-4)
    np.testing.assert_allclose(logits[0, 11:17], torch_logits(torch_model, b[None])[0], atol=1e-4)
    np.testing.assert_allclose(logits[1, 7:], torch_logits(torch_model, c[None])[0], atol=1e-4)
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("name", ["qwen2_tied_mqa_sliding", "qwen3_qk_norm", "gemma2_softcap", "gemma3_local_global"])
def test_sharded_forward_equals_unsharded(hf_models, name):
    directory, _ = hf_models[name]
    tokens = np.random.RandomState(5).randint(0, 128, (8, SEQ))
    expected = np.asarray(load1(directory)(tokens))
    logits = easytune.load(directory, tokenizer=False, mesh_dim="2,2,2")(tokens)
    assert len(logits.sharding.device_set) == 8
    assert np.abs(np.asarray(logits) - expected).max() <= 1e-5


# ----------------------------------------------------------------------------- adapters

def hf_model(directory):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.mark.parametrize("name,variant", [("qwen2_tied_mqa_sliding", "lora"), ("qwen3_qk_norm", "lora"),
                                          ("gemma2_softcap", "lora"), ("gemma3_local_global", "dora")])
def test_lora_adapters_match_peft_both_ways(hf_models, tmp_path, name, variant):
    import peft
    directory, _ = hf_models[name]
    tokens = np.random.RandomState(0).randint(3, 128, (2, 12))
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=variant == "dora",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"])
    reference = peft.get_peft_model(hf_model(directory), config).eval()
    reference.save_pretrained(str(tmp_path / "theirs"))
    expected = torch_logits(reference, tokens)
    assert np.abs(expected - torch_logits(hf_model(directory), tokens)).max() > 1e-2  # the adapter matters

    model = easytune.load(directory, adapter=str(tmp_path / "theirs"), mesh_dim="1,2,4", tokenizer=False)
    assert model.adapter.config.method == variant
    np.testing.assert_allclose(np.asarray(model(tokens)), expected, atol=1e-4)
    model.save_peft(str(tmp_path / "ours"))
    reloaded = peft.PeftModel.from_pretrained(hf_model(directory), str(tmp_path / "ours")).eval()
    np.testing.assert_allclose(torch_logits(reloaded, tokens), expected, atol=1e-5)
    model.save_pretrained(str(tmp_path / "merged"))  # the adapter folded into an HF export
    np.testing.assert_allclose(torch_logits(hf_model(str(tmp_path / "merged")), tokens), expected, atol=1e-4)


def test_prompt_tuning_matches_peft_on_gemma(hf_models, tmp_path):
    """Virtual tokens are prepended as embeddings, which Gemma (like peft) does not rescale."""
    import peft
    directory, _ = hf_models["gemma2_softcap"]
    tokens = np.random.RandomState(0).randint(3, 128, (2, 12))
    torch.manual_seed(2)
    reference = peft.get_peft_model(hf_model(directory), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    reference.save_pretrained(str(tmp_path / "theirs"))
    expected = torch_logits(reference, tokens)[:, 4:]
    assert np.abs(expected - torch_logits(hf_model(directory), tokens)).max() > 1e-2  # the virtual tokens matter
    model = easytune.load(directory, adapter=str(tmp_path / "theirs"), tokenizer=False)
    np.testing.assert_allclose(np.asarray(model(tokens)), expected, atol=1e-4)


# ----------------------------------------------------------------------------- trainers

@pytest.fixture(scope="module")
def gemma2_chat(tmp_path_factory):
    """A tiny Gemma 2 with SmolLM2's tokenizer: window 8 (shorter than the rows), both caps on."""
    return make_chat_model(tmp_path_factory.mktemp("gemma2_chat"), "Gemma2ForCausalLM", head_dim=16, sliding_window=8,
                           query_pre_attn_scalar=16, attn_logit_softcapping=5.0, final_logit_softcapping=10.0)


@pytest.fixture(scope="module")
def qwen3_chat(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("qwen3_chat"), "Qwen3ForCausalLM", head_dim=16,
                           tie_word_embeddings=False)


def test_sft_trains_and_exports_gemma2(gemma2_chat, task_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from easytune.train_sft import DEFAULTS, run
    cfg = run_config(DEFAULTS, {"model": gemma2_chat, "train_data": task_file, "output_dir": str(tmp_path / "out"),
                                "logger": "none", "seq_length": 64, "batch_size": 8, "total_steps": 4, "log_steps": 1,
                                "optimizer.lr": 1e-3, "mesh_dim": "1,4,2", "export_hf": str(tmp_path / "hf")})
    run(cfg)
    losses = [r["loss"] for r in logged(tmp_path / "out")]
    assert len(losses) == 4 and losses[-1] < losses[0]
    trained = easytune.load(str(tmp_path / "out"), tokenizer=False)
    tokens = np.random.RandomState(0).randint(0, 49152, (4, 16))
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(exported).__name__ == "Gemma2ForCausalLM"
    np.testing.assert_allclose(np.asarray(trained(tokens)), torch_logits(exported, tokens), atol=1e-4)


def test_dpo_first_loss_equals_transformers_and_trl_on_qwen3(qwen3_chat, tmp_path):
    """train_dpo's first logged loss (reference-free, so it depends on the log-probs) equals TRL's
    loss on a transformers forward of the same Qwen3 weights and tokens."""
    import test_dpo
    from trl.trainer.utils import add_fused_lm_head

    from easytune import data
    from easytune.train_dpo import run
    pair_file = str(tmp_path / "pairs.jsonl")
    records = [{k: r[k] for k in ("prompt", "chosen", "rejected")}
               for r in data.task_pairs(data.make_task_records(8, seed=3), seed=0)]
    test_dpo.write_jsonl(pair_file, records)
    run(test_dpo.make_cfg(qwen3_chat, pair_file, tmp_path / "run", reference_free=True))
    first = logged(tmp_path / "run")[0]
    tokenizer = easytune.load(qwen3_chat).tokenizer
    loaded, locations = data.load_pairs(pair_file)
    rows, _ = data.pair_rows(loaded, tokenizer, tokenizer.chat_template, 128, pair_file, locations)
    inputs = test_dpo.trl_rows(rows, tokenizer.pad_token_id)
    half = len(rows["chosen_input_ids"])
    inputs.update(ref_chosen_logps=torch.zeros(half), ref_rejected_logps=torch.zeros(half))
    policy = hf_model(qwen3_chat)
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    with torch.no_grad():
        theirs, _, metrics = test_dpo.trl_dpo_loss("sigmoid", None, None, None, model=policy, inputs=inputs,
                                                   ref_model=None)
    np.testing.assert_allclose(first["loss"], theirs, rtol=2e-6)
    np.testing.assert_allclose(first["logps/chosen"], metrics["logps/chosen"][0], rtol=2e-5)


@pytest.mark.parametrize("name,architecture", [("qwen2", "Qwen2ForSequenceClassification"),
                                               ("gemma3_local_global", "Gemma3TextForSequenceClassification")])
def test_reward_model_exports_to_transformers(hf_models, tmp_path, name, architecture):
    from transformers import AutoModelForSequenceClassification

    from easytune.algos import reward
    directory, _ = hf_models[name]
    model = reward.with_score_head(easytune.load(directory, tokenizer=False), seed=3)
    model.save_pretrained(str(tmp_path / "rm"))
    exported = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"), dtype=torch.float32).eval()
    assert type(exported).__name__ == architecture
    sequences = [np.random.RandomState(i).randint(3, 128, n).tolist() for i, n in enumerate((9, 4, 12))]
    width = max(map(len, sequences))
    input_ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    with torch.no_grad():
        theirs = exported(input_ids, attention_mask=mask).logits[:, 0].numpy()
    np.testing.assert_allclose(model.score(sequences), theirs, atol=1e-5)


def test_grpo_rollouts_and_training_agree_on_gemma2(tmp_path_factory, tmp_path):
    """GRPO on a Gemma 2 (caps, sliding/global layers): the log-probs the rollout records through the
    KV cache (mixed windows, soft-capped logits) equal the training forward's before the first update."""
    import test_ppo

    from easytune.train_ppo import run
    model = make_char_chat_model(tmp_path_factory.mktemp("gemma2_char"), "Gemma2ForCausalLM", head_dim=16,
                                 sliding_window=6, query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                                 final_logit_softcapping=10.0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"count to {i}"}) + "\n" for i in range(8)))
    module = tmp_path / "family_rewards.py"
    module.write_text("def length(prompts, completions, **_):\n    return [len(c) / 16 for c in completions]\n")
    import sys
    sys.path.insert(0, str(tmp_path))
    try:
        run(test_ppo.make_cfg(model, str(prompts), tmp_path / "run", algo="grpo", iterations=1, ppo_epochs=2,
                              reward_fn="family_rewards:length"))
    finally:
        sys.path.remove(str(tmp_path))
    (h,) = logged(tmp_path / "run")
    assert h["policy/ratio_deviation_first_step"] == 0.0
    assert h["policy/ratio_deviation"] > 0.0


# ----------------------------------------------------------------------------- bad input

def write_config(directory, config: dict):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


@pytest.mark.parametrize("name,change,message", [
    ("qwen2", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope scaling type .yarn. is not supported"),
    ("qwen3_qk_norm", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported for qwen3"),
    ("qwen3_qk_norm", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ("gemma2_softcap", {"hidden_activation": "relu"}, "hidden_activation 'relu' is not supported for gemma2"),
    ("gemma2_softcap", {"layer_types": ["chunked_attention", "full_attention"]},
     "layer_types holds 'chunked_attention'"),
    ("gemma3_local_global", {"use_bidirectional_attention": True}, "use_bidirectional_attention is not supported"),
    ("gemma3_local_global", {"model_type": "gemma3"}, "multimodal Gemma 3 checkpoint"),
    ("qwen2", {"model_type": "qwen2_moe"}, "unknown model_type 'qwen2_moe'"),
])
def test_unsupported_configs_are_one_sentence_errors(hf_models, tmp_path, name, change, message):
    """A config field this family's code does not implement is refused, naming it, before any
    weight is read: never a silently different model."""
    with open(f"{hf_models[name][0]}/config.json") as f:
        config = {**json.load(f), **change}
    with pytest.raises(ValueError, match=message):
        easytune.load(write_config(tmp_path / "bad", config), tokenizer=False)


def test_fused_head_refuses_final_logit_softcapping(hf_models):
    with pytest.raises(ValueError, match="does not apply final-logit soft-capping"):
        load1(hf_models["gemma2_softcap"][0], head_chunk_size=8)


def test_every_family_is_registered_by_its_own_file():
    """The registry is built from the family files: no central table names them."""
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "t5"} <= set(models.supported_model_types())
    assert models.registration("gemma2").module is decoder
    assert models.registration("t5").module.IS_ENCODER_DECODER
