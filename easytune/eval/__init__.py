"""Evaluation: easytune's model as an lm-evaluation-harness backend (`python -m easytune.eval`)."""
from __future__ import annotations


def __getattr__(name):  # lm_eval is imported only when evaluation is used
    if name == "EasytuneLM":
        from easytune.eval.lm_eval_backend import EasytuneLM
        return EasytuneLM
    raise AttributeError(name)
