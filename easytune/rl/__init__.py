"""RL on the run driver: rollouts through the one generate call, scoring, advantages and updates
as an iteration step source (`rollout.RLSteps`), and the PPO/GRPO-family/RLOO recipe (`recipe.RECIPE`,
`python -m easytune.train_ppo`). The algorithms' pieces (advantage estimators, policy losses, KL
placements, loss types) are registered by name in `easytune.algos.ppo`."""
from easytune.rl.rollout import (RLSteps, RolloutConfig, completion_ids, minibatch_rows, prompt_batches,
                                 response_rows)

__all__ = ["RLSteps", "RolloutConfig", "completion_ids", "minibatch_rows", "prompt_batches", "response_rows"]
