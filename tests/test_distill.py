"""Knowledge distillation (`easytune.algos.distill`, `python -m easytune.train_distill`): the loss
against TRL's GKD loss on identical logits, a tiny run whose student moves towards its teacher, and
a teacher of another vocabulary refused in one sentence."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import logged, make_chat_model, run_config


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_loss_matches_trl_generalized_jsd(beta, monkeypatch):
    """Our summed divergence over trained tokens / their count equals TRL 1.16's
    `GKDTrainer.generalized_jsd_loss(..., labels, beta, temperature, reduction="batchmean")`
    (trl/experimental/gkd/gkd_trainer.py: the sum over positions where labels != -100 divided by
    their count), on the same logits, with masked positions and temperature != 1."""
    import torch
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    from easytune import models
    from easytune.algos import distill

    rng = np.random.default_rng(0)
    batch, seq, vocab, temperature = 2, 5, 11, 0.7
    student_logits = (3 * rng.standard_normal((batch, seq, vocab))).astype(np.float32)
    teacher_logits = (3 * rng.standard_normal((batch, seq, vocab))).astype(np.float32)
    mask = np.array([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], np.int32)
    targets = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    labels = np.where(mask == 1, targets, -100)

    expected = GKDTrainer.generalized_jsd_loss(torch.tensor(student_logits), torch.tensor(teacher_logits),
                                               labels=torch.tensor(labels), beta=beta, temperature=temperature,
                                               reduction="batchmean").item()

    # the Loss as the Trainer calls it, with a stand-in family that returns the given logits
    class Config:
        def __init__(self, model_type):
            self.model_type = model_type

    logits = {"student": student_logits, "teacher": teacher_logits}
    family = type("Fixed", (), {"forward": staticmethod(lambda config, params, *inputs: jnp.asarray(
        logits[config.model_type]))})
    monkeypatch.setattr(models, "family", lambda name: family)
    loss = distill.make_loss(distill.DistillConfig(beta=beta, temperature=temperature), Config("teacher"))
    batch_rows = {"input_ids": targets, "positions": np.zeros_like(targets), "segment_ids": np.ones_like(targets),
                  "target_ids": targets, "loss_mask": mask}
    loss_sum, count, extras = loss(Config("student"), {}, batch_rows, {})
    assert loss.needs_reference
    assert float(count) == mask.sum()
    np.testing.assert_allclose(float(loss_sum) / float(count), expected, rtol=1e-5, atol=1e-6)
    # and the per-token divergence itself, unmasked (TRL's reduction="none")
    per_token = GKDTrainer.generalized_jsd_loss(torch.tensor(student_logits), torch.tensor(teacher_logits),
                                                beta=beta, temperature=temperature, reduction="none").sum(-1)
    np.testing.assert_allclose(np.asarray(distill.generalized_jsd(student_logits, teacher_logits, beta, temperature)),
                               per_token.numpy(), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def teacher_model(tmp_path_factory):
    """A tiny chat model with the student's tokenizer but another shape (so other weights)."""
    return make_chat_model(tmp_path_factory.mktemp("teacher"), hidden_size=96, intermediate_size=160,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)


def distill_config(student, teacher, train_data, output_dir, **overrides):
    from easytune import train_distill
    return run_config(train_distill.DEFAULTS, {
        "model": student, "teacher": teacher, "train_data": train_data, "output_dir": str(output_dir),
        "mesh_dim": "1,-1,1", "batch_size": 8, "seq_length": 64, "total_steps": 8, "log_steps": 1,
        "export_hf": False, "optimizer.lr": 3e-3, "optimizer.warmup_steps": 0, "optimizer.schedule": "constant",
        "beta": 0.5, "temperature": 1.0, **overrides})


