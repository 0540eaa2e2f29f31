"""easytune.distributed: two real CPU processes on 127.0.0.1 (2 devices each), argument checks,
cluster detection from the environment, and the error for calling it after JAX has started."""
import os
import sys

import jax
import pytest

from conftest import run_processes

from easytune import distributed

CHILD = r"""
import sys
import easytune.distributed as distributed
coordinator, process_id = sys.argv[1], int(sys.argv[2])
distributed.initialize(coordinator, 2, process_id)
distributed.initialize(coordinator, 2, process_id)  # idempotent
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

assert jax.process_count() == 2 and jax.process_index() == process_id
assert jax.device_count() == 4 and jax.local_device_count() == 2

# A global [8, 3] batch: each process feeds its own rows, then a cross-process reduction.
rows = distributed.process_batch_slice(8)
assert rows == slice(4 * process_id, 4 * process_id + 4), rows
global_batch = np.arange(24, dtype=np.float32).reshape(8, 3)
mesh = jax.make_mesh((4,), ("data",))
batch = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), global_batch[rows], (8, 3))
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(batch)
assert float(total) == global_batch.sum(), float(total)
ids = multihost_utils.process_allgather(np.array([process_id * 10 + 1]))
assert ids.ravel().tolist() == [1, 11], ids

# psum across all 4 devices of both processes, via shard_map.
ones = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), np.ones(2, np.float32), (4,))
psum = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, "data"), mesh=mesh, in_specs=P("data"), out_specs=P("data")))
assert multihost_utils.process_allgather(psum(ones), tiled=True).tolist() == [4.0] * 4
print("CHILD_OK", process_id)
"""


def test_two_processes_on_cpu(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    outputs = run_processes(lambda address: [[sys.executable, "-c", CHILD, address, str(i)] for i in range(2)],
                            env, timeout=120, output_dir=tmp_path)
    for i, text in enumerate(outputs):
        assert f"CHILD_OK {i}" in text, text[-3000:]


@pytest.mark.parametrize("args, message", [
    (("127.0.0.1:1234", 0, 0), "num_processes must be an integer >= 1"),
    (("127.0.0.1:1234", 2, 2), "process_id must be in"),
    (("127.0.0.1:1234", 2, -1), "process_id must be an integer >= 0"),
    (("127.0.0.1", 2, 0), "host:port"),
    (("127.0.0.1:http", 2, 0), "host:port"),
    ((":1234", 2, 0), "host:port"),
    (("127.0.0.1:70000", 2, 0), "host:port"),
])
def test_invalid_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize(*args)
    assert not jax.distributed.is_initialized()


def test_after_backend_started_says_call_first():
    jax.devices()  # the test process has started its backend
    with pytest.raises(RuntimeError, match="must be called before any JAX computation"):
        distributed.initialize("127.0.0.1:1234", 2, 0)
    assert not jax.distributed.is_initialized()


def test_single_process_without_cluster_is_noop(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "CLOUD_TPU_", "EASYTUNE_DISTRIBUTED")):
            monkeypatch.delenv(name)
    assert not distributed.cluster_environment_detected()
    distributed.initialize()
    assert not jax.distributed.is_initialized()
    assert distributed.process_batch_slice(6) == slice(0, 6)


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "1"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_PROCID": "0"}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, False),  # the sbatch script itself, outside srun
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "4"}, True),
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
    ({"MEGASCALE_NUM_SLICES": "2"}, True),
    ({"CLOUD_TPU_TASK_ID": "0"}, True),
    ({"EASYTUNE_DISTRIBUTED": "1"}, True),
    ({"EASYTUNE_DISTRIBUTED": "0", "TPU_WORKER_HOSTNAMES": "w-0,w-1"}, False),
])
def test_cluster_detection(monkeypatch, env, expected):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "CLOUD_TPU_", "EASYTUNE_DISTRIBUTED")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.cluster_environment_detected() is expected


def test_batch_slice_must_divide(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    monkeypatch.setattr(jax, "process_index", lambda: 3)
    assert distributed.process_batch_slice(8) == slice(6, 8)
    with pytest.raises(ValueError, match="multiple of the process count 4"):
        distributed.process_batch_slice(6)
