"""Training: optimizer, loop, evaluation and run state."""
