"""Real processes: a run SIGKILLed mid-way resumes to exactly the uninterrupted losses; a corrupt
newest checkpoint falls back to the previous one with a warning; 2 processes train like 1; flags."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import run_processes
from test_train_sft import logged

ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")


def train_command(model, data, output_dir, *extra):
    return [sys.executable, "-m", "easytune.train_sft", f"--model={model}", f"--train_data={data}",
            f"--output_dir={output_dir}", "--logger=none", "--seq_length=128", "--batch_size=8",
            "--optimizer.lr=1e-3", "--save_steps=2", "--keep_checkpoints=3", *extra]


def run_to_end(command, env=ENV):
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def losses(output_dir):
    return {r["step"]: r["loss"] for r in logged(output_dir)}


@pytest.fixture(scope="module")
def reference_run(tiny_chat_model, task_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run_to_end(train_command(tiny_chat_model, task_file, out, "--total_steps=12"))
    return losses(out)


def test_sigkill_mid_run_then_resume_reproduces_the_losses(tiny_chat_model, task_file, reference_run, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(train_command(tiny_chat_model, task_file, out, "--total_steps=12"), env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.isdir(out / "checkpoints" / "6") and time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 12 not in losses(out)  # it really was cut short
    run_to_end(train_command(tiny_chat_model, task_file, out, "--total_steps=12", "--resume"))
    assert losses(out) == reference_run  # every step, bit-equal


def test_sigterm_saves_at_the_step_boundary_then_resume_reproduces_the_losses(tiny_chat_model, task_file,
                                                                              reference_run, tmp_path):
    """SIGTERM (a preemptible VM's or SLURM's notice) mid-run: the run checkpoints the step it is
    on, though no save is due (--save_steps beyond the run), says so in one line and exits 143;
    --resume then reproduces the uninterrupted losses bit for bit."""
    out = tmp_path / "run"
    command = train_command(tiny_chat_model, task_file, out, "--total_steps=12", "--save_steps=100")
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while len(losses(out) if os.path.exists(out / "metrics.jsonl") else {}) < 3 and time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be stopped"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=300)[1]
    assert process.returncode == 143, stderr[-3000:]
    saved = sorted(int(p) for p in os.listdir(out / "checkpoints") if p.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < 12, saved
    assert stderr.strip().splitlines()[-1] == (
        f"easytune: stopped by a preemption signal (SIGTERM) after step {saved[0]} of 12; its checkpoint is saved "
        f"in {out}/checkpoints: run the same command with --resume to continue.")
    assert "Traceback" not in stderr
    run_to_end(command + ["--resume"])
    assert losses(out) == reference_run  # every step, bit-equal


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tiny_chat_model, task_file, reference_run, tmp_path):
    out = tmp_path / "run"
    run_to_end(train_command(tiny_chat_model, task_file, out, "--total_steps=12"))
    assert sorted(os.listdir(out / "checkpoints")) == ["10", "12", "8"]  # --keep_checkpoints=3
    params = out / "checkpoints" / "12" / "params"
    for root, _, files in os.walk(params):  # tear the newest checkpoint's array data
        for name in files:
            if root.endswith("/d") or "ocdbt" in root:
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(16)
    result = run_to_end(train_command(tiny_chat_model, task_file, out, "--total_steps=12", "--resume"))
    assert "checkpoint at step 12" in result.stderr and "trying the previous one" in result.stderr
    # one warning line, not tensorstore's late callbacks on orbax's closed event loop as tracebacks
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr, result.stderr[-3000:]
    assert len([line for line in result.stderr.splitlines() if "is unreadable" in line]) == 1
    assert "resumed from step 10" in result.stderr
    assert losses(out) == reference_run
    import easytune
    easytune.load(str(out), tokenizer=False)  # the torn step 12 was replaced by this run's own

    # resuming with settings that do not match the checkpoints is an error, not a silent restart
    result = subprocess.run(train_command(tiny_chat_model, task_file, out, "--total_steps=14", "--resume",
                                          "--optimizer.clip_grad_norm=0",
                                          "--resume_override=total_steps,optimizer.clip_grad_norm"),
                            env=ENV, capture_output=True, text=True)
    assert result.returncode != 0 and "can be restored into this run's model and optimizer" in result.stderr
    result = subprocess.run(train_command(tiny_chat_model, task_file, out, "--total_steps=14", "--resume",
                                          "--batch_size=4", "--resume_override=total_steps,batch_size"),
                            env=ENV, capture_output=True, text=True)
    assert result.returncode != 0 and "checkpoint was written with batch_size=8" in result.stderr


def test_two_processes_train_like_one(tiny_chat_model, task_file, reference_run, tmp_path):
    """Two processes of one device each (mesh 1,2,1 across them; each feeds its rows) against the
    reference: one process with two devices."""
    out = tmp_path / "two"
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    run_processes(lambda address: [train_command(tiny_chat_model, task_file, out, "--total_steps=12",
                                                 f"--jax_distributed.coordinator_address={address}",
                                                 "--jax_distributed.num_processes=2",
                                                 f"--jax_distributed.process_id={i}") for i in range(2)],
                  env, timeout=600, output_dir=tmp_path)
    two = losses(out)
    assert two.keys() == reference_run.keys()
    for step in two:
        assert abs(two[step] - reference_run[step]) <= 1e-5 * abs(reference_run[step])


def test_help_documents_every_flag_and_presets_merge(tiny_chat_model, task_file, tmp_path):
    from easytune.train_sft import DEFAULTS, DOCS
    out = subprocess.run([sys.executable, "-m", "easytune.train_sft", "--help"], env=ENV, capture_output=True,
                         text=True, timeout=120)
    for name in DOCS:
        assert f"--{name}:" in out.stdout or f"--[no]{name}:" in out.stdout, name
    preset = tmp_path / "preset.py"
    preset.write_text("def get_config():\n    return {'optimizer': {'lr': 3e-4, 'b2': 0.95}, 'seed': 7}\n")
    run_to_end(train_command(tiny_chat_model, task_file, tmp_path / "p", "--total_steps=1", f"--config={preset}",
                             "--optimizer.b2=0.9"))
    with open(tmp_path / "p" / "easytune_config.json") as f:
        saved = json.load(f)
    # command line (lr in train_command, b2 here) beats the preset, the preset beats the defaults
    assert saved["optimizer"]["lr"] == 1e-3 and saved["optimizer"]["b2"] == 0.9 and saved["seed"] == 7
    assert saved["optimizer"]["eps"] == DEFAULTS["optimizer"]["eps"]
    # the run record replays: --config=<run>/easytune_config.json with a new output_dir is the same run
    recorded = tmp_path / "p" / "easytune_config.json"
    run_to_end([sys.executable, "-m", "easytune.train_sft", f"--config={recorded}", f"--output_dir={tmp_path / 'q'}"])
    with open(tmp_path / "q" / "easytune_config.json") as f:
        replayed = json.load(f)
    assert {**replayed, "output_dir": None, "config": None} == {**saved, "output_dir": None, "config": None}
    assert losses(tmp_path / "q") == losses(tmp_path / "p")  # and computes the same (a 1-step run)
    with open(tmp_path / "q" / "summary.json") as f:
        record = json.load(f)["run"]
    assert record["command"].startswith("python -m easytune.train_sft --config=") and record["process_count"] == 1


TORN_READS = r'''
import logging, os, sys
import jax, jax.numpy as jnp
import orbax.checkpoint as ocp
from easytune import storage_errors
directory = sys.argv[1]
manager = ocp.CheckpointManager(directory, item_names=("params",))
params = {f"w{i}": jnp.full((64, 64), float(i)) for i in range(12)}
manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
manager.wait_until_finished()
manager.save(2, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
manager.wait_until_finished()
for root, _, files in os.walk(os.path.join(directory, "2", "params")):  # tear step 2's array data
    for name in files:
        if root.endswith("/d") or "ocdbt" in root:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(16)
target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()}
with storage_errors.quiet_read_failures([]):
    manager.restore(1, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
print("filter after a good read:", storage_errors._ORPHANED in logging.getLogger("asyncio").filters)
failures = []
with storage_errors.quiet_read_failures(failures):
    for _ in range(8):  # each failed read leaves dozens of callbacks for the closed loop
        try:
            manager.restore(2, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        except ValueError as error:
            failures.append(error)
print("failed reads:", len(failures))
import gc; gc.collect()
'''


def test_torn_reads_leave_no_tracebacks(tmp_path):
    """Reads of a torn checkpoint inside `quiet_read_failures` print nothing of tensorstore's
    callbacks on orbax's closed loop or asyncio's orphaned futures (both are silenced before the
    first read: they fire while the failing read unwinds), and a block whose reads all succeeded
    leaves asyncio's logging as it was."""
    script = tmp_path / "torn.py"
    script.write_text(TORN_READS)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "checkpoints")], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "filter after a good read: False" in out.stdout and "failed reads: 8" in out.stdout, out.stdout
    assert "Event loop is closed" not in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "exception was never retrieved" not in out.stderr, out.stderr[-3000:]
