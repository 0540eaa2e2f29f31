"""Training algorithms as pure loss functions over `(params, batch)`: SFT, DPO and its variants,
reward models, PPO/GRPO. Each plugs into the one training loop in `easytune.train`."""
