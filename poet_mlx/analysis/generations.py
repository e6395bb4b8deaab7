"""The generation-level check: sample replies from the base and the aligned model, judge them, count wins.

Implicit rewards say how the model *ranks* given replies; what users see is what it *generates*. For each
held-out prompt, the base (adapters off) and the aligned model each sample one reply, with the same seed per
prompt (so two identical models give identical replies: ties, win rate 0.5). A judge scores every reply; the
aligned model wins a prompt when its reply scores higher, ties when equal.

Judges are `analysis.judges`; sampling is `generate.sampling`.

Win rate: (wins + ties / 2) / n. Its confidence interval is Wilson's score interval for that proportion at n
prompts. With ties a prompt's outcome is 0, 1/2 or 1, whose variance is at most that of a 0/1 outcome with the
same mean, so the interval is conservative (slightly too wide) when there are ties, exact in coverage terms
otherwise (as Wilson is for a binomial).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Callable, Optional, Sequence

import numpy as np

from ..generate.sampling import sample_replies


@dataclass
class GenerationOptions:
    """What `poet-mlx eval --generate N` samples and how (command options, not training settings)."""

    prompts: int
    judge: str
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Sample:
    """One generated reply, with what the judge and the JSONL need."""

    index: int
    prompt: str
    model: str
    reply: str
    reply_ids: list
    finished: bool
    seed: int
    prompt_ids: np.ndarray = field(repr=False, default=None)
    score: Optional[float] = None

    def to_json(self) -> dict:
        return {"index": self.index, "prompt": self.prompt, "model": self.model, "reply": self.reply,
                "tokens": len(self.reply_ids), "finished": self.finished, "seed": self.seed, "score": self.score}


def prompt_text(row) -> str:
    """The text a judge sees as the prompt: the row's prompt string, or a conversation's last message."""
    if isinstance(row.prompt, str):
        return row.prompt
    return str(row.prompt[-1].get("content", "")) if row.prompt else ""


def generation_prompts(rows, pairs, n: int) -> list[tuple[int, str, np.ndarray]]:
    """(row index, prompt text, prompt token ids) of the first `n` tokenized pairs, in input order.

    Args:
        rows: the split's `PreferenceRow`s (for the prompt text); pairs: its `TokenizedPair`s (for the ids).
    """
    by_index = {r.index: r for r in rows}
    return [(p.index, prompt_text(by_index[p.index]), p.prompt) for p in list(pairs)[:n]]


def generate_samples(model, tokenizer, prompts, label: str, opts: GenerationOptions,
                     progress: Optional[Callable[[int, int], None]] = None) -> list[Sample]:
    """One `Sample` per prompt of `generation_prompts`, from `model` as it is (adapters on or off)."""
    replies = sample_replies(model, tokenizer, [ids for _, _, ids in prompts], opts.max_tokens, opts.temperature,
                             opts.seed, opts.top_p, progress)
    return [Sample(index, text, label, reply, ids, finished, opts.seed + i, prompt_ids)
            for i, ((index, text, prompt_ids), (reply, ids, finished)) in enumerate(zip(prompts, replies))]


# -------------------------------------------------------------------------------------------------- stats


@dataclass
class WinRate:
    """Aligned vs base over n prompts: (wins + ties / 2) / n with a Wilson interval at `confidence`."""

    wins: int
    ties: int
    losses: int
    n: int
    rate: float
    low: float
    high: float
    confidence: float = 0.95

    def to_json(self) -> dict:
        return asdict(self)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion successes / n (successes may be fractional: ties as halves).

    With z the two-sided normal quantile, p = successes / n:
        center = (p + z^2 / 2n) / (1 + z^2 / n),  half = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n).
    Returns (nan, nan) for n = 0.
    """
    if n <= 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def win_rate(aligned: Sequence[float], base: Sequence[float], confidence: float = 0.95) -> WinRate:
    """Win rate of aligned over base, prompt by prompt (scores of the same prompts in the same order)."""
    if len(aligned) != len(base):
        raise ValueError(f"{len(aligned)} aligned scores vs {len(base)} base scores")
    a, b = np.asarray(aligned, np.float64), np.asarray(base, np.float64)
    wins, ties = int((a > b).sum()), int((a == b).sum())
    n = len(a)
    losses = n - wins - ties
    rate = (wins + ties / 2) / n if n else math.nan
    low, high = wilson_interval(wins + ties / 2, n, confidence)
    return WinRate(wins, ties, losses, n, rate, low, high, confidence)


def samples_jsonl(samples: Sequence[Sample]) -> str:
    """One JSON object per sample (index, prompt, model, reply, tokens, finished, seed, score)."""
    return "".join(json.dumps(s.to_json(), ensure_ascii=False) + "\n" for s in samples)
