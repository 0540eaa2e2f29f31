"""The embedded default job's settings, spelled out: SmolLM2-135M-Instruct on generated verifiable
tasks, sized to finish in about 10 minutes on a 2-core CPU.

    python -m easytune.train_sft --config=configs/smollm2_tasks.py
"""


def get_config():
    return {
        "batch_size": 8,
        "seq_length": 256,
        "optimizer": {"lr": 1e-4, "schedule": "cosine", "warmup_ratio": 0.05, "min_lr_ratio": 0.1},
        "tasks": {"num_train": 640, "num_heldout": 100, "max_new_tokens": 16},
    }
