"""RL fine-tuning: `python -m easytune.train_ppo --algo=ppo|grpo|rloo --reward_fn=module:function ...`.

- **ppo**: a policy, a frozen reference, a critic (the value model: `--value_model`, else the reward
  model, else the policy's initial weights with a fresh value head), the per-token KL penalty
  folded into the rewards (`--kl_estimator=k1|k3`, fixed or `--adaptive_kl`), GAE(γ, λ), whitened
  advantages, clipped policy and value losses, `--ppo_epochs` over `--num_minibatches`.
- **grpo**: no critic; each prompt's `--rollouts_per_prompt` completions are compared with their
  group's mean (divided by the std, `--scale_rewards`); KL as k3 in the loss (`--kl_in=loss`, the
  default) or in the reward.
- **rloo**: no critic; leave-one-out baselines, a sequence-level clipped ratio; KL in the reward (the
  default) or, with `--kl_in=loss`, each sequence's summed k3 in the loss.

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
from absl import app

from easytune import run as driver
from easytune.rl.recipe import RECIPE, make_scorer  # noqa: F401 (make_scorer: this module's API too)

DEFAULTS, DOCS, run, main = driver.entry_point(RECIPE)

if __name__ == "__main__":
    app.run(main)
