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
inherit the new TMPDIR, a subfolder of the old one, and the wrapper on PATH: a poet-mlx child adopts its
parent's folder (`INHERITED` names it) where it would otherwise take the wrapper for the compiler, key a
folder of its own inside the parent's and build every kernel again. `outside_env()` gives a child that
should run as MLX builds it (a benchmark's peer) the PATH and TMPDIR from before the change.

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
from pathlib import Path
from typing import Optional

from . import Status, switched_off

ENV_SWITCH = "POET_MLX_JIT"
FLAGS = ("-march=native", "-fno-math-errno", "-fno-trapping-math", "--param", "max-inline-insns-single=2000",
         "--param", "max-inline-insns-auto=2000", "--param", "early-inlining-insns=500")


STATUS = Status()
"""What `enable_fast_jit` did: `active` when MLX's fused kernels are built with FLAGS in the folder `where`."""
INHERITED = "POET_MLX_JIT_FOLDER"
"""Set by `enable_fast_jit` for child processes: the kernel folder in use."""
_BEFORE: dict = {}
"""PATH and TMPDIR as they were before `enable_fast_jit` changed them (None: unset)."""


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


def enable_fast_jit() -> Status:
    """Make MLX build its fused CPU kernels with FLAGS (Linux). Never raises; STATUS says what happened."""
    global STATUS
    if STATUS.active:
        return STATUS
    if not sys.platform.startswith("linux"):
        STATUS = Status(False, "not Linux")
        return STATUS
    if switched_off(ENV_SWITCH, "default"):
        STATUS = Status(False, f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}")
        return STATUS
    inherited = _inherited()
    if inherited is not None:
        STATUS = Status(True, "MLX's fused CPU kernels built for this CPU (the parent process's folder)",
                           str(inherited))
        return STATUS
    compiler = shutil.which("g++")
    if compiler is None:
        STATUS = Status(False, "no g++ on PATH: MLX runs its compiled graphs without fused kernels")
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
        STATUS = Status(False, f"could not prepare the kernel folder ({exc})")
        return STATUS
    _BEFORE.update({name: os.environ.get(name) for name in ("PATH", "TMPDIR")})
    os.environ["PATH"] = f"{wrapper.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["TMPDIR"] = str(folder / "tmp")
    os.environ[INHERITED] = str(folder)
    STATUS = Status(True, "MLX's fused CPU kernels built for this CPU", str(folder))
    return STATUS


def _inherited() -> Optional[Path]:
    """The kernel folder a parent poet-mlx process set up, where this process still has its TMPDIR and its
    wrapper first on PATH; None otherwise."""
    folder = os.environ.get(INHERITED)
    if not folder:
        return None
    folder = Path(folder)
    wrapper = folder / "bin" / "g++"
    if os.environ.get("TMPDIR") == str(folder / "tmp") and shutil.which("g++") == str(wrapper) and wrapper.is_file():
        return folder
    return None


def outside_env(env: dict) -> dict:
    """`env` (a child's environment, from os.environ) with PATH and TMPDIR as they were before
    `enable_fast_jit` in this process or its poet-mlx parent, and without `INHERITED`: the child's MLX
    builds its kernels as it would anywhere else. Unchanged where this process never set the JIT up."""
    env = dict(env)
    folder = env.pop(INHERITED, None)
    if _BEFORE:
        for name, value in _BEFORE.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
    elif folder:  # set up by a parent: take its wrapper off PATH and its folder off TMPDIR
        wrapper_dir = str(Path(folder) / "bin")
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != wrapper_dir)
        if env.get("TMPDIR") == str(Path(folder) / "tmp"):
            env["TMPDIR"] = str(Path(folder).parent)
    return env
