"""easytune: fine-tune LLaMA/Mistral-family and T5 models in JAX, from a laptop CPU to a TPU pod.

    model = easytune.load("path/to/hf_dir", dtype="bfloat16", mesh_dim="1,-1,1")
    logits = model(tokens)                       # [batch, seq] -> [batch, seq, vocab]
    logits = t5(input_ids, decoder_input_ids=d)  # encoder-decoders: [batch, dec_seq, vocab]
    model.generate([[{"role": "user", "content": "Hi"}]])
    model.save_pretrained("out_dir")             # a Hugging Face directory
    easytune.load("reward_run").score(conversations)   # reward models: a score per sequence
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

__all__ = ["load", "Model"]
__version__ = "0.1.0"

logger = logging.getLogger("easytune")

from easytune import host_memory  # noqa: E402 (before anything starts XLA's threads: see host_memory)

host_memory.configure_at_startup()


class _NoTorchNotice(logging.Filter):
    """transformers warns "PyTorch was not found. Models won't be available" on import when torch
    is absent; easytune needs only its tokenizers and configs, so the notice alarms for nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found")


logging.getLogger("transformers").addFilter(_NoTorchNotice())  # before anything imports transformers
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def _resolve(path: str | None) -> str:
    """A local directory for `path`: itself, a Hub snapshot, or the bundled SmolLM2 (None)."""
    if path is None:
        from easytune import assets
        return assets.smollm2_hf_dir()
    from easytune import checkpoint, storage
    if storage.is_remote(path):  # an easytune checkpoint is read where it is; an HF directory is downloaded
        if not storage.isdir(path):
            raise FileNotFoundError(f"model path {path!r} does not exist (or is not a directory).")
        return path if checkpoint.locate(path) is not None else storage.local_copy(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path} is a file; pass the directory holding config.json and the weights.")
    if path.count("/") == 1 and not path.startswith((".", "/")):
        from huggingface_hub import snapshot_download  # only reached for hub ids
        try:
            return snapshot_download(path, allow_patterns=HUB_PATTERNS)
        except Exception as e:
            raise FileNotFoundError(
                f"{path!r} is not a local directory and could not be fetched from the Hugging Face Hub ({e})."
            ) from None
    raise FileNotFoundError(f"model path {path!r} does not exist.")


def _tokenizer_file(name: str) -> bool:
    """The files of a tokenizer (and the configs it reads) among a run directory's top-level files."""
    return name.endswith((".json", ".txt", ".model", ".jinja", ".tiktoken")) and name not in (
        "summary.json", "easytune_config.json")


def _load_tokenizer(directory: str):
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # a checkpoint without tokenizer files is still a model
        logger.warning("no tokenizer loaded from %s (%s); text generation needs one.", directory, e)
        return None


