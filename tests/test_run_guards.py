"""The run driver's guards: a diverged run stops (one sentence, non-zero exit) with nothing saved or
exported from its diverged state; a run owns its directory (a second writer is refused, a stale
lock is taken over); a refused rerun or resume leaves the old run byte-identical, and --resume
with changed settings needs --resume_override; user errors are one sentence without a traceback;
--help exits 0; summary.json is strict JSON."""
import json
import os
import re
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


def test_scaled_leaves_train_at_their_own_learning_rate_under_the_joint_clip():
    """make_optimizer's `scaled` (PPO's shared value head at --value_lr): the selected leaves
    follow AdamW at `factor x lr` on the same warmup + cosine schedule, weight decay included;
    the others are untouched by it; and one global-norm clip covers both."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from easytune import train
    opt = train.OptimizerConfig(lr=1e-3, warmup_steps=2, weight_decay=0.1, clip_grad_norm=0.0)
    keys = jax.random.split(jax.random.key(0), 6)
    params = {"model": {"w": {"kernel": jax.random.normal(keys[0], (4, 3))}},
              "heads": {"v": {"kernel": jax.random.normal(keys[1], (3, 2)), "bias": jnp.ones((2,))}}}
    grads = [jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape), params) for k in keys[2:]]

    def train_steps(optimizer, tree, grad_trees):
        state = optimizer.init(tree)
        for g in grad_trees:
            updates, state = optimizer.update(g, state, tree)
            tree = jax.tree.map(lambda p, u: p + u, tree, updates)
        return tree

    heads = lambda name: name.startswith("heads/")  # noqa: E731
    scaled, _ = train.make_optimizer(opt, 10, scaled=(heads, 7.0))
    got = train_steps(scaled, params, grads)
    plain, _ = train.make_optimizer(opt, 10)
    fast, _ = train.make_optimizer(train.dataclasses.replace(opt, lr=7e-3), 10)
    want_model = train_steps(plain, params["model"], [g["model"] for g in grads])
    want_heads = train_steps(fast, params["heads"], [g["heads"] for g in grads])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got["model"], want_model)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got["heads"], want_heads)
    assert not np.allclose(got["heads"]["v"]["kernel"], train_steps(plain, params, grads)["heads"]["v"]["kernel"])
    # clipping: one norm over every leaf, then the heads' updates scaled (no decay: the updates do not
    # depend on the weights, so the heads' total move is 7x the plain optimizer's on the same tree)
    clipped = train.dataclasses.replace(opt, clip_grad_norm=0.5, weight_decay=0.0)
    varied = [jax.tree.map(lambda x, f=f: f * x, g) for g, f in zip(grads, (10.0, 0.1, 1.0, 3.0))]
    zeros = jax.tree.map(jnp.zeros_like, params)  # from 0 the result is the sum of the updates, exactly rounded
    moved = lambda optimizer: train_steps(optimizer, zeros, varied)  # noqa: E731
    one_scaled = moved(train.make_optimizer(clipped, 10, scaled=(heads, 7.0))[0])
    one_plain = moved(train.make_optimizer(clipped, 10)[0])
    np.testing.assert_allclose(one_scaled["model"]["w"]["kernel"], one_plain["model"]["w"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(one_scaled["heads"]["v"]["kernel"], 7.0 * one_plain["heads"]["v"]["kernel"],
                               rtol=1e-6)


def test_resume_compares_the_flags_as_the_recipe_completed_them(tmp_path):
    """RL's default job fills in --reward_fn; the saved config holds the filled value, so a resume
    of that job must be compared after the recipe's own validation, not refused for it."""
    from easytune.rl.recipe import RECIPE
    from easytune.train_ppo import DEFAULTS as RL_DEFAULTS
    saved = run_config(RL_DEFAULTS, {"output_dir": str(tmp_path), "logger": "none"})
    driver.complete(RECIPE, saved)
    assert saved.reward_fn == "easytune.rewards:exact_match" and saved.optimizer.lr == 1e-4
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


# ----------------------------------------------------------------------------- non-finite steps skipped

def _sft_rows(model, task_file, seq_length=64):
    from easytune import data
    template = data.resolve_chat_template(model.tokenizer, None)
    examples, _ = data.tokenize_records(data.load_records(task_file), model.tokenizer, template, seq_length, task_file)
    return data.make_rows(examples, seq_length, pack=True)


