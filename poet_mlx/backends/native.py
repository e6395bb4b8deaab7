"""poet-mlx's own CPU kernels as MLX primitives (Linux): causal attention and the output head's log-probs
(`kernels.cpp`).

MLX's CPU backend runs each elementwise op as its own pass through memory, single-threaded, and Python can
only compose such ops: `fast_layers.attend_forward` already computes each query block's scores key-major,
fuses exp(s - max) into one vectorized kernel and folds the normalizer into the value matmul, and still, at
16 x 512 tokens, only a quarter of its time is matrix multiplication; the exps, maxima, masks and copies over
(keys, queries) score blocks too big for a core's cache take the rest; the head's online logsumexp over
vocabulary blocks (`blocked_head`) likewise. The C++ kernels keep each block's scores in the cache from one
GEMM to the next (`kernels.cpp` says how), and compute the same numbers to float32 rounding
(`tests/test_native.py`).

It is built once per machine, like the BLAS shim (`blas`): g++ (which MLX's CPU backend already needs) compiles
it against the headers and `libmlx` in the installed `mlx` wheel and the nanobind that MLX's Python module is
built with (`nanobind` is a Linux dependency), with `jit.FLAGS` (vectorized for this CPU), into
poet-mlx's cache, keyed by the source, the versions, the compiler and the CPU. After loading, a probe checks
that MLX arrays pass into it (the nanobind ABI matches) and that it agrees with plain MLX ops on small
cases. Any failure leaves `fast_layers` and `blocked_head` on their MLX ops, and STATUS says why: never an
error.
Off switch: `POET_MLX_KERNELS=python`. Nothing is built on macOS or where MLX runs on a GPU.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import sysconfig
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Optional

from ..fsutil import cache_root
from . import Status, compile_to, on_linux_cpu, switched_off

ENV_SWITCH = "POET_MLX_KERNELS"
MODULE = "_poet_kernels"
SOURCE = Path(__file__).with_name("kernels.cpp")


STATUS = Status()
"""What `kernels()` found: `active` when poet-mlx's kernels are loaded from `where`."""
_MODULE: Optional[ModuleType] = None
_DECIDED = False
"""Set once `kernels` has loaded the kernel or given up: it is not retried at every layer."""


def kernels() -> Optional[ModuleType]:
    """The loaded kernel module (`forward(q, k, v, block)`, `backward(q, k, v, d_out, out, lse, block)`,
    `head(hidden, weight, targets, grad, rows, words)`, see `kernels.cpp`), built on first call; None where it
    is switched off, not wanted or failed (STATUS says why). Never raises."""
    global STATUS, _MODULE, _DECIDED
    if _DECIDED:
        return _MODULE if _MODULE is not None and on_linux_cpu() else None  # not for a GPU stream set later
    _DECIDED = True  # a call from another thread during the build gets None (the MLX ops) meanwhile
    if switched_off(ENV_SWITCH, "python"):
        STATUS = Status(False, f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}")
    elif not on_linux_cpu():
        STATUS = Status(False, "not Linux with MLX on the CPU")
    else:
        try:
            path = _build()
            module = _load(path)
            _probe(module)
        except Exception as exc:  # noqa: BLE001: whatever fails here, the MLX ops compute the same numbers
            STATUS = Status(False, f"kernels not used ({str(exc)[:300]}); attention and the head run on MLX ops")
        else:
            _MODULE = module
            STATUS = Status(True, "poet-mlx's attention and head kernels for MLX's CPU backend", str(path))
    return _MODULE


def _paths() -> dict:
    """Include and library folders: nanobind's, Python's, MLX's."""
    try:
        import nanobind
    except ImportError as exc:
        raise ImportError("nanobind is not installed (pip install nanobind)") from exc
    import mlx

    nb = Path(nanobind.__file__).parent
    mlx_root = Path(next(iter(mlx.__path__)))
    return {"nanobind": nb, "python": Path(sysconfig.get_paths()["include"]), "mlx": mlx_root}


def _compiler() -> str:
    from .jit import _BEFORE

    # Not the `jit` wrapper (first on PATH once it is set up): the flags are given here, and its folder is
    # keyed for MLX's kernels.
    path = _BEFORE.get("PATH") or os.environ.get("PATH")
    compiler = os.environ.get("CXX") or shutil.which("g++", path=path) or shutil.which("c++", path=path)
    if not compiler:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    return compiler


