"""MLX's fused CPU kernels compiled for this CPU (Linux).

`mx.compile` fuses chains of elementwise ops into C++ kernels that MLX compiles at run time with
`g++ -std=c++17 -O3` and no target flags. On x86-64 that baseline has no FMA and no SSE4.1, so MLX's exp
polynomial (softmax, SiLU, the log-softmax's backward) becomes six `fmaf` library calls per element, is not
inlined and the loop is not vectorized: ~10-16 ns per element, where numpy's exp takes ~1.7. Measured on
2 cores (AVX-512), a fused `x / (1 + exp(-x)) * y` over 12.6M floats: 250 ms as MLX builds it, 120 ms with
`-march=native`, ~30 ms vectorized with the flags below (`-fno-trapping-math` lets GCC vectorize the
exp's selects; the inline limits let it inline the exp; neither changes a result).

MLX calls `g++` from PATH and writes kernels under `$TMPDIR/mlx/<version>/cpu`, reusing any library found
there. So poet-mlx puts a two-line `g++` wrapper first on PATH (it adds FLAGS, then runs the real compiler)
and points TMPDIR at its own folder in the system temp folder, keyed by the flags, the compiler and the CPU:
kernels built without the flags (by another MLX process) are never loaded, and ours never reach another
process. Python's `tempfile` keeps the temp folder it had (read before the change); child processes
inherit the new TMPDIR, a subfolder of the old one.

Only kernels fused by `mx.compile` benefit; MLX's own prebuilt kernels (`mx.softmax`, `mx.logsumexp`,
`mx.sigmoid`, reductions) stay scalar, which is why `fast_layers` writes SiLU and softmax with `mx.exp`.
Off switch: `POET_MLX_JIT=default`. Nothing changes on macOS.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import switched_off

ENV_SWITCH = "POET_MLX_JIT"
FLAGS = ("-march=native", "-fno-math-errno", "-fno-trapping-math", "--param", "max-inline-insns-single=2000",
         "--param", "max-inline-insns-auto=2000", "--param", "early-inlining-insns=500")


@dataclass
class JitStatus:
    """What `enable_fast_jit` did: `active` when MLX's fused kernels are built with FLAGS in `folder`."""

    active: bool = False
    reason: str = "not attempted"
    folder: Optional[str] = None


STATUS = JitStatus()


def _cpu_key(compiler: str) -> str:
    """The compiler's version and the CPU's feature flags: kernels built for one never serve another."""
    h = hashlib.sha256(" ".join(FLAGS).encode())
    h.update(os.path.realpath(compiler).encode())
    try:
        h.update(subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout)
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            h.update(next((line for line in f if line.startswith("flags")), "").encode())
    except OSError:
        pass
    return h.hexdigest()[:16]


def enable_fast_jit() -> JitStatus:
    """Make MLX build its fused CPU kernels with FLAGS (Linux). Never raises; STATUS says what happened."""
    global STATUS
    if STATUS.active:
        return STATUS
    if not sys.platform.startswith("linux"):
        STATUS = JitStatus(False, "not Linux")
        return STATUS
    if switched_off(ENV_SWITCH, "default"):
        STATUS = JitStatus(False, f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}")
        return STATUS
    compiler = shutil.which("g++")
    if compiler is None:
        STATUS = JitStatus(False, "no g++ on PATH: MLX runs its compiled graphs without fused kernels")
        return STATUS
    try:
        base = Path(tempfile.gettempdir())  # also fixes Python's own temp folder before TMPDIR changes
        folder = base / f"poet-mlx-jit-{os.getuid()}-{_cpu_key(compiler)}"
        wrapper = folder / "bin" / "g++"
        if not wrapper.is_file():
            wrapper.parent.mkdir(parents=True, exist_ok=True)
            tmp = wrapper.with_name(f".g++.{os.getpid()}")
            tmp.write_text(f"#!/bin/sh\nexec '{compiler}' {' '.join(FLAGS)} \"$@\"\n")
            tmp.chmod(0o755)
            os.replace(tmp, wrapper)  # atomic: concurrent processes may race to write it
        (folder / "tmp").mkdir(exist_ok=True)
    except OSError as exc:
        STATUS = JitStatus(False, f"could not prepare the kernel folder ({exc})")
        return STATUS
    os.environ["PATH"] = f"{wrapper.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["TMPDIR"] = str(folder / "tmp")
    STATUS = JitStatus(True, "MLX's fused CPU kernels built for this CPU", str(folder))
    return STATUS
