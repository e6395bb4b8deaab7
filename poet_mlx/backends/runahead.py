"""MLX's run-ahead bounded on request on the CPU backend (Linux): temporaries freed before the next are allocated.

`mx.eval` walks the graph on the calling thread, allocating each op's output and handing the op to the CPU
stream's worker thread; it stops to wait for the worker only when more than a few tasks are queued, or when
the active memory is over MLX's memory limit (`mx.set_memory_limit`, a guideline for evaluation, not a
cap: nothing fails above it). The default limit is about the machine's RAM, so the calling thread runs ahead
and the outputs of queued ops are allocated while the inputs they will free are still alive. Measured on
SmolLM2-135M, the compiled loss and LoRA gradient at 2 x 256 tokens: peak 1.86 GB with the default limit,
1.70 GB with a limit of 0, and 0.96 -> 0.79 GB with --grad-checkpoint; the time unchanged (10.5 vs 10.8 s).
Chunked computations (`blocked_head`, `scoring.head_in_chunks`) only hold one chunk at a time with it. On
the CPU the worker and the calling thread share the same cores, so running ahead buys little.
For the same reason the trainer evaluates each micro-batch's loss and gradients on their own before the
gradient norm: in one graph with it the step peaked higher (--grad-checkpoint: 1.29 -> 1.00 GB).

That bound (the memory limit set to 0) was the default until it turned out to cost more than it saves: with
a limit of 0, `eval` busy-waits on the calling thread for each queued op, taking a core from OpenBLAS's
second thread, so 2 BLAS threads ran slower than 1 (DPO 2 x 256: 14.6-16.7 s vs 9.7 s). Without the bound
and with 2 threads (`blas`), the step takes 4.1-4.5 s; at 8 x 512 (DPO+POET) 36.9 s vs 59.9 s bounded with
1 thread, the reference pass 39.6 vs 71.5 s. What the bound saved is now small: with 2-million-logit head
chunks (`logprobs.DEFAULT_CHUNK_ELEMENTS`) the float32 peak at 2 x 256 is 1.59 vs 1.53 GB (0.78 vs 0.72
with --grad-checkpoint), the 4-bit one 0.46 vs 0.33 GB with --grad-checkpoint.

So the bound is opt-in, for the lowest memory on Linux with the CPU as MLX's default device:
`POET_MLX_RUNAHEAD=bounded`, best with `POET_MLX_BLAS_THREADS=1`. Not on macOS: on the GPU, queued command
buffers are what keep it busy.
"""

from __future__ import annotations

import os

from . import on_linux_cpu

ENV_SWITCH = "POET_MLX_RUNAHEAD"

STATUS = "not attempted"


def bound_run_ahead() -> str:
    """With POET_MLX_RUNAHEAD=bounded, set MLX's memory limit to 0 on the Linux CPU backend (see the module
    docstring); returns what was done. Called when poet-mlx loads a model (`models.load_model`); a limit set
    after that stands. Never raises."""
    global STATUS
    if os.environ.get(ENV_SWITCH, "").lower() != "bounded":
        STATUS = f"MLX's default (set {ENV_SWITCH}=bounded for the lowest memory)"
    elif not on_linux_cpu():
        STATUS = "not Linux with MLX on the CPU"
    else:
        import mlx.core as mx

        mx.set_memory_limit(0)
        STATUS = "bounded (memory limit 0: eval waits for queued work)"
    return STATUS
