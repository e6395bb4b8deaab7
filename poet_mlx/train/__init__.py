"""Training: the run (data -> reference -> trainer), the loop, reference log-probs, checkpoints, data parallel, SFT."""
