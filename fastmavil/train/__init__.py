"""Training: the pre-training loop, checkpoints, metrics and the fastmavil-train command."""
