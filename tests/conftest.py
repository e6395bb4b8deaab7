"""Shared pytest fixtures: tiny real model folders, built once per test session (offline, ~1 s each)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A float32 tiny Llama folder (hidden 64, 2 layers, chat template, eos `<|end|>`), loadable by
    `mlx_lm.load`. Its tokenizer is trained on the demo task's texts. Treat it as read-only."""
    from poet_mlx import demo_task, tiny

    return tiny.save_tiny_model(tmp_path_factory.mktemp("tiny_model"), texts=demo_task.corpus_texts(0), seed=0)


@pytest.fixture(scope="session")
def tiny_quant_model_dir(tmp_path_factory):
    """The same model as `tiny_model_dir` (same seed and tokenizer), 4-bit quantized like mlx-community
    models: `mlx_lm.load` gives QuantizedLinear layers. Treat it as read-only."""
    from poet_mlx import demo_task, tiny

    return tiny.save_tiny_model(
        tmp_path_factory.mktemp("tiny_quant_model"), texts=demo_task.corpus_texts(0), seed=0, quantize_bits=4
    )