def test_distill_run_moves_student_towards_teacher(tiny_chat_model, teacher_model, task_file, tmp_path):
    """A short run: the student's divergence to the teacher falls, and the train state holds the
    teacher only as a frozen input (no student copy, no optimizer state for it)."""
    import jax

    import easytune
    from easytune import train_distill

    summary = train_distill.run(distill_config(tiny_chat_model, teacher_model, task_file, tmp_path / "run"))
    records = [r for r in logged(str(tmp_path / "run")) if "loss" in r]
    losses = [r["loss"] for r in records]
    assert len(losses) == 8 and all("student_ce" in r for r in records)
    assert losses[0] > 0
    assert np.mean(losses[-2:]) < 0.5 * np.mean(losses[:2]), losses
    nbytes = lambda params: sum(x.nbytes for x in jax.tree.leaves(params))  # noqa: E731
    state = summary["train_state_bytes"]
    assert state["frozen"] == nbytes(easytune.load(teacher_model).params)  # the teacher, and nothing else
    assert state["optimizer"] < 2 * nbytes(easytune.load(tiny_chat_model).params) + 1024  # the student's moments
    with open(os.path.join(str(tmp_path / "run"), "easytune_config.json")) as f:
        assert json.load(f)["teacher"] == teacher_model


def test_teacher_with_another_vocabulary_is_one_sentence(tiny_chat_model, char_chat_model, task_file, tmp_path):
    from easytune import train_distill

    cfg = distill_config(tiny_chat_model, char_chat_model, task_file, tmp_path / "run")
    with pytest.raises(ValueError) as error:
        train_distill.run(cfg)
    message = str(error.value)
    assert "must share one tokenizer and vocabulary" in message
    assert "(vocabulary 52)" in message and "(vocabulary 49152)" in message
    assert message.count(". ") == 0 and "\n" not in message


def test_distill_into_a_lora_student(tiny_chat_model, teacher_model, task_file, tmp_path):
    """With an adapter the frozen input holds the student's base and the teacher; only the adapter
    trains, and its divergence falls."""
    from easytune import train_distill

    cfg = distill_config(tiny_chat_model, teacher_model, task_file, tmp_path / "run", peft="lora", total_steps=4,
                         **{"optimizer.lr": 1e-2})
    summary = train_distill.run(cfg)
    losses = [r["loss"] for r in logged(str(tmp_path / "run")) if "loss" in r]
    assert summary["peft"] == "lora" and summary["trainable_params"] < 100_000
    state = summary["train_state_bytes"]
    assert state["frozen"] > 2 * state["params"]  # base + teacher beside the adapter
    assert losses[-1] < losses[0], losses


def test_last_turn_prompt_is_the_generation_prompt_of_the_last_assistant_turn(tiny_chat_model):
    """An on-policy sample continues the conversation where its last assistant turn starts: the
    prompt taken from a row equals the chat template's rendering of the turns before it with the
    generation prompt."""
    import easytune
    from easytune import data
    from easytune.algos import distill
    model = easytune.load(tiny_chat_model)
    messages = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "and 3 + 3?"}, {"role": "assistant", "content": "6"}]
    template = model.tokenizer.chat_template
    rows = data.make_rows([data.tokenize_conversation(messages, model.tokenizer, template)], 64, pack=False)
    expected = data.render_ids(model.tokenizer, messages[:-1], add_generation_prompt=True, chat_template=template)
    assert distill.last_turn_prompt(rows["input_ids"][0], rows["loss_mask"][0]) == expected
    assert distill.last_turn_prompt(rows["input_ids"][0], np.zeros_like(rows["loss_mask"][0])) is None


def test_on_policy_steps_train_on_the_students_samples(tiny_chat_model, teacher_model, task_file, tmp_path):
    """--lmbda=0.5: each step flips TRL's coin (seeded by step); on an on-policy step the trained
    tokens are exactly the student's sampled completions (their count = the samples' lengths), on
    the others the data's."""
    from easytune import train_distill
    cfg = distill_config(tiny_chat_model, teacher_model, task_file, tmp_path / "run", lmbda=0.5, max_new_tokens=12,
                         seq_length=128, total_steps=4)  # rows with room for prompt + sample
    train_distill.run(cfg)
    records = [r for r in logged(str(tmp_path / "run")) if "loss" in r]
    coins = [np.random.default_rng([cfg.seed, step]).random() <= 0.5 for step in range(4)]
    assert [r["on_policy"] for r in records] == [float(c) for c in coins]
    assert 0 < sum(coins) < 4
    for record in records:
        if record["on_policy"]:  # every row replaced by a sample of at most 12 tokens
            assert 1 <= record["sampled_tokens"] <= 12
            assert record["trained_tokens"] == 8 * record["sampled_tokens"]
        else:
            assert "sampled_tokens" not in record
