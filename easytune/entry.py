"""What every training entry point does around the one loop: start (distributed init, output
directory), step count, run files, resume and metrics, the run itself with a progress bar, the
final checkpoint and eval, exports, summary.json, and `main`. The entry points keep only what is
theirs: data, loss, and their own figures."""
from __future__ import annotations

import json
import logging
import os
import time

from absl import app

logger = logging.getLogger("easytune")


def start(cfg) -> tuple[float, bool]:
    """Initialize jax.distributed from `--jax_distributed.*` and create the output directory;
    returns (start time, whether this is process 0)."""
    from easytune import distributed
    dist = cfg.jax_distributed
    distributed.initialize(dist.coordinator_address or None, dist.num_processes or None,
                           dist.process_id if dist.process_id >= 0 else None)
    import jax
    os.makedirs(cfg.output_dir, exist_ok=True)
    return time.time(), jax.process_index() == 0


def load_causal_lm(cfg, purpose: str, tokenizer_use: str):
    """The decoder-only causal LM at `cfg.model` (LLaMA/Mistral, with its tokenizer) that `purpose`
    trains; an encoder-decoder, a reward model or a missing tokenizer is an error."""
    import easytune
    model = easytune.load(cfg.model, dtype=cfg.dtype, param_dtype=cfg.param_dtype, mesh_dim=cfg.mesh_dim,
                          remat=cfg.remat, attention=cfg.attention, head_chunk_size=cfg.head_chunk_size)
    if model.tokenizer is None:
        raise ValueError(f"{cfg.model} has no tokenizer; {tokenizer_use}.")
    if model.is_encoder_decoder or getattr(model.config, "num_labels", 0):
        raise ValueError(f"{purpose} trains a decoder-only causal LM (LLaMA/Mistral); {cfg.model} is "
                         f"{'an encoder-decoder' if model.is_encoder_decoder else 'a reward model'}.")
    return model


def heldout_accuracy(model, records, max_new_tokens: int, when: str | None = None, is_main: bool = False) -> float:
    """Greedy exact-match accuracy on verifiable-task records (prompt = all but the last turn; for
    an encoder-decoder, the question's text). With `when`, process 0 prints it."""
    from easytune import data
    if model.is_encoder_decoder:
        prompts = [r["messages"][-2]["content"] for r in records]
    else:
        prompts = [r["messages"][:-1] for r in records]
    predictions = model.generate(prompts, max_new_tokens=max_new_tokens)
    accuracy = data.accuracy(predictions, records)
    if when is not None and is_main:
        print(f"held-out exact-match accuracy {when}: {accuracy:.3f}")
    return accuracy


def total_steps(cfg, batches) -> int:
    steps = cfg.total_steps or cfg.num_epochs * batches.steps_per_epoch
    if steps < 1 or cfg.log_steps < 1:
        raise ValueError(f"nothing to do: total_steps={steps} (from --total_steps or --num_epochs) and "
                         f"--log_steps={cfg.log_steps} must be >= 1.")
    return steps


def write_run_files(cfg, model, is_main: bool) -> None:
    """The tokenizer and the resolved config next to the checkpoints (process 0)."""
    if is_main:
        model.tokenizer.save_pretrained(cfg.output_dir)
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)


def resume_and_open_metrics(cfg, trainer, batches) -> None:
    """With --resume, restore the newest checkpoint and the data position; then open the metrics
    writers (metrics.jsonl cut back to the restored step first)."""
    from easytune import logging_utils
    if cfg.resume:
        data_state = trainer.restore_latest()
        if data_state is not None:
            batches.restore(data_state)
    logging_utils.truncate_metrics(cfg.output_dir, trainer.step)  # before the logger opens the file
    trainer.metrics_logger = logging_utils.MetricsLogger(cfg.output_dir, cfg.logger, config=cfg.to_dict())


def train(trainer, batches, eval_batches, total: int, summary: dict, **train_kwargs) -> list[dict]:
    """Run the loop under a progress bar; records train_seconds and first/last loss in `summary`."""
    from easytune import logging_utils
    progress = logging_utils.ProgressBar(total, initial=trainer.step)
    train_start = time.time()
    history = trainer.train(batches, eval_batches, progress=progress, **train_kwargs)
    progress.close()
    summary["train_seconds"] = time.time() - train_start
    if history:
        summary["first_loss"], summary["last_loss"] = history[0]["loss"], history[-1]["loss"]
    return history


def save_and_evaluate(cfg, trainer, batches, eval_batches, history: list[dict], summary: dict) -> None:
    """The final checkpoint (when --save_steps did not write one) and the final eval figures."""
    if cfg.save_steps == 0:
        trainer.save(batches.state())
    if eval_batches is not None:
        if history and "eval_loss" in history[-1]:
            summary.update({k: v for k, v in history[-1].items() if k.startswith("eval_")})
        else:
            summary.update(trainer.evaluate(eval_batches()))


def export(cfg, model, summary: dict, default_job: bool) -> None:
    """The exports the run asks for (--export_hf, --export_peft); the default job also writes
    <output_dir>/hf (adapters merged, unless a prompt-learning adapter, which cannot be) and, with
    an adapter, <output_dir>/peft."""
    adapter = model.adapter
    hf_dir = cfg.export_hf or (os.path.join(cfg.output_dir, "hf")
                               if default_job and (adapter is None or adapter.config.is_lora) else None)
    peft_dir = cfg.get("export_peft") or (os.path.join(cfg.output_dir, "peft") if default_job and adapter else None)
    if hf_dir:
        model.save_pretrained(hf_dir)
        summary["export_hf"] = hf_dir
    if peft_dir:
        model.save_peft(peft_dir)
        summary["export_peft"] = peft_dir


def finish(cfg, trainer, summary: dict, started: float, is_main: bool) -> dict:
    """Close the metrics writers and write (and print) summary.json."""
    trainer.metrics_logger.close()
    summary["wall_seconds"] = time.time() - started
    if is_main:
        with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(json.dumps(summary, indent=2))
    return summary


def make_main(defaults, run):
    """The absl `main` of an entry point: flags (preset, overrides) -> `run(cfg)`."""
    from easytune import config as config_lib

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; flags are --name=value.")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
        run(config_lib.read_config(defaults))
    return main
