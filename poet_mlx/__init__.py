"""poet-mlx: preference alignment (DPO, SimPO, POET) of MLX language models with LoRA.

Importing this package is cheap: it loads no MLX, no mlx-lm and no datasets, and compiles nothing. On Linux,
MLX's CPU matmuls are routed to OpenBLAS (`backends.blas`), which must happen before `mlx.core` loads: an
import hook does it the first time anything imports `mlx.core` after `poet_mlx` (so `poet-mlx --help` never
builds the BLAS shim). Set POET_MLX_BLAS=reference to keep MLX's bundled reference BLAS.

The main entry points, importable from here: `RunConfig`, `validate`, `run_training`, `run_evaluation`,
`Reporter`, `PoetError`.
"""

import sys as _sys

__version__ = "0.1.0"

_PUBLIC = {
    "RunConfig": "poet_mlx.config",
    "validate": "poet_mlx.config",
    "PoetError": "poet_mlx.errors",
    "Reporter": "poet_mlx.reporting",
    "run_training": "poet_mlx.train.run",
    "run_evaluation": "poet_mlx.analysis.evaluate",
}


class _BlasBeforeMlx:
    """A meta-path finder that runs `backends.enable_process_wide` just before `mlx.core` is first imported,
    then steps aside (it finds nothing itself, so the normal import proceeds)."""

    def find_spec(self, name, path=None, target=None):
        if name == "mlx.core":
            _sys.meta_path[:] = [f for f in _sys.meta_path if f is not self]
            from .backends import enable_process_wide

            enable_process_wide()
        return None


if "mlx.core" in _sys.modules:
    from .backends import enable_process_wide as _enable

    _enable()  # too late to route the BLAS (backends.blas.STATUS says why); the rest still applies
elif not any(isinstance(f, _BlasBeforeMlx) for f in _sys.meta_path):
    _sys.meta_path.insert(0, _BlasBeforeMlx())


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'poet_mlx' has no attribute {name!r}")


__all__ = list(_PUBLIC) + ["__version__"]
