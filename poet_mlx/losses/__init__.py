"""Preference losses: one registry entry per loss (`registry`, no MLX), its formula as a pure function of per-pair
log-probs (`pairwise`), and a weighted mix of them with TRL's metrics (`mixture`).

Importing this package loads only the registry, so config validation and `--help` stay free of MLX; import
`poet_mlx.losses.pairwise` / `poet_mlx.losses.mixture` for the math.
"""

from .registry import ALIASES, LOSS_NAMES, LOSS_SPECS, REWARDS, LossSpec, Mixture, spec, split_names

__all__ = ["ALIASES", "LOSS_NAMES", "LOSS_SPECS", "REWARDS", "LossSpec", "Mixture", "spec", "split_names"]
