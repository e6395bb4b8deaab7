"""A batch's two row groups through the model at once, one CPU stream each (Linux).

MLX's CPU backend runs its elementwise kernels and reductions on one thread, and only GEMMs use more (OpenBLAS).
On SmolLM2-135M that one-thread work (attention's exp and row maxima, norms, SwiGLU, the head's logsumexp) is
about half of a training step's time. But each MLX stream has a thread of its own, and a batch is already fed
as two row groups (`batching.row_groups`) whose forward and backward never meet until the loss. So each group
runs on its own stream, and OpenBLAS gets `cores // 2` threads per GEMM (one here): two single-threaded GEMMs
side by side run at 304-314 GFLOP/s on this machine's 2 cores where one two-threaded GEMM runs at 279-290, and
every other kernel now has a core of its own.

Two things make the streams actually overlap:
- MLX enqueues a graph's operations in the order of its evaluation tape, at most ~100 ahead of the CPU. Built
  from the graph alone, the tape holds long runs of one group's operations and the other stream waits. So the
  groups are tied after every block (`tie`): each block's output, for either group, depends on both, in the
  forward and (by `tie`'s VJP) in the backward; the tape then alternates between the groups a block at a time.
- The tape is built breadth-first within a width limit (`MLX_BFS_MAX_WIDTH`, 20 by default), then depth-first;
  at 20, runs of one group still fill the window. `BFS_WIDTH` (set before MLX loads, where the user has not
  set it) lets the tape alternate within a block too. A wider tape would evaluate each layer's adapter
  gradients only at the end of the backward, keeping their inputs alive (a step's peak 3.6 -> 6.5 GB); `lean_lora`
  makes each layer's input gradient wait for them, so they are computed where they are ready and the peak is
  unchanged.

The trunk is run block by block (`Trunk`): embedding, each block with the causal mask, the final norm. That is
what mlx-lm's llama, qwen2, qwen3, mistral... trunks do, but not all (gemma scales its embeddings), so it is
used only where a probe shows it gives the model's own numbers (`trunk`); elsewhere the groups run one after
the other, as before. The custom VJPs of `fast_layers`, `lean_lora` and `logprobs` run on the stream of their
forward (`fast_layers.on_stream`), so the backward is split as the forward is.

Measured (SmolLM2-135M float32, LoRA r8 on 16 layers, 2 cores, `benchmarks/real.py`): the DPO+POET step at
8 x 512 28.8 -> 23.7 s, its reference pass 26.9 -> 22.9 s, DPO at 2 x 256 3.54 -> 3.12 s, at the same peak
and with the same loss bit for bit. Off switch: `POET_MLX_ROWS=serial`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from functools import lru_cache
from typing import Optional

from . import fast_layers, switched_off

ENV_SWITCH = "POET_MLX_ROWS"
BFS_WIDTH = ("MLX_BFS_MAX_WIDTH", "1000")
"""MLX's evaluation-tape width limit, set where the user has not (see the module docstring)."""
_WIDTH_SET = "POET_MLX_TAPE_WIDTH_SET"
"""Set (for child processes too) when `set_tape_width` set the width, so `outside_env` can take it back."""
PROBE_TOKENS = 8
_local = threading.local()


def wanted() -> bool:
    """Where `fast_layers` applies (Linux, MLX on the CPU), with at least 2 cores, unless switched off."""
    return not switched_off(ENV_SWITCH, "serial") and fast_layers.wanted() and _cores() >= 2


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_tape_width() -> None:
    """Widen MLX's evaluation tape (`BFS_WIDTH`) on Linux unless the user set it or switched this module off.
    Before `mlx.core` first evaluates (MLX reads it once)."""
    if sys.platform.startswith("linux") and not switched_off(ENV_SWITCH, "serial") and BFS_WIDTH[0] not in os.environ:
        os.environ[BFS_WIDTH[0]] = BFS_WIDTH[1]
        os.environ[_WIDTH_SET] = "1"


def outside_env(env: dict) -> dict:
    """`env` (a child's environment, from os.environ) without the tape width poet-mlx set: a child that should
    run as MLX does elsewhere (a benchmark's peer). A width the user set stays. A child that imports poet_mlx
    itself also needs POET_MLX_ROWS=serial (the benchmarks' `PEER_ENV`): else that import sets the width again."""
    env = dict(env)
    if env.pop(_WIDTH_SET, None):
        env.pop(BFS_WIDTH[0], None)
    return env


