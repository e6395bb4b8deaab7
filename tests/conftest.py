"""Shared pytest fixtures: tiny real model folders, built once per test session (offline, ~1 s each)."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub (it reads the variable once): tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

import poet_mlx  # noqa: F401  (first: routes MLX CPU matmuls to OpenBLAS before mlx.core loads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A float32 tiny Llama folder (hidden 64, 2 layers, chat template, eos `<|end|>`), loadable by
    `mlx_lm.load`. Its tokenizer is trained on the demo task's texts. Treat it as read-only."""
    from poet_mlx.demo import task as demo_task
    from poet_mlx.demo import tiny

    return tiny.save_tiny_model(tmp_path_factory.mktemp("tiny_model"), texts=demo_task.corpus_texts(0), seed=0)


@pytest.fixture(scope="session")
def tiny_quant_model_dir(tmp_path_factory):
    """The same model as `tiny_model_dir` (same seed and tokenizer), 4-bit quantized like mlx-community
    models: `mlx_lm.load` gives QuantizedLinear layers. Treat it as read-only."""
    from poet_mlx.demo import task as demo_task
    from poet_mlx.demo import tiny

    return tiny.save_tiny_model(
        tmp_path_factory.mktemp("tiny_quant_model"), texts=demo_task.corpus_texts(0), seed=0, quantize_bits=4
    )


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A folder with train.jsonl (48 pairs) and valid.jsonl (16 pairs) of the demo task."""
    from poet_mlx.demo import task as demo_task

    return demo_task.write_demo_dataset(tmp_path_factory.mktemp("tiny_data"), n_train=48, n_valid=16, seed=0)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own reference-log-prob cache, so tests neither share nor leave cache files."""
    monkeypatch.setenv("POET_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


def run_config(model_dir, data_dir, run_dir, **overrides):
    """A small, fast training config for tests (flat keys as in YAML)."""
    from poet_mlx.config import RunConfig, validate

    flat = {
        "model": str(model_dir), "data": str(data_dir), "adapter_path": str(run_dir),
        "num_layers": -1, "rank": 4, "batch_size": 4, "iters": 4, "learning_rate": 1e-3,
        "max_length": 128, "max_prompt_length": 32, "steps_per_report": 1, "steps_per_eval": 0,
        "save_every": 0, "seed": 0,
    }
    flat.update(overrides)
    cfg = RunConfig.from_flat(flat, source="test")
    validate(cfg)
    return cfg


def cli(*argv) -> int:
    """Run `poet-mlx ARGV` in process; argparse's own exits (--help, bad flags) count as return codes."""
    from poet_mlx.cli.main import main

    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return 0 if exc.code is None else exc.code


def one_error_line(err: str) -> str:
    """The single `error: ...` line a user mistake prints (no traceback), or an assertion error."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="session")
def tiny_sft_model_dir(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """`tiny_model_dir` fine-tuned (SFT, 60 steps) on the demo task's replies: it writes task-like replies that
    end with the end-of-turn token, so sampled replies finish. Treat it as read-only."""
    import mlx.core as mx

    from poet_mlx.config import DataConfig
    from poet_mlx.data.sources import load_split
    from poet_mlx.data.tokenization import pad_id, tokenize_pairs
    from poet_mlx.models import load_model
    from poet_mlx.train.sft import save_model_folder, sft_examples, train_sft

    model, tokenizer, _ = load_model(str(tiny_model_dir))
    rows, _ = load_split(DataConfig(data=str(tiny_data_dir)), "train")
    pairs, _ = tokenize_pairs(rows, tokenizer, 128, 32)
    mx.random.seed(0)
    train_sft(model, sft_examples(pairs, "both"), 60, 16, 3e-3, 0, pad_id(tokenizer))
    return save_model_folder(model, tiny_model_dir, tmp_path_factory.mktemp("tiny_sft") / "model")
