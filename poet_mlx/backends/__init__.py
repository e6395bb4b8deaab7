"""Fast paths for MLX's CPU backend on Linux: OpenBLAS for matmuls (`blas`), fused kernels built for this CPU
(`jit`), freed memory kept for reuse (`alloc`), attention and SwiGLU written for the CPU (`fast_layers`), the
attention and the output head's log-probs as poet-mlx's own C++ primitives built on first use (`native`),
LoRA-adapted blocks whose backward recomputes what is cheap (`lean_lora`), a batch's two row groups on two
CPU streams at once (`parallel_rows`), dequantize-then-GEMM for 4-bit layers (`fast_quant`), MLX's run-ahead
bounded on request (`runahead`)."""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class Status:
    """What a fast path's set-up did (`jit`, `native`): `active` when it is in use, `reason` in words, `where`
    the folder or library it uses."""

    active: bool = False
    reason: str = "not attempted"
    where: Optional[str] = None


def compile_to(command: list, out: Path, what: str, timeout: int) -> Path:
    """Run a compiler `command` (completed by `-o <temporary>`) and rename its output to `out`: atomic, since
    concurrent processes may race to build the same library; nothing is left behind when it fails or times
    out. Raises RuntimeError (with the start of the compiler's message) or subprocess.TimeoutExpired. Used by
    `blas` (the shim) and `native` (the kernels), which cache `out` and skip this when it exists."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    try:
        result = subprocess.run([*command, "-o", str(tmp)], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {what} failed: {result.stderr.strip()[:300]}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def on_linux_cpu() -> bool:
    """True on Linux with MLX's default device the CPU, where the CPU fast paths apply (on macOS MLX runs on
    Metal and Accelerate). Imports `mlx.core`: not for the hooks that must run before it (`blas`, `jit`)."""
    if not sys.platform.startswith("linux"):
        return False
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def spans(n: int, size: int) -> list[tuple[int, int]]:
    """[0, n) in consecutive (start, stop) pieces of `size` (the last may be shorter)."""
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def switched_off(env_switch: str, keep_word: str) -> bool:
    """Whether the environment variable `env_switch` turns a fast path off: `keep_word` (the name of what is
    kept instead: "default", "native", "reference"), "off", "0" or "no", in any case."""
    return os.environ.get(env_switch, "").lower() in (keep_word, "off", "0", "no")


def enable_process_wide() -> None:
    """The process-wide settings, run just before `mlx.core` is first imported (poet_mlx's import hook):
    OpenBLAS (which must come first), the JIT compiler flags, glibc's malloc and MLX's evaluation-tape width.
    Each never raises."""
    from .alloc import keep_freed_memory
    from .blas import enable_fast_blas
    from .jit import enable_fast_jit
    from .parallel_rows import set_tape_width

    enable_fast_blas()
    enable_fast_jit()
    keep_freed_memory()
    set_tape_width()
