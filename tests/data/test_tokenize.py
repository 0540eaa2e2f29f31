"""Assistant-only loss masks, checked by decoding with the real SmolLM2 tokenizer.

Convention under test: a turn's trained span is what the template renders for it after the
generation prompt. For ChatML that is `content<|im_end|>\\n` (the newline is part of the turn as
rendered); for Tulu it is `content<eos>` (its newline between turns is rendered by the next turn).
"""
import pytest

from easytune.data import (BUILTIN_TEMPLATES, render_ids, resolve_chat_template, tokenize_conversation,
                           tokenize_records, tokenize_text)

SYSTEM, USER_1, USER_2 = "You answer tersely.", "What is the capital of France?", "And of Italy?"
ANSWER_1, ANSWER_2 = "Paris, of course.", "Rome."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER_1},
    {"role": "assistant", "content": ANSWER_1},
    {"role": "user", "content": USER_2},
    {"role": "assistant", "content": ANSWER_2},
]


def trained_spans(example, tokenizer) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    spans, current = [], []
    for token, trained in zip(example.input_ids + [None], example.loss_mask + [0]):
        if trained:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans


def untrained_text(example, tokenizer) -> str:
    return tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask) if not m])


def test_render_ids_tokenizes_strings_as_is_and_renders_conversations(tokenizer):
    """The one chat render (prompts, scored sequences, training data): text as the tokenizer splits
    it; a conversation as transformers renders it, with the generation prompt only when asked."""
    assert render_ids(tokenizer, USER_1, add_generation_prompt=True) == tokenizer(USER_1)["input_ids"]
    prompt = render_ids(tokenizer, CONVERSATION[:2], add_generation_prompt=True)
    whole = render_ids(tokenizer, CONVERSATION[:3], add_generation_prompt=False)
    assert tokenizer.decode(prompt) == tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False,
                                                                     add_generation_prompt=True)
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(whole[len(prompt):]) == ANSWER_1 + "<|im_end|>\n"
    tulu = render_ids(tokenizer, CONVERSATION[:2], add_generation_prompt=True, chat_template=BUILTIN_TEMPLATES["tulu"])
    assert tokenizer.decode(tulu) == f"<|system|>\n{SYSTEM}\n<|user|>\n{USER_1}\n<|assistant|>\n"


@pytest.mark.parametrize("template_name", [None, "chatml"])
def test_chatml_masks_exactly_the_assistant_turns(tokenizer, template_name):
    template = resolve_chat_template(tokenizer, template_name)
    example = tokenize_conversation(CONVERSATION, tokenizer, template)
    # The whole sequence is what transformers renders for the conversation.
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(
        CONVERSATION, chat_template=template, tokenize=False)
    assert trained_spans(example, tokenizer) == [ANSWER_1 + "<|im_end|>\n", ANSWER_2 + "<|im_end|>\n"]
    # Hand-checked ids: the trained tokens are the answers' own tokens, then <|im_end|> (2) and "\n" (198).
    trained_ids = [t for t, m in zip(example.input_ids, example.loss_mask) if m]
    answer_ids = [tokenizer.encode(a, add_special_tokens=False) + [2, 198] for a in (ANSWER_1, ANSWER_2)]
    assert trained_ids == answer_ids[0] + answer_ids[1]
    untrained = untrained_text(example, tokenizer)
    for text in (SYSTEM, USER_1, USER_2):
        assert text in untrained
    assert ANSWER_1 not in untrained and ANSWER_2 not in untrained
    assert untrained.count("<|im_start|>assistant\n") == 2  # the headers are prompt, not target


def test_tokenizer_template_default_system_prompt_is_not_trained(tokenizer):
    template = resolve_chat_template(tokenizer, None)
    example = tokenize_conversation(CONVERSATION[1:], tokenizer, template)
    assert "You are a helpful AI assistant named SmolLM" in untrained_text(example, tokenizer)
    assert trained_spans(example, tokenizer) == [ANSWER_1 + "<|im_end|>\n", ANSWER_2 + "<|im_end|>\n"]


def test_tulu_masks_exactly_the_assistant_turns(tokenizer):
    example = tokenize_conversation(CONVERSATION, tokenizer, resolve_chat_template(tokenizer, "tulu"))
    assert tokenizer.decode(example.input_ids) == (
        f"<|system|>\n{SYSTEM}\n<|user|>\n{USER_1}\n<|assistant|>\n{ANSWER_1}<|im_end|>\n"
        f"<|user|>\n{USER_2}\n<|assistant|>\n{ANSWER_2}<|im_end|>")
    assert trained_spans(example, tokenizer) == [ANSWER_1 + "<|im_end|>", ANSWER_2 + "<|im_end|>"]
    untrained = untrained_text(example, tokenizer)
    for text in (SYSTEM, USER_1, USER_2, "<|assistant|>"):
        assert text in untrained


