"""POET truncation == masking, on the tiny model and real token ids.

poet-mlx cuts the token ids of both responses to their first k = min(len) tokens instead of masking the tail.
Under a causal model the kept prefix never attends to the tail, so the two must give the same log-probs. The
checks: (a) model level, truncated sequence vs full sequence masked to k; (b) the batch path (`layout` +
`make_batch` + `batch_objective`, padded, mixed lengths) vs the masked full sequence; (c) hand cases on real
ids (equal lengths, a one-token response, EOS kept by the shorter response only, nothing appended); (d) the
reference uses the same k; (e) poet_ratio 0.5 keeps floor(0.5 * k).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import run_config

try:  # tests/ as a package or as a plain folder on sys.path
    from . import reference_numpy as ref
except ImportError:
    import reference_numpy as ref

from poet_mlx.batching import layout, make_batch
from poet_mlx.config import LossConfig
from poet_mlx.data.tokenization import TokenizedPair
from poet_mlx.head import output_head
from poet_mlx.objective import batch_inputs, batch_objective, model_token_logps
from poet_mlx.poet import truncate_pair

MAX_LENGTH, MAX_PROMPT_LENGTH = 128, 32
PAD_ID = 0
BETA = 0.1
RTOL = 1e-6


# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    from mlx_lm import load

    model, tokenizer = load(str(tiny_model_dir))
    model.eval()
    return model, tokenizer


def tokenize(tiny_model_dir, data, tokenizer, chat_template=True):
    from poet_mlx.data.sources import load_split
    from poet_mlx.data.tokenization import tokenize_pairs

    cfg = run_config(tiny_model_dir, data, "unused")
    rows, _ = load_split(cfg.data, "train")
    pairs, _ = tokenize_pairs(rows, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH, chat_template=chat_template)
    return pairs


@pytest.fixture(scope="module")
def pairs(tiny_model_dir, tiny_data_dir, base):
    """Eight real pairs of unequal lengths, both orientations (chosen shorter and rejected shorter)."""
    ps = tokenize(tiny_model_dir, tiny_data_dir / "valid.jsonl", base[1])[:8]
    assert all(len(p.chosen) != len(p.rejected) for p in ps)
    assert any(len(p.chosen) < len(p.rejected) for p in ps) and any(len(p.chosen) > len(p.rejected) for p in ps)
    return ps


def seq_logps(model, prompt, response) -> np.ndarray:
    """Per-token log-probs (float64) of `response` after `prompt`, from one unpadded forward."""
    seq = np.concatenate([prompt, response]).astype(np.int32)
    out = np.asarray(model_token_logps(model, mx.array(seq[None])).astype(mx.float32), dtype=np.float64)[0]
    return out[len(prompt) - 1 :]


def numpy_seq_logps(model, prompt, response) -> np.ndarray:
    """The same from float64 numpy log-softmax over the model's logits (independent of poet_mlx.logprobs)."""
    seq = np.concatenate([prompt, response]).astype(np.int32)
    logits = np.asarray(model(mx.array(seq[None, :-1])).astype(mx.float32), dtype=np.float64)
    return ref.token_logps(logits, seq[None, 1:])[0][len(prompt) - 1 :]


@pytest.fixture(scope="module")
def full_logps(base, pairs):
    """Masked full-sequence reference: float64 numpy per-token log-probs of every full response."""
    model = base[0]
    return [(numpy_seq_logps(model, p.prompt, p.chosen), numpy_seq_logps(model, p.prompt, p.rejected))
            for p in pairs]


