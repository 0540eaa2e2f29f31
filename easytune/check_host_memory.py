"""`python -m easytune.check_host_memory`: whether easytune's commands keep freed host memory here
(`easytune.host_memory`), and a probe: the page faults of a reused 64 MiB block in a thread."""
from easytune import host_memory

if __name__ == "__main__":
    print(f"host malloc: {'kept for reuse' if host_memory.applied() else 'system default'}"
          f"; minor page faults of a reused 64 MiB block in a thread: {host_memory.probe_reuse_faults()}")