def test_trailing_user_turn_is_not_trained(tokenizer):
    example = tokenize_conversation(CONVERSATION[:4], tokenizer, BUILTIN_TEMPLATES["chatml"])
    assert trained_spans(example, tokenizer) == [ANSWER_1 + "<|im_end|>\n"]


def test_template_that_rewrites_past_turns_is_refused(tokenizer):
    # Like reasoning templates that drop earlier assistant content: earlier renderings are not prefixes.
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '[hidden]' }}"
                "{% else %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(ValueError, match="chat template problem: .* not tokenize to a prefix"):
        tokenize_conversation(CONVERSATION, tokenizer, template)


def test_conversation_starting_with_assistant_is_refused(tokenizer):
    with pytest.raises(ValueError, match="starts with an assistant message"):
        tokenize_conversation(CONVERSATION[2:], tokenizer, BUILTIN_TEMPLATES["chatml"])


def test_resolve_chat_template(tokenizer):
    assert resolve_chat_template(tokenizer, "tokenizer") == tokenizer.chat_template
    with pytest.raises(ValueError, match="unknown chat template 'llama'; choose one of tokenizer, chatml, tulu"):
        resolve_chat_template(tokenizer, "llama")

    class NoTemplate:
        chat_template = None
    with pytest.raises(ValueError, match="no chat template; pass --chat_template=chatml|tulu"):
        resolve_chat_template(NoTemplate(), None)


def test_tokenize_text_appends_eos_and_trains_all_but_the_first(tokenizer):
    example = tokenize_text("The quick brown fox.", tokenizer)
    assert example.input_ids == tokenizer("The quick brown fox.")["input_ids"] + [tokenizer.eos_token_id]
    assert example.loss_mask == [0] + [1] * (len(example.input_ids) - 1)


def long_prompt_record(words: int):
    return {"messages": [{"role": "user", "content": "word " * words}, {"role": "assistant", "content": "ok then"}]}


def test_truncation_stats(tokenizer):
    template = BUILTIN_TEMPLATES["chatml"]
    record = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}]}
    prompt_length = len(tokenizer.apply_chat_template(
        record["messages"][:1], chat_template=template, add_generation_prompt=True, tokenize=True)["input_ids"])
    full_length = len(tokenizer.apply_chat_template(record["messages"], chat_template=template,
                                                    tokenize=True)["input_ids"])
    records = [record, long_prompt_record(200), {"text": "word " * 100}]

    # Room for the prompt and exactly one assistant token: record 0 keeps one trainable target.
    examples, stats = tokenize_records(records, tokenizer, template, prompt_length + 1, "toy")
    assert [len(e.input_ids) for e in examples] == [prompt_length + 1, prompt_length + 1]
    assert [e.num_trainable_targets for e in examples] == [1, prompt_length]
    counts = (stats.num_records, stats.num_kept, stats.num_dropped_no_trainable_tokens, stats.num_truncated)
    assert counts == (3, 2, 1, 2)
    assert stats.num_tokens == 2 * (prompt_length + 1)
    assert stats.num_trainable_tokens == 1 + prompt_length

    # The prompt alone fills seq_length: nothing left to train on for record 0.
    examples, stats = tokenize_records(records, tokenizer, template, prompt_length, "toy")
    assert (stats.num_kept, stats.num_dropped_no_trainable_tokens) == (1, 2)

    # Long enough: record 0 untouched, with every assistant token (after the header) trained.
    examples, stats = tokenize_records(records[:1], tokenizer, template, 1000, "toy")
    assert stats.num_truncated == 0 and len(examples[0].input_ids) == full_length
    assert examples[0].loss_mask == [0] * prompt_length + [1] * (full_length - prompt_length)


def test_all_overlong_and_bad_records_are_errors(tokenizer):
    records = [long_prompt_record(100), long_prompt_record(120)]
    message = (r"^all 2 samples of toy\.jsonl have no trainable tokens after truncation to seq_length=16; "
               r"raise --seq_length or check the data\.$")
    with pytest.raises(ValueError, match=message):
        tokenize_records(records, tokenizer, BUILTIN_TEMPLATES["chatml"], 16, "toy.jsonl")
    bad = records + [{"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}]
    with pytest.raises(ValueError, match=r"toy\.jsonl record 3 messages\[1\]: unknown role 'robot'"):
        tokenize_records(bad, tokenizer, BUILTIN_TEMPLATES["chatml"], 512, "toy.jsonl")
