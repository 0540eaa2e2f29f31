"""lm-evaluation-harness on SmolLM2-135M-Instruct (fp32): requests per second of easytune's backend
next to lm-eval's own `hf` backend (transformers, PyTorch) on the same local tasks and weights.

    python scripts/bench_eval.py [--repeats 3] [--batch_size 8]

Both backends answer the same three local tasks (multiple choice: loglikelihood; a generative
exact-match task: generate_until; rolling perplexity: loglikelihood_rolling) through lm-eval's
`simple_evaluate`; the runs alternate, the first of each is reported separately (easytune's
includes compilation), and the rest give medians and ranges of requests per second. Prints the
easytune / hf ratio (higher is faster for easytune). A benchmark, not a test: this machine is
noisy and only a GPU/TPU figure counts for absolute speed.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()

    import lm_eval
    from lm_eval.tasks import TaskManager

    from easytune import assets
    from easytune.eval.lm_eval_backend import EasytuneLM
    from easytune.eval.local_tasks import write_local_tasks
    model_dir = assets.smollm2_hf_dir()
    task_dir = write_local_tasks(Path(tempfile.mkdtemp()) / "tasks")
    tasks = ["capitals_mc", "tasks_gen", "capitals_text"]
    manager = TaskManager(include_path=task_dir)
    ours = EasytuneLM(model=model_dir, mesh_dim=f"1,{len(jax.devices())},1", batch_size=args.batch_size)
    print(f"easytune on {len(jax.devices())} {jax.default_backend()} device(s); hf on torch's CPU threads")
    from lm_eval.models.huggingface import HFLM
    theirs = HFLM(pretrained=model_dir, dtype="float32", batch_size=args.batch_size, device="cpu")

    def run(lm) -> tuple[float, int]:
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True)
        seconds = time.perf_counter() - start
        return seconds, sum(len(doc["resps"]) for task in tasks for doc in results["samples"][task])

    rates = {"easytune": [], "hf": []}
    for repeat in range(args.repeats + 1):
        for name, lm in (("easytune", ours), ("hf", theirs)):
            seconds, requests = run(lm)
            if repeat == 0:
                print(f"{name}: first run {requests} requests in {seconds:.1f} s (easytune's includes compiling)")
            else:
                rates[name].append(requests / seconds)
    for name, values in rates.items():
        print(f"{name}: {statistics.median(values):.2f} requests/s (range {min(values):.2f}-{max(values):.2f}, "
              f"{len(values)} runs)")
    ratios = [a / b for a, b in zip(rates["easytune"], rates["hf"])]
    print(f"easytune / hf: median {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
