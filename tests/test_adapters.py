"""PEFT: LoRA, DoRA, QLoRA (NF4), prompt tuning, P-tuning and prefix tuning against the `peft`
library on the same weights, and their training behaviour in the one loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import easytune
from easytune import adapters, models, sharding
from easytune.adapters import peft_format
from easytune.models import decoder, layers, nf4, t5

from conftest import make_hf_model

TOKENS = np.random.RandomState(0).randint(3, 128, (2, 12))


@pytest.fixture(scope="module")
def gqa_base(tmp_path_factory):
    """Tiny LLaMA-3 style model (GQA 4/2, llama3 RoPE scaling), saved as an HF directory."""
    directory = tmp_path_factory.mktemp("gqa_base")
    make_hf_model("llama3_gqa_rope_scaling", directory)
    return str(directory)


def torch_logits(model, tokens):
    import torch
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def peft_greedy(model, prompt, max_new_tokens):
    """Greedy continuation of `prompt` by `model`'s full forward, recomputed for every new token."""
    sequence = list(prompt)
    for _ in range(max_new_tokens):
        sequence.append(int(torch_logits(model, np.asarray([sequence]))[0, -1].argmax()))
    return sequence[len(prompt):]


def hf_model(directory):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


# ----------------------------------------------------------------------------- LoRA / DoRA

@pytest.mark.parametrize("variant", ["lora", "lora_rslora", "dora"])
def test_lora_and_dora_match_peft_both_ways(gqa_base, tmp_path, variant):
    import peft
    import torch
    torch.manual_seed(1)
    # init_lora_weights=False: B is random too, so the adapter changes the logits
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"] + (["lm_head"] if variant == "lora_rslora" else [])
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                             init_lora_weights=False, use_dora=variant == "dora",
                             use_rslora=variant == "lora_rslora")
    reference = peft.get_peft_model(hf_model(gqa_base), config).eval()
    if variant == "dora":
        with torch.no_grad():
            for name, param in reference.named_parameters():
                if "magnitude" in name:
                    param.mul_(1 + 0.3 * torch.rand_like(param))
    reference.save_pretrained(str(tmp_path / "theirs"))
    expected = torch_logits(reference, TOKENS)
    base_logits = torch_logits(hf_model(gqa_base), TOKENS)
    assert np.abs(expected - base_logits).max() > 1e-2  # the adapter matters

    # import: a peft adapter onto an easytune base, sharded over 8 devices
    model = easytune.load(gqa_base, adapter=str(tmp_path / "theirs"), mesh_dim="1,2,4", tokenizer=False)
    assert model.adapter.config.method == ("dora" if variant == "dora" else "lora")
    np.testing.assert_allclose(np.asarray(model(TOKENS)), expected, atol=1e-4)
    # the LoRA factors are sharded like their base kernel: A over its input, B over its output
    q = model.adapter.params["layers"]["attn"]["q"]
    assert q["lora_a"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert q["lora_b"].sharding.spec == jax.sharding.PartitionSpec(None, None, "mp")

    # export: peft loads ours onto the HF base with the same logits and the same tensors
    model.save_peft(str(tmp_path / "ours"))
    from safetensors.numpy import load_file
    theirs = load_file(str(tmp_path / "theirs" / peft_format.WEIGHTS_FILE))
    ours = load_file(str(tmp_path / "ours" / peft_format.WEIGHTS_FILE))
    # (peft also saves the base weight of an adapted output head; easytune checks it on import)
    theirs = {k: v for k, v in theirs.items() if not k.endswith("base_layer.weight")}
    assert ours.keys() == theirs.keys()
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key])
    reloaded = peft.PeftModel.from_pretrained(hf_model(gqa_base), str(tmp_path / "ours")).eval()
    np.testing.assert_allclose(torch_logits(reloaded, TOKENS), expected, atol=1e-5)

    # merged into the base: an HF export with the adapter folded in
    model.save_pretrained(str(tmp_path / "merged"))
    np.testing.assert_allclose(torch_logits(hf_model(str(tmp_path / "merged")), TOKENS), expected, atol=1e-4)


