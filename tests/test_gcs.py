"""Runs whose every path is a `gs://` URL, against a real GCS JSON API: the `gcp-storage-emulator`
server (`tests/gcs_emulator.py`: with the generation headers GCS sends) started here on 127.0.0.1,
reached by gcsfs (etils.epath) through STORAGE_EMULATOR_HOST and by orbax's tensorstore through
TENSORSTORE_GCS_HTTP_URL. Training data read from the bucket, checkpoints and run files written
there, a SIGKILLed run resumed from it to the uninterrupted losses, an HF export to the bucket that
transformers loads after download, a 2-process job's one sharded checkpoint restored on other
meshes, and a bucket that does not exist refused in one sentence before anything compiles."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from test_train_resume import ENV, run_to_end, train_command
from test_train_resume import reference_run  # noqa: F401 (the module fixture, run here too)

BUCKET = "easytune-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's address; this process and the runs it starts reach it through the variables."""
    port = _free_port()
    data = tmp_path_factory.mktemp("gcs_data")
    wrapper = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator.py")  # one header added
    server = subprocess.Popen([sys.executable, wrapper, "-d", str(data), "start",
                               "--host", "127.0.0.1", "--port", str(port), "--default-bucket", BUCKET],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "the GCS emulator did not start"
            time.sleep(0.1)
    address = f"http://127.0.0.1:{port}"
    variables = {"STORAGE_EMULATOR_HOST": address, "TENSORSTORE_GCS_HTTP_URL": address,
                 "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "EASYTUNE_CACHE": str(data) + "-cache"}
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    yield variables
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.terminate()
    server.wait(timeout=30)


def remote_losses(url):
    from easytune import storage
    return {r["step"]: r["loss"] for r in map(json.loads, storage.read_text(f"{url}/metrics.jsonl").splitlines())}


def test_sigkill_then_resume_from_the_bucket_and_export_there(gcs, tiny_chat_model, task_file,
                                                              reference_run, tmp_path):  # noqa: F811
    from easytune import storage
    env = dict(ENV, **{**gcs, "EASYTUNE_CACHE": str(tmp_path / "cache")})
    data_url = f"gs://{BUCKET}/data/train.jsonl"
    storage.upload(str(task_file), data_url)
    run = f"gs://{BUCKET}/runs/killed"
    command = train_command(tiny_chat_model, data_url, run, "--total_steps=12", "--logger=tensorboard")
    # an earlier run's file left in this host's mirror of the URL is not uploaded into the new run
    saved_cache = os.environ["EASYTUNE_CACHE"]
    os.environ["EASYTUNE_CACHE"] = env["EASYTUNE_CACHE"]
    try:
        os.makedirs(storage.run_files(run))
        with open(os.path.join(storage.run_files(run), "wandb_run_id"), "w") as f:
            f.write("stale")
    finally:
        os.environ["EASYTUNE_CACHE"] = saved_cache
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not storage.isdir(f"{run}/checkpoints/6") and time.time() < deadline:
        assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()[-3000:]}"
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.exists("gs:"), "a URL was taken for a local folder"
    steps = sorted(int(s) for s in storage.listdir(f"{run}/checkpoints") if s.isdigit())
    assert steps and max(steps) < 12, steps  # cut short, with checkpoints in the bucket

    # resume on a "new host": an empty local cache, so the run's files come from the bucket too
    resumed_env = dict(env, EASYTUNE_CACHE=str(tmp_path / "cache2"))
    hf_url = f"gs://{BUCKET}/exports/hf"
    run_to_end(command + ["--resume", f"--export_hf={hf_url}"], env=resumed_env)
    assert remote_losses(run) == reference_run  # every step, bit-equal to the local uninterrupted run
    for name in ("easytune_config.json", "summary.json", "tokenizer.json"):
        assert storage.isfile(f"{run}/{name}"), name
    assert not storage.exists(f"{run}/wandb_run_id")
    assert any(name.startswith("events.out.tfevents") for name in storage.listdir(f"{run}/tensorboard"))
    summary = json.loads(storage.read_text(f"{run}/summary.json"))
    assert summary["export_hf"] == hf_url

    # the export, downloaded, is what transformers loads; the bucket's checkpoint loads in easytune
    import jax
    import torch
    from transformers import AutoModelForCausalLM

    import easytune
    local = tmp_path / "hf"
    storage.download(hf_url, str(local))
    assert (local / "README.md").is_file() and (local / "model.safetensors").is_file()
    theirs = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
    tokens = np.array([[1, 5, 9, 14, 3, 7]], np.int32)
    with torch.no_grad():
        expected = theirs(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    for source in (run, hf_url):  # the run's newest checkpoint, read by orbax in the bucket; the HF export
        ours = easytune.load(source, mesh_dim="1,1,1", devices=jax.devices()[:1])
        np.testing.assert_allclose(np.asarray(ours(tokens)), expected, atol=1e-4, rtol=1e-4)


def test_an_unreachable_bucket_is_one_sentence_before_anything_compiles(gcs, tiny_chat_model, task_file, tmp_path):
    env = dict(ENV, **{**gcs, "EASYTUNE_CACHE": str(tmp_path / "cache")})
    url = "gs://no-such-bucket-here/run"
    result = subprocess.run(train_command(tiny_chat_model, task_file, url, "--total_steps=2"), env=env,
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"easytune: error: cannot write to {url} (the bucket was not found); check that the "
                           f"bucket exists"), last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "gs:").exists()  # never a local folder named after the URL


def test_two_processes_write_one_sharded_checkpoint_to_the_bucket(gcs, tiny_chat_model, task_file, tmp_path):
    """A 2-process job (one device each, the fsdp axis across them) writes one checkpoint to the
    bucket, each process its own shards; it restores on other meshes, to the same logits."""
    import jax

    import easytune
    from conftest import run_processes
    from easytune import storage
    run = f"gs://{BUCKET}/runs/two"
    env = dict(ENV, **{**gcs, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    run_processes(lambda address: [train_command(tiny_chat_model, task_file, run, "--total_steps=4", "--mesh_dim=1,2,1",
                                                 f"--jax_distributed.coordinator_address={address}",
                                                 "--jax_distributed.num_processes=2",
                                                 f"--jax_distributed.process_id={i}") for i in range(2)],
                  env, timeout=600, output_dir=tmp_path)
    assert not (tmp_path / "gs:").exists()
    params = f"{run}/checkpoints/4/params"
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(storage.listdir(params))  # both processes' shards
    assert sorted(remote_losses(run)) == [1, 2, 3, 4]
    tokens = np.array([[1, 5, 9, 14, 3, 7]], np.int32)
    one = easytune.load(run, mesh_dim="1,1,1", devices=jax.devices()[:1], tokenizer=False)
    eight = easytune.load(run, mesh_dim="1,4,2", tokenizer=False)  # a mesh the run never had
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same weights, restored into other shards
    np.testing.assert_allclose(np.asarray(one(tokens)), np.asarray(eight(tokens)), atol=1e-5)  # sharded sums


def test_import_and_export_commands_between_buckets(gcs, tiny_chat_model, tmp_path):
    """An HF model in the bucket imported to an easytune checkpoint in the bucket, and exported
    back to an HF directory there: the weights survive both trips bit for bit."""
    from safetensors.numpy import load_file

    from easytune import storage
    env = dict(ENV, **{**gcs, "EASYTUNE_CACHE": str(tmp_path / "cache")})
    source, ckpt, hf = (f"gs://{BUCKET}/cli/{name}" for name in ("source_hf", "ckpt", "hf"))
    storage.upload(str(tiny_chat_model), source)
    for command in (["easytune.import_hf", f"--model={source}", f"--output_dir={ckpt}", "--mesh_dim=1,-1,1"],
                    ["easytune.export_hf", f"--checkpoint={ckpt}", f"--output_dir={hf}"]):
        result = subprocess.run([sys.executable, "-m", *command], env=env, capture_output=True, text=True, timeout=300,
                                cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    assert storage.isdir(f"{ckpt}/params") and not (tmp_path / "gs:").exists()
    storage.download(hf, str(tmp_path / "back"))
    original = load_file(f"{tiny_chat_model}/model.safetensors")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert original.keys() == back.keys()
    for name in original:
        np.testing.assert_array_equal(original[name], back[name])
