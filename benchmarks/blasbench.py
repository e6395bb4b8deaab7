"""Matmul rates: MLX float32 GEMM with and without poet-mlx's OpenBLAS routing, against numpy's sgemm.

Which BLAS MLX uses is decided when `mlx.core` loads, so each setting runs in a fresh process:
`python -m benchmarks.blasbench '<json spec>'` with POET_MLX_BLAS=reference or not. Shapes are (M, K, N)
for `a (M, K) @ b (K, N)`; `transposed` shapes multiply by `w.T` with `w (N, K)`, as `nn.Linear` does.
numpy's own OpenBLAS (its wheel bundles one, with its default threads) stands for the machine's best rate.
`quant_shapes` also time 4-bit matmuls: MLX's CPU `quantized_matmul` against `poet_mlx.backends.fast_quant`.
"""

from __future__ import annotations

import statistics
import sys
import time

import poet_mlx  # noqa: F401  (first: OpenBLAS before mlx.core, unless POET_MLX_BLAS=reference)
from benchmarks.report import child_main


def _rate(fn, flops: float, budget_s: float) -> float:
    """GFLOP/s of fn (median of timed calls after one warm-up, within ~budget_s, at least 2 calls)."""
    fn()
    times, spent = [], 0.0
    while len(times) < 2 or (spent < budget_s and len(times) < 20):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
        spent += times[-1]
    return flops / statistics.median(times) / 1e9


def run(spec: dict) -> dict:
    import mlx.core as mx
    import numpy as np

    from poet_mlx.backends import blas

    rows = []
    for m, k, n, transposed in spec["shapes"]:
        a = mx.random.normal((m, k), key=mx.random.key(1))
        w = mx.random.normal((n, k) if transposed else (k, n), key=mx.random.key(2))
        mx.eval(a, w)
        flops = 2.0 * m * k * n
        mlx_fn = (lambda: mx.eval(a @ w.T)) if transposed else (lambda: mx.eval(a @ w))
        an, wn = np.array(a), np.array(w)
        np_fn = (lambda: an @ wn.T) if transposed else (lambda: an @ wn)
        rows.append({"shape": [m, k, n], "transposed": transposed,
                     "mlx_gflops": _rate(mlx_fn, flops, spec.get("budget_s", 0.5)),
                     "numpy_gflops": _rate(np_fn, flops, spec.get("budget_s", 0.5)) if spec.get("numpy") else None})
    quant = [_quant_row(m, k, n, dtype, spec.get("budget_s", 0.5)) for m, k, n, dtype in spec.get("quant_shapes", [])]
    return {"blas_active": blas.STATUS.active, "threads": blas.STATUS.threads, "reason": blas.STATUS.reason,
            "table": rows, "quant": quant}


def _quant_row(m: int, k: int, n: int, dtype: str, budget_s: float) -> dict:
    """4-bit (group 64) x @ W.T: MLX's `quantized_matmul` against poet-mlx's dequantize + GEMM path."""
    import mlx.core as mx

    from poet_mlx.backends.fast_quant import dequantized_matmul

    x = mx.random.normal((m, k), key=mx.random.key(3)).astype(getattr(mx, dtype))
    w = (mx.random.normal((n, k), key=mx.random.key(4)) / k ** 0.5).astype(getattr(mx, dtype))
    wq, scales, biases = mx.quantize(w, 64, 4)
    mx.eval(x, wq, scales, biases)
    flops = 2.0 * m * k * n
    fast = dequantized_matmul(64, 4)
    native = lambda: mx.eval(mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=64, bits=4))
    return {"shape": [m, k, n], "dtype": dtype,
            "native_gflops": _rate(native, flops, budget_s),
            "fast_gflops": _rate(lambda: mx.eval(fast(x, wq, scales, biases)), flops, budget_s)}


def main(argv=None) -> int:
    return child_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
