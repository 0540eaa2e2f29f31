"""Chat templates: the tokenizer's own, or a builtin one chosen with --chat_template.

Templates are Jinja strings rendered by `tokenizer.apply_chat_template`, which provides
`messages`, `add_generation_prompt`, `bos_token` and `eos_token`. The template a run trains with
becomes its tokenizer's own (`adopt_chat_template`), so that the run's and the export's tokenizer
files carry it and everything that renders a conversation afterwards uses it.
"""
from __future__ import annotations

# ChatML without a default system prompt. The turn ends with the literal <|im_end|>, so use it with
# tokenizers that have <|im_start|>/<|im_end|> as special tokens (and <|im_end|> as a stop token).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The Tulu format of allenai/open-instruct: role headers on their own line, assistant turns end with
# the tokenizer's eos token (followed by a newline except after the last message).
TULU = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token }}{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"chatml": CHATML, "tulu": TULU}
TEMPLATE_CHOICES = ("tokenizer", *BUILTIN_TEMPLATES)


def resolve_chat_template(tokenizer, name: str | None) -> str:
    """The Jinja template for `name`: None or "tokenizer" -> the tokenizer's own, else a builtin."""
    if name is None or name == "tokenizer":
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates; "default" is the chat one
            template = template.get("default")
        if not template:
            raise ValueError(f"the tokenizer has no chat template; pass "
                             f"--chat_template={'|'.join(BUILTIN_TEMPLATES)} to use a builtin one.")
        return template
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name]
    raise ValueError(f"unknown chat template {name!r}; choose one of {', '.join(TEMPLATE_CHOICES)}.")


def adopt_chat_template(tokenizer, name: str | None) -> str:
    """`resolve_chat_template(tokenizer, name)`, made the tokenizer's own `chat_template` when it is
    a builtin: a model trained on one format must be prompted in it. Held-out eval, generate,
    score and RL prompts render with the tokenizer's template, and `save_pretrained` writes it
    (`chat_template.jinja`, as transformers saves it) into the run and every export."""
    template = resolve_chat_template(tokenizer, name)
    if name in BUILTIN_TEMPLATES:
        tokenizer.chat_template = template
    return template


def render_ids(tokenizer, sequence, *, add_generation_prompt: bool, chat_template: str | None = None,
               tools: list[dict] | None = None) -> list[int]:
    """Token ids of `sequence`: a string tokenized as is, or a conversation (list of
    `{"role", "content"}` dicts) rendered with `chat_template` (default: the tokenizer's own).
    add_generation_prompt: True for a prompt to generate from, False for a whole conversation.
    tools: function schemas the template renders (its `tools` variable)."""
    if isinstance(sequence, str):
        return list(tokenizer(sequence)["input_ids"])
    extra = {"tools": tools} if tools else {}
    ids = tokenizer.apply_chat_template(list(sequence), chat_template=chat_template, tokenize=True,
                                        add_generation_prompt=add_generation_prompt, **extra)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)
