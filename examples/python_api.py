"""Train DPO+POET adapters from Python, offline, in well under a minute.

    python examples/python_api.py [FOLDER]

The library API is what `poet-mlx train` runs: a `RunConfig` (built from the same flat keys as the YAML
files and flags), `validate` (cheap checks before anything loads), and `run_training`, which reports
through a `Reporter` and returns a summary dict. `build_demo` writes a tiny model and a synthetic
preference task locally, so nothing is downloaded.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from poet_mlx import Reporter, RunConfig, run_training, validate
from poet_mlx.demo.toy import DemoSpec, build_demo
from poet_mlx.train.checkpoint import read_metrics


class PrintReporter(Reporter):
    """Print what the trainer logs (the library itself never prints)."""

    def header(self, info):
        print(f"{info['loss']} beta={info['beta']} poet={info['poet']}: {info['trainable_params']:,} trainable "
              f"of {info['total_params']:,} parameters; {info['train_pairs']} train / {info['valid_pairs']} "
              f"valid pairs; POET scores {1 - info['poet_token_saving']:.0%} of the response tokens")

    def log(self, record):
        if "eval_loss" in record:
            print(f"step {record['step']:3d}  eval_loss {record['eval_loss']:.4f}  "
                  f"eval_rewards/accuracies {record['eval_rewards/accuracies']:.2f}")
        else:
            print(f"step {record['step']:3d}  loss {record['loss']:.4f}  "
                  f"rewards/margins {record['rewards/margins']:+.4f}")

    def warning(self, message):
        print(f"warning: {message}")


def main(folder: Path) -> dict:
    # A smaller demo than `poet-mlx demo`: fewer pairs and steps, so this takes seconds.
    spec = replace(DemoSpec(), train_pairs=128, valid_pairs=32, steps=20)
    model_dir, data_dir = build_demo(folder, spec)

    cfg = RunConfig.from_flat({
        "model": str(model_dir),          # a local mlx-lm folder or a hub id
        "data": str(data_dir),            # train.jsonl + valid.jsonl
        "adapter_path": str(folder / "run"),
        "overwrite": True,                # rerunning this script starts over
        "loss": "dpo",
        "beta": 0.1,
        "poet": True,
        "num_layers": -1,                 # the tiny model has 4 layers: adapt them all
        "rank": 8,
        "batch_size": 8,
        "iters": spec.steps,
        "learning_rate": 5e-4,            # tiny random model: a large rate (real models: ~1e-5 with LoRA)
        "max_length": 256,
        "max_prompt_length": 64,
        "steps_per_report": 5,
        "steps_per_eval": 10,
        "save_every": 0,                  # only the final checkpoint
    }, source="python_api.py")
    validate(cfg)                         # raises PoetError naming the bad key, before anything loads

    summary = run_training(cfg, PrintReporter())
    print(f"\n{summary['steps']} steps in {summary['train_seconds']:.1f} s; adapters in {summary['adapter_path']}")
    evals = [r for r in read_metrics(folder / "run") if "eval_loss" in r]
    print(f"held-out accuracy: {evals[0]['eval_rewards/accuracies']:.2f} at step 0 -> "
          f"{evals[-1]['eval_rewards/accuracies']:.2f} at step {evals[-1]['step']}")
    return summary


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
