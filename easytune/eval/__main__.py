"""Evaluate a model with lm-evaluation-harness tasks on easytune's jitted, sharded model.

    python -m easytune.eval --model outputs/sft --tasks hellaswag,gsm8k --num_fewshot 5 \
        --output_path results/ --log_samples --mesh_dim 1,-1,1

The flags mirror `lm_eval`'s CLI (tasks, few-shot, limit, batch size, local task YAMLs with
`--include_path`, results and per-sample files with `--output_path`/`--log_samples`, chat
templates) plus easytune's model flags. Launch the same command on every worker of a multi-host
job: every process evaluates the same requests on the shared mesh and process 0 writes the files.
"""
from __future__ import annotations

import argparse
import json
import os


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF directory, easytune checkpoint or run directory "
                                                      "(default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", default=None, help="a peft or easytune adapter on top of --model")
    parser.add_argument("--dtype", default=None, help="compute dtype (float32, bfloat16)")
    parser.add_argument("--mesh_dim", default="1,-1,1", help="dp,fsdp,mp over all devices (one may be -1)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names")
    parser.add_argument("--num_fewshot", type=int, default=None)
    parser.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_gen_toks", type=int, default=256)
    parser.add_argument("--include_path", default=None, help="a folder of local task YAMLs")
    parser.add_argument("--output_path", default=None, help="where lm-eval's results JSON goes")
    parser.add_argument("--log_samples", action="store_true", help="also write lm-eval's per-sample files")
    parser.add_argument("--apply_chat_template", action="store_true", help="render prompts with the chat template")
    parser.add_argument("--fewshot_as_multiturn", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.log_samples and not args.output_path:
        parser.error("--log_samples needs --output_path.")
    return args


def check_task_files(folder: str) -> None:
    """Every task YAML under `folder` parses (lm-eval itself would skip a broken one with a log line
    and then report its task as unknown)."""
    import glob

    from lm_eval.tasks._yaml_loader import load_yaml  # the loader lm-eval's TaskManager uses (!function tags)
    if not os.path.isdir(folder):
        raise ValueError(f"--include_path {folder} is not a folder of task YAMLs.")
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.yaml"), recursive=True)):
        try:
            load_yaml(path, resolve_func=False)
        except Exception as error:  # yaml's errors span lines: keep the first
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"task file {path} does not parse ({type(error).__name__}: {first}).") from None


def resolve_tasks(names: str, include_path: str | None, flag: str = "--include_path"):
    """`(TaskManager, task names)` for comma-separated `names`, local YAMLs under `include_path`
    checked first; an unknown name is an error naming it (and `flag`, where local tasks go).

    When every name is a task (not a group or tag, which may gather lm-eval's own tasks) defined
    under `include_path`, the manager indexes only that folder: lm-eval's full index parses its
    thousands of bundled YAMLs, 11.5 s per manager on a 2-core CPU, for the same task configs (a
    local task overrides a bundled one of the same name in the full index too)."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind
    tasks = [t.strip() for t in names.split(",") if t.strip()]
    task_manager = None
    if include_path is not None:
        check_task_files(include_path)
        local = TaskManager(include_path=include_path, include_defaults=False)
        if tasks and all(getattr(local.task_index.get(t), "kind", None) in (Kind.TASK, Kind.PY_TASK) for t in tasks):
            task_manager = local
    if task_manager is None:
        task_manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not task_manager.match_tasks([t])]
    if unknown:
        raise ValueError(f"unknown lm-eval task {unknown[0]!r}" + (f" (and {unknown[1:]})" if unknown[1:] else "")
                         + f"; list tasks with `lm_eval ls tasks`, or pass {flag} for local task YAMLs.")
    return task_manager, tasks


def evaluate(args) -> dict:
    """lm-eval's `simple_evaluate` over an `EasytuneLM`; returns its results dict."""
    import lm_eval

    from easytune.eval.lm_eval_backend import EasytuneLM
    task_manager, tasks = resolve_tasks(args.tasks, args.include_path)
    lm = EasytuneLM(model=args.model, adapter=args.adapter, dtype=args.dtype, mesh_dim=args.mesh_dim,
                    batch_size=args.batch_size, max_gen_toks=args.max_gen_toks, seed=args.seed)
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit, task_manager=task_manager,
        log_samples=args.log_samples, apply_chat_template=args.apply_chat_template,
        fewshot_as_multiturn=args.fewshot_as_multiturn, random_seed=args.seed, numpy_random_seed=args.seed,
        torch_random_seed=args.seed, fewshot_random_seed=args.seed)


def write_results(results: dict, output_path: str, log_samples: bool) -> None:
    """lm-eval's own result files (its EvaluationTracker): results JSON and per-sample JSONL."""
    from lm_eval.loggers import EvaluationTracker
    tracker = EvaluationTracker(output_path=output_path)
    samples = results.pop("samples", None)
    tracker.save_results_aggregated(results=results, samples=samples if log_samples else None)
    if log_samples and samples:
        for task_name in results["configs"]:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])


def main(argv=None) -> dict:
    from easytune import distributed
    distributed.initialize()  # a multi-host launch; a no-op on one machine
    import jax
    from lm_eval.utils import make_table
    args = parse_args(argv)
    results = evaluate(args)
    if jax.process_index() == 0:
        print(make_table(results))
        if args.output_path:
            write_results(dict(results), args.output_path, args.log_samples)
        else:
            print(json.dumps(results["results"], indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