def load(
    path: str | None = None,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    mesh_dim: str | Sequence[int] = "1,-1,1",
    remat: str = "none",
    attention: str = "xla",
    tokenizer: bool = True,
    devices=None,
    adapter: str | None = None,
    head_chunk_size: int = 0,
    layer_loop: str = "auto",
) -> "Model":
    """Load a model from an HF directory, a Hub id (when online), an easytune checkpoint (a model
    checkpoint, a training step `<run>/checkpoints/<step>`, or a run directory: its latest step),
    or, with `path=None`, the bundled SmolLM2-135M-Instruct.

    param_dtype defaults to the checkpoint's dtype; dtype (compute) defaults to param_dtype.
    attention: `xla`, `pallas`, `splash`, `cudnn` or `auto` (see `easytune.models.layers.attention`).
    Parameters are placed straight into their shards on the `mesh_dim` mesh, built over all
    devices of all processes, or over `devices` when given (e.g. one device for a reference run).
    adapter: a peft adapter directory (LoRA, DoRA, prompt, P-tuning or prefix tuning) to attach.
    A training run or step of a PEFT run loads its base model with the trained adapter attached.
    head_chunk_size > 0: the training losses run the LM head fused with its log-softmax, this many
    tokens at a time, never holding `[tokens, vocab]` logits (`easytune.models.fused_head`).
    layer_loop: `scan`, `unroll` or `auto` (unrolled on CPU, where it trains faster; a scan elsewhere,
    where compile time stays flat in depth): see `easytune.models.common.scan_layers`.
    """
    from easytune import checkpoint, hf, sharding, storage
    from easytune.dtypes import dtype_name

    directory = _resolve(path)
    mesh = sharding.make_mesh(mesh_dim, devices)
    found = checkpoint.locate(directory)
    if found is not None:
        meta, params_path, tokenizer_dir = found
        hf_config, generation_config = meta["hf_config"], meta.get("generation_config") or {}
        param_dtype = dtype_name(param_dtype or checkpoint.stored_param_dtype(meta))
        config = checkpoint.config_from_meta(meta, dtype=dtype_name(dtype or param_dtype), param_dtype=param_dtype,
                                             remat=remat, attention=attention, head_chunk_size=head_chunk_size,
                                             layer_loop=layer_loop)
        if meta.get("adapter"):  # a PEFT training run: its base model plus the trained adapter
            return _load_adapter_run(meta, params_path, tokenizer_dir, dtype=dtype, param_dtype=param_dtype,
                                     mesh_dim=mesh_dim, remat=remat, attention=attention,
                                     head_chunk_size=head_chunk_size, layer_loop=layer_loop, tokenizer=tokenizer,
                                     devices=devices)
        params = checkpoint.restore_params(params_path, config, mesh)
        directory = storage.local_files(tokenizer_dir, _tokenizer_file)
    else:
        config_path = os.path.join(directory, hf.CONFIG_FILE)
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{directory} has no {hf.CONFIG_FILE}: it is neither a Hugging Face "
                                    f"model directory nor an easytune checkpoint.")
        hf_config = hf.read_json(config_path)
        gen_path = os.path.join(directory, hf.GENERATION_CONFIG_FILE)
        generation_config = hf.read_json(gen_path) if os.path.exists(gen_path) else {}
        param_dtype = dtype_name(param_dtype or hf.checkpoint_dtype(hf_config))
        config = hf.config_from_hf(hf_config, directory, dtype=dtype_name(dtype or param_dtype),
                                   param_dtype=param_dtype, remat=remat, attention=attention,
                                   head_chunk_size=head_chunk_size, layer_loop=layer_loop)
        params = hf.load_params(directory, config, mesh)
    model = Model(config, params, _load_tokenizer(directory) if tokenizer else None, mesh,
                  hf_config, generation_config)
    model.source = path if storage.is_remote(path) else directory
    if adapter is not None:
        model.load_adapter(adapter)
    return model


def _load_adapter_run(meta, params_path, tokenizer_dir, **kwargs) -> "Model":
    import jax

    from easytune import adapters, checkpoint
    config = adapters.AdapterConfig.from_dict(meta["adapter"])
    model = load(meta.get("base_model"), **{**kwargs, "tokenizer": False})
    init = model._prepare_adapter(config)  # the adapter shapes the run trained, as add_adapter made them
    shapes = jax.eval_shape(init, model.params, jax.random.key(0))
    params = checkpoint.restore_tree(params_path, shapes, adapters.shardings_for(shapes, model.config, model.mesh))
    model.adapter = adapters.Adapter(config, params)
    if kwargs.get("tokenizer", True):
        from easytune import storage
        model.tokenizer = _load_tokenizer(storage.local_files(tokenizer_dir, _tokenizer_file))
    return model


