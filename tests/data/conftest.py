"""Shared fixtures for the data pipeline tests: the real SmolLM2 tokenizer, loaded once."""
import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2-135M-Instruct's tokenizer: <|im_start|>=1, <|im_end|>=2 (also eos), and a ChatML
    template that inserts a default system prompt when the first message is not a system message."""
    from transformers import AutoTokenizer

    from easytune import assets
    return AutoTokenizer.from_pretrained(assets.smollm2_hf_dir())
