"""Training: configs and routing recipes, the loop, checkpoints, metrics and reports."""
