"""ILQL (offline RL): `python -m easytune.train_ilql --model=... --train_data=episodes.jsonl`.

Data: logged episodes {prompt, completion, reward} or {messages, reward}, rewards z-scored over the
data as trlx does. The LM trains jointly with V and two Q heads (and Polyak-averaged target Q
heads); the LM exports to HF as usual, the heads are in every checkpoint (item `heads`) and in
<output_dir>/ilql_heads.safetensors (trlx's names), for steered sampling with
`model.generate(..., steer=easytune.algos.ilql.steering(heads, beta))`.
Every flag: `python -m easytune.train_ilql --help`. The recipe: `easytune.algos.ilql.ILQLRecipe`.
"""

from easytune import run as driver
from easytune.algos.ilql import RECIPE

DEFAULTS, DOCS, run, main = driver.entry_point(RECIPE)

if __name__ == "__main__":
    driver.launch(main)