def run_batch(model, pairs, layouts, ref_token_logps=None, loss="dpo"):
    """The training/eval path on all `pairs` as batches of 4 (mixed lengths -> padding)."""
    metrics, batches = {}, []
    for start in range(0, len(pairs), 4):
        idx = list(range(start, min(start + 4, len(pairs))))
        b = make_batch(pairs, idx, layouts, ref_token_logps, pad_id=PAD_ID)
        _, m = batch_objective(model, *batch_inputs(b), LossConfig(loss, beta=BETA), output_head(model))
        mx.eval(m)
        for k, v in m.items():
            metrics.setdefault(k, []).extend(np.asarray(v, dtype=np.float64).tolist())
        batches.append(b)
    return {k: np.array(v) for k, v in metrics.items()}, batches


def masked_sums(full, lengths):
    """Sum of each full per-token array over its first n tokens (masking the tail)."""
    return np.array([lp[:n].sum() for lp, n in zip(full, lengths)])


# ------------------------------------------------------------------ (a) model level


def test_truncated_sequence_equals_masked_full_sequence(base, pairs):
    """Log-prob sums over the first k response tokens: prompt + response[:k] vs full sequence masked to k."""
    model = base[0]
    worst = 0.0
    for p in pairs:
        k = ref.poet_k(len(p.chosen), len(p.rejected))
        assert k < max(len(p.chosen), len(p.rejected))
        for resp in (p.chosen, p.rejected):
            full = seq_logps(model, p.prompt, resp)
            cut = seq_logps(model, p.prompt, resp[:k])
            assert len(cut) == k
            np.testing.assert_allclose(cut, full[:k], rtol=1e-5, atol=1e-5)  # token by token
            np.testing.assert_allclose(cut.sum(), full[:k].sum(), rtol=RTOL)
            worst = max(worst, abs(cut.sum() - full[:k].sum()) / abs(full[:k].sum()))
    print(f"\n(a) truncated vs masked, max relative difference of sums: {worst:.1e}")


# ------------------------------------------------------------------ (b) batch path


def test_batch_path_equals_masked_full_sequence(base, pairs, full_logps):
    model = base[0]
    layouts = [layout(p, poet=True) for p in pairs]
    ks = [ref.poet_k(len(p.chosen), len(p.rejected)) for p in pairs]
    assert [(lay.score_chosen, lay.score_rejected, lay.keep_chosen, lay.keep_rejected) for lay in layouts] \
        == [(k, k, k, k) for k in ks]
    metrics, batches = run_batch(model, pairs, layouts, loss="simpo")
    # SimPO logs the averages it scores (as princeton SimPO and TRL's CPO do): sums over k, divided by k.
    want_c = masked_sums([f[0] for f in full_logps], ks) / np.asarray(ks)
    want_r = masked_sums([f[1] for f in full_logps], ks) / np.asarray(ks)
    np.testing.assert_allclose(metrics["logps/chosen"], want_c, rtol=1e-5)
    np.testing.assert_allclose(metrics["logps/rejected"], want_r, rtol=1e-5)
    np.testing.assert_array_equal(metrics["num_tokens/chosen"], ks)
    np.testing.assert_array_equal(metrics["num_tokens/rejected"], ks)
    worst = max(np.max(np.abs(metrics["logps/chosen"] - want_c) / np.abs(want_c)),
                np.max(np.abs(metrics["logps/rejected"] - want_r) / np.abs(want_r)))
    print(f"\n(b) batch path vs masked full sequence, max relative difference: {worst:.1e}")
    # The tails really are gone from the token array: each row is prompt + response[:k], then padding.
    for b in batches:
        n = len(b.indices)
        for j, i in enumerate(b.indices):
            p, k = pairs[i], ks[i]
            for row, resp in ((j, p.chosen), (j + n, p.rejected)):
                used = len(p.prompt) + k
                np.testing.assert_array_equal(b.tokens[row, :used], np.concatenate([p.prompt, resp[:k]]))
                assert (b.tokens[row, used:] == PAD_ID).all()
    assert any((b.tokens == PAD_ID).any() for b in batches), "batches should mix lengths (padding)"


# ------------------------------------------------------------------ (c) hand cases on real token ids