def test_skip_nonfinite_steps_skips_a_bad_batch_and_changes_nothing_else(tiny_chat_model, task_file, tmp_path):
    """With --skip_nonfinite_steps, a batch whose gradients are NaN leaves weights and optimizer
    state untouched: [clean, NaN, clean] ends where [clean, clean] without the option does."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import easytune
    from easytune import recipe, train
    from easytune.algos.sft import LOSS

    def poisonable(model_config, params, batch, reference=None):  # NaN gradients where batch["poison"] is 1
        clean = {k: v for k, v in batch.items() if k != "poison"}
        loss_sum, count = LOSS(model_config, params, clean, reference)
        return loss_sum * jnp.where(jnp.max(batch["poison"]) > 0, jnp.nan, 1.0), count

    loss = recipe.Loss(poisonable, LOSS.unit)
    rows = _sft_rows(easytune.load(tiny_chat_model), task_file)

    def batch(start, poison):
        host = {k: v[start:start + 8] for k, v in rows.items()}
        host["poison"] = np.full(host["input_ids"].shape, poison, np.float32)
        return host

    def trainer(directory, skip):
        config = train.TrainConfig(output_dir=str(directory), batch_size=8, skip_nonfinite_steps=skip,
                                   optimizer=train.OptimizerConfig(lr=1e-3, warmup_steps=0, warmup_ratio=0.0))
        return train.Trainer(config, easytune.load(tiny_chat_model), loss, total_steps=10)

    def step(t, host):
        with jax.set_mesh(t.mesh):
            return {k: float(v) for k, v in jax.device_get(t.train_step(train.global_batch(t.mesh, host, 1))).items()}

    skipping, plain = trainer(tmp_path / "a", skip=2), trainer(tmp_path / "b", skip=0)
    first = step(skipping, batch(0, 0))
    assert first["nonfinite_streak"] == 0 and np.isfinite(first["loss"])
    after_first = jax.tree.map(np.asarray, jax.device_get(skipping.params))
    bad = step(skipping, batch(8, 1))
    assert np.isnan(bad["loss"]) and np.isnan(bad["grad_norm"])
    assert bad["nonfinite_streak"] == 1 and bad["nonfinite_skipped"] == 1
    jax.tree.map(np.testing.assert_array_equal, after_first, jax.device_get(skipping.params))  # untouched
    good = step(skipping, batch(8, 0))
    assert good["nonfinite_streak"] == 0 and good["nonfinite_skipped"] == 1 and np.isfinite(good["loss"])
    step(plain, batch(0, 0))
    step(plain, batch(8, 0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.device_get(plain.params), jax.device_get(skipping.params))


def test_the_divergence_guard_tolerates_only_skipped_steps(tiny_chat_model, task_file, tmp_path):
    from ml_collections import ConfigDict
    cfg = ConfigDict({"skip_nonfinite_steps": 2, "optimizer": {"lr": 1e-3}})
    nan = float("nan")
    driver.check_finite({"loss": nan, "grad_norm": nan, "nonfinite_streak": 2.0}, 5, 3, cfg)  # skipped: rides on
    with pytest.raises(driver.Diverged, match="more than --skip_nonfinite_steps=2 steps in a row"):
        driver.check_finite({"loss": nan, "grad_norm": nan, "nonfinite_streak": 3.0}, 6, 3, cfg)
    with pytest.raises(driver.Diverged, match="or ride out rare bad batches with --skip_nonfinite_steps=N"):
        driver.check_finite({"loss": nan, "grad_norm": nan}, 6, 3, ConfigDict({"optimizer": {"lr": 1e-3}}))
    # a run whose weights blew up is stopped although it skips (its steps stay non-finite): from the
    # command line, one sentence and exit status 3
    result = subprocess.run([sys.executable, "-m", "easytune.train_sft", f"--model={tiny_chat_model}",
                             f"--train_data={task_file}", f"--output_dir={tmp_path / 'run'}", "--logger=none",
                             "--seq_length=64", "--batch_size=8", "--total_steps=12", "--skip_nonfinite_steps=2",
                             "--optimizer.lr=1e9"], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("easytune: error: training diverged:") and \
        "more than --skip_nonfinite_steps=2 steps in a row" in last, last
    assert not (tmp_path / "run" / "summary.json").exists()


# ----------------------------------------------------------------------------- data before the model

def test_data_is_checked_before_the_model_loads_and_nothing_is_written(tmp_path):
    """The model path does not exist: the data's error comes first, so it was checked before the
    load; line numbers are the file's (blank lines counted)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('\n\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"bad.jsonl line 4: the conversation has no assistant message"):
        run(make_cfg("/nonexistent/model", str(bad), out))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"--train_data=.*empty.jsonl holds no records"):
        run(make_cfg("/nonexistent/model", str(empty), out))
    from easytune.train_dpo import DEFAULTS as DPO_DEFAULTS, run as run_dpo
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl line 2: .*rejected"):
        run_dpo(run_config(DPO_DEFAULTS, {"model": "/nonexistent/model", "train_data": str(pairs),
                                          "output_dir": str(out), "logger": "none"}))
    assert not out.exists()


