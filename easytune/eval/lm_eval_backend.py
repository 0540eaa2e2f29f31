"""easytune's model as an lm-evaluation-harness backend (`lm_eval` 0.4.x), registered as `easytune`.

lm-eval owns the tasks, prompts, few-shot sampling, metrics and result files; this class only
answers its three request types on easytune's jitted, sharded model, with the tokenization of
lm-eval's own `hf` backend (`HFLM`) so that both score the same tokens:

- `loglikelihood` (via `TemplateLM`'s context/continuation split) and `loglikelihood_rolling`
  (lm-eval's rolling windows): rows sorted by length, right-padded to a power-of-two length and
  a power-of-two batch, so a whole task compiles a handful of shapes; the log-softmax, the target
  gather and the greedy check run inside the jit, so only `[batch, seq]` floats leave the device.
- `generate_until`: easytune's KV-cache generator (greedy unless the task samples), stopped at
  `max_gen_toks` or EOS, the text cut at the first stop sequence as `HFLM` cuts it.

Multi-process runs (`jax.distributed`) evaluate the same requests in every process (the forward is
one SPMD program over the mesh); lm-eval sees one rank, and the CLI writes files from process 0.
"""
from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text, resolve_max_length)

import easytune
from easytune import sharding
from easytune.distributed import host_array
from easytune.generate import bucket_length

# Scoring rows are at least this long (generation's prompts: 16); few compiled shapes per task.
MIN_BUCKET = 8


@functools.partial(jax.jit, static_argnums=(0, 1))
def _target_logprobs(family, config, params, tokens, segment_ids, targets):
    """Log-probability of each target token `[batch, seq]` and whether it is the argmax."""
    logits = family.forward(config, params, tokens, None, segment_ids)
    logps = jax.nn.log_softmax(logits, axis=-1)
    target_logps = jnp.take_along_axis(logps, targets[..., None], axis=-1)[..., 0]
    return target_logps, jnp.argmax(logits, axis=-1) == targets


def scoring_config(config):
    """The model's config with its layer loop a scan: scoring is a forward pass alone, where an
    unrolled loop (`layer_loop=auto` on CPU, for training's backward) gains nothing and compiles
    each scoring shape ~1.7x longer, once per length bucket."""
    if getattr(config, "layer_loop", "scan") == "scan":
        return config
    return dataclasses.replace(config, layer_loop="scan")


@register_model("easytune")
class EasytuneLM(TemplateLM):
    """lm-eval model over an easytune model: `EasytuneLM(model=...)` with a loaded `easytune.Model`,
    or a path (HF directory, easytune checkpoint or run directory) plus `adapter`, `dtype`,
    `mesh_dim` as `easytune.load` takes them (so `lm_eval --model easytune --model_args
    model=PATH,mesh_dim=1x-1x1` works once this module is imported)."""

    def __init__(self, model=None, adapter: str | None = None, dtype: str | None = None, mesh_dim: str = "1,-1,1",
                 batch_size: int | str = 8, max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None, seed: int = 0, **unused):
        super().__init__()
        if not isinstance(model, easytune.Model):
            # lm-eval splits model_args at commas: there the mesh is written 1x-1x1
            model = easytune.load(model, adapter=adapter, dtype=dtype, mesh_dim=str(mesh_dim).replace("x", ","))
        if model.is_encoder_decoder:
            raise ValueError("easytune.eval evaluates decoder-only models; this is an encoder-decoder "
                             f"({model.config.model_type}).")
        if model.tokenizer is None:
            raise ValueError("easytune.eval needs the model's tokenizer; load it with tokenizer=True.")
        self.model = model
        self.tokenizer = model.tokenizer
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self._max_length = max_length or resolve_max_length(types.SimpleNamespace(**model.hf_config), self.tokenizer)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.seed = seed

    # ------------------------------------------------------------------ what lm-eval asks of a TemplateLM

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # as HFLM: BOS if the tokenizer has one, else EOS, conditions an empty context
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "easytune").replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        """HFLM's rule: the tokenizer's own special-token default unless `add_bos_token` says
        otherwise, and none added to a string that already starts with BOS."""
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ scoring

    def _score_rows(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """`(sum of continuation log-probs, all greedy)` for `(context, continuation)` token lists,
        each row cut on the left to `max_length` + 1 tokens as HFLM cuts it."""
        family, config, params = self.model.family, scoring_config(self.model.config), self.model.forward_params
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]) - len(rows[i][1]))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            sequences = [(rows[i][0] + rows[i][1])[-(self.max_length + 1):] for i in chunk]
            width = bucket_length(max(len(s) for s in sequences) - 1, minimum=MIN_BUCKET)
            rows_padded = self._batch_rows(len(sequences))
            tokens = np.zeros((rows_padded, width), np.int32)
            targets = np.zeros((rows_padded, width), np.int32)
            segments = np.zeros((rows_padded, width), np.int32)
            for row, sequence in enumerate(sequences):
                n = len(sequence) - 1
                tokens[row, :n], targets[row, :n], segments[row, :n] = sequence[:-1], sequence[1:], 1
            put = functools.partial(jax.device_put, device=sharding.input_sharding(self.model.mesh, rows_padded))
            with jax.set_mesh(self.model.mesh):
                logps, greedy = _target_logprobs(family, config, params, put(tokens), put(segments), put(targets))
            logps, greedy = host_array(logps), host_array(greedy)  # gathered from every process
            for row, (i, sequence) in enumerate(zip(chunk, sequences)):
                n, m = len(sequence) - 1, len(rows[i][1])
                results[i] = (float(logps[row, n - m:n].sum()), bool(greedy[row, n - m:n].all()))
        return results

    def _batch_rows(self, rows: int) -> int:
        """Rows of a scoring batch: a power of two (few compiled shapes; a last, short batch is not
        padded to the full batch size) and a multiple of the mesh's batch shards."""
        shards = self.model.mesh.shape["dp"] * self.model.mesh.shape["fsdp"]
        return -(-max(bucket_length(rows, minimum=1), shards) // shards) * shards

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        scores = self._score_rows([(context, continuation) for _, context, continuation in requests])
        for (key, _, _), score in zip(requests, scores):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, score)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood over lm-eval's disjoint rolling windows of `max_length`."""
        windows, owners = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            for window in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(window)
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, self._score_rows(windows)):
            totals[owner] += logp
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from easytune.generate import SamplingConfig, generate_tokens
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):  # one generation setting per group, as HFLM
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise ValueError(f"max_gen_toks ({max_gen_toks}) must be below the model's max_length "
                                 f"({self.max_length}).")
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            sampling = SamplingConfig(max_new_tokens=max_gen_toks, temperature=temperature,
                                      top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen_toks)
                           for i in chunk]
                generated = generate_tokens(self.model.config, self.model.forward_params, prompts, sampling,
                                            self.model.eos_token_ids, self.model.pad_token_id, self.seed + start,
                                            mesh=self.model.mesh)
                for i, tokens in zip(chunk, generated):
                    text = postprocess_generated_text(self.tok_decode(tokens), until, None)
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs
