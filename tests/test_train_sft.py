"""The SFT entry point and the one training loop, on a tiny LLaMA with the real SmolLM2 tokenizer."""
import json
import os

import numpy as np
import pytest
from conftest import logged, run_config

import jax

import easytune
from easytune import data, train
from easytune.algos import sft
from easytune.train_sft import DEFAULTS, run


def make_cfg(model, train_data, output_dir, **overrides):
    return run_config(DEFAULTS, {"model": model, "train_data": train_data, "output_dir": str(output_dir),
                                 "logger": "none", "seq_length": 64, "batch_size": 8, "total_steps": 4, "log_steps": 1,
                                 "optimizer.lr": 1e-3, **overrides})


def test_logged_step_time_waits_for_the_step(tiny_chat_model, task_file, tmp_path):
    """step_seconds (and so tokens/s and MFU) times the steps themselves, not their asynchronous
    dispatch: logged every step, the step times add up to the loop's time after the first step."""
    summary = run(make_cfg(tiny_chat_model, task_file, tmp_path / "out", total_steps=6))
    records = logged(tmp_path / "out")
    after_first = summary["train_seconds"] - records[0]["first_step_seconds"]
    assert sum(r["step_seconds"] for r in records[1:]) > 0.5 * after_first, (records, summary)


def test_run_logs_trains_checkpoints_and_exports(tiny_chat_model, task_file, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    cfg = make_cfg(tiny_chat_model, task_file, tmp_path / "out", total_steps=6, log_steps=2, eval_steps=3,
                   export_hf=str(tmp_path / "hf"), eval_data=task_file)
    summary = run(cfg)
    records = logged(tmp_path / "out")
    assert [r["step"] for r in records] == [2, 3, 4, 6]  # every log step, plus eval steps of their own
    assert {"loss", "learning_rate", "tokens_per_second", "grad_norm"} <= records[0].keys()
    # MFU on CPU too: against a matmul timed at start-up (a tiny model is far from it)
    assert all(0 < r["mfu"] < 0.5 for r in records), records
    assert [("eval_loss" in r) for r in records] == [False, True, False, True]
    assert "eval_perplexity" in records[1] and summary["eval_loss"] == records[-1]["eval_loss"]
    schedule = train.make_schedule(cfg.optimizer, 6)
    assert [r["learning_rate"] for r in records] == pytest.approx([float(schedule(s - 1)) for s in (2, 3, 4, 6)])
    assert records[-1]["loss"] < records[0]["loss"]
    assert summary["last_loss"] == records[-1]["loss"]
    # the run record and the export's model card
    record = summary["run"]
    assert record["versions"]["jax"] == jax.__version__ and record["process_count"] == 1
    assert record["mesh"] == {"dp": 1, "fsdp": 8, "mp": 1} and record["devices"]["count"] == 8
    assert record["base_model"] == tiny_chat_model
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card.startswith(f"---\nbase_model: {tiny_chat_model}\nlibrary_name: transformers\ntags:\n- easytune\n- sft")
    assert f"- {json.dumps(task_file)}" in card and f"| eval_loss | {summary['eval_loss']:.6g} |" in card
    assert "| `optimizer.lr` | `0.001` |" in card and f"- jax: {jax.__version__}" in card
    with pytest.raises(ValueError, match="already holds checkpoints .* pass --resume"):
        run(cfg)  # a new run into a used directory would mix two runs' checkpoints
    # the export loads in transformers and matches the trained parameters
    trained = easytune.load(str(tmp_path / "out"), tokenizer=False)  # a run directory: its latest step
    tokens = np.random.RandomState(0).randint(0, 49152, (8, 16))
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(trained(tokens), exported(torch.tensor(tokens)).logits.numpy(), atol=1e-4)
    # any step exports later with the CLI, to the same weights
    from easytune import export_hf
    export_hf.main(["--checkpoint", str(tmp_path / "out" / "checkpoints" / "6"), "--output_dir", str(tmp_path / "hf6")])
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf6"), dtype=torch.float32)
    for key, value in exported.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_the_training_chat_template_is_saved_exported_and_used(tiny_chat_model, task_file, tmp_path, monkeypatch):
    """--chat_template=chatml tokenizes the data and then is the template of the run's tokenizer and
    of the HF export, as transformers loads them, so generate (the prompt tokens it decodes from)
    and score render conversations as training did, not with SmolLM2's own template (which adds a
    default system prompt)."""
    from transformers import AutoTokenizer

    from easytune import generate as generate_lib
    from easytune.algos import reward as reward_lib
    run(make_cfg(tiny_chat_model, task_file, tmp_path / "out", total_steps=1, chat_template="chatml",
                 export_hf=str(tmp_path / "hf")))
    question = [{"role": "user", "content": "What is 2 + 2?"}]
    chatml_prompt = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    own = AutoTokenizer.from_pretrained(tiny_chat_model)
    assert own.apply_chat_template(question, tokenize=False, add_generation_prompt=True) != chatml_prompt
    prompts = []
    monkeypatch.setattr(generate_lib, "generate_tokens", lambda config, params, token_prompts, *args, **kwargs:
                        prompts.extend(token_prompts) or [[] for _ in token_prompts])
    for directory in (tmp_path / "out", tmp_path / "hf"):  # the run (e.g. an RL policy) and the export
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        rendered = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
        assert rendered == chatml_prompt, directory
        easytune.load(str(directory)).generate(question)
        assert prompts.pop() == tokenizer(chatml_prompt, add_special_tokens=False)["input_ids"], directory

    scorer = easytune.load(str(tmp_path / "hf"))
    scorer = reward_lib.with_score_head(scorer, seed=3)
    answered = question + [{"role": "assistant", "content": "4"}]
    chatml_ids = own(chatml_prompt + "4<|im_end|>\n", add_special_tokens=False)["input_ids"]
    own_ids = own.apply_chat_template(answered, tokenize=True, return_dict=True)["input_ids"]
    assert scorer.score(own_ids) != scorer.score(chatml_ids)
    assert scorer.score(answered) == scorer.score(chatml_ids)


def trainer_losses(model, steps, rows, **cfg_overrides):
    cfg = make_cfg(None, None, "/tmp/unused", **cfg_overrides)
    trainer = train.Trainer(train.TrainConfig.from_flags(cfg), model, sft.LOSS, total_steps=steps)
    iterator = data.BatchIterator(rows, cfg.batch_size, seed=0)
    losses = []
    with jax.set_mesh(trainer.mesh):
        for _ in range(steps):
            metrics = trainer.train_step(train.global_batch(trainer.mesh, next(iterator), cfg.grad_accum_steps))
            losses.append(float(metrics["loss"]))
    return losses, trainer.params


@pytest.fixture(scope="module")
def task_rows(tiny_chat_model):
    tokenizer = easytune.load(tiny_chat_model).tokenizer
    records = data.make_task_records(64, seed=2)
    examples, _ = data.tokenize_records(records, tokenizer, tokenizer.chat_template, 128, "tasks")
    return examples, data.make_rows(examples, 128, pack=True)


F32_EPS = float(np.finfo(np.float32).eps)


def trainer_trajectory(model, steps, rows, **cfg_overrides):
    """(losses, [params after step 1, ..., after step `steps`] on the host) from the Trainer's own step."""
    cfg = make_cfg(None, None, "/tmp/unused", **cfg_overrides)
    trainer = train.Trainer(train.TrainConfig.from_flags(cfg), model, sft.LOSS, total_steps=steps)
    iterator = data.BatchIterator(rows, cfg.batch_size, seed=0)
    losses, params = [], []
    with jax.set_mesh(trainer.mesh):
        for _ in range(steps):
            metrics = trainer.train_step(train.global_batch(trainer.mesh, next(iterator), cfg.grad_accum_steps))
            losses.append(float(metrics["loss"]))
            params.append(jax.tree.map(np.array, trainer.params))  # a copy: the next step donates them
    return losses, params


def first_step_gradients(model, rows, batch_size=8):
    """The clipped gradient of the Trainer's first step (mean loss over the first batch, sharded over
    the model's mesh as the Trainer shards it), per parameter."""
    batch = train.global_batch(model.mesh, next(iter(data.BatchIterator(rows, batch_size, seed=0))), 1)
    batch = jax.tree.map(lambda x: x[0], batch)

    def mean_loss(params, batch):
        total, count = sft.loss_sums(model.config, params, batch)
        return total / count
    with jax.set_mesh(model.mesh):
        grads = jax.tree.map(np.asarray, jax.jit(jax.grad(mean_loss))(model.params, batch))
    norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads)))
    clip = make_cfg(None, None, "/tmp/unused").optimizer.clip_grad_norm
    return jax.tree.map(lambda g: g * min(1.0, clip / norm), grads)


def reduction_error(grad: np.ndarray, tokens: int) -> float:
    """How much one gradient tensor may change when its sum over `tokens` tokens is taken in another
    order (devices, accumulation steps): pairwise summation's bound log2(n) * eps_f32 * sum|terms|,
    with the tensor's largest gradient standing in for sum|terms| (not known here), so an estimate,
    not a proof: where per-token terms cancel it could be exceeded. Observed: at most 0.4x of it."""
    return float(np.log2(tokens) * F32_EPS * np.abs(grad).max())


def assert_same_training(trajectory_a, trajectory_b, grads, tokens):
    """Two runs that differ only in float32 reduction order reach the same parameters, to bounds
    from the arithmetic of AdamW (eps = 1e-8, no weight decay) rather than one atol:

    - After step 1, from identical parameters: u = g / (|g| + eps), so a gradient change of at most
      delta (`reduction_error`) moves u by at most delta * eps / (|g| - delta + eps)^2 and the
      parameter by lr_1 times that, plus float32 rounding in each run (about 8 roundings of eps/2 in
      computing lr * u, one in p + lr * u). Tight where |g| >> eps,
      loose only near |g| ~ eps, where u amplifies the order-dependent last bits of g by up to 1/eps:
      on 2,2,2 vs 1,1,1 one mlp.up element has g = 3.14e-8 vs 3.02e-8 and ends step 3 1.04e-5 apart.
    - Later steps start from parameters that already differ, and the difference feeds back through
      the forward; the only bound the arithmetic gives there is Adam's own: |m_hat / sqrt(v_hat)|
      <= 1.05 for t <= 3 (b1 = 0.9, b2 = 0.999), so an element can differ by 2.1 * lr_t more per step.
      The per-step losses (compared separately, rtol 1e-5) are what checks those steps closely.
    """
    cfg = make_cfg(None, None, "/tmp/unused")
    steps = len(trajectory_a)
    schedule = train.make_schedule(cfg.optimizer, steps)
    lrs = [float(schedule(s)) for s in range(steps)]
    for step, (params_a, params_b) in enumerate(zip(trajectory_a, trajectory_b)):
        for a, b, g in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), jax.tree.leaves(grads)):
            delta = reduction_error(g, tokens)
            smallest = np.maximum(np.abs(g) - delta, 0.0)
            bound = lrs[0] * np.minimum(2.0, delta * cfg.optimizer.eps / (smallest + cfg.optimizer.eps) ** 2)
            bound = bound + 2 * (step + 1) * F32_EPS * (np.abs(a) + 4 * lrs[0]) + 2.1 * sum(lrs[1:step + 1])
            np.testing.assert_array_less(np.abs(a - b), bound, err_msg=f"after step {step + 1}")


def test_sharded_training_matches_unsharded(tiny_chat_model, task_rows):
    _, rows = task_rows
    tokens = 8 * rows["input_ids"].shape[1]
    single = easytune.load(tiny_chat_model, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")
    sharded = easytune.load(tiny_chat_model, tokenizer=False, mesh_dim="2,2,2")
    grads, sharded_grads = first_step_gradients(single, rows), first_step_gradients(sharded, rows)
    for g1, g8 in zip(jax.tree.leaves(grads), jax.tree.leaves(sharded_grads)):
        np.testing.assert_allclose(g8, g1, rtol=0, atol=reduction_error(g1, tokens))
    losses_1, params_1 = trainer_trajectory(single, 3, rows)
    losses_8, params_8 = trainer_trajectory(sharded, 3, rows)
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
    assert_same_training(params_8, params_1, grads, tokens)


def test_gradient_accumulation_matches_one_big_batch(tiny_chat_model, task_rows):
    _, rows = task_rows
    load = lambda: easytune.load(tiny_chat_model, tokenizer=False, mesh_dim="1,4,2")  # noqa: E731
    grads = first_step_gradients(load(), rows)
    losses_1, params_1 = trainer_trajectory(load(), 3, rows, grad_accum_steps=1)
    losses_2, params_2 = trainer_trajectory(load(), 3, rows, batch_size=8, grad_accum_steps=2)
    np.testing.assert_allclose(losses_2, losses_1, rtol=1e-5)
    assert_same_training(params_2, params_1, grads, 8 * rows["input_ids"].shape[1])


def test_packed_and_unpacked_batches_give_the_same_per_example_losses(tiny_chat_model, task_rows):
    examples, packed = task_rows
    model = easytune.load(tiny_chat_model, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")
    unpacked = data.make_rows(examples, 128, pack=False)
    assert len(packed["input_ids"]) < len(unpacked["input_ids"])  # packing really packed

    def losses_by_example(rows):
        """{tuple(example tokens): mean loss} from every segment of every row."""
        per_segment = np.asarray(jax.jit(sft.per_segment_losses, static_argnums=(0, 3))(
            model.config, model.params, {k: jax.numpy.asarray(v) for k, v in rows.items()}, 8))
        out = {}
        for r in range(len(rows["input_ids"])):
            for s in range(1, rows["segment_ids"][r].max() + 1):
                key = tuple(rows["input_ids"][r][rows["segment_ids"][r] == s])
                out[key] = per_segment[r, s - 1]
        return out

    a, b = losses_by_example(packed), losses_by_example(unpacked)
    assert a.keys() == b.keys() and len(a) == len(examples)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5)


def test_sum_reduction_is_token_sum_over_accumulation_steps(tiny_chat_model, task_rows):
    _, rows = task_rows
    load = lambda: easytune.load(tiny_chat_model, tokenizer=False, devices=jax.devices()[:1], mesh_dim="1,1,1")  # noqa: E731
    model = load()
    batch = {k: jax.numpy.asarray(v[:8]) for k, v in rows.items()}
    total, tokens = sft.loss_sums(model.config, model.params, batch)
    # (training donates and replaces the model's parameters: each run gets a fresh load)
    losses, _ = trainer_losses(load(), 1, {k: v[:8] for k, v in rows.items()}, loss_reduction="sum", grad_accum_steps=2)
    np.testing.assert_allclose(losses[0], float(total) / 2, rtol=1e-5)
    losses, _ = trainer_losses(load(), 1, {k: v[:8] for k, v in rows.items()}, loss_reduction="mean")
    np.testing.assert_allclose(losses[0], float(total) / float(tokens), rtol=1e-5)


@pytest.mark.parametrize("content,message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [oops\n',
     r"train.jsonl line 2: not valid JSON"),
    # missing field: names the record's line (blank lines counted) and what it has
    ('\n{"question": "hi"}\n', r"train.jsonl line 2: unrecognized record with fields \['question'\]"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "yo"}]}\n', r"robot"),
    ("", r"train.jsonl holds no records"),
])
def test_bad_data_is_one_clear_error(tiny_chat_model, tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        run(make_cfg(tiny_chat_model, str(path), tmp_path / "out"))


def test_samples_truncated_to_nothing_are_counted_and_skipped(tiny_chat_model, task_file, tmp_path):
    path = tmp_path / "train.jsonl"
    long = json.dumps({"messages": [{"role": "user", "content": "word " * 200},
                                    {"role": "assistant", "content": "ok"}]})
    with open(task_file) as f:
        path.write_text(long + "\n" + f.read() + long + "\n")
    summary = run(make_cfg(tiny_chat_model, str(path), tmp_path / "out", total_steps=1, seq_length=128))
    assert summary["train_samples"] == 98 and summary["train_samples_dropped"] == 2


def test_every_sample_over_long_is_an_error(tiny_chat_model, tmp_path):
    path = tmp_path / "train.jsonl"
    long_prompt = "word " * 200
    path.write_text(json.dumps({"messages": [{"role": "user", "content": long_prompt},
                                             {"role": "assistant", "content": "ok"}]}) + "\n")
    with pytest.raises(ValueError, match="no trainable tokens after truncation to seq_length=64"):
        run(make_cfg(tiny_chat_model, str(path), tmp_path / "out"))


def test_default_job_reports_heldout_accuracy_and_exports(tmp_path):
    """The no-flag job's path (bundled SmolLM2, generated tasks), shrunk to two steps."""
    cfg = make_cfg(None, None, tmp_path / "out", total_steps=2, seq_length=128)
    cfg.tasks.num_train, cfg.tasks.num_heldout, cfg.tasks.max_new_tokens = 32, 8, 8
    summary = run(cfg)
    for key in ("heldout_accuracy_before", "heldout_accuracy_after"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["export_hf"] == str(tmp_path / "out" / "hf")
    with open(tmp_path / "out" / "hf" / "config.json") as f:
        assert json.load(f)["num_hidden_layers"] == 30
    assert os.path.exists(tmp_path / "out" / "hf" / "tokenizer.json")


def test_bf16_compute_trains_fp32_master_weights(tiny_chat_model, task_rows):
    _, rows = task_rows
    load = lambda dtype: easytune.load(tiny_chat_model, tokenizer=False, mesh_dim="1,8,1", dtype=dtype,  # noqa: E731
                                       param_dtype="float32")
    losses_32, _ = trainer_losses(load("float32"), 2, rows)
    losses_16, params_16 = trainer_losses(load("bfloat16"), 2, rows)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params_16))
    np.testing.assert_allclose(losses_16, losses_32, rtol=2e-2)
    assert losses_16 != losses_32  # the compute really ran in bf16
