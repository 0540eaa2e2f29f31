"""Multi-process start-up: `jax.distributed` for TPU pods, SLURM/MPI GPU clusters and CPU hosts.

Call `initialize()` first thing in an entry point, before anything touches a JAX device. With no
arguments it starts the distributed runtime only when the environment says this is one process of
many (a SLURM step with several tasks, an `mpirun` job, a multi-host TPU slice) and lets JAX
auto-detect the rest; otherwise the run stays single-process. `EASYTUNE_DISTRIBUTED=1` forces
auto-detection (e.g. a GCE TPU pod, whose topology JAX reads from the metadata server, not the
environment) and `EASYTUNE_DISTRIBUTED=0` forbids it.
"""
from __future__ import annotations

import importlib.util
import os
import pkgutil
from importlib.metadata import entry_points

import jax
import numpy as np


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None) -> None:
    """Start `jax.distributed` for this process; a no-op when already started or single-process.

    With `coordinator_address`, `num_processes` and `process_id` all given, cluster auto-detection
    is off and every local device is visible unless `local_device_ids` says otherwise (JAX's SLURM
    detection would otherwise restrict a one-process-per-node job to one GPU). With some given, JAX
    auto-detects the rest. With none, see the module docstring.
    """
    if jax.distributed.is_initialized():
        return
    explicit = (coordinator_address, num_processes, process_id)
    _validate(coordinator_address, num_processes, process_id)
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id, local_device_ids=local_device_ids)
    if all(value is not None for value in explicit):
        kwargs["cluster_detection_method"] = "deactivate"
    elif all(value is None for value in explicit):
        if not cluster_environment_detected():
            return
        if local_device_ids is None:
            kwargs["local_device_ids"] = _slurm_all_local_gpus()
    if _will_run_on_cpu():
        # Cross-process collectives on the CPU backend need an implementation; gloo ships with jaxlib.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as error:
        if "must be called before" not in str(error):
            raise
        raise RuntimeError(
            "easytune.distributed.initialize() must be called before any JAX computation or device "
            "query (jax.devices(), jnp arrays, easytune.load); call it first thing in the program."
        ) from None


def cluster_environment_detected() -> bool:
    """Whether the environment describes one process of a multi-process job JAX can auto-detect."""
    forced = os.environ.get("EASYTUNE_DISTRIBUTED", "").strip().lower()
    if forced in ("1", "true", "yes", "auto"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    env = os.environ
    # SLURM: only inside an `srun` step (the batch script itself is one process) with several tasks.
    if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and "SLURM_PROCID" in env:
        if _int_env("SLURM_STEP_NUM_TASKS", _int_env("SLURM_NTASKS", 1)) > 1:
            return True
    # Open MPI's mpirun/mpiexec.
    if "OMPI_MCA_orte_hnp_uri" in env and _int_env("OMPI_COMM_WORLD_SIZE", 1) > 1:
        return True
    # Multi-host TPU: worker lists (GKE, queued resources), multislice (megascale), or a task id.
    for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        if len([h for h in env.get(name, "").split(",") if h.strip()]) > 1:
            return True
    if env.get("MEGASCALE_COORDINATOR_ADDRESS") or _int_env("MEGASCALE_NUM_SLICES", 1) > 1:
        return True
    return "CLOUD_TPU_TASK_ID" in env


def host_array(x):
    """The whole of `x` as a numpy array on this host: a sharded array spanning several processes is
    gathered from all of them (every process must call this), anything else is copied to the host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def process_batch_slice(global_batch_size: int) -> slice:
    """The rows `[start, stop)` of a `[global_batch, ...]` batch that this process feeds.

    Contiguous blocks by `jax.process_index()`; pass this process's block as the process-local data
    of `jax.make_array_from_process_local_data`, which places it on this process's devices.
    """
    count, index = jax.process_count(), jax.process_index()
    if global_batch_size <= 0 or global_batch_size % count:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the process count "
            f"{count} so that every process feeds the same number of rows."
        )
    per_process = global_batch_size // count
    return slice(index * per_process, (index + 1) * per_process)


def _validate(coordinator_address, num_processes, process_id) -> None:
    if num_processes is not None and (not isinstance(num_processes, int) or num_processes < 1):
        raise ValueError(f"num_processes must be an integer >= 1, got {num_processes!r}.")
    if process_id is not None:
        if not isinstance(process_id, int) or process_id < 0:
            raise ValueError(f"process_id must be an integer >= 0, got {process_id!r}.")
        if num_processes is not None and process_id >= num_processes:
            raise ValueError(
                f"process_id must be in [0, num_processes), got process_id={process_id} with "
                f"num_processes={num_processes}."
            )
    if coordinator_address is not None:
        host, sep, port = str(coordinator_address).rpartition(":")
        if not (sep and host.strip("[]") and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(
                f"coordinator_address must be 'host:port' with a port in 1..65535 (process 0's "
                f"address), got {coordinator_address!r}."
            )


def _int_env(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _will_run_on_cpu() -> bool:
    """Whether JAX's default backend will be the CPU, decided without starting any backend."""
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    # No platform pinned: the CPU wins unless an accelerator plugin (CUDA, ROCm, TPU) is installed.
    if importlib.util.find_spec("libtpu") is not None:
        return False
    if importlib.util.find_spec("jax_plugins") is not None:
        import jax_plugins
        if any(True for _ in pkgutil.iter_modules(jax_plugins.__path__)):
            return False
    return not list(entry_points(group="jax_plugins"))


def _slurm_all_local_gpus():
    """All allocated GPUs for a one-task-per-node SLURM step (JAX would pick only the first)."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    tasks_per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE", os.environ.get("SLURM_NTASKS_PER_NODE", ""))
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if tasks_per_node.split("(")[0] == "1" and visible:
        return list(range(len(visible)))
    return None
