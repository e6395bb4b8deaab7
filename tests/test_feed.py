"""What the model is fed: row groups, packed response positions, the verified output head.

The fast path (rows split into length groups, the head applied at response positions only) must give the same
log-probs, losses and gradients as the plain one (one (2B, L) array, full logits); the head is used only where
a probe shows `model(x) == head(model.model(x))`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from poet_mlx.batching import PACK_MULTIPLE, layout, make_batch, make_feed, packed_size, padding_fraction, row_groups
from poet_mlx.config import LossConfig
from poet_mlx.data.tokenization import TokenizedPair
from poet_mlx import logprobs
from poet_mlx.head import head_is_frozen, output_head
from poet_mlx.objective import (
    batch_inputs,
    batch_objective,
    metric_names,
    model_token_logps,
    response_token_logps,
    row_sums,
)

VOCAB = 97


def tiny_llama(tie: bool, seed: int = 0):
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(seed)
    args = ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB,
                     tie_word_embeddings=tie)
    model = Model(args)
    mx.eval(model.parameters())
    return model


def with_lora(model, seed: int = 1):
    """LoRA on every layer with random (non-zero) B, so gradients reach both LoRA matrices."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 4, "scale": 2.0, "dropout": 0.0})
    rng = np.random.default_rng(seed)
    updates = [(n, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)))
               for n, v in tree_flatten(model.trainable_parameters()) if n.endswith("lora_b")]
    model.load_weights(updates, strict=False)
    return model


def make_pairs(seed: int = 0, n: int = 6):
    """Pairs whose chosen and rejected lengths differ a lot (so batches split into two groups)."""
    rng = np.random.default_rng(seed)
    ints = lambda k: rng.integers(1, VOCAB, k).astype(np.int32)  # noqa: E731
    return [TokenizedPair(ints(int(rng.integers(2, 9))), ints(int(rng.integers(3, 12))),
                          ints(int(rng.integers(30, 70))), i) for i in range(n)]


# ------------------------------------------------------------------ batching: groups and packed positions


