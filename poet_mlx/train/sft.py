"""A small supervised fine-tuning (SFT) loop: teach a model to produce given replies, before preference tuning.

Preference tuning starts from a model that can already write the replies it compares (the paper's runs start
from SFT checkpoints). The demo's tiny model starts from random weights, so it first learns the task's replies
here: full fine-tuning, cross-entropy on the response tokens of prompt + response (the prompt is context, not
a target), AdamW, a compiled step. The result is saved as an ordinary model folder that `mlx_lm.load` and
`poet-mlx train --model` read like any other.
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..batching import PAD_MULTIPLE, round_up
from ..fsutil import save_safetensors_atomic

MODEL_SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt")
"""Files copied unchanged from the source model folder next to the fine-tuned weights."""


def sft_examples(pairs, replies: str = "both") -> list[tuple[np.ndarray, np.ndarray]]:
    """(prompt ids, response ids) examples from tokenized preference pairs.

    Args:
        pairs: `tokenization.TokenizedPair`s.
        replies: "chosen", "rejected" or "both" (each pair gives two examples: a model that can write both
            kinds of reply, so preference tuning has something to choose between).
    """
    sides = {"chosen": ("chosen",), "rejected": ("rejected",), "both": ("chosen", "rejected")}[replies]
    return [(p.prompt, getattr(p, side)) for p in pairs for side in sides]


def sft_batch(examples, indices, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded (B, L) int32 tokens (L a multiple of PAD_MULTIPLE), (B,) starts (first response target
    position, prompt_len - 1) and (B,) response lengths."""
    rows = [np.concatenate([examples[i][0], examples[i][1]]) for i in indices]
    width = round_up(max(len(r) for r in rows), PAD_MULTIPLE)
    tokens = np.full((len(rows), width), pad_id, np.int32)
    for j, r in enumerate(rows):
        tokens[j, : len(r)] = r
    starts = np.asarray([len(examples[i][0]) - 1 for i in indices], np.int32)
    lengths = np.asarray([len(examples[i][1]) for i in indices], np.int32)
    return tokens, starts, lengths


def sft_loss(model, tokens, starts, lengths):
    """Mean negative log-likelihood per response token of a (B, L) batch (prompt tokens are not targets)."""
    from ..logprobs import sequence_logps
    from ..objective import model_token_logps

    sums = sequence_logps(model_token_logps(model, tokens), starts, lengths)  # (B,)
    return -sums.sum() / lengths.sum()


def train_sft(model, examples: Sequence, steps: int, batch_size: int, learning_rate: float, seed: int = 0,
              pad_id: int = 0, progress: Optional[Callable[[int, int, float], None]] = None) -> list[float]:
    """Fine-tune every weight of `model` on `examples` for `steps` AdamW steps (cosine decay, no warmup).

    Batches are drawn in a seeded random order (reshuffled each epoch). Returns the loss of every step;
    `progress(step, steps, loss)` is called after each.
    """
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    model.unfreeze()
    model.train()
    schedule = optim.cosine_decay(learning_rate, max(1, steps))
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.0)
    loss_and_grad = nn.value_and_grad(model, sft_loss)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(tokens, starts, lengths):
        loss, grads = loss_and_grad(model, tokens, starts, lengths)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    order: list[int] = []
    losses = []
    for s in range(steps):
        if len(order) < batch_size:
            # Random mixes, not length-sorted batches: sorting would put the short (chosen) and the long
            # (rejected) replies of the demo task in separate batches, and the model swings between them.
            order += [int(i) for i in rng.permutation(len(examples))]
        idx, order = order[:batch_size], order[batch_size:]
        tokens, starts, lengths = sft_batch(examples, idx, pad_id)
        loss = step(mx.array(tokens), mx.array(starts), mx.array(lengths))
        mx.eval(loss, model.state, optimizer.state)
        losses.append(loss.item())
        if progress:
            progress(s + 1, steps, losses[-1])
    model.eval()
    return losses


def save_model_folder(model, source: str | Path, out: str | Path) -> Path:
    """Write `model`'s weights as `out`/model.safetensors (atomically) and copy the tokenizer and config files
    from the model folder `source`, so `out` loads like `source` with the new weights."""
    from mlx.utils import tree_flatten

    src, out = Path(source), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    weights = dict(tree_flatten(model.parameters()))
    save_safetensors_atomic(out / "model.safetensors", weights, metadata={"format": "mlx"})
    return out