def test_lora_dropout_matches_peft_in_training_mode(gqa_base):
    """With dropout on, each of our dropout masks reproduced in torch gives peft's output: checks
    where dropout applies (the adapter input; for DoRA also the rescaled base output)."""
    import peft
    import torch
    for use_dora in (False, True):
        model = easytune.load(gqa_base, tokenizer=False, mesh_dim="1,1,1", devices=jax.devices()[:1])
        model.add_adapter("dora" if use_dora else "lora", rank=4, alpha=8, dropout=0.5, target_modules=("q_proj",))
        adapter = model.adapter
        adapter.params = jax.tree.map(lambda x: x + 0.05, adapter.params)  # B non-zero
        x = np.random.RandomState(1).randn(3, 64).astype(np.float32)
        full = adapters.apply(model.params, adapter.params, adapter.config, model.config, rng=jax.random.key(7))
        p = jax.tree.map(lambda a: a[0], full["layers"]["attn"]["q"])  # layer 0
        ours = np.asarray(layers.linear(jnp.asarray(x), p))
        keep = np.asarray(jax.random.bernoulli(p["lora_dropout_key"], 0.5, x.shape))
        reference = peft.get_peft_model(hf_model(gqa_base), peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj"], use_dora=use_dora))
        layer = reference.base_model.model.model.layers[0].self_attn.q_proj
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(torch.tensor(np.asarray(p["lora_a"]).T))
            layer.lora_B["default"].weight.copy_(torch.tensor(np.asarray(p["lora_b"]).T))
            if use_dora:
                layer.lora_magnitude_vector["default"].weight.copy_(torch.tensor(np.asarray(p["lora_magnitude"])))
        layer.train()
        layer.lora_dropout["default"] = FixedMask(torch.tensor(keep), 0.5)
        with torch.no_grad():
            expected = layer(torch.tensor(x)).numpy()
        np.testing.assert_allclose(ours, expected, atol=1e-5)


def FixedMask(keep, rate):
    """A dropout module that applies a given keep-mask (so torch and JAX drop the same units)."""
    import torch

    class Mask(torch.nn.Module):
        def forward(self, x):
            return x * keep / (1 - rate)
    return Mask()


# ----------------------------------------------------------------------------- prompt learning

def _linear_from_torch(module):
    return {"kernel": module.weight.detach().numpy().T, "bias": module.bias.detach().numpy()}


def _our_prompt_params(method, encoder_type, encoder):
    """The peft encoder's trainable weights in our layout (test plumbing for the parity check)."""
    embedding = encoder.embedding.weight.detach().numpy()
    if method == "prompt":
        return {"prompt": {"embedding": embedding}}
    if method == "prefix":
        if encoder_type == "none":
            return {"prefix_encoder": {"embedding": embedding}}
        return {"prefix_encoder": {"embedding": embedding, "transform": {
            "0": _linear_from_torch(encoder.transform[0]), "1": _linear_from_torch(encoder.transform[2])}}}
    if encoder_type == "mlp":
        return {"prompt_encoder": {"embedding": embedding, "mlp": {
            str(i): _linear_from_torch(encoder.mlp_head[j]) for i, j in enumerate((0, 2, 4))}}}
    lstm = {}
    for layer in range(2):
        for direction, suffix in (("forward", ""), ("backward", "_reverse")):
            get = lambda name: getattr(encoder.lstm_head, f"{name}_l{layer}{suffix}").detach().numpy()  # noqa: E731
            lstm[f"{layer}_{direction}"] = {"w_ih": get("weight_ih").T, "w_hh": get("weight_hh").T,
                                            "b_ih": get("bias_ih"), "b_hh": get("bias_hh")}
    return {"prompt_encoder": {"embedding": embedding, "lstm": lstm, "mlp": {
        "0": _linear_from_torch(encoder.mlp_head[0]), "1": _linear_from_torch(encoder.mlp_head[2])}}}


@pytest.mark.parametrize("method,encoder_type", [("prompt", "mlp"), ("ptuning", "mlp"), ("ptuning", "lstm"),
                                                 ("prefix", "mlp"), ("prefix", "none")])
def test_prompt_learning_matches_peft(gqa_base, tmp_path, method, encoder_type):
    import peft
    import torch
    torch.manual_seed(2)
    n = 5
    if method == "prompt":
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
    elif method == "ptuning":
        config = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, encoder_hidden_size=24,
                                          encoder_reparameterization_type=encoder_type.upper())
    else:
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, encoder_hidden_size=24,
                                         prefix_projection=encoder_type == "mlp")
    reference = peft.get_peft_model(hf_model(gqa_base), config).eval()
    expected = torch_logits(reference, TOKENS)
    if method != "prefix":  # peft returns the virtual positions' logits too
        expected = expected[:, n:]

    model = easytune.load(gqa_base, tokenizer=False, mesh_dim="1,2,4")
    model.add_adapter(method, num_virtual_tokens=n, encoder_type=encoder_type, encoder_hidden_size=24)
    ours = _our_prompt_params(method, encoder_type, reference.prompt_encoder["default"])
    assert jax.tree.structure(ours) == jax.tree.structure(model.adapter.params)
    model.adapter.params = jax.tree.map(jnp.asarray, ours)
    np.testing.assert_allclose(np.asarray(model(TOKENS)), expected, atol=1e-4)
    # with explicit positions and segment ids (as training passes them), and a right-padded row
    positions = np.broadcast_to(np.arange(TOKENS.shape[1]), TOKENS.shape)
    segments = np.ones_like(TOKENS)
    segments[1, 9:] = 0
    with_padding = np.asarray(model(TOKENS, positions, segments))
    np.testing.assert_allclose(with_padding[0], expected[0], atol=1e-4)
    np.testing.assert_allclose(with_padding[1, :9], expected[1, :9], atol=1e-4)

    # export for inference (peft keeps the encoder's output) -> peft and back
    model.save_peft(str(tmp_path / "ours"))
    reloaded = peft.PeftModel.from_pretrained(hf_model(gqa_base), str(tmp_path / "ours")).eval()
    theirs = torch_logits(reloaded, TOKENS)
    np.testing.assert_allclose(theirs if method == "prefix" else theirs[:, n:], expected, atol=1e-4)
    back = easytune.load(gqa_base, adapter=str(tmp_path / "ours"), tokenizer=False)
    np.testing.assert_allclose(np.asarray(back(TOKENS)), expected, atol=1e-4)

    # greedy generation with the virtual tokens in the KV cache equals greedy decoding by peft's own
    # forward, one full pass per token. (Not peft's `generate`: under transformers 5.24 its cached
    # path drops the prefix of prefix tuning and the virtual tokens of prompt tuning after the first
    # steps, while 5.23's agreed with this loop token for token.)
    base = hf_model(gqa_base)
    changed = False
    for prompt in (TOKENS[0, :7], TOKENS[1]):
        theirs = peft_greedy(reloaded, prompt, 6)
        ours = model.generate([prompt.tolist()], max_new_tokens=6, temperature=0.0)[0]
        assert ours == theirs
        changed |= theirs != peft_greedy(base, prompt, 6)
    assert changed  # the virtual tokens change what is generated: the comparison is not vacuous


