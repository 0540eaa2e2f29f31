"""Knowledge distillation: `python -m easytune.train_distill --teacher=DIR --model=STUDENT --train_data=...`.

The student learns the frozen teacher's next-token distributions on the trained (assistant) tokens
of SFT data: forward KL (--beta=0), reverse KL (--beta=1) or the generalized JSD between (TRL's
GKD loss), at --temperature. Teacher and student share one tokenizer. Every flag:
`python -m easytune.train_distill --help`. The recipe: `easytune.algos.distill.DistillRecipe`.
"""

from easytune import run as driver
from easytune.algos.distill import RECIPE

DEFAULTS, DOCS, run, main = driver.entry_point(RECIPE)

if __name__ == "__main__":
    driver.launch(main)
