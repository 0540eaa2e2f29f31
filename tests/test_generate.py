"""KV-cache generation against transformers' `generate` and logits warpers."""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

import easytune
from easytune import generate as gen

PROMPTS = [[1, 17, 33, 9, 64, 21, 5], [1, 90], [1, 44, 12, 7]]


def hf_greedy(torch_model, prompt, max_new_tokens, eos_token_id=None):
    with torch.no_grad():
        out = torch_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=eos_token_id, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["llama3_gqa_rope_scaling", "mistral_sliding_window", "llama_tied_mqa",
                                  "qwen2_tied_mqa_sliding", "qwen3_qk_norm", "gemma2_softcap",
                                  "gemma3_local_global"])
def test_greedy_ragged_batch_matches_hf(hf_models, name):
    """A batch of prompts of different lengths, left-padded; Mistral's window (5) is much shorter
    than prompt + generation, so its ring-buffer cache wraps many times."""
    directory, torch_model = hf_models[name]
    model = easytune.load(directory, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")
    sampling = gen.SamplingConfig(max_new_tokens=20)
    ours = gen.generate_tokens(model.config, model.params, PROMPTS, sampling, eos_ids=[], pad_id=0)
    for prompt, tokens in zip(PROMPTS, ours):
        assert tokens == hf_greedy(torch_model, prompt, 20, eos_token_id=None)


def test_sharded_generation_equals_unsharded(hf_models):
    directory, _ = hf_models["llama3_gqa_rope_scaling"]
    single = easytune.load(directory, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")
    sharded = easytune.load(directory, tokenizer=False, mesh_dim="2,2,2")
    prompts = PROMPTS + [[1, 5, 6], [1, 2, 3, 4, 5]] * 2 + [[3]]  # batch 8: divisible by dp*fsdp
    assert single.generate(prompts, max_new_tokens=12) == sharded.generate(prompts, max_new_tokens=12)


def test_stops_at_eos_and_pads_finished_rows(hf_models):
    directory, torch_model = hf_models["llama3_gqa_rope_scaling"]
    model = easytune.load(directory, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")
    free_run = hf_greedy(torch_model, PROMPTS[0], 12)
    eos = free_run[3]  # make the 4th greedy token the EOS
    stop = free_run.index(eos) + 1
    out = gen.generate_tokens(model.config, model.params, PROMPTS, gen.SamplingConfig(max_new_tokens=12),
                              eos_ids=[eos], pad_id=0)
    assert out[0] == free_run[:stop]
    for prompt, tokens in zip(PROMPTS[1:], out[1:]):
        assert tokens == hf_greedy(torch_model, prompt, 12, eos_token_id=eos)


def test_no_recompilation_within_a_length_bucket(hf_models):
    directory, _ = hf_models["llama2"]
    model = easytune.load(directory, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")
    model.generate([[1, 2, 3]], max_new_tokens=5)
    compiled = gen._generate._cache_size()
    for prompt in ([1, 2, 3, 4, 5, 6], [9] * 11, [4] * 16):
        model.generate([prompt], max_new_tokens=5)
    assert gen._generate._cache_size() == compiled


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.9), (1.3, 20, 0.5), (0.5, 0, 0.3)])
def test_logit_filtering_matches_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    logits = np.random.RandomState(0).randn(4, 200).astype(np.float32) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    ref = warpers(None, torch.tensor(logits)).numpy()
    ours = np.asarray(gen.filter_logits(jnp.asarray(logits), temperature, top_k=top_k, top_p=top_p,
                                        use_top_p=top_p < 1))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6)


def test_sampling_is_seeded_and_stays_in_top_k(hf_models):
    directory, torch_model = hf_models["llama2"]
    model = easytune.load(directory, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")
    sampling = gen.SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=3)
    a = gen.generate_tokens(model.config, model.params, PROMPTS, sampling, [], 0, seed=1)
    b = gen.generate_tokens(model.config, model.params, PROMPTS, sampling, [], 0, seed=1)
    c = gen.generate_tokens(model.config, model.params, PROMPTS, sampling, [], 0, seed=2)
    assert a == b and a != c
    for prompt, tokens in zip(PROMPTS, a):  # every sampled token is among HF's top 3 at its step
        with torch.no_grad():
            logits = torch_model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        top3 = torch.topk(logits, 3).indices.tolist()
        assert all(t in allowed for t, allowed in zip(tokens, top3))


def test_bad_sampling_settings():
    with pytest.raises(ValueError, match="top_p"):
        gen.SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.SamplingConfig(max_new_tokens=0)


def test_llama3_style_eos_list_and_out_of_vocab_pad(hf_models, tmp_path):
    """generation_config with several EOS ids (as Llama 3 ships) and a pad id outside the vocab."""
    import json
    import shutil
    directory, torch_model = hf_models["llama3_gqa_rope_scaling"]
    free_run = hf_greedy(torch_model, PROMPTS[0], 12)
    eos = [free_run[5], free_run[2]]
    local = tmp_path / "m"
    shutil.copytree(directory, local)
    (local / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": 128}))
    model = easytune.load(str(local), tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")
    assert model.eos_token_ids == sorted(eos) and model.pad_token_id == 128
    out = model.generate(PROMPTS, max_new_tokens=12)
    assert out[0] == free_run[:3]
    for prompt, tokens in zip(PROMPTS[1:], out[1:]):
        assert tokens == hf_greedy(torch_model, prompt, 12, eos_token_id=eos)


def test_prompt_forms(hf_models):
    directory, _ = hf_models["llama2"]
    model = easytune.load(directory, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")
    batch = model.generate(PROMPTS, max_new_tokens=4)
    assert model.generate(PROMPTS[0], max_new_tokens=4) == batch[:1]  # one prompt, not a batch
    assert model.generate(np.asarray(PROMPTS[2]), max_new_tokens=4) == batch[2:]
    assert model.generate([np.asarray(p, np.int64) for p in PROMPTS], max_new_tokens=4) == batch
    with pytest.raises(ValueError, match="no tokenizer"):
        model.generate("hello")
    with pytest.raises(ValueError, match="generate needs a prompt"):
        model.generate([])


def test_sampling_settings_do_not_recompile_and_top_k_is_clamped(hf_models):
    directory, _ = hf_models["llama2"]
    model = easytune.load(directory, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")
    model.generate(PROMPTS, max_new_tokens=4, temperature=0.7, top_p=0.9)
    compiled = gen._generate._cache_size()
    model.generate(PROMPTS, max_new_tokens=4, temperature=1.3, top_p=0.5)
    assert gen._generate._cache_size() == compiled
    assert len(model.generate(PROMPTS, max_new_tokens=4, temperature=1.0, top_k=10_000)) == 3
