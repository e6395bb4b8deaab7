"""poet-mlx: preference alignment (DPO, SimPO, POET) of MLX language models with LoRA.

Importing this package is cheap: heavy modules (mlx_lm, datasets) load inside the functions that need them.
On Linux it first routes MLX's CPU matmuls to OpenBLAS (see `poet_mlx.backends.blas`), which must happen before
`mlx.core` loads; set POET_MLX_BLAS=reference to keep MLX's bundled reference BLAS.
"""

from .backends.blas import enable_fast_blas as _enable_fast_blas

__version__ = "0.1.0"

_enable_fast_blas()