# ----------------------------------------------------------------------------- NF4 / QLoRA

def test_nf4_round_trip_error_and_memory():
    rng = np.random.RandomState(0)
    kernel = jnp.asarray(rng.randn(3, 200, 96).astype(np.float32) * 0.02)  # input dim not a multiple of 64
    q = nf4.quantize(kernel)
    assert q["nf4_codes"].dtype == jnp.uint8 and q["nf4_codes"].shape == (3, 128, 96)
    restored = nf4.dequantize(q, 200, jnp.float32)
    # each weight is within half the widest NF4 gap of its block's absmax (plus absmax's own 8-bit error)
    blocks = np.pad(np.asarray(kernel), ((0, 0), (0, 56), (0, 0))).reshape(3, 4, 64, 96)
    absmax = np.abs(blocks).max(axis=2, keepdims=True)
    bound = (np.diff(nf4.NF4_LEVELS).max() / 2 + 0.01) * absmax
    error = np.abs(np.pad(np.asarray(restored - kernel), ((0, 0), (0, 56), (0, 0))).reshape(3, 4, 64, 96))
    assert (error <= bound + 1e-7).all()
    # values that are exactly NF4 levels times a block max come back exactly (up to the absmax code)
    assert np.corrcoef(np.asarray(restored).ravel(), np.asarray(kernel).ravel())[0, 1] > 0.99
    big = jnp.zeros((4096, 4096), jnp.bfloat16)
    ratio = nf4.nbytes(jax.eval_shape(nf4.quantize, big)) / (big.size * 2)
    assert ratio <= 0.3, ratio


