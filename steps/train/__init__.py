"""Training engine: batching, log-probs, the one loop, objectives, precision, DDP/FSDP2, collectives, DCP, launcher."""
