"""EASYTUNE_HOST_MALLOC=auto: easytune's commands on CPU keep freed host memory for reuse
(`easytune.host_memory`): a block freed and allocated again in a worker thread, as XLA's pool does
every step, faults no page in again; glibc's default (easytune's default too, since a job with
varying shapes fragments the kept heap) returns it to the kernel and faults all 16,384 pages of
64 MiB back."""
import os
import subprocess
import sys

import pytest

PAGES_OF_64_MIB = (64 << 20) // os.sysconf("SC_PAGE_SIZE")


def probe(*command, **env):
    environment = {k: v for k, v in os.environ.items() if k not in ("EASYTUNE_HOST_MALLOC", "JAX_PLATFORMS")}
    environment.update(env)
    out = subprocess.run([sys.executable, *command], env=environment, capture_output=True, text=True, timeout=120)
    return out


def faults(out):
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().rsplit(" ", 1)[1])


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")


def test_auto_makes_a_command_on_cpu_keep_freed_memory():
    out = probe("-m", "easytune.check_host_memory", JAX_PLATFORMS="cpu", EASYTUNE_HOST_MALLOC="auto")
    assert "kept for reuse" in out.stdout, out.stdout + out.stderr
    assert faults(out) < PAGES_OF_64_MIB // 100


@pytest.mark.parametrize("setting", [None, "system"])
def test_the_default_is_the_system_malloc_which_faults_every_page_again(setting):
    out = probe("-m", "easytune.check_host_memory", JAX_PLATFORMS="cpu",
                **({} if setting is None else {"EASYTUNE_HOST_MALLOC": setting}))
    assert "system default" in out.stdout
    assert faults(out) >= PAGES_OF_64_MIB


def test_auto_leaves_accelerator_runs_and_library_imports_alone():
    out = probe("-m", "easytune.check_host_memory", JAX_PLATFORMS="cuda", EASYTUNE_HOST_MALLOC="auto")
    assert "system default" in out.stdout and faults(out) >= PAGES_OF_64_MIB
    code = "import easytune; from easytune import host_memory as h; print(h.applied(), h.probe_reuse_faults())"
    out = probe("-c", code, JAX_PLATFORMS="cpu", EASYTUNE_HOST_MALLOC="auto")  # a library user's process
    assert out.stdout.split()[0] == "False", out.stdout + out.stderr
    out = probe("-c", code, JAX_PLATFORMS="cpu", EASYTUNE_HOST_MALLOC="tuned")
    assert out.stdout.split()[0] == "True" and int(out.stdout.split()[1]) < PAGES_OF_64_MIB // 100


def test_a_bad_setting_is_one_sentence():
    out = probe("-m", "easytune.check_host_memory", EASYTUNE_HOST_MALLOC="jemalloc")
    assert out.returncode != 0
    assert ("EASYTUNE_HOST_MALLOC='jemalloc' is not one of auto, tuned, system: unset it, or choose one."
            in out.stderr.strip().splitlines()[-1])
