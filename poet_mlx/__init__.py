"""poet-mlx: preference alignment (DPO, SimPO, POET) of MLX language models with LoRA.

Importing this package is cheap: heavy modules (mlx_lm, datasets) load inside the functions that need them.
"""

__version__ = "0.1.0"