def hand_pairs(tiny_model_dir, tokenizer, records, chat_template=True):
    from poet_mlx.data.sources import rows_from_records
    from poet_mlx.data.tokenization import tokenize_pairs

    rows, _ = rows_from_records(records, "hand")
    out, _ = tokenize_pairs(rows, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH, chat_template=chat_template)
    assert len(out) == len(records)
    return out


def test_equal_lengths_nothing_cut(tiny_model_dir, base):
    model, tokenizer = base
    [p] = hand_pairs(tiny_model_dir, tokenizer, [{"prompt": "Tell me about the forest.",
                                                  "chosen": "The old bird moves slowly.",
                                                  "rejected": "The small stone rests today."}])
    n = len(p.chosen)
    assert len(p.rejected) == n, "precondition: the two replies tokenize to the same length"
    lay = layout(p, poet=True)
    assert lay == layout(p, poet=False)
    assert (lay.score_chosen, lay.score_rejected, lay.keep_chosen, lay.keep_rejected) == (n, n, n, n)
    c, r = truncate_pair(p.chosen.tolist(), p.rejected.tolist())
    assert c == p.chosen.tolist() and r == p.rejected.tolist()
    with_poet, _ = run_batch(model, [p], [lay])
    without, _ = run_batch(model, [p], [layout(p, poet=False)])
    for key in ("logps/chosen", "logps/rejected", "num_tokens/chosen", "num_tokens/rejected"):
        np.testing.assert_array_equal(with_poet[key], without[key])


def test_one_token_response_gives_k_1(base, pairs, full_logps):
    """A response that is only the EOS id, against a real longer one: k = 1 for both sides."""
    model, tokenizer = base
    eos = tokenizer.eos_token_id
    p = pairs[0]
    one = TokenizedPair(prompt=p.prompt, chosen=np.array([eos], np.int32), rejected=p.rejected, index=0)
    lay = layout(one, poet=True)
    assert (lay.score_chosen, lay.score_rejected, lay.keep_chosen, lay.keep_rejected) == (1, 1, 1, 1)
    metrics, [b] = run_batch(model, [one], [lay])
    assert b.tokens[1, len(p.prompt)] == p.rejected[0] and (b.tokens[1, len(p.prompt) + 1 :] == PAD_ID).all()
    np.testing.assert_allclose(metrics["logps/rejected"], [full_logps[0][1][0]], rtol=1e-5)
    np.testing.assert_allclose(metrics["logps/chosen"], [numpy_seq_logps(model, p.prompt, one.chosen)[0]],
                               rtol=1e-5)
    assert metrics["num_tokens/chosen"].tolist() == metrics["num_tokens/rejected"].tolist() == [1.0]


@pytest.mark.parametrize("chat_template", [True, False], ids=["chat", "raw"])
def test_shorter_keeps_eos_longer_has_none_nothing_appended(tiny_model_dir, tiny_data_dir, base, chat_template):
    """The shorter response is scored whole (its EOS included); the longer is a plain prefix with no EOS.

    With the chat template a response ends `<|end|>` + newline, so EOS is its second-to-last token; raw
    (no template) responses end with the EOS id itself, which is then the last scored token.
    """
    model, tokenizer = base
    eos = tokenizer.eos_token_id
    ps = tokenize(tiny_model_dir, tiny_data_dir / "valid.jsonl", tokenizer, chat_template)[:8]
    layouts = [layout(p, poet=True) for p in ps]
    _, batches = run_batch(model, ps, layouts)
    seen = set()
    for b in batches:
        n = len(b.indices)
        for j, i in enumerate(b.indices):
            p, lay = ps[i], layouts[i]
            (short, s_row), (long_, l_row) = sorted([(p.chosen, j), (p.rejected, j + n)], key=lambda x: len(x[0]))
            seen.add(bool(len(p.chosen) < len(p.rejected)))
            k = len(short)
            assert lay.score_chosen == lay.score_rejected == k < len(long_)
            c, r = truncate_pair(p.chosen.tolist(), p.rejected.tolist())
            kept_short, kept_long = (c, r) if len(p.chosen) < len(p.rejected) else (r, c)
            assert kept_short == short.tolist() and eos in kept_short
            assert kept_long == long_[:k].tolist() and eos not in kept_long
            start = len(p.prompt)
            scored_short = b.tokens[s_row, start : start + k]
            scored_long = b.tokens[l_row, start : start + k]
            np.testing.assert_array_equal(scored_short, short)
            np.testing.assert_array_equal(scored_long, long_[:k])
            assert eos not in scored_long
            if not chat_template:
                assert scored_short[-1] == eos, "raw: the shorter response's last scored token is EOS"
            # Nothing appended after the cut: the rest of both rows is padding.
            assert (b.tokens[s_row, start + k :] == PAD_ID).all() and (b.tokens[l_row, start + k :] == PAD_ID).all()
    assert seen == {True, False}, "both orientations covered"