def streams(n: int) -> list:
    """n CPU streams: the default one and n - 1 more, made once per thread (a stream serves the thread that made
    it)."""
    import mlx.core as mx

    made = getattr(_local, "streams", None)
    if made is None or len(made) < n:
        made = [mx.default_stream(mx.cpu)] + [mx.new_stream(mx.cpu) for _ in range(n - 1)]
        _local.streams = made
    return made[:n]


@lru_cache(maxsize=None)
def _tie_fn(n: int):
    import mlx.core as mx

    def tied(xs):
        return tuple(mx.depends(x, [y for j, y in enumerate(xs) if j != i]) for i, x in enumerate(xs))

    @mx.custom_function
    def tie(*xs):
        return tied(xs)

    @tie.vjp
    def tie_vjp(primals, cotangents, outputs):
        return tied(list(cotangents))

    return tie


def tie(xs: list) -> list:
    """The arrays xs, each made to wait for all of them (values unchanged, nothing copied); their cotangents
    likewise wait for each other in the backward."""
    return list(_tie_fn(len(xs))(*xs)) if len(xs) > 1 else list(xs)


class Trunk:
    """A model's trunk run block by block: embed, each block with its mask, the final norm."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, inputs: list, on_streams: bool) -> list:
        """inputs: (n_g, L_g) token arrays; returns their (n_g, L_g, D) trunk outputs. With `on_streams`, group
        i runs on stream i and the groups are tied after every block."""
        from mlx_lm.models.base import create_attention_mask

        on = streams(len(inputs)) if on_streams else None

        def each(fn, *per_group):
            out = each_group(on, fn, *per_group)
            return out if on is None else tie(out)

        hs = each(self.inner.embed_tokens, inputs)
        masks = [create_attention_mask(h, None) for h in hs]
        for layer in self.inner.layers:
            hs = each(lambda h, mask: layer(h, mask, None), hs, masks)
        return each(self.inner.norm, hs)


def each_group(streams: Optional[list], fn, *per_group) -> list:
    """[fn(*args of group i) for each group], each on its group's stream (streams None: the current one)."""
    import mlx.core as mx

    out = []
    for i, args in enumerate(zip(*per_group)):
        if streams is None:
            out.append(fn(*args))
        else:
            with mx.stream(streams[i]):
                out.append(fn(*args))
    return out


def trunk(model) -> Optional[Trunk]:
    """The model's `Trunk` where `wanted()` and a probe shows it computes `model.model(tokens)` exactly (eval mode,
    PROBE_TOKENS tokens); else None. The verdict is kept on the model while its trunk keeps the same layers.
    The probe evaluates arrays, so its first call must come before any `mx.compile` trace that uses the model
    (`engaged`, which the trainer and the scoring loop enter first, makes it)."""
    if not wanted():
        return None
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")) or _windowed(inner):
        return None
    key = (type(inner), id(inner.layers), len(inner.layers))
    cached = getattr(model, "_poet_trunk_probe", None)
    if cached is None or cached[0] != key:
        cached = (key, _probe(model, inner))
        object.__setattr__(model, "_poet_trunk_probe", cached)
    return Trunk(inner) if cached[1] else None


def _windowed(inner) -> bool:
    """Whether some layer attends within a sliding window, or the layers are split over a pipeline: a mask or a
    layer set that a short probe would not reveal the loop gets wrong."""
    return (getattr(inner, "sliding_window", None) is not None or getattr(inner, "swa_idx", None) is not None
            or getattr(inner, "pipeline_size", 1) != 1
            or any(getattr(layer, "use_sliding", False) for layer in inner.layers))


def _probe(model, inner) -> bool:
    import mlx.core as mx

    was_training = getattr(model, "training", False)
    model.eval()
    try:
        vocab = getattr(inner.embed_tokens, "weight", mx.zeros((2, 1))).shape[0]
        probe = (mx.arange(PROBE_TOKENS, dtype=mx.int32) * 7919 % max(1, vocab))[None]
        mine = Trunk(inner)([probe], on_streams=False)[0]
        theirs = inner(probe)
        return mine.shape == theirs.shape and bool(mx.array_equal(mine, theirs).item())
    except Exception:  # any trunk this loop cannot drive is simply not split
        return False
    finally:
        model.train(was_training)


def engaged(model, halves: bool):
    """A context in which the two row groups of `model`'s batches (`halves`, as `batching.row_groups` makes
    them) run on parallel streams: OpenBLAS's threads per GEMM become cores // 2 for its duration
    (`blas.gemm_threads`); a no-op without halves or where the trunk is not split."""
    from .blas import gemm_threads

    if not halves or trunk(model) is None:
        return contextlib.nullcontext()
    return gemm_threads(max(1, _cores() // 2))
