"""The run driver's guards: a diverged run stops (one sentence, non-zero exit) with nothing saved or
exported from its diverged state; a run owns its directory (a second writer is refused, a stale
lock is taken over); a refused rerun or resume leaves the old run byte-identical, and --resume
with changed settings needs --resume_override; user errors are one sentence without a traceback;
--help exits 0; summary.json is strict JSON."""
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import logged, run_config

from easytune import run as driver
from easytune.train_sft import DEFAULTS, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")


def make_cfg(model, train_data, output_dir, **overrides):
    return run_config(DEFAULTS, {"model": model, "train_data": train_data, "output_dir": str(output_dir),
                                 "logger": "none", "seq_length": 64, "batch_size": 8, "total_steps": 3,
                                 **overrides})


def snapshot(directory) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def test_a_diverged_run_stops_and_saves_nothing_from_its_diverged_state(tiny_chat_model, task_file, tmp_path):
    import re
    out = tmp_path / "run"
    with pytest.raises(driver.Diverged, match=r"training diverged: (loss|grad_norm) is nan at step") as excinfo:
        run(make_cfg(tiny_chat_model, task_file, out, total_steps=8, save_steps=1, **{"optimizer.lr": 1e9}))
    step, finite = map(int, re.search(r"at step (\d+) \(finite at step (\d+)\)", str(excinfo.value)).groups())
    assert 1 < step < 8 and finite == step - 1
    assert "Lower --optimizer.lr (now 1e+09)" in str(excinfo.value)
    # checkpoints and logged records stop at the last finite step; no export, no summary
    assert sorted(int(s) for s in os.listdir(out / "checkpoints")) == list(range(1, step))[-2:]  # keep 2
    assert [h["step"] for h in logged(out)] == list(range(1, step))
    assert not (out / "hf").exists() and not (out / "summary.json").exists()
    assert not (out / ".easytune.lock").exists()  # released on the way out


def test_a_run_owns_its_directory(tiny_chat_model, task_file, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "easytune.train_sft", f"--model={tiny_chat_model}", f"--train_data={task_file}",
               f"--output_dir={out}", "--logger=none", "--seq_length=64", "--total_steps=2"]
    first = subprocess.Popen(command, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / ".easytune.lock").exists() and time.time() < deadline:
        assert first.poll() is None, first.stderr.read()[-2000:]
        time.sleep(0.05)
    owner = json.loads((out / ".easytune.lock").read_text())
    assert owner["pid"] == first.pid
    with pytest.raises(ValueError, match=rf"is in use by another run \(host .*, pid {first.pid}, since"):
        run(make_cfg(tiny_chat_model, task_file, out))
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]  # the first run was not disturbed
    assert not (out / ".easytune.lock").exists()

    # a lock left behind by a run that died on this host is taken over
    stale = tmp_path / "stale"
    stale.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (stale / ".easytune.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": gone.pid, "started": "x"}))
    assert run(make_cfg(tiny_chat_model, task_file, stale, total_steps=1))["total_steps"] == 1


def test_refused_reruns_leave_the_run_byte_identical(tiny_chat_model, task_file, tmp_path):
    out = tmp_path / "run"
    run(make_cfg(tiny_chat_model, task_file, out, total_steps=2, save_steps=1))
    before = snapshot(out)
    with pytest.raises(ValueError, match="already holds checkpoints .* pass --resume"):
        run(make_cfg(tiny_chat_model, task_file, out, total_steps=3))
    assert snapshot(out) == before
    with pytest.raises(ValueError, match=r"different settings \(--optimizer.lr=0.0001 -> 0.001, --total_steps=2 -> "
                                         r"3\).*--resume_override=optimizer.lr,total_steps"):
        run(make_cfg(tiny_chat_model, task_file, out, total_steps=3, resume=True, **{"optimizer.lr": 1e-3}))
    assert snapshot(out) == before
    # what may change on resume (mesh, logging, cadence) is not refused; named overrides proceed
    summary = run(make_cfg(tiny_chat_model, task_file, out, total_steps=3, resume=True, log_steps=2,
                           mesh_dim="2,-1,1", resume_override="total_steps"))
    assert summary["total_steps"] == 3 and [h["step"] for h in logged(out)] == [1, 2, 3]
    json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"summary holds {c}"))


def test_strict_json_has_no_nan():
    assert driver.strict_json({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"}) == {"a": None,
                                                                                            "b": [1.0, None], "c": "x"}


def test_user_errors_are_one_sentence_and_help_exits_zero(tmp_path):
    result = subprocess.run([sys.executable, "-m", "easytune.train_sft", "--model=/nonexistent/model",
                             f"--output_dir={tmp_path / 'out'}"], env=ENV, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "easytune: error: model path '/nonexistent/model' does not exist."
    debug = subprocess.run([sys.executable, "-m", "easytune.train_sft", "--model=/nonexistent/model", "--debug",
                            f"--output_dir={tmp_path / 'out2'}"], env=ENV, cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    help_ = subprocess.run([sys.executable, "-m", "easytune.train_dpo", "--help"], env=ENV, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert help_.returncode == 0 and "--resume_override" in help_.stdout


def test_warmup_spends_no_step_at_learning_rate_zero():
    from easytune import train
    schedule = train.make_schedule(train.OptimizerConfig(lr=1.0, warmup_steps=3, schedule="constant"), 10)
    assert [float(schedule(i)) for i in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_resume_compares_the_flags_as_the_recipe_completed_them(tmp_path):
    """RL's default job fills in --reward_fn; the saved config holds the filled value, so a resume
    of that job must be compared after the recipe's own validation, not refused for it."""
    from easytune.rl.recipe import RECIPE
    from easytune.train_ppo import DEFAULTS as RL_DEFAULTS
    saved = run_config(RL_DEFAULTS, {"output_dir": str(tmp_path), "logger": "none"})
    RECIPE.validate(saved)
    assert saved.reward_fn == "easytune.rewards:exact_match"
    (tmp_path / "config.json").write_text(json.dumps(saved.to_dict()))
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)
    resumed = run_config(RL_DEFAULTS, {"output_dir": str(tmp_path), "logger": "none", "resume": True})
    is_main, lock = driver.start(RECIPE, resumed)
    assert is_main and lock.held
    lock.release()
    changed = run_config(RL_DEFAULTS, {"output_dir": str(tmp_path), "logger": "none", "resume": True,
                                       "iterations": 40})
    with pytest.raises(ValueError, match=r"different settings \(--iterations=20 -> 40\)"):
        driver.start(RECIPE, changed)
