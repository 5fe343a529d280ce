"""Training engine: batching, log-probs, the one training loop, objectives, checkpoints, recipes, launcher."""
