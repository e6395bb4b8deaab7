"""Per-token log-probs and next-token entropy of every response position, from one forward pass.

The entropy at response position t (1-based) is that of the model's distribution over the token at t, given
the prompt and the t-1 response tokens before it (teacher forcing). At t = 1 the context is the prompt alone,
so the chosen and rejected replies of a pair share it: that is the distribution generation samples its first
token from. Training that sharpens the policy where replies diverge shows up as lower entropy there.

Like `logprobs.per_token_logps`, the softmax is never materialised for the whole sequence: entropy is
computed in chunks over the sequence axis, so the extra memory is (N, chunk, V) float32 at most.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from ..logprobs import DEFAULT_CHUNK_ELEMENTS

TokenArrays = list[tuple[np.ndarray, np.ndarray]]
"""Per pair: (chosen, rejected) float32 arrays over the full responses."""


def token_entropy(logits, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
    """Entropy (nats) of softmax(logits) at every position.

    Args:
        logits: (N, T, V) mx.array, any float dtype.

    Returns:
        (N, T) float32 mx.array: H = logsumexp(l) - sum_v softmax(l)_v * l_v.
    """
    import mlx.core as mx

    n, t, v = logits.shape
    step = max(1, min(t, chunk_elements // max(1, n * v)))
    parts = []
    for s in range(0, t, step):
        chunk = logits[:, s : s + step].astype(mx.float32)  # (N, c, V)
        lse = mx.logsumexp(chunk, axis=-1, keepdims=True)  # (N, c, 1)
        parts.append(lse[..., 0] - (mx.exp(chunk - lse) * chunk).sum(axis=-1))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)


def response_token_stats(model, pairs, batch_size: int, pad_id: int = 0, entropy: bool = True,
                         progress: Optional[Callable[[int, int], None]] = None
                         ) -> tuple[TokenArrays, Optional[TokenArrays]]:
    """Per-token log-probs (and entropies) of every full response under `model` (no gradient, eval mode).

    Args:
        pairs: `tokenization.TokenizedPair`s; responses are scored whole (no POET cut).

    Returns:
        (logps, entropies): per pair (chosen, rejected) float32 arrays with one value per response token;
        entropies is None when `entropy` is False. The log-probs equal `reference.compute_token_logps`.
    """
    import mlx.core as mx

    from ..batching import layout, make_batch, sequential_batches
    from ..logprobs import per_token_logps

    model.eval()
    layouts = [layout(p, poet=False) for p in pairs]
    logps_out: list = [None] * len(pairs)
    ent_out: list = [None] * len(pairs) if entropy else None
    done = 0
    for idx in sequential_batches([lay.tokens for lay in layouts], batch_size):
        batch = make_batch(pairs, idx, layouts, pad_id=pad_id)
        tokens = mx.array(batch.tokens)
        logits = model(tokens[:, :-1])  # (2B, L-1, V)
        lp = per_token_logps(logits, tokens[:, 1:])
        ent = token_entropy(logits) if entropy else None
        mx.eval([a for a in (lp, ent) if a is not None])
        lp = np.asarray(lp.astype(mx.float32))
        ent = np.asarray(ent) if entropy else None
        b = len(idx)
        for j, i in enumerate(idx):
            spans = [(r, batch.starts[r], batch.keep_lens[r]) for r in (j, j + b)]
            logps_out[i] = tuple(lp[r, s : s + n].copy() for r, s, n in spans)
            if entropy:
                ent_out[i] = tuple(ent[r, s : s + n].copy() for r, s, n in spans)
        done += b
        if progress:
            progress(done, len(pairs))
    return logps_out, ent_out


def entropy_by_position(values: Sequence[np.ndarray], max_position: Optional[int] = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ragged per-position values over the sequences that reach each position.

    Args:
        values: N 1-D arrays (e.g. one response's per-token entropies).
        max_position: keep positions 1..max_position (default: the longest sequence).

    Returns:
        (means, counts): (P,) float64 means (NaN where no sequence reaches) and (P,) int64 counts; index
        t - 1 holds position t.
    """
    longest = max((len(v) for v in values), default=0)
    width = longest if max_position is None else max_position
    sums, counts = np.zeros(width), np.zeros(width, np.int64)
    for v in values:
        n = min(len(v), width)
        sums[:n] += v[:n]
        counts[:n] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return means, counts


def entropy_profile(entropies: TokenArrays, label: str = "") -> dict:
    """The JSON form of `poet-mlx eval --entropy` for one model: mean next-token entropy by response position
    over chosen and over rejected responses (teacher-forced), with the number of responses reaching each.

    Returns {"label", "position": [1..P], "chosen": [...], "rejected": [...], "chosen_count": [...],
    "rejected_count": [...]} with null where no response reaches a position.
    """
    out: dict = {"label": label}
    longest = max((max(len(c), len(r)) for c, r in entropies), default=0)
    out["position"] = list(range(1, longest + 1))
    for side, name in ((0, "chosen"), (1, "rejected")):
        means, counts = entropy_by_position([e[side] for e in entropies], longest)
        out[name] = [None if np.isnan(m) else float(m) for m in means]
        out[f"{name}_count"] = [int(c) for c in counts]
    return out