# ------------------------------------------------------------------ (d) the reference uses the same k


def test_reference_uses_the_same_k(base, pairs, full_logps):
    from poet_mlx.scoring import pair_token_logps

    model = base[0]
    ref_tl = pair_token_logps(model, pairs, batch_size=3, pad_id=PAD_ID)[0]
    # Per-token reference log-probs over the FULL responses (any k is then a prefix sum).
    for (rc, rr), (fc, fr), p in zip(ref_tl, full_logps, pairs):
        assert len(rc) == len(p.chosen) and len(rr) == len(p.rejected)
        np.testing.assert_allclose(rc, fc, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(rr, fr, rtol=1e-5, atol=1e-5)
    layouts = [layout(p, poet=True) for p in pairs]
    ks = [ref.poet_k(len(p.chosen), len(p.rejected)) for p in pairs]
    metrics, _ = run_batch(model, pairs, layouts, ref_token_logps=ref_tl, loss="dpo")
    want_rc = masked_sums([f[0] for f in full_logps], ks)
    want_rr = masked_sums([f[1] for f in full_logps], ks)
    np.testing.assert_allclose(metrics["ref_logps/chosen"], want_rc, rtol=1e-5)
    np.testing.assert_allclose(metrics["ref_logps/rejected"], want_rr, rtol=1e-5)
    # Policy == reference here, so with the same k on both sides every reward is ~0; had the reference
    # been summed over the full (uncut) response, the longer side's reward would be off by beta * tail.
    tails = [BETA * abs(f[0][k:].sum() + f[1][k:].sum()) for f, k in zip(full_logps, ks)]
    assert min(tails) > 0.1
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        np.testing.assert_allclose(metrics[key], 0.0, atol=1e-4)
    np.testing.assert_allclose(metrics["loss"], math.log(2.0), rtol=1e-5)


def test_scoring_head_in_chunks_gives_the_same_numbers(base, pairs, full_logps, monkeypatch):
    """The reference pass computes the head a few rows at a time: with chunks of one and of three rows
    (instead of the whole batch in one), in vocabulary blocks of a third of the words (`blocked_head`) and
    through any head callable (`scoring.head_in_chunks`), log-probs and entropies are unchanged."""
    from poet_mlx import blocked_head, head, logprobs
    from poet_mlx.scoring import pair_token_logps

    model = base[0]
    whole_lp, whole_ent = pair_token_logps(model, pairs, batch_size=3, pad_id=PAD_ID, entropy=True)
    vocab = model.args.vocab_size
    assert blocked_head.linear_head(head.output_head(model)) is not None
    for rows, wrapped in ((1, False), (3, False), (1, True), (3, True)):
        monkeypatch.setattr(logprobs, "DEFAULT_CHUNK_ELEMENTS", rows * vocab if wrapped else 2 * rows * vocab // 3)
        monkeypatch.setattr(blocked_head, "HEAD_ROWS", rows)
        if wrapped:  # not recognized as linear: the row-chunked path
            monkeypatch.setattr(blocked_head, "linear_head", lambda h: None)
        lp, ent = pair_token_logps(model, pairs, batch_size=3, pad_id=PAD_ID, entropy=True)
        for got, want in ((lp, whole_lp), (ent, whole_ent), (lp, full_logps)):
            for (gc, gr), (wc, wr) in zip(got, want):
                np.testing.assert_allclose(gc, wc, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(gr, wr, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ (e) the ratio ablation


def test_ratio_half_keeps_floor_half_k(base, pairs, full_logps):
    from poet_mlx.scoring import pair_token_logps

    model = base[0]
    layouts = [layout(p, poet=True, ratio=0.5) for p in pairs]
    ks = [min(len(p.chosen), len(p.rejected)) // 2 for p in pairs]
    assert ks == [ref.poet_k(len(p.chosen), len(p.rejected), 0.5) for p in pairs]
    assert [(lay.score_chosen, lay.score_rejected, lay.keep_chosen, lay.keep_rejected) for lay in layouts] \
        == [(k, k, k, k) for k in ks]
    ref_tl = pair_token_logps(model, pairs, batch_size=4, pad_id=PAD_ID)[0]
    metrics, batches = run_batch(model, pairs, layouts, ref_token_logps=ref_tl, loss="dpo")
    np.testing.assert_array_equal(metrics["num_tokens/chosen"], ks)
    for side, key in ((0, "chosen"), (1, "rejected")):
        want = masked_sums([f[side] for f in full_logps], ks)
        np.testing.assert_allclose(metrics[f"logps/{key}"], want, rtol=1e-5)
        np.testing.assert_allclose(metrics[f"ref_logps/{key}"], want, rtol=1e-5)
    for b in batches:
        assert b.tokens.shape[1] >= max(len(pairs[i].prompt) + ks[i] for i in b.indices)
        for j, i in enumerate(b.indices):
            used = len(pairs[i].prompt) + ks[i]
            assert (b.tokens[j, used:] == PAD_ID).all() and (b.tokens[j + len(b.indices), used:] == PAD_ID).all()


# ------------------------------------------------------------------ (f) whose are the assistant header tokens


def test_assistant_header_as_response_counts_in_k(tiny_model_dir, tiny_data_dir, base):
    """TRL's boundary (default) puts the chat template's assistant header (`<|assistant|>\\n` here) in the prompt;
    the official POET/SimPO code renders the prompt without the generation prompt, so the header starts the
    response: every response gains the header's tokens, k grows by as many, the prompt loses them, the full
    sequences are the same ids."""
    from poet_mlx.data.sources import load_split
    from poet_mlx.data.tokenization import tokenize_pairs

    tokenizer = base[1]
    header = tokenizer.encode("<|assistant|>\n", add_special_tokens=False)
    rows, _ = load_split(run_config(tiny_model_dir, tiny_data_dir / "valid.jsonl", "unused").data, "train")
    trl, _ = tokenize_pairs(rows, tokenizer, 10**6, 10**6 - 1)
    official, _ = tokenize_pairs(rows, tokenizer, 10**6, 10**6 - 1, assistant_header="response")
    assert len(header) >= 1 and len(trl) == len(official)
    for a, b in zip(trl, official):
        for side in ("chosen", "rejected"):
            np.testing.assert_array_equal(np.concatenate([a.prompt, getattr(a, side)]),
                                          np.concatenate([b.prompt, getattr(b, side)]))
            np.testing.assert_array_equal(getattr(b, side)[: len(header)], header)
        assert len(b.prompt) == len(a.prompt) - len(header)
        assert ref.poet_k(len(b.chosen), len(b.rejected)) == ref.poet_k(len(a.chosen), len(a.rejected)) + len(header)
