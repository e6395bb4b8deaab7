"""The data order of a run: every pair once per epoch, deterministic, and each epoch's order computed once.

`Trainer._micro_batch` used to ask for epoch 0's batches before every micro-batch, and the one-entry epoch
cache then evicted the current epoch: from the second epoch on, every micro-batch recomputed two epoch orders.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_config

from poet_mlx.batching import batches_per_epoch, epoch_batches


@pytest.mark.parametrize("n, batch_size", [(1, 4), (7, 2), (64, 8), (1000, 3), (600, 1)])
def test_epoch_batches_hold_every_pair_once_deterministically(n, batch_size):
    lengths = list(np.random.default_rng(n).integers(5, 300, n))
    for epoch in range(3):
        batches = epoch_batches(lengths, batch_size, seed=11, epoch=epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))
        assert len(batches) == batches_per_epoch(n, batch_size)
        sizes = sorted(len(b) for b in batches)
        assert all(size == batch_size for size in sizes[1:])  # at most one short batch
        assert batches == epoch_batches(lengths, batch_size, seed=11, epoch=epoch)
    if n >= 64:
        assert epoch_batches(lengths, batch_size, 11, 0) != epoch_batches(lengths, batch_size, 11, 1)
        assert epoch_batches(lengths, batch_size, 11, 0) != epoch_batches(lengths, batch_size, 12, 0)


def test_a_run_across_epochs_follows_each_epochs_order_computing_it_once(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                        monkeypatch):
    from poet_mlx.train import trainer as trainer_mod
    from poet_mlx.train.run import run_training

    calls, used = [], []
    real = trainer_mod.epoch_batches

    def counting(lengths, batch_size, seed, epoch):
        calls.append(epoch)
        return real(lengths, batch_size, seed, epoch)

    real_micro = trainer_mod.Trainer._micro_batch

    def recording(self, micro):
        used.append(real_micro(self, micro))
        return used[-1]

    monkeypatch.setattr(trainer_mod, "epoch_batches", counting)
    monkeypatch.setattr(trainer_mod.Trainer, "_micro_batch", recording)
    # 48 training pairs in batches of 8: 6 micro-batches an epoch; 15 steps cross two epoch boundaries.
    cfg = run_config(tiny_model_dir, tiny_data_dir, tmp_path / "run", batch_size=8, iters=15)
    run_training(cfg)
    assert calls == [0, 1, 2]
    for epoch in range(2):  # the first two epochs are complete: every pair once each
        assert sorted(i for b in used[6 * epoch: 6 * epoch + 6] for i in b) == list(range(48))
    # The order is exactly epoch_batches' order for (seed, epoch), epoch after epoch.
    from poet_mlx.batching import pair_set
    from poet_mlx.data.splits import load_pairs
    from poet_mlx.models import load_model
    from poet_mlx.reporting import Reporter

    _, tokenizer, _ = load_model(str(tiny_model_dir))
    pairs = load_pairs(cfg, tokenizer, "train", Reporter()).pairs
    lengths = [lay.tokens for lay in pair_set(pairs, cfg.loss).layouts]
    expected = [b for e in range(3) for b in real(lengths, 8, cfg.train.seed, e)][:15]
    assert used == expected
