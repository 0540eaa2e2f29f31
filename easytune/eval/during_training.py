"""lm-evaluation-harness tasks as a figure of a training run (`--eval_tasks`): run by the driver
every --eval_steps and at the end on the model being trained (the same handle, so the same mesh
and no conversion), logged as `eval_<task>/<metric>` beside the eval loss, and usable as the
metric of the keep-best checkpoint (`--keep_best=eval_<task>/<metric>`)."""
from __future__ import annotations

import logging

logger = logging.getLogger("easytune")


def metric_figures(results: dict) -> dict[str, float]:
    """`{eval_<task>/<metric>: value}` from lm-eval's results (its `acc,none` keys: the filter
    name dropped when it is lm-eval's default `none`; stderr and non-numbers left out)."""
    figures = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, _, filter_name = key.partition(",")
            if name.endswith("_stderr") or name == "alias" or not isinstance(value, (int, float)):
                continue
            label = name if filter_name in ("", "none") else f"{name}[{filter_name}]"
            figures[f"eval_{task}/{label}"] = float(value)
    return figures


def task_evaluator(model, cfg):
    """`evaluate() -> {eval_<task>/<metric>: value}` over `--eval_tasks` on `model`, its tasks
    checked now (before any compile): unknown names and task files that do not parse are errors."""
    import lm_eval

    from easytune.eval.__main__ import resolve_tasks
    from easytune.eval.lm_eval_backend import EasytuneLM
    task_manager, tasks = resolve_tasks(cfg.eval_tasks, cfg.eval_include_path or None, "--eval_include_path")
    lm = EasytuneLM(model=model, batch_size=cfg.eval_batch_size, max_gen_toks=cfg.eval_max_gen_toks, seed=cfg.seed)
    limit = cfg.eval_limit or None

    def evaluate() -> dict[str, float]:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=cfg.eval_num_fewshot if cfg.eval_num_fewshot >= 0 else None,
            limit=limit, task_manager=task_manager, apply_chat_template=cfg.eval_apply_chat_template,
            random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed, verbosity="WARNING")
        return metric_figures(results)

    return evaluate
