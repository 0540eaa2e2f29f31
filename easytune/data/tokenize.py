"""Records -> token ids with a loss mask over the trained (assistant) tokens.

Assistant spans are found by rendering the conversation incrementally, so any chat template works
without `{% generation %}` markers: for assistant turn i, the tokens of
`template(messages[:i], add_generation_prompt=True)` are the prompt, and the tokens that
`template(messages[:i+1])` adds after them are the turn. That span is the content plus whatever the
template closes the turn with: `<|im_end|>\\n` for ChatML, `<eos>` (and `\\n` unless it is the last
turn) for Tulu. This is the span open-instruct trains on.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

from easytune.data.formats import detect_format, record_tools, to_messages
from easytune.data.templates import render_ids


@dataclasses.dataclass
class Example:
    """One tokenized sample: `input_ids [length]` and `loss_mask [length]`, where loss_mask[i] is 1
    iff token i is a trained token (the model is trained to predict it from the tokens before)."""

    input_ids: list[int]
    loss_mask: list[int]

    @property
    def num_trainable_targets(self) -> int:
        """Loss terms this example contributes: trained tokens with a token before them."""
        return sum(self.loss_mask[1:])


@dataclasses.dataclass
class DataStats:
    """Counts from `tokenize_records`. num_truncated counts kept examples that lost tokens;
    num_tokens and num_trainable_tokens (loss terms) are over kept examples after truncation."""

    num_records: int = 0
    num_kept: int = 0
    num_dropped_no_trainable_tokens: int = 0
    num_truncated: int = 0
    num_tokens: int = 0
    num_trainable_tokens: int = 0

    def summary(self) -> str:
        return (f"{self.num_records} records: {self.num_kept} kept, {self.num_dropped_no_trainable_tokens} dropped "
                f"(no trainable tokens after truncation), {self.num_truncated} truncated; "
                f"{self.num_tokens} tokens, {self.num_trainable_tokens} trained")


def tokenize_conversation(messages: Sequence[dict], tokenizer, chat_template: str, tools=None) -> Example:
    """Tokenize `messages` with `chat_template` (and the record's `tools`, rendered by the template);
    loss on every assistant turn's tokens (tool calls included), nothing else (tool results are
    context)."""
    if messages and messages[0]["role"] == "assistant":
        raise ValueError("the conversation starts with an assistant message; there is no prompt before it, "
                         "so its tokens can't be located. Put a system or user message first.")
    render = functools.partial(render_ids, tokenizer, chat_template=chat_template, tools=tools)
    input_ids = render(messages, add_generation_prompt=False)
    loss_mask = [0] * len(input_ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_prefix_of(render(messages[:turn], add_generation_prompt=True), input_ids, turn, True))
        end = len(_prefix_of(render(messages[:turn + 1], add_generation_prompt=False), input_ids, turn + 1, False))
        if end <= start:
            raise ValueError(f"chat template problem: assistant message {turn} renders no tokens after the "
                             f"generation prompt, so there is nothing to train on for it.")
        loss_mask[start:end] = [1] * (end - start)
    return Example(input_ids, loss_mask)


def tokenize_conversations(conversations: Sequence[Sequence[dict]], tokenizer, chat_template: str) -> list[Example]:
    """`tokenize_conversation` of each conversation (no tools), rendered and tokenized in two batched
    `apply_chat_template` calls (one for the whole conversations and their prefixes up to each
    assistant turn, one for the prefixes with the generation prompt) instead of one per prefix; the
    same ids and masks. Errors are not located or worded here: `tokenize_chunk` then tokenizes one
    conversation at a time, which raises them naming the record."""
    closed, prompted, plan = [], [], []  # plan: per conversation, its full index and per turn (prompt, end)
    for messages in conversations:
        if not messages or messages[0]["role"] == "assistant":
            raise ValueError("a conversation starts with an assistant message")
        full = len(closed)
        closed.append(list(messages))
        turns = []
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompted.append(list(messages[:turn]))
            if turn + 1 == len(messages):
                end = full
            else:
                end = len(closed)
                closed.append(list(messages[:turn + 1]))
            turns.append((len(prompted) - 1, end, turn))
        plan.append((full, turns))
    closed_ids = _batch_ids(tokenizer, closed, chat_template, add_generation_prompt=False)
    prompted_ids = _batch_ids(tokenizer, prompted, chat_template, add_generation_prompt=True)
    examples = []
    for full, turns in plan:
        input_ids = closed_ids[full]
        loss_mask = [0] * len(input_ids)
        for prompt, end, turn in turns:
            start = len(_prefix_of(prompted_ids[prompt], input_ids, turn, True))
            stop = len(_prefix_of(closed_ids[end], input_ids, turn + 1, False))
            if stop <= start:
                raise ValueError("no tokens after the generation prompt")
            loss_mask[start:stop] = [1] * (stop - start)
        examples.append(Example(input_ids, loss_mask))
    return examples


def _batch_ids(tokenizer, conversations: list, chat_template: str, add_generation_prompt: bool) -> list[list[int]]:
    if not conversations:
        return []
    ids = tokenizer.apply_chat_template(conversations, chat_template=chat_template, tokenize=True,
                                        add_generation_prompt=add_generation_prompt)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [list(i) for i in ids]


def _prefix_of(partial: list[int], full: list[int], num_messages: int, generation_prompt: bool) -> list[int]:
    """`partial`, after checking that it is a prefix of the whole conversation's `full` ids."""
    if full[:len(partial)] != partial:
        what = f"the first {num_messages} messages" + (" plus the generation prompt" if generation_prompt else "")
        raise ValueError(
            f"chat template problem: {what} do not tokenize to a prefix of the whole conversation, so the "
            f"assistant tokens can't be located. The template renders earlier turns differently depending on "
            f"what follows (e.g. it drops past reasoning, or its generation prompt differs from how it opens an "
            f"assistant turn), or tokens merge across the turn boundary. Use --chat_template=chatml or tulu.")
    return partial