def test_nf4_codes_match_bitsandbytes():
    """bitsandbytes (the QLoRA reference, which runs on CPU) picks the same NF4 level for every
    weight, and both dequantize to within their double-quantization error of each other."""
    import bitsandbytes.functional as bnb
    import torch
    kernel = np.random.RandomState(3).standard_t(5, (192, 160)).astype(np.float32) * 0.02  # heavy tails
    packed, state = bnb.quantize_4bit(torch.tensor(kernel.T.copy()), blocksize=64, quant_type="nf4",
                                      compress_statistics=True)
    flat = packed.numpy().reshape(-1)
    theirs = np.stack([flat >> 4, flat & 15], axis=-1).reshape(kernel.T.shape).T  # [in, out]
    ours = nf4.quantize(jnp.asarray(kernel))
    codes = np.asarray(ours["nf4_codes"])
    np.testing.assert_array_equal(np.stack([codes & 15, codes >> 4], axis=-2).reshape(kernel.shape), theirs)
    theirs_weights = bnb.dequantize_4bit(packed, state).numpy().T
    ours_weights = np.asarray(nf4.dequantize(ours, 192, jnp.float32))
    assert np.abs(ours_weights - theirs_weights).max() < 0.01 * np.abs(kernel).max()
    error = lambda w: np.linalg.norm(w - kernel) / np.linalg.norm(kernel)  # noqa: E731
    assert error(ours_weights) < 1.02 * error(theirs_weights)


def test_qlora_base_is_nf4_and_matches_dequantized_lora(gqa_base):
    model = easytune.load(gqa_base, tokenizer=False, mesh_dim="1,2,4")
    reference_kernel = np.asarray(model.params["layers"]["mlp"]["down"]["kernel"])
    model.add_adapter("qlora", rank=4, alpha=8)
    down = model.params["layers"]["mlp"]["down"]
    assert "kernel" not in down and down["nf4_codes"].dtype == jnp.uint8
    assert model.params["embed"]["embedding"].dtype == jnp.float32  # embeddings are not quantized
    dequantized = np.asarray(nf4.dequantize(down, 96, jnp.float32))
    # NF4 error is at most half the widest level gap (0.139) times the block maximum
    assert 0 < np.abs(dequantized - reference_kernel).max() < 0.14 * np.abs(reference_kernel).max()
    model.adapter.params = jax.tree.map(lambda x: x + 0.01, model.adapter.params)
    # the QLoRA model equals a LoRA model whose base holds the dequantized kernels
    plain = adapters.dequantize_all(model.params, model.config)
    expected = jax.jit(decoder.forward, static_argnums=0)(
        model.config, adapters.apply(plain, model.adapter.params, model.adapter.config, model.config), TOKENS)
    np.testing.assert_allclose(np.asarray(model(TOKENS)), np.asarray(expected), atol=1e-5)