def test_packed_size_rounds_up_with_bounded_waste():
    assert [packed_size(n) for n in (1, 128, 129, 1000, 1024, 1025, 3000)] == [128, 128, 256, 1024, 1024, 1280, 3072]
    sizes = [packed_size(n) for n in range(1, 20000)]
    assert all(s >= n and s % PACK_MULTIPLE == 0 for n, s in zip(range(1, 20000), sizes))
    assert all(s - n <= max(PACK_MULTIPLE, n // 4) for n, s in zip(range(1, 20000), sizes))
    assert len(set(sizes)) < 40, "few distinct sizes, so compiled steps are reused"


def test_row_groups_are_length_sorted_halves():
    assert [g.tolist() for g in row_groups(np.array([10, 200, 12, 190]))] == [[0, 2], [3, 1]]
    assert [g.tolist() for g in row_groups(np.array([100, 110, 105, 120, 99]))] == [[4, 0], [2, 1, 3]]
    assert [g.tolist() for g in row_groups(np.array([7]))] == [[0]]


def test_feed_positions_point_at_each_response_token():
    pairs = make_pairs()
    layouts = [layout(p, poet=False) for p in pairs]
    batch = make_batch(pairs, [0, 1, 2, 3], layouts, pad_id=0)
    feed = make_feed(batch)
    assert [g.shape[1] for g in feed.groups] == [32, 96], "chosen ~10 tokens, rejected 30-70: padded apart"
    targets = np.concatenate([g[:, 1:].reshape(-1) for g in feed.groups])
    n_rows = len(batch.starts)
    for r in range(n_rows):
        pair = pairs[batch.indices[r % 4]]
        response = pair.chosen if r < 4 else pair.rejected
        mine = feed.rows == r
        np.testing.assert_array_equal(feed.offsets[mine], np.arange(len(response)))
        np.testing.assert_array_equal(targets[feed.positions[mine]], response)
    # Each group's positions are padded to `packed_size` on their own, the padding after the group's real ones.
    sizes = [g.shape[0] * (g.shape[1] - 1) for g in feed.groups]
    group = np.searchsorted(np.cumsum([0] + sizes), feed.positions, side="right") - 1
    assert (np.diff(group) >= 0).all() and len(feed.group_positions) == 2
    for g, local in enumerate(feed.group_positions):
        real = int((feed.rows[group == g] >= 0).sum())
        assert len(local) == packed_size(real) and (feed.rows[group == g][real:] == -1).all()
    assert padding_fraction(batch) < padding_fraction(batch, halves=False)


# ------------------------------------------------------------------ the output head


@pytest.mark.parametrize("tie", [False, True])
def test_output_head_found_for_llama_tied_or_not(tie):
    model = tiny_llama(tie)
    model.train()
    head = output_head(model)
    assert head is not None
    x = mx.array([[3, 5, 7, 11]])
    np.testing.assert_array_equal(np.array(head(model.model(x))), np.array(model(x)))
    assert model.training, "the probe restores the training mode"


def test_output_head_refused_when_the_forward_does_more():
    class SoftCapped(nn.Module):  # like Gemma 2: logits = c * tanh(logits / c)
        def __init__(self, inner):
            super().__init__()
            self.model, self.lm_head = inner.model, inner.lm_head

        def __call__(self, x):
            return 5.0 * mx.tanh(self.lm_head(self.model(x)) / 5.0)

    assert output_head(SoftCapped(tiny_llama(False))) is None

    class MaskedTrunk(nn.Module):  # the trunk needs an argument the split would not pass
        def __init__(self, inner):
            super().__init__()
            self.model, self.lm_head = inner.model, inner.lm_head

        def __call__(self, x):
            return self.lm_head(self.model(x, input_embeddings=self.model.embed_tokens(x) * 1.0))

    assert output_head(MaskedTrunk(tiny_llama(False))) is None
    assert output_head(nn.Linear(4, 4)) is None, "no trunk: the full forward is used"


# ------------------------------------------------------------------ fast path == plain path


def objective_and_grads(model, batch, objective, halves, head, frozen_head=False):
    def loss_fn(m):
        loss, metrics = batch_objective(m, *batch_inputs(batch, halves=halves), objective, head, frozen_head)
        return loss, metrics

    (loss, metrics), grads = nn.value_and_grad(model, loss_fn)(model)
    mx.eval(loss, metrics, grads)
    return loss, metrics, dict(tree_flatten(grads))


@pytest.mark.parametrize("loss,poet,sft", [("dpo", False, 0.0), ("dpo", True, 0.0), ("simpo", True, 0.5)])
@pytest.mark.parametrize("tie", [False, True])
def test_fast_path_equals_plain_path(loss, poet, sft, tie, monkeypatch):
    model = with_lora(tiny_llama(tie))
    objective = LossConfig(loss, beta=0.1 if loss == "dpo" else 2.0, sft_weight=sft)
    pairs = make_pairs(seed=3)
    layouts = [layout(p, poet, 1.0, objective.needs_full_chosen) for p in pairs]
    rng = np.random.default_rng(0)
    ref = [(rng.normal(-4, 1, len(p.chosen)).astype(np.float32), rng.normal(-4, 1, len(p.rejected)).astype(np.float32))
           for p in pairs]
    batch = make_batch(pairs, [0, 2, 4, 5], layouts, ref if objective.needs_reference else None)
    plain = objective_and_grads(model, batch, objective, halves=False, head=None)
    fast = objective_and_grads(model, batch, objective, halves=True, head=output_head(model))
    assert head_is_frozen(model)  # LoRA: the head's weights are frozen
    # The frozen-head path (the head's gradient computed in the forward, a chunk at a time) with 3-row chunks.
    monkeypatch.setattr(logprobs, "DEFAULT_CHUNK_ELEMENTS", 3 * model.args.vocab_size)
    chunked = objective_and_grads(model, batch, objective, halves=True, head=output_head(model), frozen_head=True)
    assert list(plain[1]) == metric_names(objective)  # the trainer logs exactly these, in this order
    for other in (fast, chunked):
        np.testing.assert_allclose(np.array(other[0]), np.array(plain[0]), rtol=1e-5)
        for name in plain[1]:
            np.testing.assert_allclose(np.array(other[1][name]), np.array(plain[1][name]), rtol=1e-5, atol=1e-5)
        assert plain[2] and set(other[2]) == set(plain[2])
        for name, g in plain[2].items():
            scale = float(np.abs(np.array(g)).max())
            assert scale > 0, f"{name}: the test needs non-zero gradients"
            np.testing.assert_allclose(np.array(other[2][name]), np.array(g), rtol=1e-4, atol=1e-5 * scale)


def test_head_is_frozen_only_without_trainable_head_weights():
    untied, tied = with_lora(tiny_llama(False)), with_lora(tiny_llama(True))
    assert head_is_frozen(untied) and head_is_frozen(tied)
    untied.lm_head.unfreeze()  # a trained lm_head (full fine-tuning) needs its weight gradient
    tied.model.embed_tokens.unfreeze()  # the tied embedding is the head
    assert not head_is_frozen(untied) and not head_is_frozen(tied)
    assert not head_is_frozen(nn.Linear(4, 4)), "no head module"


def test_packed_log_probs_equal_the_full_forward():
    model = tiny_llama(False)
    pairs = make_pairs(seed=5)
    layouts = [layout(p, poet=False) for p in pairs]
    batch = make_batch(pairs, [1, 3, 4], layouts)
    full = np.array(model_token_logps(model, mx.array(batch.tokens)))  # (2B, L-1)
    feed = make_feed(batch)
    got = np.array(response_token_logps(model, tuple(mx.array(g) for g in feed.groups),
                                        tuple(mx.array(p) for p in feed.group_positions), output_head(model)))
    for r in range(len(batch.starts)):
        s, n = batch.starts[r], batch.keep_lens[r]
        np.testing.assert_allclose(got[feed.rows == r], full[r, s : s + n], rtol=1e-5, atol=1e-5)


def test_row_sums_by_hand():
    values = mx.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    rows = mx.array([0, 0, 0, 1, 1, -1])
    offsets = mx.array([0, 1, 2, 0, 1, 0])
    np.testing.assert_array_equal(np.array(row_sums(values, rows, offsets, mx.array([2, 5]))), [3.0, 24.0])
    np.testing.assert_array_equal(np.array(row_sums(values, rows, offsets, mx.array([0, 1]))), [0.0, 8.0])


def test_loaded_models_use_the_head_path(tiny_model_dir, tiny_quant_model_dir):
    """Both test models (float32, and 4-bit with Linux's fast_quant layers) pass the probe as loaded; rows are
    split in halves except where every forward re-expands 4-bit weights (fast_quant, Linux CPU)."""
    from poet_mlx.backends import fast_quant
    from poet_mlx.models import load_model
    from poet_mlx.objective import feeds_halves

    for path, quantized in ((tiny_model_dir, False), (tiny_quant_model_dir, True)):
        model, _, _ = load_model(str(path))
        assert output_head(model) is model.lm_head, path
        assert feeds_halves(model) == (not (quantized and fast_quant.wanted())), path


def test_probe_verdict_is_kept_until_the_head_changes():
    model = tiny_llama(False)
    calls = []
    real_call = type(model).__call__
    type(model).__call__ = lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k)
    try:
        assert output_head(model) is model.lm_head and output_head(model) is model.lm_head
        assert len(calls) == 1, "one probe for the same head"
        model.lm_head = nn.Linear(32, VOCAB, bias=False)  # a new head module: probed again
        assert output_head(model) is model.lm_head and len(calls) == 2
    finally:
        type(model).__call__ = real_call


ARCHITECTURES = [  # (mlx-lm model type, extra args, whether the split head applies)
    ("qwen2", {}, True),
    ("qwen3", {"head_dim": 8, "max_position_embeddings": 128, "rope_theta": 1e4, "tie_word_embeddings": True}, True),
    ("gemma3_text", {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 16, "sliding_window_pattern": 2},
     True),
    ("phi3", {"rope_theta": 1e4}, True),
    ("gemma2", {"head_dim": 8, "query_pre_attn_scalar": 8}, False),  # logit soft-capping
    ("cohere", {"logit_scale": 0.5}, False),  # logits scaled after the head
]


@pytest.mark.parametrize("model_type,extra,split", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_probe_on_mlx_lm_architectures(model_type, extra, split):
    import importlib

    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    args = module.ModelArgs.from_dict({"model_type": model_type, "hidden_size": 32, "num_hidden_layers": 2,
                                       "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                                       "rms_norm_eps": 1e-5, "vocab_size": VOCAB, **extra})
    mx.random.seed(0)
    model = module.Model(args)
    mx.eval(model.parameters())
    assert (output_head(model) is not None) == split


def test_probe_refuses_logit_transforms_even_when_they_look_like_the_identity():
    """Fidelity (issue #13): Gemma 2 soft-caps its logits (30 tanh(x / 30)); on a model whose logits are near 0
    that is the identity to float32 precision, so the probe alone passes and its verdict stays cached, and the
    split head would then skip the cap on a trained model. The config says so: refused without a probe."""
    import importlib

    from poet_mlx.head import _candidate, _probe

    module = importlib.import_module("mlx_lm.models.gemma2")
    args = module.ModelArgs.from_dict({"model_type": "gemma2", "hidden_size": 32, "num_hidden_layers": 2,
                                       "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                                       "rms_norm_eps": 1e-5, "vocab_size": VOCAB, "head_dim": 8,
                                       "query_pre_attn_scalar": 8})
    mx.random.seed(0)
    model = module.Model(args)
    model.model.embed_tokens.weight = model.model.embed_tokens.weight * 1e-3  # tied head: logits ~1e-3
    mx.eval(model.parameters())
    assert _probe(model, _candidate(model)[1]), "near-zero logits: the probe by itself is fooled"
    assert output_head(model) is None
    for key, value in (("final_logit_softcapping", 30.0), ("logit_scale", 0.0625), ("logits_scaling", 8.0)):
        llama = tiny_llama(False)
        setattr(llama.args, key, value)
        assert output_head(llama) is None, key
    assert output_head(tiny_llama(False)) is not None
