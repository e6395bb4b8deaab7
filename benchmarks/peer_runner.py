"""Run mlx-lm-lora's DPO trainer, measured. Executed by the *peer's* Python (its own venv), never imported by
poet-mlx: `PEER_PYTHON benchmarks/peer_runner.py '<json spec>'`.

What it does before handing over to `mlx_lm_lora.train.run`:
- OpenBLAS, unless spec["blas"] is false: imports `poet_mlx` from this checkout first (the caller's
  `sections.PEER_ENV` leaves only its BLAS routing on), so the peer's MLX gets exactly the same GEMM library
  and thread setting as poet-mlx.
- Adds `max_recommended_working_set_size` to `mx.device_info()`: mlx-lm-lora reads it unconditionally
  (`mx.set_wired_limit(...)`), and MLX's CPU backend does not report it, so it fails on Linux otherwise.
- A training callback times each step (`steps_per_report` is 1) and records mlx-lm-lora's own report.
The result is one JSON line after RESULT_TAG; the peak memory is MLX's, reset just before the first step.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

RESULT_TAG = "BENCH_RESULT "


def main() -> int:
    spec = json.loads(sys.argv[1])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if spec.get("blas", True):
        import poet_mlx  # noqa: F401  (OpenBLAS before mlx.core, as in poet-mlx)
    import mlx.core as mx

    from benchmarks.report import max_rss_gb

    info = mx.device_info

    def device_info():
        d = dict(info())
        d.setdefault("max_recommended_working_set_size", d.get("memory_size", 0))
        return d

    mx.device_info = device_info

    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm_lora import train as peer

    class Timer(TrainingCallback):
        def __init__(self):
            self.reports, self.stamps = [], []

        def on_train_loss_report(self, train_info):
            self.stamps.append(time.perf_counter())
            self.reports.append(dict(train_info))
            if len(self.stamps) == 1:
                mx.reset_peak_memory()  # the first step holds the trace and compile; later peaks are steady

    args = vars(peer.build_parser().parse_args([]))
    for k, v in peer.CONFIG_DEFAULTS.items():
        if args.get(k) is None:
            args[k] = v
    args.update(spec["args"])
    ns = type("Args", (), {})()
    ns.__dict__.update(args)
    timer = Timer()
    tic = time.perf_counter()
    peer.run(ns, training_callback=timer)
    wall = time.perf_counter() - tic
    steps = [r["iterations_per_second"] for r in timer.reports]
    out = {
        "blas": bool(spec.get("blas", True)),
        "wall_s": wall,
        "step_times": [1.0 / s for s in steps],
        "response_tokens": [r["tokens_per_second"] / r["iterations_per_second"] for r in timer.reports],
        "losses": [r["train_loss"] for r in timer.reports],
        "peak_train_gb": mx.get_peak_memory() / 1e9,
        "peak_first_step_gb": timer.reports[0]["peak_memory"] if timer.reports else None,
        "max_rss_gb": max_rss_gb(),
    }
    print(RESULT_TAG + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
