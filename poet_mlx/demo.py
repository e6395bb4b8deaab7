"""The offline demo: a tiny model, a synthetic preference task, and a short DPO+POET run, all built locally.

The task (`demo_task`) decides preference in the first words of a reply while reply lengths vary, which is
the situation POET targets. Everything is seeded; nothing touches the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig
from .demo_task import corpus_texts, write_demo_dataset
from .tiny import save_tiny_model


@dataclass(frozen=True)
class DemoSpec:
    """Sizes chosen so the whole demo takes about a minute on 2 CPU cores."""

    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 256
    train_pairs: int = 512
    valid_pairs: int = 64
    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 5e-4
    seed: int = 0


def build_demo(folder: str | Path, spec: DemoSpec = DemoSpec()) -> tuple[Path, Path]:
    """Write the demo model and data into `folder`. Returns (model_dir, data_dir)."""
    folder = Path(folder)
    model_dir, data_dir = folder / "model", folder / "data"
    if not (model_dir / "config.json").is_file():
        save_tiny_model(model_dir, texts=corpus_texts(spec.seed), hidden_size=spec.hidden_size,
                        num_layers=spec.num_layers, intermediate_size=spec.intermediate_size, seed=spec.seed)
    write_demo_dataset(data_dir, spec.train_pairs, spec.valid_pairs, spec.seed)
    return model_dir, data_dir


def demo_config(model_dir: Path, data_dir: Path, run_dir: Path, spec: DemoSpec = DemoSpec(),
                poet: bool = True, loss: str = "dpo") -> RunConfig:
    """A complete, validated-by-construction run config for the demo."""
    return RunConfig.from_flat({
        "model": str(model_dir),
        "data": str(data_dir),
        "adapter_path": str(run_dir),
        "loss": loss,
        "poet": poet,
        "num_layers": -1,
        "rank": 8,
        "batch_size": spec.batch_size,
        "iters": spec.steps,
        "learning_rate": spec.learning_rate,
        "max_length": 256,
        "max_prompt_length": 64,
        "steps_per_report": 10,
        "steps_per_eval": max(1, spec.steps // 4),
        "save_every": max(1, spec.steps // 2),
        "seed": spec.seed,
        "overwrite": True,
    }, source="demo")


def before_after(metrics: list[dict]) -> tuple[dict, dict]:
    """The first and last validation records of a run's metrics log."""
    evals = [m for m in metrics if "eval_loss" in m]
    return (evals[0], evals[-1]) if evals else ({}, {})