# ----------------------------------------------------------------------------- learning rate per method

def test_the_learning_rate_default_is_the_methods(tmp_path):
    from easytune.algos.dpo import RECIPE as DPO
    from easytune.algos.sft import RECIPE as SFT
    from easytune.rl.recipe import RECIPE as RL
    from easytune.train_dpo import DEFAULTS as DPO_DEFAULTS
    from easytune.train_ppo import DEFAULTS as RL_DEFAULTS

    def resolved(recipe, defaults, **overrides):
        cfg = run_config(defaults, {"output_dir": str(tmp_path), **overrides})
        driver.complete(recipe, cfg)
        return cfg.optimizer.lr

    assert DEFAULTS["optimizer"]["lr"] == 0  # "the method's default", filled in before the run starts
    assert [resolved(SFT, DEFAULTS, peft=p) for p in ("none", "lora", "qlora", "dora", "prompt", "prefix",
                                                      "ptuning")] == [1e-4, 1e-3, 1e-3, 1e-3, 3e-2, 3e-2, 3e-2]
    assert resolved(SFT, DEFAULTS, peft="lora", **{"optimizer.lr": 2e-5}) == 2e-5  # a given one is kept
    assert resolved(DPO, DPO_DEFAULTS) == 5e-4 and resolved(DPO, DPO_DEFAULTS, peft="none") == 5e-6
    assert resolved(RL, RL_DEFAULTS) == 1e-4 and resolved(RL, RL_DEFAULTS, peft="none") == 1e-5
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    assert resolved(SFT, DEFAULTS, peft_adapter=str(adapter)) == 3e-2  # a continued adapter's method
    help_ = subprocess.run([sys.executable, "-m", "easytune.train_sft", "--help"], env=ENV, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert "0 = the default for the method: all weights 0.0001, LoRA/QLoRA/DoRA 0.001" in " ".join(
        help_.stdout.split())


# ----------------------------------------------------------------------------- library noise

NO_TORCH = """
import importlib.abc, importlib.util, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoTorch())
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] == "torch" else find_spec(name, *a, **k)
"""


def test_no_torch_notice_from_transformers():
    """Without torch, transformers warns that models "won't be available"; easytune needs none of
    them and imports transformers quietly. The same import without easytune's filter does warn."""
    quiet = subprocess.run([sys.executable, "-c", NO_TORCH + "import easytune, transformers, easytune.data"],
                           env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "PyTorch was not found" not in quiet.stderr
    loud = subprocess.run([sys.executable, "-c", NO_TORCH + "import transformers"], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert "PyTorch was not found" in loud.stderr  # the check above can see the notice


# ----------------------------------------------------------------------------- a full disk

def test_a_full_disk_is_one_sentence_and_the_last_checkpoint_survives(tiny_chat_model, task_file, tmp_path):
    """A 50 MB tmpfs (a private mount namespace, so no root is needed where user namespaces are
    allowed) holds one checkpoint of the tiny model (~35 MB) but not two."""
    import shutil
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare to mount a small tmpfs")
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c",
                            f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private namespace here: {probe.stderr.strip()}")
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    command = " ".join([sys.executable, "-m", "easytune.train_sft", f"--model={tiny_chat_model}",
                        f"--train_data={task_file}", f"--output_dir={disk}/run", "--logger=none", "--seq_length=128",
                        "--batch_size=8", "--save_steps=2", "--keep_checkpoints=3", "--total_steps=6"])
    script = (f"mount -t tmpfs -o size=50m tmpfs {disk} && {{ {command} 2> {tmp_path}/stderr; "
              f"echo $? > {tmp_path}/rc; cp -a {disk}/run {kept}; }}")
    subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script], env=ENV, cwd=REPO, timeout=600)
    stderr = (tmp_path / "stderr").read_text()
    assert (tmp_path / "rc").read_text().strip() == "2", stderr[-3000:]
    assert "Traceback" not in stderr and "Event loop is closed" not in stderr and "RESOURCE_EXHAUSTED" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("easytune: error:")]
    others = [line for line in stderr.splitlines() if line.strip() and not line.startswith(("easytune: error:", "I"))
              and not line.lstrip().startswith(("train:", "tokenizing:"))]  # info lines and progress bars aside
    # (tokenizing's bar shows when no earlier test cached this data's tokens: order-dependent)
    assert len(errors) == 1 and not others, stderr
    assert re.match(rf"easytune: error: no space left on device writing the checkpoint of step 4 to {disk}/run/"
                    r"checkpoints: it takes about \d+ MB and [\d.]+ MB are free; .* the partial write was removed "
                    r"and the checkpoint of step 2 is intact, so rerun with --resume", errors[0]), errors[0]
    assert sorted(os.listdir(kept / "checkpoints")) == ["2"]  # no temporary directory left
    import easytune
    easytune.load(str(kept), tokenizer=False)  # the last good checkpoint restores


