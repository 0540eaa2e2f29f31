"""The CPU training paths of issue 21: the unrolled layer loop (`layer_loop`), weight gradients as
native bf16 dots (`layers.transposed_dot_f32`) and the output head (`layers.logits_matmul`). Each
gives what the plain path gives, and is what XLA:CPU compiles."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import easytune
from easytune.algos import sft
from easytune.models import layers

SINGLE = dict(tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from conftest import make_hf_model
    out = {}
    for name in ("llama_tied_mqa", "gemma3_local_global", "llama2"):
        directory = tmp_path_factory.mktemp(name)
        make_hf_model(name, directory)
        out[name] = str(directory)
    return out


def sft_batch(seed=0, batch=2, seq=16, vocab=128):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, vocab, (batch, seq + 1)).astype(np.int32)
    segments = np.ones((batch, seq), np.int32)
    segments[1, 10:] = 2  # two packed examples in the second row
    positions = np.tile(np.arange(seq, dtype=np.int32), (batch, 1))
    positions[1, 10:] -= 10
    return {"input_ids": jnp.asarray(tokens[:, :-1]), "target_ids": jnp.asarray(tokens[:, 1:]),
            "loss_mask": jnp.ones((batch, seq), jnp.int32), "segment_ids": jnp.asarray(segments),
            "positions": jnp.asarray(positions)}


def loss_and_grads(model, batch):
    def loss(params):
        total, count = sft.loss_sums(model.config, params, batch)
        return total / count
    return jax.jit(jax.value_and_grad(loss))(model.params)


@pytest.mark.parametrize("name,remat", [("llama_tied_mqa", "none"), ("gemma3_local_global", "none"),
                                        ("llama2", "full")])
def test_unrolled_layers_give_the_scans_loss_and_gradients(tiny_dirs, name, remat):
    """layer_loop=unroll (and auto, on this CPU) computes the scan's loss and gradients, layer kinds
    (Gemma 3's local/global layers) and remat included; the scan's lowered program has a loop, the
    unrolled one none."""
    models = {loop: easytune.load(tiny_dirs[name], **SINGLE, remat=remat, layer_loop=loop)
              for loop in ("scan", "unroll", "auto")}
    batch = sft_batch()
    loss_s, grads_s = loss_and_grads(models["scan"], batch)
    for loop in ("unroll", "auto"):
        loss_u, grads_u = loss_and_grads(models[loop], batch)
        np.testing.assert_allclose(loss_u, loss_s, rtol=1e-6)
        # the same float32 arithmetic, fused differently: rounding differences, amplified by the
        # cancellation in gradients that sum over tokens and layers (a wrong layer order or kind is O(1))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                                             atol=1e-4 * np.abs(np.asarray(b)).max()),
                     grads_u, grads_s)

    def lowered(model):
        return jax.jit(jax.grad(lambda p: sft.loss_sums(model.config, p, batch)[0])).lower(model.params).as_text()
    assert "stablehlo.while" in lowered(models["scan"])
    assert "stablehlo.while" not in lowered(models["auto"])  # auto is unroll on CPU


@pytest.mark.parametrize("flags,expected", [({}, "auto"), ({"peft": "lora"}, "scan"), ({"peft": "prompt"}, "scan"),
                                            ({"peft": "lora", "layer_loop": "unroll"}, "unroll")])
def test_auto_scans_when_only_an_adapter_trains(tiny_dirs, flags, expected):
    """A `--peft` run's `--layer_loop=auto` loads the model with a scan (unrolling spares only the
    weight-gradient buffers an adapter run does not have); full fine-tuning keeps `auto`, which
    unrolls on CPU; an explicit loop is kept."""
    from conftest import run_config

    from easytune.run import load_model
    from easytune.train_sft import DEFAULTS
    cfg = run_config(DEFAULTS, {"model": tiny_dirs["llama2"], **flags})
    assert load_model(cfg).config.layer_loop == expected


def test_layer_loop_is_checked(tiny_dirs):
    with pytest.raises(ValueError, match=r"unknown layer_loop 'unrolled'; choose one of \['auto', 'scan', 'unroll'\]"):
        easytune.load(tiny_dirs["llama2"], **SINGLE, layer_loop="unrolled")


def compiled_dots(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_bf16_weight_gradient_is_a_bf16_dot_on_cpu():
    """`transposed_dot_f32` (x.T @ dy, the weight gradient) equals the plain dot, and on CPU in bf16
    its operands stay bf16 (the plain dot with a transposed left operand is upcast to float32)."""
    x = jax.random.normal(jax.random.key(0), (64, 48), jnp.bfloat16)
    dy = jax.random.normal(jax.random.key(1), (64, 80), jnp.bfloat16)
    plain = jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    ours = layers.transposed_dot_f32(x, dy)
    assert ours.dtype == jnp.float32
    # both accumulate exact bf16 products in float32; only the summation order may differ
    np.testing.assert_allclose(np.asarray(ours), np.asarray(plain), rtol=1e-5, atol=1e-5)
    assert "f32[64,48]" not in compiled_dots(layers.transposed_dot_f32, x, dy)
    assert "f32[64,48]" in compiled_dots(
        lambda x, dy: jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32), x, dy)
    odd = layers.transposed_dot_f32(x[:63], dy[:63])  # an odd number of tokens: the plain dot
    np.testing.assert_allclose(np.asarray(odd), np.asarray(
        jax.lax.dot_general(x[:63], dy[:63], (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)),
        rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows_out", [False, True])
def test_logits_matmul_matches_einsum(rows_out):
    """The head: float32 logits and gradients of the einsum it replaces (float32); in bf16 the
    gradients are those of the float32 head within bf16 rounding, the weight's in float32."""
    h = jax.random.normal(jax.random.key(0), (2, 6, 32), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (40, 32) if rows_out else (32, 40), jnp.float32) * 0.2
    g = jax.random.normal(jax.random.key(2), (2, 6, 40), jnp.float32)
    spec = "bsh,vh->bsv" if rows_out else "bsh,hv->bsv"

    def reference(h, w):
        return jnp.sum(jnp.einsum(spec, h, w, preferred_element_type=jnp.float32) * g)

    def ours(h, w):
        return jnp.sum(layers.logits_matmul(h.astype(dtype), w, w_rows_out=rows_out) * g)

    want = jax.grad(reference, argnums=(0, 1))(h, w)
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):
        got = jax.jit(jax.grad(ours, argnums=(0, 1)))(h, w)
        assert got[1].dtype == jnp.float32  # straight from the float32 accumulator
        for a, b in zip(got, want):
            scale = np.abs(np.asarray(b)).max()
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), atol=tol * scale)