class Model:
    """A loaded model: `.config`, `.params`, `.tokenizer`, `.mesh`; callable on token ids."""

    def __init__(self, config, params, tokenizer, mesh, hf_config: dict | None = None,
                 generation_config: dict | None = None):
        self.config, self.params, self.tokenizer, self.mesh = config, params, tokenizer, mesh
        self.hf_config = hf_config or {}
        self.generation_config = generation_config or {}
        self.adapter = None   # an easytune.adapters.Adapter, when one is attached
        self.source = None    # the directory the weights came from (recorded by adapter runs)
        self._forward = None
        self._score = None

    def replace(self, **changes) -> "Model":
        """A new handle with `changes` to any of config, params, tokenizer, mesh, hf_config,
        generation_config, adapter and source; everything else, arrays included, is shared with
        this handle, not copied. The new handle compiles its own forward and score (the config may
        have changed), and this one is left as it was."""
        fields = {"config": self.config, "params": self.params, "tokenizer": self.tokenizer, "mesh": self.mesh,
                  "hf_config": dict(self.hf_config), "generation_config": dict(self.generation_config),
                  "adapter": self.adapter, "source": self.source}
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise TypeError(f"Model.replace got {', '.join(unknown)}; it changes {', '.join(fields)}.")
        fields.update(changes)
        adapter, source = fields.pop("adapter"), fields.pop("source")
        model = Model(**fields)
        model.adapter, model.source = adapter, source
        return model

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, method: str, seed: int = 0, init_embeddings=None, **options):
        """Attach a fresh adapter (`easytune.adapters.AdapterConfig` options: rank, alpha,
        dropout, target_modules, use_rslora, num_virtual_tokens, encoder_type, ...). For
        `qlora` the base's block kernels are first replaced by NF4 (and the originals freed)."""
        import jax

        from easytune import adapters
        self._refuse_second_adapter()
        config = adapters.make_config(self.config, method, **options)
        init = self._prepare_adapter(config, init_embeddings)
        shapes = jax.eval_shape(init, self.params, jax.random.key(seed))
        with jax.set_mesh(self.mesh):
            params = jax.jit(init, out_shardings=adapters.shardings_for(shapes, self.config, self.mesh))(
                self.params, jax.random.key(seed))
        self.adapter = adapters.Adapter(config, params)
        self._forward = None
        return self.adapter

    def load_adapter(self, directory: str):
        """Attach a peft adapter directory (see `easytune.adapters.peft_format`)."""
        from easytune.adapters import peft_format
        self._refuse_second_adapter()
        self.adapter = peft_format.load(directory, self.config, self.params, self.mesh)
        self._forward = None
        return self.adapter

    def _refuse_second_adapter(self) -> None:
        if self.adapter is not None:
            raise ValueError(f"this model already has a {self.adapter.config.method} adapter; load the base "
                             f"model again to attach another.")

    def _prepare_adapter(self, config, init_embeddings=None):
        """Make the base ready for `config` (an AdapterConfig): for QLoRA its block kernels become
        NF4. Returns `init(base_params, key)` -> fresh adapter params, given the true input sizes
        (an NF4 kernel is padded, so its shape does not show them)."""
        from easytune import adapters
        if config.quantize_base:
            self.params = adapters.quantize_base(self.params, self.config, self.mesh)
        in_features = {m: adapters.in_features(self.config, m.split("/")) for m in config.modules}
        return lambda base, key: adapters.init_params(config, self.config, base, key, in_features, init_embeddings)

    def save_peft(self, directory: str, base_model: str | None = None) -> None:
        """Write the attached adapter as a peft adapter directory (adapter_config.json +
        adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads onto the HF base."""
        from easytune.adapters import peft_format
        if self.adapter is None:
            raise ValueError("this model has no adapter to save; train with --peft or call add_adapter first.")
        from easytune import storage
        with storage.writable_dir(directory, upload_from_this_process=jax_process_index() == 0) as local:
            peft_format.save(local, self.adapter, self.config, base_model or self.source)
            if self.tokenizer is not None and jax_process_index() == 0:
                self.tokenizer.save_pretrained(local)

    @property
    def forward_params(self) -> dict:
        """What the model functions take: the params with the adapter (if any) attached."""
        if self.adapter is None:
            return self.params
        from easytune import adapters
        return adapters.apply(self.params, self.adapter.params, self.adapter.config, self.config)

    def merged_params(self) -> dict:
        """Plain parameters with the adapter folded in (LoRA/DoRA; NF4 dequantized)."""
        if self.adapter is None:
            return self.params
        from easytune import adapters
        with __import__("jax").set_mesh(self.mesh):
            return adapters.merge(self.params, self.adapter, self.config)

    @property
    def family(self):
        from easytune import models
        return models.family(self.config.model_type)

    @property
    def is_encoder_decoder(self) -> bool:
        from easytune import models
        return models.is_encoder_decoder(self.config.model_type)

    def __call__(self, tokens, positions=None, segment_ids=None, *, decoder_input_ids=None,
                 decoder_positions=None, decoder_segment_ids=None, attention_mask=None,
                 decoder_attention_mask=None):
        """Logits `[batch, seq, vocab]` (float32) for token ids `[batch, seq]`.

        positions default to 0..seq-1 per row and segment_ids to ones (0 marks padding); pass both
        for left-padded or packed batches. An HF-style `attention_mask` (1 = token, 0 = padding)
        may stand in for segment_ids.

        Encoder-decoders (T5): `model(input_ids, decoder_input_ids=...)` gives the decoder's logits
        `[batch, dec_seq, vocab]`; `decoder_segment_ids` (or `decoder_attention_mask`) and
        `decoder_positions` describe the decoder side as the others do the encoder's.
        """
        import jax
        import jax.numpy as jnp

        from easytune import sharding
        if attention_mask is not None:
            if segment_ids is not None:
                raise ValueError("pass segment_ids or attention_mask, not both.")
            segment_ids = attention_mask
        if decoder_attention_mask is not None:
            if decoder_segment_ids is not None:
                raise ValueError("pass decoder_segment_ids or decoder_attention_mask, not both.")
            decoder_segment_ids = decoder_attention_mask
        decoder_args = (decoder_input_ids, decoder_positions, decoder_segment_ids)
        if not self.is_encoder_decoder and any(a is not None for a in decoder_args):
            raise ValueError(f"{self.config.model_type} is a decoder-only model; it takes no decoder_* inputs.")
        if self.is_encoder_decoder and decoder_input_ids is None:
            raise ValueError(f"{self.config.model_type} is an encoder-decoder: call it as model(input_ids, "
                             f"decoder_input_ids=...), the decoder inputs starting with decoder_start_token_id "
                             f"({self.config.decoder_start_token_id}).")
        if self._forward is None:
            self._forward = jax.jit(self.family.forward, static_argnums=0)

        def place(x, name):
            if x is None:
                return None
            x = jnp.asarray(x, jnp.int32)
            if x.ndim != 2:
                raise ValueError(f"{name} must be [batch, seq], got shape {x.shape}.")
            return jax.device_put(x, sharding.input_sharding(self.mesh, x.shape[0]))

        tokens, positions, segment_ids = (place(x, n) for x, n in ((tokens, "tokens"), (positions, "positions"),
                                                                   (segment_ids, "segment_ids")))
        with jax.set_mesh(self.mesh):
            if not self.is_encoder_decoder:
                return self._forward(self.config, self.forward_params, tokens, positions, segment_ids)
            decoder_input_ids, decoder_positions, decoder_segment_ids = (
                place(x, n) for x, n in zip(decoder_args, ("decoder_input_ids", "decoder_positions",
                                                           "decoder_segment_ids")))
            return self._forward(self.config, self.forward_params, tokens, decoder_input_ids, segment_ids,
                                 decoder_segment_ids, positions, decoder_positions)

    # ------------------------------------------------------------------ generation

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.generation_config.get("eos_token_id", self.hf_config.get("eos_token_id"))
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted(set(ids))

    @property
    def pad_token_id(self) -> int:
        for value in (self.generation_config.get("pad_token_id"), self.hf_config.get("pad_token_id"),
                      getattr(self.tokenizer, "pad_token_id", None)):
            if isinstance(value, int):
                return value
        return self.eos_token_ids[0] if self.eos_token_ids else 0

    def generate(self, prompts, sampling=None, *, seed: int = 0, return_tokens: bool = False, steer=None, **kwargs):
        """Generate for one prompt or a batch.

        prompts: a string; a conversation (list of `{"role", "content"}` dicts, formatted with the
        tokenizer's chat template); a list of token ids; or a list (or array) of any of these.
        Returns a list of decoded strings, or of token-id lists for token-id prompts or with
        `return_tokens=True`. kwargs: `max_new_tokens`, `temperature`, `top_k`, `top_p` when
        `sampling` (a `generate.SamplingConfig`) is not given. For an encoder-decoder (T5) the
        prompts are the encoder's input (text or ids, no chat template) and the result is what the
        decoder generates from `decoder_start_token_id`. steer: a `generate.Steering` logits hook
        (e.g. `easytune.algos.ilql.steering(heads, beta)` for ILQL-steered sampling).
        """
        from easytune.generate import SamplingConfig, generate_tokens
        sampling = sampling or SamplingConfig(**kwargs)
        batch, as_tokens = self._prompt_batch(prompts)
        if not as_tokens and self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of text.")
        token_prompts = batch if as_tokens else [self._encode(p) for p in batch]
        outputs = generate_tokens(self.config, self.forward_params, token_prompts, sampling,
                                  self.eos_token_ids, self.pad_token_id, seed, mesh=self.mesh, steer=steer)
        if as_tokens or return_tokens:
            return outputs
        return [self.tokenizer.decode(o, skip_special_tokens=True) for o in outputs]

    def score(self, sequences):
        """Reward-model scores (a model with a score head: a reward run, or an HF
        `*ForSequenceClassification` directory) of one sequence or a batch, read at each sequence's
        last token. A sequence is token ids, a string (tokenized as is), or a whole conversation
        with the response (rendered with the chat template, no generation prompt). Returns a float
        per sequence (a list of num_labels floats when num_labels > 1), or one value for one
        sequence."""
        import jax
        import numpy as np

        from easytune import sharding
        from easytune.algos import reward
        from easytune.generate import bucket_length, right_pad
        if not getattr(self.config, "num_labels", 0):
            raise ValueError("this model has no score head; load a reward model (a train_reward run or an HF "
                             "*ForSequenceClassification directory).")
        single = isinstance(sequences, str) or (isinstance(sequences, list) and sequences
                                                and (isinstance(sequences[0], dict)
                                                     or isinstance(sequences[0], (int, np.integer))))
        batch, as_tokens = self._prompt_batch(sequences)
        if not as_tokens and self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of text.")
        token_lists = batch if as_tokens else [self._encode_whole(s) for s in batch]
        # at least 8 tokens (not generation's 16): the row lengths scores have always compiled for
        tokens, segments = right_pad(token_lists, bucket_length(max(len(t) for t in token_lists), minimum=8))
        if self._score is None:
            self._score = jax.jit(reward.sequence_scores, static_argnums=0)
        put = lambda x: jax.device_put(x, sharding.input_sharding(self.mesh, x.shape[0]))  # noqa: E731
        with jax.set_mesh(self.mesh):
            scores = np.asarray(self._score(self.config, self.forward_params, put(tokens), None, put(segments)))
        values = scores[:, 0].tolist() if self.config.num_labels == 1 else scores.tolist()
        return values[0] if single else values

    def _encode_whole(self, sequence) -> list[int]:
        """A whole sequence to score: a conversation is rendered with its response, no generation prompt."""
        from easytune.data.templates import render_ids
        return render_ids(self.tokenizer, sequence, add_generation_prompt=False)

    @staticmethod
    def _prompt_batch(prompts) -> tuple[list, bool]:
        """`(batch, is_token_ids)` from any accepted prompt form; a clear error for the rest."""
        import numpy as np
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]  # one string or one conversation
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("generate needs a prompt: a string, a conversation, token ids, or a list of them.")
        if all(isinstance(t, (int, np.integer)) for t in prompts):
            prompts = [prompts]  # one list of token ids
        batch = [p.tolist() if isinstance(p, np.ndarray) else p for p in prompts]
        if all(isinstance(p, (list, tuple)) and p and all(isinstance(t, (int, np.integer)) for t in p) for p in batch):
            return [[int(t) for t in p] for p in batch], True
        if all(isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(m, dict) for m in p))
               for p in batch):
            return list(batch), False
        raise ValueError("each prompt must be a string, a conversation (list of role/content dicts) or a "
                         "non-empty list of token ids, all of one kind.")

    def _encode(self, prompt) -> list[int]:
        """A prompt to generate from: a conversation is rendered with the generation prompt."""
        from easytune.data.templates import render_ids
        if self.is_encoder_decoder and not isinstance(prompt, str):
            raise ValueError(f"{self.config.model_type} takes plain text (or token-id) prompts, not conversations; "
                             f"it has no chat template.")
        return render_ids(self.tokenizer, prompt, add_generation_prompt=True)

    # ------------------------------------------------------------------ export

    def save_pretrained(self, directory: str, dtype: str | None = None, max_shard_size: int = 5 * 1024**3) -> None:
        """Write a Hugging Face directory (config.json, safetensors, tokenizer with its chat template)
        that `transformers.AutoModelForCausalLM.from_pretrained` loads (`AutoModelForSeq2SeqLM` for
        T5). dtype: on-disk dtype (default: the parameters' dtype). A URL (`gs://...`) is written
        locally, then uploaded."""
        import jax

        from easytune import storage
        from easytune.dtypes import dtype_name
        out_dtype = dtype_name(dtype or self.config.param_dtype)
        with storage.writable_dir(directory, upload_from_this_process=jax.process_index() == 0) as local:
            self._save_pretrained(local, out_dtype, max_shard_size)

    def _save_pretrained(self, directory: str, out_dtype: str, max_shard_size: int) -> None:
        import json

        import jax

        from easytune import hf
        with jax.set_mesh(self.mesh):
            hf.save_params(directory, self.config, self.merged_params(), out_dtype, max_shard_bytes=max_shard_size)
        if jax.process_index() == 0:
            hf_config = hf.config_to_hf(self.config, self.hf_config, torch_dtype=out_dtype)
            with open(os.path.join(directory, hf.CONFIG_FILE), "w") as f:
                json.dump(hf_config, f, indent=2, sort_keys=True)
            if self.generation_config:
                with open(os.path.join(directory, hf.GENERATION_CONFIG_FILE), "w") as f:
                    json.dump(self.generation_config, f, indent=2, sort_keys=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(directory)

    def save(self, directory: str) -> None:
        """Write an easytune (orbax) checkpoint that `easytune.load` restores into any mesh."""
        from easytune import checkpoint
        checkpoint.save_model(directory, self.config, self.merged_params(), self.hf_config,
                              self.generation_config, self.tokenizer)


def jax_process_index() -> int:
    import jax
    return jax.process_index()
