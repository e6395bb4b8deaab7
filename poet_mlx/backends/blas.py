"""Fast matrix multiplies for MLX's CPU backend on Linux (the "Linux BLAS trap").

The Linux `mlx[cpu]` wheel links the netlib reference BLAS: fp32 GEMM runs at ~4 GFLOP/s where OpenBLAS
reaches 40-200 on the same cores. MLX resolves `cblas_sgemm` (and `cblas_dgemm`, `cblas_cgemm`) when
`libmlx.so` loads, searching the process's global symbol scope first. So a library that defines those
symbols and is loaded with RTLD_GLOBAL *before* `mlx.core` wins, and MLX's GEMMs run on OpenBLAS, with no
change to MLX itself. LAPACK calls (linalg) stay on the bundled reference library.

The OpenBLAS comes from PyPI's `scipy-openblas32` (a dependency on Linux). Its symbols carry a `scipy_`
prefix, so a three-function C shim forwards `cblas_?gemm` to `scipy_cblas_?gemm`. The shim is compiled
once per machine with the C compiler that MLX's CPU backend already needs (its kernels are JIT-compiled),
and cached. Nothing here runs on macOS, where MLX uses Metal and Accelerate.

Threads: OpenBLAS gets every core this process may run on, unless the user sets `POET_MLX_BLAS_THREADS`,
`OPENBLAS_NUM_THREADS` or `OMP_NUM_THREADS`, and its idle workers sleep at once instead of spinning
(`OPENBLAS_THREAD_TIMEOUT=4`, unless set): a spinning worker steals the core that MLX's own single-threaded
kernels, the next GEMM's caller or another process needs. Measured on SmolLM2-135M, 2 cores, DPO 2 x 256:
a step takes 4.1-4.4 s with 2 threads, 7.1-7.8 s with 1; with a busy process on one of the cores 9.0 s
with 2 threads and the timeout, 12.7 s without it. (Until MLX's evaluation stopped being held back to one
queued op at a time, `runahead` in earlier versions, 2 threads were slower than 1: the calling thread
busy-waited on that op and took the second core.) On a machine shared with other heavy work,
`POET_MLX_BLAS_THREADS=1` is faster still (6.7 s in the same test).

Off switch: `POET_MLX_BLAS=reference` in the environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..fsutil import cache_root
from . import compile_to, switched_off

ENV_SWITCH = "POET_MLX_BLAS"
ENV_THREADS = "POET_MLX_BLAS_THREADS"
WORKER_TIMEOUT = ("OPENBLAS_THREAD_TIMEOUT", "4")
"""OpenBLAS's idle workers spin 2**n cycles before they sleep (n from 4 to 30; default 28, about 0.1 s)."""

SHIM_SOURCE = r"""
/* poet-mlx: forward MLX's CBLAS GEMM calls to scipy-openblas32 (symbols prefixed scipy_). */
extern void scipy_cblas_sgemm(int, int, int, int, int, int, float, const float *, int, const float *, int,
                              float, float *, int);
extern void scipy_cblas_dgemm(int, int, int, int, int, int, double, const double *, int, const double *, int,
                              double, double *, int);
extern void scipy_cblas_cgemm(int, int, int, int, int, int, const void *, const void *, int, const void *,
                              int, const void *, void *, int);
void cblas_sgemm(int o, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
  scipy_cblas_sgemm(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void cblas_dgemm(int o, int ta, int tb, int m, int n, int k, double alpha, const double *a, int lda,
                 const double *b, int ldb, double beta, double *c, int ldc) {
  scipy_cblas_dgemm(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void cblas_cgemm(int o, int ta, int tb, int m, int n, int k, const void *alpha, const void *a, int lda,
                 const void *b, int ldb, const void *beta, void *c, int ldc) {
  scipy_cblas_cgemm(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
"""


@dataclass
class BlasStatus:
    """What `enable_fast_blas` did: `active` is True when MLX's GEMMs go to OpenBLAS."""

    active: bool = False
    reason: str = "not attempted"
    library: Optional[str] = None
    threads: Optional[int] = None


