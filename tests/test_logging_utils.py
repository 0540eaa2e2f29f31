"""easytune.logging_utils: metrics.jsonl across a resume, TensorBoard scalars read back with
TensorBoard's own reader, wandb wiring, process-0-only writing, the progress bar, and FLOP counts."""
import io
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easytune import logging_utils
from easytune.logging_utils import MetricsLogger, ProgressBar
from easytune.models import decoder


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_jsonl_appends_across_a_resume(tmp_path):
    with MetricsLogger(str(tmp_path), logger="none") as logger:
        logger.log(1, {"loss": jnp.float32(2.5), "learning_rate": np.float64(1e-4)})
        logger.log(2, {"loss": 2.25, "grad_norm": jnp.array([0.5])})
        # Nothing buffered: another reader sees both lines before close().
        assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2
    with MetricsLogger(str(tmp_path), logger="none") as resumed:
        resumed.log(3, {"loss": 2.0, "diverged": float("nan")})
    with open(tmp_path / "metrics.jsonl") as f:
        lines = f.read().splitlines()
    assert [json.loads(line, parse_constant=pytest.fail) for line in lines] == [
        {"step": 1, "loss": 2.5, "learning_rate": pytest.approx(1e-4)},
        {"step": 2, "loss": 2.25, "grad_norm": 0.5},
        {"step": 3, "loss": 2.0, "diverged": None},
    ]
    assert not os.path.exists(tmp_path / "tensorboard")


def test_tensorboard_scalars_read_back(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    logger = MetricsLogger(str(tmp_path), logger="tensorboard")
    for step, loss in [(10, 3.0), (20, 2.0), (30, 1.5)]:
        logger.log(step, {"loss": jnp.float32(loss), "tokens_per_second": 1000.0 * step})
    logger.close()
    accumulator = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert set(accumulator.Tags()["scalars"]) == {"loss", "tokens_per_second"}
    assert [(e.step, e.value) for e in accumulator.Scalars("loss")] == [(10, 3.0), (20, 2.0), (30, 1.5)]
    assert [e.value for e in accumulator.Scalars("tokens_per_second")] == [10000.0, 20000.0, 30000.0]
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 3


def test_wandb_missing_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ImportError, match="pip install wandb or use --logger=tensorboard"):
        MetricsLogger(str(tmp_path), logger="wandb")


def test_wandb_and_tensorboard_at_once_configured_by_flags_or_variables(tmp_path, monkeypatch):
    """The real wandb, offline: project, entity, name, tags and group from the arguments (the
    --wandb.* flags), or from WANDB_* variables where those are empty; TensorBoard at the same
    time; a resumed run (same directory) continues the same wandb run id."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME", "WANDB_TAGS", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(name, raising=False)
    first = tmp_path / "flags"
    logger = MetricsLogger(str(first), logger="tensorboard,wandb", config={"lr": 1e-4}, project="p1", entity="team",
                           run_name="r1", tags="sft, smollm2", group="g1")
    run = logger._wandb
    assert (run.project, run.entity, run.name, tuple(run.tags), run.group) == ("p1", "team", "r1", ("sft", "smollm2"),
                                                                               "g1")
    assert run.config["lr"] == 1e-4
    logger.log(1, {"loss": np.float32(1.0)})
    run_id = run.id
    logger.close()
    assert any((first / "tensorboard").iterdir())  # both loggers wrote
    resumed = MetricsLogger(str(first), logger="wandb", project="p1")
    assert resumed._wandb.id == run_id
    resumed.close()

    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_NAME", "env-name")
    monkeypatch.setenv("WANDB_TAGS", "a,b")
    logger = MetricsLogger(str(tmp_path / "env"), logger="wandb")
    run = logger._wandb
    assert (run.project, run.name, tuple(run.tags)) == ("from-env", "env-name", ("a", "b"))
    logger.close()
    monkeypatch.delenv("WANDB_PROJECT")
    logger = MetricsLogger(str(tmp_path / "default"), logger="wandb")
    assert logger._wandb.project == "easytune"  # neither flag nor variable
    logger.close()


def test_unknown_logger_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="logger must be one of"):
        MetricsLogger(str(tmp_path), logger="mlflow")
    with pytest.raises(ValueError, match="tensorboard and wandb may be combined"):
        MetricsLogger(str(tmp_path), logger="none,wandb")


def test_only_process_zero_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    logger = MetricsLogger(str(tmp_path / "run"), logger="tensorboard")
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not os.path.exists(tmp_path / "run")
    bar = ProgressBar(total=10)
    bar.update(3, {"loss": 1.0})
    bar.close()
    assert capsys.readouterr().err == ""


def test_progress_bar_shows_step_and_metrics(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    bar = ProgressBar(total=100, initial=40, desc="sft")
    bar.update(50, {"loss": 1.23456, "learning_rate": 3e-4, "tokens_per_second": 12345.0, "mfu": 0.4213,
                    "grad_norm": 9.0})
    bar.close()
    text = stream.getvalue()
    assert "sft" in text and "50/100" in text
    assert "loss=1.2346" in text and "lr=3.00e-04" in text and "tok/s=12,345" in text and "MFU=42.1%" in text


def test_peak_flops_and_mfu():
    assert logging_utils.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert logging_utils.peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert logging_utils.peak_flops_per_device("NVIDIA H200") == 989e12
    assert logging_utils.peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert logging_utils.peak_flops_per_device("TPU v4") == 275e12
    assert logging_utils.peak_flops_per_device("TPU v5 lite") == 197e12
    assert logging_utils.peak_flops_per_device("TPU v5") == 459e12
    assert logging_utils.peak_flops_per_device("TPU v6 lite") == 918e12
    assert logging_utils.peak_flops_per_device("cpu") is None
    assert logging_utils.peak_flops_per_device() is None  # the tests run on CPU
    assert logging_utils.mfu(1000.0, 6e9, 4 * 275e12) == pytest.approx(1000 * 6e9 / 1.1e15)
    assert logging_utils.mfu(1000.0, 6e9, None) is None
    measured = logging_utils.measured_peak_flops("float32", size=256, repeats=2)
    assert 1e8 < measured < 1e14  # this CPU: some GFLOP/s, nowhere near an accelerator


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_decoder_flops_per_token(tie_word_embeddings):
    config = decoder.DecoderConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3,
                               num_heads=4, num_kv_heads=2, head_dim=16,
                               tie_word_embeddings=tie_word_embeddings, attention_bias=True)
    # N: every matmul kernel the model holds, plus the (possibly tied) LM head; no embedding lookup,
    # norms or biases.
    shapes = decoder.param_shapes(config)
    kernels = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
               if path[-1].key == "kernel"]
    matmul_params = sum(int(np.prod(leaf.shape)) for leaf in kernels)
    if tie_word_embeddings:
        matmul_params += 64 * 128
    assert matmul_params == 3 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96) + 64 * 128
    expected = 6 * matmul_params + 12 * 3 * 64 * 512 / 2  # causal: half the score and value products
    assert decoder.flops_per_token(config, seq_length=512) == expected
