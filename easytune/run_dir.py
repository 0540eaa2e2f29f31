"""A run owns its output directory: a lock while it runs, and nothing in an existing run's
directory is written before the run is allowed to proceed.

- `RunLock`: `<output_dir>/.easytune.lock` created exclusively (O_EXCL) by process 0, holding the
  owner's host, pid and start time. A second run into the directory is refused with one sentence
  naming the owner. A lock left by a crashed run on this host (its pid is gone) is taken over with
  a warning; one from another host cannot be checked from here, so the message says how to clear it.
- `check_start(cfg, previous)`: without --resume, a directory holding checkpoints is refused;
  with it, flags that change what the run computes (steps, data, batch layout, optimizer, model,
  adapter, algorithm options) must equal the saved run's `config.json`, unless --resume_override
  names them.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time

from easytune import config

logger = logging.getLogger("easytune")
LOCK_FILE = ".easytune.lock"

# Flags that may change on --resume: where and how the run is computed and reported, not what it
# computes. Every other flag must equal the saved run's unless --resume_override names it.
RESUMABLE_CHANGES = {
    "resume", "resume_override", "debug", "output_dir", "mesh_dim", "attention", "remat", "dtype", "head_chunk_size",
    "layer_loop", "exact_ratio", "log_steps", "save_steps", "keep_checkpoints", "async_checkpoints", "logger",
    "eval_steps", "heldout_steps", "heldout_before", "export_hf", "push_to_hub", "export_peft", "eval_data",
    "eval_tasks", "eval_include_path", "eval_limit", "eval_num_fewshot", "eval_batch_size", "eval_max_gen_toks",
    "eval_apply_chat_template", "keep_best", "keep_best_mode", "config", "data_num_proc", "data_cache_dir",
    "peak_flops",
}
RESUMABLE_PREFIXES = ("jax_distributed.", "wandb.")


def saved_config(output_dir: str) -> dict | None:
    """The flags a run in `output_dir` saved (`easytune_config.json`; `config.json` for runs written
    before that name), or None."""
    from easytune.run_record import CONFIG_FILE
    from easytune import storage
    for name in (CONFIG_FILE, "config.json"):
        path = os.path.join(output_dir, name)
        if storage.isfile(path):
            return json.loads(storage.read_text(path))
    return None


def checkpoint_steps(output_dir: str) -> list[int]:
    """Training steps saved in `<output_dir>/checkpoints` (orbax step directories)."""
    from easytune import storage
    directory = os.path.join(output_dir, "checkpoints")
    if not storage.isdir(directory):
        return []
    return sorted(int(name) for name in storage.listdir(directory) if name.isdigit())


def check_start(cfg) -> None:
    """Refuse, before anything in `cfg.output_dir` is written, a fresh run over a saved one and a
    resume whose flags change what the saved run computes."""
    steps = checkpoint_steps(cfg.output_dir)
    if not cfg.resume:
        if steps:
            raise ValueError(f"{cfg.output_dir} already holds checkpoints (steps {steps}); pass --resume to continue "
                             f"that run, or choose a new --output_dir.")
        return
    previous = saved_config(cfg.output_dir)
    if previous is None or not steps:
        return  # nothing saved yet: a fresh start
    allowed = {name.strip() for name in str(cfg.get("resume_override") or "").split(",") if name.strip()}
    old, new = dict(config.leaves(previous)), dict(config.leaves(cfg.to_dict()))
    changed = sorted(name for name in set(old) | set(new)
                     if old.get(name) != new.get(name) and name not in RESUMABLE_CHANGES
                     and not name.startswith(RESUMABLE_PREFIXES) and name not in allowed)
    if changed:
        listed = ", ".join(f"--{n}={old.get(n)!r} -> {new.get(n)!r}" for n in changed)
        raise ValueError(f"--resume would continue {cfg.output_dir} with different settings ({listed}); resume with "
                         f"the saved run's values, or name them in --resume_override={','.join(changed)} to change "
                         f"them knowingly.")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`<output_dir>/.easytune.lock` while a run writes there (process 0 takes it)."""

    def __init__(self, output_dir: str, enabled: bool = True):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.enabled, self.held = enabled, False

    def acquire(self) -> None:
        if not self.enabled:
            return
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    with open(self.path) as f:
                        holder = json.load(f)
                except (OSError, ValueError):
                    holder = {}
                if holder.get("host") == owner["host"] and isinstance(holder.get("pid"), int) \
                        and not _alive(holder["pid"]):
                    logger.warning("%s was left by run %d, which is gone; taking it over.", self.path, holder["pid"])
                    os.remove(self.path)
                    continue
                raise ValueError(f"{os.path.dirname(self.path)} is in use by another run (host {holder.get('host')}, "
                                 f"pid {holder.get('pid')}, since {holder.get('started')}); wait for it, choose "
                                 f"another --output_dir, or delete {self.path} if that run is gone.") from None
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
            self.held = True
            return

    def release(self) -> None:
        if self.held:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.held = False