OWN_FLAGS = ("-O3", "-std=c++20", "-shared", "-fPIC", "-fvisibility=hidden", "-mprefer-vector-width=512")
"""With `jit.FLAGS`. 512-bit vectors where the CPU has them (GCC defaults to 256): forward and backward ~3% faster
on AVX-512 (16 x 512 tokens, SmolLM2's heads, one thread: 59-60 -> 57-58 ms and 107-108 -> 104-105 ms)."""


def _build() -> Path:
    """Compile (once per key: the source, the command, the versions, the compiler and the CPU) the kernel; returns
    the extension's path."""
    from .jit import FLAGS, _cpu_key

    paths, compiler = _paths(), _compiler()
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    nb, lib = paths["nanobind"], paths["mlx"] / "lib"
    cmd = [compiler, *OWN_FLAGS, *FLAGS,
           "-DNB_DOMAIN=mlx",  # MLX's Python module registers mx.array in nanobind's "mlx" domain
           "-I", str(nb / "include"), "-I", str(nb / "ext" / "robin_map" / "include"), "-I", str(paths["python"]),
           "-I", str(paths["mlx"] / "include"), str(SOURCE), str(nb / "src" / "nb_combined.cpp"),
           f"-L{lib}", "-lmlx", f"-Wl,-rpath,{lib}"]
    key = hashlib.sha256(SOURCE.read_bytes())
    for part in (*cmd, metadata.version("mlx"), metadata.version("nanobind"), suffix, _cpu_key(compiler)):
        key.update(part.encode())
    out = cache_root() / "native" / key.hexdigest()[:16] / f"{MODULE}{suffix}"
    return out if out.is_file() else compile_to(cmd, out, "the kernels", timeout=600)


def _load(path: Path) -> ModuleType:
    """Import the built extension; a library that does not load (a truncated or foreign file) is removed, so
    the next process builds it again."""
    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, str(path), loader=loader)
    try:
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except ImportError:
        path.unlink(missing_ok=True)
        raise
    return module


def _probe(module: ModuleType) -> None:
    """Raise unless the kernels take MLX arrays and match plain MLX ops (gradients by autodiff) on small cases:
    softmax attention with grouped queries over several query blocks, forward and backward, and the head's
    log-probs and their hidden-state gradient over several row chunks and vocabulary blocks."""
    import mlx.core as mx

    keys = mx.random.split(mx.random.key(0), 6)
    b, kv, g, t, d = 2, 2, 3, 11, 8
    q = mx.random.normal((b, kv, g, t, d), key=keys[0])
    k, v = mx.random.normal((b, kv, t, d), key=keys[1]), mx.random.normal((b, kv, t, d), key=keys[2])
    d_out = mx.random.normal((b, t, kv, g, d), key=keys[3])

    def attention(q, k, v):  # (B, T, KV, g, D), token-major as the kernel writes it
        s = mx.where(mx.tril(mx.ones((t, t), mx.bool_)), mx.einsum("bkgtd,bksd->bkgts", q, k), -mx.inf)
        return mx.einsum("bkgts,bksd->btkgd", mx.softmax(s, axis=-1), v)

    out, lse = module.forward(q, k, v, 4)
    (want,), grads = mx.vjp(attention, [q, k, v], [d_out])
    pairs = [(out, want)] + list(zip(module.backward(q, k, v, d_out, out, lse, 4), grads))

    hidden, weight = mx.random.normal((7, d), key=keys[4]), mx.random.normal((19, d), key=keys[5])
    targets = mx.arange(7) * 5 % 19

    def logps(hidden):
        scores = hidden @ weight.T
        return mx.take_along_axis(scores, targets[:, None], axis=1)[:, 0] - mx.logsumexp(scores, axis=1)

    ours = module.head(hidden, weight, targets, True, 3, 4)
    pairs += [(ours[0], logps(hidden)), (ours[1], mx.grad(lambda h: logps(h).sum())(hidden))]
    for a, b in pairs:
        if a.shape != b.shape or not mx.allclose(a, b, rtol=1e-4, atol=1e-5).item():
            raise RuntimeError("a kernel disagrees with MLX ops on the probe")