# ----------------------------------------------------------------------------- sharding

SHARDING_CONFIGS = {
    "llama": decoder.DecoderConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                                   num_kv_heads=2, head_dim=16),
    "qwen2": decoder.DecoderConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                                   num_kv_heads=1, head_dim=16, qkv_bias=True, model_type="qwen2"),
    "gemma2": decoder.DecoderConfig(vocab_size=256, hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4,
                                    num_kv_heads=2, head_dim=24, norm_style="gemma", embed_scale=True,
                                    hidden_act="gelu_tanh", sandwich_norms=True, tie_word_embeddings=True,
                                    model_type="gemma2"),
    # encoder and decoder stacks of different depth, cross-attention, an untied output head
    "t5": t5.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=3, num_heads=4,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
# a leaf beside `kernel [in, out]` -> its per-layer spec from the kernel's (spec_in, spec_out)
SPEC_FROM_KERNEL = {
    "lora_a": lambda spec_in, spec_out: (spec_in, None),
    "lora_b": lambda spec_in, spec_out: (None, spec_out),
    "lora_magnitude": lambda spec_in, spec_out: (spec_out,),
    "nf4_codes": lambda spec_in, spec_out: (spec_in, spec_out),
    "nf4_absmax": lambda spec_in, spec_out: (spec_in, spec_out),
    "nf4_absmax_scale": lambda spec_in, spec_out: (spec_in, None),
}
# specs the adapter rules gave stacked leaves before they were derived from the kernel's spec
PINNED_SPECS = {
    ("llama", "lora", "1,2,4"): {"params/layers/attn/q/lora_a": P(None, "fsdp", None),
                                 "params/layers/attn/q/lora_b": P(None, None, "mp"),
                                 "opt_state/0/mu/layers/mlp/down/lora_a": P(None, "mp", None),
                                 "opt_state/0/mu/layers/mlp/down/lora_b": P(None, None, "fsdp")},
    ("llama", "dora", "1,2,4"): {"opt_state/0/mu/layers/attn/o/lora_magnitude": P(None, "fsdp")},
    ("qwen2", "qlora", "1,1,8"): {"params/layers/attn/k/nf4_codes": P(None, "fsdp", "mp"),
                                  "params/layers/attn/k/lora_b": P(None, None, "mp"),
                                  "params/lm_head/lora_b": P(None, "mp")},
    ("t5", "qlora", "1,8,1"): {"params/decoder/layers/cross_attn/q/nf4_codes": P(None, "fsdp", "mp"),
                               "params/decoder/layers/cross_attn/q/nf4_absmax": P(None, None, "mp"),
                               "params/decoder/layers/cross_attn/q/nf4_absmax_scale": P(None, None, None),
                               "params/decoder/layers/cross_attn/q/nf4_absmax_offset": P(None, None, None)},
}


def _adapted_shapes(model_config, method):
    """Shapes of the model's parameters with a `method` adapter on every linear (NF4 block kernels
    for qlora), and of the adapter's optimizer moments."""
    base = models.family(model_config.model_type).param_shapes(model_config)
    targets = ("all-linear", "lm_head") if "lm_head" in base else ("all-linear",)
    config = adapters.make_config(model_config, method, rank=4, target_modules=targets)
    if config.quantize_base:
        for module in adapters.linear_modules(model_config):
            if module.stacked:
                parent, p = adapters._get(base, module.path[:-1]), adapters._get(base, module.path)
                parent[module.path[-1]] = {**{k: v for k, v in p.items() if k != "kernel"},
                                           **jax.eval_shape(nf4.quantize, p["kernel"])}
    in_features = {m: adapters.in_features(model_config, m.split("/")) for m in config.modules}
    adapter = jax.eval_shape(lambda b: adapters.init_params(config, model_config, b, jax.random.key(0), in_features),
                             base)
    params = jax.eval_shape(lambda b, a: adapters.apply(b, a, config, model_config, rng=jax.random.key(1)),
                            base, adapter)
    return {"params": params, "opt_state": {"0": {"mu": adapter}}}


