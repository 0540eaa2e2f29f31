"""KTO: `python -m easytune.train_kto --model=... --train_data=examples.jsonl`.

Data: unpaired examples {prompt, completion, label: true|false} (TRL's unpaired preference layout,
text or messages), or preference pairs {prompt, chosen, rejected}, unpaired as TRL does.
Losses: --loss_type=kto (with the KL baseline from each example's KL companion: its prompt with
another example's completion) or apo_zero_unpaired (definitions in `easytune.algos.kto`). The
reference policy, as for DPO: the base with the adapter off (--peft=lora, the default), a frozen
copy (--peft=none), or log-probs precomputed in one pass (--precompute_reference).
Every flag: `python -m easytune.train_kto --help`. The recipe: `easytune.algos.kto.KTORecipe`.
"""

from easytune import run as driver
from easytune.algos.kto import RECIPE

DEFAULTS, DOCS, run, main = driver.entry_point(RECIPE)

if __name__ == "__main__":
    driver.launch(main)