@pytest.mark.parametrize("name,chunk", [("llama_tied_mqa", 0), ("llama2", 0), ("llama_tied_mqa", 8)])
def test_bf16_training_gradients_follow_float32(tiny_dirs, name, chunk):
    """A bf16 model (float32 master weights) compiles and trains on CPU through the native-bf16
    paths (tied and untied heads, the fused head), its gradients those of float32 within bf16
    rounding, and every weight's gradient float32."""
    loss32, grads32 = loss_and_grads(easytune.load(tiny_dirs[name], **SINGLE, head_chunk_size=chunk), sft_batch())
    model = easytune.load(tiny_dirs[name], **SINGLE, dtype="bfloat16", param_dtype="float32", head_chunk_size=chunk)
    loss16, grads16 = loss_and_grads(model, sft_batch())
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
    for path, (a, b) in zip(jax.tree_util.tree_leaves_with_path(grads16), zip(jax.tree.leaves(grads16),
                                                                            jax.tree.leaves(grads32))):
        assert a.dtype == jnp.float32, path
        rel = np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(np.asarray(b)), 1e-12)
        assert rel < 0.05, (jax.tree_util.keystr(path[0]), rel)


def test_profile_script_times_the_same_work_in_both_frameworks(tiny_chat_model, capsys):
    """scripts/profile_step.py on a tiny model: both frameworks start from the same loss on the same
    tokens (the same work is timed), and every component has a time on each side and a ratio."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "profile_step.py")
    spec = importlib.util.spec_from_file_location("profile_step", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    results = script.main(["--model", tiny_chat_model, "--batch", "2", "--seq", "16", "--pairs", "1"])
    np.testing.assert_allclose(results["same_work"]["loss_easytune"], results["same_work"]["loss_pytorch"], rtol=1e-4)
    components = ["whole step", "forward + loss", "layers fwd + bwd", "head + CE fwd + bwd", "clip + AdamW"]
    assert [name for name in results if name != "same_work"] == components
    for name in components:
        row = results[name]
        assert row["easytune_ms"] > 0 and row["pytorch_ms"] > 0
        assert row["ratio"] == pytest.approx(row["pytorch_ms"] / row["easytune_ms"])
    table = capsys.readouterr().out
    assert all(name in table for name in components)


def test_causal_blocks_equal_full_causal_attention():
    """On CPU, causal self-attention of 256+ tokens runs in query blocks against the keys up to each
    block's end (`layers.causal_blocks`): the outputs and gradients of the full masked attention,
    with packed segments, a sliding window and soft-capping; the program holds the blocks' scores."""
    batch, seq, heads, kv_heads, dim = 2, 320, 4, 2, 16
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, dim))
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, dim))
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, dim))
    g = jax.random.normal(keys[3], (batch, seq, heads, dim))
    segments = np.ones((batch, seq), np.int32)
    segments[1, 100:250] = 2
    segments[1, 250:] = 0  # padding
    positions = np.tile(np.arange(seq, dtype=np.int32), (batch, 1))
    positions[1, 100:250] -= 100
    positions, segments = jnp.asarray(positions), jnp.asarray(segments)

    for window, cap in ((None, None), (48, 30.0)):
        def ours(q, k, v):
            out = layers.attention(q, k, v, q_positions=positions, q_segment_ids=segments, sliding_window=window,
                                   logit_softcap=cap)
            return jnp.sum(out * g), out

        def full(q, k, v):
            mask = layers.attention_mask(positions, segments, positions, segments, sliding_window=window)
            out = layers.xla_attention(q, k, v, mask, logit_softcap=cap)
            return jnp.sum(out * g), out

        (_, out_b), grads_b = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        (_, out_f), grads_f = jax.jit(jax.value_and_grad(full, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        np.testing.assert_allclose(np.asarray(out_b), np.asarray(out_f), atol=1e-5)
        for a, b in zip(grads_b, grads_f):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * np.abs(np.asarray(b)).max())
    lowered = jax.jit(ours).lower(q, k, v).as_text()
    assert "160x160xf32" in lowered and "320x320xf32" not in lowered  # two blocks of 160 queries


def _aliases(compiled_text):
    """`{output leaf: input leaf}` of a compiled module's `input_output_alias` (donated buffers)."""
    import re
    header = compiled_text.split("\n", 1)[0]
    return {int(out): int(arg) for out, arg in re.findall(r"\{(\d+)\}: \((\d+), \{\}", header)}


def test_train_step_updates_weights_and_optimizer_state_in_place(tiny_dirs, tmp_path):
    """The train step's donated weights and optimizer state are each updated in their own buffer:
    output leaf i (weights, then optimizer state) aliases input leaf i. JAX pairs donated inputs
    with outputs of the same shape in order, so the outputs in another order than the inputs would
    rotate the pairing (weights into mu's buffers, mu into nu's) and XLA would copy every buffer
    first; that cost scripts/profile_step.py three extra passes over the weights (issue 21)."""
    from easytune import train
    model = easytune.load(tiny_dirs["llama2"], dtype="float32", **SINGLE)
    trainer = train.Trainer(train.TrainConfig(str(tmp_path), batch_size=2), model, sft.LOSS, total_steps=10)
    batch = jax.tree.map(lambda x: np.asarray(x)[None], sft_batch())
    with jax.set_mesh(model.mesh):
        text = trainer._step.lower(trainer.params, trainer.opt_state, trainer.frozen, batch, 0).compile().as_text()
    donated = len(jax.tree.leaves(trainer.params)) + len(jax.tree.leaves(trainer.opt_state))
    sizes = [np.size(leaf) for leaf in jax.tree.leaves((trainer.params, trainer.opt_state))]
    aliases = _aliases(text)
    big = [i for i in range(donated) if sizes[i] > 1]  # the step counter may be folded
    assert big and all(aliases.get(i) == i for i in big), aliases

    # the same check on the optimizer alone tells the orders apart: profile_step.py's rotated one fails it
    import optax
    params = jax.tree.map(jnp.copy, trainer.params)
    state = trainer.optimizer.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    n_params, n_state = len(jax.tree.leaves(params)), len(jax.tree.leaves(state))
    big = [i for i, leaf in enumerate(jax.tree.leaves(params)) if np.size(leaf) > 1]

    def update(params, state, grads):
        updates, state = trainer.optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state
    in_order = _aliases(jax.jit(update, donate_argnums=(0, 1)).lower(params, state, grads).compile().as_text())
    rotated = _aliases(jax.jit(lambda grads, state, params: update(params, state, grads), donate_argnums=(1, 2))
                       .lower(grads, state, params).compile().as_text())
    assert all(in_order.get(i) == i for i in big)
    assert not all(rotated.get(i) == n_params + n_state + i for i in big)  # params' own buffers: after grads, state