def _fitted(spec, shape, mesh):
    """`spec` of one layer's tensor on a `shape` array: stacked leading axes unsharded, and a dim a
    mesh axis does not divide left unsharded."""
    spec = (None,) * (len(shape) - len(spec)) + tuple(spec)
    return P(*(axis if axis is None or dim % mesh.shape[axis] == 0 else None for dim, axis in zip(shape, spec)))


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
@pytest.mark.parametrize("name", list(SHARDING_CONFIGS))
def test_adapter_leaves_are_sharded_like_their_base_kernel(name, method):
    """Every LoRA/DoRA/NF4 leaf (and its optimizer moment) gets the spec derived from the one the
    family's rules give its sibling kernel; every other leaf keeps the family's own spec."""
    model_config = SHARDING_CONFIGS[name]
    family_rules = models.family(model_config.model_type).SHARDING_RULES
    shapes = _adapted_shapes(model_config, method)
    named = [(sharding.path_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]]
    keys = {path.rpartition("/")[2] for path, _ in named}
    assert ("lora_magnitude" in keys) == (method == "dora") and ("nf4_codes" in keys) == (method == "qlora")
    for mesh_dim in ("1,2,4", "1,8,1", "2,2,2", "1,1,8"):
        mesh = sharding.make_mesh(mesh_dim)
        specs = sharding.tree_specs(shapes, adapters.rules_for(model_config), mesh)
        got = {sharding.path_name(path): spec for path, spec in jax.tree_util.tree_flatten_with_path(
            specs, is_leaf=lambda x: isinstance(x, P))[0]}
        derived = stacked = sharded = 0
        for path, leaf in named:
            parent, _, key = path.rpartition("/")
            if key in SPEC_FROM_KERNEL:
                spec_in, spec_out = sharding.spec_for(f"{parent}/kernel", (1, 1), family_rules)  # one layer's
                expected = _fitted(SPEC_FROM_KERNEL[key](spec_in, spec_out), leaf.shape, mesh)
                derived += 1
                stacked += len(leaf.shape) > len(SPEC_FROM_KERNEL[key](None, None))
                sharded += any(axis is not None for axis in expected)
            else:
                expected = sharding.spec_for(path, leaf.shape, family_rules, mesh)
            assert got[path] == expected, (mesh_dim, path, leaf.shape)
        assert derived and stacked and sharded  # stacked adapter leaves were checked, some of them sharded
        for path, spec in PINNED_SPECS.get((name, method, mesh_dim), {}).items():
            assert got[path] == spec, (mesh_dim, path)


# ----------------------------------------------------------------------------- bad input

def test_bad_adapter_input_gets_clear_errors(gqa_base, hf_models, tmp_path):
    import peft
    model = easytune.load(gqa_base, tokenizer=False)
    with pytest.raises(ValueError, match="'qproj' matches no linear module .* q_proj"):
        model.add_adapter("lora", target_modules=("qproj",))
    with pytest.raises(ValueError, match="LoRA rank must be a positive integer, got 0"):
        model.add_adapter("lora", rank=0)
    with pytest.raises(ValueError, match="unknown --peft method 'lorra'"):
        model.add_adapter("lorra")
    with pytest.raises(ValueError, match="selects only some layers"):
        model.add_adapter("lora", target_modules=(r"re:model\.layers\.0\.self_attn\.q_proj",))
    # an adapter made for another base: hidden 64 -> 48
    other = tmp_path / "other_base"
    make_hf_model("llama2", other, hidden_size=48)
    peft.get_peft_model(hf_model(str(other)), peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path / "other_adapter"))
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \(4, 48\) but this base model needs \(4, 64\)"):
        model.load_adapter(str(tmp_path / "other_adapter"))
    with pytest.raises(FileNotFoundError, match="not a peft adapter directory"):
        model.load_adapter(str(tmp_path))
