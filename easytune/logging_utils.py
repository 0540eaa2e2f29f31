"""Training metrics (metrics.jsonl + TensorBoard or Weights & Biases), a progress bar, and MFU.

Only process 0 writes or prints anything, so every process can make the same calls.
"""
from __future__ import annotations

import json
import math
import os
import sys
import uuid

import jax
import numpy as np

LOGGERS = ("none", "tensorboard", "wandb")


def _is_main_process() -> bool:
    return jax.process_index() == 0


def _to_float(name: str, value) -> float | None:
    """A Python float from a Python/numpy/JAX scalar; None for NaN/inf (strict JSON has neither)."""
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got shape {array.shape}.")
    number = float(array.reshape(()))
    return number if math.isfinite(number) else None


class MetricsLogger:
    """Appends `{"step": step, **metrics}` to `<output_dir>/metrics.jsonl` and mirrors the scalars
    to TensorBoard (`<output_dir>/tensorboard`) or Weights & Biases.

    The JSON file is opened in append mode and flushed per line, so a resumed run continues it.
    A wandb run's id is kept in `<output_dir>/wandb_run_id` so that a resumed run continues the same
    wandb run.
    """

    def __init__(self, output_dir: str, logger: str = "tensorboard", config: dict | None = None,
                 project: str | None = None, run_name: str | None = None, entity: str | None = None,
                 tags: str | list | None = None, group: str | None = None):
        """logger: "tensorboard", "wandb", both ("tensorboard,wandb") or "none". The W&B run's
        project, entity, name, tags (a list or comma-separated) and group come from the arguments
        (the run's `--wandb.*` flags) or, where those are empty, from wandb's own variables
        (WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME, WANDB_TAGS, WANDB_RUN_GROUP); the project is
        "easytune" when neither names one. WANDB_MODE=offline keeps the run on disk."""
        chosen = [name.strip() for name in logger.split(",") if name.strip()] or ["none"]
        unknown = [name for name in chosen if name not in LOGGERS]
        if unknown or ("none" in chosen and len(chosen) > 1):
            raise ValueError(f"logger must be one of {LOGGERS} (tensorboard and wandb may be combined: "
                             f"tensorboard,wandb), got {logger!r}.")
        self.output_dir, self.logger = output_dir, logger
        self._jsonl = self._tensorboard = self._wandb = None
        if not _is_main_process():
            return
        if "wandb" in chosen:
            try:
                import wandb
            except ImportError:
                raise ImportError("logger='wandb' needs the wandb package: pip install wandb or use "
                                  "--logger=tensorboard.") from None
        os.makedirs(output_dir, exist_ok=True)
        self._jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if "tensorboard" in chosen:
            from tensorboardX import SummaryWriter
            self._tensorboard = SummaryWriter(logdir=os.path.join(output_dir, "tensorboard"))
        if "wandb" in chosen:
            id_path = os.path.join(output_dir, "wandb_run_id")
            if os.path.exists(id_path):
                with open(id_path) as f:
                    run_id = f.read().strip()
            else:
                run_id = uuid.uuid4().hex[:12]  # wandb's own generate_id left its util module in 0.2x
                with open(id_path, "w") as f:
                    f.write(run_id)
            env = os.environ.get
            tags = tags or env("WANDB_TAGS") or None
            if isinstance(tags, str):
                tags = [t.strip() for t in tags.split(",") if t.strip()]
            self._wandb = wandb.init(project=project or env("WANDB_PROJECT") or "easytune",
                                     entity=entity or env("WANDB_ENTITY") or None,
                                     name=run_name or env("WANDB_NAME") or None, tags=tags or None,
                                     group=group or env("WANDB_RUN_GROUP") or None, config=config, id=run_id,
                                     resume="allow", dir=output_dir)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record scalar `metrics` at `step`. Non-finite values are written to JSON as null."""
        if self._jsonl is None:
            return
        values = {name: _to_float(name, value) for name, value in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}, allow_nan=False) + "\n")
        self._jsonl.flush()
        raw = {name: float(np.asarray(value).reshape(())) for name, value in metrics.items()}
        if self._tensorboard is not None:
            for name, value in raw.items():
                self._tensorboard.add_scalar(name, value, int(step))
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(raw, step=int(step))

    def flush(self) -> None:
        """Write what is buffered (TensorBoard's events) to the files, e.g. before they are uploaded."""
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


# metrics key -> (postfix label, format); shown in this order when present.
_POSTFIX = (
    ("loss", "loss", "{:.4f}"),
    ("learning_rate", "lr", "{:.2e}"),
    ("lr", "lr", "{:.2e}"),
    ("tokens_per_second", "tok/s", "{:,.0f}"),
    ("mfu", "MFU", "{:.1%}"),
)


class ProgressBar:
    """A tqdm bar on stderr for process 0 showing loss, lr, tokens/s and MFU.

    Off a terminal (CI, `nohup` logs) it redraws at most every 30 s in ASCII so logs stay short.
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "train"):
        from tqdm import tqdm

        interactive = sys.stderr.isatty()
        self._bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr,
                         disable=not _is_main_process(), dynamic_ncols=interactive,
                         mininterval=0.5 if interactive else 30.0, ascii=not interactive)

    def update(self, step: int, metrics: dict) -> None:
        """Move the bar to `step` (the number of finished steps) and show the known metrics."""
        if self._bar.disable:
            return
        postfix = {}
        for key, label, fmt in _POSTFIX:
            if key in metrics and label not in postfix and metrics[key] is not None:
                postfix[label] = fmt.format(float(np.asarray(metrics[key])))
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOP utilization in [0, 1]: achieved FLOP/s over `peak_flops`.

    `peak_flops` is the peak of every device the tokens/s was measured over, e.g.
    `peak_flops_per_device() * jax.device_count()`; None (unknown hardware) gives None.
    """
    if not peak_flops:
        return None
    return tokens_per_second * flops_per_token / peak_flops


# Dense bf16 peak FLOP/s per device (per chip on TPU), from the vendors' data sheets.
_TPU_PEAK_FLOPS = {
    "tpu v2": 45e12, "tpu v3": 123e12, "tpu v4": 275e12,
    "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5": 459e12, "tpu v5p": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}
# GPU device_kind varies by board ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"): first substring wins.
_GPU_PEAK_FLOPS = (
    ("h100 pcie", 756e12), ("h100 nvl", 835e12), ("gh200", 989e12), ("h200", 989e12),
    ("h100", 989e12), ("h800", 989e12), ("a100", 312e12), ("a800", 312e12), ("b200", 2250e12),
    ("l40s", 362e12),
)


def peak_flops_per_device(device_kind: str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of one device of kind `device_kind` (default: this host's first
    device); None for CPUs and unknown accelerators."""
    if device_kind is None:
        device_kind = jax.devices()[0].device_kind
    kind = " ".join(device_kind.lower().split())
    if kind in _TPU_PEAK_FLOPS:
        return _TPU_PEAK_FLOPS[kind]
    for pattern, flops in _GPU_PEAK_FLOPS:
        if pattern in kind:
            return flops
    return None


def measured_peak_flops(dtype: str = "float32", size: int = 1024, repeats: int = 5) -> float:
    """This host's matmul FLOP/s in `dtype` (accumulating in float32): the best of `repeats` timed
    `[size, size] @ [size, size]` products on the first device, after a warm-up. On a CPU one
    product uses every core XLA's thread pool has, so this is the host's attainable peak: what MFU
    is measured against where no data-sheet peak is known. (Timed, so a busy machine reads lower.)"""
    import time

    import jax.numpy as jnp
    operand = jnp.ones((size, size), dtype)
    product = jax.jit(lambda a: jax.lax.dot(a, a, preferred_element_type=jnp.float32))
    jax.block_until_ready(product(operand))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(product(operand))
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def job_peak_flops(cfg) -> float | None:
    """The peak FLOP/s MFU divides by, for the whole job: `--peak_flops`, else the data-sheet peak
    of the accelerator x devices, else on CPU `measured_peak_flops` x processes (hosts); None when
    unknown."""
    if cfg.get("peak_flops"):
        return float(cfg.peak_flops)
    per_device = peak_flops_per_device()
    if per_device:
        return per_device * jax.device_count()
    if jax.default_backend() == "cpu":
        return measured_peak_flops(cfg.get("dtype", "float32")) * jax.process_count()
    return None


def truncate_metrics(output_dir: str, step: int) -> None:
    """Drop metrics.jsonl lines logged after `step`: a resumed run logs those steps again, and a
    fresh run (step 0) starts an empty file. Call it before a MetricsLogger opens the file."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