def test_resource_errors_are_one_sentence():
    import errno

    import jax
    full = OSError(errno.ENOSPC, "No space left on device", "/data/run/metrics.jsonl")
    assert driver.user_error_message(full).startswith("no space left on device writing /data/run/metrics.jsonl;")
    assert "read-only filesystem" in driver.user_error_message(OSError(errno.EROFS, "Read-only", "/ro/x"))
    assert driver.user_error_message(MemoryError()).startswith("out of host memory; lower --batch_size")
    oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB.")
    assert driver.user_error_message(oom).startswith("out of accelerator memory (RESOURCE_EXHAUSTED: Out of memory")
    assert driver.user_error_message(ImportError("Install gcsfs to access Google Storage")) == (
        "a cloud URL needs its filesystem package (Install gcsfs to access Google Storage); for gs:// run pip install "
        "'easytune[gcs]'.")
    assert driver.user_error_message(ImportError("No module named 'foo'")) is None  # a bug, not a missing extra
    assert driver.user_error_message(RuntimeError("a bug")) is None  # not a user's error: its traceback


# ----------------------------------------------------------------------------- --push_to_hub

def test_push_to_hub_needs_a_token_and_a_failed_upload_keeps_the_export(tiny_chat_model, task_file, tmp_path):
    """Without a token the run is refused before the model loads. With one, the run trains,
    exports, writes its summary, then calls the Hub API (here an address where nothing listens,
    since the Hub cannot be reached from this machine): the failure is one sentence that names the
    repository and says how to push the intact export later."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    env = {k: v for k, v in ENV.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{closed_port}")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "easytune.train_sft", f"--model={tiny_chat_model}", f"--train_data={task_file}",
               f"--output_dir={out}", "--logger=none", "--seq_length=64", "--batch_size=8", "--total_steps=2",
               "--push_to_hub=someone/tiny-sft"]
    refused = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        "easytune: error: --push_to_hub=someone/tiny-sft needs a Hugging Face token with write access: set HF_TOKEN "
        "or run `hf auth login` first.")
    assert not (out / "checkpoints").exists()  # refused before training
    failed = subprocess.run(command, env=dict(env, HF_TOKEN="hf_" + "x" * 34), cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert failed.returncode == 2, failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"easytune: error: pushing {out}/hf to the Hub repository someone/tiny-sft failed ("), last
    assert last.endswith(f"the export is intact: push it later with `hf upload someone/tiny-sft {out}/hf`."), last
    assert "Traceback" not in failed.stderr
    assert (out / "hf" / "model.safetensors").is_file() and (out / "hf" / "README.md").is_file()
    assert json.loads((out / "summary.json").read_text())["export_hf"] == str(out / "hf")
