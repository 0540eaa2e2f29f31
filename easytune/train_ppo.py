"""RL fine-tuning: `python -m easytune.train_ppo --algo=ppo|grpo|dapo|dr_grpo|gspo|rloo --reward_fn=module:function`.

The algorithms (ppo with a critic and GAE, grpo with group-relative baselines and its family dapo,
dr_grpo and gspo, rloo with leave-one-out baselines) and their options: `easytune.rl.recipe`.

The reward is a Python function over prompts and completions (`--reward_fn=module:function`, see
`easytune.rewards`) or an easytune reward model (`--reward_model`: a train_reward run or an HF
`*ForSequenceClassification` directory, scoring the prompt + completion through the chat template).
The policy may be an adapter (`--peft=lora`, the default; qlora, dora): the reference is then the
base with the adapter off, no copy. With `--peft=none` all weights train and the reference is a
frozen copy.

With no flags it runs the embedded default: SmolLM2-135M-Instruct (bundled) with LoRA, prompts
from the verifiable tasks, the exact-match reward (`easytune.rewards:exact_match`), and held-out
exact-match accuracy before and after. Every flag: `python -m easytune.train_ppo --help`. The recipe:
`easytune.rl.recipe.RLRecipe`.

Outputs in --output_dir: metrics.jsonl (one record per iteration: reward/mean and std, objective/kl,
objective/entropy, policy/clipfrac, policy/approxkl, value/loss, value/explained_variance,
response/length_mean, time/generation vs time/train, ...), checkpoints/ (the policy) and
value/checkpoints/ (the critic), summary.json.
"""

from easytune import run as driver
from easytune.rl.recipe import RECIPE, make_scorer  # noqa: F401 (make_scorer: this module's API too)

DEFAULTS, DOCS, run, main = driver.entry_point(RECIPE)

if __name__ == "__main__":
    driver.launch(main)
