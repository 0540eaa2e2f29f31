"""Tulu-3-style SFT of Llama-3.1-8B (open-instruct's recipe: lr 5e-6, linear decay, 3% warmup,
2 epochs, summed loss, 4k context) on a TPU pod or GPU cluster:

    python -m easytune.train_sft --config=configs/tulu3_sft_llama3_8b.py \\
        --model=meta-llama/Llama-3.1-8B --train_data=allenai/tulu-3-sft-mixture --output_dir=gs://...
"""


def get_config():
    return {
        "mesh_dim": "1,-1,1",
        "batch_size": 128,
        "seq_length": 4096,
        "grad_accum_steps": 1,
        "num_epochs": 2,
        "dtype": "bfloat16",
        "param_dtype": "float32",
        "remat": "dots_no_batch",
        "loss_reduction": "sum",
        "chat_template": "tulu",
        "optimizer": {"lr": 5e-6, "schedule": "linear", "warmup_ratio": 0.03, "min_lr_ratio": 0.0,
                      "weight_decay": 0.0, "clip_grad_norm": 1.0},
        "save_steps": 1000,
        "keep_checkpoints": 2,
    }