def tokenize_text(text: str, tokenizer) -> Example:
    """Continued pretraining: bos (if the tokenizer adds one) + text + eos; loss on all tokens but the first."""
    input_ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not input_ids or input_ids[-1] != eos):
        input_ids.append(eos)
    return Example(input_ids, [0] + [1] * (len(input_ids) - 1))


TRAIN_ON = ("assistant", "all")


def tokenize_records(records: Sequence[dict], tokenizer, chat_template: str | None, seq_length: int,
                     source_name: str, locations: Sequence[str] | None = None, train_on: str = "assistant"
                     ) -> tuple[list[Example], DataStats]:
    """Tokenize every record (any layout of `formats`), right-truncate to `seq_length`, and drop the
    examples left with no trainable target. Errors name the record's place: `locations[i]` (e.g.
    "train.jsonl line 3", from `load_located_records`) or else `<source_name> record <n>` (1-based).
    `train_on`: "assistant" trains the assistant turns only; "all" every token of the conversation
    (system, user and template tokens too)."""
    if not records:
        raise ValueError(f"{source_name} has no records.")
    stats = DataStats(num_records=len(records))
    examples = []
    wheres = locations if locations is not None else [f"{source_name} record {i}" for i in
                                                      range(1, len(records) + 1)]
    for example, truncated in tokenize_chunk(records, wheres, tokenizer, chat_template, seq_length, train_on):
        if example.num_trainable_targets == 0:
            stats.num_dropped_no_trainable_tokens += 1
            continue
        examples.append(example)
        stats.num_truncated += truncated
        stats.num_tokens += len(example.input_ids)
        stats.num_trainable_tokens += example.num_trainable_targets
    stats.num_kept = len(examples)
    if not examples:
        raise ValueError(f"all {len(records)} samples of {source_name} have no trainable tokens after truncation "
                         f"to seq_length={seq_length}; raise --seq_length or check the data.")
    return examples, stats


CHUNK = 256  # records rendered and tokenized per batched call


def tokenize_chunk(records: Sequence[dict], wheres: Sequence[str], tokenizer, chat_template: str | None,
                   seq_length: int, train_on: str = "assistant") -> list[tuple[Example, bool]]:
    """`(example truncated to seq_length, whether it was truncated)` of each record, in order; an
    example may be left with no trainable target (the caller drops it). Conversations without tools
    are tokenized `CHUNK` at a time together (`tokenize_conversations`); the rest, and a chunk whose
    batched call fails, one at a time. Errors name `wheres[i]`."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"--train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}.")
    parsed = []
    for record, where in zip(records, wheres):
        fmt = detect_format(record, where)
        parsed.append((to_messages(record, fmt, where), record_tools(record, where)))
    if chat_template is None:
        for (messages, _), where in zip(parsed, wheres):
            if messages is not None:
                raise ValueError(f"{where}: conversations need a chat template; pass --chat_template.")
    together = [i for i, (messages, tools) in enumerate(parsed) if messages is not None and not tools]
    examples: list[Example | None] = [None] * len(records)
    for begin in range(0, len(together), CHUNK):
        chunk = together[begin:begin + CHUNK]
        try:
            batch = tokenize_conversations([parsed[i][0] for i in chunk], tokenizer, chat_template)
        except Exception:  # find and name the record: one at a time below
            continue
        for i, example in zip(chunk, batch):
            examples[i] = example
    out = []
    for i, ((messages, tools), where) in enumerate(zip(parsed, wheres)):
        example = examples[i]
        if example is None:
            try:
                if messages is None:
                    example = tokenize_text(records[i]["text"], tokenizer)
                else:
                    example = tokenize_conversation(messages, tokenizer, chat_template, tools)
            except Exception as e:  # template errors (jinja, raise_exception) and ours, located
                raise ValueError(f"{where}: {e}") from e
        if train_on == "all":
            example = Example(example.input_ids, [1] * len(example.input_ids))
        truncated = len(example.input_ids) > seq_length
        out.append((Example(example.input_ids[:seq_length], example.loss_mask[:seq_length]), truncated))
    return out
