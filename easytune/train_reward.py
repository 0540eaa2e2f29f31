"""Reward models: `python -m easytune.train_reward --model=... --train_data=pairs.jsonl`.

A scalar `score` head [hidden, 1] replaces the LM head of the starting model (or continues a reward
model's) and is read at each sequence's last token; the loss is Bradley–Terry on (chosen,
rejected) pairs, with the data's optional `margin` field subtracted and optional reward centering
(`--center_rewards_coefficient`), as TRL's RewardTrainer (`easytune.algos.reward`). Pairs use the
layouts of `train_dpo` (`easytune.data.preference`). Eval reports pairwise accuracy.
`--export_hf` writes transformers' `LlamaForSequenceClassification` (or Mistral's) with
`num_labels=1`; `easytune.load` of that directory or of the run gives a model whose `.score(...)`
returns the rewards.

With no flags it runs the embedded default: SmolLM2-135M-Instruct (bundled) trained on preference
pairs from verifiable tasks (as train_dpo's default job), with held-out pairwise accuracy before
and after. Every flag: `python -m easytune.train_reward --help`. The recipe:
`easytune.algos.reward.RewardRecipe`.
"""

from easytune import run as driver
from easytune.algos.reward import RECIPE

DEFAULTS, DOCS, run, main = driver.entry_point(RECIPE)

if __name__ == "__main__":
    driver.launch(main)
