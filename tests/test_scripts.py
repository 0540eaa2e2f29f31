"""The launchers in scripts/: syntax, usage, and the commands they issue, run against stand-ins for
gcloud, srun and scontrol (which cannot run here) that record their arguments. The remote command
`launch` sends is then run by a local bash, so its quoting is checked end to end."""
import json
import os
import subprocess
import sys
import time

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
TPU_POD = os.path.join(SCRIPTS, "tpu_pod.sh")
SLURM = os.path.join(SCRIPTS, "slurm_gpu.sbatch")
EXTRA_ARGS = ["--model=meta-llama/Llama-3.2-1B", "--learning_rate=1e-4", "--note=it's a b", "$HOME"]


def fake_command(bin_dir, name, body=""):
    """An executable `name` that appends its argv (and EASYTUNE_DISTRIBUTED) as JSON to name.jsonl."""
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\nimport json, os, sys\n"
                f"with open({os.path.join(bin_dir, name + '.jsonl')!r}, 'a') as f:\n"
                f"    f.write(json.dumps({{'argv': sys.argv[1:], "
                f"'distributed': os.environ.get('EASYTUNE_DISTRIBUTED')}}) + '\\n')\n{body}")
    os.chmod(path, 0o755)


def calls(bin_dir, name):
    path = os.path.join(bin_dir, name + ".jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def fake_bin(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    return str(bin_dir)


def run(args, env_extra=None, **kwargs):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, **kwargs)


@pytest.mark.parametrize("script", [TPU_POD, SLURM])
def test_bash_syntax(script):
    result = run(["bash", "-n", script])
    assert result.returncode == 0, result.stderr


def test_tpu_pod_usage():
    result = run(["bash", TPU_POD, "-h"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage:")
    for command in ("create", "setup", "launch", "check", "stop", "delete"):
        assert f"  {command}" in result.stdout
    for bad in ([], ["frobnicate"]):
        result = run(["bash", TPU_POD, *bad])
        assert result.returncode == 2 and "Usage:" in result.stderr


def test_tpu_pod_launch_runs_one_command_on_all_workers(fake_bin, tmp_path):
    fake_command(fake_bin, "gcloud")
    env = {"PATH": fake_bin + os.pathsep + os.environ["PATH"], "TPU_NAME": "pod-1", "ZONE": "us-east5-a"}
    result = run(["bash", TPU_POD, "launch", *EXTRA_ARGS], env)
    assert result.returncode == 0, result.stderr
    [call] = calls(fake_bin, "gcloud")
    argv = call["argv"]
    assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod-1"]
    assert "--zone=us-east5-a" in argv and "--worker=all" in argv
    [command] = [a[len("--command="):] for a in argv if a.startswith("--command=")]
    assert "python3 -m easytune.train_sft --mesh_dim=1,-1,1 --model=meta-llama/Llama-3.2-1B" in command

    # What each worker would do: run the command in a shell, with python3 standing in for training.
    home = tmp_path / "home"
    (home / "easytune").mkdir(parents=True)
    fake_command(fake_bin, "python3", body="print('training', flush=True)\n")
    result = run(["bash", "-c", command], {"PATH": fake_bin + os.pathsep + os.environ["PATH"], "HOME": str(home)})
    assert result.returncode == 0, result.stderr
    deadline = time.time() + 10
    while not calls(fake_bin, "python3") and time.time() < deadline:
        time.sleep(0.05)
    [train] = calls(fake_bin, "python3")
    assert train == {"argv": ["-m", "easytune.train_sft", "--mesh_dim=1,-1,1", *EXTRA_ARGS], "distributed": "1"}
    assert (home / "easytune_logs" / "train.pid").read_text().strip().isdigit()
    logs = list((home / "easytune_logs").glob("train_*.log"))
    while time.time() < deadline and not (logs and logs[0].read_text()):
        time.sleep(0.05)
    assert len(logs) == 1 and logs[0].read_text() == "training\n"


def test_tpu_pod_other_commands(fake_bin):
    fake_command(fake_bin, "gcloud")
    env = {"PATH": fake_bin + os.pathsep + os.environ["PATH"], "TPU_NAME": "pod-1", "PROJECT": "proj",
           "ACCELERATOR_TYPE": "v5p-64", "RUNTIME_VERSION": "v2-alpha-tpuv5", "REPO_URL": "https://example.com/e.git"}
    for command in (["create", "--spot"], ["setup"], ["check", "5"], ["stop"], ["delete"]):
        result = run(["bash", TPU_POD, *command], env)
        assert result.returncode == 0, result.stderr
    create, setup, check, stop, delete = [c["argv"] for c in calls(fake_bin, "gcloud")]
    assert create[:5] == ["compute", "tpus", "tpu-vm", "create", "pod-1"]
    assert {"--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--project=proj", "--spot"} <= set(create)
    assert "--worker=all" in setup and "git clone https://example.com/e.git" in setup[-1]
    assert "pip install -q -e '.[tpu]'" in setup[-1]
    assert "tail -n 5" in check[-1] and "kill -- -" in stop[-1]
    assert delete[:5] == ["compute", "tpus", "tpu-vm", "delete", "pod-1"] and "--quiet" in delete


def test_slurm_script_passes_coordinator_flags(fake_bin):
    fake_command(fake_bin, "scontrol", body="print('gpu-node-17\\ngpu-node-18')\n")
    # srun stand-in: run the task command (from `bash` on) as task 1 of 2.
    fake_command(fake_bin, "srun", body=(
        "task = sys.argv[sys.argv.index('bash'):]\n"
        "os.execvpe('bash', task, dict(os.environ, SLURM_PROCID='1'))\n"))
    fake_command(fake_bin, "python")
    env = {"PATH": fake_bin + os.pathsep + os.environ["PATH"], "SLURM_JOB_ID": "12345",
           "SLURM_JOB_NODELIST": "gpu-node-[17-18]", "SLURM_NNODES": "2"}
    result = run(["bash", SLURM, *EXTRA_ARGS], env)
    assert result.returncode == 0, result.stderr
    [scontrol] = calls(fake_bin, "scontrol")
    assert scontrol["argv"] == ["show", "hostnames", "gpu-node-[17-18]"]
    [srun] = calls(fake_bin, "srun")
    assert srun["argv"][:3] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "--label"]
    [train] = calls(fake_bin, "python")
    assert train["argv"] == [
        "-m", "easytune.train_sft", "--mesh_dim=1,-1,1",
        "--jax_distributed.coordinator_address=gpu-node-17:32345",  # port 20000 + 12345 % 20000
        "--jax_distributed.num_processes=2", "--jax_distributed.process_id=1", *EXTRA_ARGS,
    ]
