"""Preference optimization: `python -m easytune.train_dpo --model=... --train_data=pairs.jsonl`.

Losses: --loss_type=sigmoid (DPO; --label_smoothing gives cDPO), ipo, hinge, robust, orpo, simpo
(definitions in `easytune.algos.dpo`). The reference policy is, by what the run trains:
- an adapter (--peft=lora, the default here; qlora, dora, ...): the base model with the adapter
  off: no second copy;
- all weights (--peft=none): a frozen copy of the initial weights, sharded like them, without
  optimizer state;
- either, with --precompute_reference: reference log-probs computed in one pass before training
  and cached in <output_dir>/reference_logps_{train,eval}.npz (reused on --resume); then no
  reference model is held during training.
ORPO and SimPO (and --reference_free) use no reference.

With no flags it runs the embedded default: SmolLM2-135M-Instruct (bundled) with LoRA on
preference pairs built from verifiable tasks (chosen = the exact answer, rejected = the model's
own wrong greedy answer, or a perturbed one), with held-out exact-match accuracy before and after.
Every flag: `python -m easytune.train_dpo --help`. The recipe: `easytune.algos.dpo.DPORecipe`.
"""

from easytune import run as driver
from easytune.algos.dpo import RECIPE

DEFAULTS, DOCS, run, main = driver.entry_point(RECIPE)

if __name__ == "__main__":
    driver.launch(main)
