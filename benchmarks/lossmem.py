"""Memory of the log-prob step alone as the vocabulary grows: `poet_mlx.logprobs.per_token_logps` (target logit
minus a chunked logsumexp) against the naive `log_softmax` + gather.

For each vocabulary size V, logits of shape (N, T, V) are made and evaluated first; the figure is the MLX peak
*above* them while computing the (N, T) log-probs (forward, as in the reference pass), and while computing
their gradient with respect to the logits in a compiled function (forward + backward, as in the compiled
training step; the gradient itself is an (N, T, V) array in the logits' dtype and is counted apart). Run in its own process: `python -m benchmarks.lossmem '<json>'`.
"""

from __future__ import annotations

import sys
import time

import poet_mlx  # noqa: F401  (first: OpenBLAS before mlx.core)
from benchmarks.report import child_main


def _measure(fn, logits, targets, backward: bool) -> tuple[float, float]:
    """(peak bytes above the live logits, seconds) for fn's log-probs, or for their gradient with respect to
    the logits in a compiled function as the training step has it (timed on its second call)."""
    import mlx.core as mx

    if backward:
        grad_fn = mx.compile(mx.grad(lambda x: fn(x, targets).sum()))
        mx.eval(grad_fn(logits))  # trace and compile outside the measurement
    mx.eval(logits, targets)
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    if backward:
        grad = grad_fn(logits)
        mx.eval(grad)
        extra = grad.nbytes  # the gradient is the size of the logits whatever the method
        del grad
    else:
        out = fn(logits, targets)
        mx.eval(out)
        extra = 0
        del out
    seconds = time.perf_counter() - tic
    return mx.get_peak_memory() - base - extra, seconds


def run(spec: dict) -> dict:
    import mlx.core as mx

    from benchmarks.variants import naive_token_logps
    from poet_mlx.logprobs import per_token_logps

    n, t = spec["rows"], spec["positions"]
    dtype = getattr(mx, spec.get("dtype", "float32"))
    rows = []
    for v in spec["vocab_sizes"]:
        logits = (mx.random.normal((n, t, v), key=mx.random.key(v)) * 3).astype(dtype)  # (N, T, V)
        targets = mx.random.randint(0, v, (n, t), key=mx.random.key(v + 1))
        mx.eval(logits, targets)
        row = {"vocab": v, "logits_mb": logits.nbytes / 1e6}
        for name, fn in (("ours", per_token_logps), ("naive", naive_token_logps)):
            for backward in (False, True):
                extra, secs = _measure(fn, logits, targets, backward)
                tag = f"{name}_{'fwd_bwd' if backward else 'fwd'}"
                row[f"{tag}_extra_mb"] = extra / 1e6
                row[f"{tag}_s"] = secs
        rows.append(row)
        del logits, targets
    return {"rows": n, "positions": t, "dtype": spec.get("dtype", "float32"), "table": rows}


def main(argv=None) -> int:
    return child_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
