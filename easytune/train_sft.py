"""Supervised fine-tuning: `python -m easytune.train_sft --mesh_dim=1,-1,1 --model=... --train_data=...`.

With no flags it runs the embedded default: SmolLM2-135M-Instruct (bundled) fine-tuned on
verifiable tasks easytune generates, with held-out exact-match accuracy before and after, and an
HF export. Every flag: `python -m easytune.train_sft --help`.

Encoder-decoder models (T5) train on `{"input": ..., "target": ...}` records (`--seq2seq.*` names
the fields) with the seq2seq loss: `--seq_length` is the encoder's row length and
`--seq2seq.target_length` the decoder's. The recipe: `easytune.algos.sft.SFTRecipe`.
"""

from easytune import run as driver
from easytune.algos.sft import RECIPE

DEFAULTS, DOCS, run, main = driver.entry_point(RECIPE)

if __name__ == "__main__":
    driver.launch(main)
