"""One poet-mlx training run, measured: drives `poet_mlx.train.run.run_training` with a timing reporter.

Run in a fresh process per case (`python -m benchmarks.ours '<json spec>'`), so peak memory, max RSS and
the compile cache belong to that case alone; the result is one JSON line on stdout after `RESULT_TAG`.
"""

from __future__ import annotations

import statistics
import sys
import time

import poet_mlx  # noqa: F401  (first: OpenBLAS for MLX's CPU matmuls, unless POET_MLX_BLAS=reference)
from benchmarks.report import child_main, max_rss_gb
from poet_mlx.reporting import Reporter


class TimingReporter(Reporter):
    """Records phase durations, per-step metrics, and the MLX peak before training (then resets it)."""

    def __init__(self):
        self.started: dict[str, float] = {}
        self.phases: dict[str, float] = {}
        self.steps: list[dict] = []
        self.header_info: dict = {}
        self.peak_before_train = 0.0

    def phase(self, name, done=0, total=None, note=""):
        now = time.perf_counter()
        if done == 0:
            self.started.setdefault(name, now)
        elif total is not None and done >= total and name in self.started:
            self.phases[name] = now - self.started[name]

    def header(self, info):
        import mlx.core as mx

        self.header_info = dict(info)
        # The header comes after model loading and the reference pass, just before the first step: what
        # follows is the training peak alone.
        self.peak_before_train = mx.get_peak_memory() / 1e9
        mx.reset_peak_memory()

    def step(self, step, total, metrics):
        self.steps.append(dict(metrics))


def summarize_steps(steps: list[dict], batch_size: int) -> dict:
    """Steady-state figures from per-step metrics: the first step (trace + compile) is reported apart.
    `batch_size` counts the pairs of one optimizer step (micro-batch x accumulation steps)."""
    times = [s["step_seconds"] for s in steps]
    steady = steps[1:] or steps
    t = [s["step_seconds"] for s in steady]
    med = statistics.median(t)
    resp = [(s["num_tokens/chosen"] + s["num_tokens/rejected"]) * batch_size for s in steady]
    total = [s["tokens_per_second"] * s["step_seconds"] for s in steady]
    return {
        "steps": len(times),
        "first_step_s": times[0],
        "step_s": med,
        "step_mean_s": statistics.fmean(t),
        "pairs_per_s": batch_size / med,
        "tokens_per_s": sum(total) / sum(t),
        "response_tokens_per_s": sum(resp) / sum(t),
        "tokens_per_step": statistics.fmean(total),
        "response_tokens_per_step": statistics.fmean(resp),
    }


def run_case(spec: dict) -> dict:
    """Train as `spec["config"]` (flat poet-mlx settings) says; return the measurements.

    The reference cache goes to a fresh folder (`spec["cache"]`), so the reference pass is timed, not reused.
    """
    import os

    import mlx.core as mx

    from poet_mlx.backends import blas, native
    from poet_mlx.config import RunConfig, validate
    from poet_mlx.train.run import run_training

    native.kernels()  # built (or found) in the usual cache, not in the fresh one inside the timed run
    os.environ["POET_MLX_CACHE"] = spec["cache"]
    cfg = RunConfig.from_flat(spec["config"], source="benchmark")
    validate(cfg)
    rep = TimingReporter()
    tic = time.perf_counter()
    summary = run_training(cfg, rep)
    wall = time.perf_counter() - tic
    h = rep.header_info
    ref = next((v for k, v in rep.phases.items() if k.startswith("reference log-probs")), None)
    out = {
        "config": spec["config"],
        "blas": blas.STATUS.active,
        "kernels": native.STATUS.active,
        "wall_s": wall,
        "load_s": rep.phases.get("loading model"),
        "reference_s": ref,
        "peak_train_gb": mx.get_peak_memory() / 1e9,
        "peak_before_train_gb": rep.peak_before_train,
        "max_rss_gb": max_rss_gb(),
        "total_params": h.get("total_params"),
        "trainable_params": h.get("trainable_params"),
        "response_tokens_per_pair": h.get("response_tokens_per_pair"),
        "scored_tokens_per_pair": h.get("scored_tokens_per_pair"),
        "poet_token_saving": h.get("poet_token_saving"),
        "final_loss": rep.steps[-1]["loss"] if rep.steps else None,
        "losses": [s["loss"] for s in rep.steps],
        "step_times": [s["step_seconds"] for s in rep.steps],
        "summary_steps": summary["steps"],
    }
    out.update(summarize_steps(rep.steps, cfg.train.batch_size * cfg.train.grad_accumulation_steps))
    return out


def main(argv=None) -> int:
    return child_main(run_case, argv)


if __name__ == "__main__":
    sys.exit(main())
