"""Keep freed host memory for reuse when training on CPU, so a train step stops paying for page faults.

XLA:CPU allocates every temporary of a step afresh. glibc hands a large block (over its mmap threshold,
at most 32 MiB, and any block of a non-main arena that does not fit that arena's 64 MiB heap) a fresh
`mmap` and returns it to the kernel on `free`; the next step faults every page in again. Measured on
SmolLM2-135M at 4 x 512 in fp32 (BENCHMARKS "Host memory"): 1.62 million minor page faults and 4-5 s of
system CPU per step, and the environment tunables `MALLOC_MMAP_THRESHOLD_`/`MALLOC_TRIM_THRESHOLD_`
alone changed nothing, because XLA's worker threads allocate from their own arenas.

`keep_freed_memory()` sets, through `mallopt`: one arena (every thread allocates from the main heap),
no `mmap` for large blocks, and no trimming of the heap's top. The heap then grows to the step's peak
once and is reused: 0 faults per step and 11.7 s -> 9.6 s. The process keeps at least its peak resident
size until it exits.

Why hand-written: neither XLA nor JAX exposes its host allocator, and glibc's tunables can only be
set in the environment before the process starts; `mallopt` is the one runtime switch. It must run
before XLA's thread pool starts (a thread already attached to another arena keeps it).

When it applies (`EASYTUNE_HOST_MALLOC`): `system` (the default) never; `auto` in easytune's own
commands (`python -m easytune.<command>`) when JAX will run on the CPU (`JAX_PLATFORMS` starts with
`cpu`, or no GPU/TPU plugin is installed); `tuned` in any process that imports easytune. Linux with
glibc only; elsewhere it does nothing.

Why opt-in: with one arena and nothing ever returned, a job whose shapes vary fragments the heap and
grows past its peak. GRPO on SmolLM2 (32 rollouts of up to 64 tokens, prompts of varying length, so
new shapes each iteration) grew to 16.6 GiB resident in its second iteration and 23.6 GiB, when the
kernel killed it, in its third; with glibc's default the same run peaked at 8.8 GiB and fell back to
3-4 GiB between phases (BENCHMARKS "Host memory"). It pays off for a fixed-shape training loop
(SFT, DPO, reward models at a fixed `--seq_length`), where the heap is reused step after step.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8   # glibc's malloc.h
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")
MODES = ("auto", "tuned", "system")

_applied = False


def _runs_on_cpu() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PLUGINS)


def _is_easytune_command() -> bool:
    argv = getattr(sys, "orig_argv", [])
    return any(a == "-m" and b.startswith("easytune.") for a, b in zip(argv, argv[1:]))


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep and reuse freed memory (see the module docstring). Returns whether
    it is in effect; idempotent; does nothing off glibc."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1 as the trim threshold is SIZE_MAX inside glibc: never trim (a positive int caps at 2 GiB,
    # below one step's temporaries, and re-faults the rest every step).
    _applied = all(mallopt(option, value) == 1 for option, value in
                   ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
    return _applied


def applied() -> bool:
    """Whether this process keeps freed memory (`keep_freed_memory` took effect)."""
    return _applied


def configure_at_startup() -> bool:
    """Called first thing by `import easytune`: applies `keep_freed_memory` as `EASYTUNE_HOST_MALLOC` says."""
    mode = os.environ.get("EASYTUNE_HOST_MALLOC", "system").strip().lower() or "system"
    if mode not in MODES:
        raise ValueError(f"EASYTUNE_HOST_MALLOC={mode!r} is not one of {', '.join(MODES)}: unset it, or choose one.")
    if mode == "tuned" or (mode == "auto" and _is_easytune_command() and _runs_on_cpu()):
        return keep_freed_memory()
    return False


def probe_reuse_faults(megabytes: int = 64, rounds: int = 3) -> int:
    """Minor page faults of the last of `rounds` allocations of `megabytes` written and freed in a
    worker thread (as XLA's pool does): about megabytes * 256 with the system's malloc, ~0 kept."""
    import resource
    import threading
    faults = []

    def work():
        for _ in range(rounds):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            buffer = ctypes.create_string_buffer(megabytes << 20)  # malloc + zero-fill: touches every page
            del buffer
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return faults[-1]