STATUS = BlasStatus()
_OPENBLAS = None
"""The loaded OpenBLAS (ctypes), once `enable_fast_blas` succeeded."""


def _build_shim(lib_dir: Path) -> Path:
    """Compile (once) the forwarding shim against the OpenBLAS in `lib_dir`; returns the .so path."""
    key = hashlib.sha256((SHIM_SOURCE + str(lib_dir)).encode()).hexdigest()[:16]
    out = cache_root() / "blas" / key / "libpoet_blas_shim.so"
    if out.is_file():
        return out
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        raise RuntimeError("no C compiler (cc/gcc/clang) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.parent / "shim.c"
    src.write_text(SHIM_SOURCE)
    cmd = [compiler, "-O2", "-shared", "-fPIC", str(src), f"-L{lib_dir}", "-lscipy_openblas", f"-Wl,-rpath,{lib_dir}"]
    return compile_to(cmd, out, "the BLAS shim", timeout=120)


def enable_fast_blas() -> BlasStatus:
    """Route MLX's CPU GEMMs to OpenBLAS. Call before `mlx.core` is imported; safe to call twice.

    Never raises: on any failure MLX keeps its reference BLAS (slower, same results up to rounding) and
    STATUS.reason says why.
    """
    global STATUS
    if STATUS.active:
        return STATUS
    if not sys.platform.startswith("linux"):
        STATUS = BlasStatus(False, "not Linux: MLX uses Metal/Accelerate")
    elif switched_off(ENV_SWITCH, "reference"):
        STATUS = BlasStatus(False, f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}")
    elif "mlx.core" in sys.modules:
        STATUS = BlasStatus(False, "mlx.core was imported before poet_mlx; MLX keeps its reference BLAS")
    else:
        STATUS = _load()
    return STATUS


def _load() -> BlasStatus:
    try:
        import scipy_openblas32
    except ImportError:
        return BlasStatus(False, "scipy-openblas32 is not installed (pip install scipy-openblas32)")
    try:
        lib_dir = Path(scipy_openblas32.get_lib_dir())
        os.environ.setdefault(*WORKER_TIMEOUT)  # read when the library loads
        openblas = ctypes.CDLL(str(lib_dir / "libscipy_openblas.so"), mode=ctypes.RTLD_GLOBAL)
        shim = _build_shim(lib_dir)
        ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return BlasStatus(False, f"OpenBLAS not loaded ({exc}); MLX keeps its reference BLAS")
    global _OPENBLAS
    _OPENBLAS = openblas
    threads = blas_threads()
    if threads is not None:
        openblas.scipy_openblas_set_num_threads(threads)
    threads = int(openblas.scipy_openblas_get_num_threads())
    return BlasStatus(True, "OpenBLAS (scipy-openblas32) for MLX's CPU matmuls", str(shim), threads)


@contextlib.contextmanager
def gemm_threads(n: int):
    """OpenBLAS runs each GEMM on at most n threads inside the context, as before after it (`parallel_rows`: two
    streams' GEMMs side by side, one thread each). MLX is synchronized on entry and exit, so no GEMM in flight
    sees the change. A no-op where MLX's GEMMs do not go to OpenBLAS, or where n is already the setting."""
    if _OPENBLAS is None:  # set only once MLX's GEMMs go to OpenBLAS
        yield
        return
    before = int(_OPENBLAS.scipy_openblas_get_num_threads())
    if before == n:
        yield
        return
    import mlx.core as mx

    mx.synchronize()
    _OPENBLAS.scipy_openblas_set_num_threads(n)
    try:
        yield
    finally:
        mx.synchronize()
        _OPENBLAS.scipy_openblas_set_num_threads(before)


def blas_threads() -> Optional[int]:
    """OpenBLAS threads to set: POET_MLX_BLAS_THREADS if given; None (OpenBLAS decides) when the user set
    OPENBLAS_NUM_THREADS or OMP_NUM_THREADS; else the cores this process may run on."""
    value = os.environ.get(ENV_THREADS, "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    if os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
